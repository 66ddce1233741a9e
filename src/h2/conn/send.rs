//! The sending side of a connection: response heads (HPACK literals), bodies as the
//! windows allow, and the output buffer written to the socket.

use super::*;

impl<S: FnMut(Request<ClientBody>) -> Handler> Conn<S> {
    pub(super) fn begin_block(&mut self, block: &mut Vec<u8>) {
        self.encoder.begin(block);
    }

    /// Writes a header block as HEADERS and, beyond the client's frame size,
    /// CONTINUATION frames.
    pub(super) fn write_block(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        let mut chunks = block.chunks(self.peer_max_frame);
        let first = chunks.next().unwrap_or(&[]);
        let last = first.len() == block.len();
        let mut flags = if end_stream { frame::END_STREAM } else { 0 };
        if last {
            flags |= frame::END_HEADERS;
        }
        frame::write_head(&mut self.wbuf, first.len(), frame::HEADERS, flags, stream);
        self.wbuf.extend_from_slice(first);
        let mut rest = chunks.peekable();
        while let Some(c) = rest.next() {
            let flags = if rest.peek().is_none() {
                frame::END_HEADERS
            } else {
                0
            };
            frame::write_head(&mut self.wbuf, c.len(), frame::CONTINUATION, flags, stream);
            self.wbuf.extend_from_slice(c);
        }
    }

    /// A response head, written straight into the output when it fits one frame.
    pub(super) fn write_response_head(
        &mut self,
        stream: u32,
        parts: &http::response::Parts,
        size: Option<u64>,
        end_stream: bool,
    ) {
        let at = self.wbuf.len();
        frame::write_head(&mut self.wbuf, 0, frame::HEADERS, 0, stream);
        let start = self.wbuf.len();
        let mut block = std::mem::take(&mut self.wbuf);
        self.begin_block(&mut block);
        let status = parts.status.as_u16();
        hpack::encode_status(status, &mut block);
        let (date, length) = self.encode_fields(&parts.headers, &mut block);
        if !date {
            let mut now = Vec::with_capacity(29);
            crate::h1::wire::date(&mut now);
            hpack::encode_field("date", &now, false, &mut block);
        }
        // From the body's length only when there is a body to come, as hyper's server
        // does: a response over at its head (END_STREAM on it) needs none, and for a
        // HEAD (which has no body whatever a GET's would be) `content-length: 0` would
        // be a false statement about the GET.
        if let (false, Some(n), false) = (
            length,
            size,
            end_stream || status < 200 || status == 204 || status == 304,
        ) {
            let mut digits = itoa::Buffer::new();
            hpack::encode_field(
                "content-length",
                digits.format(n).as_bytes(),
                false,
                &mut block,
            );
        }
        self.wbuf = block;
        let len = self.wbuf.len() - start;
        if len <= self.peer_max_frame {
            frame::patch_len(&mut self.wbuf, at, len);
            self.wbuf[at + 4] = frame::END_HEADERS | if end_stream { frame::END_STREAM } else { 0 };
        } else {
            let block = self.wbuf.split_off(start);
            self.wbuf.truncate(at);
            self.write_block(stream, &block, end_stream);
        }
    }

    /// Encodes a head's or trailers' fields, leaving out connection-specific ones;
    /// whether they had a `date` and a `content-length`.
    fn encode_fields(&mut self, map: &HeaderMap, block: &mut Vec<u8>) -> (bool, bool) {
        let (mut date, mut length) = (false, false);
        for (name, value) in map {
            if connection_specific(name) {
                continue;
            }
            date |= name == header::DATE;
            length |= name == header::CONTENT_LENGTH;
            self.encoder
                .field(name.as_str(), value.as_bytes(), value.is_sensitive(), block);
        }
        (date, length)
    }

