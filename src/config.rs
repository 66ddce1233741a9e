//! `gateway.toml` as the operator writes it: serde structs that mirror the file
//! (unknown keys rejected), and the validation rules of SPEC.md, each reported as
//! `PATH:LINE:COL: message`. Nothing here is read on the request path: a validated
//! [`Config`] is turned into a [`crate::snapshot::Snapshot`] first.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::units::{ByteSize, Dur};

mod validate;
mod values;

use validate::Validator;
pub(crate) use values::audit_log_not_regular;
use values::*;
pub use values::{parse_host_pattern, parse_target, valid_id};

/// The whole file. Every table is optional; defaults follow SPEC.md.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub tenancy: TenancyConfig,
    #[serde(default)]
    pub defaults: DefaultsConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<Spanned<String>, UpstreamConfig>,
    #[serde(default)]
    pub tenants: BTreeMap<Spanned<String>, TenantConfig>,
    /// `[cluster]`: the shared store of `limits.scope = "cluster"` (issue #9).
    pub cluster: Option<Spanned<ClusterConfig>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: Spanned<String>,
    pub admin_listen: Spanned<String>,
    pub workers: Spanned<usize>,
    pub shutdown_grace: Dur,
    pub header_read_timeout: Spanned<Dur>,
    pub max_header_bytes: Spanned<ByteSize>,
    pub log_format: LogFormat,
    /// One JSON line per applied config change is appended here; off when unset.
    pub audit_log: Option<Spanned<String>>,
    /// Peers whose `x-forwarded-for` is believed (IPs or CIDRs).
    pub trusted_proxies: Vec<Spanned<String>>,
    /// How often per-client limiter state is pruned.
    pub limiter_prune_interval: Spanned<Dur>,
    /// One access-log line per request.
    pub access_log: bool,
    /// Per-tenant request metrics (counters, latency histogram, body bytes).
    pub metrics: bool,
    /// HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN).
    pub tls_listen: Option<Spanned<String>>,
    /// The plain listener answers 308 to https instead of proxying.
    pub redirect_http: Spanned<bool>,
    /// `[server.tls]`: the default certificate and the minimum version.
    pub tls: Option<crate::tls::ServerTlsConfig>,
    /// Where local-scope quota counters are kept across restarts; in memory when unset.
    pub state_dir: Option<Spanned<String>>,
    /// A WebSocket tunnel with no bytes either way for this long is closed; 0 = never.
    pub tunnel_idle_timeout: Dur,
    /// A body that makes no progress for this long is cut off: a response whose
    /// upstream sends nothing or whose client takes nothing, an upload the client
    /// stops sending or the upstream stops taking; 0 = never.
    pub body_idle_timeout: Dur,
    /// Open client connections at most (0: from RLIMIT_NOFILE).
    pub max_connections: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Spanned::new(0..0, "0.0.0.0:8080".to_owned()),
            admin_listen: Spanned::new(0..0, "127.0.0.1:9901".to_owned()),
            workers: Spanned::new(0..0, 0),
            shutdown_grace: Dur(Duration::from_secs(30)),
            header_read_timeout: Spanned::new(0..0, Dur(Duration::from_secs(10))),
            max_header_bytes: Spanned::new(0..0, ByteSize(16 * 1024)),
            log_format: LogFormat::Text,
            audit_log: None,
            trusted_proxies: Vec::new(),
            limiter_prune_interval: Spanned::new(0..0, Dur(Duration::from_secs(60))),
            access_log: true,
            metrics: true,
            tls_listen: None,
            redirect_http: Spanned::new(0..0, false),
            tls: None,
            state_dir: None,
            tunnel_idle_timeout: Dur(Duration::from_secs(3600)),
            body_idle_timeout: Dur(Duration::from_secs(60)),
            max_connections: 0,
        }
    }
}

