//! The shared store of cluster scope: a Redis server (or a Redis Cluster) reached
//! through the `redis` crate's reconnecting connections, on which every instance runs
//! the atomic Lua scripts of `scripts.rs`. Nothing here runs on the request path except
//! [`Store::reserve`], which a request calls only when its instance holds no quota lease
//! (and then for at most `store_timeout`).
//!
//! Keys carry the tenant in a hash tag, `bulkhead:{TENANT}:…`, so one script only ever
//! touches one slot: the scripts run unchanged on a Redis Cluster.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Script};

use crate::config::ClusterSettings;
use crate::scripts::{RESERVE_LUA, RESET_LUA, SYNC_LUA, USAGE_LUA};

/// Why a store call failed. Either way the caller applies `on_store_failure`.
#[derive(Debug)]
pub enum StoreError {
    /// No answer within `store_timeout`.
    Timeout,
    /// Not connected yet, connection refused or reset, or an error reply.
    Redis(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("no answer within store_timeout"),
            StoreError::Redis(e) => f.write_str(e),
        }
    }
}

enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// The connection to Redis and the settings of `[cluster]`. One per process; a change
/// of `[cluster]` needs a restart.
pub struct Store {
    pub settings: ClusterSettings,
    /// Tells this process's leases apart from those of an earlier run of the same
    /// `instance_id` (a restart must not look like a replay).
    pub boot_id: String,
    conn: ArcSwapOption<Conn>,
    /// `bulkhead_store_errors_total`.
    errors: AtomicU64,
    /// Whether the last call succeeded: a `warn` is logged on each change to down.
    up: AtomicBool,
    sync: Lua,
    reserve: Lua,
    reset: Lua,
    usage: Lua,
}

/// A script and its SHA-1, run by [`invoke`].
struct Lua {
    code: &'static str,
    hash: String,
    /// Always sent whole (EVAL), never by hash: see [`Store::reset`].
    whole: bool,
}

impl Lua {
    fn new(code: &'static str) -> Lua {
        Lua {
            code,
            hash: Script::new(code).get_hash().to_owned(),
            whole: false,
        }
    }

    /// `EVALSHA hash` (or `EVAL code` when `whole`) with these keys and arguments.
    fn cmd(&self, whole: bool, keys: &[&str], args: &[String]) -> Cmd {
        let mut c = if whole {
            let mut c = redis::cmd("EVAL");
            c.arg(self.code);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.hash);
            c
        };
        c.arg(keys.len()).arg(keys).arg(args);
        c
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("settings", &self.settings)
            .field("errors", &self.errors())
            .finish()
    }
}

/// What one instance tells Redis about one tenant at a sync, and asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncRequest {
    /// Idempotency: the returns and pushes below are applied once per `seq`.
    pub seq: u64,
    pub rate_per_second: f64,
    pub burst: u64,
    /// Unused rate tokens given back, tokens used (or dropped) since the last
    /// request, and how many more are wanted now.
    pub rate_return: i64,
    pub rate_used: i64,
    pub rate_want: i64,
    pub day: PeriodSync,
    pub month: PeriodSync,
    /// The quota generation the returns and pushes belong to (a reset starts a new one).
    pub generation: i64,
    /// Reserves ([`Store::reserve`]) that got no answer in time, settled by this
    /// request: (reserve id, whether this instance admitted the request anyway and
    /// counts it in `push`). Redis knows whether each one was applied.
    pub unsettled: Vec<(u64, bool)>,
    /// Every reserve id up to this one has had its answer or is in `unsettled` (here
    /// or in an earlier request): one that reaches Redis only now is not applied.
    pub reserve_floor: u64,
    /// Rate tokens this instance still holds once `rate_return` and `rate_used` are
    /// applied, and the period counts as of its last sync: what Redis takes over when
    /// it has lost its data since (`epoch` differs from its own).
    pub rate_held: i64,
    pub known_day: i64,
    pub known_month: i64,
    /// The epoch of the tenant's keys at this instance's last sync; 0 = none yet.
    pub epoch: i64,
}

/// One quota period of a [`SyncRequest`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeriodSync {
    /// `requests_per_day` / `_month`; 0 = no quota of this period.
    pub limit: u64,
    pub key: String,
    /// Unix time at which the key may go (the end of the period plus a day).
    pub expire_at: u64,
    /// Unused leased units given back.
    pub give_back: i64,
    /// Requests admitted while the store was unreachable (`on_store_failure = "open"`).
    pub push: i64,
    pub want: i64,
}

