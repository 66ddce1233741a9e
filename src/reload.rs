//! Reload: read `gateway.toml` again, validate, build a whole new snapshot off the
//! hot path and swap it in atomically. A failed reload changes nothing.
//!
//! Every trigger (file watcher, `SIGHUP`, `POST /reload`) ends in [`reload`]. This
//! module also owns the reload bookkeeping: the config in force (for diffs), the last
//! [`HISTORY_LEN`] attempts, the success / failure counters and the audit log.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use crate::config::{line_col, version_of, Config, NotText, ResolvedTenant};
use crate::file::AppendError;
use crate::server::Shared;
use crate::snapshot::Snapshot;

/// How many reload attempts `GET /config/history` keeps.
pub const HISTORY_LEN: usize = 50;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The configuration the process started with.
    Startup,
    /// The file watcher saw the file change.
    File,
    /// `SIGHUP`.
    Signal,
    /// `POST /reload` on the admin listener.
    Admin,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Startup => "startup",
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
}

/// One tenant whose settings differ between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantChange {
    pub tenant: String,
    /// The names of the fields that changed, as written in `gateway.toml`
    /// (`upstream`, `limits.burst`, …), after `[defaults]` is merged in.
    pub fields: Vec<&'static str>,
}

/// Upstream pools added, removed, or whose targets changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<TenantChange>,
    pub upstreams: UpstreamChanges,
    /// Gateway-wide keys that changed (`tenancy.resolve`, `server.audit_log`, …).
    pub settings: Vec<&'static str>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// One reload attempt, as `GET /config/history` and the audit log show it.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub trigger: Trigger,
    pub result: Outcome,
    /// The version of the file that was read (`null` when it could not be read).
    pub version: Option<String>,
    /// The version in force before this attempt (`null` at startup). After a failure
    /// it is still the one in force.
    pub previous_version: Option<String>,
    pub error: Option<String>,
    #[serde(flatten)]
    pub changes: Changes,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// Reload bookkeeping, held by [`Shared`]. Reloads are serialised by its lock, so
/// two triggers at once run one after the other and each diffs against the config
/// the other left in force.
pub struct ReloadState {
    inner: Mutex<Inner>,
    /// The last [`HISTORY_LEN`] attempts, oldest first. A lock of its own: a reload
    /// holds `inner` while it reads and builds the new config (seconds with a very
    /// large one), and `GET /config/history`, answered on the admin thread, must not
    /// wait for that (health checks on the same thread would wait with it). Taken
    /// after `inner` when both are.
    history: Mutex<VecDeque<Arc<HistoryEntry>>>,
    /// Entries pushed since startup: which history `encoded` is of.
    pushed: AtomicU64,
    /// The history as `GET /config/history` sends it, made once per change and shared
    /// by every answer until the next (with a large config an entry's change lists
    /// run to thousands of ids, and an answer may be held while a slow client reads).
    encoded: Mutex<Option<(u64, bytes::Bytes)>>,
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// Milliseconds since the Unix epoch of the last successful load (startup included).
    last_success_ms: AtomicU64,
}

struct Inner {
    /// The config in force.
    config: Config,
    /// The version of the last file that was rejected (or, for a file that could not
    /// be read, `unreadable: ` and the error): the watcher does not try the same bytes,
    /// or report the same error, twice.
    last_rejected: Option<String>,
}

impl ReloadState {
    /// Starts the bookkeeping for the config the process started with, and records it
    /// in the history and the audit log. An audit log that is not a regular file (a
    /// FIFO, a device) is an error: the gateway does not start.
    pub fn new(config: &Config) -> Result<ReloadState, String> {
        let audit_log = open_audit(config.audit_log.as_deref())
            .map_err(|why| format!("{}: {why}", config.path.display()))?;
        let now = SystemTime::now();
        let entry = HistoryEntry {
            time: now,
            trigger: Trigger::Startup,
            result: Outcome::Success,
            version: Some(config.version.clone()),
            previous_version: None,
            error: None,
            changes: Changes::default(),
        };
        audit(audit_log, &entry);
        Ok(ReloadState {
            inner: Mutex::new(Inner {
                config: config.clone(),
                last_rejected: None,
            }),
            history: Mutex::new(VecDeque::from([Arc::new(entry)])),
            pushed: AtomicU64::new(1),
            encoded: Mutex::new(None),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(unix_ms(now)),
        })
    }