/// `server.workers` above this is refused: each worker is a thread with its own event
/// loop, listener socket and upstream pool, and a typo such as `workers = 100000` would
/// otherwise fail only at start, after most of the threads were made.
pub const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Host,
    Header,
    Path,
    /// A key in `tenancy.api_key.header`, matched against the tenants' `api_keys`.
    ApiKey,
    /// A bearer token's tenant claim, verified with the tenant's keys.
    Jwt,
    /// The TLS SNI name, matched against the tenants' `hosts`.
    Sni,
}

impl SourceKind {
    /// The source as `tenancy.resolve` names it.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Host => "host",
            SourceKind::Header => "header",
            SourceKind::Path => "path",
            SourceKind::ApiKey => "api_key",
            SourceKind::Jwt => "jwt",
            SourceKind::Sni => "sni",
        }
    }
}

/// The credential kinds a tenant may `require`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ApiKey,
    Jwt,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    pub resolve: Spanned<Vec<SourceKind>>,
    pub header: Spanned<String>,
    pub path_prefix: Spanned<String>,
    pub forward_header: Spanned<String>,
    pub api_key: ApiKeyConfig,
    pub jwt: crate::jwt::JwtConfig,
}

/// `[tenancy.api_key]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeyConfig {
    pub header: Spanned<String>,
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        ApiKeyConfig {
            header: Spanned::new(0..0, "x-api-key".to_owned()),
        }
    }
}

