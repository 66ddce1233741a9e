//! The fast path's upstream exchange for requests hyper serves (HTTP/2 clients, TLS
//! clients, connections handed over): a request to a plain HTTP/1.1 upstream goes
//! over the fast path's pool of raw sockets (its body, if any, streamed from hyper's
//! side as it arrives), and the response comes back as an `http::Response` for hyper
//! to write. A body that arrived with the head
//! (the usual small response) is handed over whole and the socket goes back to the
//! pool at once; a longer one streams from the socket as hyper polls it. No hyper
//! client connection task, no channel between tasks.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::uri::Authority;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::exchange::{
    self, Failure, HeadClock, Step, UpSocket, UploadError, HEAD_READ, STREAM_READ,
};
use super::wire::{self, Chunked, Framing, Parted};
use crate::body::ProxyBody;
use crate::error::{ProxyError, UpstreamFailure};
use crate::limits::{RequestBody, RequestBodyError};
use crate::upstream::{Failover, UpstreamClient};

/// Request body bytes the client has already sent are written with the head, in one
/// write, up to this much.
const EARLY_BODY: usize = 64 * 1024;

/// The tenant's `request_timeout` and `server.body_idle_timeout`, and what the
/// client takes.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub timeout: Duration,
    pub body_idle: Option<Duration>,
    /// The client reads response trailers (HTTP/2): the upstream's trailer section
    /// is kept and passed on, filtered (`h1::trailer`). Not for HTTP/1.1 clients:
    /// hyper's server writes only trailers a `Trailer` header declared, and a body
    /// that arrived whole then keeps its `Content-Length`.
    pub trailers: bool,
}

/// How the request body goes upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// All of it is in the first write (or there is none).
    Ended,
    /// With the client's `Content-Length`, of this many bytes.
    Length(u64),
    /// Re-chunked: the client named no length (HTTP/2 without `content-length`, a
    /// chunked HTTP/1.1 body).
    Chunked,
    /// Re-chunked, and the last chunk and the client's trailer fields are written:
    /// only the blank line that ends them is left.
    Trailed,
}

