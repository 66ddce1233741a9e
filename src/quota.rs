//! Calendar quotas (`requests_per_day`, `requests_per_month`, UTC) and the per-tenant
//! usage state they share with cluster-scope rate limits.
//!
//! Local scope: exact counters in memory, saved to `server.state_dir/quotas.json`
//! (every second when changed, and at shutdown; temp file + rename) and read back at
//! start. Cluster scope: counters in Redis (keys expire after their period); each
//! instance leases a few units at every sync and admits from them locally; when it
//! holds none, one request reserves its unit in Redis directly, for at most
//! `store_timeout` (see README, "Cluster scope").
//!
//! A request counts once it has passed every other check (status, rate, in-flight,
//! declared body size): the quota is charged last, just before routing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{OnStoreFailure, Scope};
use crate::error::ProxyError;
use crate::snapshot::{Snapshot, Tenant};
use crate::store::{self, PeriodSync, Reserved, Store, SyncRequest};

/// The UTC day and month a moment falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub now: u64,
    /// Days since 1970-01-01.
    pub day: u64,
    /// `year * 12 + month - 1`.
    pub month: u64,
    pub day_end: u64,
    pub month_end: u64,
}

/// Howard Hinnant's `civil_from_days`: (year, month 1-12, day 1-31).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Periods {
    pub fn at(now: u64) -> Periods {
        let day = now / 86_400;
        let (y, m, _) = civil(day as i64);
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Periods {
            now,
            day,
            month: (y * 12 + i64::from(m) - 1) as u64,
            day_end: (day + 1) * 86_400,
            month_end: (days_from_civil(ny, nm, 1) * 86_400) as u64,
        }
    }

    pub fn current() -> Periods {
        Periods::at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
    }

    /// `2026-11-27`
    pub fn day_label(&self) -> String {
        let (y, m, d) = civil(self.day as i64);
        format!("{y:04}-{m:02}-{d:02}")
    }

    /// `2026-11`
    pub fn month_label(&self) -> String {
        format!("{:04}-{:02}", self.month / 12, self.month % 12 + 1)
    }

    fn day_key(&self, tenant: &str) -> String {
        store::key(tenant, &format!("day:{}", self.day_label()))
    }

    fn month_key(&self, tenant: &str) -> String {
        store::key(tenant, &format!("month:{}", self.month_label()))
    }
}

/// Milliseconds on a process-wide monotonic clock, for lease validity.
pub fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Local counts of the current day and month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub day: u64,
    pub day_used: u64,
    pub month: u64,
    pub month_used: u64,
}

impl Counts {
    /// Starts new periods at their boundaries.
    fn roll(&mut self, p: &Periods) {
        if self.day != p.day {
            self.day = p.day;
            self.day_used = 0;
        }
        if self.month != p.month {
            self.month = p.month;
            self.month_used = 0;
        }
    }
}

/// What a request got from a lease.
pub enum Lease {
    /// Taken; the number left.
    Taken(u32),
    /// Nothing left here until the next sync.
    Empty,
    /// No successful sync recently: the store counts as unavailable.
    Stale,
}

