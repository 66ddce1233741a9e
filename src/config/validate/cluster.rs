//! `[cluster]`: the Redis node or the seed nodes of a Redis Cluster, and the store's
//! timings and instance id.

use super::*;

impl Validator<'_> {
    /// `[cluster]`, validated; `None` without one or without `redis`.
    pub(super) fn cluster(&mut self, f: &FileConfig) -> Option<ClusterSettings> {
        let c = f.cluster.as_ref()?;
        let span = c.span();
        let c = c.get_ref();
        let Some(redis) = &c.redis else {
            self.error(
                span,
                "[cluster] needs `redis`, e.g. redis = \"redis://127.0.0.1:6379/0\"".to_owned(),
            );
            return None;
        };
        let nodes = match redis.get_ref() {
            RedisNodes::One(u) => vec![u.clone()],
            RedisNodes::Many(v) => v.clone(),
        };
        if nodes.is_empty() {
            self.error(redis.span(), "`cluster.redis` names no node".to_owned());
        }
        let mut tls_modes = Vec::new();
        let mut seeds = Vec::new();
        for url in &nodes {
            // Messages name the node without its password: they reach the log, a
            // reload's 422 answer and `GET /config/history`.
            let n = without_password(url);
            // Our own reading first: redis-rs says "Redis URL did not parse" for most
            // mistakes (a bad port, a missing host, a scheme it does not take).
            if let Some(why) = redis_url_problem(url, &n, nodes.len() > 1) {
                self.error(redis.span(), format!("`cluster.redis`: {why}"));
                continue;
            }
            match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                // What the reading above does not look at (a `?protocol=` it does not
                // know, a password that is not UTF-8 once decoded), in its words.
                Err(e) => self.error(
                    redis.span(),
                    format!("`cluster.redis`: the Redis client refuses {n:?}: {e}"),
                ),
                Ok(info) => {
                    tls_modes.push(matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }));
                    seeds.push((n, info));
                }
            }
        }
        if nodes.len() > 1 {
            self.cluster_seeds(redis.span(), &seeds);
        }
        if tls_modes.iter().any(|t| *t) && tls_modes.iter().any(|t| !*t) {
            self.error(
                redis.span(),
                "`cluster.redis` mixes redis:// and rediss:// nodes: the nodes of one cluster are all reached with TLS or all without".to_owned(),
            );
        }
        let dur = |d: &Option<Spanned<Dur>>, default_ms: u64| {
            d.as_ref()
                .map_or((0..0, Duration::from_millis(default_ms)), |d| {
                    (d.span(), d.get_ref().0)
                })
        };
        let (sync_span, sync_interval) = dur(&c.sync_interval, 50);
        let (timeout_span, store_timeout) = dur(&c.store_timeout, 20);
        if sync_interval < Duration::from_millis(1) || sync_interval > Duration::from_secs(60) {
            self.error(
                sync_span,
                "`cluster.sync_interval` must be between 1ms and 60s".to_owned(),
            );
        }
        if store_timeout < Duration::from_millis(1) || store_timeout > Duration::from_secs(10) {
            self.error(
                timeout_span,
                "`cluster.store_timeout` must be between 1ms and 10s".to_owned(),
            );
        }
        let instance_id = match &c.instance_id {
            Some(id)
                if id.get_ref().trim().is_empty()
                    || id.get_ref().chars().count() > 128
                    || id.get_ref().chars().any(char::is_control) =>
            {
                self.error(
                    id.span(),
                    "`cluster.instance_id` must be 1 to 128 characters, not all spaces, no control characters".to_owned(),
                );
                String::new()
            }
            Some(id) => id.get_ref().clone(),
            None => hostname(),
        };
        Some(ClusterSettings {
            nodes,
            instance_id,
            sync_interval,
            store_timeout,
        })
    }

    /// The seed nodes of a Redis Cluster (`n`, the URL with its user and password
    /// masked, and what the client reads from it). redis-rs's cluster client reaches
    /// every node, the seeds and the ones the cluster announces, as the first seed
    /// says: its user, password, protocol and database. It refuses a later seed that
    /// names another only when connecting, and not at all when the first names none
    /// (the others' password was dropped, and Redis answered NOAUTH). A database other
    /// than 0 is refused by Redis Cluster itself (`SELECT is not allowed in cluster
    /// mode`), on every connection.
    fn cluster_seeds(
        &mut self,
        span: std::ops::Range<usize>,
        seeds: &[(String, redis::ConnectionInfo)],
    ) {
        let Some((first_n, first)) = seeds.first() else {
            return;
        };
        let a = first.redis_settings();
        for (n, info) in &seeds[1..] {
            let b = info.redis_settings();
            let differs: Vec<&str> = [
                (a.username() != b.username(), "user"),
                (a.password() != b.password(), "password"),
                (a.protocol() != b.protocol(), "protocol (?protocol=)"),
            ]
            .into_iter()
            .filter_map(|(d, what)| d.then_some(what))
            .collect();
            if !differs.is_empty() {
                self.error(
                    span.clone(),
                    format!(
                        "`cluster.redis`: {n:?} differs from {first_n:?} in its {}; the client reaches every node of a Redis Cluster (the seeds and the nodes the cluster announces) with one user, password and protocol, the first seed's, so the seeds name the same",
                        differs.join(" and ")
                    ),
                );
            }
        }
        let with_db: Vec<String> = seeds
            .iter()
            .filter(|(_, info)| info.redis_settings().db() != 0)
            .map(|(n, info)| format!("{n:?} (database {})", info.redis_settings().db()))
            .collect();
        if !with_db.is_empty() {
            self.error(
                span,
                format!(
                    "`cluster.redis`: a Redis Cluster has only database 0 (it refuses SELECT of another), so its seed nodes name /0 or no database, not {}",
                    with_db.join(", ")
                ),
            );
        }
    }
}
