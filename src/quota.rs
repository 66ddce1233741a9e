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

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{OnStoreFailure, Scope};
use crate::error::ProxyError;
pub use crate::periods::Periods;
use crate::snapshot::{Snapshot, Tenant};
use crate::store::{PeriodSync, Reserved, Store, SyncRequest};

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
    /// Of `*_used`, what was taken over from Redis when the tenant's scope changed
    /// from cluster to local: counted there already, so not pushed back if it
    /// changes to cluster again.
    #[serde(default)]
    pub day_base: u64,
    #[serde(default)]
    pub month_base: u64,
}

impl Counts {
    /// Starts new periods at their boundaries.
    fn roll(&mut self, p: &Periods) {
        if self.day != p.day {
            self.day = p.day;
            self.day_used = 0;
            self.day_base = 0;
        }
        if self.month != p.month {
            self.month = p.month;
            self.month_used = 0;
            self.month_base = 0;
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
    /// The epoch of the tenant's keys in Redis at the last sync (see `store::SYNC_LUA`).
    pub(crate) epoch: AtomicI64,
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
    /// Reserves in Redis (the slow path, no leased unit): those waiting for their
    /// answer, and those that got none in time, for the next sync to settle.
    pub(crate) reserves: Mutex<Reserves>,
    /// A usage reset sent to Redis without an answer in time: its id, and when. An
    /// operator's retry within [`RESET_RETRY_WINDOW`] sends the same id again.
    pub(crate) unanswered_reset: Mutex<Option<(u64, Instant)>>,
    pub(crate) reset_seq: AtomicU64,
    /// Where the counts live now: [`MODE_LOCAL`] or [`MODE_CLUSTER`] (0 before the first
    /// request). A reload may change the tenant's scope; the first charge (or sync)
    /// in the new scope carries the count over, under the `local` lock.
    mode: AtomicU8,
}

const MODE_LOCAL: u8 = 1;
const MODE_CLUSTER: u8 = 2;

/// How long a usage reset that got no answer in time may be retried as the same
/// reset (see `usage::reset`).
pub const RESET_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Usage {
    /// The id of a usage reset about to be sent: the unanswered one's, if recent.
    pub(crate) fn reset_id(&self) -> u64 {
        let mut pending = lock(&self.unanswered_reset);
        match *pending {
            Some((id, at)) if at.elapsed() < RESET_RETRY_WINDOW => id,
            _ => {
                let id = self.reset_seq.fetch_add(1, Ordering::AcqRel) + 1;
                *pending = Some((id, Instant::now()));
                id
            }
        }
    }

    /// The reset `id` was answered: a next reset is a new one.
    pub(crate) fn reset_answered(&self, id: u64) {
        let mut pending = lock(&self.unanswered_reset);
        if pending.is_some_and(|(p, _)| p == id) {
            *pending = None;
        }
    }
}

/// A tenant's reserves not settled yet (see [`Usage::reserves`]).
#[derive(Debug, Default)]
pub(crate) struct Reserves {
    /// The last id handed out.
    last: u64,
    in_flight: BTreeSet<u64>,
    /// (id, admitted here anyway): no answer in time, not yet sent in a sync.
    unsettled: Vec<(u64, bool)>,
}

impl Reserves {
    /// What a new sync request settles: the unsettled reserves, and the floor below
    /// which every id has had its answer or is settled (the lowest one still waiting
    /// bounds it).
    pub(crate) fn take(&mut self) -> (Vec<(u64, bool)>, u64) {
        let floor = self.in_flight.first().map_or(self.last, |first| first - 1);
        (std::mem::take(&mut self.unsettled), floor)
    }
}

/// One reserve on its way to Redis. Dropped unanswered (the client went away while
/// it waited), it is settled as a request this instance did not admit.
struct Ticket<'a> {
    usage: &'a Usage,
    id: u64,
    done: bool,
}

impl<'a> Ticket<'a> {
    fn new(usage: &'a Usage) -> Ticket<'a> {
        let mut r = lock(&usage.reserves);
        r.last += 1;
        let id = r.last;
        r.in_flight.insert(id);
        Ticket {
            usage,
            id,
            done: false,
        }
    }

    /// Redis answered: nothing to settle.
    fn answered(mut self) {
        lock(&self.usage.reserves).in_flight.remove(&self.id);
        self.done = true;
    }

    /// No answer in time: `decide` applies `on_store_failure` (and counts the request
    /// in the pending push when it admits it) under the same lock a sync takes the
    /// pending counts and the unsettled reserves with, so both go in one request.
    fn unanswered(
        mut self,
        decide: impl FnOnce() -> Result<(), ProxyError>,
    ) -> Result<(), ProxyError> {
        let mut r = lock(&self.usage.reserves);
        let result = decide();
        r.in_flight.remove(&self.id);
        r.unsettled.push((self.id, result.is_ok()));
        self.done = true;
        result
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut r = lock(&self.usage.reserves);
            r.in_flight.remove(&self.id);
            r.unsettled.push((self.id, false));
        }
    }
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

