//! Per-tenant limits: rate and burst (GCRA), an optional rate per client IP inside the
//! tenant (`governor`'s keyed limiter), in-flight caps, and the request body cap.
//!
//! The state that must outlive a reload (a tenant's bucket, its per-client buckets,
//! its in-flight count) sits behind `Arc`s that [`TenantLimits::build`] takes over
//! from the previous snapshot whenever the limit itself is unchanged. The tenant's own
//! bucket is one word in its `TenantStats`, on the cache line every request writes
//! anyway: `governor`'s direct limiter was an allocation of its own, two more lines
//! to fetch per request when many tenants take turns (BENCHMARKS.md, goal 2).

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::Reference as _;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::config::{Limits, OnStoreFailure, Scope};
use crate::error::ProxyError;
use crate::headers::{Guarded, X_FORWARDED_FOR};
use crate::metrics::TenantStats;

type ClientBuckets =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// One clock for every limiter: creating a clock probes the CPU (CPUID, which traps in a
/// VM), and a snapshot with 10,000 rate-limited tenants would create 10,000 of them.
fn clock() -> DefaultClock {
    static CLOCK: std::sync::OnceLock<DefaultClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default).clone()
}

/// Nanoseconds since the first call, on the limiters' clock; never 0 after it (0 is a
/// fresh bucket's state).
fn now_nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<(DefaultClock, <DefaultClock as Clock>::Instant)> =
        std::sync::OnceLock::new();
    let (clock, origin) = ORIGIN.get_or_init(|| {
        let c = clock();
        let origin = c.now();
        (c, origin)
    });
    let since: Duration = clock.now().duration_since(*origin).into();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX) | 1
}

/// A tenant's bucket: the generic cell rate algorithm as `governor` runs it, with its
/// state (the theoretical arrival time, in [`now_nanos`]) in the tenant's
/// `TenantStats`, slot `slot`. 32 bytes, as is `Option<Bucket>` (the niche of `t`): it
/// ends the tenant's second cache line (`snapshot::Tenant`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    /// Nanoseconds per request.
    t: NonZeroU64,
    /// How far ahead of now the arrival time may run: `t` × (burst − 1).
    tau: u64,
    /// The rate as configured (`Rate`), for headers and errors.
    per_second: f64,
    burst: u32,
    slot: u8,
}

impl Bucket {
    fn new(r: &Rate, slot: u8) -> Bucket {
        let t = u64::try_from(r.period().as_nanos()).unwrap_or(u64::MAX);
        let t = NonZeroU64::new(t).unwrap_or(NonZeroU64::MIN);
        Bucket {
            t,
            tau: t.get().saturating_mul(u64::from(r.burst - 1)),
            per_second: r.per_second,
            burst: r.burst,
            slot,
        }
    }

    fn rate(&self) -> Rate {
        Rate {
            per_second: self.per_second,
            burst: self.burst,
        }
    }

    /// The state of this bucket holding what `old` (in state `old_state`) has left
    /// now, up to this bucket's burst (0: full).
    fn carry(&self, old: &Bucket, old_state: u64) -> u64 {
        if old_state == 0 {
            return 0;
        }
        let now = now_nanos();
        // Time's worth of requests left: full is `tau + t` ahead of the arrival time.
        let old_full = old.tau.saturating_add(old.t.get());
        let left_ns = now
            .saturating_add(old_full)
            .saturating_sub(old_state.max(now));
        let left = (left_ns as f64 / old.t.get() as f64).min(f64::from(self.burst));
        let full = self.tau.saturating_add(self.t.get());
        let kept_ns = (left * self.t.get() as f64) as u64;
        now.saturating_add(full).saturating_sub(kept_ns).max(1)
    }

    /// Takes one request: the requests left in the burst, or how long until one is.
    fn take(&self, state: &AtomicU64) -> Result<u32, Duration> {
        let now = now_nanos();
        let mut seen = state.load(Ordering::Acquire);
        loop {
            let tat = if seen == 0 { now } else { seen };
            let earliest = tat.saturating_sub(self.tau);
            if now < earliest {
                return Err(Duration::from_nanos(earliest - now));
            }
            let t = self.t.get();
            let next = tat.max(now).saturating_add(t);
            match state.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let full = self.tau.saturating_add(t);
                    let left = now.saturating_add(full).saturating_sub(next).min(full);
                    return Ok(u32::try_from(left / t).unwrap_or(u32::MAX));
                }
                Err(actual) => seen = actual,
            }
        }
    }
}