/// Sends `parts` (already rewritten for the upstream: origin form, HTTP/1.1) with the
/// gateway's `added` headers and `body` to `target` and waits at most `timeout` for
/// the response head, counted from the end of the body's upload (which is bounded by
/// `body_idle` of no progress while it goes on). What the client has already sent of
/// the body goes out with the head; the rest streams while the response is awaited
/// (an upstream may answer before reading it all, and then gets no more of it).
pub async fn fetch(
    client: &Arc<UpstreamClient>,
    parts: &http::request::Parts,
    added: &crate::headers::Added<'_>,
    mut body: RequestBody,
    target: &Authority,
    mut failover: Failover<'_>,
    options: Options,
) -> Result<http::Response<ProxyBody>, ProxyError> {
    let Options {
        timeout,
        body_idle,
        trailers,
    } = options;
    let upstream = &failover.pool().name;
    let mut target = target;
    let now = std::time::Instant::now();
    let deadline = tokio::time::Instant::from_std(now) + timeout;
    let mut sending = if body.is_end_stream() {
        Sending::Ended
    } else {
        match parts.headers.get(http::header::CONTENT_LENGTH) {
            Some(v) => {
                Sending::Length(wire::parse_length(v.as_bytes()).ok_or(ProxyError::BadRequestBody)?)
            }
            None => Sending::Chunked,
        }
    };
    let mut wbuf = super::spare::Scratch::new(1024);
    wire::write_request_head(&mut wbuf, parts, added, sending == Sending::Chunked);
    // Body bytes written so far (or about to be, with the head).
    let written = AtomicU64::new(0);
    while sending != Sending::Ended && wbuf.len() < EARLY_BODY {
        let frame = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)));
        let Poll::Ready(frame) = frame.await else {
            break;
        };
        let end = frame.is_none();
        put_frame(&mut wbuf, frame, &mut sending, &written).map_err(|e| e.to_error())?;
        if end {
            sending = Sending::Ended;
        }
    }
    let is_head = parts.method == http::Method::HEAD;
    // Only a request held whole in `wbuf` can be sent again.
    let retry = exchange::idempotent(&parts.method, 0) && sending == Sending::Ended;
    let fail = |f: Failure| f.into_error(upstream, timeout);
    let mut fresh = false;
    loop {
        let (mut up, reused) = match exchange::open(&client.h1, target, fresh, deadline, now).await
        {
            Ok(s) => s,
            Err(f) => match exchange::fail_over(&f, target, &mut failover) {
                Some(next) => {
                    target = next;
                    continue;
                }
                None => return Err(fail(f)),
            },
        };
        match up.timer.bound(up.stream.write_all(&wbuf)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if reused => {
                // Closed under us before it read anything: once more, on a new one
                // (nothing of the body has been taken past what `wbuf` holds).
                fresh = true;
                continue;
            }
            Ok(Err(_)) => return Err(fail(Failure::Upstream(UpstreamFailure::Reset))),
            Err(_) => return Err(fail(Failure::Timeout)),
        }
        let mut rbuf = BytesMut::with_capacity(HEAD_READ);
        let parse = |rbuf: &mut BytesMut| match wire::parse_response_parts(rbuf, is_head) {
            Ok(Parted::Head(parts, head)) => Step::Head((parts, head)),
            Ok(Parted::Interim(n)) => Step::Interim(n),
            Ok(Parted::Partial) => Step::Partial,
            Err(_) => Step::Malformed,
        };
        let (head, body_sent) = if sending == Sending::Ended {
            (
                exchange::read_head(&mut up.stream, &mut rbuf, &mut up.timer, None, parse).await,
                true,
            )
        } else {
            let (mut ur, mut uw) = up.stream.split();
            let upload = body.upload();
            let clock = upload.as_deref().map(|upload| HeadClock {
                upload,
                timeout,
                idle: body_idle,
            });
            let send = send_rest(&mut body, &mut uw, sending, &written);
            let head = exchange::read_head(&mut ur, &mut rbuf, &mut up.timer, clock, parse);
            let (head, sent) = exchange::while_uploading(head, send)
                .await
                .map_err(|e| e.to_error())?;
            // A length-delimited body is all there once its last byte is written,
            // whether or not the client's end of stream has been seen yet.
            let whole = sent
                || matches!(sending, Sending::Length(n) if written.load(Ordering::Relaxed) == n);
            (head, whole)
        };
        match head {
            Ok((parts, head)) => {
                let body = UpstreamBody {
                    up: Some(up),
                    rbuf,
                    pending: Bytes::new(),
                    framing: head.framing,
                    chunked: if trailers {
                        Chunked::payload_only().keeping_trailers()
                    } else {
                        Chunked::payload_only()
                    },
                    trailers: None,
                    // An upstream that answered before it had the whole request body
                    // is in no state to read another request.
                    reusable: head.reusable && body_sent,
                    client: client.clone(),
                    target: target.clone(),
                    quiet: None,
                };
                let body = body.into_proxy_body(body_idle, upstream).map_err(fail)?;
                return Ok(http::Response::from_parts(parts, body));
            }
            Err(Failure::Early(_)) if reused && retry => fresh = true,
            Err(f) => return Err(fail(f)),
        }
    }
}

