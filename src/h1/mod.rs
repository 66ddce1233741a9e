//! The HTTP/1.1 fast path for plain-TCP client connections whose requests go to
//! plain-TCP HTTP/1.1 upstreams — the common case, and the one the load benchmark
//! measures. One task per client connection does everything: it reads and parses the
//! request head, runs the same stages as every other request ([`proxy::route`],
//! [`proxy::commit`]), writes the request to a pooled upstream socket, reads the
//! response and writes it to the client, without hyper's connection tasks, channels
//! or per-message `HeaderMap` for the response.
//!
//! While a connection waits for its next request it holds no buffer, and after
//! [`LINGER`] no task either: it is parked (`park.rs`) with the socket's readability
//! waking it. The read buffer is allocated when the first bytes arrive and freed when
//! the exchange is over.
//!
//! Anything else — HTTP/2 prior knowledge, HTTP/1.0, `Transfer-Encoding` or `Expect`
//! on a request, upgrades (WebSocket), malformed input, a tenant routed to a TLS or
//! HTTP/2 upstream — is handed to hyper together with the bytes already read, and
//! hyper serves the rest of that connection exactly as it serves every TLS connection.

mod checked;
mod exchange;
mod fetch;
mod park;
mod spare;
mod trailer;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use std::future::Future;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use checked::{Checked, Verdict};
use exchange::{Done, Outgoing, RequestCounters};
pub use exchange::{Pool, Stall};
pub use fetch::{fetch, Options, UpstreamBody};
pub use park::{Conn, ToHyper, Worker};
use wire::{Extra, Head, Parsed};

use crate::error::ProxyError;
use crate::headers;
use crate::proxy::{self, ConnCtx, Exchange};
use crate::snapshot::{Snapshot, Upstream};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Read buffer allocated when a parked connection turns readable.
const READ_BUF: usize = 4 * 1024;

/// The rest of a connection, for hyper: the bytes already read, then the socket.
pub struct Handoff {
    pub prefix: Bytes,
    pub stream: TcpStream,
    /// The bytes are the HTTP/2 connection preface.
    pub h2: bool,
}

/// Whether `BULKHEAD_H1=hyper` turned the fast path off (for A/B benchmarks and as a
/// way around it should it ever misbehave).
pub fn enabled() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("BULKHEAD_H1").map_or(true, |v| v != "hyper"));
    *ON
}

/// Whether the fast path can forward to `upstream`.
pub fn plain_h1(upstream: &Upstream) -> bool {
    upstream.transport.tls.is_none() && !upstream.transport.h2
}

/// Serves a connection that has something to read, until it closes, goes idle
/// (parked again) or needs hyper.
async fn serve(worker: Arc<Worker>, mut conn: Conn) {
    // Taken from the worker's spare buffers when the first bytes are due, given back
    // whenever it is empty and the connection waits.
    let mut buf = spare::Buf::default();
    // The deadline for a head that arrives in pieces, set when the first piece does.
    let mut deadline = None;
    // Whether the socket is known to have turned readable (the task was woken for it,
    // or parking found it readable). After a response it is not: the client has
    // usually not sent its next request yet, so the connection parks at once rather
    // than spend a `recv` that would say EAGAIN.
    let mut readable = true;
    // Bounds the wait for the next request before the connection parks; made at the
    // first such wait and re-armed for each later one.
    let mut timer = None;
    // When the last response went out, if the exchange read the clock then: the
    // start of the wait for the next request, without reading it again.
    let mut answered = None;
    loop {
        // A whole request head, or the reason there is none.
        let head = loop {
            if !buf.is_empty() {
                if conn.fresh && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
                    if buf.len() >= H2_PREFACE.len() {
                        return to_hyper(&worker, conn, buf.take().freeze(), true).await;
                    }
                } else {
                    let refused = match wire::parse_request(&mut buf) {
                        Parsed::Request(h) => break h,
                        Parsed::Partial if buf.len() < worker.max_head => None,
                        Parsed::Fallback => {
                            return to_hyper(&worker, conn, buf.take().freeze(), false).await;
                        }
                        // Past what hyper would read too: it would answer an empty 431.
                        Parsed::Partial => Some(ProxyError::HeadTooLong {
                            limit: worker.max_head,
                        }),
                        Parsed::Refused(e) => Some(e),
                    };
                    if let Some(e) = refused {
                        Box::pin(refuse_unparsed(&mut conn.stream, &mut buf, &conn.ctx, e)).await;
                        close(conn.stream).await;
                        return;
                    }
                }
            }
            if buf.is_empty() && !readable {
                let since = answered.take().unwrap_or_else(Instant::now);
                if !linger(&worker, &conn.stream, &mut timer, since).await {
                    match worker.park(conn, since) {
                        Some(c) => conn = c,
                        None => return,
                    }
                }
                readable = true;
            }
            if buf.capacity() == 0 {
                buf = spare::Buf::new(READ_BUF);
            } else if buf.capacity() - buf.len() < 512 {
                let more = READ_BUF.max(buf.len());
                buf.reserve(more);
            }
            match read_now(&mut conn.stream, &mut buf).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if buf.is_empty() {
                        // Nothing pending (readiness can be stale): give the buffer
                        // back and park until the client writes.
                        buf = spare::Buf::default();
                        readable = false;
                        continue;
                    }
                    let until = *deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + worker.header_read_timeout
                    });
                    match tokio::time::timeout_at(until, conn.stream.readable()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            tracing::debug!(
                                "closing a connection whose request head did not arrive in time"
                            );
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        };
        conn.fresh = false;
        deadline = None;
        readable = false;
        // Boxed, in its own statement: the request's state exists only while it runs.
        let next = Box::pin(request(&mut conn.stream, &mut buf, &conn.ctx, head));
        match next.await {
            Next::KeepAlive(at) => answered = at,
            Next::Close => {
                close(conn.stream).await;
                return;
            }
            Next::Hyper => return to_hyper(&worker, conn, buf.take().freeze(), false).await,
        }
        if buf.is_empty() {
            // Give the buffer back before waiting.
            buf = spare::Buf::default();
        }
    }
}

