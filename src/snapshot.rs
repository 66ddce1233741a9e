//! The runtime view of one validated config: the tenant table, the host index and
//! pre-built header values and upstream authorities. Immutable once built; the hot
//! path reads it through one `arc_swap` load per request and never parses, formats or
//! looks a tenant up by string twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use http::{HeaderName, HeaderValue};

use crate::config::{Config, HostPattern, Limits, SourceKind, TenantStatus};
use crate::limits::TenantLimits;
use crate::metrics::TenantStats;

/// The maps probed on every request. Keys come from the config (requests only look
/// up, never insert), so a fast seeded hash is safe here: resolution went from 92 to
/// 80 ns (`cargo bench --bench hot_path -- resolve`).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Host names to tenants. A name of up to [`HostEntry::INLINE`] bytes is stored in its
/// table entry with the tenant's index, one cache line, so a lookup with many tenants
/// in rotation fetches the table's control bytes and that line; with boxed keys it
/// fetched a third, the key's bytes. Longer names keep boxed keys.
#[derive(Debug, Default)]
struct HostMap {
    short: std::collections::HashSet<HostEntry, foldhash::fast::RandomState>,
    long: FastMap<Box<str>, TenantIdx>,
}

impl HostMap {
    /// A later insert of the same name wins, as with a map.
    fn insert(&mut self, host: &str, idx: TenantIdx) {
        match HostEntry::new(host, idx) {
            Some(e) => {
                self.short.replace(e);
            }
            None => {
                self.long.insert(host.into(), idx);
            }
        }
    }

    fn get(&self, host: &str) -> Option<TenantIdx> {
        if host.len() <= HostEntry::INLINE {
            self.short.get(host.as_bytes()).map(|e| e.idx)
        } else {
            self.long.get(host).copied()
        }
    }
}

/// A host name kept inline (up to 59 bytes) and its tenant: one aligned cache line.
/// Hashed and compared as the name's bytes, so a `&[u8]` looks it up.
#[derive(Debug)]
#[repr(C, align(64))]
struct HostEntry {
    idx: TenantIdx,
    len: u8,
    bytes: [u8; HostEntry::INLINE],
}

impl HostEntry {
    const INLINE: usize = 64 - 4 - 1;

    fn new(host: &str, idx: TenantIdx) -> Option<HostEntry> {
        let len = u8::try_from(host.len())
            .ok()
            .filter(|n| usize::from(*n) <= Self::INLINE)?;
        let mut bytes = [0; Self::INLINE];
        bytes[..host.len()].copy_from_slice(host.as_bytes());
        Some(HostEntry { idx, len, bytes })
    }

    fn name(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::borrow::Borrow<[u8]> for HostEntry {
    fn borrow(&self) -> &[u8] {
        self.name()
    }
}

impl std::hash::Hash for HostEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}

impl PartialEq for HostEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for HostEntry {}

/// Index of a tenant in [`Snapshot::tenants`].
pub type TenantIdx = u32;

/// How long a target that could not be connected to is passed over (nginx's
/// `fail_timeout` default, with `max_fails = 1`).
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// One upstream pool: targets chosen round robin, passing over those that failed to
/// connect within the last [`FAIL_TIMEOUT`].
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub targets: Vec<Authority>,
    /// TCP or TLS, HTTP/1.1 or HTTP/2.
    pub transport: crate::upstream::Transport,
    next: AtomicUsize,
    /// Per target: until when it is passed over, in [`now_ms`]'s milliseconds; 0 when
    /// it is not. Shared by the workers; reset by a reload.
    down_until: Box<[AtomicU64]>,
}

