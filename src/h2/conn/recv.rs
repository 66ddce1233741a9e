//! The receiving side of a connection: frames read from the socket and what each
//! does to the connection and its streams (RFC 9113 §5, §6).

use bytes::{Buf, BytesMut};
use http::{header, Request, Version};

use super::*;

impl<S: FnMut(Request<ClientBody>) -> Handler> Conn<S> {
    /// Reads what the socket has and handles every complete frame; `Ok(true)` if
    /// anything was read.
    pub(super) fn read<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Result<bool, Reason> {
        let mut any = false;
        loop {
            while self.next_frame()? {
                any = true;
                if self.failed.is_some() || self.unwritten() >= WRITE_HIGH {
                    return Ok(true);
                }
            }
            self.rbuf.reserve(READ_RESERVE);
            let before = self.rbuf.len();
            let polled = {
                let fut = tokio::io::AsyncReadExt::read_buf(io, &mut self.rbuf);
                tokio::pin!(fut);
                fut.poll(cx)
            };
            match polled {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    return Ok(true);
                }
                Poll::Ready(Ok(_)) => {
                    debug_assert!(self.rbuf.len() > before);
                    self.read_since_tick = true;
                    any = true;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/2 connection read failed");
                    self.eof = true;
                    return Ok(true);
                }
                Poll::Pending => return Ok(any),
            }
        }
    }

    /// Handles the next frame if the buffer holds all of it.
    pub(super) fn next_frame(&mut self) -> Result<bool, Reason> {
        if !self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                if !frame::PREFACE.starts_with(&self.rbuf) {
                    return Err(Reason::Protocol);
                }
                return Ok(false);
            }
            if self.rbuf[..frame::PREFACE.len()] != frame::PREFACE[..] {
                return Err(Reason::Protocol);
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = true;
        }
        if self.rbuf.len() < frame::HEAD_LEN {
            return Ok(false);
        }
        let head = Head::parse(&self.rbuf[..frame::HEAD_LEN]);
        if head.len > frame::DEFAULT_MAX_FRAME {
            return Err(Reason::FrameSize);
        }
        if self.rbuf.len() < frame::HEAD_LEN + head.len {
            return Ok(false);
        }
        self.rbuf.advance(frame::HEAD_LEN);
        let payload = self.rbuf.split_to(head.len);
        self.frame(head, payload)?;
        Ok(true)
    }

    pub(super) fn frame(&mut self, h: Head, p: BytesMut) -> Result<(), Reason> {
        if let Some(block) = &self.block {
            if h.kind != frame::CONTINUATION || h.stream != block.stream {
                return Err(Reason::Protocol);
            }
        }
        if !self.settings_seen && (h.kind != frame::SETTINGS || h.flags & frame::ACK != 0) {
            // The client's preface ends with a SETTINGS frame.
            return Err(Reason::Protocol);
        }
        match h.kind {
            frame::DATA => self.on_data(h, p),
            frame::HEADERS => self.on_headers(h, &p),
            frame::PRIORITY => {
                if h.stream == 0 {
                    return Err(Reason::Protocol);
                }
                if h.len != 5 {
                    self.stream_error(h.stream, Reason::FrameSize);
                } else if u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff == h.stream {
                    self.stream_error(h.stream, Reason::Protocol);
                }
                Ok(())
            }
            frame::RST_STREAM => {
                if h.stream == 0 {
                    return Err(Reason::Protocol);
                }
                if h.len != 4 {
                    return Err(Reason::FrameSize);
                }
                if h.stream > self.last_id {
                    return Err(Reason::Protocol);
                }
                self.on_reset(h.stream)
            }
            frame::SETTINGS => self.on_settings(h, &p),
            frame::PUSH_PROMISE => Err(Reason::Protocol),
            frame::PING => {
                if h.stream != 0 {
                    return Err(Reason::Protocol);
                }
                if h.len != 8 {
                    return Err(Reason::FrameSize);
                }
                if h.flags & frame::ACK != 0 {
                    self.ping_outstanding = false;
                } else {
                    let mut opaque = [0u8; 8];
                    opaque.copy_from_slice(&p);
                    frame::write_ping(&mut self.wbuf, true, &opaque);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if h.stream != 0 {
                    return Err(Reason::Protocol);
                }
                if h.len < 8 {
                    return Err(Reason::FrameSize);
                }
                self.goaway_received = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.on_window_update(h, &p),
            frame::CONTINUATION => {
                let Some(mut block) = self.block.take() else {
                    return Err(Reason::Protocol);
                };
                if p.is_empty() && h.flags & frame::END_HEADERS == 0 {
                    self.empty_frame()?;
                }
                if block.buf.len() + p.len() > self.max_header_list + BLOCK_SLACK {
                    return Err(Reason::EnhanceYourCalm);
                }
                block.buf.extend_from_slice(&p);
                if h.flags & frame::END_HEADERS != 0 {
                    let r = self.on_block(
                        block.stream,
                        block.end_stream,
                        block.bad_priority,
                        &block.buf,
                    );
                    block.buf.clear();
                    r
                } else {
                    self.block = Some(block);
                    Ok(())
                }
            }
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    pub(super) fn empty_frame(&mut self) -> Result<(), Reason> {
        self.empty_frames += 1;
        if self.empty_frames > MAX_EMPTY_FRAMES {
            return Err(Reason::EnhanceYourCalm);
        }
        Ok(())
    }

    pub(super) fn on_settings(&mut self, h: Head, p: &[u8]) -> Result<(), Reason> {
        if h.stream != 0 {
            return Err(Reason::Protocol);
        }
        if h.flags & frame::ACK != 0 {
            return if h.len == 0 {
                Ok(())
            } else {
                Err(Reason::FrameSize)
            };
        }
        if h.len % 6 != 0 {
            return Err(Reason::FrameSize);
        }
        for s in p.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => self.encoder.set_max(v as usize),
                frame::SETTINGS_ENABLE_PUSH if v > 1 => return Err(Reason::Protocol),
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let v = i64::from(v);
                    if v > frame::MAX_WINDOW {
                        return Err(Reason::FlowControl);
                    }
                    let delta = v - self.peer_initial_window;
                    self.peer_initial_window = v;
                    for (idx, slot) in self.slots.iter_mut().enumerate() {
                        if slot.id == 0 {
                            continue;
                        }
                        slot.send_window += delta;
                        if slot.send_window > frame::MAX_WINDOW {
                            return Err(Reason::FlowControl);
                        }
                        if delta > 0 && std::mem::take(&mut slot.stream_blocked) {
                            self.local_ready.push(idx as u32);
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME as u32..=0xff_ffff).contains(&v) {
                        return Err(Reason::Protocol);
                    }
                    self.peer_max_frame = v as usize;
                }
                _ => {}
            }
        }
        self.settings_seen = true;
        frame::write_settings_ack(&mut self.wbuf);
        Ok(())
    }

    pub(super) fn on_window_update(&mut self, h: Head, p: &[u8]) -> Result<(), Reason> {
        if h.len != 4 {
            return Err(Reason::FrameSize);
        }
        let inc = i64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff);
        if h.stream == 0 {
            if inc == 0 {
                return Err(Reason::Protocol);
            }
            self.send_window += inc;
            if self.send_window > frame::MAX_WINDOW {
                return Err(Reason::FlowControl);
            }
            for (idx, id) in self.conn_blocked.drain(..) {
                if self.slots[idx as usize].id == id {
                    self.local_ready.push(idx);
                }
            }
            return Ok(());
        }
        if h.stream > self.last_id {
            return Err(Reason::Protocol);
        }
        let Some(&idx) = self.ids.get(&h.stream) else {
            return Ok(());
        };
        if inc == 0 {
            self.stream_error(h.stream, Reason::Protocol);
            return Ok(());
        }
        let slot = &mut self.slots[idx as usize];
        slot.send_window += inc;
        if slot.send_window > frame::MAX_WINDOW {
            self.stream_error(h.stream, Reason::FlowControl);
            return Ok(());
        }
        if std::mem::take(&mut slot.stream_blocked) {
            self.local_ready.push(idx);
        }
        Ok(())
    }

    pub(super) fn on_reset(&mut self, stream: u32) -> Result<(), Reason> {
        let Some(&idx) = self.ids.get(&stream) else {
            return Ok(());
        };
        let slot = &self.slots[idx as usize];
        // A response whose body has all been taken (its last bytes waiting for window)
        // counts as answered.
        if !matches!(slot.phase, Phase::Done) && !slot.body_over {
            self.early_resets += 1;
            if self.early_resets > MAX_EARLY_RESETS.saturating_add(self.completed) {
                return Err(Reason::EnhanceYourCalm);
            }
        }
        self.free_slot(idx, None);
        Ok(())
    }

    pub(super) fn on_headers(&mut self, h: Head, p: &[u8]) -> Result<(), Reason> {
        if h.stream == 0 || h.stream % 2 == 0 {
            return Err(Reason::Protocol);
        }
        let mut data = frame::unpad(h.flags, p).ok_or(Reason::Protocol)?;
        let mut bad_priority = false;
        if h.flags & frame::PRIORITY_FLAG != 0 {
            if data.len() < 5 {
                return Err(Reason::FrameSize);
            }
            let dep = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) & 0x7fff_ffff;
            bad_priority = dep == h.stream;
            data = &data[5..];
        }
        let end_stream = h.flags & frame::END_STREAM != 0;
        if h.flags & frame::END_HEADERS != 0 {
            return self.on_block(h.stream, end_stream, bad_priority, data);
        }
        if data.is_empty() {
            self.empty_frame()?;
        }
        self.block = Some(Block {
            stream: h.stream,
            end_stream,
            bad_priority,
            buf: data.to_vec(),
        });
        Ok(())
    }

    /// A complete header block: a new request, or a request's trailers.
    pub(super) fn on_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        bad_priority: bool,
        block: &[u8],
    ) -> Result<(), Reason> {
        let mut d = Decoded {
            limit: self.max_header_list,
            ..Decoded::default()
        };
        // Decoded in full whatever becomes of the stream: the HPACK table is the
        // connection's.
        self.decoder
            .decode(block, |n, v| d.field(n, v))
            .map_err(|_| Reason::Compression)?;
        if let Some(&idx) = self.ids.get(&stream) {
            return self.on_trailers(idx, end_stream, d);
        }
        if stream <= self.last_id {
            if self.recent_resets.contains(&stream) {
                return Ok(());
            }
            // A stream that never opened cannot be closed: its id is out of order
            // (RFC 9113 §5.1.1).
            if self.skipped.contains(stream) {
                return Err(Reason::Protocol);
            }
            return Err(Reason::StreamClosed);
        }
        self.skipped.opened(self.last_id, stream);
        self.last_id = stream;
        if self.goaway_sent {
            return Ok(());
        }
        if bad_priority {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        }
        if self.ids.len() >= self.max_concurrent {
            self.stream_error(stream, Reason::RefusedStream);
            return Ok(());
        }
        // A header list over the advertised limit is answered by the service, as a
        // head too long is on HTTP/1.1: the JSON 431, counted and logged. Its fields
        // past the limit were not kept, so it is judged on nothing else.
        let too_large = (d.size > self.max_header_list).then_some(crate::h2::TooLarge {
            size: d.size,
            limit: self.max_header_list,
        });
        if too_large.is_some() {
            d.headers.clear();
            d.malformed = false;
        }
        let uri = match (&too_large, d.malformed) {
            (Some(_), _) => Some(http::Uri::from_static("/")),
            (None, true) => None,
            (None, false) => d.uri(),
        };
        // The same rule as the upstream exchange's (digits only).
        let content_length = match d.headers.get(header::CONTENT_LENGTH) {
            None => Ok(None),
            Some(v) => crate::h1::wire::parse_length(v.as_bytes())
                .map(Some)
                .ok_or(()),
        };
        let (Some(uri), Ok(content_length)) = (uri, content_length) else {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        };
        if end_stream && content_length.is_some_and(|n| n != 0) {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        }
        let (body, recv) = if end_stream {
            (ClientBody::Empty, Recv::Closed)
        } else {
            let shared = body::Shared::default();
            (
                ClientBody::H2(RecvBody::new(shared.clone(), content_length)),
                Recv::Open {
                    shared,
                    ended: false,
                    window: STREAM_WINDOW,
                    released: 0,
                    content_length,
                    received: 0,
                },
            )
        };
        let mut req = Request::new(body);
        *req.method_mut() = d.method.take().unwrap_or_default();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = d.headers;
        if let Some(t) = too_large {
            req.extensions_mut().insert(t);
        }
        let handler = (self.service)(req);
        let idx = self.alloc_slot(stream);
        let slot = &mut self.slots[idx as usize];
        if let Recv::Open { shared, .. } = &recv {
            body::lock(shared).conn = Some(slot.waker.clone());
        }
        slot.phase = Phase::Handler(handler);
        slot.recv = recv;
        slot.send_window = self.peer_initial_window;
        self.local_ready.push(idx);
        Ok(())
    }

    pub(super) fn on_trailers(
        &mut self,
        idx: u32,
        end_stream: bool,
        d: Decoded,
    ) -> Result<(), Reason> {
        let slot = &mut self.slots[idx as usize];
        let stream = slot.id;
        let Recv::Open {
            shared,
            ended: false,
            content_length,
            received,
            ..
        } = &slot.recv
        else {
            self.stream_error(stream, Reason::StreamClosed);
            return Ok(());
        };
        if !end_stream || d.pseudo || d.malformed || content_length.is_some_and(|n| n != *received)
        {
            self.stream_error(stream, Reason::Protocol);
            return Ok(());
        }
        {
            let mut s = body::lock(shared);
            if !d.headers.is_empty() {
                s.trailers = Some(d.headers);
            }
            s.end = true;
            if let Some(w) = s.consumer.take() {
                w.wake();
            }
        }
        self.recv_closed(idx);
        Ok(())
    }

    pub(super) fn on_data(&mut self, h: Head, p: BytesMut) -> Result<(), Reason> {
        if h.stream == 0 {
            return Err(Reason::Protocol);
        }
        let flow = h.len as i64;
        self.recv_window -= flow;
        if self.recv_window < 0 {
            return Err(Reason::FlowControl);
        }
        let data_len = frame::unpad(h.flags, &p).ok_or(Reason::Protocol)?.len();
        let start = if h.flags & frame::PADDED != 0 { 1 } else { 0 };
        let end_stream = h.flags & frame::END_STREAM != 0;
        if data_len == 0 && !end_stream {
            self.empty_frame()?;
        }
        let Some(&idx) = self.ids.get(&h.stream) else {
            self.release(h.len as u32);
            if h.stream > self.last_id {
                return Err(Reason::Protocol);
            }
            if !self.recent_resets.contains(&h.stream) {
                self.stream_error(h.stream, Reason::StreamClosed);
            }
            return Ok(());
        };
        // The padding is given back at once.
        let padding = (h.len - data_len) as u32;
        self.release(padding);
        let slot = &mut self.slots[idx as usize];
        let Recv::Open {
            shared,
            ended: false,
            window,
            released,
            content_length,
            received,
        } = &mut slot.recv
        else {
            self.release(data_len as u32);
            self.stream_error(h.stream, Reason::StreamClosed);
            return Ok(());
        };
        *window -= flow;
        *released += padding;
        *received += data_len as u64;
        if *window < 0 {
            self.release(data_len as u32);
            self.stream_error(h.stream, Reason::FlowControl);
            return Ok(());
        }
        if content_length.is_some_and(|n| *received > n || (end_stream && *received != n)) {
            self.release(data_len as u32);
            self.stream_error(h.stream, Reason::Protocol);
            return Ok(());
        }
        let dropped = {
            let mut s = body::lock(shared);
            s.received(data_len as u64);
            if s.dropped {
                true
            } else {
                if data_len > 0 {
                    s.chunks
                        .push_back(p.freeze().slice(start..start + data_len));
                }
                s.end = end_stream;
                if let Some(w) = s.consumer.take() {
                    w.wake();
                }
                false
            }
        };
        if dropped {
            // Nobody reads this body any more: its bytes are given back at once.
            *released += data_len as u32;
            self.release(data_len as u32);
        }
        if end_stream {
            self.recv_closed(idx);
        } else if dropped {
            self.local_ready.push(idx);
        }
        Ok(())
    }

    /// Gives received bytes back to the connection's window.
    pub(super) fn release(&mut self, n: u32) {
        self.recv_released += n;
        if self.recv_released >= WINDOW_STEP {
            frame::write_window_update(&mut self.wbuf, 0, self.recv_released);
            self.recv_window += i64::from(self.recv_released);
            self.recv_released = 0;
        }
    }

    /// END_STREAM received on a stream (whose response is still to finish: a finished
    /// one frees the slot). What the consumer has yet to take stays counted until it
    /// does, or until the slot is freed.
    pub(super) fn recv_closed(&mut self, idx: u32) {
        if let Recv::Open { ended, .. } = &mut self.slots[idx as usize].recv {
            *ended = true;
        }
    }
}