impl Default for TenancyConfig {
    fn default() -> Self {
        TenancyConfig {
            resolve: Spanned::new(0..0, vec![SourceKind::Host]),
            header: Spanned::new(0..0, "x-tenant-id".to_owned()),
            path_prefix: Spanned::new(0..0, "/t/".to_owned()),
            forward_header: Spanned::new(0..0, "x-tenant-id".to_owned()),
            api_key: ApiKeyConfig::default(),
            jwt: crate::jwt::JwtConfig::default(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DefaultsConfig {
    pub upstream: Option<Spanned<String>>,
    pub request_timeout: Option<Spanned<Dur>>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[defaults.limits]` and `[tenants.X.limits]`. A field left out means "inherit"
/// (for a tenant) or "no limit" (for the defaults).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub requests_per_second: Option<Spanned<PositiveNumber>>,
    pub burst: Option<Spanned<u64>>,
    pub max_body: Option<Spanned<ByteSize>>,
    pub max_in_flight: Option<Spanned<u64>>,
    pub per_client_requests_per_second: Option<Spanned<PositiveNumber>>,
    pub per_client_burst: Option<Spanned<u64>>,
    pub scope: Option<Spanned<Scope>>,
    pub on_store_failure: Option<Spanned<OnStoreFailure>>,
    pub requests_per_day: Option<Spanned<u64>>,
    pub requests_per_month: Option<Spanned<u64>>,
}

// ---- cluster scope and quotas (issue #9) ----

/// `limits.scope`: whether a tenant's rate and quotas hold per instance or for the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Local,
    Cluster,
}

/// `limits.on_store_failure`: what a cluster-scope tenant gets while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreFailure {
    /// Served on this instance's own limits (the tenant's configured rate, per instance).
    #[default]
    Open,
    /// 503 `store_unavailable`.
    Closed,
}

/// `[cluster]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// One `redis://` / `rediss://` URL, or a list of nodes for Redis Cluster.
    pub redis: Option<Spanned<RedisNodes>>,
    pub instance_id: Option<Spanned<String>>,
    pub sync_interval: Option<Spanned<Dur>>,
    pub store_timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "`cluster.redis` must be a redis:// (or rediss://) URL, or a list of them (the seed nodes of a Redis Cluster)"
)]
pub enum RedisNodes {
    One(String),
    Many(Vec<String>),
}

/// `[cluster]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// One URL: a single Redis server; several: the seed nodes of a Redis Cluster.
    pub nodes: Vec<String>,
    pub instance_id: String,
    pub sync_interval: Duration,
    pub store_timeout: Duration,
}

/// The host name, for the default `instance_id`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("bulkhead-{}", std::process::id()))
}

// ---- end cluster scope ----

/// An integer or float; `validate` checks that it is positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositiveNumber(pub f64);

impl<'de> Deserialize<'de> for PositiveNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PositiveNumber;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PositiveNumber, E> {
                Ok(PositiveNumber(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PositiveNumber, E> {
                Ok(PositiveNumber(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PositiveNumber, E> {
                Ok(PositiveNumber(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub targets: Spanned<Vec<Spanned<String>>>,
    /// `"http1"` (default) or `"h2"`: HTTP/2 to the upstream (prior knowledge on
    /// `http://` targets, ALPN on `https://`), for gRPC.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// PEM CA bundle that verifies `https://` targets (instead of the system roots).
    pub ca: Option<Spanned<String>>,
    /// Accept any certificate from `https://` targets. Logged loudly.
    pub tls_insecure_skip_verify: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum UpstreamProtocol {
    #[default]
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "h2")]
    H2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    #[default]
    Active,
    Suspended,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub request_timeout: Option<Spanned<Dur>>,
    #[serde(default)]
    pub features: Vec<Spanned<String>>,
    #[serde(default)]
    pub status: TenantStatus,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// SHA-256 digests of the tenant's API keys, `"sha256:<64 hex>"`.
    #[serde(default)]
    pub api_keys: Vec<Spanned<String>>,
    /// Credential kinds a request for this tenant must carry.
    pub require: Option<Spanned<Vec<CredentialKind>>>,
    /// `[tenants.X.jwt]`: keys that verify this tenant's tokens.
    pub jwt: Option<crate::jwt::TenantJwtConfig>,
    /// `[tenants.X.tls]`: the tenant's own certificate and client CA.
    pub tls: Option<crate::tls::TenantTlsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: Spanned<String>,
    pub upstream: Spanned<String>,
}

/// Limits after `[defaults.limits]` has been merged under the tenant's own.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u64>,
    pub max_body: Option<u64>,
    pub max_in_flight: Option<u64>,
    pub per_client_requests_per_second: Option<f64>,
    pub per_client_burst: Option<u64>,
    pub scope: Scope,
    pub on_store_failure: OnStoreFailure,
    pub requests_per_day: Option<u64>,
    pub requests_per_month: Option<u64>,
}

/// A host pattern from a tenant's `hosts`, normalised (lower case, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// `*.acme.example.com` is stored as `acme.example.com`.
    Wildcard(String),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(h) => write!(f, "*.{h}"),
        }
    }
}

/// One tenant with `[defaults]` merged in and every name checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTenant {
    pub id: String,
    pub hosts: Vec<HostPattern>,
    pub upstream: String,
    pub request_timeout: Duration,
    pub features: Vec<String>,
    pub status: TenantStatus,
    pub limits: Limits,
    /// `(prefix, upstream)`, in file order.
    pub routes: Vec<(String, String)>,
    pub api_keys: Vec<crate::credentials::KeyDigest>,
    pub require: Vec<CredentialKind>,
    pub jwt: Option<crate::jwt::ResolvedJwt>,
    pub tls: Option<crate::tls::ResolvedTenantTls>,
}

/// An upstream whose targets have been parsed to `host:port` authorities.
#[derive(Debug, Clone)]
pub struct ResolvedUpstream {
    pub name: String,
    pub targets: Vec<String>,
    /// The targets are `https://`.
    pub https: bool,
    pub protocol: UpstreamProtocol,
    pub ca: Option<crate::tls::ClientCa>,
    pub insecure: bool,
}

impl PartialEq for ResolvedUpstream {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.targets == o.targets
            && self.https == o.https
            && self.protocol == o.protocol
            && self.ca.as_ref().map(|c| c.fingerprint) == o.ca.as_ref().map(|c| c.fingerprint)
            && self.insecure == o.insecure
    }
}

/// A validated configuration: what a snapshot is built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// A short hash of the file's bytes.
    pub version: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub workers: usize,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: u64,
    /// `server.tunnel_idle_timeout`; `None` for "0s" (never).
    pub tunnel_idle_timeout: Option<Duration>,
    /// `server.body_idle_timeout`; `None` for "0s" (never).
    pub body_idle_timeout: Option<Duration>,
    /// `server.max_connections`; 0: from RLIMIT_NOFILE (`server::connection_limit`).
    pub max_connections: u64,
    pub log_format: LogFormat,
    /// `server.audit_log`, relative paths taken from the config file's directory.
    pub audit_log: Option<PathBuf>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub limiter_prune_interval: Duration,
    pub access_log: bool,
    pub metrics: bool,
    pub tls_listen: Option<SocketAddr>,
    pub redirect_http: bool,
    pub tls: Option<crate::tls::ResolvedServerTls>,
    /// Certificate, key and CA files the config reads: the watcher watches them too,
    /// and their bytes are part of `version`.
    pub tls_files: Vec<PathBuf>,
    pub resolve: Vec<SourceKind>,
    /// `tenancy.api_key.header`, lower case.
    pub api_key_header: String,
    /// `tenancy.jwt.header`, lower case.
    pub jwt_header: String,
    pub tenant_claim: String,
    /// `tenancy.jwt.cookie`: a cookie carrying the token.
    pub jwt_cookie: Option<String>,
    pub jwt_leeway: Duration,
    /// `[tenancy.jwt]` issuer-wide keys (`jwks_file`), with `issuer` / `audience`.
    pub jwt_global: Option<crate::jwt::ResolvedJwt>,
    pub tenant_header: String,
    pub path_prefix: String,
    pub forward_header: String,
    pub upstreams: Vec<ResolvedUpstream>,
    pub tenants: Vec<ResolvedTenant>,
    /// `[cluster]`; `None` when the file has none (every tenant is local).
    pub cluster: Option<ClusterSettings>,
    /// `server.state_dir`, relative paths taken from the config file's directory.
    pub state_dir: Option<PathBuf>,
    /// Settings that apply but will not do what they say (a burst no rate uses, an
    /// audit log in a directory that does not exist), by position: `bulkhead check`
    /// prints them as `PATH:LINE:COL: warning: …`.
    pub warnings: Vec<Problem>,
}

/// One problem found in the file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Every problem found in one file; `Display` prints one `PATH:LINE:COL: message` per line.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                p.line,
                p.col,
                p.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (line, col, message) = match read_text(path) {
            Ok(text) => return Config::parse(path, &text),
            Err(NotText::Io(e)) => (1, 1, format!("cannot read the file: {e}")),
            Err(NotText::NotUtf8 { line, col, .. }) => {
                (line, col, "the file is not valid UTF-8".to_owned())
            }
        };
        Err(ConfigError {
            path: path.to_owned(),
            problems: vec![Problem { line, col, message }],
        })
    }

    /// Parses and validates `text` as the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut v = Validator {
            text,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let file: FileConfig = match toml::from_str(text) {
            Ok(f) => f,
            Err(first) => {
                for e in toml_errors(text, first) {
                    let span = e.span().unwrap_or(0..0);
                    let message = plain_message(e.message(), text, span.clone());
                    v.error(span, message);
                }
                return Err(v.into_error(path));
            }
        };
        let config = v.validate(path, text, &file);
        if v.problems.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
        }
        Err(v.into_error(path))
    }
}