/// Milliseconds on the process's monotonic clock (`limits::since_base`), never 0.
fn now_ms() -> u64 {
    u64::try_from(crate::limits::since_base().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

impl Upstream {
    pub fn new(
        name: Arc<str>,
        targets: Vec<Authority>,
        transport: crate::upstream::Transport,
    ) -> Upstream {
        let down_until = targets.iter().map(|_| AtomicU64::new(0)).collect();
        Upstream {
            name,
            targets,
            transport,
            next: AtomicUsize::new(0),
            down_until,
        }
    }

    /// The next target, round robin, passing over targets that failed to connect
    /// lately unless every one did. Relaxed is enough: fairness, not ordering, is
    /// wanted. With every target up this reads no clock.
    pub fn pick(&self) -> &Authority {
        let n = self.targets.len();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if n > 1 && self.down_until[i].load(Ordering::Relaxed) != 0 {
            return &self.targets[self.up_from(i, now_ms()).unwrap_or(i)];
        }
        &self.targets[i]
    }

    /// The first target from `i` on (in order, wrapping) that is not passed over; a
    /// mark found expired is cleared.
    fn up_from(&self, i: usize, now: u64) -> Option<usize> {
        let n = self.targets.len();
        (0..n).map(|k| (i + k) % n).find(|&j| {
            let until = self.down_until[j].load(Ordering::Relaxed);
            if until != 0 && until <= now {
                let _ = self.down_until[j].compare_exchange(
                    until,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            until <= now
        })
    }

    /// Each target and whether it is in rotation (not passed over after a failed
    /// connection), for `bulkhead_upstream_target_up`.
    pub fn target_states(&self) -> impl Iterator<Item = (&Authority, bool)> {
        let now = now_ms();
        self.targets
            .iter()
            .zip(self.down_until.iter())
            .map(move |(t, d)| {
                let until = d.load(Ordering::Relaxed);
                (t, until <= now)
            })
    }

    /// A connection to `target` failed: it is passed over for [`FAIL_TIMEOUT`], and the
    /// target to try instead is returned — the next one that is not passed over — or
    /// `None` when there is none (a pool of one, or every other target failed too).
    /// Nothing was sent, so any request may go to the other one.
    pub fn failed(&self, target: &Authority) -> Option<&Authority> {
        let n = self.targets.len();
        let i = self
            .targets
            .iter()
            .position(|t| t.as_str() == target.as_str())?;
        if n == 1 {
            return None;
        }
        let now = now_ms();
        let until = now.saturating_add(u64::try_from(FAIL_TIMEOUT.as_millis()).unwrap_or(0));
        let before = self.down_until[i].swap(until, Ordering::Relaxed);
        if before <= now {
            tracing::warn!(
                upstream = %self.name,
                %target,
                pass_over = ?FAIL_TIMEOUT,
                "cannot connect to upstream target; trying the others"
            );
        }
        let j = self.up_from((i + 1) % n, now)?;
        (j != i).then(|| &self.targets[j])
    }
}

#[derive(Debug)]
pub struct Route {
    pub prefix: Box<str>,
    pub upstream: Arc<Upstream>,
}

/// One tenant of a snapshot.
///
/// Laid out by hand: with many tenants in rotation each request finds its tenant's
/// lines cold in the cache (goal 2 of the load benchmark, BENCHMARKS.md). What a
/// proxied request reads fills the first three lines — flags and pointers, then the
/// timeout, the pre-rendered header lines and the rate bucket, then the rest of the
/// limits — and the header lines it writes are one more, `wire`. The header values
/// the other paths insert into maps, the id and the rest come after.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct Tenant {
    // ---- line 0 ----
    pub status: TenantStatus,
    /// `require = ["api_key"]`: a request must present a valid key of this tenant.
    pub require_api_key: bool,
    /// `require = ["jwt"]`: … or a valid bearer token naming it.
    pub require_jwt: bool,
    /// `requests_per_day` or `requests_per_month` is set.
    pub has_quota: bool,
    /// Lengths of the request lines and the response line in `wire`; `u16::MAX`: the
    /// request lines did not fit (then written from `id_value` and `features`).
    wire_request: u16,
    wire_response: u16,
    pub upstream: Arc<Upstream>,
    /// Metric counters and the rate bucket; carried over across reloads for as long as
    /// the tenant exists.
    pub stats: Arc<TenantStats>,
    /// The tenant's own certificate and/or client verification, for handshakes whose
    /// SNI names one of its hosts.
    pub tls: Option<Box<crate::tls::ServerSide>>,
    /// Longest prefix first.
    pub routes: Box<[Route]>,
    /// Verified claims copied into request headers: (claim, header).
    pub forward_claims: Box<[(Box<str>, HeaderName)]>,
    // ---- line 1 ----
    pub request_timeout: Duration,
    /// The gateway's header lines for this tenant as HTTP/1.1 writes them: to the
    /// upstream `forward_header: <id>` and `x-tenant-features`, to the client
    /// `ratelimit-policy`. One allocation padded to whole cache lines (mimalloc's size
    /// classes for those start on a line): one line to fetch, not one per value.
    wire: Box<[u8]>,
    /// The limiter state and limits; the bucket ends this line, the rest is line 2.
    pub limits: TenantLimits,
    // ---- read by some requests ----
    /// The id as a header value, for `forward_header`.
    pub id_value: HeaderValue,
    /// `x-tenant-features`, comma-separated; `None` when the tenant has none.
    pub features: Option<HeaderValue>,
    pub id: Arc<str>,
    /// The limits as configured (defaults merged in).
    pub configured_limits: Limits,
    /// Keys that verify this tenant's tokens.
    pub jwt: Option<crate::jwt::KeySet>,
}

impl Tenant {
    /// `forward_header: <id>` and `x-tenant-features: …` as HTTP/1.1 header lines, for
    /// the snapshot's `forward_header`; `None` when they were too long to pre-render.
    pub fn request_lines(&self) -> Option<&[u8]> {
        let n = usize::from(self.wire_request);
        (self.wire_request != u16::MAX).then(|| &self.wire[..n])
    }

    /// `ratelimit-policy: …` as an HTTP/1.1 header line, for tenants with a rate limit.
    pub fn policy_line(&self) -> Option<&[u8]> {
        let start = match self.wire_request {
            u16::MAX => 0,
            n => usize::from(n),
        };
        let line = self
            .wire
            .get(start..start + usize::from(self.wire_response))?;
        (!line.is_empty()).then_some(line)
    }

    /// The upstream for `path`: the longest matching route prefix, else the tenant's own.
    /// A prefix matches at a segment boundary: `/reports` matches `/reports` and
    /// `/reports/x`, not `/reportsx` (a prefix ending in `/` matches anything below it).
    /// The upstream for `path`: the first (longest) route whose prefix it starts with
    /// at a segment boundary, else the tenant's. Matched on the path as the upstream
    /// will read it (`route_path`): `//reports/1`, `/x/../reports/1` and `/%72eports/1`
    /// all go where `/reports/1` goes, as nginx matches its locations, so a route
    /// cannot be sidestepped by spelling (the path itself is forwarded as sent).
    pub fn route(&self, path: &str) -> &Arc<Upstream> {
        if self.routes.is_empty() {
            return &self.upstream;
        }
        let path = route_path(path);
        for r in &self.routes {
            if let Some(rest) = path.strip_prefix(&*r.prefix) {
                if r.prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') {
                    return &r.upstream;
                }
            }
        }
        &self.upstream
    }
}

/// A tenant a reload removed: its counters and limiter state, kept for
/// [`RETIRED_FOR`] (and for as long as requests of it are still in flight) so that a
/// reload that adds it back carries them over — its quota counts are not reset, nor its
/// in-flight count (which would let twice its `max_in_flight` run).
#[derive(Debug, Clone)]
pub struct Retired {
    pub stats: Arc<TenantStats>,
    pub limits: TenantLimits,
    since: std::time::Instant,
}

/// How long a removed tenant's state is kept for a reload that adds it back.
pub const RETIRED_FOR: Duration = Duration::from_secs(3600);

/// The retired tenants of the snapshot after `previous`, whose tenants are now `by_id`:
/// those `previous` had and the new one has not, and those it kept itself that are
/// neither back nor expired.
fn retire(previous: &Snapshot, by_id: &FastMap<Box<str>, TenantIdx>) -> FastMap<Box<str>, Retired> {
    let now = std::time::Instant::now();
    let mut out = FastMap::default();
    for t in &previous.tenants {
        if !by_id.contains_key(&*t.id) {
            out.insert(
                Box::from(&*t.id),
                Retired {
                    stats: t.stats.clone(),
                    limits: t.limits.clone(),
                    since: now,
                },
            );
        }
    }
    for (id, r) in &previous.retired {
        let live = now.duration_since(r.since) < RETIRED_FOR || r.stats.in_flight() > 0;
        if live && !by_id.contains_key(id) && !out.contains_key(id) {
            out.insert(id.clone(), r.clone());
        }
    }
    out
}

/// `path` as routes match it: unreserved characters percent-decoded (`%72` is `r`;
/// RFC 3986 §6.2.2.2), the hex digits of other escapes in upper case (`%2f` is `%2F`;
/// §6.2.2.1), repeated slashes merged, and `.` / `..` segments resolved
/// (§5.2.4; `..` never climbs above the root). A path with none of these is returned
/// as it is, after one pass over its bytes.
pub fn route_path(path: &str) -> std::borrow::Cow<'_, str> {
    let b = path.as_bytes();
    let plain = !b.contains(&b'%')
        && !b
            .windows(2)
            .any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'));
    if plain {
        return std::borrow::Cow::Borrowed(path);
    }
    // Decode the unreserved characters; anything else stays encoded.
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c);
                } else {
                    // Kept encoded, in upper case (§6.2.2.1): `%2f` is `%2F`.
                    decoded.extend_from_slice(&[
                        b'%',
                        b[i + 1].to_ascii_uppercase(),
                        b[i + 2].to_ascii_uppercase(),
                    ]);
                }
                i += 3;
                continue;
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    let mut out: Vec<&[u8]> = Vec::new();
    let segments = decoded.split(|&c| c == b'/').skip(1);
    let mut trailing = false;
    for seg in segments {
        trailing = false;
        match seg {
            b"" | b"." => trailing = true,
            b".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(std::str::from_utf8(seg).unwrap_or(""));
    }
    if trailing || path.is_empty() {
        path.push('/');
    }
    std::borrow::Cow::Owned(path)
}