/// Appends one frame of the request body (or its end, `None`) to `out` in the
/// framing chosen; counts the data into `written`. Trailer fields (those
/// `RequestBody` lets pass) go on after the last chunk of a re-chunked body, as
/// HAProxy forwards them; a body sent with its `Content-Length` has nowhere to carry
/// them, and they are dropped.
fn put_frame(
    out: &mut Vec<u8>,
    frame: Option<Result<Frame<Bytes>, RequestBodyError>>,
    sending: &mut Sending,
    written: &AtomicU64,
) -> Result<(), RequestBodyError> {
    let frame = match frame {
        None => {
            match sending {
                Sending::Chunked => out.extend_from_slice(wire::LAST_CHUNK),
                Sending::Trailed => out.extend_from_slice(b"\r\n"),
                Sending::Ended | Sending::Length(_) => {}
            }
            return Ok(());
        }
        Some(frame) => frame?,
    };
    match frame.into_data() {
        Ok(data) => {
            written.fetch_add(data.len() as u64, Ordering::Relaxed);
            match sending {
                Sending::Chunked => wire::write_chunk(out, &data),
                // Nothing may follow trailers (hyper and the HTTP/2 server end the
                // body there): nothing more is sent.
                Sending::Trailed => {}
                Sending::Ended | Sending::Length(_) => out.extend_from_slice(&data),
            }
        }
        Err(frame) => {
            if let (Sending::Chunked, Ok(trailers)) = (*sending, frame.into_trailers()) {
                out.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    out.extend_from_slice(name.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                *sending = Sending::Trailed;
            }
        }
    }
    Ok(())
}

/// The rest of the request body, client to upstream, to its end.
async fn send_rest<W: AsyncWrite + Unpin>(
    body: &mut RequestBody,
    up: &mut W,
    mut sending: Sending,
    written: &AtomicU64,
) -> Result<(), UploadError<RequestBodyError>> {
    let mut out = super::spare::Scratch::new(1024);
    loop {
        let frame = body.frame().await;
        let end = frame.is_none();
        out.clear();
        put_frame(&mut out, frame, &mut sending, written).map_err(UploadError::Client)?;
        if !out.is_empty() && up.write_all(&out).await.is_err() {
            // The upstream stopped reading; its answer, if any, is due from now.
            if let Some(u) = body.upload() {
                u.end();
            }
            return Err(UploadError::Upstream);
        }
        if end {
            return Ok(());
        }
    }
}

/// A response body read from an upstream socket, decoded from its HTTP/1.1 framing.
/// The socket goes back to the pool when the body has been read to its end (and the
/// upstream keeps connections open); a body dropped before that closes it.
pub struct UpstreamBody {
    /// `None` once the body is over.
    up: Option<UpSocket>,
    /// Read but not yet passed on.
    rbuf: BytesMut,
    /// Decoded but not yet passed on (what came with the head of a chunked body).
    pending: Bytes,
    /// `Length` counts the bytes not yet passed on.
    framing: Framing,
    chunked: Chunked,
    /// The upstream's trailer fields, to pass on after the data (boxed: the body is
    /// moved whole a few times per request, and has none most of the time).
    trailers: Option<Box<http::HeaderMap>>,
    reusable: bool,
    client: Arc<UpstreamClient>,
    target: Authority,
    /// `server.body_idle_timeout`, for a body that streams (enforced by `ProxyBody`).
    pub(crate) quiet: Option<crate::body::Quiet>,
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
    fn into_proxy_body(
        mut self,
        idle: Option<Duration>,
        upstream: &Arc<str>,
    ) -> Result<ProxyBody, Failure> {
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
        let Some(b) = whole else {
            // It streams: bounded by `body_idle_timeout`.
            self.quiet = Some(crate::body::Quiet::new(idle, upstream));
            return Ok(ProxyBody::raw(Box::new(self)));
        };
        self.end();
        Ok(if self.trailers.is_some() {
            // Whole, but with trailer fields: they follow the data as a frame of their own.
            self.pending = b;
            ProxyBody::raw(Box::new(self))
        } else if b.is_empty() {
            ProxyBody::empty()
        } else {
            ProxyBody::full(b)
        })
    }

    /// The body is over: the socket goes back to the pool if it can carry another
    /// exchange (nothing unread after the body).
    fn end(&mut self) {
        self.framing = Framing::Empty;
        if let Some(section) = self.chunked.take_trailers() {
            self.trailers = super::trailer::fields(&section).map(Box::new);
        }
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
                let (used, _) = self.chunked.decode(&self.rbuf, &mut out).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "bad chunk from the upstream",
                    )
                })?;
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
                // Over: the trailer fields, if any, end it.
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))));
            };
            this.rbuf.reserve(STREAM_READ);
            match up.stream.try_read_buf(&mut this.rbuf) {
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
                    if let Err(e) = ready!(up.stream.poll_read_ready(cx)) {
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
        self.pending.is_empty()
            && self.trailers.is_none()
            && (self.up.is_none() || self.framing == Framing::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(rest) => SizeHint::with_exact(rest),
            // Over upstream; what is left is `pending` (a whole body with trailers).
            Framing::Empty => SizeHint::with_exact(self.pending.len() as u64),
            _ => SizeHint::default(),
        }
    }
}