    /// Reloads that succeeded since startup (`config_reloads_total{result="success"}`).
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Reloads that were rejected since startup (`config_reloads_total{result="failure"}`).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// When the config in force was last loaded successfully (startup included), for
    /// `config_last_reload_success_timestamp_seconds`.
    pub fn last_success(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.last_success_ms.load(Ordering::Relaxed))
    }

    /// The last [`HISTORY_LEN`] attempts, newest first, and how many entries had been
    /// pushed then.
    fn history(&self) -> (u64, Vec<Arc<HistoryEntry>>) {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let pushed = self.pushed.load(Ordering::Relaxed);
        (pushed, history.iter().rev().cloned().collect())
    }

    /// The history as JSON (an array, newest first), encoded once per change: answers
    /// between two changes share the same bytes. Blocks while it encodes.
    pub fn history_json(&self) -> serde_json::Result<bytes::Bytes> {
        let current = self.pushed.load(Ordering::Relaxed);
        let lock = || self.encoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bytes)) = &*lock() {
            if *at == current {
                return Ok(bytes.clone());
            }
        }
        let (at, history) = self.history();
        let entries: Vec<&HistoryEntry> = history.iter().map(|e| &**e).collect();
        let bytes = bytes::Bytes::from(serde_json::to_vec(&entries)?);
        let mut cached = lock();
        // Unless a newer history was encoded meanwhile.
        if cached.as_ref().is_none_or(|(c, _)| *c < at) {
            *cached = Some((at, bytes.clone()));
        }
        Ok(bytes)
    }

    /// A copy of the config in force.
    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    /// The certificate, key and CA files of the config in force.
    pub fn tls_files(&self) -> Vec<std::path::PathBuf> {
        self.lock().config.tls_files.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind: every field is
        // replaced whole, so the poison flag can be ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reloads the file the gateway was started with. Returns the version now in force,
/// or the error message (`PATH:LINE:COL: message` lines) while the old config keeps
/// serving. Re-reading an unchanged file succeeds without swapping anything.
pub fn reload(shared: &Shared, trigger: Trigger) -> Result<String, String> {
    attempt(shared, trigger, false).unwrap_or_else(|| Ok(shared.snapshot.load().version.clone()))
}

/// For the file watcher: reloads only when the file's bytes differ both from the
/// config in force and from the last file rejected. `None` when nothing was tried.
pub fn reload_if_changed(shared: &Shared) -> Option<Result<String, String>> {
    attempt(shared, Trigger::File, true)
}

fn attempt(shared: &Shared, trigger: Trigger, only_if_new: bool) -> Option<Result<String, String>> {
    let state = &shared.reload;
    let mut inner = state.lock();
    let path = inner.config.path.clone();
    let previous = inner.config.version.clone();
    let text = match read(&path) {
        Ok(t) => t,
        // An editor or a ConfigMap swap may leave the path missing for a moment; the
        // next event will find the file again.
        Err(Unreadable::Missing(e)) if only_if_new => {
            tracing::debug!(path = %path.display(), error = %e, "config file missing; waiting for the next change");
            return None;
        }
        Err(Unreadable::Missing(e) | Unreadable::Io(e)) => {
            let msg = format!("{}:1:1: cannot read the file: {e}", path.display());
            // The watcher reports the same error once, as it does a rejected file.
            let key = format!("unreadable: {e}");
            return reject_once(state, &mut inner, trigger, None, msg, key, only_if_new);
        }
        Err(Unreadable::NotUtf8 { version, line, col }) => {
            if only_if_new && inner.last_rejected.as_deref() == Some(version.as_str()) {
                return None;
            }
            let msg = format!(
                "{}:{line}:{col}: the file is not valid UTF-8",
                path.display()
            );
            return Some(Err(reject(state, &mut inner, trigger, Some(version), msg)));
        }
    };
    let version = version_of(&text);
    // With certificate files in force the text alone does not tell whether anything
    // changed: parse and compare the full version below.
    if only_if_new
        && inner.config.tls_files.is_empty()
        && (version == previous || inner.last_rejected.as_deref() == Some(version.as_str()))
    {
        return None;
    }
    let new = match Config::parse(&path, &text) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            // The certificate files the text names are read by the parse, so the same
            // text may fail otherwise, or pass, when they change: the same rejection
            // is the same text with the same error. (With certificates in force every
            // event in the directory comes here; reporting it again at each one made
            // a loop with the gateway's own log in the directory.)
            let key = format!("{version} {msg}");
            return reject_once(
                state,
                &mut inner,
                trigger,
                Some(version),
                msg,
                key,
                only_if_new,
            );
        }
    };
    // A config that reads certificate files has a version that covers their bytes too.
    let version = new.version.clone();
    if only_if_new
        && (version == previous || inner.last_rejected.as_deref() == Some(version.as_str()))
    {
        return None;
    }
    if let Some(msg) = needs_restart(&shared.config, &new, &text) {
        return Some(Err(reject(state, &mut inner, trigger, Some(version), msg)));
    }
    let now = SystemTime::now();
    if version == previous {
        tracing::info!(%trigger, %version, "configuration file unchanged; nothing to apply");
        state.succeeded.fetch_add(1, Ordering::Relaxed);
        state.last_success_ms.store(unix_ms(now), Ordering::Relaxed);
        inner.last_rejected = None;
        let entry = HistoryEntry {
            time: now,
            trigger,
            result: Outcome::Success,
            version: Some(version.clone()),
            previous_version: Some(previous),
            error: None,
            changes: Changes::default(),
        };
        push(state, entry);
        return Some(Ok(version));
    }

    let built = {
        let current = shared.snapshot.load();
        Snapshot::build(&new, Some(&current))
    };
    let snapshot = match built {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{}: {e}", path.display());
            return Some(Err(reject(state, &mut inner, trigger, Some(version), msg)));
        }
    };
    // Opened before the swap: an audit log that is not a regular file refuses the
    // reload, as `check` refuses it, rather than applying a change it cannot record.
    let audit_log = match open_audit(new.audit_log.as_deref()) {
        Ok(f) => f,
        Err(why) => {
            let (line, col) = key_position(&text, "server.audit_log");
            let msg = format!("{}:{line}:{col}: {why}", path.display());
            // As for a parse error: the same text may pass once the path holds a
            // file, so the watcher tries it again then, but reports this once.
            let key = format!("{version} {msg}");
            return reject_once(
                state,
                &mut inner,
                trigger,
                Some(version),
                msg,
                key,
                only_if_new,
            );
        }
    };
    let changes = diff(&inner.config, &new);
    shared.snapshot.store(Arc::new(snapshot));
    if new.tenants.is_empty() && !inner.config.tenants.is_empty() {
        // Legitimate (a gateway being emptied), but also what a truncated file looks
        // like: say so where alerts look.
        tracing::warn!(%trigger, %version, removed = changes.removed.len(), "the new configuration has no tenants: every request is answered 404 unknown_tenant");
    }

    state.succeeded.fetch_add(1, Ordering::Relaxed);
    state.last_success_ms.store(unix_ms(now), Ordering::Relaxed);
    tracing::info!(
        %trigger,
        %version,
        previous = %previous,
        added = changes.added.len(),
        removed = changes.removed.len(),
        changed = changes.changed.len(),
        "configuration reloaded"
    );
    crate::lint::log_warnings(&new, &path);
    let entry = HistoryEntry {
        time: now,
        trigger,
        result: Outcome::Success,
        version: Some(version.clone()),
        previous_version: Some(previous),
        error: None,
        changes,
    };
    audit(audit_log, &entry);
    inner.config = new;
    inner.last_rejected = None;
    push(state, entry);
    Some(Ok(version))
}

