//! Per-tenant metrics. The hot path only touches atomics in a [`TenantStats`] it
//! already holds (resolved once per snapshot, never by formatting labels); the
//! Prometheus families of SPEC.md are built from the current snapshot when `/metrics`
//! is scraped, with the `prometheus` crate's data model and text encoder. So a tenant
//! removed by a reload stops being exported at once, and unknown tenants share one
//! `tenant="_unknown"` entry whatever they send.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

use crate::config::TenantStatus;
use crate::error::{ProxyError, UpstreamFailure};
use crate::snapshot::Snapshot;

/// The `tenant` label of requests that resolved to no tenant.
pub const UNKNOWN_TENANT: &str = "_unknown";

/// Status codes with a counter of their own; others share a small locked list.
const COMMON_STATUS: [u16; 29] = [
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413, 415,
    421, 422, 429, 431, 499, 500, 501, 502, 503, 504,
];

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `kind` label of `upstream_errors_total`.
const UPSTREAM_KINDS: [&str; 4] = ["connect", "timeout", "reset", "protocol"];

/// An index into [`UPSTREAM_KINDS`].
#[derive(Clone, Copy, Debug)]
pub enum UpstreamKind {
    Connect = 0,
    Timeout = 1,
    Reset = 2,
    Protocol = 3,
}

/// Everything counted for one tenant. Survives reloads for as long as the tenant does.
///
/// Laid out by hand (see [`crate::snapshot::Tenant`]): with many tenants in rotation a
/// request finds its tenant's counters cold in the cache, so what a proxied request
/// writes sits on two lines. The first holds the `Arc`'s reference counts (every request
/// changes them), the count in flight, the rate-limit bucket, the latency sum, the
/// response bytes and the count of 200s; the status counters continue from there, and
/// the latency buckets come after them, the first three (up to 2.5 ms) on one line.
/// Not aligned to a line, which would put the reference counts on a line of their own;
/// mimalloc's size class for it is a whole number of lines, so it starts on one.
#[derive(Debug)]
#[repr(C)]
pub struct TenantStats {
    /// Requests of the tenant being served now (`limits::Permit`).
    in_flight: AtomicU64,
    /// The tenant's rate-limit bucket: the theoretical arrival time of its GCRA, in two
    /// slots so that a reload that changes the limit starts a fresh bucket in the slot
    /// the serving snapshot does not use (`limits::TenantLimits::build`).
    buckets: [AtomicU64; 2],
    latency_sum_nanos: AtomicU64,
    response_bytes: AtomicU64,
    /// By `COMMON_STATUS`, 200 first.
    status: [AtomicU64; COMMON_STATUS.len()],
    request_bytes: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    rejected: [AtomicU64; ProxyError::REASONS.len()],
    other_status: Mutex<Vec<(u16, u64)>>,
    /// (upstream, counts by kind). Errors are rare: a lock is fine here.
    upstream_errors: Mutex<Vec<(Arc<str>, [u64; UPSTREAM_KINDS.len()])>>,
}

impl Default for TenantStats {
    fn default() -> Self {
        TenantStats {
            in_flight: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            status: std::array::from_fn(|_| AtomicU64::new(0)),
            other_status: Mutex::new(Vec::new()),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_nanos: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            upstream_errors: Mutex::new(Vec::new()),
        }
    }
}

impl TenantStats {
    /// The state of the tenant's rate-limit bucket in `slot` (0 or 1).
    pub(crate) fn bucket(&self, slot: usize) -> &AtomicU64 {
        &self.buckets[slot & 1]
    }