/// A configured rate: requests per second and burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// `burst` defaults to one second's worth of requests (at least 1).
    fn new(per_second: Option<f64>, burst: Option<u64>) -> Option<Rate> {
        let per_second = per_second?;
        let burst = burst
            .unwrap_or(per_second.ceil() as u64)
            .clamp(1, u64::from(u32::MAX));
        Some(Rate {
            per_second,
            burst: burst as u32,
        })
    }

    /// The time per request; `Duration::MAX` when that does not fit (validation keeps
    /// rates at 1e-9 and above, so only as a guard against a panic).
    fn period(&self) -> Duration {
        Duration::try_from_secs_f64(1.0 / self.per_second).unwrap_or(Duration::MAX)
    }

    fn quota(&self) -> Quota {
        let period = self.period().max(Duration::from_nanos(1));
        Quota::with_period(period)
            .expect("the period is at least 1ns")
            .allow_burst(NonZeroU32::new(self.burst).expect("burst is at least 1"))
    }

    /// The window `w` of `RateLimit-Policy`: the time to earn a full burst, ≥ 1 s.
    fn window_secs(&self) -> u64 {
        ((f64::from(self.burst) / self.per_second).ceil() as u64).max(1)
    }

    /// Seconds until a bucket with `remaining` requests left is full again.
    fn reset_secs(&self, remaining: u32) -> u64 {
        (f64::from(self.burst.saturating_sub(remaining)) / self.per_second).ceil() as u64
    }
}