#[derive(Debug)]
pub struct Tenancy {
    pub sources: Vec<SourceKind>,
    /// `tenancy.api_key.header`; removed before forwarding when the "api_key" source is on.
    pub api_key_header: HeaderName,
    pub api_key_source: bool,
    /// `tenancy.jwt.header` and `tenant_claim`.
    pub jwt_header: HeaderName,
    pub tenant_claim: Box<str>,
    pub jwt_cookie: Option<Box<str>>,
    pub header: HeaderName,
    pub path_prefix: Box<str>,
    /// `None` when `forward_header = ""` (injection off).
    pub forward_header: Option<HeaderName>,
    /// What no client may send, whatever its tenant: [`crate::headers::Guarded`].
    pub guarded: Arc<crate::headers::Guarded>,
}

/// Everything one request needs to decide where it goes.
#[derive(Debug)]
pub struct Snapshot {
    pub version: String,
    pub loaded_at: SystemTime,
    pub tenancy: Tenancy,
    pub max_header_bytes: u64,
    /// `server.tunnel_idle_timeout`: WebSocket tunnels idle this long are closed.
    pub tunnel_idle_timeout: Option<Duration>,
    /// `server.body_idle_timeout`: a response body that makes no progress this long
    /// is cut off.
    pub body_idle_timeout: Option<Duration>,
    /// `server.access_log`: one line per request.
    pub access_log: bool,
    /// `server.metrics`: per-tenant request metrics are recorded.
    pub metrics: bool,
    /// Peers whose `x-forwarded-for` names the client for per-client limits.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub tenants: Vec<Tenant>,
    /// Tenants recent reloads removed, by id: see [`Retired`].
    pub retired: FastMap<Box<str>, Retired>,
    /// Counters of requests that resolved to no tenant (`tenant="_unknown"`).
    pub unknown_stats: Arc<TenantStats>,
    pub upstreams: HashMap<Box<str>, Arc<Upstream>>,
    /// Every tenant's API-key digests.
    pub api_keys: crate::credentials::ApiKeys,
    /// Issuer-wide token keys (`[tenancy.jwt] jwks_file`).
    pub jwt_global: Option<crate::jwt::KeySet>,
    /// The default certificate (`[server.tls]`), for SNI names of no tenant with its own.
    pub tls: Option<crate::tls::ServerSide>,
    /// TLS session ticket keys by the settings they serve; see `tls::server_config`.
    pub ticket_keys: crate::tls::TicketMap,
    /// `[cluster]`: the Redis connection of cluster scope; kept across reloads (a
    /// change of `[cluster]` needs a restart).
    pub store: Option<Arc<crate::store::Store>>,
    /// `server.state_dir`: local quota counters saved across restarts.
    pub quotas: Arc<crate::quota::Quotas>,
    by_id: FastMap<Box<str>, TenantIdx>,
    exact_hosts: HostMap,
    /// `*.acme.com` is stored under `acme.com`.
    wildcard_hosts: HostMap,
}

