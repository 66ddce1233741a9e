//! The background side of cluster scope and quotas, run on the admin thread: every
//! `sync_interval` each cluster-scope tenant is reconciled with Redis (one atomic Lua
//! script per tenant: give back unused leases, push what was admitted while Redis was
//! away, take new leases), and every second local-scope quota counters are saved to
//! `server.state_dir`. The request path only reads the leases this task leaves in each
//! tenant's [`Usage`]; it never waits on this task.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::config::Scope;
use crate::quota::{self, mono_ms, Periods, Usage};
use crate::server::Shared;
use crate::snapshot::Tenant;
use crate::store::{Store, SyncRequest};

/// How often local quota counters are saved when they changed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs until the admin runtime stops.
pub async fn run(shared: Arc<Shared>) {
    let store = shared.snapshot.load().store.clone();
    let flush = tokio::spawn(flush_loop(shared.clone()));
    if let Some(store) = store {
        sync_loop(shared, store).await;
    }
    let _ = flush.await;
}

async fn flush_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = shared.snapshot.load_full();
        let quotas = snap.quotas.clone();
        let result = tokio::task::spawn_blocking(move || quotas.flush(&snap, false)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "cannot save quota counters to server.state_dir");
        }
    }
}

async fn sync_loop(shared: Arc<Shared>, store: Arc<Store>) {
    let every = store.settings.sync_interval;
    let mut backoff = Duration::from_millis(50);
    while let Err(e) = store.connect().await {
        tracing::warn!(error = %e, "cannot set up the Redis connection; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    // Each wait is drawn between 0.75 and 1.25 × `every`. With fixed ticks, the
    // instances' phases stayed put, and under overload the one whose sync came longest
    // after another's found the refill each time: one instance got nearly every token
    // and the other's clients nothing (0 of 203 in 10 s, two instances at 20 rps). With
    // the phases drifting at random, each is first after the refill as often.
    let mut random = crate::xorshift(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
            | 1,
    );
    let mut jittered =
        move || every.mul_f64(0.75 + (random() >> 11) as f64 / (1u64 << 53) as f64 / 2.0);
    // The first round only joins (see `sync_tenant`); the second, right after it,
    // takes the first leases; the waits come after.
    let mut rounds = 0u64;
    loop {
        if rounds > 1 {
            tokio::time::sleep(jittered()).await;
        }
        rounds = rounds.saturating_add(1);
        let snap = shared.snapshot.load_full();
        let mut tasks = JoinSet::new();
        for (i, t) in snap.tenants.iter().enumerate() {
            if t.configured_limits.scope != Scope::Cluster {
                continue;
            }
            let (snap, store) = (snap.clone(), store.clone());
            tasks.spawn(async move {
                let t = &snap.tenants[i];
                let _turn = t.limits.usage.sync_turn.lock().await;
                if !t.limits.usage.released.load(Ordering::Acquire) {
                    sync_tenant(&store, t, false).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// At shutdown, once the workers have drained: local quota counters are saved, and
/// every lease goes back to Redis, so a restart does not find units counted that this
/// instance leased and never used.
pub async fn shutdown(shared: &Shared) {
    let snap = shared.snapshot.load_full();
    if let Err(e) = snap.quotas.flush(&snap, true) {
        tracing::warn!(error = %e, "cannot save quota counters to server.state_dir");
    }
    let Some(store) = snap.store.clone() else {
        return;
    };
    if !store.is_connected() {
        return;
    }
    let cluster = snap
        .tenants
        .iter()
        .filter(|t| t.configured_limits.scope == Scope::Cluster);
    for t in cluster {
        let u = &t.limits.usage;
        let _turn = u.sync_turn.lock().await;
        u.released.store(true, Ordering::Release);
        // A request still unacknowledged goes first, then the one that gives back.
        for _ in 0..2 {
            sync_tenant(&store, t, true).await;
        }
    }
}

/// One tenant's reconciliation with Redis; `last` gives everything back and takes
/// nothing.
async fn sync_tenant(store: &Store, t: &Tenant, last: bool) {
    let u = &t.limits.usage;
    let l = &t.configured_limits;
    let p = Periods::current();
    let (mut day, mut month) =
        quota::period_syncs(&t.id, l.requests_per_day, l.requests_per_month, &p);
    let rate = l
        .requests_per_second
        .map(|r| (r, l.burst.unwrap_or(r.ceil() as u64).max(1)));
    // The first sync only joins: leasing before knowing how many instances share the
    // tenant would take a share meant for N instances as if this one were alone.
    let joined = u.instances.load(Ordering::Acquire) > 0;
    let instances = u.instances.load(Ordering::Acquire).max(1);

    // Rate: keep about twice last interval's demand here (at least a fair part of
    // half the burst, so a burst arriving at an idle instance is not refused at once);
    // give back the excess.
    let rate_demand = u.rate_demand.swap(0, Ordering::AcqRel) as i64;
    let rate_target = rate.filter(|_| !last).map_or(0, |(_, b)| {
        let b = b as i64;
        (2 * rate_demand)
            .max(ceil_div(b, 2 * instances))
            .clamp(1, b)
    });
    let quota_demand = u.quota_demand.swap(0, Ordering::AcqRel) as i64;
    // A tenant that was local until a reload: its local count goes in this push.
    u.enter_cluster(&p);

    let mut req = {
        let mut outbox = quota_lock(u);
        match outbox.as_ref() {
            // Not acknowledged yet: the same request again, even across a period
            // boundary (Redis applies it once per seq and answers it again).
            Some(r) => r.clone(),
            None => {
                let mut r = SyncRequest {
                    seq: u.seq.fetch_add(1, Ordering::AcqRel) + 1,
                    generation: u.generation.load(Ordering::Acquire),
                    ..SyncRequest::default()
                };
                if u.is_valid() {
                    let have = u.rate_tokens.load(Ordering::Acquire);
                    if have > rate_target {
                        r.rate_return = take_up_to(&u.rate_tokens, have - rate_target);
                    }
                } else {
                    // A lapsed lease is dropped, never given back: Redis may have freed
                    // this instance's holding meanwhile.
                    r.rate_used = u.rate_tokens.swap(0, Ordering::AcqRel);
                }
                r.rate_used += u.rate_used.swap(0, Ordering::AcqRel);
                // Quota leases go back whole at every sync and are granted afresh, so
                // units never sit unused on an idle instance for long.
                // Units of a period that has ended are not given back to the new one.
                let leased = Periods::at(u.lease_period.load(Ordering::Acquire) * 86_400);
                let back_day = u.lease_day.swap(0, Ordering::AcqRel);
                let back_month = u.lease_month.swap(0, Ordering::AcqRel);
                if leased.day == p.day {
                    day.give_back = back_day;
                }
                if leased.month == p.month {
                    month.give_back = back_month;
                }
                // The pushes and the reserves to settle are taken together: a reserve
                // admitted here is in the push it settles (see `quota::Ticket`).
                {
                    let mut reserves = u.reserves.lock().unwrap_or_else(|e| e.into_inner());
                    day.push = u.pending_day.swap(0, Ordering::AcqRel);
                    month.push = u.pending_month.swap(0, Ordering::AcqRel);
                    (r.unsettled, r.reserve_floor) = reserves.take();
                }
                // Should Redis have lost its data since the last sync, it takes these over.
                r.rate_held = u.rate_tokens.load(Ordering::Acquire).max(0);
                r.epoch = u.epoch.load(Ordering::Acquire);
                if leased.day == p.day {
                    r.known_day = u.known_day.load(Ordering::Acquire);
                }
                if leased.month == p.month {
                    r.known_month = u.known_month.load(Ordering::Acquire);
                }
                r.day = day.clone();
                r.month = month.clone();
                *outbox = Some(r.clone());
                r
            }
        }
    };
    if let Some((per_second, burst)) = rate {
        req.rate_per_second = per_second;
        req.burst = burst;
        req.rate_want = (rate_target - u.rate_tokens.load(Ordering::Acquire)).max(0);
    }
    if !joined || last {
        req.rate_want = 0;
    }
    // A request resent from an earlier period leases nothing for it.
    let current = req.day.key == day.key && req.month.key == month.key;
    let want = |configured: Option<u64>| {
        if configured.is_some() && current && !last {
            2 * quota_demand
        } else {
            0
        }
    };
    req.day.want = want(l.requests_per_day);
    req.month.want = want(l.requests_per_month);

    match store.sync(&t.id, &req).await {
        Ok(reply) => {
            *quota_lock(u) = None;
            if reply.generation != u.generation.load(Ordering::Acquire) {
                // A reset elsewhere: what this instance held belongs to the old counts.
                u.generation.store(reply.generation, Ordering::Release);
            }
            u.rate_tokens.fetch_add(reply.rate_grant, Ordering::AcqRel);
            u.lease_period.store(p.day, Ordering::Release);
            if current {
                u.lease_day.fetch_add(reply.day_grant, Ordering::AcqRel);
                u.lease_month.fetch_add(reply.month_grant, Ordering::AcqRel);
                u.known_day.store(reply.day_used, Ordering::Release);
                u.known_month.store(reply.month_used, Ordering::Release);
            }
            u.instances.store(reply.instances, Ordering::Release);
            u.epoch.store(reply.epoch, Ordering::Release);
            // Leases are reservations, so using them is safe for as long as Redis keeps
            // this instance's holding; they lapse much sooner so that a store outage is
            // noticed within a few intervals.
            let valid = store.settings.sync_interval * 4 + store.settings.store_timeout;
            u.valid_until.store(
                mono_ms() + u64::try_from(valid.as_millis()).unwrap_or(u64::MAX),
                Ordering::Release,
            );
        }
        Err(e) => {
            tracing::debug!(tenant = %t.id, error = %e, "sync with Redis failed");
        }
    }
}

fn quota_lock(u: &Usage) -> std::sync::MutexGuard<'_, Option<SyncRequest>> {
    u.outbox.lock().unwrap_or_else(|e| e.into_inner())
}

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b.max(1)
}

/// Takes up to `n` from `lease` (never below zero); returns how many were taken.
fn take_up_to(lease: &std::sync::atomic::AtomicI64, n: i64) -> i64 {
    match lease.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        Some(cur - n.min(cur.max(0)))
    }) {
        Ok(before) => n.min(before.max(0)),
        Err(_) => 0,
    }
}