/// Held while a request is served, until its response body is finished or dropped.
/// The count lives beside the tenant's metric counters (`TenantStats::in_flight`), on
/// the cache line a request touches anyway, and is carried over reloads with them.
#[derive(Debug)]
pub struct Permit(Arc<TenantStats>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// One tenant's limits and limiter state. In the order a request reads them, for
/// `snapshot::Tenant`'s layout: the bucket ends the tenant's second cache line, the
/// rest of what a request reads fills the third.
#[repr(C)]
#[derive(Clone)]
pub struct TenantLimits {
    rate: Option<Bucket>,
    pub max_in_flight: Option<u64>,
    pub max_body: Option<u64>,
    /// Boxed: a pointer on the hot line, for a limit few tenants set.
    client_rate: Option<Box<(Rate, Arc<ClientBuckets>)>>,
    /// Quota counters and cluster leases; always carried over (see `quota.rs`).
    pub usage: Arc<crate::quota::Usage>,
    /// `limits.scope` and `limits.on_store_failure` (issue #9).
    pub scope: Scope,
    pub on_store_failure: OnStoreFailure,
    /// `RateLimit-Policy`, built once; `None` when the tenant has no rate limit. The
    /// HTTP/1.1 fast path writes `snapshot::Tenant::policy_line` instead.
    pub policy: Option<HeaderValue>,
}

/// How many bytes from the start of [`TenantLimits`] a request reads (up to and
/// including `on_store_failure`), for the layout test of `snapshot::Tenant`.
#[cfg(test)]
pub(crate) const HOT_BYTES: usize = std::mem::offset_of!(TenantLimits, on_store_failure) + 1;

impl fmt::Debug for TenantLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantLimits")
            .field("rate", &self.rate.as_ref().map(Bucket::rate))
            .field("client_rate", &self.client_rate.as_ref().map(|r| r.0))
            .field("max_in_flight", &self.max_in_flight)
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// The `RateLimit` header of an admitted request.
pub struct RateState {
    tenant: Option<(Rate, u32)>,
    client: Option<(Rate, u32)>,
}

impl TenantLimits {
    /// Builds a tenant's limits, taking over the buckets and the in-flight count of
    /// `previous` (the same tenant in the snapshot being replaced) where the limit is
    /// unchanged. The in-flight count always carries over: it counts requests that
    /// are still running. `stats` are the tenant's (carried over for as long as it
    /// exists): its bucket is there, in the slot `previous` used when the rate is the
    /// same, else in the other one, holding what was left of the old (`Bucket::carry`)
    /// — a slot no snapshot serving now reads, so a build that is then thrown away
    /// changes nothing.
    pub fn build(
        limits: &Limits,
        previous: Option<&TenantLimits>,
        stats: &TenantStats,
    ) -> TenantLimits {
        let rate = Rate::new(limits.requests_per_second, limits.burst).map(|r| {
            match previous.and_then(|p| p.rate) {
                Some(b) if b.rate() == r => b,
                before => {
                    let slot = before.map_or(0, |b| b.slot ^ 1);
                    let new = Bucket::new(&r, slot);
                    // A new rate keeps the requests the tenant had left (up to the new
                    // burst), so no change — a cut mid-incident, a burst raised and
                    // lowered again — hands it a full bucket; a tenant that had no
                    // rate starts with a full one.
                    let state = before.map_or(0, |b| {
                        new.carry(
                            &b,
                            stats.bucket(usize::from(b.slot)).load(Ordering::Acquire),
                        )
                    });
                    stats
                        .bucket(usize::from(slot))
                        .store(state, Ordering::Release);
                    new
                }
            }
        });
        let client_rate = Rate::new(
            limits.per_client_requests_per_second,
            limits.per_client_burst,
        )
        .map(|r| {
            let buckets = previous
                .and_then(|p| p.client_rate.as_deref())
                .filter(|(old, _)| *old == r)
                .map(|(_, b)| b.clone())
                .unwrap_or_else(|| {
                    Arc::new(
                        RateLimiter::dashmap_with_clock(r.quota(), clock())
                            .with_middleware::<StateInformationMiddleware>(),
                    )
                });
            Box::new((r, buckets))
        });
        let mut policy = Vec::new();
        for (name, r) in [
            ("tenant", rate.as_ref().map(Bucket::rate)),
            ("client", client_rate.as_ref().map(|r| r.0)),
        ] {
            if let Some(r) = r {
                if !policy.is_empty() {
                    policy.extend_from_slice(b", ");
                }
                let _ = write!(policy, "\"{name}\";q={};w={}", r.burst, r.window_secs());
            }
        }
        TenantLimits {
            rate,
            client_rate,
            max_in_flight: limits.max_in_flight,
            max_body: limits.max_body,
            policy: (!policy.is_empty())
                .then(|| HeaderValue::from_bytes(&policy).expect("ASCII digits and names")),
            scope: limits.scope,
            on_store_failure: limits.on_store_failure,
            usage: previous.map(|p| p.usage.clone()).unwrap_or_default(),
        }
    }

    pub fn has_client_rate(&self) -> bool {
        self.client_rate.is_some()
    }

    /// Takes one request from the client's bucket (when per-client limits are set),
    /// then from the tenant's.
    pub fn check_rate(
        &self,
        stats: &TenantStats,
        client: Option<IpAddr>,
    ) -> Result<RateState, ProxyError> {
        let mut state = RateState {
            tenant: None,
            client: None,
        };
        if let (Some((rate, buckets)), Some(ip)) = (self.client_rate.as_deref(), client) {
            match buckets.check_key(&ip) {
                Ok(s) => state.client = Some((*rate, s.remaining_burst_capacity())),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(buckets.clock().now());
                    return Err(self.rate_limited(wait, "client", rate));
                }
            }
        }
        if let Some(bucket) = &self.rate {
            let rate = &bucket.rate();
            // Cluster scope: a token of the fleet's bucket, leased to this instance;
            // this instance's own bucket only while the store is unavailable ("open").
            if self.scope == Scope::Cluster {
                match self.usage.take_rate_token() {
                    crate::quota::Lease::Taken(left) => {
                        state.tenant = Some((*rate, left));
                        return Ok(state);
                    }
                    crate::quota::Lease::Empty => {
                        return Err(self.rate_limited(rate.period(), "tenant", rate));
                    }
                    crate::quota::Lease::Stale
                        if self.on_store_failure == OnStoreFailure::Closed =>
                    {
                        return Err(ProxyError::StoreUnavailable);
                    }
                    crate::quota::Lease::Stale => {}
                }
            }
            match bucket.take(stats.bucket(usize::from(bucket.slot))) {
                Ok(left) => state.tenant = Some((*rate, left)),
                Err(wait) => return Err(self.rate_limited(wait, "tenant", rate)),
            }
        }
        Ok(state)
    }

    fn rate_limited(&self, wait: Duration, policy: &'static str, rate: &Rate) -> ProxyError {
        let retry_after = wait
            .as_secs()
            .saturating_add(u64::from(wait.subsec_nanos() > 0));
        ProxyError::RateLimited {
            retry_after: retry_after.max(1),
            policy,
            limit: rate.per_second,
        }
    }

    /// Counts the request in flight in `stats` (the tenant's), or refuses it when the
    /// tenant is at its cap.
    pub fn acquire(&self, stats: &Arc<TenantStats>) -> Result<Permit, ProxyError> {
        let now = stats.enter();
        let permit = Permit(stats.clone());
        match self.max_in_flight {
            Some(max) if now > max => Err(ProxyError::TooManyInFlight { limit: max }),
            _ => Ok(permit),
        }
    }

    /// Refuses a body whose declared length is over the cap.
    pub fn check_content_length(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        let (Some(limit), Some(len)) = (self.max_body, headers.get(http::header::CONTENT_LENGTH))
        else {
            return Ok(());
        };
        match len.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(n) if n > limit => Err(ProxyError::BodyTooLarge { limit }),
            _ => Ok(()),
        }
    }

    /// Drops per-client buckets that are full again (indistinguishable from new).
    pub fn prune(&self) -> usize {
        match self.client_rate.as_deref() {
            Some((_, buckets)) => {
                buckets.retain_recent();
                buckets.shrink_to_fit();
                buckets.len()
            }
            None => 0,
        }
    }

    /// Number of per-client buckets held now.
    pub fn client_keys(&self) -> usize {
        self.client_rate.as_deref().map_or(0, |(_, b)| b.len())
    }

    /// Whether this tenant's bucket is the very one `other` uses (for tests of reload
    /// carry-over; both built with the same stats).
    pub fn shares_bucket_with(&self, other: &TenantLimits) -> bool {
        match (&self.rate, &other.rate) {
            (Some(a), Some(b)) => a.slot == b.slot,
            _ => false,
        }
    }
}