/// A tenant's `wire` block: its request header lines (`forward`, `features`), then its
/// `ratelimit-policy` line, padded with zeros to whole cache lines; and the two lengths
/// (`u16::MAX` for request lines too long to keep there: `wire` is then the policy line).
fn render_wire(
    forward: Option<(&HeaderName, &HeaderValue)>,
    features: Option<&HeaderValue>,
    policy: Option<&HeaderValue>,
) -> (Box<[u8]>, u16, u16) {
    use crate::h1::wire::write_header;
    let mut out = Vec::new();
    if let Some((name, id)) = forward {
        write_header(&mut out, name.as_str().as_bytes(), id.as_bytes());
    }
    if let Some(v) = features {
        write_header(
            &mut out,
            crate::headers::X_TENANT_FEATURES.as_str().as_bytes(),
            v.as_bytes(),
        );
    }
    let request = match u16::try_from(out.len()) {
        Ok(n) if n < u16::MAX => n,
        _ => {
            out.clear();
            u16::MAX
        }
    };
    let before = out.len();
    if let Some(v) = policy {
        write_header(&mut out, b"ratelimit-policy", v.as_bytes());
    }
    // A policy line is two names and four numbers: far below 64 KiB.
    let response = u16::try_from(out.len() - before).unwrap_or(0);
    out.resize(out.len().next_multiple_of(64), 0);
    (out.into_boxed_slice(), request, response)
}

