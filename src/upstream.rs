//! The upstream side: one pool of keep-alive connections per worker thread (no
//! cross-thread lock on the request path), the request timeout, and the
//! classification of upstream failures into the `kind`s of SPEC.md.
//!
//! Targets speak HTTP/1.1 or HTTP/2 (`protocol = "h2"`), over TCP or TLS (`https://`).
//! An HTTP/1.1 connection is lent for one exchange and comes back to its pool only
//! when the response body has been read to the end ([`Lease`]); an HTTP/2 connection
//! stays in the pool and carries every concurrent exchange of its worker. A request
//! that a pooled connection could not even start sending (the upstream had closed it)
//! is retried once on a fresh connection, so a keep-alive race never reaches the client.

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::error::{ProxyError, UpstreamFailure};
use crate::h1::wire;
use crate::limits::{HeadDue, RequestBody, RequestBodyError};

/// Idle upstream connections are closed after this long; it must stay below the
/// upstreams' own keep-alive timeout (nginx: 75 s) so we never write to a connection
/// the upstream is closing.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often each worker sweeps its pools (`UpstreamClient::sweep`): an idle
/// connection lives `POOL_IDLE_TIMEOUT` to that plus this, and one the upstream closed
/// stays half-closed at most this long.
pub(crate) const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per target and worker.
pub(crate) const MAX_IDLE_PER_TARGET: usize = 1024;

/// How an upstream's targets are reached.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// `https://` targets: the TLS client config (roots, ALPN).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `protocol = "h2"`.
    pub h2: bool,
    /// Tells pools apart: TLS or not, HTTP/2 or not, and which CA (or none) verifies
    /// the targets. Two upstreams naming the same address with different CAs must not
    /// share a connection one of them verified; the same settings after a reload keep
    /// their pool.
    pub pool_id: u64,
}

/// A connection, HTTP/1.1 or HTTP/2.
enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    async fn try_send(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// A pool: the target and how it is reached (the same address may be reached over
/// TCP and TLS, HTTP/1.1 and HTTP/2, with different CAs, by different upstreams).
type PoolKey = (Authority, u64);

/// One worker's connections to every upstream target.
#[derive(Default)]
pub struct UpstreamClient {
    idle: Mutex<HashMap<PoolKey, VecDeque<Idle>, foldhash::fast::RandomState>>,
    /// The HTTP/1.1 fast path's idle sockets to plain HTTP/1.1 targets.
    pub h1: crate::h1::Pool,
}

/// A connection lent to one exchange. [`Lease::release`] gives it back once the
/// response body has ended; dropping it instead closes the connection when hyper is
/// done with it.
pub struct Lease {
    pool: Arc<UpstreamClient>,
    key: PoolKey,
    sender: Sender,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("target", &self.key.0)
            .finish()
    }
}

impl Lease {
    pub fn release(self) {
        // An HTTP/2 connection never left its pool.
        let Sender::H1(_) = &self.sender else { return };
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(self.key).or_default();
        let now = Instant::now();
        // Oldest first: the expired ones go as new ones come back.
        drop_expired(list, now, |i| i.since);
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push_back(Idle {
                sender: self.sender,
                since: now,
            });
        }
    }
}

impl UpstreamClient {
    pub fn new() -> Arc<UpstreamClient> {
        Arc::new(UpstreamClient::default())
    }

    /// The most recently used idle connection that is ready for a request; closed and
    /// expired ones met on the way are dropped. HTTP/1.1 connections are taken from the
    /// back, so a checkout costs O(1) however many are idle (under HTTP/2 client load
    /// hundreds are). An HTTP/2 connection is shared: a handle to it is returned and it
    /// stays; busy ones (at their stream limit) stay too.
    fn checkout(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        if matches!(list.back()?.sender, Sender::H1(_)) {
            let now = Instant::now();
            let mut at = list.len();
            while at > 0 {
                at -= 1;
                if now.duration_since(list[at].since) >= POOL_IDLE_TIMEOUT {
                    // Everything in front of it is older still.
                    list.drain(..=at);
                    return None;
                }
                if list[at].sender.is_closed() {
                    list.remove(at);
                } else if list[at].sender.is_ready() {
                    return list.remove(at).map(|i| i.sender);
                }
                // Not ready yet (hyper still finishing the last exchange): it stays.
            }
            return None;
        }
        list.retain(|i| !i.sender.is_closed());
        let pos = list.iter().rposition(|i| i.sender.is_ready())?;
        match &list[pos].sender {
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => list.remove(pos).map(|i| i.sender),
        }
    }