    /// Requests of the tenant being served now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// One more request in flight; returns the count with it.
    pub(crate) fn enter(&self) -> u64 {
        self.in_flight.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// One response sent: its status and the time from request head to response head.
    pub fn record(&self, status: u16, head_latency: Duration) {
        match COMMON_STATUS.iter().position(|s| *s == status) {
            Some(i) => {
                self.status[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let mut other = self.other_status.lock().unwrap_or_else(|e| e.into_inner());
                match other.iter_mut().find(|(s, _)| *s == status) {
                    Some((_, n)) => *n += 1,
                    None => other.push((status, 1)),
                }
            }
        }
        let secs = head_latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_nanos.fetch_add(
            u64::try_from(head_latency.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// A request the gateway answered itself, and upstream failures by upstream and kind.
    pub fn record_error(&self, e: &ProxyError) {
        self.rejected[e.reason_index()].fetch_add(1, Ordering::Relaxed);
        let (upstream, kind) = match e {
            ProxyError::UpstreamError { upstream, failure } => (
                upstream,
                match failure {
                    UpstreamFailure::Connect => UpstreamKind::Connect,
                    UpstreamFailure::Reset => UpstreamKind::Reset,
                    UpstreamFailure::Protocol => UpstreamKind::Protocol,
                },
            ),
            ProxyError::UpstreamTimeout { upstream, .. } => (upstream, UpstreamKind::Timeout),
            _ => return,
        };
        self.record_upstream_failure(upstream, kind);
    }

    /// One `upstream_errors_total` count, for a failure the client got no error
    /// response for (the response had begun) as well as for one it did.
    pub fn record_upstream_failure(&self, upstream: &Arc<str>, kind: UpstreamKind) {
        let kind = kind as usize;
        let mut errs = self
            .upstream_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match errs.iter_mut().find(|(u, _)| u == upstream) {
            Some((_, counts)) => counts[kind] += 1,
            None => {
                let mut counts = [0; UPSTREAM_KINDS.len()];
                counts[kind] = 1;
                errs.push((upstream.clone(), counts));
            }
        }
    }

    pub fn add_request_bytes(&self, n: u64) {
        if n > 0 {
            self.request_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn add_response_bytes(&self, n: u64) {
        if n > 0 {
            self.response_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn requests(&self) -> Vec<(u16, u64)> {
        let mut out: Vec<(u16, u64)> = COMMON_STATUS
            .iter()
            .zip(&self.status)
            .map(|(s, n)| (*s, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        out.extend(
            self.other_status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied(),
        );
        out.sort_unstable();
        out
    }

    fn latency_count(&self) -> u64 {
        self.latency_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

/// Reload counters the exposition reads (owned by the reload module).
pub struct ReloadCounters {
    pub succeeded: u64,
    pub failed: u64,
    pub last_success: SystemTime,
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(format!("bulkhead_{name}"));
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<LabelPair>, v: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

fn histogram(labels: Vec<LabelPair>, s: &TenantStats) -> Metric {
    let mut h = Histogram::default();
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
    for (bound, n) in LATENCY_BUCKETS.iter().zip(&s.latency_buckets) {
        cumulative += n.load(Ordering::Relaxed);
        let mut b = Bucket::default();
        b.set_upper_bound(*bound);
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    cumulative += s.latency_buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
    h.set_bucket(buckets);
    h.set_sample_count(cumulative);
    h.set_sample_sum(s.latency_sum_nanos.load(Ordering::Relaxed) as f64 / 1e9);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_histogram(h);
    m
}

/// Every family of SPEC.md's metric table, from the snapshot in force.
pub fn families(snap: &Snapshot, reloads: &ReloadCounters) -> Vec<MetricFamily> {
    let mut requests = Vec::new();
    let mut durations = Vec::new();
    let mut rejected = Vec::new();
    let mut in_flight = Vec::new();
    let mut req_bytes = Vec::new();
    let mut resp_bytes = Vec::new();
    let mut upstream_errors = Vec::new();
    let mut limits = Vec::new();
    let mut info = Vec::new();

    let unknown = std::iter::once((UNKNOWN_TENANT, &snap.unknown_stats, None));
    let tenants = snap.tenants.iter().map(|t| (&*t.id, &t.stats, Some(t)));
    for (id, s, tenant) in unknown.chain(tenants) {
        for (status, n) in s.requests() {
            requests.push(counter(
                vec![label("tenant", id), label("status", &status.to_string())],
                n,
            ));
        }
        if s.latency_count() > 0 {
            durations.push(histogram(vec![label("tenant", id)], s));
        }
        for (reason, n) in ProxyError::REASONS.iter().zip(&s.rejected) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                rejected.push(counter(
                    vec![label("tenant", id), label("reason", reason)],
                    n,
                ));
            }
        }
        let (rq, rs) = (
            s.request_bytes.load(Ordering::Relaxed),
            s.response_bytes.load(Ordering::Relaxed),
        );
        if rq > 0 || tenant.is_some() {
            req_bytes.push(counter(vec![label("tenant", id)], rq));
        }
        if rs > 0 || tenant.is_some() {
            resp_bytes.push(counter(vec![label("tenant", id)], rs));
        }
        for (upstream, counts) in s
            .upstream_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (kind, n) in UPSTREAM_KINDS.iter().zip(counts) {
                if *n > 0 {
                    upstream_errors.push(counter(
                        vec![
                            label("tenant", id),
                            label("upstream", upstream),
                            label("kind", kind),
                        ],
                        *n,
                    ));
                }
            }
        }
        let Some(t) = tenant else { continue };
        in_flight.push(gauge(vec![label("tenant", id)], t.stats.in_flight() as f64));
        let l = &t.configured_limits;
        for (name, v) in [
            ("requests_per_second", l.requests_per_second),
            ("burst", l.burst.map(|b| b as f64)),
            ("max_body_bytes", l.max_body.map(|b| b as f64)),
            ("max_in_flight", l.max_in_flight.map(|b| b as f64)),
            (
                "per_client_requests_per_second",
                l.per_client_requests_per_second,
            ),
            ("per_client_burst", l.per_client_burst.map(|b| b as f64)),
        ] {
            if let Some(v) = v {
                limits.push(gauge(vec![label("tenant", id), label("limit", name)], v));
            }
        }
        let status = match t.status {
            TenantStatus::Active => "active",
            TenantStatus::Suspended => "suspended",
        };
        info.push(gauge(
            vec![label("tenant", id), label("status", status)],
            1.0,
        ));
    }

    let last_success = reloads
        .last_success
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    vec![
        family(
            "requests_total",
            "Responses sent, the gateway's own rejections included.",
            MetricType::COUNTER,
            requests,
        ),
        family(
            "request_duration_seconds",
            "Request head received to response head sent.",
            MetricType::HISTOGRAM,
            durations,
        ),
        family(
            "rejected_total",
            "Requests the gateway answered itself, by error code.",
            MetricType::COUNTER,
            rejected,
        ),
        family(
            "in_flight",
            "Requests being served now.",
            MetricType::GAUGE,
            in_flight,
        ),
        family(
            "request_body_bytes_total",
            "Bytes received in request bodies.",
            MetricType::COUNTER,
            req_bytes,
        ),
        family(
            "response_body_bytes_total",
            "Bytes sent in response bodies.",
            MetricType::COUNTER,
            resp_bytes,
        ),
        family(
            "upstream_errors_total",
            "Failed upstream exchanges by kind.",
            MetricType::COUNTER,
            upstream_errors,
        ),
        family(
            "tenant_limit",
            "Configured limits, for utilisation alerts.",
            MetricType::GAUGE,
            limits,
        ),
        family(
            "tenant_info",
            "1 per configured tenant.",
            MetricType::GAUGE,
            info,
        ),
        family(
            "config_reloads_total",
            "Configuration reload attempts by result.",
            MetricType::COUNTER,
            vec![
                counter(vec![label("result", "success")], reloads.succeeded),
                counter(vec![label("result", "failure")], reloads.failed),
            ],
        ),
        family(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded.",
            MetricType::GAUGE,
            vec![gauge(vec![], last_success)],
        ),
        family(
            "config_info",
            "1 for the configuration version in force.",
            MetricType::GAUGE,
            vec![gauge(vec![label("version", &snap.version)], 1.0)],
        ),
        family(
            "upstream_target_up",
            "0 while an upstream target is passed over after a failed connection, else 1.",
            MetricType::GAUGE,
            target_states(snap),
        ),
    ]
    .into_iter()
    .chain(quota_families(snap))
    .filter(|f| !f.get_metric().is_empty())
    .collect()
}

/// `upstream_target_up`: one series per target of every upstream, sorted by name.
fn target_states(snap: &Snapshot) -> Vec<Metric> {
    let mut pools: Vec<_> = snap.upstreams.iter().collect();
    pools.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    for (name, pool) in pools {
        for (target, up) in pool.target_states() {
            let labels = vec![label("upstream", name), label("target", target.as_str())];
            out.push(gauge(labels, if up { 1.0 } else { 0.0 }));
        }
    }
    out
}

/// `quota_used`, `quota_limit` and `store_errors_total` (issue #9).
fn quota_families(snap: &Snapshot) -> Vec<MetricFamily> {
    let (mut used, mut limit) = (Vec::new(), Vec::new());
    for (tenant, period, u, l) in crate::usage::samples(snap) {
        let labels = || vec![label("tenant", tenant), label("period", period)];
        used.push(gauge(labels(), u));
        limit.push(gauge(labels(), l));
    }
    let mut out = vec![
        family(
            "quota_used",
            "Requests counted against the tenant's quota in the current UTC period.",
            MetricType::GAUGE,
            used,
        ),
        family(
            "quota_limit",
            "The tenant's requests_per_day / requests_per_month.",
            MetricType::GAUGE,
            limit,
        ),
    ];
    if let Some(store) = &snap.store {
        out.push(family(
            "store_errors_total",
            "Calls to the shared store (Redis) that failed or timed out.",
            MetricType::COUNTER,
            vec![counter(vec![], store.errors())],
        ));
    }
    out
}

/// The text exposition of [`families`].
pub fn render(snap: &Snapshot, reloads: &ReloadCounters) -> Vec<u8> {
    render_with_capacity(snap, reloads, 64 * 1024)
}

/// [`render`] into a buffer of `capacity` bytes to begin with (the length of the
/// last render fits this one without growing).
pub fn render_with_capacity(snap: &Snapshot, reloads: &ReloadCounters, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity.max(64 * 1024));
    if let Err(e) = TextEncoder::new().encode(&families(snap, reloads), &mut out) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_request_counts_is_on_two_lines() {
        use std::mem::offset_of;
        // After the `Arc`'s two counts (16 bytes): in flight, the bucket, the latency
        // sum, the response bytes and the 200s end the first line ...
        let arc = 16;
        assert_eq!(COMMON_STATUS[0], 200);
        assert_eq!(arc + offset_of!(TenantStats, status) + 8, 64);
        assert!(arc + offset_of!(TenantStats, buckets) + 16 <= 64);
        // ... and the latency buckets up to 2.5 ms share one more.
        let first = arc + offset_of!(TenantStats, latency_buckets);
        assert_eq!(LATENCY_BUCKETS[2], 0.0025);
        assert_eq!(first / 64, (first + 2 * 8) / 64);
        // mimalloc puts a block of this size on a line boundary: between 512 and
        // 1024 bytes its size classes (640, 768, 896, 1024) are whole lines.
        let size = arc + std::mem::size_of::<TenantStats>();
        assert!((513..=1024).contains(&size), "{size}");
    }
}