/// Why the file could not be read as text.
enum Unreadable {
    /// Not there (yet): a file mid-swap.
    Missing(std::io::Error),
    /// Permission denied, a directory in its place, …
    Io(std::io::Error),
    /// Read, but not UTF-8: the position of the first bad byte, and the bytes' version.
    NotUtf8 {
        version: String,
        line: usize,
        col: usize,
    },
}

fn read(path: &Path) -> Result<String, Unreadable> {
    crate::config::read_text(path).map_err(|e| match e {
        NotText::Io(e) if e.kind() == std::io::ErrorKind::NotFound => Unreadable::Missing(e),
        NotText::Io(e) => Unreadable::Io(e),
        NotText::NotUtf8 { bytes, line, col } => Unreadable::NotUtf8 {
            version: version_of(&String::from_utf8_lossy(&bytes)),
            line,
            col,
        },
    })
}

/// [`reject`], once: the file watcher (`only_if_new`) passes over a rejection whose
/// `key` is the last one's in silence, so that each is reported once however many
/// events bring the same file back.
fn reject_once(
    state: &ReloadState,
    inner: &mut Inner,
    trigger: Trigger,
    version: Option<String>,
    msg: String,
    key: String,
    only_if_new: bool,
) -> Option<Result<String, String>> {
    if only_if_new && inner.last_rejected.as_deref() == Some(key.as_str()) {
        return None;
    }
    let msg = reject(state, inner, trigger, version, msg);
    inner.last_rejected = Some(key);
    Some(Err(msg))
}