impl RateState {
    /// `RateLimit: "tenant";r=…;t=…[, "client";r=…;t=…]`, or `None` without rate limits.
    pub fn header(&self) -> Option<HeaderValue> {
        if self.tenant.is_none() && self.client.is_none() {
            return None;
        }
        crate::headers::small_value(|buf| {
            // Per request: digits through `itoa`, not `core::fmt` (0.5 % of the proxy's
            // CPU under the load benchmark went to formatting machinery).
            let mut digits = itoa::Buffer::new();
            for (name, s) in [("tenant", self.tenant), ("client", self.client)] {
                if let Some((rate, left)) = s {
                    if !buf.is_empty() {
                        buf.extend_from_slice(b", ");
                    }
                    buf.extend_from_slice(b"\"");
                    buf.extend_from_slice(name.as_bytes());
                    buf.extend_from_slice(b"\";r=");
                    buf.extend_from_slice(digits.format(left).as_bytes());
                    buf.extend_from_slice(b";t=");
                    buf.extend_from_slice(digits.format(rate.reset_secs(left)).as_bytes());
                }
            }
        })
    }
}

/// The `RateLimit` header of a refused request: nothing left until `retry_after`.
pub fn exhausted_header(policy: &str, retry_after: u64) -> HeaderValue {
    let mut buf = Vec::with_capacity(32);
    let _ = write!(buf, "\"{policy}\";r=0;t={retry_after}");
    HeaderValue::from_bytes(&buf).expect("ASCII digits and names")
}

/// The client address for per-client limits: the peer, or — when the peer is a
/// trusted proxy — the first `x-forwarded-for` hop, from the right, that is not one.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut last = peer;
    let values: Vec<&HeaderValue> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
    for v in values.iter().rev() {
        let Ok(s) = v.to_str() else { return last };
        for hop in s.rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                return last;
            };
            if !is_trusted(&ip) {
                return ip;
            }
            last = ip;
        }
    }
    last
}

/// Why a request body stopped.
#[derive(Debug)]
pub enum RequestBodyError {
    /// The body crossed `max_body`; nothing past the cap was forwarded.
    TooLarge { limit: u64 },
    /// The client's side of the body failed (e.g. it went away mid-upload).
    Client(Box<dyn StdError + Send + Sync>),
}

impl fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestBodyError::TooLarge { limit } => {
                write!(f, "request body is over the {limit}-byte limit")
            }
            RequestBodyError::Client(e) => write!(f, "client body error: {e}"),
        }
    }
}

impl RequestBodyError {
    /// The gateway's answer to the client whose body this was.
    pub fn to_error(&self) -> ProxyError {
        match self {
            RequestBodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
            RequestBodyError::Client(_) => ProxyError::BadRequestBody,
        }
    }
}

impl StdError for RequestBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            RequestBodyError::TooLarge { .. } => None,
            RequestBodyError::Client(e) => Some(&**e),
        }
    }
}