    /// Sends what the response body has, as far as the windows allow.
    pub(super) fn send_body(&mut self, idx: u32) {
        loop {
            let unwritten = self.unwritten();
            let slot = &mut self.slots[idx as usize];
            if slot.id == 0 {
                return;
            }
            let stream = slot.id;
            if !slot.pending.is_empty() {
                let n = (slot.pending.len() as i64)
                    .min(self.peer_max_frame as i64)
                    .min(slot.send_window)
                    .min(self.send_window);
                if n <= 0 {
                    if slot.send_window <= 0 {
                        slot.stream_blocked = true;
                    } else {
                        self.conn_blocked.push((idx, stream));
                    }
                    self.blocked(idx);
                    return;
                }
                if unwritten >= WRITE_HIGH {
                    self.write_blocked.push((idx, stream));
                    return;
                }
                let chunk = slot.pending.split_to(n as usize);
                slot.blocked_since = None;
                slot.send_window -= n;
                self.send_window -= n;
                let end = slot.pending.is_empty() && slot.body_over && slot.trailers.is_none();
                frame::write_data(&mut self.wbuf, stream, &chunk, end);
                if end {
                    self.send_done(idx);
                    return;
                }
                continue;
            }
            if slot.body_over {
                match slot.trailers.take() {
                    Some(t) => {
                        let mut block = Vec::with_capacity(64);
                        self.begin_block(&mut block);
                        self.encode_fields(&t, &mut block);
                        self.write_block(stream, &block, true);
                    }
                    None => frame::write_data(&mut self.wbuf, stream, &[], true),
                }
                self.send_done(idx);
                return;
            }
            let Phase::Body(body) = &mut slot.phase else {
                return;
            };
            if unwritten >= WRITE_HIGH {
                self.write_blocked.push((idx, stream));
                return;
            }
            // The body stays in its slot until what it gave has been written (or the
            // stream is cut off: `free_slot`), so that its `Finish` counts only the bytes
            // that went out.
            let mut cx = Context::from_waker(&slot.waker);
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(None) => slot.body_over = true,
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(data) => {
                        slot.pending = data;
                        slot.body_over = body.is_end_stream();
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            slot.trailers = Some(t);
                            slot.body_over = true;
                            // All its data is out (it was polled with none pending):
                            // the response is recorded as complete.
                            body.done();
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(stream, error = %e, "response body failed");
                    // The upstream failed or went quiet mid-response: the response is
                    // broken on our side (INTERNAL_ERROR, as nginx and hyper's server
                    // send); CANCEL is for a stream the client stopped taking.
                    self.free_slot(idx, Some(Reason::Internal));
                    return;
                }
            }
        }
    }

    /// The response is complete: the stream ends unless the client is still sending
    /// its body, which it is then asked to stop (RST_STREAM NO_ERROR, RFC 9113 §8.1).
    pub(super) fn send_done(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        // A body here has ended (`None`, or `is_end_stream` after its last frame, or
        // its trailers): dropping it records the response as complete.
        slot.phase = Phase::Done;
        slot.body_over = false;
        let open = matches!(slot.recv, Recv::Open { ended: false, .. });
        self.completed = self.completed.saturating_add(1);
        self.free_slot(idx, open.then_some(Reason::NoError));
    }

    /// Puts the slots that waited for write space back in line once there is some.
    pub(super) fn unblock_writes(&mut self) -> bool {
        if self.write_blocked.is_empty() || self.unwritten() >= WRITE_HIGH {
            return false;
        }
        for (idx, id) in std::mem::take(&mut self.write_blocked) {
            if self.slots[idx as usize].id == id {
                self.local_ready.push(idx);
            }
        }
        true
    }

    pub(super) fn flush<I: AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.woff < self.wbuf.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.wbuf[self.woff..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.woff += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.woff == self.wbuf.len() {
            self.wbuf.clear();
            self.woff = 0;
            if self.wbuf.capacity() > 4 * WRITE_HIGH {
                self.wbuf = Vec::with_capacity(4096);
            }
        } else if self.woff >= WRITE_HIGH {
            self.wbuf.drain(..self.woff);
            self.woff = 0;
        }
        if self.unflushed {
            // A no-op on TCP; TLS holds what was written until flushed.
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}