/// The TOML errors of `text`, whose first is `first`. A syntax error is reported
/// alone: toml's recovery carries on past it, but inside a multi-line array that was
/// not closed every later line is misread (one missing `]` gave 19 errors on the five
/// lines after it). A type error (a wrong type, an unknown or missing key) is reported
/// with those of every other part of the file read on its own — each tenant, each
/// upstream, each other top-level table — as deserializing the whole file stops at the
/// first. The rules (hosts, routes, upstream names, limits) are not run on the parts
/// that did read: a part left out would show up as errors of its own (an upstream with
/// a misspelt key reported missing by every tenant naming it).
fn toml_errors(text: &str, first: toml::de::Error) -> Vec<toml::de::Error> {
    use toml::de::{DeTable, DeValue};
    let Ok(root) = DeTable::parse(text) else {
        return vec![first];
    };
    // A file holding only `key = value` (under `key`, only `entry`), with the spans of
    // `text`: FileConfig's tables all have defaults, so it reads as the whole file
    // would if that part were all there is.
    let part =
        |key: &Spanned<toml::de::DeString<'_>>,
         value: &Spanned<DeValue<'_>>,
         entry: Option<(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)>| {
            let value = match entry {
                Some((k, v)) => {
                    let mut one = DeTable::new();
                    one.insert(k.clone(), v.clone());
                    Spanned::new(value.span(), DeValue::Table(one))
                }
                None => value.clone(),
            };
            let mut doc = DeTable::new();
            doc.insert(key.clone(), value);
            FileConfig::deserialize(toml::de::Deserializer::from(Spanned::new(
                0..text.len(),
                doc,
            )))
            .err()
        };
    let mut errors = Vec::new();
    for (key, value) in root.get_ref() {
        match (key.get_ref().as_ref(), value.get_ref()) {
            ("tenants" | "upstreams", DeValue::Table(entries)) => {
                errors.extend(entries.iter().filter_map(|e| part(key, value, Some(e))));
            }
            _ => errors.extend(part(key, value, None)),
        }
    }
    // Read whole, the file failed: if no part does on its own, say what failed.
    if errors.is_empty() {
        errors.push(first);
    }
    errors
}