/// Records a rejected attempt and returns its message.
fn reject(
    state: &ReloadState,
    inner: &mut Inner,
    trigger: Trigger,
    version: Option<String>,
    msg: String,
) -> String {
    state.failed.fetch_add(1, Ordering::Relaxed);
    // One log line, so line-oriented log shippers keep the whole message together.
    tracing::warn!(
        %trigger,
        version = version.as_deref().unwrap_or("-"),
        in_force = %inner.config.version,
        "configuration rejected, the old configuration keeps serving: {}",
        msg.replace('\n', "; ")
    );
    inner.last_rejected.clone_from(&version);
    let entry = HistoryEntry {
        time: SystemTime::now(),
        trigger,
        result: Outcome::Failure,
        version,
        previous_version: Some(inner.config.version.clone()),
        error: Some(msg.clone()),
        changes: Changes::default(),
    };
    push(state, entry);
    msg
}

fn push(state: &ReloadState, entry: HistoryEntry) {
    let mut history = state.history.lock().unwrap_or_else(|e| e.into_inner());
    if history.len() == HISTORY_LEN {
        history.pop_front();
    }
    history.push_back(Arc::new(entry));
    state.pushed.fetch_add(1, Ordering::Relaxed);
}

/// Settings the running process cannot change: the listeners are bound, the worker
/// threads and their connection settings are made, the log format is set, at start.
/// Rejecting the file is better than applying part of it silently.
fn needs_restart(running: &Config, new: &Config, text: &str) -> Option<String> {
    let mut keys = Vec::new();
    if new.listen != running.listen {
        keys.push("server.listen");
    }
    if new.admin_listen != running.admin_listen {
        keys.push("server.admin_listen");
    }
    if new.tls_listen != running.tls_listen {
        keys.push("server.tls_listen");
    }
    if new.redirect_http != running.redirect_http {
        keys.push("server.redirect_http");
    }
    if new.workers != running.workers {
        keys.push("server.workers");
    }
    if new.header_read_timeout != running.header_read_timeout {
        keys.push("server.header_read_timeout");
    }
    if new.shutdown_grace != running.shutdown_grace {
        keys.push("server.shutdown_grace");
    }
    if new.log_format != running.log_format {
        keys.push("server.log_format");
    }
    if new.limiter_prune_interval != running.limiter_prune_interval {
        keys.push("server.limiter_prune_interval");
    }
    if new.max_connections != running.max_connections {
        keys.push("server.max_connections");
    }
    // The Redis connection and the state file are set up once, at start.
    if new.cluster != running.cluster {
        keys.push("[cluster]");
    }
    if new.state_dir != running.state_dir {
        keys.push("server.state_dir");
    }
    // hyper's backstop limit is fixed at start; a larger `max_header_bytes` than it
    // leaves room for would be cut off by hyper with an empty 431.
    if crate::server::hyper_header_limit(new.max_header_bytes)
        > crate::server::hyper_header_limit(running.max_header_bytes)
    {
        keys.push("server.max_header_bytes (raised above what the running listener allows)");
    }
    if keys.is_empty() {
        return None;
    }
    let verb = if keys.len() == 1 {
        "this needs"
    } else {
        "these need"
    };
    let (line, col) = key_position(text, keys[0]);
    Some(format!(
        "{}:{line}:{col}: {} changed; {verb} a restart, so nothing from this file was applied",
        running.path.display(),
        keys.join(", "),
    ))
}