    /// Drops the idle HTTP/1.1 connections idle for `POOL_IDLE_TIMEOUT`, every closed
    /// connection, and the lists left empty, in both pools (see `h1::Pool::sweep`).
    /// An open HTTP/2 connection stays: it is shared, not idle.
    pub fn sweep(&self) {
        let now = Instant::now();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|_, list| {
                list.retain(|i| {
                    !i.sender.is_closed()
                        && (matches!(i.sender, Sender::H2(_))
                            || now.saturating_duration_since(i.since) < POOL_IDLE_TIMEOUT)
                });
                !list.is_empty()
            });
        }
        self.h1.sweep(now);
    }

    /// Keeps a new HTTP/2 connection for the exchanges that follow.
    fn share(&self, key: &PoolKey, sender: &http2::SendRequest<RequestBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.entry(key.clone()).or_default().push_back(Idle {
            sender: Sender::H2(sender.clone()),
            since: Instant::now(),
        });
    }
}

/// Drops the idle connections at the front of `list` (the oldest) that have been idle
/// for `POOL_IDLE_TIMEOUT`; both pools call it as a connection comes back.
pub(crate) fn drop_expired<T>(list: &mut VecDeque<T>, now: Instant, since: impl Fn(&T) -> Instant) {
    while list
        .front()
        .is_some_and(|i| now.saturating_duration_since(since(i)) >= POOL_IDLE_TIMEOUT)
    {
        list.pop_front();
    }
}

/// A TCP connection to `target` (an address or a resolvable name), with
/// `TCP_NODELAY`, within `CONNECT_TIMEOUT`. Both pools connect through it.
pub(crate) async fn connect_tcp(target: &Authority) -> Result<TcpStream, UpstreamFailure> {
    let stream = match target.as_str().parse::<SocketAddr>() {
        Ok(addr) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await,
        Err(_) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.as_str())).await,
    };
    match stream {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %e, "upstream connect failed");
            Err(UpstreamFailure::Connect)
        }
        Err(_) => Err(UpstreamFailure::Connect),
    }
}

async fn connect(target: &Authority, transport: &Transport) -> Result<Sender, UpstreamFailure> {
    let stream = connect_tcp(target).await?;
    match &transport.tls {
        None => handshake(stream, transport.h2).await,
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(target.host().to_owned())
                .map_err(|_| UpstreamFailure::Connect)?;
            let tls = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream),
            )
            .await;
            match tls {
                Ok(Ok(tls)) => handshake(tls, transport.h2).await,
                Ok(Err(e)) => {
                    tracing::warn!(%target, error = %e, "upstream TLS handshake failed");
                    Err(UpstreamFailure::Connect)
                }
                Err(_) => Err(UpstreamFailure::Connect),
            }
        }
    }
}

/// [`wire::MAX_RESPONSE_HEAD`] as an HTTP/2 header-list size (a constant that fits).
const RESPONSE_HEAD_LIST: u32 = wire::MAX_RESPONSE_HEAD as u32;

/// HTTP/1.1 (with upgrades, for WebSocket) or HTTP/2 over a connected stream.
async fn handshake<T>(io: T, h2: bool) -> Result<Sender, UpstreamFailure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // The response-head limit of every other path (as HTTP/2 counts it).
            .max_header_list_size(RESPONSE_HEAD_LIST)
            .handshake(io)
            .await
            .map_err(|_| UpstreamFailure::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        return Ok(Sender::H2(sender));
    }
    // The limits the gateway's own exchange holds plain upstreams' heads to, so that
    // a head is refused or passed alike whichever path reads it.
    let (sender, conn) = http1::Builder::new()
        .max_headers(wire::MAX_RESPONSE_FIELDS)
        .max_header_size(wire::MAX_RESPONSE_HEAD)
        .handshake(io)
        .await
        .map_err(|_| UpstreamFailure::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Sender::H1(sender))
}