/// A message of serde's or toml's in the file's terms: Rust's integer type names,
/// toml's wording for a non-string enum value, and a duplicate key left unnamed are
/// what an operator cannot act on. Anything else is kept as it is.
fn plain_message(message: &str, text: &str, span: std::ops::Range<usize>) -> String {
    if message == "duplicate key" {
        let rest = text.get(span.start..).unwrap_or("");
        let key = match rest.strip_prefix('"') {
            Some(q) => q.find('"').map_or("", |end| &rest[..end + 2]),
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            }
        };
        if !key.is_empty() {
            return format!("duplicate key `{key}`: a key or table is set twice");
        }
    }
    if message == "wanted string or table" {
        let value = text.get(span).unwrap_or("").trim();
        return format!(
            "invalid type: `{value}`, expected a string (one of the names this key takes)"
        );
    }
    if let Some((n, _)) = message
        .strip_prefix("invalid type: integer `")
        .and_then(|rest| rest.split_once("` as i128"))
    {
        return format!("integer `{n}` is too large");
    }
    for ty in ["usize", "u64", "u32", "u16", "u8"] {
        if let Some(head) = message.strip_suffix(&format!("expected {ty}")) {
            return format!("{head}expected a whole number, 0 or more");
        }
    }
    message.to_owned()
}

fn tls_fingerprints(
    server: Option<&crate::tls::ResolvedServerTls>,
    tenants: &[ResolvedTenant],
    upstreams: &[ResolvedUpstream],
) -> Vec<u64> {
    let upstream_files = upstreams
        .iter()
        .filter_map(|u| u.ca.as_ref().map(|c| c.fingerprint));
    let tenant_files = tenants.iter().filter_map(|t| t.tls.as_ref()).flat_map(|t| {
        [
            t.cert.as_ref().map(|c| c.fingerprint),
            t.client_ca.as_ref().map(|c| c.fingerprint),
        ]
    });
    server
        .map(|s| s.default.fingerprint)
        .into_iter()
        .chain(tenant_files.flatten())
        .chain(upstream_files)
        .collect()
}