/// Where the restart-only `key` (as [`needs_restart`] names it) is set in `text`: the
/// value, else the `[server]` table (the key was removed), else the file's start.
fn key_position(text: &str, key: &str) -> (usize, usize) {
    #[derive(serde::Deserialize)]
    struct Tables {
        server: Option<toml::Spanned<BTreeMap<String, toml::Spanned<toml::Value>>>>,
        cluster: Option<toml::Spanned<toml::Value>>,
    }
    // The text was parsed whole already; this is a second, partial look at it.
    let Ok(t) = toml::from_str::<Tables>(text) else {
        return (1, 1);
    };
    let span = if key == "[cluster]" {
        t.cluster.map(|c| c.span())
    } else {
        let name = key.trim_start_matches("server.");
        let name = name.split(' ').next().unwrap_or(name);
        t.server
            .map(|s| s.get_ref().get(name).map_or_else(|| s.span(), |v| v.span()))
    };
    span.map_or((1, 1), |s| line_col(text, s.start))
}

/// The tenants, upstreams and settings that differ between `old` and `new`.
pub fn diff(old: &Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    // A merge of the two id-sorted lists: no hashing, and the lists come out sorted.
    // (The file's tables are already in id order, so the sorts are a linear check.)
    let mut old_t: Vec<&ResolvedTenant> = old.tenants.iter().collect();
    let mut new_t: Vec<&ResolvedTenant> = new.tenants.iter().collect();
    old_t.sort_by(|a, b| a.id.cmp(&b.id));
    new_t.sort_by(|a, b| a.id.cmp(&b.id));
    let (mut o, mut n) = (old_t.iter().peekable(), new_t.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some(a), None) => {
                c.removed.push(a.id.clone());
                o.next();
            }
            (None, Some(b)) => {
                c.added.push(b.id.clone());
                n.next();
            }
            (Some(a), Some(b)) => match a.id.cmp(&b.id) {
                std::cmp::Ordering::Less => {
                    c.removed.push(a.id.clone());
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    c.added.push(b.id.clone());
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if a != b {
                        c.changed.push(TenantChange {
                            tenant: b.id.clone(),
                            fields: tenant_fields(a, b),
                        });
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }

    let old_u: BTreeMap<&str, &crate::config::ResolvedUpstream> =
        old.upstreams.iter().map(|u| (u.name.as_str(), u)).collect();
    let new_u: BTreeMap<&str, &crate::config::ResolvedUpstream> =
        new.upstreams.iter().map(|u| (u.name.as_str(), u)).collect();
    for (name, targets) in &new_u {
        match old_u.get(name) {
            None => c.upstreams.added.push((*name).to_owned()),
            Some(o) if o != targets => c.upstreams.changed.push((*name).to_owned()),
            Some(_) => {}
        }
    }
    for name in old_u.keys() {
        if !new_u.contains_key(name) {
            c.upstreams.removed.push((*name).to_owned());
        }
    }

    let mut setting = |changed: bool, key: &'static str| {
        if changed {
            c.settings.push(key);
        }
    };
    setting(old.resolve != new.resolve, "tenancy.resolve");
    setting(old.tenant_header != new.tenant_header, "tenancy.header");
    setting(old.path_prefix != new.path_prefix, "tenancy.path_prefix");
    setting(
        old.forward_header != new.forward_header,
        "tenancy.forward_header",
    );
    setting(
        old.max_header_bytes != new.max_header_bytes,
        "server.max_header_bytes",
    );
    setting(
        old.trusted_proxies != new.trusted_proxies,
        "server.trusted_proxies",
    );
    setting(old.audit_log != new.audit_log, "server.audit_log");
    setting(
        old.tunnel_idle_timeout != new.tunnel_idle_timeout,
        "server.tunnel_idle_timeout",
    );
    setting(
        old.body_idle_timeout != new.body_idle_timeout,
        "server.body_idle_timeout",
    );
    setting(old.access_log != new.access_log, "server.access_log");
    setting(old.metrics != new.metrics, "server.metrics");
    let server_tls = |c: &Config| {
        c.tls
            .as_ref()
            .map(|t| (t.default.fingerprint, t.tls13_only))
    };
    setting(server_tls(old) != server_tls(new), "server.tls");
    // Who may send what as a credential: an audit trail that left these out would
    // show a change of the token's tenant claim, or of the issuer's keys, as nothing.
    setting(
        old.api_key_header != new.api_key_header,
        "tenancy.api_key.header",
    );
    setting(old.jwt_header != new.jwt_header, "tenancy.jwt.header");
    setting(
        old.tenant_claim != new.tenant_claim,
        "tenancy.jwt.tenant_claim",
    );
    setting(old.jwt_cookie != new.jwt_cookie, "tenancy.jwt.cookie");
    setting(old.jwt_leeway != new.jwt_leeway, "tenancy.jwt.leeway");
    let (ja, jb) = (old.jwt_global.as_ref(), new.jwt_global.as_ref());
    setting(
        ja.map(|j| &j.issuer) != jb.map(|j| &j.issuer),
        "tenancy.jwt.issuer",
    );
    setting(
        ja.map(|j| &j.audience) != jb.map(|j| &j.audience),
        "tenancy.jwt.audience",
    );
    setting(
        ja.map(|j| &j.keys) != jb.map(|j| &j.keys),
        "tenancy.jwt.jwks_file",
    );
    c
}

/// The names of the fields of one tenant that differ, `[defaults]` merged in.
fn tenant_fields(a: &ResolvedTenant, b: &ResolvedTenant) -> Vec<&'static str> {
    let mut f = Vec::new();
    let mut field = |changed: bool, name: &'static str| {
        if changed {
            f.push(name);
        }
    };
    field(a.hosts != b.hosts, "hosts");
    field(a.upstream != b.upstream, "upstream");
    field(a.routes != b.routes, "routes");
    field(a.request_timeout != b.request_timeout, "request_timeout");
    field(a.features != b.features, "features");
    field(a.status != b.status, "status");
    field(a.api_keys != b.api_keys, "api_keys");
    field(a.require != b.require, "require");
    field(a.jwt != b.jwt, "jwt");
    field(a.tls != b.tls, "tls");
    let (la, lb) = (&a.limits, &b.limits);
    field(
        la.requests_per_second != lb.requests_per_second,
        "limits.requests_per_second",
    );
    field(la.burst != lb.burst, "limits.burst");
    field(la.max_body != lb.max_body, "limits.max_body");
    field(la.max_in_flight != lb.max_in_flight, "limits.max_in_flight");
    field(
        la.per_client_requests_per_second != lb.per_client_requests_per_second,
        "limits.per_client_requests_per_second",
    );
    field(
        la.per_client_burst != lb.per_client_burst,
        "limits.per_client_burst",
    );
    field(la.scope != lb.scope, "limits.scope");
    field(
        la.on_store_failure != lb.on_store_failure,
        "limits.on_store_failure",
    );
    field(
        la.requests_per_day != lb.requests_per_day,
        "limits.requests_per_day",
    );
    field(
        la.requests_per_month != lb.requests_per_month,
        "limits.requests_per_month",
    );
    if f.is_empty() {
        // A field this list does not name yet: say that something changed rather
        // than nothing.
        f.push("other");
    }
    f
}

