//! The usage admin endpoints (`GET /tenants/{id}/usage`, `POST …/usage/reset`) and
//! the samples of `bulkhead_quota_used` / `bulkhead_quota_limit`, from the state in
//! `quota.rs`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::UNIX_EPOCH;

use crate::config::Scope;
use crate::quota::{period_syncs, Periods};
use crate::snapshot::Snapshot;

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
        // A retry of a reset that got no answer is the same reset (the same id):
        // Redis starts one new generation for both, not two.
        let reset_id = u.reset_id();
        match store.reset(&t.id, &d.key, &m.key, reset_id).await {
            Ok((generation, again)) => {
                u.reset_answered(reset_id);
                if again {
                    tracing::info!(tenant = id, generation, "quota usage reset: the one sent earlier without an answer had taken effect; not applied twice");
                    return usage(snap, id).await;
                }
                u.drop_leases();
                u.generation.store(generation, Ordering::Release);
            }
            Err(e) => {
                // A reset sent but not answered in time may still run when Redis gets
                // to it: say so, rather than that it failed.
                let message = match e {
                    crate::store::StoreError::Timeout => format!("the shared store did not answer within store_timeout; the reset may still take effect when it does: check GET /tenants/{id}/usage, or send it again"),
                    e => format!("the shared store did not answer: {e}"),
                };
                return (
                    503,
                    serde_json::json!({"error": "store_unavailable", "message": message}),
                );
            }
        }
    }
    u.reset_local();
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