/// A short, stable hash of the file's bytes (FNV-1a, 64 bit, first 12 hex digits).
pub fn version_of(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

/// The version of a config that reads certificate files: the text's hash mixed with
/// the hashes of the files' bytes, so that rotating a certificate is a change to apply.
fn version_with_files(text: &str, fingerprints: &[u64]) -> String {
    if fingerprints.is_empty() {
        return version_of(text);
    }
    let mut all = text.to_owned();
    for f in fingerprints {
        all.push_str(&format!("\n{f:016x}"));
    }
    version_of(&all)
}

/// Why a config file could not be read as text.
pub(crate) enum NotText {
    Io(std::io::Error),
    /// Read, but not UTF-8: the bytes, and the position of the first bad one.
    NotUtf8 {
        bytes: Vec<u8>,
        line: usize,
        col: usize,
    },
}

/// A config file's text, or why there is none; for `Config::load` (start, `check`)
/// and reloads alike, so both report a bad byte at the same line and column.
pub(crate) fn read_text(path: &Path) -> Result<String, NotText> {
    let bytes = crate::file::read(path).map_err(NotText::Io)?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.into_bytes();
        // Valid UTF-8 by `valid_up_to`, so the prefix converts whole.
        let before = std::str::from_utf8(&bytes[..valid]).unwrap_or_default();
        let (line, col) = line_col(before, before.len());
        NotText::NotUtf8 { bytes, line, col }
    })
}

pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gateway.toml"), text)
    }

    const BASE: &str = r#"
[upstreams.shared]
targets = ["127.0.0.1:9001", "http://127.0.0.1:9002"]