/// Why a validated config could still not be turned into a snapshot.
#[derive(Debug)]
pub struct BuildError(pub String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// See [`crate::upstream::Transport::pool_id`].
fn pool_id(u: &crate::config::ResolvedUpstream) -> u64 {
    let mut id = u64::from(u.https)
        | (u64::from(u.protocol == crate::config::UpstreamProtocol::H2) << 1)
        | (u64::from(u.insecure) << 2);
    if let Some(ca) = &u.ca {
        id ^= (ca.fingerprint << 3) | 0b1000;
    }
    id
}

impl Snapshot {
    /// Builds the runtime view of `config`. Limiter state (rate buckets, in-flight
    /// counts) of tenants also present in `previous` carries over where their limits
    /// are unchanged, so a reload never resets a drained bucket.
    pub fn build(config: &Config, previous: Option<&Snapshot>) -> Result<Snapshot, BuildError> {
        let header = |s: &str| {
            HeaderName::from_bytes(s.as_bytes())
                .map_err(|_| BuildError(format!("invalid header name {s:?}")))
        };
        let mut upstreams = HashMap::new();
        for u in &config.upstreams {
            let targets = u
                .targets
                .iter()
                .map(|t| {
                    t.parse::<Authority>()
                        .map_err(|_| BuildError(format!("invalid target {t:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if targets.is_empty() {
                continue;
            }
            let h2 = u.protocol == crate::config::UpstreamProtocol::H2;
            let tls = if u.https {
                if u.insecure {
                    tracing::warn!(
                        upstream = %u.name,
                        "tls_insecure_skip_verify: certificates of this upstream are NOT verified; anyone on the path can impersonate it"
                    );
                }
                Some(
                    crate::tls::upstream_client_config(u.ca.as_ref(), u.insecure, h2)
                        .map_err(|e| BuildError(format!("upstream {:?}: {e}", u.name)))?,
                )
            } else {
                None
            };
            upstreams.insert(
                u.name.clone().into_boxed_str(),
                Arc::new(Upstream::new(
                    Arc::from(u.name.as_str()),
                    targets,
                    crate::upstream::Transport {
                        pool_id: pool_id(u),
                        tls,
                        h2,
                    },
                )),
            );
        }
        let lookup = |name: &str| {
            upstreams
                .get(name)
                .cloned()
                .ok_or_else(|| BuildError(format!("unknown upstream {name:?}")))
        };

        let mut keys = crate::tls::TicketKeys {
            previous: previous.map(|p| &p.ticket_keys),
            current: Default::default(),
        };
        let server_tls = config
            .tls
            .as_ref()
            .map(|t| {
                crate::tls::server_config(&t.default, t.tls13_only, None, &mut keys).map(|config| {
                    crate::tls::ServerSide {
                        config,
                        mtls: false,
                        client_ca: 0,
                        forward_client_cert: None,
                    }
                })
            })
            .transpose()
            .map_err(BuildError)?;
        let mut tenant_tls = |t: &crate::config::ResolvedTenant| {
            let (Some(own), Some(server)) = (&t.tls, &config.tls) else {
                return Ok(None);
            };
            if own.cert.is_none() && own.client_ca.is_none() {
                return Ok(None);
            }
            let cert = own.cert.as_ref().unwrap_or(&server.default);
            let config = crate::tls::server_config(
                cert,
                server.tls13_only,
                own.client_ca.as_ref(),
                &mut keys,
            )
            .map_err(|e| BuildError(format!("tenant {:?}: {e}", t.id)))?;
            Ok(Some(crate::tls::ServerSide {
                config,
                mtls: own.client_ca.is_some(),
                client_ca: own.client_ca.as_ref().map_or(0, |ca| ca.fingerprint),
                forward_client_cert: own.forward_client_cert.as_deref().map(header).transpose()?,
            }))
        };
        let quotas = previous.map_or_else(
            || Arc::new(crate::quota::Quotas::open(config.state_dir.clone())),
            |p| p.quotas.clone(),
        );
        let forward_header = if config.forward_header.is_empty() {
            None
        } else {
            Some(header(&config.forward_header)?)
        };
        let mut tenants = Vec::with_capacity(config.tenants.len());
        let mut by_id = FastMap::default();
        let mut exact_hosts = HostMap::default();
        let mut wildcard_hosts = HostMap::default();
        let mut api_keys = crate::credentials::ApiKeys::default();
        by_id.reserve(config.tenants.len());
        for (i, t) in config.tenants.iter().enumerate() {
            let idx = TenantIdx::try_from(i).map_err(|_| BuildError("too many tenants".into()))?;
            let mut routes = t
                .routes
                .iter()
                .map(|(prefix, up)| {
                    Ok(Route {
                        // As paths are matched: `%2f` written in the file is `%2F`.
                        prefix: route_path(prefix).into(),
                        upstream: lookup(up)?,
                    })
                })
                .collect::<Result<Vec<_>, BuildError>>()?;
            // Longest prefix first; the sort is stable so equal lengths keep file order.
            routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
            let features = if t.features.is_empty() {
                None
            } else {
                Some(
                    HeaderValue::from_str(&t.features.join(","))
                        .map_err(|_| BuildError(format!("invalid features of {:?}", t.id)))?,
                )
            };
            for h in &t.hosts {
                match h {
                    HostPattern::Exact(h) => exact_hosts.insert(h, idx),
                    HostPattern::Wildcard(h) => wildcard_hosts.insert(h, idx),
                };
            }
            by_id.insert(t.id.clone().into_boxed_str(), idx);
            for d in &t.api_keys {
                api_keys.insert(*d, idx);
            }
            // The tenant in the snapshot being replaced — or one a recent reload
            // removed (`Retired`), so that removing a tenant and adding it back does
            // not reset its quota counts and in-flight count.
            let before = previous.and_then(|p| {
                p.tenant_by_id(&t.id)
                    .map(|i| {
                        let b = p.tenant(i);
                        (&b.stats, &b.limits)
                    })
                    .or_else(|| p.retired.get(t.id.as_str()).map(|r| (&r.stats, &r.limits)))
            });
            let stats: Arc<TenantStats> = before.map(|b| b.0.clone()).unwrap_or_default();
            let limits = TenantLimits::build(&t.limits, before.map(|b| b.1), &stats);
            if before.is_none() {
                quotas.restore(&t.id, &limits.usage);
            }
            let id_value = HeaderValue::from_str(&t.id)
                .map_err(|_| BuildError(format!("invalid tenant id {:?}", t.id)))?;
            let (wire, wire_request, wire_response) = render_wire(
                forward_header.as_ref().map(|name| (name, &id_value)),
                features.as_ref(),
                limits.policy.as_ref(),
            );
            tenants.push(Tenant {
                id: Arc::from(t.id.as_str()),
                id_value,
                features,
                wire,
                wire_request,
                wire_response,
                status: t.status,
                upstream: lookup(&t.upstream)?,
                routes: routes.into_boxed_slice(),
                request_timeout: t.request_timeout,
                has_quota: t.limits.requests_per_day.is_some()
                    || t.limits.requests_per_month.is_some(),
                configured_limits: t.limits,
                limits,
                stats,
                require_api_key: t.require.contains(&crate::config::CredentialKind::ApiKey),
                require_jwt: t.require.contains(&crate::config::CredentialKind::Jwt),
                jwt: t
                    .jwt
                    .as_ref()
                    .map(|j| crate::jwt::KeySet::build(j, config.jwt_leeway.as_secs()))
                    .filter(|k| !k.is_empty()),
                forward_claims: t
                    .jwt
                    .as_ref()
                    .map(|j| {
                        j.forward_claims
                            .iter()
                            .map(|(c, h)| Ok((c.clone().into_boxed_str(), header(h)?)))
                            .collect::<Result<Vec<_>, BuildError>>()
                    })
                    .transpose()?
                    .unwrap_or_default()
                    .into_boxed_slice(),
                tls: tenant_tls(t)?.map(Box::new),
            });
        }

        let retired = previous.map_or_else(FastMap::default, |p| retire(p, &by_id));
        Ok(Snapshot {
            retired,
            version: config.version.clone(),
            loaded_at: SystemTime::now(),
            tenancy: Tenancy {
                sources: config.resolve.clone(),
                api_key_header: header(&config.api_key_header)?,
                api_key_source: config.resolve.contains(&SourceKind::ApiKey),
                jwt_header: header(&config.jwt_header)?,
                tenant_claim: config.tenant_claim.clone().into_boxed_str(),
                jwt_cookie: config.jwt_cookie.clone().map(String::into_boxed_str),
                header: header(&config.tenant_header)?,
                path_prefix: config.path_prefix.clone().into_boxed_str(),
                guarded: Arc::new(crate::headers::Guarded::new(
                    [
                        Some(header(&config.tenant_header)?),
                        Some(header(&config.api_key_header)?),
                        forward_header.clone(),
                    ]
                    .into_iter()
                    .flatten(),
                    tenants.iter().flat_map(|t| {
                        let cert = t.tls.as_ref().and_then(|s| s.forward_client_cert.clone());
                        let claims = t.forward_claims.iter().map(|(_, h)| h.clone());
                        cert.into_iter().chain(claims)
                    }),
                )),
                forward_header,
            },
            max_header_bytes: config.max_header_bytes,
            tunnel_idle_timeout: config.tunnel_idle_timeout,
            body_idle_timeout: config.body_idle_timeout,
            access_log: config.access_log,
            metrics: config.metrics,
            trusted_proxies: config.trusted_proxies.clone(),
            tenants,
            unknown_stats: previous
                .map(|p| p.unknown_stats.clone())
                .unwrap_or_default(),
            upstreams,
            api_keys,
            jwt_global: config
                .jwt_global
                .as_ref()
                .map(|j| crate::jwt::KeySet::build(j, config.jwt_leeway.as_secs())),
            tls: server_tls,
            ticket_keys: keys.current,
            store: previous.and_then(|p| p.store.clone()).or_else(|| {
                config
                    .cluster
                    .clone()
                    .map(|c| Arc::new(crate::store::Store::new(c)))
            }),
            quotas,
            by_id,
            exact_hosts,
            wildcard_hosts,
        })
    }

    pub fn tenant(&self, idx: TenantIdx) -> &Tenant {
        &self.tenants[idx as usize]
    }

    pub fn tenant_by_id(&self, id: &str) -> Option<TenantIdx> {
        self.by_id.get(id).copied()
    }

    /// The tenant owning `host`, which must already be lower case without port or
    /// trailing dot. An exact host beats a wildcard; a wildcard covers one label.
    pub fn tenant_by_host(&self, host: &str) -> Option<TenantIdx> {
        self.tenant_by_exact_host(host)
            .or_else(|| self.tenant_by_wildcard(host))
    }

    /// The tenant with `host` (lower case, no port) among its exact `hosts`.
    pub fn tenant_by_exact_host(&self, host: &str) -> Option<TenantIdx> {
        self.exact_hosts.get(host)
    }

    /// The tenant whose wildcard `hosts` cover `host` (lower case, no port).
    pub fn tenant_by_wildcard(&self, host: &str) -> Option<TenantIdx> {
        let dot = host.find('.')?;
        if dot == 0 {
            return None;
        }
        self.wildcard_hosts.get(&host[dot + 1..])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn routes_match_the_path_as_the_upstream_reads_it() {
        for (raw, seen) in [
            ("/", "/"),
            ("/reports/1", "/reports/1"),
            ("//reports/1", "/reports/1"),
            ("/x/../reports/1", "/reports/1"),
            ("/reports/../secret", "/secret"),
            ("/%72eports/1", "/reports/1"),
            ("/%2e%2E/reports", "/reports"),
            ("/./reports/./", "/reports/"),
            ("/../../reports", "/reports"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2f%2e/b", "/a%2F./b"),
            ("/%c3%a9", "/%C3%A9"),
            ("/reports/", "/reports/"),
            ("/reports/.", "/reports/"),
            ("/a/..", "/"),
            ("/%", "/%"),
            ("/%7", "/%7"),
        ] {
            assert_eq!(route_path(raw), seen, "{raw}");
        }
    }

    use super::*;

    #[test]
    fn a_failed_target_is_passed_over_until_its_mark_expires() {
        let targets = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .map(Authority::from_static)
            .to_vec();
        let transport = crate::upstream::Transport {
            tls: None,
            h2: false,
            pool_id: 0,
        };
        let u = Upstream::new(Arc::from("u"), targets.clone(), transport);
        let picks = |n| (0..n).map(|_| u.pick().as_str()).collect::<Vec<_>>();
        assert_eq!(picks(3), ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        // The second fails: the next one is tried instead, and round robin skips it.
        assert_eq!(
            u.failed(&targets[1]).map(|t| t.as_str()),
            Some("127.0.0.1:3")
        );
        assert_eq!(
            picks(3),
            ["127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:3"],
            "its turn goes to the next target up"
        );
        // The third fails too: only the first is left.
        assert_eq!(
            u.failed(&targets[2]).map(|t| t.as_str()),
            Some("127.0.0.1:1")
        );
        assert_eq!(picks(3), ["127.0.0.1:1"; 3]);
        // All fail: nothing to try instead, and round robin goes on over all of them.
        assert_eq!(u.failed(&targets[0]), None);
        assert_eq!(picks(3), ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        // A mark that has expired is cleared at the target's next turn.
        for d in u.down_until.iter() {
            d.store(1, Ordering::Relaxed);
        }
        assert_eq!(picks(3), ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        assert!(u.down_until.iter().all(|d| d.load(Ordering::Relaxed) == 0));
        // A pool of one has nothing to fail over to; a target not in the pool neither.
        let one = Upstream::new(Arc::from("one"), targets[..1].to_vec(), u.transport.clone());
        assert_eq!(one.failed(&targets[0]), None);
        assert_eq!(u.failed(&Authority::from_static("127.0.0.1:9")), None);
    }

    #[test]
    fn host_map_finds_short_and_long_names_and_the_last_insert_wins() {
        let mut m = HostMap::default();
        let short = "t1.example.com";
        let edge = "a".repeat(HostEntry::INLINE);
        let long = "b".repeat(HostEntry::INLINE + 1);
        m.insert(short, 1);
        m.insert(&edge, 2);
        m.insert(&long, 3);
        m.insert(short, 4);
        assert_eq!(m.get(short), Some(4));
        assert_eq!(m.get(&edge), Some(2));
        assert_eq!(m.get(&long), Some(3));
        assert_eq!(m.get("t1.example.co"), None);
        assert_eq!(m.get(&edge[1..]), None);
        assert_eq!(m.get(&long[1..]), None, "a long key's prefix is not it");
        assert_eq!(m.short.len(), 2);
        assert_eq!(std::mem::size_of::<HostEntry>(), 64);
    }

    #[test]
    fn host_map_agrees_with_a_plain_map() {
        // Names of every length around the inline limit, with shared prefixes and
        // suffixes; a plain map of the same inserts is the oracle.
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15);
        let name = |next: &mut dyn FnMut() -> u64| {
            let len = 1 + (next() % 90) as usize;
            (0..len)
                .map(|_| char::from(b"ab.-z9"[(next() % 6) as usize]))
                .collect::<String>()
        };
        let mut m = HostMap::default();
        let mut oracle = std::collections::HashMap::new();
        for i in 0..5_000u32 {
            let n = name(&mut next);
            m.insert(&n, i);
            oracle.insert(n, i);
        }
        for (n, i) in &oracle {
            assert_eq!(m.get(n), Some(*i), "{n}");
        }
        for _ in 0..5_000 {
            let n = name(&mut next);
            assert_eq!(m.get(&n), oracle.get(&n).copied(), "{n}");
        }
    }

    #[test]
    fn what_a_request_reads_of_its_tenant_is_on_its_first_three_lines() {
        use std::mem::offset_of;
        // Line 0: flags, pointers, routes, claims; line 1: timeout, wire, the bucket;
        // line 2: the rest of the limits a request reads (limits.rs checks its side).
        assert_eq!(std::mem::align_of::<Tenant>(), 64);
        assert!(offset_of!(Tenant, forward_claims) + 16 <= 64);
        assert_eq!(offset_of!(Tenant, request_timeout), 64);
        assert_eq!(offset_of!(Tenant, limits), 96);
        assert!(offset_of!(Tenant, limits) + crate::limits::HOT_BYTES <= 192);
    }

    #[test]
    fn wire_holds_the_lines_write_would_produce_in_whole_cache_lines() {
        let name = HeaderName::from_static("x-tenant-id");
        let id = HeaderValue::from_static("acme");
        let features = HeaderValue::from_static("beta,sso");
        let policy = HeaderValue::from_static("\"tenant\";q=200;w=2");
        let (wire, req, resp) = render_wire(Some((&name, &id)), Some(&features), Some(&policy));
        let expected_req = b"x-tenant-id: acme\r\nx-tenant-features: beta,sso\r\n";
        let expected_resp = b"ratelimit-policy: \"tenant\";q=200;w=2\r\n";
        assert_eq!(usize::from(req), expected_req.len());
        assert_eq!(usize::from(resp), expected_resp.len());
        assert_eq!(&wire[..expected_req.len()], expected_req);
        assert_eq!(wire.len() % 64, 0);

        // Injection off, no features, no rate limit: nothing to write either way.
        let (wire, req, resp) = render_wire(None, None, None);
        assert_eq!((wire.len(), req, resp), (0, 0, 0));

        // Request lines too long to keep: the policy line alone, at the start.
        let long = HeaderValue::from_str(&"f,".repeat(40_000)).unwrap();
        let (wire, req, resp) = render_wire(Some((&name, &id)), Some(&long), Some(&policy));
        assert_eq!(req, u16::MAX);
        assert_eq!(&wire[..usize::from(resp)], expected_resp);
    }
}