    /// The counts of a local-scope tenant.
    pub fn local_counts(&self) -> Counts {
        let p = Periods::current();
        let mut c = lock(&self.local);
        self.enter_local(&mut c, &p);
        c.roll(&p);
        *c
    }

    /// A tenant whose scope was cluster until a reload counts locally from now on,
    /// starting from the best this instance knows: Redis' count at its last sync
    /// (less the units it had leased and will not use now) plus what it admitted
    /// while Redis was unavailable and had not pushed yet.
    fn enter_local(&self, c: &mut Counts, p: &Periods) {
        if self.mode.load(Ordering::Acquire) == MODE_LOCAL {
            return;
        }
        if self.mode.swap(MODE_LOCAL, Ordering::AcqRel) == MODE_CLUSTER {
            let synced = Periods::at(self.lease_period.load(Ordering::Acquire) * 86_400);
            let from_redis = |same: bool, known: &AtomicI64, lease: &AtomicI64| {
                let n = known.load(Ordering::Acquire) - lease.load(Ordering::Acquire);
                if same {
                    u64::try_from(n).unwrap_or(0)
                } else {
                    0
                }
            };
            let day = from_redis(synced.day == p.day, &self.known_day, &self.lease_day);
            let month = from_redis(
                synced.month == p.month,
                &self.known_month,
                &self.lease_month,
            );
            let pending = |n: &AtomicI64| u64::try_from(n.swap(0, Ordering::AcqRel)).unwrap_or(0);
            *c = Counts {
                day: p.day,
                day_used: day + pending(&self.pending_day),
                day_base: day,
                month: p.month,
                month_used: month + pending(&self.pending_month),
                month_base: month,
            };
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// A tenant whose scope was local (until a reload, or in the last run, saved in
    /// `state_dir`) counts in Redis from now on: what this instance admitted locally
    /// in the current periods is pushed with the next sync, once.
    pub(crate) fn enter_cluster(&self, p: &Periods) {
        if self.mode.load(Ordering::Acquire) == MODE_CLUSTER {
            return;
        }
        let mut c = lock(&self.local);
        if self.mode.swap(MODE_CLUSTER, Ordering::AcqRel) == MODE_CLUSTER {
            return;
        }
        c.roll(p);
        let local = |used: u64, base: u64| i64::try_from(used.saturating_sub(base)).unwrap_or(0);
        self.pending_day
            .fetch_add(local(c.day_used, c.day_base), Ordering::AcqRel);
        self.pending_month
            .fetch_add(local(c.month_used, c.month_base), Ordering::AcqRel);
        // Counted in Redis from now on: nothing left to save in state_dir.
        *c = Counts::default();
        self.dirty.store(true, Ordering::Release);
    }

    /// Zeroes the local counts (a reset); they are saved at the next flush.
    pub(crate) fn reset_local(&self) {
        *lock(&self.local) = Counts::default();
        self.dirty.store(true, Ordering::Release);
    }

    /// Drops every lease (after a reset).
    pub(crate) fn drop_leases(&self) {
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
    if !tenant.has_quota {
        return Ok(());
    }
    let l = &tenant.configured_limits;
    let usage = &tenant.limits.usage;
    let p = Periods::current();
    match (l.scope, snap.store.as_deref()) {
        // Boxed: the Redis round trip is rare, and its future would otherwise make
        // every request's future larger (it is moved when a request task is spawned).
        (Scope::Cluster, Some(store)) => Box::pin(charge_cluster(store, tenant, &p)).await,
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
    usage.enter_local(&mut c, p);
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
        // Also the first charges after a switch from local scope (see `enter_cluster`;
        // the sync does the same): off the path of a request that finds a leased unit.
        u.enter_cluster(p);
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
    u.enter_cluster(p);
    let (day, month) = period_syncs(&tenant.id, l.requests_per_day, l.requests_per_month, p);
    let ticket = Ticket::new(u);
    let answer = match store.reserve(&tenant.id, &day, &month, ticket.id).await {
        Ok(answer) => {
            ticket.answered();
            Ok(answer)
        }
        Err(_) => Err(ticket),
    };
    match answer {
        Ok(Reserved::Ok) => {
            // Counted in Redis now: this instance's idea of the count follows before
            // its next sync (it is what a switch to local scope starts from).
            if l.requests_per_day.is_some() {
                u.known_day.fetch_add(1, Ordering::AcqRel);
            }
            if l.requests_per_month.is_some() {
                u.known_month.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        }
        Ok(Reserved::DayExhausted) => Err(exhausted("day", day.limit, p)),
        Ok(Reserved::MonthExhausted) => Err(exhausted("month", month.limit, p)),
        // Redis may still apply it (a timeout) or may have (a connection lost after
        // sending): the next sync settles it either way.
        Err(ticket) => ticket.unanswered(|| {
            store_down(
                u,
                l.on_store_failure,
                l.requests_per_day,
                l.requests_per_month,
                p,
            )
        }),
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
            .and_then(|d| match crate::file::read(&d.join(STATE_FILE)) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