/// One tenant's usage state: local quota counters, and in cluster scope the leases
/// this instance holds. Carried over across reloads for as long as the tenant exists.
#[derive(Debug, Default)]
pub struct Usage {
    local: Mutex<Counts>,
    dirty: AtomicBool,
    /// Cluster scope: rate tokens leased from the fleet's bucket, and requests that
    /// asked for one since the last sync.
    pub(crate) rate_tokens: AtomicI64,
    pub(crate) rate_demand: AtomicU64,
    pub(crate) rate_used: AtomicI64,
    /// Cluster scope: quota units leased for the period `lease_day` / `lease_month`.
    pub(crate) lease_day: AtomicI64,
    pub(crate) lease_month: AtomicI64,
    pub(crate) lease_period: AtomicU64,
    pub(crate) quota_demand: AtomicU64,
    /// Requests admitted while the store was unavailable (`on_store_failure = "open"`),
    /// pushed to Redis at the next sync that succeeds.
    pub(crate) pending_day: AtomicI64,
    pub(crate) pending_month: AtomicI64,
    /// The period counters as of the last sync.
    pub(crate) known_day: AtomicI64,
    pub(crate) known_month: AtomicI64,
    pub(crate) generation: AtomicI64,
    /// Instances syncing this tenant, as of the last sync.
    pub(crate) instances: AtomicI64,
    /// Leases count until this [`mono_ms`]; 0 before the first sync.
    pub(crate) valid_until: AtomicU64,
    /// Returns and pushes sent but not acknowledged: sent again as they are.
    pub(crate) outbox: Mutex<Option<SyncRequest>>,
    pub(crate) seq: AtomicU64,
    /// One sync of this tenant at a time (the timer's, or the last one at shutdown).
    pub(crate) sync_turn: tokio::sync::Mutex<()>,
    /// Set at shutdown once the leases have been given back.
    pub(crate) released: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves consistent data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes one unit from `lease` when it has one.
fn take(lease: &AtomicI64) -> Option<i64> {
    lease
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n > 0).then(|| n - 1)
        })
        .ok()
        .map(|n| n - 1)
}

impl Usage {
    pub fn is_valid(&self) -> bool {
        mono_ms() < self.valid_until.load(Ordering::Acquire)
    }

    /// One token of the cluster-wide rate, from this instance's lease.
    pub fn take_rate_token(&self) -> Lease {
        self.rate_demand.fetch_add(1, Ordering::Relaxed);
        if !self.is_valid() {
            return Lease::Stale;
        }
        match take(&self.rate_tokens) {
            Some(left) => {
                self.rate_used.fetch_add(1, Ordering::Relaxed);
                Lease::Taken(u32::try_from(left).unwrap_or(u32::MAX))
            }
            None => Lease::Empty,
        }
    }

    pub fn local_counts(&self) -> Counts {
        let mut c = *lock(&self.local);
        c.roll(&Periods::current());
        c
    }

    /// Drops every lease (after a reset).
    fn drop_leases(&self) {
        self.lease_day.store(0, Ordering::Release);
        self.lease_month.store(0, Ordering::Release);
        self.pending_day.store(0, Ordering::Release);
        self.pending_month.store(0, Ordering::Release);
        self.known_day.store(0, Ordering::Release);
        self.known_month.store(0, Ordering::Release);
        // A pending sync request stays: its quota part belongs to the old generation
        // and is ignored by Redis, its rate part still counts.
    }
}

fn exhausted(period: &'static str, limit: u64, p: &Periods) -> ProxyError {
    let end = if period == "day" {
        p.day_end
    } else {
        p.month_end
    };
    ProxyError::QuotaExhausted {
        period,
        limit,
        retry_after: end.saturating_sub(p.now).max(1),
    }
}

/// Charges one request to the tenant's quotas; the last step of admission.
pub async fn charge(snap: &Snapshot, tenant: &Tenant) -> Result<(), ProxyError> {
    let l = &tenant.configured_limits;
    if l.requests_per_day.is_none() && l.requests_per_month.is_none() {
        return Ok(());
    }
    let usage = &tenant.limits.usage;
    let p = Periods::current();
    match (l.scope, snap.store.as_deref()) {
        (Scope::Cluster, Some(store)) => charge_cluster(store, tenant, &p).await,
        _ => charge_local(usage, l.requests_per_day, l.requests_per_month, &p),
    }
}

fn charge_local(
    usage: &Usage,
    day: Option<u64>,
    month: Option<u64>,
    p: &Periods,
) -> Result<(), ProxyError> {
    let mut c = lock(&usage.local);
    c.roll(p);
    if let Some(limit) = day.filter(|l| c.day_used >= *l) {
        return Err(exhausted("day", limit, p));
    }
    if let Some(limit) = month.filter(|l| c.month_used >= *l) {
        return Err(exhausted("month", limit, p));
    }
    c.day_used += 1;
    c.month_used += 1;
    usage.dirty.store(true, Ordering::Relaxed);
    Ok(())
}