/// The audit log, opened for appending without blocking (`file::append`); `Ok(None)`
/// without one. Something other than a regular file at its path is the error: a FIFO
/// would block the open until a reader came (forever, at start or under the reload
/// lock) and every write once its reader fell behind. A file that cannot be opened for
/// another reason (permissions, a missing directory) is logged, as a failed write is:
/// the change applies without its line.
fn open_audit(path: Option<&Path>) -> Result<Option<(&Path, File)>, String> {
    let Some(path) = path else { return Ok(None) };
    match crate::file::append(path) {
        Ok(f) => Ok(Some((path, f))),
        // `check` refuses it already (Config::parse); this is a path that changed since.
        Err(AppendError::NotRegular(kind)) => Err(crate::config::audit_log_not_regular(
            &path.display().to_string(),
            kind,
        )),
        Err(AppendError::Io(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the audit log");
            Ok(None)
        }
    }
}

/// Appends `entry` as one JSON line. A failure to write is logged, never fatal: the
/// config is already in force.
fn audit(log: Option<(&Path, File)>, entry: &HistoryEntry) {
    let Some((path, mut file)) = log else { return };
    let mut line = match serde_json::to_vec(entry) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode an audit log entry");
            return;
        }
    };
    line.push(b'\n');
    // One write of a whole line to a file opened for appending: concurrent writers
    // and log rotation never see half a line.
    if let Err(e) = file.write_all(&line) {
        tracing::warn!(path = %path.display(), error = %e, "cannot append to the audit log");
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("gateway.toml"), text).unwrap()
    }

    const BASE: &str = r#"
