//! The request path, top to bottom: snapshot → resolve → admit → route → rewrite →
//! forward. Each stage returns `Result<_, ProxyError>`; [`handle`] alone turns an
//! error into a response.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{AccessRecord, Finish, ProxyBody};
use crate::config::TenantStatus;
use crate::error::ProxyError;
use crate::headers::{self, Forward, X_REQUEST_ID};
use crate::limits::{self, ClientBody, Permit, RequestBody};
use crate::server::Shared;
use crate::snapshot::{Snapshot, Tenant};
use crate::tenant;
use crate::upstream::{self, UpstreamClient};

/// What a connection's requests share: the gateway state, this worker's upstream
/// client and the client address, formatted once.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub client: Arc<UpstreamClient>,
    pub peer: IpAddr,
    /// `peer`, formatted once for `x-forwarded-for`.
    pub peer_ip: HeaderValue,
    /// What the TLS handshake established; `None` on the plain listener.
    pub tls: Option<Box<crate::tls::ConnTls>>,
    /// `server.redirect_http`: the plain listener answers 308 to this https port.
    pub redirect_to: Option<u16>,
    /// An HTTP/2 response on this connection has sent `x-request-id` and `RateLimit`
    /// indexable, so their names are in the client's HPACK table (see [`unique`]).
    pub hpack_names: AtomicBool,
}

/// What the stages learned about a request, for the response and the records made
/// when it finishes, whether it was proxied or refused.
#[derive(Default)]
pub(crate) struct Exchange<'s> {
    pub tenant: Option<&'s Tenant>,
    /// `RateLimit`, for tenants with a rate limit.
    pub rate_limit: Option<HeaderValue>,
    /// The in-flight slot, held until the response body is done.
    pub permit: Option<Permit>,
    pub upstream: Option<Arc<str>>,
    /// Request body bytes, for the access log (present only when it is on).
    pub bytes_in: Option<Arc<AtomicU64>>,
}

static RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");

/// The service function: never fails, every error becomes a response.
pub async fn handle(
    req: Request<ClientBody>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let snap = ctx.shared.snapshot.load_full();
    let request_id = headers::request_id(req.headers());
    let (method, path) = (
        req.method().clone(),
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let http1 = req.version() < Version::HTTP_2;
    let mut ex = Exchange::new(&snap);
    let mut pending = Unanswered {
        ex: &mut ex,
        started,
        request_id: &request_id,
        method: &method,
        path: &path,
        answered: false,
    };
    let result = proxy(req, &snap, &ctx, &request_id, pending.ex).await;
    pending.answered = true;
    drop(pending);
    let mut reason = None;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            reason = Some(e.code());
            let mut resp = refuse(&e, &snap, &mut ex, &request_id);
            if http1
                && matches!(
                    e,
                    ProxyError::BodyTooLarge { .. }
                        | ProxyError::MalformedRequest { .. }
                        | ProxyError::BadRequestBody
                        | ProxyError::RequestBodyTimeout { .. }
                        | ProxyError::MethodNotAllowed
                        | ProxyError::UnsupportedTransferCoding { .. }
                )
            {
                // The body was not read to its end (or, after a CONNECT, the client may
                // already be sending tunnel bytes), so the connection cannot carry
                // another request: say so rather than just close it.
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    if !http1 && method == http::Method::HEAD {
        ProxyBody::strip_for_head(&mut resp);
    }
    let status = resp.status().as_u16();
    // With hyper's HTTP/2 server (`BULKHEAD_H2=hyper`), the first response of a
    // connection sends the unique values indexable,
    // which puts their names in the client's table: every later one is then a literal
    // value after an indexed name, not two Huffman-coded strings.
    // The gateway's own HTTP/2 server (the default) chooses what to index itself
    // (h2::hpack::Encoder): for it the mark only makes these values never-indexed
    // literals after the first response.
    let own_h2 = crate::h2::enabled();
    let sensitive = http1 || own_h2 || ctx.hpack_names.swap(true, Ordering::Relaxed);
    let h = resp.headers_mut();
    if let Some(policy) = ex.policy() {
        h.insert(RATELIMIT_POLICY.clone(), policy.clone());
        if let Some(v) = &ex.rate_limit {
            h.insert(RATELIMIT.clone(), unique(v, sensitive));
        }
    }
    h.insert(X_REQUEST_ID.clone(), unique(&request_id, sensitive));
    if !http1 && !own_h2 {
        if let Some(date) = h.get_mut(http::header::DATE) {
            // A new value every second: in the HPACK table each one stays until pushed
            // out, and h2 compares a new `date` with every older copy in the table, so
            // a connection open for a minute compared ~55 stale dates per response
            // (into_encoding 5.4 % → 8.7 % of the proxy's CPU between the first and
            // the second minute of one h2load run).
            date.set_sensitive(true);
        }
    }
    let finish = ex.finish(&snap, started, status, reason, request_id, method, path);
    match resp.extensions_mut().remove::<TunnelEnd>() {
        // A WebSocket tunnel: its line is written when it closes, with its bytes.
        Some(tunnel) => tunnel.hand(finish),
        None => resp.body_mut().set_finish(finish),
    }
    Ok(resp)
}

/// Where the `Finish` of a WebSocket upgrade goes: to the task that splices the
/// tunnel, which writes its access-log line when the tunnel closes, with the bytes
/// that crossed it (client to upstream as `bytes_in`, back as `bytes_out`), instead
/// of at the 101 with none. (In the response's extensions, which want `Clone`.)
#[derive(Clone)]
struct TunnelEnd(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Finish>>>>);

impl TunnelEnd {
    fn hand(self, finish: Finish) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            // A tunnel task already gone: the line is written here, now.
            let _ = tx.send(finish);
        }
    }
}

