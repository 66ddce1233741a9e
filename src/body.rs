//! The response body type the gateway hands to hyper: either the upstream's body,
//! streamed frame by frame, or a small body the gateway made itself — plus what must
//! happen when the response is over: the in-flight permit is released, the bytes sent
//! are counted, and the access-log line is written. A struct around an enum rather
//! than a boxed trait object, so no allocation per response.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::h1::UpstreamBody;
use crate::limits::Permit;
use crate::metrics::{TenantStats, UpstreamKind};
use crate::upstream::Lease;

#[derive(Debug)]
enum Kind {
    /// Streamed from the upstream as it arrives (hyper's client); the connection goes
    /// back to its pool when the body has been read to the end. Boxed: the rarer path,
    /// and inline it would make every response's body (moved several times on its way
    /// out) larger.
    Upstream(Box<Streamed>),
    /// Read by the fast path's exchange straight from an HTTP/1.1 upstream's socket
    /// (`h1/fetch.rs`); the socket goes back to its pool at the end.
    Raw(Box<UpstreamBody>),
    /// A body the gateway made itself; `None` once sent.
    Full(Option<Bytes>),
}

#[derive(Debug)]
struct Streamed {
    body: Incoming,
    lease: Option<Lease>,
    quiet: Option<Quiet>,
}

#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    finish: Option<Finish>,
}

/// `server.body_idle_timeout` for a body streamed from an upstream: the longest the
/// upstream may send nothing while the client waits for more. (A client that takes
/// nothing is the connection's business: `crate::server::Stalls`.) Kept with the body
/// it bounds (`Streamed`, `UpstreamBody`).
/// Also names the upstream, for the metric of a body it breaks.
#[derive(Debug)]
pub(crate) struct Quiet {
    /// `None` without a bound ("0s").
    wait: Option<IdleWait>,
    upstream: Arc<str>,
}

impl Quiet {
    /// For a body from `upstream` that may stream.
    pub(crate) fn new(idle: Option<Duration>, upstream: &Arc<str>) -> Quiet {
        Quiet {
            wait: idle.map(IdleWait::new),
            upstream: upstream.clone(),
        }
    }
}

/// What kind of upstream failure broke a streamed body: garbage in its framing
/// (`protocol`), else a close or reset (`reset`).
fn broken_by(e: &(dyn std::error::Error + 'static)) -> UpstreamKind {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
            || e.downcast_ref::<std::io::Error>().is_some_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                )
            })
        {
            return UpstreamKind::Protocol;
        }
        cause = e.source();
    }
    UpstreamKind::Reset
}

/// A bound on how long something may wait without progress, counted from the first
/// wait after the last progress. Its timer is made at the first wait, so what never
/// waits never reads the clock or allocates.
#[derive(Debug)]
pub(crate) struct IdleWait {
    pub idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The sleep is set for the current wait.
    armed: bool,
}

impl IdleWait {
    pub(crate) fn new(idle: Duration) -> IdleWait {
        IdleWait {
            idle,
            sleep: None,
            armed: false,
        }
    }

    /// The thing waited for made progress.
    pub(crate) fn progress(&mut self) {
        self.armed = false;
    }

