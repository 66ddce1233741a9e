//! The request heads of a connection hyper's HTTP/1.1 server reads (every TLS
//! connection, and the plain ones the fast path hands over), checked before hyper
//! sees them. hyper answers a head it refuses — too long, a relative target, a
//! `Transfer-Encoding` that is not chunked last, a bad `Content-Length` — with an
//! empty 400 or 431 that no access-log line or metric records, and offers no hook to
//! do otherwise. So this reader holds each head back until it is whole, checks it
//! as the fast path does ([`wire::check_head`]), and follows the body's framing to
//! the next head. A head it refuses never reaches hyper: in its place hyper reads a
//! stand-in request (`GET /`, `connection: close`), which the connection's service
//! recognises by its number ([`Verdict::refusal`]) and answers with the gateway's own
//! JSON error; nothing after it is read.
//!
//! The cost is one more parse of each head (httparse, no allocation) and a copy of
//! the head's bytes; a body goes straight into hyper's buffer when its length is
//! known.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::wire::{self, Chunked, HeadFraming as Framing};
use crate::error::ProxyError;

/// The read buffer's capacity kept between requests.
const KEEP: usize = 8 * 1024;

/// What stands in for a refused head.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

/// What the reader and the connection's service share.
#[derive(Default)]
pub struct Verdict {
    /// Heads passed to hyper so far, the stand-in included.
    heads: AtomicU64,
    /// Requests the service has been called for.
    requests: AtomicU64,
    /// The refused head's error and the number of its stand-in (`u64::MAX`: none).
    refused: Mutex<Option<(u64, ProxyError)>>,
    /// The last head passed has a body whose end has not been read yet.
    body_arriving: AtomicBool,
}

impl Verdict {
    /// Whether the body of the request being answered is still to come from the
    /// client: hyper's server closes the connection after an answer that leaves it
    /// unread (it cannot tell the rest from the next request), so the answer must
    /// say `connection: close` (RFC 9110 §10.1.1), as the fast path's does. A body
    /// that has all arrived is skipped by hyper, and the connection stays.
    pub fn body_arriving(&self) -> bool {
        self.body_arriving.load(Ordering::Relaxed)
    }

    /// Called by the service once per request hyper hands it, in order: the error to
    /// answer when this request is the stand-in for a refused head.
    pub fn refusal(&self) -> Option<ProxyError> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        // Only the last head passed can be a stand-in: a cheap check first.
        if n + 1 != self.heads.load(Ordering::Relaxed) {
            return None;
        }
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        match refused.take() {
            Some((at, e)) if at == n => Some(e),
            other => {
                *refused = other;
                None
            }
        }
    }
}

enum State {
    /// The next bytes are a request head.
    Head,
    /// Body bytes left before the next head.
    Length(u64),
    Chunked(Chunked),
    /// Everything passes unchecked (a tunnel, an upgrade).
    Through,
    /// A chunked body this reader could not follow: hyper gets the end of the stream
    /// there, so it fails the body (400 `bad_request_body`) rather than read on by
    /// rules of its own — where it would see a head this reader did not check, or
    /// swallow one a client or a proxy in front meant as a request.
    Cut,
    /// A head was refused; the stand-in is in `buf`, nothing is read after it.
    Refused,
}

/// A client connection whose request heads are checked before hyper reads them.
pub struct Checked<I> {
    inner: I,
    /// Bytes read and not yet given to hyper; the first `ready` of them may be.
    buf: BytesMut,
    ready: usize,
    state: State,
    /// A head longer than this is refused (431): hyper's own limit, so that hyper
    /// never refuses one itself.
    limit: usize,
    verdict: Arc<Verdict>,
}

impl<I> Checked<I> {
    pub fn new(inner: I, limit: usize, verdict: Arc<Verdict>) -> Checked<I> {
        Checked {
            inner,
            buf: BytesMut::new(),
            ready: 0,
            state: State::Head,
            limit,
            verdict,
        }
    }