/// The tunnel's bytes, added to its `Finish` (which writes the line when dropped).
fn tunnel_ended(finish: &mut Finish, from_client: u64, to_client: u64) {
    finish.bytes_out += to_client;
    if let Some(log) = &finish.log {
        log.bytes_in.fetch_add(from_client, Ordering::Relaxed);
    }
    if let Some(stats) = &finish.stats {
        stats.add_request_bytes(from_client);
    }
}

/// The service's future, boxed, for a connection whose service answers in more than
/// one way.
pub type Handled =
    Pin<Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// The answer to a request head the gateway refused before hyper read it
/// (`h1::Checked`): the JSON error, then the close, counted and logged under no
/// tenant with `-` and `*` for the method and target, as the fast path logs such a
/// head.
pub async fn refuse_head(
    e: ProxyError,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = ctx.shared.snapshot.load_full();
    let (mut resp, request_id, finish) = refuse_unread(&e, &snap);
    let h = resp.headers_mut();
    h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(X_REQUEST_ID.clone(), request_id);
    resp.body_mut().set_finish(finish);
    Ok(resp)
}

/// A refusal written outside any HTTP server (a plain HTTP request on the TLS
/// listener, before any handshake): its HTTP/1.1 bytes, then the close; counted and
/// logged as [`refuse_head`] counts and logs one.
pub fn refusal_bytes(e: &ProxyError, snap: &Snapshot) -> Vec<u8> {
    let (resp, request_id, mut finish) = refuse_unread(e, snap);
    let status = resp.status();
    let body = resp.into_body().into_full().unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-request-id: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        request_id.to_str().unwrap_or("-"),
    )
    .into_bytes();
    out.extend_from_slice(&body);
    finish.bytes_out = body.len() as u64;
    out
}

/// The gateway's answer to a request no method or target was read from, with its
/// request id and its `Finish`: counted (under no tenant) now, logged with `-` and
/// `*` when the `Finish` is dropped.
fn refuse_unread(e: &ProxyError, snap: &Snapshot) -> (Response<ProxyBody>, HeaderValue, Finish) {
    let started = Instant::now();
    let request_id = headers::new_request_id();
    let mut ex = Exchange::new(snap);
    let resp = refuse(e, snap, &mut ex, &request_id);
    let finish = ex.finish(
        snap,
        started,
        resp.status().as_u16(),
        Some(e.code()),
        request_id.clone(),
        http::Method::from_bytes(b"-").unwrap_or_default(),
        PathAndQuery::from_static("*"),
    );
    (resp, request_id, finish)
}