/// Redis' answer to a [`SyncRequest`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncReply {
    pub rate_grant: i64,
    pub day_grant: i64,
    pub month_grant: i64,
    /// Units counted in the period (admitted plus leased and not yet given back).
    pub day_used: i64,
    pub month_used: i64,
    pub generation: i64,
    /// Instances that synced this tenant within the last few seconds.
    pub instances: i64,
    /// The epoch of the tenant's keys: new when Redis lost its data.
    pub epoch: i64,
}

/// The answer of [`Store::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    Ok,
    DayExhausted,
    MonthExhausted,
}

/// The keys of one tenant.
pub fn key(tenant: &str, what: &str) -> String {
    format!("bulkhead:{{{tenant}}}:{what}")
}

/// How long an instance counts as a member after its last sync.
const MEMBER_TTL_MS: u64 = 3_000;

impl Store {
    pub fn new(settings: ClusterSettings) -> Store {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Store {
            settings,
            boot_id: format!("{boot:x}-{}", std::process::id()),
            conn: ArcSwapOption::empty(),
            errors: AtomicU64::new(0),
            up: AtomicBool::new(true),
            sync: Lua::new(SYNC_LUA),
            reserve: Lua::new(RESERVE_LUA),
            reset: Lua {
                whole: true,
                ..Lua::new(RESET_LUA)
            },
            usage: Lua::new(USAGE_LUA),
        }
    }

