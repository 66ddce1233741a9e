//! The fast path's upstream exchange for requests hyper serves (HTTP/2 clients, TLS
//! clients, connections handed over): a request without a body, to a plain HTTP/1.1
//! upstream, goes over the fast path's pool of raw sockets, and the response comes
//! back as an `http::Response` for hyper to write. A body that arrived with the head
//! (the usual small response) is handed over whole and the socket goes back to the
//! pool at once; a longer one streams from the socket as hyper polls it. No hyper
//! client connection task, no channel between tasks.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::uri::Authority;
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::exchange::{self, Failure, Step, HEAD_READ, STREAM_READ};
use super::wire::{self, Chunked, Framing, Parted};
use crate::body::ProxyBody;
use crate::error::{ProxyError, UpstreamFailure};
use crate::upstream::UpstreamClient;

/// Whether a request can go this way: no body (nothing to stream upstream while the
/// response comes back), not `CONNECT`, not an upgrade (the caller checks).
pub fn fits(parts: &http::request::Parts, body_ended: bool) -> bool {
    body_ended
        && parts.method != http::Method::CONNECT
        && parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Sends `parts` (already rewritten for the upstream: origin form, HTTP/1.1) to
/// `target` and waits at most `timeout` for the response head.
pub async fn fetch(
    client: &Arc<UpstreamClient>,
    parts: &http::request::Parts,
    target: &Authority,
    upstream: &Arc<str>,
    timeout: Duration,
) -> Result<http::Response<ProxyBody>, ProxyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wbuf = super::spare::Scratch::new(1024);
    wire::write_request_head(&mut wbuf, parts);
    let is_head = parts.method == http::Method::HEAD;
    let retry = exchange::idempotent(&parts.method, 0);
    let fail = |f: Failure| f.into_error(upstream, timeout);
    let mut fresh = false;
    loop {
        let (mut up, reused) = exchange::open(&client.h1, target, fresh, deadline)
            .await
            .map_err(fail)?;
        match tokio::time::timeout_at(deadline, up.write_all(&wbuf)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if reused => {
                // Closed under us before it read anything: once more, on a new one.
                fresh = true;
                continue;
            }
            Ok(Err(_)) => return Err(fail(Failure::Upstream(UpstreamFailure::Reset))),
            Err(_) => return Err(fail(Failure::Timeout)),
        }
        let mut rbuf = BytesMut::with_capacity(HEAD_READ);
        let head = exchange::read_head(&mut up, &mut rbuf, deadline, |rbuf| {
            match wire::parse_response_parts(rbuf, is_head) {
                Ok(Parted::Head(parts, head)) => Step::Head((parts, head)),
                Ok(Parted::Interim(n)) => Step::Interim(n),
                Ok(Parted::Partial) => Step::Partial,
                Err(_) => Step::Malformed,
            }
        });
        match head.await {
            Ok((parts, head)) => {
                let body = UpstreamBody {
                    up: Some(up),
                    rbuf,
                    pending: Bytes::new(),
                    framing: head.framing,
                    chunked: Chunked::payload_only(),
                    reusable: head.reusable,
                    client: client.clone(),
                    target: target.clone(),
                };
                return Ok(http::Response::from_parts(
                    parts,
                    body.into_proxy_body().map_err(fail)?,
                ));
            }
            Err(Failure::Early(_)) if reused && retry => fresh = true,
            Err(f) => return Err(fail(f)),
        }
    }
}

/// A response body read from an upstream socket, decoded from its HTTP/1.1 framing.
/// The socket goes back to the pool when the body has been read to its end (and the
/// upstream keeps connections open); a body dropped before that closes it.
pub struct UpstreamBody {
    /// `None` once the body is over.
    up: Option<TcpStream>,
    /// Read but not yet passed on.
    rbuf: BytesMut,
    /// Decoded but not yet passed on (what came with the head of a chunked body).
    pending: Bytes,
    /// `Length` counts the bytes not yet passed on.
    framing: Framing,
    chunked: Chunked,
    reusable: bool,
    client: Arc<UpstreamClient>,
    target: Authority,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("target", &self.target)
            .field("framing", &self.framing)
            .finish()
    }
}

impl UpstreamBody {
    /// A body that is already here whole becomes a plain one (the socket goes back to
    /// the pool now); the rest stream. A chunked body already broken in what has been
    /// read fails here, while the client can still get a 502.
    fn into_proxy_body(mut self) -> Result<ProxyBody, Failure> {
        let whole = match self.framing {
            Framing::Empty => Some(Bytes::new()),
            Framing::Length(n) if self.rbuf.len() as u64 >= n => {
                // `n` fits: it is at most the buffer's length.
                Some(self.rbuf.split_to(n as usize).freeze())
            }
            Framing::Chunked => {
                let mut out = Vec::new();
                let (used, _) = self
                    .chunked
                    .decode(&self.rbuf, &mut out)
                    .map_err(|_| Failure::Upstream(UpstreamFailure::Protocol))?;
                self.rbuf.advance(used);
                if self.chunked.is_done() {
                    Some(Bytes::from(out))
                } else {
                    // Not all here yet: what is decoded goes out first, the rest streams.
                    self.pending = Bytes::from(out);
                    None
                }
            }
            _ => None,
        };
        Ok(match whole {
            Some(b) => {
                self.end();
                if b.is_empty() {
                    ProxyBody::empty()
                } else {
                    ProxyBody::full(b)
                }
            }
            None => ProxyBody::raw(Box::new(self)),
        })
    }

    /// The body is over: the socket goes back to the pool if it can carry another
    /// exchange (nothing unread after the body).
    fn end(&mut self) {
        self.framing = Framing::Empty;
        if let Some(up) = self.up.take() {
            if self.reusable && self.rbuf.is_empty() {
                self.client
                    .h1
                    .checkin(&self.target, up, std::time::Instant::now());
            }
        }
    }

    /// The next piece of the body from what has been read, if any.
    fn next_frame(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match self.framing {
            Framing::Empty => Ok(None),
            Framing::Length(rest) => {
                let n = usize::try_from(rest)
                    .unwrap_or(usize::MAX)
                    .min(self.rbuf.len());
                let b = self.rbuf.split_to(n).freeze();
                self.framing = Framing::Length(rest - n as u64);
                if rest == n as u64 {
                    self.end();
                }
                Ok(Some(b))
            }
            Framing::Chunked => {
                let mut out = Vec::new();
                let (used, _) = self
                    .chunked
                    .decode(&self.rbuf, &mut out)
                    .map_err(|_| std::io::Error::other("bad chunk from the upstream"))?;
                self.rbuf.advance(used);
                if self.chunked.is_done() {
                    self.end();
                }
                Ok(Some(Bytes::from(out)))
            }
            Framing::Close => Ok(Some(self.rbuf.split().freeze())),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            match this.next_frame() {
                Ok(Some(b)) if !b.is_empty() => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Ok(_) => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(up) = &this.up else {
                return Poll::Ready(None);
            };
            this.rbuf.reserve(STREAM_READ);
            match up.try_read_buf(&mut this.rbuf) {
                Ok(0) if this.framing == Framing::Close => {
                    this.up = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(up.poll_read_ready(cx)) {
                        this.up = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && (self.up.is_none() || self.framing == Framing::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(rest) => SizeHint::with_exact(rest),
            Framing::Empty => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