/// The access log's `reason` for a request whose client closed its connection (or,
/// on HTTP/2, reset its stream) before the response was over.
pub const CLIENT_CLOSED: &str = "client_closed";

/// The access log's `reason` for a response the upstream broke after its head was
/// sent (closed early, reset, garbage in its framing): the error code of the 502 it
/// would have been before the head.
pub const UPSTREAM_BROKE: &str = "upstream_error";

/// The access log's `reason` for a request cut off unanswered because
/// `shutdown_grace` ran out (logged with status 503).
pub const SHUTDOWN: &str = "shutdown";

/// A request not answered yet. Dropped so (hyper or the HTTP/2 server let go of it: the
/// client closed its connection or reset its stream before the response head), it is
/// logged as the fast path logs such a request ([`Exchange::abandoned`]) and its
/// in-flight slot goes with it. Holds references only: nothing moves for the requests
/// that are answered.
struct Unanswered<'a, 's> {
    ex: &'a mut Exchange<'s>,
    started: Instant,
    request_id: &'a HeaderValue,
    method: &'a http::Method,
    path: &'a PathAndQuery,
    answered: bool,
}

impl Drop for Unanswered<'_, '_> {
    fn drop(&mut self) {
        if !self.answered {
            let ex = std::mem::take(&mut *self.ex);
            let (id, method, path) = (self.request_id, self.method, self.path);
            ex.abandoned(self.started, id.clone(), method.clone(), path.clone());
        }
    }
}

/// A response header value that differs from one response to the next. Marked
/// (`sensitive`) so that HTTP/2 sends it as a literal instead of adding it to the
/// connection's HPACK table, where it could never be used again and would push out the
/// entries that can (`server`, `content-type`, …); a literal still names its header by
/// index when the name is in the table. HTTP/1.1 ignores the mark.
fn unique(v: &HeaderValue, sensitive: bool) -> HeaderValue {
    let mut v = v.clone();
    v.set_sensitive(sensitive);
    v
}

impl<'s> Exchange<'s> {
    pub(crate) fn new(snap: &Snapshot) -> Exchange<'s> {
        Exchange {
            bytes_in: snap.access_log.then(Default::default),
            ..Exchange::default()
        }
    }

    /// `RateLimit-Policy`, for tenants with a rate limit.
    pub(crate) fn policy(&self) -> Option<&'s HeaderValue> {
        self.tenant.and_then(|t| t.limits.policy.as_ref())
    }

    /// `RateLimit-Policy` as an HTTP/1.1 header line, for tenants with a rate limit.
    pub(crate) fn policy_line(&self) -> Option<&'s [u8]> {
        self.tenant.and_then(|t| t.policy_line())
    }

    /// Records the response in the tenant's metrics and gathers what must happen when
    /// its body is over (the in-flight slot, the bytes sent, the access-log line).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish(
        self,
        snap: &Snapshot,
        started: Instant,
        status: u16,
        reason: Option<&'static str>,
        request_id: HeaderValue,
        method: http::Method,
        path: PathAndQuery,
    ) -> Finish {
        let stats = snap.metrics.then(|| {
            let stats = self.tenant.map_or(&snap.unknown_stats, |t| &t.stats);
            stats.record(status, started.elapsed());
            stats.clone()
        });
        let mut finish = self.unrecorded(started, status, reason, request_id, method, path);
        finish.stats = stats;
        finish
    }

    /// The end of a request whose client went away before any response: the in-flight
    /// slot let go and the access-log line, status 499 (as nginx logs it), reason
    /// [`CLIENT_CLOSED`]; or, dropped by a worker whose `shutdown_grace` ran out, 503
    /// [`SHUTDOWN`]. Not counted in `requests_total` or the latency histogram, which
    /// count responses sent.
    pub(crate) fn abandoned(
        self,
        started: Instant,
        request_id: HeaderValue,
        method: http::Method,
        path: PathAndQuery,
    ) {
        let (status, reason) = if crate::server::cut_off_by_shutdown() {
            (503, SHUTDOWN)
        } else {
            tracing::debug!(request_id = ?request_id, "client went away before the response");
            (499, CLIENT_CLOSED)
        };
        drop(self.unrecorded(started, status, Some(reason), request_id, method, path));
    }

    /// `finish` without the metrics.
    fn unrecorded(
        self,
        started: Instant,
        status: u16,
        reason: Option<&'static str>,
        request_id: HeaderValue,
        method: http::Method,
        path: PathAndQuery,
    ) -> Finish {
        let log = self.bytes_in.map(|bytes_in| {
            Box::new(AccessRecord {
                started,
                method,
                path,
                status,
                tenant: self.tenant.map(|t| t.id.clone()),
                upstream: self.upstream,
                request_id,
                reason,
                bytes_in,
            })
        });
        Finish {
            permit: self.permit,
            stats: None,
            bytes_out: 0,
            log,
        }
    }
}