    /// Decides what the buffered bytes after `ready` are. False when more must be
    /// read first.
    fn classify(&mut self) -> bool {
        let pending = &self.buf[self.ready..];
        match &mut self.state {
            State::Head => match wire::check_head(pending) {
                Ok(Some((len, _))) if len >= self.limit => {
                    self.refuse(ProxyError::HeadTooLong { limit: self.limit });
                    true
                }
                Ok(Some((len, framing))) => {
                    self.ready += len;
                    self.verdict.heads.fetch_add(1, Ordering::Relaxed);
                    self.state = match framing {
                        Framing::Length(0) => State::Head,
                        Framing::Length(n) => State::Length(n),
                        Framing::Chunked => State::Chunked(Chunked::request()),
                        Framing::Opaque => State::Through,
                    };
                    self.note_body();
                    true
                }
                Ok(None) if pending.len() < self.limit => false,
                Ok(None) => {
                    self.refuse(ProxyError::HeadTooLong { limit: self.limit });
                    true
                }
                Err(e) => {
                    self.refuse(e);
                    true
                }
            },
            State::Length(left) => {
                let n = (*left).min(pending.len() as u64);
                *left -= n;
                self.ready += n as usize;
                if *left == 0 {
                    self.body_read();
                }
                true
            }
            State::Chunked(c) => match c.frame(pending) {
                Ok(n) => {
                    self.ready += n;
                    if c.is_done() {
                        self.body_read();
                    }
                    true
                }
                Err(_) => {
                    self.state = State::Cut;
                    true
                }
            },
            State::Through => {
                self.ready = self.buf.len();
                true
            }
            State::Refused | State::Cut => false,
        }
    }

    /// Records whether the body of the head just passed has its end among the bytes
    /// read (a copy of the chunked decoder looks ahead; only chunked requests pay).
    fn note_body(&self) {
        let rest = &self.buf[self.ready..];
        let arriving = match &self.state {
            State::Length(n) => *n > rest.len() as u64,
            State::Chunked(c) => {
                let mut c = c.clone();
                !(c.frame(rest).is_ok() && c.is_done())
            }
            _ => false,
        };
        self.verdict
            .body_arriving
            .store(arriving, Ordering::Relaxed);
    }

    /// The body before the next head has been read to its end.
    fn body_read(&mut self) {
        self.state = State::Head;
        self.verdict.body_arriving.store(false, Ordering::Relaxed);
    }

    /// Puts the stand-in where the refused head was, and stops reading.
    fn refuse(&mut self, e: ProxyError) {
        let n = self.verdict.heads.fetch_add(1, Ordering::Relaxed);
        *self
            .verdict
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((n, e));
        self.buf.truncate(self.ready);
        self.buf.extend_from_slice(STAND_IN);
        self.ready = self.buf.len();
        self.state = State::Refused;
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Checked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                if this.buf.is_empty() && this.buf.capacity() > KEEP {
                    // A long head grew the buffer: not kept for the connection's life.
                    this.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if !this.buf.is_empty() && this.classify() {
                continue;
            }
            match this.state {
                // hyper answers the stand-in and closes; nothing more is for it.
                State::Refused => return Poll::Pending,
                State::Cut => return Poll::Ready(Ok(())),
                _ => {}
            }
            // A body whose end is known, or bytes passed unchecked, go straight
            // into hyper's buffer.
            if this.buf.is_empty() {
                match this.state {
                    State::Through => return Pin::new(&mut this.inner).poll_read(cx, out),
                    State::Length(left) => {
                        let before = out.filled().len();
                        if left >= out.remaining() as u64 {
                            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                        } else {
                            // Not past the body: the next head is to be checked.
                            let room = out.initialize_unfilled_to(left as usize);
                            let mut part = ReadBuf::new(room);
                            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                            let n = part.filled().len();
                            out.advance(n);
                        }
                        let n = (out.filled().len() - before) as u64;
                        match left - n {
                            _ if n == 0 => {}
                            0 => this.body_read(),
                            rest => this.state = State::Length(rest),
                        }
                        return Poll::Ready(Ok(()));
                    }
                    _ => {}
                }
            }
            if this.buf.capacity() - this.buf.len() < 1024 {
                this.buf.reserve(4096);
            }
            let read = {
                let mut read = std::pin::pin!(this.inner.read_buf(&mut this.buf));
                std::task::ready!(read.as_mut().poll(cx))?
            };
            if read == 0 {
                // The client is done; a head cut short is not hyper's to see.
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Checked<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