/// How a request body's upload is going, for the wait for the response head: the
/// upstream's `request_timeout` starts when the upload has ended (an upload may take
/// as long as it keeps moving), and while it goes on the wait is bounded by
/// `server.body_idle_timeout` of no progress instead — the client sending nothing
/// (408 `request_body_timeout`) or the upstream taking nothing (504).
///
/// Written by whatever takes the body from the client (`RequestBody`, the fast path's
/// copy), read by whatever waits for the head; atomics, so either may be on another
/// task. Made only for requests that have a body to send.
#[derive(Debug)]
pub struct Upload {
    /// Nanoseconds since [`clock_base`] of the last progress — a piece taken from the
    /// client — or of the end.
    last: AtomicU64,
    ended: std::sync::atomic::AtomicBool,
    /// Waiting for the client to send more (rather than for the upstream to take it).
    on_client: std::sync::atomic::AtomicBool,
}

/// When the response head is due, given how the upload is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadDue {
    /// Not before this: wait on (and ask again then).
    At(tokio::time::Instant),
    /// The upload ended `request_timeout` ago with no head.
    Timeout,
    /// The upload made no progress for `body_idle_timeout`, waiting on this side.
    Stalled(crate::h1::Stall),
}

fn clock_base() -> tokio::time::Instant {
    static BASE: std::sync::LazyLock<tokio::time::Instant> =
        std::sync::LazyLock::new(tokio::time::Instant::now);
    *BASE
}

/// How long since [`clock_base`]: a monotonic time that fits an atomic integer, for
/// state shared across tasks and workers (`Upload`, the upstream targets passed over
/// in `snapshot::Upstream`).
pub(crate) fn since_base() -> Duration {
    tokio::time::Instant::now().saturating_duration_since(clock_base())
}

impl Upload {
    pub fn new() -> Upload {
        let u = Upload {
            last: AtomicU64::new(0),
            ended: std::sync::atomic::AtomicBool::new(false),
            on_client: std::sync::atomic::AtomicBool::new(true),
        };
        u.progress();
        u
    }