/// How long an answered connection keeps its task waiting for the client's next
/// request before it parks (at most `header_read_timeout`). A client that sends again
/// within it — any busy keep-alive client — costs no park, no task spawned for its
/// next request and no task freed (−690 of 17,650 instructions per request,
/// callgrind); the price is the task (under 1 KiB) for this long after each answer,
/// and a timer's registration and expiry for a client that pauses longer.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits, up to [`LINGER`] after `since`, for `stream` to turn readable. False when it
/// did not: the connection is to be parked.
async fn linger(
    worker: &Worker,
    stream: &TcpStream,
    timer: &mut Option<exchange::Timer>,
    since: Instant,
) -> bool {
    let until = tokio::time::Instant::from_std(since + LINGER.min(worker.header_read_timeout));
    let timer = match timer {
        Some(t) => {
            t.arm(until);
            t
        }
        None => timer.insert(exchange::Timer::new(until)),
    };
    // An error is for the read that follows to report.
    let ready = std::future::poll_fn(|cx| stream.poll_read_ready(cx));
    timer.bound(ready).await.is_ok()
}

/// One read of what the socket holds now, `WouldBlock` if nothing. Through
/// `poll_read` rather than `try_read_buf`: tokio clears its readiness flag after a
/// short read only on that path, and a flag left set makes the next readiness check
/// (parking) cost a `recv` that answers EAGAIN, once per request.
///
/// Outside the task's cooperative budget: with the budget spent, `poll_read` answers
/// `Pending` while data is waiting, and the readiness wait that follows a
/// `WouldBlock` here would then return at once, again and again — a task spinning
/// without ever yielding (a pipelining client hung the worker this way). The task
/// still yields: every request it serves writes to a socket, which is budgeted.
async fn read_now(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let mut read = std::pin::pin!(stream.read_buf(buf));
    tokio::task::unconstrained(std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
        std::task::Poll::Pending => {
            std::task::Poll::Ready(Err(std::io::ErrorKind::WouldBlock.into()))
        }
        done => done,
    }))
    .await
}

/// Hands the rest of the connection to hyper.
async fn to_hyper(worker: &Worker, conn: Conn, prefix: Bytes, h2: bool) {
    let Conn {
        stream, ctx, guard, ..
    } = conn;
    let handoff = Handoff { prefix, stream, h2 };
    let hyper = (worker.to_hyper)(handoff, ctx, guard);
    hyper.await;
}

/// Closes after a response: FIN first, so the response is not cut by a reset.
async fn close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
}