/// The response for a refused request; counts the refusal.
pub(crate) fn refuse(
    e: &ProxyError,
    snap: &Snapshot,
    ex: &mut Exchange<'_>,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let id = ex.tenant.map(|t| &*t.id);
    tracing::debug!(error = e.code(), tenant = id, request_id = ?request_id, "rejected");
    if snap.metrics {
        ex.tenant
            .map_or(&snap.unknown_stats, |t| &t.stats)
            .record_error(e);
    }
    if let ProxyError::RateLimited {
        retry_after,
        policy,
        ..
    } = e
    {
        ex.rate_limit = Some(limits::exhausted_header(policy, *retry_after));
    }
    e.to_response(id, request_id)
}

async fn proxy<'s>(
    mut req: Request<ClientBody>,
    snap: &'s Snapshot,
    ctx: &ConnCtx,
    request_id: &HeaderValue,
    ex: &mut Exchange<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if req.method() == http::Method::CONNECT {
        // A tunnel to the authority it names is a forward proxy's job; the upstream
        // would get a request line it cannot parse (HTTP/1.1 `CONNECT /`).
        return Err(ProxyError::MethodNotAllowed);
    }
    if req.version() < Version::HTTP_2 {
        if let Some(coding) = unsupported_transfer_coding(req.headers()) {
            return Err(ProxyError::UnsupportedTransferCoding { coding });
        }
        if let Some(why) = host_problem(&req) {
            return Err(ProxyError::MalformedRequest { why });
        }
    }
    if let Some(port) = ctx.redirect_to {
        if let Some(resp) = redirect_to_https(&req, port) {
            check_header_size(
                req.method(),
                req.uri(),
                req.headers(),
                snap.max_header_bytes,
            )?;
            return Ok(resp);
        }
    }
    // A WebSocket handshake keeps `Upgrade` / `Connection`; the client's side of the
    // tunnel is taken before the request is consumed.
    let websocket = websocket_upgrade(&req).map(|token| (token, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    // Read before `commit` makes the request HTTP/1.1 or HTTP/2 for the upstream.
    let client_h2 = parts.version == Version::HTTP_2;
    let routed = route(&parts, snap, ctx, ex)?;
    let tenant = routed.tenant;
    let upstream = routed.upstream;
    let (target, mut added) = commit(
        routed,
        &mut parts,
        snap,
        ctx,
        request_id,
        ex,
        websocket.as_ref().map(|w| &w.0),
    )
    .await?;
    let mut body = RequestBody::new(
        body,
        tenant.limits.max_body,
        snap.metrics.then(|| tenant.stats.clone()),
        ex.bytes_in.clone(),
    );
    if !http_body::Body::is_end_stream(&body) {
        body.guard_trailers(snap.tenancy.guarded.clone());
    }
    let failover = upstream::Failover::new(upstream, snap.metrics.then_some(&*tenant.stats));
    // Every method goes this way (`CONNECT` was refused above); upgrades go through
    // hyper's client, which hands over the upgraded connection.
    if websocket.is_none() && crate::h1::enabled() && crate::h1::plain_h1(upstream) {
        // The fast path's exchange, over its pool of raw sockets.
        return crate::h1::fetch(
            &ctx.client,
            &parts,
            &added,
            body,
            &target,
            failover,
            crate::h1::Options {
                timeout: tenant.request_timeout,
                body_idle: snap.body_idle_timeout,
                trailers: client_h2,
            },
        )
        .await;
    }
    added.apply(&mut parts.headers);
    let (mut resp, lease) = upstream::send(
        &ctx.client,
        Request::from_parts(parts, body),
        &target,
        failover,
        tenant.request_timeout,
        snap.body_idle_timeout,
    )
    .await?;
    if websocket.is_none() && resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        // An upgrade nobody asked for: what follows on that connection is not HTTP.
        return Err(ProxyError::UpstreamError {
            upstream: upstream.name.clone(),
            failure: crate::error::UpstreamFailure::Protocol,
        });
    }
    if let Some((_, client)) =
        websocket.filter(|_| resp.status() == http::StatusCode::SWITCHING_PROTOCOLS)
    {
        // The upstream accepted: splice the two upgraded connections. The tunnel holds
        // the in-flight slot for as long as it is open; its connection is never pooled.
        let upstream_side = hyper::upgrade::on(&mut resp);
        let permit = ex.permit.take();
        let tenant_id = tenant.id.clone();
        let idle = snap.tunnel_idle_timeout;
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<Finish>();
        tokio::spawn(async move {
            let _permit = permit;
            let (mut from_client, mut to_client) = (0, 0);
            match tokio::try_join!(client, upstream_side) {
                Ok((c, u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let (moved, r) = splice(&mut c, &mut u, idle).await;
                    (from_client, to_client) = moved;
                    if let Err(e) = r {
                        tracing::debug!(tenant = %tenant_id, error = %e, "websocket tunnel ended with an error");
                    }
                }
                Err(e) => {
                    tracing::debug!(tenant = %tenant_id, error = %e, "websocket upgrade failed");
                }
            }
            if let Ok(mut finish) = end_rx.await {
                tunnel_ended(&mut finish, from_client, to_client);
            }
        });
        drop(lease);
        let (mut rparts, _) = resp.into_parts();
        let (connection, upgrade) = (
            rparts.headers.remove(http::header::CONNECTION),
            rparts.headers.remove(http::header::UPGRADE),
        );
        headers::rewrite_response(rparts.status, &mut rparts.headers);
        if let (Some(c), Some(u)) = (connection, upgrade) {
            rparts.headers.insert(http::header::CONNECTION, c);
            rparts.headers.insert(http::header::UPGRADE, u);
        }
        rparts
            .extensions
            .insert(TunnelEnd(Arc::new(std::sync::Mutex::new(Some(end_tx)))));
        return Ok(Response::from_parts(
            rparts,
            ProxyBody::full(bytes::Bytes::new()),
        ));
    }
    let (mut rparts, rbody) = resp.into_parts();
    headers::rewrite_response(rparts.status, &mut rparts.headers);
    Ok(Response::from_parts(
        rparts,
        ProxyBody::upstream(rbody, lease, snap.body_idle_timeout, &upstream.name),
    ))
}

/// What RFC 9112 §3.2 makes a 400 about an HTTP/1.x request's `Host`: more than one,
/// or none in HTTP/1.1 when the target does not name the authority either (as nginx,
/// an absolute-form target stands in for it). The fast path checks the same while it
/// parses (`h1::wire::parse_request`).
fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    // The authority form (`GET host:80`) is CONNECT's alone (RFC 9112 §3.2.3), and
    // CONNECT never gets here; hyper reads it as a path of `/`.
    if req.uri().scheme().is_none() && req.uri().authority().is_some() {
        return Some("a request target in authority form (for CONNECT only)");
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("more than one Host header"),
        (None, _) if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            Some("no Host header")
        }
        _ => None,
    }
}