    /// A piece of the body was taken from the client.
    pub fn progress(&self) {
        self.last.store(
            u64::try_from(since_base().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Whether the uploader now waits for the client (`true`) or for the upstream.
    pub fn waiting_on_client(&self, yes: bool) {
        self.on_client.store(yes, Ordering::Relaxed);
    }

    /// The whole body has been taken (or the upstream stopped taking it): the head is
    /// due `request_timeout` from now.
    pub fn end(&self) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            self.progress();
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// When the head is due at `now`, with `request_timeout` and `body_idle_timeout`.
    pub fn head_due(
        &self,
        now: tokio::time::Instant,
        timeout: Duration,
        idle: Option<Duration>,
    ) -> HeadDue {
        let last = clock_base() + Duration::from_nanos(self.last.load(Ordering::Relaxed));
        if self.is_ended() {
            let due = last + timeout;
            return if due > now {
                HeadDue::At(due)
            } else {
                HeadDue::Timeout
            };
        }
        let Some(idle) = idle else {
            // No bound on a stalled upload ("0s"): look again a timeout from now.
            return HeadDue::At(now + timeout);
        };
        let due = last + idle;
        if due > now {
            HeadDue::At(due)
        } else if self.on_client.load(Ordering::Relaxed) {
            HeadDue::Stalled(crate::h1::Stall::Client)
        } else {
            HeadDue::Stalled(crate::h1::Stall::Upstream)
        }
    }
}

impl Default for Upload {
    fn default() -> Self {
        Upload::new()
    }
}

/// Out of line: only requests with a body to send have one, and `RequestBody::new`,
/// made for every request, stays small enough to be inlined.
#[cold]
#[inline(never)]
fn new_upload() -> Arc<Upload> {
    Arc::new(Upload::new())
}

/// The client's request body on its way upstream, stopped at `max_body`, counted
/// into the tenant's metrics (and the access-log record, when there is one) as it is
/// taken — except an HTTP/2 server's, which counts what arrives on the stream.
pub struct RequestBody {
    inner: ClientBody,
    limit: u64,
    seen: u64,
    stats: Option<Arc<TenantStats>>,
    bytes_in: Option<Arc<AtomicU64>>,
    /// For a body with something to send: how its upload goes.
    upload: Option<Arc<Upload>>,
    /// Which of the client's trailer fields go on; with none, none do.
    trailers: Option<Arc<Guarded>>,
}

impl RequestBody {
    pub fn new(
        inner: ClientBody,
        limit: Option<u64>,
        stats: Option<Arc<TenantStats>>,
        bytes_in: Option<Arc<AtomicU64>>,
    ) -> RequestBody {
        let (stats, bytes_in) = match &inner {
            // The HTTP/2 server counts what it receives on the stream itself, taken
            // upstream or not.
            ClientBody::H2(b) => {
                b.count_received(stats, bytes_in);
                (None, None)
            }
            _ => (stats, bytes_in),
        };
        let mut body = RequestBody {
            inner,
            limit: limit.unwrap_or(u64::MAX),
            seen: 0,
            stats,
            bytes_in,
            upload: None,
            trailers: None,
        };
        if !body.is_end_stream() {
            body.upload = Some(new_upload());
        }
        body
    }

    /// A body with nothing in it: a request sent again whose body was empty.
    pub fn empty() -> RequestBody {
        RequestBody::new(ClientBody::Empty, None, None, None)
    }

    /// A body that passes on what `inner` yields (counted and checked there) and
    /// adds nothing of its own.
    fn wrapping(inner: ClientBody) -> RequestBody {
        RequestBody {
            inner,
            limit: u64::MAX,
            seen: 0,
            stats: None,
            bytes_in: None,
            upload: None,
            trailers: None,
        }
    }

    /// `body`, with a copy of what is taken of it (up to `max` bytes) kept in the
    /// returned [`Recording`], for [`RequestBody::replay`].
    pub fn recorded(body: RequestBody, max: usize) -> (RequestBody, Arc<Mutex<Recording>>) {
        let rec = Arc::new(Mutex::new(Recording {
            body: Some(body),
            sent: VecDeque::new(),
            size: 0,
            max,
            over: false,
        }));
        (
            RequestBody::wrapping(ClientBody::Recorded(rec.clone())),
            rec,
        )
    }

    /// The body to send again: what was taken of the recorded one, then the rest of
    /// it (which the first sending gives up); `None` when more was taken than kept.
    pub fn replay(rec: &Mutex<Recording>) -> Option<RequestBody> {
        let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
        if r.over {
            return None;
        }
        let front = std::mem::take(&mut r.sent);
        let rest = r.body.take().filter(|b| !b.is_end_stream()).map(Box::new);
        Some(RequestBody::wrapping(ClientBody::Taken(front, rest)))
    }

    /// How the upload goes; `None` for a body with nothing to send.
    pub fn upload(&self) -> Option<Arc<Upload>> {
        self.upload.clone()
    }

    /// Lets the client's trailer fields through, those `guarded` passes
    /// (`Guarded::trailer_passes`); until then a trailer section goes on empty.
    pub fn guard_trailers(&mut self, guarded: Arc<Guarded>) {
        self.trailers = Some(guarded);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        if let ClientBody::Recorded(rec) = &this.inner {
            let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
            let r = &mut *r;
            let Some(body) = &mut r.body else {
                return Poll::Ready(None);
            };
            let polled = Pin::new(body).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                r.record(frame);
            }
            return polled;
        }
        if let ClientBody::Taken(front, rest) = &mut this.inner {
            // Counted, checked and filtered as they were first taken (and `rest`
            // does all that itself).
            if let Some(frame) = front.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            return match rest {
                Some(rest) => Pin::new(&mut **rest).poll_frame(cx),
                None => Poll::Ready(None),
            };
        }
        let polled = match &mut this.inner {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(|e| Box::new(e) as _),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(|e| Box::new(e) as _),
            ClientBody::Empty | ClientBody::Taken(..) | ClientBody::Recorded(_) => {
                Poll::Ready(None)
            }
        };
        if let Some(u) = &this.upload {
            match &polled {
                Poll::Pending => u.waiting_on_client(true),
                Poll::Ready(Some(Ok(_))) if !this.inner.ended() => {
                    u.waiting_on_client(false);
                    u.progress();
                }
                Poll::Ready(_) => {
                    u.waiting_on_client(false);
                    u.end();
                }
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.seen += n;
                    if let Some(stats) = &this.stats {
                        stats.add_request_bytes(n);
                    }
                    if let Some(b) = &this.bytes_in {
                        b.fetch_add(n, Ordering::Relaxed);
                    }
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                            limit: this.limit,
                        })));
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    // Only fields that pass go upstream: a client's `x-tenant-id`
                    // in a trailer must not reach a backend that merges trailers
                    // into its headers.
                    let mut kept = HeaderMap::new();
                    if let Some(g) = &this.trailers {
                        for (name, value) in trailers {
                            if g.trailer_passes(name) {
                                kept.append(name, value.clone());
                            }
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(kept))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Taken(front, None) => SizeHint::with_exact(
                front
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .sum(),
            ),
            ClientBody::Taken(..) => SizeHint::default(),
            ClientBody::Recorded(rec) => {
                let r = rec.lock().unwrap_or_else(|e| e.into_inner());
                r.body
                    .as_ref()
                    .map_or(SizeHint::with_exact(0), |b| b.size_hint())
            }
        }
    }
}