async fn charge_cluster(store: &Store, tenant: &Tenant, p: &Periods) -> Result<(), ProxyError> {
    let l = &tenant.configured_limits;
    let u = &tenant.limits.usage;
    u.quota_demand.fetch_add(1, Ordering::Relaxed);
    if !u.is_valid() {
        return store_down(
            u,
            l.on_store_failure,
            l.requests_per_day,
            l.requests_per_month,
            p,
        );
    }
    // From this instance's leases when it holds units of every configured period.
    if u.lease_period.load(Ordering::Acquire) == p.day {
        let day = l.requests_per_day.map(|_| take(&u.lease_day));
        let month = l.requests_per_month.map(|_| take(&u.lease_month));
        match (day, month) {
            (Some(None), Some(Some(_))) => {
                u.lease_month.fetch_add(1, Ordering::AcqRel);
            }
            (Some(Some(_)), Some(None)) => {
                u.lease_day.fetch_add(1, Ordering::AcqRel);
            }
            (Some(None), _) | (_, Some(None)) => {}
            _ => return Ok(()),
        }
    }
    // None left here: Redis decides this one, within store_timeout.
    let (day, month) = period_syncs(&tenant.id, l.requests_per_day, l.requests_per_month, p);
    match store.reserve(&day, &month).await {
        Ok(Reserved::Ok) => Ok(()),
        Ok(Reserved::DayExhausted) => Err(exhausted("day", day.limit, p)),
        Ok(Reserved::MonthExhausted) => Err(exhausted("month", month.limit, p)),
        Err(_) => store_down(
            u,
            l.on_store_failure,
            l.requests_per_day,
            l.requests_per_month,
            p,
        ),
    }
}

/// The store did not answer: "closed" refuses; "open" admits while the last counts
/// Redis reported plus what this instance admitted since stay under the quota, and
/// keeps what it admitted to push to Redis once it answers again.
fn store_down(
    u: &Usage,
    policy: OnStoreFailure,
    day: Option<u64>,
    month: Option<u64>,
    p: &Periods,
) -> Result<(), ProxyError> {
    if policy == OnStoreFailure::Closed {
        return Err(ProxyError::StoreUnavailable);
    }
    let same_period = u.lease_period.load(Ordering::Acquire) == p.day;
    for (limit, known, pending, name) in [
        (day, &u.known_day, &u.pending_day, "day"),
        (month, &u.known_month, &u.pending_month, "month"),
    ] {
        let known = if same_period {
            known.load(Ordering::Acquire)
        } else {
            0
        };
        if let Some(limit) = limit {
            if known + pending.load(Ordering::Acquire) >= i64::try_from(limit).unwrap_or(i64::MAX) {
                return Err(exhausted(name, limit, p));
            }
        }
    }
    u.pending_day.fetch_add(1, Ordering::AcqRel);
    u.pending_month.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// The Redis side of the tenant's two periods (limit 0 = no quota of that period).
pub fn period_syncs(
    tenant: &str,
    day: Option<u64>,
    month: Option<u64>,
    p: &Periods,
) -> (PeriodSync, PeriodSync) {
    (
        PeriodSync {
            limit: day.unwrap_or(0),
            key: p.day_key(tenant),
            expire_at: p.day_end + 86_400,
            ..PeriodSync::default()
        },
        PeriodSync {
            limit: month.unwrap_or(0),
            key: p.month_key(tenant),
            expire_at: p.month_end + 86_400,
            ..PeriodSync::default()
        },
    )
}

// ---------------------------------------------------------------- local state file

/// `server.state_dir`: local-scope counters saved across restarts.
#[derive(Debug, Default)]
pub struct Quotas {
    dir: Option<PathBuf>,
    saved: Mutex<HashMap<String, Counts>>,
    /// Serialises writers (the flush timer and shutdown).
    writing: Mutex<()>,
}

#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    tenants: HashMap<String, Counts>,
}

const STATE_FILE: &str = "quotas.json";