[defaults]
upstream = "shared"
"#;

    #[test]
    fn minimal_file_gets_spec_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.resolve, vec![SourceKind::Host]);
        assert_eq!(c.tenant_header, "x-tenant-id");
        assert_eq!(c.path_prefix, "/t/");
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.max_header_bytes, 16384);
        assert_eq!(
            c.upstreams[0].targets,
            vec!["127.0.0.1:9001", "127.0.0.1:9002"]
        );
    }

    #[test]
    fn unknown_key_reports_line_and_column() {
        let text = format!("{BASE}\n[tenants.acme]\nhosts = [\"a.com\"]\ncolour = \"red\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("gateway.toml:10:1: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn a_rate_too_small_for_a_duration_is_refused() {
        // 1e-30 requests per second: 1e30 s per request, beyond `Duration`, which
        // panicked when the limiter was built (the gateway died at start or reload).
        for (rate, ok) in [
            ("1e-30", false),
            ("0.000000001", true),
            ("1e9", true),
            ("2e9", false),
        ] {
            let text = format!(
                "{BASE}\n[tenants.a]\nhosts = [\"x.com\"]\n[tenants.a.limits]\nrequests_per_second = {rate}\n"
            );
            match parse(&text) {
                Ok(c) => {
                    assert!(ok, "{rate} accepted");
                    let snap = crate::snapshot::Snapshot::build(&c, None).unwrap();
                    assert!(snap
                        .tenant(0)
                        .limits
                        .check_rate(&snap.tenant(0).stats, None)
                        .is_ok());
                }
                Err(e) => {
                    assert!(!ok, "{rate}: {e}");
                    assert!(e.to_string().contains("between 1e-9 and 1e9"), "{e}");
                }
            }
        }
    }

    #[test]
    fn duplicate_host_across_tenants() {
        let text = format!(
            "{BASE}\n[tenants.a]\nhosts = [\"x.com\"]\n[tenants.b]\nhosts = [\"X.com.\"]\n"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains(":11:10: host \"x.com\" of tenant \"b\" already belongs to tenant \"a\""),
            "{e}"
        );
    }

    #[test]
    fn bad_tenant_id_and_missing_route_upstream() {
        let text = format!(
            "{BASE}\n[tenants.Acme]\nhosts = [\"x.com\"]\n[[tenants.Acme.routes]]\nprefix = \"/r\"\nupstream = \"nope\"\n"
        );
        let e = parse(&text).unwrap_err();
        let msgs: Vec<_> = e.problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("tenant id \"Acme\" must match")),
            "{e}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("names upstream \"nope\"")),
            "{e}"
        );
        assert_eq!(e.problems.len(), 2);
    }

    #[test]
    fn limits_merge_field_by_field() {
        let text = format!(
            "{BASE}\n[defaults.limits]\nrequests_per_second = 100\nburst = 200\nmax_body = \"1MiB\"\n[tenants.a]\nhosts=[\"a.com\"]\n[tenants.a.limits]\nburst = 5\n"
        );
        let c = parse(&text).unwrap();
        let l = c.tenants[0].limits;
        assert_eq!(l.requests_per_second, Some(100.0));
        assert_eq!(l.burst, Some(5));
        assert_eq!(l.max_body, Some(1 << 20));
        assert_eq!(l.max_in_flight, None);
    }

    #[test]
    fn a_burst_needs_a_rate() {
        // A tenant's burst with no rate anywhere.
        let text = format!("{BASE}\n[tenants.a]\nhosts=[\"a.com\"]\n[tenants.a.limits]\nburst = 5\nper_client_burst = 2\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("[tenants.a.limits] burst without `requests_per_second`"),
            "{e}"
        );
        assert!(
            e.contains(
                "[tenants.a.limits] per_client_burst without `per_client_requests_per_second`"
            ),
            "{e}"
        );
        // The defaults' burst, with no tenant taking it with a rate.
        let text = format!("{BASE}\n[defaults.limits]\nburst = 5\n[tenants.a]\nhosts=[\"a.com\"]\n[tenants.b]\nhosts=[\"b.com\"]\n[tenants.b.limits]\nrequests_per_second = 1\nburst = 3\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains(
                "gateway.toml:9:9: [defaults.limits] burst goes with no `requests_per_second`"
            ),
            "{e}"
        );
        // Each burst with a rate: the tenant's own, the defaults', or one that takes
        // the defaults' burst.
        for ok in [
            "[defaults.limits]\nrequests_per_second = 1\n[tenants.a]\nhosts=[\"a.com\"]\n[tenants.a.limits]\nburst = 5\n",
            "[defaults.limits]\nburst = 5\n[tenants.a]\nhosts=[\"a.com\"]\n[tenants.a.limits]\nrequests_per_second = 1\n",
            "[defaults.limits]\nper_client_requests_per_second = 1\nper_client_burst = 5\n[tenants.a]\nhosts=[\"a.com\"]\n",
        ] {
            parse(&format!("{BASE}\n{ok}")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn limits_must_be_positive() {
        let text = format!("{BASE}\n[defaults.limits]\nrequests_per_second = 0\nburst = 0\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn cluster_scope_needs_redis_with_position() {
        let text = format!("{BASE}\n[defaults.limits]\nscope = \"cluster\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("gateway.toml:9:9: [defaults.limits] scope = \"cluster\" needs `redis`"),
            "{e}"
        );
        let text = format!(
            "{BASE}\n[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\ninstance_id = \"edge-1\"\n[defaults.limits]\nscope = \"cluster\"\non_store_failure = \"closed\"\nrequests_per_day = 1_000\n[tenants.a]\nhosts = [\"a.com\"]\n"
        );
        let c = parse(&text).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.instance_id, "edge-1");
        assert_eq!(cl.sync_interval, Duration::from_millis(50));
        assert_eq!(cl.store_timeout, Duration::from_millis(20));
        let l = c.tenants[0].limits;
        assert_eq!(l.scope, Scope::Cluster);
        assert_eq!(l.on_store_failure, OnStoreFailure::Closed);
        assert_eq!(l.requests_per_day, Some(1000));
        let e = parse(&format!("{BASE}\n[cluster]\nredis = \"http://x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.toml:9:9: `cluster.redis`"), "{e}");
    }

    #[test]
    fn redis_urls_are_read_before_the_client_reads_them() {
        let problem = |url: &str| redis_url_problem(url, &without_password(url), false);
        for ok in [
            "redis://127.0.0.1",
            "redis://h:1/0",
            "rediss://u:p@h.example.com:65535/15#insecure",
            "redis://[2001:db8::1]:6379",
            "VALKEYS://h/",
            "redis+unix:///run/redis.sock",
            "unix://localhost/run/redis.sock",
        ] {
            assert_eq!(problem(ok), None, "{ok}");
            // What we take, the client takes.
            assert!(
                redis::IntoConnectionInfo::into_connection_info(ok).is_ok(),
                "{ok}"
            );
        }
        for (bad, says) in [
            (
                "redis://h:65536",
                "the port must be a number from 1 to 65535",
            ),
            ("redis://h:+80", "the port must be a number from 1 to 65535"),
            ("redis://h:", "the port must be a number from 1 to 65535"),
            ("redis://h:0", "names port 0"),
            ("redis://", "names no host"),
            ("redis://u:p@", "names no host"),
            ("redis://[::]:6379", "the wildcard address [::]"),
            ("redis://[::1]x", "only a ':' and a port may follow ']'"),
            ("redis://h/-1", "names database -1"),
            ("redis://h/1/2", "the path names the database"),
            ("redis://h_-/0", "starts or ends with '-'"),
            ("tcp://h:6379", "the scheme must be redis://"),
            ("h:6379", "is not a URL"),
            ("unix:relative.sock", "is not a URL"),
            ("unix://run/redis.sock", "names no socket"),
        ] {
            let why = problem(bad).unwrap_or_default();
            assert!(why.contains(says), "{bad}: {why}");
        }
        let why = redis_url_problem("unix:///r.sock", "unix:///r.sock", true).unwrap_or_default();
        assert!(why.contains("reached over TCP"), "{why}");
        // The password never reaches the message.
        let url = "redis://user:hunter2@h:99999";
        let why = problem(url).unwrap_or_default();
        assert!(
            why.contains("redis://***@h:99999") && !why.contains("hunter2"),
            "{why}"
        );
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            parse_host_pattern("*.Acme.com").unwrap(),
            HostPattern::Wildcard("acme.com".into())
        );
        assert_eq!(
            parse_host_pattern("acme.com.").unwrap(),
            HostPattern::Exact("acme.com".into())
        );
        assert!(parse_host_pattern("acme.com:80").is_err());
        assert!(parse_host_pattern("a.*.com").is_err());
        assert!(parse_host_pattern("").is_err());
        assert_eq!(
            parse_host_pattern("10.0.0.1").unwrap(),
            HostPattern::Exact("10.0.0.1".into())
        );
        assert_eq!(
            parse_host_pattern("[::1]").unwrap_err(),
            "host \"[::1]\": IPv6 literals are not supported in `hosts`"
        );
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("http://localhost:80/").unwrap(),
            ("localhost:80".to_owned(), false)
        );
        assert_eq!(
            parse_target("https://api.example.com").unwrap(),
            ("api.example.com:443".to_owned(), true)
        );
        assert_eq!(
            parse_target("https://a:8443").unwrap(),
            ("a:8443".to_owned(), true)
        );
        assert!(parse_target("localhost").is_err());
        assert!(parse_target("https://u@a:1").is_err());
        assert!(parse_target("ftp://a:1").is_err());
        assert_eq!(
            parse_target("127.0.0.1:0").unwrap_err(),
            "target \"127.0.0.1:0\": port 0 cannot be connected to"
        );
    }

    #[test]
    fn invalid_toml_has_position() {
        let e = parse("[server\nlisten = 1").unwrap_err();
        assert_eq!(e.problems[0].line, 1);
    }

    #[test]
    fn a_type_error_in_each_part_is_reported() {
        let e = parse(&format!(
            "{BASE}\n[tenants.a]\nstatus = 1\n[tenants.b]\nstatus = 2\n[cluster]\nredis = 3\n[upstreams.u]\ntargets = 4\n"
        ))
        .unwrap_err();
        let at: Vec<(usize, usize)> = e.problems.iter().map(|p| (p.line, p.col)).collect();
        assert_eq!(at, [(9, 10), (11, 10), (13, 9), (15, 11)], "{e}");
        // A syntax error is reported alone.
        let e = parse("[tenants.a]\nstatus = 1\n[tenants.b\n").unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!((e.problems[0].line, e.problems[0].col), (3, 11), "{e}");
    }

    #[test]
    fn tenant_without_any_upstream() {
        let e = parse("[tenants.a]\nhosts = [\"a.com\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gateway.toml:1:10: tenant \"a\" names no `upstream`"),
            "{e}"
        );
    }
}