/// A client's request body as the server that read the head hands it over.
pub enum ClientBody {
    /// hyper's server (HTTP/1.1 connections it serves, `BULKHEAD_H2=hyper`).
    Hyper(Incoming),
    /// The gateway's HTTP/2 server (`crate::h2`).
    H2(crate::h2::RecvBody),
    /// A request without a body (HTTP/2 HEADERS with END_STREAM).
    Empty,
    /// Frames already taken from the client's body (counted and checked as they
    /// were), then the rest of it, if any: see [`RequestBody::replay`].
    Taken(VecDeque<Frame<Bytes>>, Option<Box<RequestBody>>),
    /// A body whose frames are copied as they are taken: see [`RequestBody::recorded`].
    Recorded(Arc<Mutex<Recording>>),
}

/// What has been taken of a request body to an HTTP/2 upstream, kept so that a stream
/// the upstream refuses unprocessed can be sent again.
pub struct Recording {
    /// `None` once [`RequestBody::replay`] has taken it.
    body: Option<RequestBody>,
    sent: VecDeque<Frame<Bytes>>,
    size: usize,
    max: usize,
    /// More was taken than `max`: nothing is kept.
    over: bool,
}

impl Recording {
    fn record(&mut self, frame: &Frame<Bytes>) {
        if self.over {
            return;
        }
        self.size += frame.data_ref().map_or(0, Bytes::len);
        let copy = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(data), _) => Frame::data(data.clone()),
            (_, Some(trailers)) => Frame::trailers(trailers.clone()),
            _ => return,
        };
        if self.size > self.max {
            self.over = true;
            self.sent = VecDeque::new();
        } else {
            self.sent.push_back(copy);
        }
    }
}