    /// Called while waiting: `Ready` once the wait has lasted `idle`.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::now() + self.idle;
        let sleep = match &mut self.sleep {
            Some(s) => {
                if !self.armed {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        sleep.as_mut().poll(cx)
    }
}

/// What happens when a response body is finished or dropped (the client went away).
#[derive(Debug)]
pub struct Finish {
    /// Held until the body is done: the request counts against `max_in_flight`.
    pub permit: Option<Permit>,
    /// `None` when `server.metrics = false`.
    pub stats: Option<Arc<TenantStats>>,
    pub bytes_out: u64,
    /// `None` when `server.access_log = false`.
    pub log: Option<Box<AccessRecord>>,
}

/// The fields of one access-log line, gathered along the request path.
#[derive(Debug)]
pub struct AccessRecord {
    pub started: Instant,
    pub method: Method,
    pub path: http::uri::PathAndQuery,
    pub status: u16,
    pub tenant: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub request_id: HeaderValue,
    pub reason: Option<&'static str>,
    /// Request body bytes, counted by the request body as it streams.
    pub bytes_in: Arc<AtomicU64>,
}

impl Finish {
    /// The upstream broke the response after its head had gone out (closed before the
    /// end of the body, reset, or sent garbage in its framing): the client's response
    /// is cut off; its line says so and `upstream_errors_total` counts it.
    pub(crate) fn upstream_broke(&mut self, upstream: &Arc<str>, kind: UpstreamKind) {
        tracing::debug!(%upstream, ?kind, "the upstream broke a response after its head");
        if let Some(log) = &mut self.log {
            log.reason.get_or_insert(crate::proxy::UPSTREAM_BROKE);
        }
        if let Some(stats) = &self.stats {
            stats.record_upstream_failure(upstream, kind);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.permit.take();
        if let Some(stats) = &self.stats {
            stats.add_response_bytes(self.bytes_out);
        }
        if let Some(r) = self.log.take() {
            tracing::info!(
                target: "access",
                tenant = r.tenant.as_deref().unwrap_or(crate::metrics::UNKNOWN_TENANT),
                method = r.method.as_str(),
                // The path only: query strings may carry secrets.
                path = r.path.path(),
                status = r.status,
                duration_us = u64::try_from(r.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                bytes_in = r.bytes_in.load(Ordering::Relaxed),
                bytes_out = self.bytes_out,
                upstream = r.upstream.as_deref().unwrap_or("-"),
                request_id = r.request_id.to_str().unwrap_or("-"),
                reason = r.reason.unwrap_or("-"),
            );
        }
    }
}

impl ProxyBody {
    pub fn full(b: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(Some(b)),
            finish: None,
        }
    }

    /// A body with no bytes, over before it starts.
    pub fn empty() -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(None),
            finish: None,
        }
    }

    pub fn raw(body: Box<UpstreamBody>) -> ProxyBody {
        ProxyBody {
            kind: Kind::Raw(body),
            finish: None,
        }
    }

    /// A body streamed by hyper's client from `upstream`, bounded by
    /// `server.body_idle_timeout` (`idle`): once the upstream has sent nothing for that
    /// long, the body fails and the client's response is cut off (counted as an
    /// upstream timeout).
    pub fn upstream(
        body: Incoming,
        lease: Lease,
        idle: Option<Duration>,
        upstream: &Arc<str>,
    ) -> ProxyBody {
        // A body that is over before it starts (204, 304, HEAD) is never polled.
        let (lease, quiet) = if body.is_end_stream() {
            lease.release();
            (None, None)
        } else {
            (Some(lease), Some(Quiet::new(idle, upstream)))
        };
        ProxyBody {
            kind: Kind::Upstream(Box::new(Streamed { body, lease, quiet })),
            finish: None,
        }
    }

    /// The bytes of a body the gateway made itself; `None` for an upstream's body.
    pub fn into_full(mut self) -> Option<Bytes> {
        match &mut self.kind {
            Kind::Full(b) => b.take(),
            Kind::Upstream(..) | Kind::Raw(_) => None,
        }
    }

    /// The answer to a HEAD request: the headers a GET would get, `content-length`
    /// included, and no body (RFC 9110 §9.3.2). For HTTP/2, whose servers (ours and
    /// hyper's) send whatever body they are given; HTTP/1.1's leave it out themselves.
    /// Only a body the gateway made itself has anything to drop: an upstream answers a
    /// HEAD with none.
    pub fn strip_for_head(resp: &mut http::Response<ProxyBody>) {
        let body = resp.body();
        if body.is_end_stream() {
            return;
        }
        if let (false, Some(n)) = (
            resp.headers().contains_key(http::header::CONTENT_LENGTH),
            body.size_hint().exact(),
        ) {
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        resp.body_mut().kind = Kind::Full(None);
    }

    /// Attaches the end-of-response work.
    pub fn set_finish(&mut self, finish: Finish) {
        self.finish = Some(finish);
    }

    /// The gateway's HTTP/2 server cut this response off (the client reset its stream
    /// or left, or took nothing for `body_idle_timeout`) with `unsent` bytes of it
    /// taken from the upstream but never written to the connection: `bytes_out`
    /// counts what went out, and the line says the client went away, as for a body
    /// dropped before its end.
    pub(crate) fn cut_off(&mut self, unsent: usize) {
        if let Some(f) = &mut self.finish {
            f.bytes_out = f.bytes_out.saturating_sub(unsent as u64);
            if let Some(log) = &mut f.log {
                log.reason.get_or_insert(crate::proxy::CLIENT_CLOSED);
            }
        }
    }

    /// The response is over: the `Finish` is dropped now.
    pub(crate) fn done(&mut self) {
        // Dropping `Finish` releases the permit and records the response at once, even
        // if hyper keeps the body object around a while longer.
        self.finish.take();
    }
}

impl Drop for ProxyBody {
    /// An upstream's body dropped before its end with its `Finish` still on it: hyper
    /// or the HTTP/2 server let go of it because the client went away (an upstream
    /// failure or stall ends the body with an error first, which records the
    /// response). Logged as the fast path logs it: the status that went out, reason
    /// [`CLIENT_CLOSED`](crate::proxy::CLIENT_CLOSED). A body the gateway made itself
    /// is left alone: it is not polled at all for a HEAD request.
    fn drop(&mut self) {
        if self.finish.is_none() || matches!(self.kind, Kind::Full(_)) || self.is_end_stream() {
            return;
        }
        if let Some(log) = self.finish.as_mut().and_then(|f| f.log.as_mut()) {
            log.reason.get_or_insert(crate::proxy::CLIENT_CLOSED);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let (polled, quiet) = match &mut this.kind {
            Kind::Upstream(s) => {
                let Streamed { body, lease, quiet } = &mut **s;
                let polled = Pin::new(&mut *body).poll_frame(cx);
                // hyper stops polling once `is_end_stream` says so, so the last data
                // frame, not only `None`, ends the exchange.
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    _ => false,
                };
                if ended {
                    if let Some(l) = lease.take() {
                        l.release();
                    }
                }
                (polled.map_err(Into::<Self::Error>::into), quiet.as_mut())
            }
            Kind::Raw(inner) => {
                let polled = Pin::new(&mut **inner)
                    .poll_frame(cx)
                    .map_err(Into::<Self::Error>::into);
                (polled, inner.quiet.as_mut())
            }
            Kind::Full(b) => (Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))), None),
        };
        let polled = match (polled, quiet) {
            (
                Poll::Pending,
                Some(Quiet {
                    wait: Some(wait),
                    upstream,
                }),
            ) => match wait.poll_expired(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    let (stall, idle) = (crate::h1::Stall::Upstream, wait.idle);
                    stall.record(this.finish.as_mut(), upstream, idle);
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no byte from upstream {upstream:?} for {idle:?} (server.body_idle_timeout)"
                        ),
                    );
                    Poll::Ready(Some(Err(e.into())))
                }
            },
            (Poll::Ready(Some(Err(e))), Some(q)) => {
                if let Some(f) = &mut this.finish {
                    f.upstream_broke(&q.upstream, broken_by(&*e));
                }
                Poll::Ready(Some(Err(e)))
            }
            (polled, Some(q)) => {
                if let Some(wait) = &mut q.wait {
                    wait.progress();
                }
                polled
            }
            (polled, None) => polled,
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(f), Some(d)) = (&mut this.finish, frame.data_ref()) {
                    f.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(s) => s.body.is_end_stream(),
            Kind::Raw(inner) => inner.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(s) => s.body.size_hint(),
            Kind::Raw(inner) => inner.size_hint(),
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
        }
    }
}