/// Copies both ways until either side closes, or until no byte has moved either way
/// for `idle` (noticed within a quarter of it): a peer that vanished without closing
/// (a NAT that dropped the flow) would otherwise hold the tunnel, and the tenant's
/// in-flight slot, for ever. Returns the bytes read from `a` and from `b`, however
/// it ended.
async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
) -> ((u64, u64), std::io::Result<()>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (from_a, from_b) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut a, mut b) = (
        Counted {
            io: a,
            moved: &from_a,
        },
        Counted {
            io: b,
            moved: &from_b,
        },
    );
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    let moved = || {
        (
            from_a.load(Ordering::Relaxed),
            from_b.load(Ordering::Relaxed),
        )
    };
    let Some(idle) = idle else {
        let r = copy.await.map(|_| ());
        return (moved(), r);
    };
    tokio::pin!(copy);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        tokio::select! {
            r = &mut copy => return (moved(), r.map(|_| ())),
            _ = tick.tick() => {
                let (x, y) = moved();
                let now = x + y;
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if since.elapsed() >= idle {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no bytes either way for {idle:?} (server.tunnel_idle_timeout)"),
                    );
                    return (moved(), Err(e));
                }
            }
        }
    }
}

/// One side of a tunnel, counting the bytes read from it.
struct Counted<'a, T> {
    io: &'a mut T,
    moved: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// A request that passed the checks that have no side effects: its tenant, the
