//! The limits tables, `[defaults.limits]` and `[tenants.ID.limits]`: each value on
//! its own, and what a key says across tables (a burst and its rate, a scope and
//! its store).

use super::*;

impl Validator<'_> {
    pub(super) fn limits(&mut self, l: &LimitsConfig) {
        for (key, r) in [
            ("requests_per_second", &l.requests_per_second),
            (
                "per_client_requests_per_second",
                &l.per_client_requests_per_second,
            ),
        ] {
            if let Some(r) = r {
                let v = r.get_ref().0;
                // Below 1e-9 (one request in 32 years) the time per request no longer
                // fits a `Duration`: building the limiter would panic.
                if !(v.is_finite() && (1e-9..=1e9).contains(&v)) {
                    self.error(
                        r.span(),
                        format!(
                            "`{key}` must be between 1e-9 and 1e9 (requests per second), not {v}"
                        ),
                    );
                }
            }
        }
        for (key, b) in [
            ("burst", &l.burst),
            ("per_client_burst", &l.per_client_burst),
        ] {
            if let Some(b) = b {
                if !valid_burst(*b.get_ref()) {
                    self.error(
                        b.span(),
                        format!("`{key}` must be at least 1 (and fit in 32 bits)"),
                    );
                }
            }
        }
        if let Some(b) = &l.max_body {
            if b.get_ref().0 < 1 {
                self.error(b.span(), "`max_body` must be positive".to_owned());
            }
        }
        if let Some(m) = &l.max_in_flight {
            if *m.get_ref() < 1 {
                self.error(m.span(), "`max_in_flight` must be positive".to_owned());
            }
        }
        for (key, q) in [
            ("requests_per_day", &l.requests_per_day),
            ("requests_per_month", &l.requests_per_month),
        ] {
            if let Some(q) = q {
                if *q.get_ref() < 1 || *q.get_ref() > 1 << 50 {
                    self.error(
                        q.span(),
                        format!("`{key}` must be at least 1 (and at most 2^50)"),
                    );
                }
            }
        }
    }

    /// `on_store_failure` says what a cluster-scope tenant gets while Redis is away; on
    /// a table whose limits are local it would say nothing, silently.
    pub(super) fn store_failure_needs_cluster_scope(&mut self, f: &FileConfig) {
        let cluster = |l: &LimitsConfig| {
            l.scope
                .as_ref()
                .is_some_and(|s| *s.get_ref() == Scope::Cluster)
        };
        let defaults_cluster = cluster(&f.defaults.limits);
        let any_cluster = defaults_cluster || f.tenants.values().any(|t| cluster(&t.limits));
        if let Some(o) = &f.defaults.limits.on_store_failure {
            if !any_cluster {
                self.error(
                    o.span(),
                    "[defaults.limits] on_store_failure applies to scope = \"cluster\" limits, and no table has them: it would change nothing".to_owned(),
                );
            }
        }
        for (id, t) in &f.tenants {
            let scoped = match &t.limits.scope {
                Some(s) => *s.get_ref() == Scope::Cluster,
                None => defaults_cluster,
            };
            if let (Some(o), false) = (&t.limits.on_store_failure, scoped) {
                self.error(
                    o.span(),
                    format!("[tenants.{}.limits] on_store_failure applies to scope = \"cluster\" limits, and this tenant's are local: it would change nothing", id.get_ref()),
                );
            }
        }
    }

    /// A `burst` sizes the bucket of a rate: one that no table's rate goes with
    /// limits nothing, where its author meant a limit.
    pub(super) fn burst_needs_rate(&mut self, f: &FileConfig) {
        // Each burst of a limits table, whether the table sets its rate, and their keys.
        let bursts = |l: &LimitsConfig| {
            [
                (
                    l.burst.clone(),
                    l.requests_per_second.is_some(),
                    "burst",
                    "requests_per_second",
                ),
                (
                    l.per_client_burst.clone(),
                    l.per_client_requests_per_second.is_some(),
                    "per_client_burst",
                    "per_client_requests_per_second",
                ),
            ]
        };
        // An invalid burst has its own error.
        let valid = |b: Option<Spanned<u64>>| b.filter(|b| valid_burst(*b.get_ref()));
        let defaults = bursts(&f.defaults.limits);
        for (i, (burst, rate, bkey, rkey)) in defaults.iter().cloned().enumerate() {
            let Some(b) = valid(burst) else { continue };
            // Taken by a tenant with a rate of its own and no burst of its own.
            let taken = rate
                || f.tenants.values().any(|t| {
                    let (own_burst, own_rate, ..) = &bursts(&t.limits)[i];
                    *own_rate && own_burst.is_none()
                });
            if !taken {
                self.error(
                    b.span(),
                    format!("[defaults.limits] {bkey} goes with no `{rkey}`, here or in a tenant without a {bkey} of its own: it would limit nothing"),
                );
                continue;
            }
            if rate {
                continue;
            }
            // Taken by some, so valid (a default burst for the tenants that set a
            // rate); but a tenant with neither ends up with the burst and no rate.
            let idle: Vec<String> = f
                .tenants
                .iter()
                .filter(|(_, t)| {
                    let (own_burst, own_rate, ..) = &bursts(&t.limits)[i];
                    !*own_rate && own_burst.is_none()
                })
                .map(|(id, _)| format!("{:?}", id.get_ref()))
                .collect();
            let who = match idle.as_slice() {
                [] => continue,
                [one] => format!("tenant {one}: it has no `{rkey}`"),
                many => format!("tenants {}: none of them has a `{rkey}`", many.join(", ")),
            };
            self.warn(
                b.span(),
                format!("[defaults.limits] {bkey} limits nothing for {who} (of its own or in [defaults.limits]), and a {bkey} only sizes the bucket of that rate"),
            );
        }
        for (id, t) in &f.tenants {
            for (i, (burst, rate, bkey, rkey)) in bursts(&t.limits).into_iter().enumerate() {
                let Some(b) = valid(burst) else { continue };
                if !rate && !defaults[i].1 {
                    self.error(
                        b.span(),
                        format!("[tenants.{}.limits] {bkey} without `{rkey}` (here or in [defaults.limits]) would limit nothing: set the rate, or leave the {bkey} out", id.get_ref()),
                    );
                }
            }
        }
    }

    /// Without a usable `[cluster] redis`, no `scope = "cluster"` can work.
    pub(super) fn cluster_scope_needs_redis(&mut self, f: &FileConfig) {
        let tables = std::iter::once(("[defaults.limits]".to_owned(), &f.defaults.limits)).chain(
            f.tenants
                .iter()
                .map(|(id, t)| (format!("[tenants.{}.limits]", id.get_ref()), &t.limits)),
        );
        for (table, l) in tables {
            if let Some(s) = l.scope.as_ref().filter(|s| *s.get_ref() == Scope::Cluster) {
                self.error(
                    s.span(),
                    format!("{table} scope = \"cluster\" needs `redis` in a [cluster] table (a redis:// URL shared by every instance)"),
                );
            }
        }
    }

    /// A daily quota above the monthly one never applies: the month's runs out first.
    /// Valid; a warning at the table that sets the pair, once (at the defaults when
    /// both are theirs).
    pub(super) fn day_quota_over_month(&mut self, f: &FileConfig) {
        let d = &f.defaults.limits;
        let tables = std::iter::once(("[defaults.limits]".to_owned(), d, None)).chain(
            f.tenants.iter().map(|(id, t)| {
                (
                    format!("[tenants.{}.limits]", id.get_ref()),
                    &t.limits,
                    Some(d),
                )
            }),
        );
        for (table, l, defaults) in tables {
            // A tenant's own value, or the defaults'; at least one of the pair its own.
            if l.requests_per_day.is_none() && l.requests_per_month.is_none() {
                continue;
            }
            let day = (l.requests_per_day.as_ref())
                .or(defaults.and_then(|d| d.requests_per_day.as_ref()));
            let month = (l.requests_per_month.as_ref())
                .or(defaults.and_then(|d| d.requests_per_month.as_ref()));
            let (Some(day), Some(month)) = (day, month) else {
                continue;
            };
            let (dv, mv) = (*day.get_ref(), *month.get_ref());
            if dv > mv {
                let at = l
                    .requests_per_day
                    .as_ref()
                    .or(l.requests_per_month.as_ref())
                    .map_or(day.span(), |q| q.span());
                self.warn(
                    at,
                    format!("{table} `requests_per_day` ({dv}) is more than `requests_per_month` ({mv}): the monthly quota runs out first, so the daily one never applies"),
                );
            }
        }
    }
}