[upstreams.a]
targets = ["127.0.0.1:1"]
[upstreams.b]
targets = ["127.0.0.1:2"]
[defaults]
upstream = "a"
[defaults.limits]
requests_per_second = 100
burst = 10
[tenants.acme]
hosts = ["acme.com"]
[tenants.globex]
hosts = ["globex.com"]
[tenants.initech]
hosts = ["initech.com"]
"#;

    /// Answers between two changes share one encoding (a large history is megabytes,
    /// held while a slow client reads it); a change makes the next answer a new one.
    #[test]
    fn the_history_is_encoded_once_per_change() {
        let state = ReloadState::new(&parse(BASE)).unwrap();
        let first = state.history_json().unwrap();
        let again = state.history_json().unwrap();
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "encoded again with nothing new"
        );
        let mut inner = state.lock();
        reject(&state, &mut inner, Trigger::Signal, None, "bad".to_owned());
        drop(inner);
        let after = state.history_json().unwrap();
        assert_ne!(first, after);
        let entries: serde_json::Value = serde_json::from_slice(&after).unwrap();
        assert_eq!(entries[0]["result"], "failure", "newest first: {entries}");
        assert_eq!(entries[1]["trigger"], "startup", "{entries}");
        assert_eq!(state.history_json().unwrap().as_ptr(), after.as_ptr());
    }

    #[test]
    fn diff_names_added_removed_and_changed_fields() {
        let old = parse(BASE);
        let new = parse(
            &BASE
                .replace(
                    "[tenants.acme]\nhosts = [\"acme.com\"]",
                    "[tenants.acme]\nhosts = [\"acme.com\"]\nupstream = \"b\"\nlimits = { burst = 3 }",
                )
                .replace("[tenants.initech]\nhosts = [\"initech.com\"]", "[tenants.umbrella]\nhosts = [\"u.com\"]")
                .replace("targets = [\"127.0.0.1:2\"]", "targets = [\"127.0.0.1:3\"]"),
        );
        let c = diff(&old, &new);
        assert_eq!(c.added, vec!["umbrella"]);
        assert_eq!(c.removed, vec!["initech"]);
        assert_eq!(
            c.changed,
            vec![TenantChange {
                tenant: "acme".into(),
                fields: vec!["upstream", "limits.burst"],
            }]
        );
        assert_eq!(c.upstreams.changed, vec!["b"]);
        assert!(c.settings.is_empty());
    }

    #[test]
    fn a_default_change_shows_on_every_tenant_that_inherits_it() {
        let old = parse(BASE);
        let new = parse(&BASE.replace("burst = 10", "burst = 11"));
        let c = diff(&old, &new);
        let names: Vec<_> = c.changed.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(names, vec!["acme", "globex", "initech"]);
        assert!(c.changed.iter().all(|t| t.fields == vec!["limits.burst"]));
    }

    #[test]
    fn same_config_has_no_changes() {
        let c = diff(&parse(BASE), &parse(&format!("# a comment\n{BASE}")));
        assert!(c.is_empty(), "{c:?}");
    }

    #[test]
    fn listener_changes_need_a_restart() {
        let old = parse(&format!("[server]\nlisten = \"127.0.0.1:1\"\n{BASE}"));
        let text = format!("[server]\nlisten = \"127.0.0.1:2\"\nworkers = 3\n{BASE}");
        let new = parse(&text);
        let msg = needs_restart(&old, &new, &text).unwrap();
        assert!(
            msg.starts_with(
                "gateway.toml:2:10: server.listen, server.workers changed; these need a restart"
            ),
            "{msg}"
        );
        let text = format!("[server]\n# moved\nlisten = \"127.0.0.1:2\"\n{BASE}");
        let msg = needs_restart(&old, &parse(&text), &text).unwrap();
        assert!(
            msg.starts_with("gateway.toml:3:10: server.listen changed; this needs a restart"),
            "{msg}"
        );
        // Removed: the `[server]` table's position; no `[server]`: the file's start.
        let text = format!("[server]\nworkers = 3\n{BASE}");
        let msg = needs_restart(&old, &parse(&text), &text).unwrap();
        assert!(
            msg.starts_with("gateway.toml:1:1: server.listen, "),
            "{msg}"
        );
        let text = format!("\n[cluster]\nredis = \"redis://127.0.0.1:1/0\"\n{BASE}");
        let msg = needs_restart(&old, &parse(&text), &text).unwrap();
        assert!(
            msg.starts_with("gateway.toml:1:1: server.listen, "),
            "{msg}"
        );
        let keep = format!("[server]\nlisten = \"127.0.0.1:1\"\n\n[cluster]\nredis = \"redis://127.0.0.1:1/0\"\n{BASE}");
        let msg = needs_restart(&old, &parse(&keep), &keep).unwrap();
        assert!(
            msg.starts_with("gateway.toml:4:1: [cluster] changed; this needs"),
            "{msg}"
        );
        assert!(needs_restart(&old, &old.clone(), "").is_none());
    }

    #[test]
    fn history_entry_json_shape() {
        let e = HistoryEntry {
            time: UNIX_EPOCH + Duration::from_millis(1_500),
            trigger: Trigger::Admin,
            result: Outcome::Failure,
            version: Some("abc".into()),
            previous_version: Some("def".into()),
            error: Some("gateway.toml:1:2: bad".into()),
            changes: Changes::default(),
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(j["trigger"], "admin");
        assert_eq!(j["result"], "failure");
        assert_eq!(j["added"], serde_json::json!([]));
        assert_eq!(j["upstreams"]["changed"], serde_json::json!([]));
    }
}