impl Quotas {
    /// Reads `dir/quotas.json` when there is one.
    pub fn open(dir: Option<PathBuf>) -> Quotas {
        let saved = dir
            .as_ref()
            .and_then(|d| match std::fs::read(d.join(STATE_FILE)) {
                Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                    Ok(f) => Some(f.tenants),
                    Err(e) => {
                        tracing::warn!(dir = %d.display(), error = %e, "quota state file unreadable; counting from zero");
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot read the quota state file; counting from zero");
                    None
                }
            })
            .unwrap_or_default();
        Quotas {
            dir,
            saved: Mutex::new(saved),
            writing: Mutex::new(()),
        }
    }

    /// Gives a tenant new to this process the counts saved by the last run.
    pub fn restore(&self, tenant: &str, usage: &Usage) {
        if let Some(c) = lock(&self.saved).remove(tenant) {
            *lock(&usage.local) = c;
        }
    }

    /// Writes every tenant's local counts when any changed (or `force`), through a
    /// temporary file renamed over the old one.
    pub fn flush(&self, snap: &Snapshot, force: bool) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let _guard = lock(&self.writing);
        let mut changed = force;
        let mut file = StateFile::default();
        for t in &snap.tenants {
            let u = &t.limits.usage;
            changed |= u.dirty.swap(false, Ordering::AcqRel);
            let c = *lock(&u.local);
            if c != Counts::default() {
                file.tenants.insert(t.id.to_string(), c);
            }
        }
        if !changed {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(STATE_FILE))
    }
}

// ---------------------------------------------------------------- admin and metrics

fn period_json(
    label: String,
    used: i64,
    limit: Option<u64>,
    end: u64,
    now: u64,
) -> serde_json::Value {
    let used = used.max(0) as u64;
    serde_json::json!({
        "period": label,
        "used": used,
        "limit": limit,
        "remaining": limit.map(|l| l.saturating_sub(used)),
        "resets_at": humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(end)).to_string(),
        "resets_in_seconds": end.saturating_sub(now),
    })
}

/// `GET /tenants/{id}/usage`: the status and JSON body.
pub async fn usage(snap: &Snapshot, id: &str) -> (u16, serde_json::Value) {
    let Some(idx) = snap.tenant_by_id(id) else {
        return not_found(id);
    };
    let t = snap.tenant(idx);
    let l = &t.configured_limits;
    let u = &t.limits.usage;
    let p = Periods::current();
    let (day, month, store) = match (l.scope, snap.store.as_deref()) {
        (Scope::Cluster, Some(store)) => {
            let (d, m) = period_syncs(&t.id, l.requests_per_day, l.requests_per_month, &p);
            let pending = (
                u.pending_day.load(Ordering::Acquire),
                u.pending_month.load(Ordering::Acquire),
            );
            match store.usage(&d.key, &m.key).await {
                Ok((d, m)) => (d + pending.0, m + pending.1, Some("up")),
                Err(_) => (
                    u.known_day.load(Ordering::Acquire) + pending.0,
                    u.known_month.load(Ordering::Acquire) + pending.1,
                    Some("unavailable"),
                ),
            }
        }
        _ => {
            let c = u.local_counts();
            (c.day_used as i64, c.month_used as i64, None)
        }
    };
    let scope = match l.scope {
        Scope::Local => "local",
        Scope::Cluster => "cluster",
    };
    (
        200,
        serde_json::json!({
            "tenant": id,
            "scope": scope,
            "store": store,
            // Whether this instance holds current leases (synced within 4 × sync_interval + store_timeout).
            "synced": store.map(|_| u.is_valid()),
            "day": period_json(p.day_label(), day, l.requests_per_day, p.day_end, p.now),
            "month": period_json(p.month_label(), month, l.requests_per_month, p.month_end, p.now),
        }),
    )
}