/// Where a request goes when its target cannot be connected to: the pool's other
/// targets ([`crate::snapshot::Upstream::failed`]), each tried once at most.
pub struct Failover<'a> {
    pool: &'a crate::snapshot::Upstream,
    /// The tenant's metrics (`None` with `server.metrics = false`).
    stats: Option<&'a crate::metrics::TenantStats>,
    /// Targets still to try after the first.
    left: usize,
}

impl<'a> Failover<'a> {
    pub fn new(
        pool: &'a crate::snapshot::Upstream,
        stats: Option<&'a crate::metrics::TenantStats>,
    ) -> Failover<'a> {
        Failover {
            pool,
            stats,
            left: pool.targets.len().saturating_sub(1),
        }
    }

    pub fn pool(&self) -> &'a crate::snapshot::Upstream {
        self.pool
    }

    /// The target to try after a connection to `failed` could not be made, counting
    /// that failure in `upstream_errors_total{kind="connect"}`; `None` when there is
    /// none to try (the failure is then the request's, counted with its response).
    pub fn next(&mut self, failed: &Authority) -> Option<&'a Authority> {
        // Passed over even when it was the last to try.
        let next = self.pool.failed(failed).filter(|_| self.left > 0)?;
        self.left -= 1;
        if let Some(stats) = self.stats {
            stats.record_upstream_failure(&self.pool.name, crate::metrics::UpstreamKind::Connect);
        }
        Some(next)
    }
}