enum Next {
    /// With when the response went out, where that was read.
    KeepAlive(Option<Instant>),
    Close,
    /// Not for the fast path after all; the head is back at the front of the buffer.
    Hyper,
}

/// One request, start to end.
async fn request(stream: &mut TcpStream, buf: &mut BytesMut, ctx: &ConnCtx, head: Head) -> Next {
    let started = Instant::now();
    let snap = ctx.shared.snapshot.load_full();
    let Head {
        parts,
        body_len,
        close,
        raw,
    } = head;
    let mut parts = spare::Request(parts);
    // Draining (`Shared::draining`) is read when the response head is written, not
    // here: a request in flight when it began is answered with `connection: close`.
    let draining = &ctx.shared.draining;
    let request_id = headers::request_id(&parts.headers);
    let mut ex = Exchange::new(&snap);
    let log = snap.access_log.then(|| {
        (
            parts.method.clone(),
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
    });
    let head_request = parts.method == http::Method::HEAD;
    let refusal = |log, request_id| Refusal {
        snap: &snap,
        started,
        request_id,
        log,
        head_request,
        draining,
    };
    // The stages without side effects first: a tenant routed to an upstream the fast
    // path cannot reach goes to hyper before anything is counted or charged.
    let prepared = async {
        let routed = proxy::route(&parts, &snap, ctx, &mut ex)?;
        if !plain_h1(routed.upstream) {
            return Ok(None);
        }
        let (tenant, upstream) = (routed.tenant, routed.upstream);
        let (target, added) =
            proxy::commit(routed, &mut parts, &snap, ctx, &request_id, &mut ex, None).await?;
        Ok(Some((tenant, upstream, target, added)))
    }
    .await;
    let (tenant, upstream, target, added) = match prepared {
        Ok(Some(p)) => p,
        Ok(None) => {
            wire::unsplit(buf, &raw);
            return Next::Hyper;
        }
        Err(e) => {
            let r = refusal(log, request_id);
            return refuse(stream, buf, body_len, close, e, ex, r).await;
        }
    };
    drop(raw);
    let counters = RequestCounters {
        stats: snap.metrics.then(|| tenant.stats.clone()),
        bytes_in: ex.bytes_in.clone(),
    };
    let rate_limit = ex.rate_limit.clone();
    let policy = ex.policy_line();
    let mut pending = Unanswered {
        pending: Some((ex, log)),
        started,
        request_id: &request_id,
    };
    let done = exchange::forward(
        &ctx.client.h1,
        stream,
        buf,
        Outgoing {
            parts: &parts,
            added: &added,
            target: &target,
            failover: crate::upstream::Failover::new(
                upstream,
                snap.metrics.then_some(&*tenant.stats),
            ),
            timeout: tenant.request_timeout,
            body_idle: snap.body_idle_timeout,
            started,
            body_len,
            counters,
            extra: Extra {
                request_id: &request_id,
                policy,
                rate_limit: rate_limit.as_ref(),
                close,
                draining,
            },
        },
        |status| match pending.pending.take() {
            Some((ex, log)) => finish(ex, &snap, started, status, None, &request_id, log),
            None => crate::body::Finish {
                permit: None,
                stats: None,
                bytes_out: 0,
                log: None,
            },
        },
    )
    .await;
    match done {
        // Read again after the head said `connection: close` when draining: then too.
        Done::Served {
            client_reusable,
            at,
        } if client_reusable && !close && !draining.load(Ordering::Relaxed) => {
            Next::KeepAlive(Some(at))
        }
        Done::Served { .. } | Done::Broken => Next::Close,
        // The guard logs the request as abandoned.
        Done::Gone => Next::Close,
        Done::Refused {
            error,
            client_reusable,
        } => {
            let Some((ex, log)) = pending.pending.take() else {
                return Next::Close;
            };
            let rest = if client_reusable { 0 } else { u64::MAX };
            let r = refusal(log, request_id.clone());
            refuse(stream, buf, rest, close, error, ex, r).await
        }
    }
}

/// A request with no response head sent yet. Dropped so — its client went away, or
/// the worker's runtime dropped it when `shutdown_grace` ran out — it is logged as
/// abandoned (the in-flight slot let go, the access-log line written).
struct Unanswered<'a, 's> {
    pending: Option<(Exchange<'s>, Option<(http::Method, PathAndQuery)>)>,
    started: Instant,
    request_id: &'a http::HeaderValue,
}

impl Drop for Unanswered<'_, '_> {
    fn drop(&mut self) {
        let Some((ex, log)) = self.pending.take() else {
            return;
        };
        let (method, path) = log_target(log);
        let id = self.request_id.clone();
        ex.abandoned(self.started, id, method, path);
    }
}

fn finish(
    ex: Exchange<'_>,
    snap: &Snapshot,
    started: Instant,
    status: u16,
    reason: Option<&'static str>,
    request_id: &http::HeaderValue,
    log: Option<(http::Method, PathAndQuery)>,
) -> crate::body::Finish {
    let (method, path) = log_target(log);
    ex.finish(
        snap,
        started,
        status,
        reason,
        request_id.clone(),
        method,
        path,
    )
}

/// The method and path for the access log (placeholders when it is off).
fn log_target(log: Option<(http::Method, PathAndQuery)>) -> (http::Method, PathAndQuery) {
    log.unwrap_or_else(|| (http::Method::GET, PathAndQuery::from_static("/")))
}

/// The gateway's error for bytes that are not a request at all; the connection closes
/// after it (where the next request would start is unknown). Counted and logged like
/// every refusal, under no tenant.
async fn refuse_unparsed(stream: &mut TcpStream, buf: &mut BytesMut, ctx: &ConnCtx, e: ProxyError) {
    let started = Instant::now();
    let snap = ctx.shared.snapshot.load_full();
    let request_id = headers::new_request_id();
    // No method or target could be read: the access log says so with "-" and "*"
    // (a const, so that an invalid one fails the build, not a request).
    const NO_TARGET: PathAndQuery = PathAndQuery::from_static("*");
    let log = snap.access_log.then(|| {
        (
            http::Method::from_bytes(b"-").unwrap_or_default(),
            NO_TARGET,
        )
    });
    let r = Refusal {
        snap: &snap,
        started,
        request_id,
        log,
        head_request: false,
        draining: &ctx.shared.draining,
    };
    refuse(stream, buf, u64::MAX, true, e, Exchange::new(&snap), r).await;
}

/// What a refusal needs besides the error.
struct Refusal<'a> {
    snap: &'a Snapshot,
    started: Instant,
    request_id: http::HeaderValue,
    log: Option<(http::Method, PathAndQuery)>,
    head_request: bool,
    draining: &'a AtomicBool,
}

/// Writes the gateway's own error response. The connection stays open only when the
/// request's body (if any) is already in the buffer, so it can be skipped, and the
/// request was neither malformed nor over `max_body`: a 400 `bad_request` and a 413
/// `body_too_large` close it, whatever was read, as hyper's server here (TLS,
/// proxy::handle) and nginx do, and as the README says.
async fn refuse(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    body_len: u64,
    close: bool,
    e: ProxyError,
    mut ex: Exchange<'_>,
    r: Refusal<'_>,
) -> Next {
    let skippable = body_len <= buf.len() as u64;
    let close = close
        || !skippable
        || matches!(
            e,
            ProxyError::MalformedRequest { .. } | ProxyError::BodyTooLarge { .. }
        );
    if skippable {
        bytes::Buf::advance(buf, body_len as usize);
    }
    let resp = proxy::refuse(&e, r.snap, &mut ex, &r.request_id);
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let body = body.into_full().unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    wire::write_headers(&mut out, &parts.headers);
    wire::write_header(
        &mut out,
        b"content-length",
        body.len().to_string().as_bytes(),
    );
    wire::write_extra(
        &mut out,
        &Extra {
            request_id: &r.request_id,
            policy: ex.policy_line(),
            rate_limit: ex.rate_limit.as_ref(),
            close,
            draining: r.draining,
        },
        false,
    );
    if !r.head_request {
        out.extend_from_slice(&body);
    }
    // Recorded (and any in-flight slot released) before the write, as for proxied
    // responses.
    let mut f = finish(
        ex,
        r.snap,
        r.started,
        status.as_u16(),
        Some(e.code()),
        &r.request_id,
        r.log,
    );
    f.bytes_out = if r.head_request { 0 } else { body.len() as u64 };
    drop(f);
    let written = stream.write_all(&out).await.is_ok();
    // As the head said: read again, it is true if it was then.
    if written && !close && !r.draining.load(Ordering::Relaxed) {
        Next::KeepAlive(None)
    } else {
        Next::Close
    }
}