/// `POST /tenants/{id}/usage/reset`: both periods start again from zero.
pub async fn reset(snap: &Snapshot, id: &str) -> (u16, serde_json::Value) {
    let Some(idx) = snap.tenant_by_id(id) else {
        return not_found(id);
    };
    let t = snap.tenant(idx);
    let u = &t.limits.usage;
    let p = Periods::current();
    if let (Scope::Cluster, Some(store)) = (t.configured_limits.scope, snap.store.as_deref()) {
        let (d, m) = period_syncs(&t.id, None, None, &p);
        match store.reset(&t.id, &d.key, &m.key).await {
            Ok(generation) => {
                u.drop_leases();
                u.generation.store(generation, Ordering::Release);
            }
            Err(e) => {
                return (
                    503,
                    serde_json::json!({"error": "store_unavailable", "message": format!("the shared store did not answer: {e}")}),
                )
            }
        }
    }
    *lock(&u.local) = Counts::default();
    u.dirty.store(true, Ordering::Release);
    tracing::info!(tenant = id, "quota usage reset");
    usage(snap, id).await
}

fn not_found(id: &str) -> (u16, serde_json::Value) {
    (
        404,
        serde_json::json!({"error": "unknown_tenant", "message": format!("no tenant {id:?} is configured")}),
    )
}

/// `bulkhead_quota_used` / `bulkhead_quota_limit` samples: (tenant, period, used, limit).
pub fn samples(snap: &Snapshot) -> Vec<(&str, &'static str, f64, f64)> {
    let mut out = Vec::new();
    for t in &snap.tenants {
        let l = &t.configured_limits;
        let u = &t.limits.usage;
        let (day, month) = match (l.scope, &snap.store) {
            (Scope::Cluster, Some(_)) => {
                let same = u.lease_period.load(Ordering::Acquire) == Periods::current().day;
                let known = |k: &AtomicI64| if same { k.load(Ordering::Acquire) } else { 0 };
                (
                    known(&u.known_day) + u.pending_day.load(Ordering::Acquire),
                    known(&u.known_month) + u.pending_month.load(Ordering::Acquire),
                )
            }
            _ => {
                let c = u.local_counts();
                (c.day_used as i64, c.month_used as i64)
            }
        };
        for (period, used, limit) in [
            ("day", day, l.requests_per_day),
            ("month", month, l.requests_per_month),
        ] {
            if let Some(limit) = limit {
                out.push((&*t.id, period, used.max(0) as f64, limit as f64));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_in_utc() {
        // 2026-11-27T07:00:00Z
        let p = Periods::at(1_795_762_800);
        assert_eq!(p.day_label(), "2026-11-27");
        assert_eq!(p.month_label(), "2026-11");
        assert_eq!(p.day_end, 1_795_824_000); // 2026-11-28T00:00:00Z
        assert_eq!(p.month_end, 1_796_083_200); // 2026-12-01T00:00:00Z
                                                // December rolls into January of the next year; 2028 is a leap year.
        let p = Periods::at(1_798_761_600 - 1); // 2026-12-31T23:59:59Z
        assert_eq!(p.month_label(), "2026-12");
        assert_eq!(p.month_end, 1_798_761_600);
        assert_eq!(Periods::at(p.month_end).month_label(), "2027-01");
        let p = Periods::at(days_from_civil(2028, 2, 29) as u64 * 86_400);
        assert_eq!(p.day_label(), "2028-02-29");
        assert_eq!(p.month_end, days_from_civil(2028, 3, 1) as u64 * 86_400);
    }

    #[test]
    fn local_counts_roll_over() {
        let u = Usage::default();
        let p = Periods::at(1_795_762_800);
        for _ in 0..3 {
            charge_local(&u, Some(3), None, &p).unwrap();
        }
        let e = charge_local(&u, Some(3), None, &p).unwrap_err();
        assert_eq!(
            e,
            ProxyError::QuotaExhausted {
                period: "day",
                limit: 3,
                retry_after: 61_200
            }
        );
        // The next day starts from zero; the month keeps counting.
        let next = Periods::at(p.day_end);
        charge_local(&u, Some(3), Some(4), &next).unwrap();
        assert!(charge_local(&u, Some(3), Some(4), &next).is_err());
    }
}