/// upstream its path routes to.
pub(crate) struct Routed<'s> {
    pub tenant: &'s Tenant,
    pub upstream: &'s Arc<crate::snapshot::Upstream>,
    claims: Option<Box<crate::jwt::Claims>>,
    path_and_query: PathAndQuery,
}

/// The first stage, without side effects (nothing is counted or charged): head
/// size, tenant resolution, credentials, the route. A caller may still decide not
/// to serve the request itself after this.
pub(crate) fn route<'s>(
    parts: &http::request::Parts,
    snap: &'s Snapshot,
    ctx: &ConnCtx,
    ex: &mut Exchange<'s>,
) -> Result<Routed<'s>, ProxyError> {
    check_header_size(
        &parts.method,
        &parts.uri,
        &parts.headers,
        snap.max_header_bytes,
    )?;
    let tls = ctx.tls.as_deref();
    let sni = tls.and_then(|t| t.sni.as_deref());
    let resolved = tenant::resolve(snap, &parts.uri, &parts.headers, sni)?;
    let tenant = snap.tenant(resolved.tenant);
    ex.tenant = Some(tenant);
    if let Some(side) = tenant.tls.as_ref().filter(|s| s.mtls) {
        // Client certificates are verified per tenant at the handshake: a connection
        // made for another name (or over plain HTTP) never proved one for this tenant.
        if tls.and_then(|t| t.mtls_tenant.as_deref()) != Some(&*tenant.id) {
            return Err(ProxyError::Misdirected {
                why: "it requires a client certificate; connect over TLS with its host name",
            });
        }
        // Nor does one verified by a client CA the tenant has since replaced: the
        // client must prove its certificate again (421 tells it to reconnect).
        if tls.is_some_and(|t| t.mtls_ca != side.client_ca) {
            return Err(ProxyError::Misdirected {
                why: "its client CA changed since this connection was verified; reconnect",
            });
        }
    }
    let credential = (tenant.require_api_key && resolved.api_key)
        || (tenant.require_jwt && resolved.claims.is_some());
    if (tenant.require_api_key || tenant.require_jwt) && !credential {
        return Err(ProxyError::CredentialsRequired);
    }
    let path_and_query = forwarded_path(&parts.uri, resolved.strip_path);
    let upstream = tenant.route(path_and_query.path());
    Ok(Routed {
        tenant,
        upstream,
        claims: resolved.claims,
        path_and_query,
    })
}