impl ClientBody {
    /// Nothing more will come.
    fn ended(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
            ClientBody::Empty => true,
            ClientBody::Taken(front, rest) => {
                front.is_empty() && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
            ClientBody::Recorded(rec) => {
                let r = rec.lock().unwrap_or_else(|e| e.into_inner());
                r.body.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recording_keeps_what_went_up_to_its_bound() {
        use http_body_util::BodyExt;
        let source = || {
            let frames = (b'a'..=b'c').map(|c| Frame::data(Bytes::from(vec![c; 10])));
            RequestBody::wrapping(ClientBody::Taken(frames.collect(), None))
        };
        let data = |f: Option<Result<Frame<Bytes>, RequestBodyError>>| match f {
            Some(Ok(f)) => f.into_data().ok(),
            _ => None,
        };
        // Within the bound: what went, then the rest.
        let (mut body, rec) = RequestBody::recorded(source(), 25);
        assert_eq!(data(body.frame().await), Some(Bytes::from(vec![b'a'; 10])));
        let mut again = RequestBody::replay(&rec).expect("within the bound");
        let mut all = Vec::new();
        while let Some(d) = data(again.frame().await) {
            all.extend_from_slice(&d);
        }
        assert_eq!(all, [[b'a'; 10], [b'b'; 10], [b'c'; 10]].concat());
        assert!(http_body::Body::is_end_stream(&again));
        // Beyond it: nothing to send again.
        let (mut body, rec) = RequestBody::recorded(source(), 25);
        while data(body.frame().await).is_some() {}
        assert!(RequestBody::replay(&rec).is_none());
    }

    fn limits(rps: f64, burst: u64) -> Limits {
        Limits {
            requests_per_second: Some(rps),
            burst: Some(burst),
            ..Limits::default()
        }
    }

    #[test]
    fn burst_then_refused_with_retry_after() {
        let stats = TenantStats::default();
        let l = TenantLimits::build(&limits(1.0, 3), None, &stats);
        for _ in 0..3 {
            assert!(l.check_rate(&stats, None).is_ok());
        }
        match l.check_rate(&stats, None) {
            Err(ProxyError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 1),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert_eq!(l.policy.as_ref().unwrap(), "\"tenant\";q=3;w=3");
    }

    #[test]
    fn retry_after_follows_the_rate() {
        let stats = TenantStats::default();
        let l = TenantLimits::build(&limits(0.1, 1), None, &stats);
        assert!(l.check_rate(&stats, None).is_ok());
        match l.check_rate(&stats, None) {
            Err(ProxyError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 10),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn unchanged_limits_keep_their_bucket() {
        let stats = TenantStats::default();
        let a = TenantLimits::build(&limits(1.0, 2), None, &stats);
        let _ = a.check_rate(&stats, None);
        let _ = a.check_rate(&stats, None);
        let b = TenantLimits::build(&limits(1.0, 2), Some(&a), &stats);
        assert!(b.shares_bucket_with(&a));
        assert!(
            b.check_rate(&stats, None).is_err(),
            "a drained bucket stays drained"
        );
        let c = TenantLimits::build(&limits(1.0, 5), Some(&b), &stats);
        assert!(!c.shares_bucket_with(&b));
        assert!(
            b.check_rate(&stats, None).is_err(),
            "building the new limit leaves the serving snapshot's bucket alone"
        );
        assert!(
            c.check_rate(&stats, None).is_err(),
            "a changed limit keeps what was left of the burst: none"
        );
        let d = TenantLimits::build(&limits(1.0, 2), Some(&c), &stats);
        assert!(!d.shares_bucket_with(&c));
        assert!(
            d.check_rate(&stats, None).is_err(),
            "changed back: still drained, not a fresh bucket"
        );

        // Requests left carry over, up to the new burst.
        let stats = TenantStats::default();
        let e = TenantLimits::build(&limits(0.001, 5), None, &stats);
        assert!(e.check_rate(&stats, None).is_ok());
        let f = TenantLimits::build(&limits(0.001, 2), Some(&e), &stats);
        assert!(f.check_rate(&stats, None).is_ok());
        assert!(f.check_rate(&stats, None).is_ok());
        assert!(f.check_rate(&stats, None).is_err(), "4 left, cut to 2");
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let stats = TenantStats::default();
        let l = TenantLimits::build(&limits(10.0, 2), None, &stats);
        assert!(l.check_rate(&stats, None).is_ok());
        assert!(l.check_rate(&stats, None).is_ok());
        assert!(l.check_rate(&stats, None).is_err());
        // 100 ms per request: after 250 ms, two are back (the burst), not more.
        std::thread::sleep(Duration::from_millis(250));
        let s = l.check_rate(&stats, None).unwrap();
        assert_eq!(s.tenant.map(|(_, left)| left), Some(1));
        assert!(l.check_rate(&stats, None).is_ok());
        assert!(l.check_rate(&stats, None).is_err());
    }

    #[test]
    fn in_flight_permits_are_returned() {
        let stats = Arc::new(TenantStats::default());
        let l = TenantLimits::build(
            &Limits {
                max_in_flight: Some(2),
                ..Limits::default()
            },
            None,
            &stats,
        );
        let p1 = l.acquire(&stats).unwrap();
        let p2 = l.acquire(&stats).unwrap();
        assert!(matches!(
            l.acquire(&stats),
            Err(ProxyError::TooManyInFlight { limit: 2 })
        ));
        assert_eq!(
            stats.in_flight(),
            2,
            "a refused acquire gives its count back"
        );
        drop((p1, p2));
        assert_eq!(stats.in_flight(), 0);
    }

    #[test]
    fn client_ip_through_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.append(
            &X_FORWARDED_FOR,
            "198.51.100.1, 203.0.113.9, 10.1.1.1".parse().unwrap(),
        );
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let untrusted: IpAddr = "192.0.2.5".parse().unwrap();
        assert_eq!(client_ip(untrusted, &h, &trusted), untrusted);
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
    }

    #[test]
    fn the_bucket_fills_the_rest_of_a_line() {
        assert_eq!(std::mem::size_of::<Option<Bucket>>(), 32);
        assert_eq!(std::mem::offset_of!(TenantLimits, rate), 0);
    }

    #[test]
    fn ratelimit_header() {
        let stats = TenantStats::default();
        let l = TenantLimits::build(&limits(10.0, 5), None, &stats);
        let s = l.check_rate(&stats, None).unwrap();
        assert_eq!(s.header().unwrap(), "\"tenant\";r=4;t=1");
    }
}