/// Sends `req` to `target` (another of the pool's targets when it cannot be connected
/// to) and waits for the response head for at most `timeout`.
pub async fn send(
    pool: &Arc<UpstreamClient>,
    req: Request<RequestBody>,
    target: &Authority,
    mut failover: Failover<'_>,
    timeout: Duration,
    body_idle: Option<Duration>,
) -> Result<(Response<Incoming>, Lease), ProxyError> {
    let (transport, upstream) = (&failover.pool().transport, &failover.pool().name);
    let mut key = (target.clone(), transport.pool_id);
    // A body still to go up: the head is due `timeout` after it has (see `Upload`).
    let upload = req.body().upload();
    let exchange = async {
        let mut req = req;
        let mut fresh_tried = false;
        // An HTTP/2 upstream may refuse a stream it has not processed (a GOAWAY that
        // crossed it, REFUSED_STREAM): a request can go again, once, when its body is
        // empty or was all in hand before it went (a copy kept).
        let mut replay = transport.h2;
        let mut recording = None;
        if transport.h2 && !req.body().is_end_stream() {
            let (parts, body) = req.into_parts();
            let (body, rec) = RequestBody::recorded(body, REPLAY_MAX);
            req = Request::from_parts(parts, body);
            recording = Some(rec);
        }
        loop {
            let (mut sender, pooled) = match pool.checkout(&key) {
                Some(s) if !fresh_tried => (s, true),
                _ => {
                    // Boxed: connecting (TCP, TLS, HTTP handshakes) is rare next to
                    // reusing, and its future would make every request's larger.
                    let s = match Box::pin(connect(&key.0, transport)).await {
                        Ok(s) => s,
                        Err(UpstreamFailure::Connect) => match failover.next(&key.0) {
                            // Nothing was sent: the request goes to the next target.
                            Some(next) => {
                                key.0 = next.clone();
                                fresh_tried = false;
                                continue;
                            }
                            None => return Err((UpstreamFailure::Connect, None)),
                        },
                        Err(f) => return Err((f, None)),
                    };
                    if let Sender::H2(h2) = &s {
                        pool.share(&key, h2);
                    }
                    fresh_tried = true;
                    (s, false)
                }
            };
            // The head, kept only while it may be needed again.
            let head = replay.then(|| head_of(&req));
            match sender.try_send(req).await {
                // hyper (HTTP/1.1 and HTTP/2 alike) takes any status from 100 to
                // 999; past 599 it is no status code (RFC 9110 §15), as the fast
                // path's parser holds too. Not relayed; the connection is not kept
                // (an HTTP/2 one is, with this stream reset).
                Ok(resp) if resp.status().as_u16() > 599 => {
                    tracing::debug!(upstream = %upstream, status = resp.status().as_u16(), "upstream sent a status outside 100-599");
                    return Err((UpstreamFailure::Protocol, None));
                }
                Ok(resp) => {
                    return Ok((
                        resp,
                        Lease {
                            pool: pool.clone(),
                            key,
                            sender,
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection was closed under us.
                    Some(back) if pooled => req = back,
                    _ => {
                        let err = e.into_error();
                        let again = head.filter(|_| refused(&err)).and_then(|head| {
                            let body = match &recording {
                                Some(rec) => RequestBody::replay(rec)?,
                                None => RequestBody::empty(),
                            };
                            Some(Request::from_parts(head, body))
                        });
                        if let Some(again) = again {
                            // Not processed (RFC 9113 §8.7), whatever its method: on a
                            // new connection, as this one is going away.
                            tracing::debug!(upstream = %upstream, error = %err, "upstream refused the stream; sent again on a new connection");
                            req = again;
                            replay = false;
                            fresh_tried = true;
                            continue;
                        }
                        return Err(match body_error(&err) {
                            Some(b) => (UpstreamFailure::Reset, Some(b.to_error())),
                            None => {
                                tracing::debug!(upstream = %upstream, error = %err, source = ?err.source(), "upstream request failed");
                                (classify(&err), None)
                            }
                        });
                    }
                },
            }
        }
    };
    tokio::pin!(exchange);
    let mut due = tokio::time::Instant::now() + timeout;
    loop {
        let late = match tokio::time::timeout_at(due, &mut exchange).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err((_, Some(own)))) => return Err(own),
            Ok(Err((failure, None))) => {
                return Err(ProxyError::UpstreamError {
                    upstream: upstream.clone(),
                    failure,
                })
            }
            Err(_) => upload
                .as_ref()
                .map(|u| u.head_due(tokio::time::Instant::now(), timeout, body_idle)),
        };
        let error = match late {
            // The upload still moves, or ended less than `timeout` ago: wait on.
            Some(HeadDue::At(t)) => {
                due = t;
                continue;
            }
            Some(HeadDue::Stalled(side)) => side.error(upstream, body_idle.unwrap_or_default()),
            Some(HeadDue::Timeout) | None => ProxyError::UpstreamTimeout {
                upstream: upstream.clone(),
                after: timeout,
            },
        };
        return Err(error);
    }
}

/// Of a request body to an HTTP/2 upstream, this much is kept as it goes, so that a
/// refused stream can be sent again.
const REPLAY_MAX: usize = 64 * 1024;

/// `req`'s method, target, version and headers, for sending it again.
fn head_of(req: &Request<RequestBody>) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = req.method().clone();
    head.uri = req.uri().clone();
    head.version = req.version();
    head.headers = req.headers().clone();
    head
}

/// Whether an HTTP/2 upstream refused the stream without processing it: reset with
/// REFUSED_STREAM, or above the last stream id of a graceful GOAWAY (h2 reports a
/// remote GOAWAY with NO_ERROR only to those streams; one with an error code also
/// fails streams the upstream may have acted on).
fn refused(e: &hyper::Error) -> bool {
    in_sources::<h2::Error>(e).is_some_and(|h2| {
        h2.is_remote()
            && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR)))
    })
}

/// The request body's own failure, found in the error's source chain: not the
/// upstream's fault.
fn body_error(e: &hyper::Error) -> Option<&RequestBodyError> {
    in_sources(e)
}

/// The first error of type `T` in `e`'s source chain.
fn in_sources<T: std::error::Error + 'static>(e: &hyper::Error) -> Option<&T> {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<T>() {
            return Some(t);
        }
        source = s.source();
    }
    None
}

fn classify(e: &hyper::Error) -> UpstreamFailure {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        UpstreamFailure::Protocol
    } else {
        UpstreamFailure::Reset
    }
}