    /// `bulkhead_store_errors_total`.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Sets up the connection (on the runtime that will drive it). The connection is
    /// made lazily and re-made after every failure, with backoff capped at 200 ms so
    /// that limiting resumes quickly once Redis is back.
    pub async fn connect(&self) -> Result<(), StoreError> {
        let conn = if self.settings.nodes.len() > 1 {
            let client = redis::cluster::ClusterClient::builder(self.settings.nodes.clone())
                .connection_timeout(self.settings.store_timeout.max(Duration::from_millis(100)))
                .response_timeout(self.settings.store_timeout)
                .build()
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            let c = tokio::time::timeout(Duration::from_secs(2), client.get_async_connection())
                .await
                .map_err(|_| StoreError::Timeout)?
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            Conn::Cluster(c)
        } else {
            let url = self.settings.nodes.first().map_or("", |s| s.as_str());
            let client = redis::Client::open(url).map_err(|e| StoreError::Redis(e.to_string()))?;
            let config = ConnectionManagerConfig::new()
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(200))
                .set_number_of_retries(2)
                .set_connection_timeout(Some(
                    self.settings.store_timeout.max(Duration::from_millis(100)),
                ))
                .set_response_timeout(None);
            let m = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            Conn::Single(m)
        };
        self.conn.store(Some(Arc::new(conn)));
        Ok(())
    }

    /// Says why calls time out: the reconnecting connection hides its connect errors
    /// behind the deadline, so each node is tried once on a connection of its own and
    /// what it answers is logged (by address: a URL may carry a password). Once per
    /// change to down, off the request path.
    fn diagnose(&self) {
        let nodes = self.settings.nodes.clone();
        let deadline = self.settings.store_timeout.max(Duration::from_secs(2));
        tokio::spawn(async move {
            for url in nodes {
                let Ok(client) = redis::Client::open(url.as_str()) else {
                    continue;
                };
                let node = node_name(client.get_connection_info().addr());
                match tokio::time::timeout(deadline, client.get_multiplexed_async_connection())
                    .await
                {
                    Ok(Ok(mut c)) => {
                        let ping: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
                        match ping {
                            Ok(_) => {
                                tracing::warn!(%node, "Redis node accepts connections and answers PING, but not within store_timeout: it is slow or far")
                            }
                            Err(e) => tracing::warn!(%node, error = %e, "Redis node refuses calls"),
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(%node, error = %e, "cannot reach Redis node"),
                    Err(_) => {
                        tracing::warn!(%node, ?deadline, "cannot reach Redis node: no connection within the deadline")
                    }
                }
            }
        });
    }

    /// The `warn` line of a change to down. redis-rs passes on what Redis answers an
    /// unauthenticated client — "NOAUTH Authentication required", or, for a call with
    /// many arguments, "Protocol error: unauthenticated multibulk length" and a closed
    /// connection — which does not say what to change: this does (by address; a URL
    /// may carry a password).
    fn warn_down(&self, e: &StoreError) {
        let text = e.to_string();
        let auth = text.contains("NOAUTH") || text.contains("unauthenticated");
        let refused = text.contains("WRONGPASS") || text.contains("AuthenticationFailed");
        if !auth && !refused {
            tracing::warn!(error = %e, "the shared store (Redis) is unavailable; applying on_store_failure");
            return;
        }
        let nodes: Vec<(String, bool)> = self
            .settings
            .nodes
            .iter()
            .filter_map(|url| {
                let info = redis::Client::open(url.as_str())
                    .ok()?
                    .get_connection_info()
                    .clone();
                Some((
                    node_name(info.addr()),
                    info.redis_settings().password().is_some(),
                ))
            })
            .collect();
        let node = nodes
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if auth && nodes.iter().all(|(_, password)| !password) {
            tracing::warn!(%node, error = %e, "the shared store (Redis) is unavailable: Redis requires authentication and the redis URL carries no password (redis://:PASSWORD@HOST:PORT/DB, or USER:PASSWORD@ for an ACL user); applying on_store_failure");
        } else {
            tracing::warn!(%node, error = %e, "the shared store (Redis) is unavailable: Redis refused the user name or password of the redis URL; applying on_store_failure");
        }
    }

    /// Runs `script` with a deadline of `store_timeout`, counting and logging failures.
    async fn run<T: FromRedisValue>(
        &self,
        script: &Lua,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, StoreError> {
        let result = match self.conn.load_full() {
            None => Err(StoreError::Redis("not connected to Redis yet".to_owned())),
            Some(conn) => {
                let call = async {
                    match &*conn {
                        Conn::Single(c) => invoke(script, keys, args, &mut c.clone()).await,
                        Conn::Cluster(c) => invoke(script, keys, args, &mut c.clone()).await,
                    }
                };
                match tokio::time::timeout(self.settings.store_timeout, call).await {
                    Ok(Ok(v)) => Ok(v),
                    // The cluster connection's own deadline (also `store_timeout`).
                    Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout),
                    Ok(Err(e)) => Err(StoreError::Redis(e.to_string())),
                    Err(_) => Err(StoreError::Timeout),
                }
            }
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("the shared store (Redis) answers again");
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    self.warn_down(e);
                    if matches!(e, StoreError::Timeout) {
                        self.diagnose();
                    }
                }
            }
        }
        result
    }

    /// One tenant's reconciliation: returns, pushes and new leases, in one atomic script.
    pub async fn sync(&self, tenant: &str, r: &SyncRequest) -> Result<SyncReply, StoreError> {
        let keys = [
            key(tenant, "rate"),
            key(tenant, "members"),
            r.day.key.clone(),
            r.month.key.clone(),
            key(tenant, "generation"),
            key(tenant, "applied"),
            key(tenant, "held"),
            self.reserved_key(tenant),
            key(tenant, "epoch"),
        ];
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args = [
            self.settings.instance_id.clone(),
            self.boot_id.clone(),
            r.seq.to_string(),
            format!("{}", r.rate_per_second),
            r.burst.to_string(),
            r.rate_return.to_string(),
            r.rate_want.to_string(),
            r.day.limit.to_string(),
            r.day.give_back.to_string(),
            r.day.push.to_string(),
            r.day.want.to_string(),
            r.day.expire_at.to_string(),
            r.month.limit.to_string(),
            r.month.give_back.to_string(),
            r.month.push.to_string(),
            r.month.want.to_string(),
            r.month.expire_at.to_string(),
            r.generation.to_string(),
            MEMBER_TTL_MS.to_string(),
            r.rate_used.to_string(),
            r.reserve_floor.to_string(),
            r.unsettled
                .iter()
                .map(|(id, admitted)| format!("{id}:{}", u8::from(*admitted)))
                .collect::<Vec<_>>()
                .join(","),
            r.rate_held.to_string(),
            r.epoch.to_string(),
            r.known_day.to_string(),
            r.known_month.to_string(),
        ];
        let v: Vec<i64> = self.run(&self.sync, &keys, &args).await?;
        match v[..] {
            [rate_grant, day_grant, month_grant, day_used, month_used, generation, instances, epoch] => {
                Ok(SyncReply {
                    rate_grant,
                    day_grant,
                    month_grant,
                    day_used,
                    month_used,
                    generation,
                    instances,
                    epoch,
                })
            }
            _ => Err(StoreError::Redis(
                "unexpected reply to the sync script".into(),
            )),
        }
    }

    /// One unit of each configured period, decided by Redis atomically. `id` numbers
    /// this reserve (per tenant, from 1 up, in this process): one without an answer in
    /// time is settled by a later sync ([`SyncRequest::unsettled`]).
    pub async fn reserve(
        &self,
        tenant: &str,
        day: &PeriodSync,
        month: &PeriodSync,
        id: u64,
    ) -> Result<Reserved, StoreError> {
        let keys = [
            day.key.clone(),
            month.key.clone(),
            self.reserved_key(tenant),
            key(tenant, "applied"),
            key(tenant, "generation"),
        ];
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args = [
            day.limit.to_string(),
            day.expire_at.to_string(),
            month.limit.to_string(),
            month.expire_at.to_string(),
            self.member(),
            id.to_string(),
        ];
        let v: i64 = self.run(&self.reserve, &keys, &args).await?;
        match v {
            0 => Ok(Reserved::Ok),
            1 => Ok(Reserved::DayExhausted),
            2 => Ok(Reserved::MonthExhausted),
            // Only an id a sync has settled already, which no request waits for.
            _ => Err(StoreError::Redis(format!(
                "reserve {id} was settled already"
            ))),
        }
    }

    /// This instance and boot, as the scripts name it.
    fn member(&self) -> String {
        format!("{}/{}", self.settings.instance_id, self.boot_id)
    }

    /// The reserves of `tenant` this instance and boot had applied, not yet settled.
    fn reserved_key(&self, tenant: &str) -> String {
        key(tenant, &format!("reserved:{}", self.member()))
    }

    /// Zeroes the current periods' counters and starts a new quota generation, once per
    /// `id` (per tenant, in this process): the generation, and whether this `id` had
    /// been applied already. Sent whole (EVAL), so that one not answered in time still
    /// runs once Redis gets to it, as the admin endpoint's 503 says it may.
    pub async fn reset(
        &self,
        tenant: &str,
        day_key: &str,
        month_key: &str,
        id: u64,
    ) -> Result<(i64, bool), StoreError> {
        let (gen, applied) = (key(tenant, "generation"), key(tenant, "applied"));
        let v: Vec<i64> = self
            .run(
                &self.reset,
                &[day_key, month_key, &gen, &applied],
                &[self.member(), id.to_string()],
            )
            .await?;
        match v[..] {
            [g, again] => Ok((g, again == 1)),
            _ => Err(StoreError::Redis(
                "unexpected reply to the reset script".into(),
            )),
        }
    }

    /// The current periods' counters.
    pub async fn usage(&self, day_key: &str, month_key: &str) -> Result<(i64, i64), StoreError> {
        let v: Vec<i64> = self.run(&self.usage, &[day_key, month_key], &[]).await?;
        match v[..] {
            [d, m] => Ok((d, m)),
            _ => Err(StoreError::Redis(
                "unexpected reply to the usage script".into(),
            )),
        }
    }
}

/// A node by address, never by URL (a URL may carry a password).
fn node_name(addr: &redis::ConnectionAddr) -> String {
    match addr {
        redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (TLS)"),
        other => other.to_string(),
    }
}

/// Runs `script` by its hash; when Redis does not know it (NOSCRIPT: never loaded, or
/// lost with a restart or a `SCRIPT FLUSH`), sends it whole (EVAL both loads and runs
/// it, in one round trip) — within the caller's deadline, like the first attempt.
/// redis-rs's `ScriptInvocation::invoke_async` does the same with SCRIPT LOAD and a
/// second EVALSHA, on the single and the cluster connection alike; but a call whose
/// deadline passed is dropped, and its NOSCRIPT, once the stalled Redis answers it, is
/// answered by nobody: that call never runs. Hence [`Lua::whole`] for the one call
/// that must still take effect after a timeout (the reset).
async fn invoke<C: ConnectionLike + Send, T: FromRedisValue>(
    script: &Lua,
    keys: &[&str],
    args: &[String],
    conn: &mut C,
) -> redis::RedisResult<T> {
    match script.cmd(script.whole, keys, args).query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.cmd(true, keys, args).query_async(conn).await
        }
        other => other,
    }
}