/// The second stage: admission (rate, in-flight, declared body size), the quota,
/// then the head rewritten for the upstream. Returns the target chosen and the
/// gateway's headers not yet in the map (none when the request's upstream, protocol
/// or forwarded claims needed them there): the caller writes them with the head or
/// applies them.
pub(crate) async fn commit<'s, 'a>(
    routed: Routed<'s>,
    parts: &mut http::request::Parts,
    snap: &'s Snapshot,
    ctx: &'a ConnCtx,
    request_id: &'a HeaderValue,
    ex: &mut Exchange<'s>,
    websocket: Option<&HeaderValue>,
) -> Result<(Authority, headers::Added<'a>), ProxyError>
where
    's: 'a,
{
    let Routed {
        tenant,
        upstream,
        claims,
        path_and_query,
    } = routed;
    ex.permit = Some(admit(snap, tenant, ctx, &parts.headers, ex)?);
    // Quotas are charged last, so only requests that pass every other check count.
    crate::quota::charge(snap, tenant).await?;

    ex.upstream = Some(upstream.name.clone());
    let target = upstream.pick().clone();
    let tls = ctx.tls.as_deref();
    let mut added = headers::rewrite_request(
        &mut parts.headers,
        parts.uri.authority(),
        &Forward {
            tenancy: &snap.tenancy,
            tenant,
            peer_ip: &ctx.peer_ip,
            request_id,
            https: tls.is_some(),
        },
    );
    // The hop-by-hop `TE` is gone; only HTTP/2 upstreams get it back.
    let te_trailers = upstream.transport.h2 && added.te_trailers();
    let cert_header = tenant
        .tls
        .as_ref()
        .and_then(|s| s.forward_client_cert.as_ref());
    if upstream.transport.h2
        || websocket.is_some()
        || cert_header.is_some()
        || !tenant.forward_claims.is_empty()
    {
        // What follows reads or replaces headers in the map: the gateway's go in first,
        // in the order they always had.
        added.apply(&mut parts.headers);
    }
    if let Some(header) = cert_header {
        parts.headers.remove(header);
        if let Some(subject) = tls.and_then(|t| t.client_subject.clone()) {
            parts.headers.insert(header.clone(), subject);
        }
    }
    forward_claims(&mut parts.headers, tenant, claims.as_deref());
    if !added.has_host() && !parts.headers.contains_key(http::header::HOST) {
        // An HTTP/1.0 client without `Host`, resolved by header or path: HTTP/1.1
        // upstreams need one.
        if let Ok(v) = HeaderValue::from_str(target.as_str()) {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    if let Some(token) = websocket {
        parts.headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        parts.headers.insert(http::header::UPGRADE, token.clone());
    }
    if upstream.transport.h2 {
        // HTTP/2 names the target in `:scheme` / `:authority`, not `Host`; gRPC needs
        // `te: trailers`, the one TE value HTTP/2 allows.
        let host = parts.headers.remove(http::header::HOST);
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
            .unwrap_or_else(|| target.clone());
        let scheme = if upstream.transport.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        // Scheme, authority and path are each valid already, so the parts always join;
        // the origin form is a harmless fallback.
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme);
        uri.authority = Some(authority);
        uri.path_and_query = Some(path_and_query.clone());
        parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from(path_and_query));
        parts.version = Version::HTTP_2;
        if te_trailers {
            parts
                .headers
                .insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
    } else {
        // Origin form on the wire; the target is chosen by the connection.
        parts.uri = Uri::from(path_and_query);
        parts.version = Version::HTTP_11;
    }
    Ok((target, added))
}

/// The `Upgrade` value of an HTTP/1.1 WebSocket handshake (`Connection: upgrade` and
/// `Upgrade: websocket`); `None` for every other request.
fn websocket_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || req.method() != http::Method::GET {
        return None;
    }
    let h = req.headers();
    let connection_upgrade = h.get_all(http::header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let upgrade = h.get(http::header::UPGRADE)?;
    let websocket = upgrade.to_str().is_ok_and(|s| {
        s.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
    });
    (connection_upgrade && websocket).then(|| upgrade.clone())
}

/// `server.redirect_http`: 308 to the same host and path on the https listener.
/// `None` (the request is served as usual) when it names no host.
fn redirect_to_https<B>(req: &Request<B>, port: u16) -> Option<Response<ProxyBody>> {
    let authority: http::uri::Authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => req
            .headers()
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .parse()
            .ok()?,
    };
    let host = authority.host();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let location = HeaderValue::from_str(&location).ok()?;
    let mut resp = Response::new(ProxyBody::full(bytes::Bytes::new()));
    *resp.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(http::header::LOCATION, location);
    Some(resp)
}

/// Copies the verified claims the tenant names into request headers; client copies of
/// those headers are removed whether or not the token carries the claim.
fn forward_claims(
    headers: &mut http::HeaderMap,
    tenant: &Tenant,
    claims: Option<&crate::jwt::Claims>,
) {
    for (claim, header) in &tenant.forward_claims {
        headers.remove(header);
        let value = claims.and_then(|c| c.get(&**claim)).and_then(|v| match v {
            serde_json::Value::String(s) => HeaderValue::from_str(s).ok(),
            serde_json::Value::Number(n) => HeaderValue::from_str(&n.to_string()).ok(),
            serde_json::Value::Bool(b) => {
                Some(HeaderValue::from_static(if *b { "true" } else { "false" }))
            }
            _ => None,
        });
        if let Some(v) = value {
            headers.insert(header.clone(), v);
        }
    }
}

/// Status → rate → in-flight → declared body size, before anything is routed. Only
/// known tenants get here, so nothing here creates state for unknown ones.
fn admit(
    snap: &Snapshot,
    tenant: &Tenant,
    ctx: &ConnCtx,
    headers: &http::HeaderMap,
    ex: &mut Exchange<'_>,
) -> Result<Permit, ProxyError> {
    if tenant.status == TenantStatus::Suspended {
        return Err(ProxyError::TenantSuspended);
    }
    let limits = &tenant.limits;
    let client = limits
        .has_client_rate()
        .then(|| limits::client_ip(ctx.peer, headers, &snap.trusted_proxies));
    let rate = limits.check_rate(&tenant.stats, client)?;
    ex.rate_limit = rate.header();
    let permit = limits.acquire(&tenant.stats)?;
    limits.check_content_length(headers)?;
    Ok(permit)
}

/// A request transfer coding other than `chunked` (`Transfer-Encoding: gzip, chunked`):
/// the HTTP/1.1 server undoes only the chunking, and the upstream would get the
/// still-coded bytes with nothing saying so (RFC 9112 §6.1: answer 501). HTTP/2 has
/// no `Transfer-Encoding`; its server refuses the header as malformed.
fn unsupported_transfer_coding(headers: &http::HeaderMap) -> Option<Box<str>> {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"))
        // Named in the error message: no more of the client's bytes than a name needs.
        .map(|c| String::from_utf8_lossy(&c[..c.len().min(64)]).into())
}

/// The request head's size as the client sent it (request line and header lines), so
/// the same limit holds for HTTP/1.1 and HTTP/2.
fn check_header_size(
    method: &http::Method,
    uri: &Uri,
    headers: &http::HeaderMap,
    limit: u64,
) -> Result<(), ProxyError> {
    let mut size = (method.as_str().len() + uri.to_string_len() + 12) as u64;
    for (name, value) in headers {
        size += (name.as_str().len() + value.len() + 4) as u64;
    }
    if size > limit {
        return Err(ProxyError::HeadersTooLarge { size, limit });
    }
    Ok(())
}

trait UriLen {
    fn to_string_len(&self) -> usize;
}

impl UriLen for Uri {
    fn to_string_len(&self) -> usize {
        self.authority().map_or(0, |a| a.as_str().len())
            + self.path_and_query().map_or(1, |p| p.as_str().len())
    }
}

/// The path and query sent upstream: the original, minus `/t/{tenant}` when the path
/// source named the tenant.
fn forwarded_path(uri: &Uri, strip: Option<usize>) -> PathAndQuery {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some(n) = strip else { return original };
    let rest = original.path().get(n..).unwrap_or("");
    let mut s = String::with_capacity(original.as_str().len() + 1);
    if !rest.starts_with('/') {
        s.push('/');
    }
    s.push_str(rest);
    if let Some(q) = original.query() {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s).unwrap_or(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_strip() {
        let u: Uri = "/t/acme/reports/1?x=1".parse().unwrap();
        assert_eq!(forwarded_path(&u, Some(7)).as_str(), "/reports/1?x=1");
        let u: Uri = "/t/acme".parse().unwrap();
        assert_eq!(forwarded_path(&u, Some(7)).as_str(), "/");
        let u: Uri = "/t/acme?q".parse().unwrap();
        assert_eq!(forwarded_path(&u, Some(7)).as_str(), "/?q");
        let u: Uri = "/plain?q".parse().unwrap();
        assert_eq!(forwarded_path(&u, None).as_str(), "/plain?q");
    }
}
