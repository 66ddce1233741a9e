//! `gateway.toml` as the operator writes it: serde structs that mirror the file
//! (unknown keys rejected), and the validation rules of SPEC.md, each reported as
//! `PATH:LINE:COL: message`. Nothing here is read on the request path: a validated
//! [`Config`] is turned into a [`crate::snapshot::Snapshot`] first.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use crate::units::{ByteSize, Dur};

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

struct Validator<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn error(&mut self, span: std::ops::Range<usize>, message: String) {
        let (line, col) = line_col(self.text, span.start);
        self.problems.push(Problem { line, col, message });
    }

    fn into_error(mut self, path: &Path) -> ConfigError {
        self.problems.sort_by_key(|p| (p.line, p.col));
        ConfigError {
            path: path.to_owned(),
            problems: self.problems,
        }
    }

    fn addr(&mut self, s: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    s.span(),
                    format!(
                        "`{key}` must be an IP address and port such as \"127.0.0.1:8080\", not {:?}",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A header name from the file. `sets`: the gateway sets it on forwarded requests
    /// (otherwise it reads it from the client), see [`crate::headers::reserved`].
    fn header_name(&mut self, s: &Spanned<String>, key: &str, sets: bool) {
        match http::HeaderName::from_bytes(s.get_ref().as_bytes()) {
            Ok(name) => {
                if let Some(why) = crate::headers::reserved(name.as_str(), sets) {
                    self.error(
                        s.span(),
                        format!("`{key}` cannot be {:?}: {why}", s.get_ref()),
                    );
                }
            }
            Err(_) => self.error(
                s.span(),
                format!("`{key}` is not a valid header name: {:?}", s.get_ref()),
            ),
        }
    }

    /// A header the gateway sets from a claim or a certificate must not be one that
    /// says which tenant a request belongs to: the tenant id it forwards, or one a
    /// credential source reads (a backend trusting `forward_header` would take a
    /// token's `sub` for the tenant).
    fn not_an_identity_header(
        &mut self,
        s: &Spanned<String>,
        key: &str,
        t: &TenancyConfig,
        read_by: &[(&Spanned<String>, &str)],
    ) {
        let name = s.get_ref();
        let what = if name.eq_ignore_ascii_case(t.forward_header.get_ref()) {
            Some("tenancy.forward_header")
        } else {
            read_by
                .iter()
                .find(|(h, _)| h.get_ref().eq_ignore_ascii_case(name))
                .map(|(_, k)| *k)
        };
        if let Some(what) = what {
            self.error(
                s.span(),
                format!("`{key}` cannot be {name:?}: it is `{what}`, which names the tenant"),
            );
        }
    }

    fn validate(&mut self, path: &Path, text: &str, f: &FileConfig) -> Option<Config> {
        let server = &f.server;
        let listen = self.addr(&server.listen, "server.listen");
        let admin_listen = self.addr(&server.admin_listen, "server.admin_listen");
        if let (Some(l), Some(a)) = (listen, admin_listen) {
            if overlaps(l, a) {
                // At whichever of the two the file sets (a default has no position).
                let (span, msg) = if server.admin_listen.span().is_empty() {
                    (
                        server.listen.span(),
                        format!("`server.listen` ({l}) takes the port of `server.admin_listen` (default {a}): set `server.admin_listen` to another address; the admin API is never served on the data plane"),
                    )
                } else {
                    (
                        server.admin_listen.span(),
                        format!("`server.admin_listen` ({a}) must not share its port with `server.listen` ({l}): the admin API is never served on the data plane"),
                    )
                };
                self.error(span, msg);
            }
        }
        let tls_listen = server
            .tls_listen
            .as_ref()
            .and_then(|l| self.addr(l, "server.tls_listen"));
        if let (Some(t), Some(spanned)) = (tls_listen, &server.tls_listen) {
            if [listen, admin_listen]
                .into_iter()
                .flatten()
                .any(|o| overlaps(t, o))
            {
                self.error(
                    spanned.span(),
                    format!("`server.tls_listen` ({t}) must not share its port with `server.listen` or `server.admin_listen`"),
                );
            }
        }
        let mut tls_files = Vec::new();
        let tls = {
            let base = path.parent().unwrap_or(Path::new("."));
            let mut problems = Vec::new();
            let tls = crate::tls::validate_server(
                server,
                tls_listen,
                base,
                &mut tls_files,
                &mut |span, msg| problems.push((span, msg)),
            );
            for (span, msg) in problems {
                self.error(span, msg);
            }
            tls
        };
        if server.max_header_bytes.get_ref().0 < 1024 {
            self.error(
                server.max_header_bytes.span(),
                "`server.max_header_bytes` must be at least 1KiB".to_owned(),
            );
        }

        let mut trusted_proxies = Vec::new();
        for p in &server.trusted_proxies {
            let raw = p.get_ref().trim();
            let net = raw
                .parse::<ipnet::IpNet>()
                .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match net {
                Ok(n) => trusted_proxies.push(n),
                Err(_) => self.error(
                    p.span(),
                    format!("`server.trusted_proxies` entry {raw:?} is not an IP address or CIDR such as \"10.0.0.0/8\""),
                ),
            }
        }
        if *server.workers.get_ref() > MAX_WORKERS {
            self.error(
                server.workers.span(),
                format!("`server.workers` must be at most {MAX_WORKERS} (0 = one per core)"),
            );
        }
        if server.header_read_timeout.get_ref().0.is_zero() {
            self.error(
                server.header_read_timeout.span(),
                "`server.header_read_timeout` must be positive".to_owned(),
            );
        }
        for t in std::iter::once(&f.defaults.request_timeout)
            .chain(f.tenants.values().map(|t| &t.request_timeout))
            .flatten()
        {
            if t.get_ref().0.is_zero() {
                self.error(t.span(), "`request_timeout` must be positive".to_owned());
            }
        }
        if server.limiter_prune_interval.get_ref().0.is_zero() {
            self.error(
                server.limiter_prune_interval.span(),
                "`server.limiter_prune_interval` must be positive".to_owned(),
            );
        }

        let t = &f.tenancy;
        if t.resolve.get_ref().is_empty() {
            self.error(
                t.resolve.span(),
                "`tenancy.resolve` must name at least one source".to_owned(),
            );
        }
        let mut seen = Vec::new();
        for s in t.resolve.get_ref() {
            if seen.contains(s) {
                self.error(
                    t.resolve.span(),
                    format!("`tenancy.resolve` names {:?} twice", s.name()),
                );
            }
            seen.push(*s);
        }
        self.header_name(&t.header, "tenancy.header", false);
        self.header_name(&t.jwt.header, "tenancy.jwt.header", false);
        // An empty claim name or cookie name names nothing: every token would be
        // refused for want of a tenant claim, and no cookie is called "".
        for (v, key) in [
            (Some(&t.jwt.tenant_claim), "tenancy.jwt.tenant_claim"),
            (t.jwt.cookie.as_ref(), "tenancy.jwt.cookie"),
        ] {
            if let Some(v) = v.filter(|v| v.get_ref().trim().is_empty()) {
                self.error(v.span(), format!("`{key}` must not be empty"));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let jwt_source = t.resolve.get_ref().contains(&SourceKind::Jwt);
        let jwt_global = match &t.jwt.jwks_file {
            Some(f) => match crate::jwt::load_jwks(f, base) {
                Ok(k) => Some(crate::jwt::ResolvedJwt {
                    keys: vec![k],
                    issuer: t.jwt.issuer.as_ref().map(|s| s.get_ref().clone()),
                    audience: t.jwt.audience.as_ref().map(|s| s.get_ref().clone()),
                    forward_claims: Vec::new(),
                }),
                Err((span, msg)) => {
                    self.error(span, format!("tenancy.jwt: {msg}"));
                    None
                }
            },
            None => {
                for (v, key) in [(&t.jwt.issuer, "issuer"), (&t.jwt.audience, "audience")] {
                    if let Some(v) = v {
                        self.error(
                            v.span(),
                            format!("`tenancy.jwt.{key}` applies to the issuer-wide keys of `tenancy.jwt.jwks_file`, which is not set: it would check no token (set `{key}` in each `[tenants.ID.jwt]` instead)"),
                        );
                    }
                }
                None
            }
        };
        self.header_name(&t.api_key.header, "tenancy.api_key.header", false);
        // Each credential source reads a header of its own: an API key in the token's
        // header would be read as a (broken) token, and the other way round.
        let mut read_by: Vec<(&Spanned<String>, &str)> = Vec::new();
        for (source, header, key) in [
            (SourceKind::Header, &t.header, "tenancy.header"),
            (SourceKind::Jwt, &t.jwt.header, "tenancy.jwt.header"),
            (
                SourceKind::ApiKey,
                &t.api_key.header,
                "tenancy.api_key.header",
            ),
        ] {
            if !t.resolve.get_ref().contains(&source) {
                continue;
            }
            if let Some((other, other_key)) = read_by
                .iter()
                .find(|(h, _)| h.get_ref().eq_ignore_ascii_case(header.get_ref()))
            {
                // At whichever of the two the file sets (a default has no position).
                let (set, set_key, same_key) = if header.span().is_empty() {
                    (*other, *other_key, key)
                } else {
                    (header, key, *other_key)
                };
                self.error(
                    set.span(),
                    format!("`{set_key}` and `{same_key}` are both {:?}: each source in `tenancy.resolve` needs a header of its own", set.get_ref()),
                );
            }
            read_by.push((header, key));
        }
        // The forwarded tenant id would replace a credential before the upstream saw it
        // (`Authorization` is forwarded unchanged, for backends that verify it).
        for (header, key) in read_by.iter().filter(|(_, k)| *k != "tenancy.header") {
            let forward = &t.forward_header;
            if !header.get_ref().eq_ignore_ascii_case(forward.get_ref()) {
                continue;
            }
            let (set, set_key, same_key) = if forward.span().is_empty() {
                (*header, *key, "tenancy.forward_header")
            } else {
                (forward, "tenancy.forward_header", *key)
            };
            self.error(
                set.span(),
                format!("`{set_key}` and `{same_key}` are both {:?}: the gateway sets the tenant id in `tenancy.forward_header`, which would replace the credential before the upstream sees it", set.get_ref()),
            );
        }
        if t.resolve.get_ref().contains(&SourceKind::Sni) && tls_listen.is_none() {
            self.error(
                t.resolve.span(),
                "`tenancy.resolve` names \"sni\" but `server.tls_listen` is not set: without TLS there is no SNI".to_owned(),
            );
        }
        // `forward_header = ""` turns tenant header injection off.
        if !t.forward_header.get_ref().is_empty() {
            self.header_name(&t.forward_header, "tenancy.forward_header", true);
        }
        let prefix = t.path_prefix.get_ref();
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 3 {
            self.error(
                t.path_prefix.span(),
                format!("`tenancy.path_prefix` must look like \"/t/\" (start and end with '/'), not {prefix:?}"),
            );
        } else if let Some(why) = not_in_a_path(prefix, "the \"path\" source reads the path") {
            self.error(
                t.path_prefix.span(),
                format!("`tenancy.path_prefix` {prefix:?} can never match: {why}"),
            );
        }

        // Upstreams.
        let mut upstreams = Vec::new();
        for (name, u) in &f.upstreams {
            if !valid_id(name.get_ref()) {
                self.error(
                    name.span(),
                    format!(
                        "upstream name {:?} must match [a-z0-9][a-z0-9_-]{{0,62}}",
                        name.get_ref()
                    ),
                );
            }
            if u.targets.get_ref().is_empty() {
                self.error(
                    u.targets.span(),
                    format!("upstream {:?} has no targets", name.get_ref()),
                );
            }
            let mut targets = Vec::new();
            let mut schemes = Vec::new();
            for target in u.targets.get_ref() {
                match parse_target(target.get_ref()) {
                    Ok((t, https)) => {
                        targets.push(t);
                        schemes.push(https);
                    }
                    Err(msg) => self.error(target.span(), msg),
                }
            }
            let https = schemes.first().copied().unwrap_or(false);
            if schemes.iter().any(|s| *s != https) {
                self.error(
                    u.targets.span(),
                    format!(
                        "upstream {:?} mixes http and https targets; use one scheme per upstream",
                        name.get_ref()
                    ),
                );
            }
            let insecure = u
                .tls_insecure_skip_verify
                .as_ref()
                .is_some_and(|b| *b.get_ref());
            if (u.ca.is_some() || insecure) && !https {
                let span = match (&u.ca, &u.tls_insecure_skip_verify) {
                    (Some(c), _) => c.span(),
                    (None, Some(b)) => b.span(),
                    (None, None) => 0..0,
                };
                self.error(
                    span,
                    format!("upstream {:?}: `ca` and `tls_insecure_skip_verify` apply to https:// targets only", name.get_ref()),
                );
            }
            let ca = u.ca.as_ref().and_then(|raw| {
                let base = path.parent().unwrap_or(Path::new("."));
                match crate::tls::load_ca(raw, base, &mut tls_files, "upstream") {
                    Ok(ca) => Some(ca),
                    Err((span, msg)) => {
                        self.error(span, format!("upstream {:?}: {msg}", name.get_ref()));
                        None
                    }
                }
            });
            upstreams.push(ResolvedUpstream {
                name: name.get_ref().clone(),
                targets,
                https,
                protocol: u.protocol,
                ca,
                insecure,
            });
        }
        let upstream_ok = |name: &str| {
            f.upstreams
                .get(name)
                .is_some_and(|u| !u.targets.get_ref().is_empty())
        };

        // Defaults.
        let d = &f.defaults;
        if let Some(u) = &d.upstream {
            if !upstream_ok(u.get_ref()) {
                self.missing_upstream(u, "[defaults] upstream");
            }
        }
        self.limits(&d.limits);

        // Tenants.
        let mut tenants = Vec::new();
        let mut host_owner: HashMap<HostPattern, &str> = HashMap::new();
        let mut key_owner: HashMap<crate::credentials::KeyDigest, &str> = HashMap::new();
        let api_key_source = t.resolve.get_ref().contains(&SourceKind::ApiKey);
        for (id, tc) in &f.tenants {
            let id_str = id.get_ref().as_str();
            if !valid_id(id_str) {
                self.error(
                    id.span(),
                    format!("tenant id {id_str:?} must match [a-z0-9][a-z0-9_-]{{0,62}}"),
                );
            }
            let mut hosts = Vec::new();
            for h in &tc.hosts {
                match parse_host_pattern(h.get_ref()) {
                    Ok(p) => {
                        if let Some(owner) = host_owner.get(&p) {
                            if *owner != id_str {
                                self.error(
                                    h.span(),
                                    format!(
                                        "host {:?} of tenant {id_str:?} already belongs to tenant {owner:?}: a host belongs to at most one tenant",
                                        p.to_string()
                                    ),
                                );
                            }
                        } else {
                            host_owner.insert(p.clone(), id_str);
                        }
                        if !hosts.contains(&p) {
                            hosts.push(p);
                        }
                    }
                    Err(msg) => self.error(h.span(), format!("tenant {id_str:?}: {msg}")),
                }
            }
            let upstream = match (&tc.upstream, &d.upstream) {
                (Some(u), _) => {
                    if !upstream_ok(u.get_ref()) {
                        self.missing_upstream(u, &format!("tenant {id_str:?}"));
                    }
                    u.get_ref().clone()
                }
                (None, Some(u)) => u.get_ref().clone(),
                (None, None) => {
                    self.error(
                        id.span(),
                        format!("tenant {id_str:?} names no `upstream` and `[defaults]` has none"),
                    );
                    String::new()
                }
            };
            let mut features = Vec::new();
            for feat in &tc.features {
                let s = feat.get_ref();
                // A space at either end would not survive the header value's trimming.
                if s.is_empty()
                    || s.contains(',')
                    || s.starts_with(' ')
                    || s.ends_with(' ')
                    || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                {
                    self.error(
                        feat.span(),
                        format!("feature {s:?} of tenant {id_str:?} must be printable ASCII without commas (spaces allowed inside, not at either end)"),
                    );
                }
                features.push(s.clone());
            }
            let mut routes = Vec::new();
            let mut prefixes: HashMap<String, usize> = HashMap::new();
            for r in &tc.routes {
                let p = r.prefix.get_ref();
                if !p.starts_with('/') {
                    self.error(
                        r.prefix.span(),
                        format!("route prefix {p:?} of tenant {id_str:?} must start with '/'"),
                    );
                } else if let Some(why) = not_in_a_path(p, "routes match the path") {
                    self.error(
                        r.prefix.span(),
                        format!("route prefix {p:?} of tenant {id_str:?} can never match: {why}"),
                    );
                } else {
                    let normal = crate::snapshot::route_path(p);
                    // Only the case of hex digits may differ (`%2f`): taken as `%2F`.
                    if !normal.eq_ignore_ascii_case(p) {
                        self.error(
                            r.prefix.span(),
                            format!("route prefix {p:?} of tenant {id_str:?} can never match: paths are normalised before routes match them (repeated '/' merged, '.' and '..' segments resolved, %XX of unreserved characters decoded); write {normal:?}"),
                        );
                    } else if let Some(first) = prefixes.get(&*normal) {
                        self.error(
                            r.prefix.span(),
                            format!("route prefix {p:?} of tenant {id_str:?} is also the prefix of an earlier route (line {first}), which takes every request it matches: this route would never be used"),
                        );
                    } else {
                        let line = line_col(self.text, r.prefix.span().start).0;
                        prefixes.insert(normal.into_owned(), line);
                    }
                }
                if !upstream_ok(r.upstream.get_ref()) {
                    self.missing_upstream(&r.upstream, &format!("a route of tenant {id_str:?}"));
                }
                routes.push((p.clone(), r.upstream.get_ref().clone()));
            }
            self.limits(&tc.limits);
            let mut api_keys = Vec::new();
            for k in &tc.api_keys {
                match crate::credentials::parse_digest(k.get_ref()) {
                    Ok(d) => {
                        match key_owner.get(&d) {
                            Some(owner) if *owner != id_str => self.error(
                                k.span(),
                                format!("an api key of tenant {id_str:?} is also a key of tenant {owner:?}: a key names one tenant"),
                            ),
                            Some(_) => {}
                            None => {
                                key_owner.insert(d, id_str);
                            }
                        }
                        api_keys.push(d);
                    }
                    Err(msg) => self.error(k.span(), format!("tenant {id_str:?}: {msg}")),
                }
            }
            if !tc.api_keys.is_empty() && !api_key_source {
                self.error(
                    tc.api_keys[0].span(),
                    format!("tenant {id_str:?} has `api_keys` but `tenancy.resolve` has no \"api_key\" source to read them"),
                );
            }
            let jwt = tc.jwt.as_ref().map(|j| {
                let keys = match crate::jwt::load_tenant_keys(j, base) {
                    Ok(k) if k.is_empty() => {
                        self.error(
                            id.span(),
                            format!("`[tenants.{id_str}.jwt]` has no keys: set `hs256_secret_env`, `hs256_secret_file`, `public_keys` or `jwks_file` (without one no token of the tenant verifies)"),
                        );
                        k
                    }
                    Ok(k) => k,
                    Err((span, msg)) => {
                        self.error(span, format!("tenant {id_str:?}: {msg}"));
                        Vec::new()
                    }
                };
                if !jwt_source {
                    self.error(
                        id.span(),
                        format!("tenant {id_str:?} has `[tenants.{id_str}.jwt]` keys but `tenancy.resolve` has no \"jwt\" source to verify tokens with them"),
                    );
                }
                let mut forward_claims: Vec<(String, String)> = Vec::new();
                for (claim, header) in &j.forward_claims {
                    self.header_name(header, "forward_claims", true);
                    self.not_an_identity_header(header, "forward_claims", t, &read_by);
                    let lower = header.get_ref().to_ascii_lowercase();
                    if let Some((other, _)) = forward_claims.iter().find(|(_, h)| *h == lower) {
                        self.error(
                            header.span(),
                            format!("`forward_claims` sends claims {other:?} and {claim:?} both in {:?}: one header per claim", header.get_ref()),
                        );
                    }
                    forward_claims.push((claim.clone(), lower));
                }
                crate::jwt::ResolvedJwt {
                    keys,
                    issuer: j.issuer.clone(),
                    audience: j.audience.clone(),
                    forward_claims,
                }
            });
            let tenant_tls = tc.tls.as_ref().and_then(|tt| {
                let mut problems = Vec::new();
                let r = crate::tls::validate_tenant(
                    id_str,
                    tt,
                    &hosts,
                    tls_listen.is_some() && tls.is_some(),
                    base,
                    &mut tls_files,
                    &mut |span, msg| problems.push((span, msg)),
                );
                for (span, msg) in problems {
                    self.error(span, msg);
                }
                r
            });
            if let Some(h) = tc
                .tls
                .as_ref()
                .and_then(|tt| tt.forward_client_cert.as_ref())
            {
                self.not_an_identity_header(h, "tls.forward_client_cert", t, &read_by);
            }
            let require = tc.require.as_ref().map_or(&[][..], |r| r.get_ref());
            let require_span = tc.require.as_ref().map_or(id.span(), |r| r.span());
            for (i, kind) in require.iter().enumerate() {
                // A kind named twice is one problem, said once.
                if require[..i].contains(kind) {
                    continue;
                }
                match kind {
                    CredentialKind::Jwt
                        if !jwt_source
                            || (jwt.as_ref().is_none_or(|j| j.keys.is_empty())
                                && jwt_global.is_none()) =>
                    {
                        self.error(
                            require_span.clone(),
                            format!("tenant {id_str:?} requires \"jwt\" but has no `[tenants.{id_str}.jwt]` keys and no `[tenancy.jwt] jwks_file`, or `tenancy.resolve` has no \"jwt\" source: no request could ever pass"),
                        )
                    }
                    CredentialKind::Jwt => {}
                    CredentialKind::ApiKey if !api_key_source || tc.api_keys.is_empty() => {
                        self.error(
                            require_span.clone(),
                            format!("tenant {id_str:?} requires \"api_key\" but has no `api_keys` or `tenancy.resolve` has no \"api_key\" source: no request could ever pass"),
                        )
                    }
                    CredentialKind::ApiKey => {}
                }
            }
            tenants.push(ResolvedTenant {
                id: id_str.to_owned(),
                hosts,
                upstream,
                request_timeout: tc
                    .request_timeout
                    .as_ref()
                    .or(d.request_timeout.as_ref())
                    .map_or(Duration::from_secs(30), |d| d.get_ref().0),
                features,
                status: tc.status,
                limits: merge_limits(&tc.limits, &d.limits),
                routes,
                api_keys,
                require: require.to_vec(),
                jwt,
                tls: tenant_tls,
            });
        }

        let cluster = self.cluster(f);
        if cluster.is_none() {
            self.cluster_scope_needs_redis(f);
        }
        self.store_failure_needs_cluster_scope(f);
        self.burst_needs_rate(f);
        let state_dir = server.state_dir.as_ref().map(|d| {
            let dir = path.parent().unwrap_or(Path::new("")).join(d.get_ref());
            if d.get_ref().is_empty() {
                self.error(d.span(), "`server.state_dir` must be a directory path (leave it out to keep quota counters in memory)".to_owned());
            } else if dir.exists() && !dir.is_dir() {
                // Created when missing; but a file there would fail every save.
                self.error(
                    d.span(),
                    format!("`server.state_dir` {:?} exists and is not a directory", d.get_ref()),
                );
            }
            dir
        });

        Some(Config {
            path: path.to_owned(),
            version: version_with_files(
                text,
                &tls_fingerprints(tls.as_ref(), &tenants, &upstreams),
            ),
            listen: listen?,
            admin_listen: admin_listen?,
            workers: *server.workers.get_ref(),
            shutdown_grace: server.shutdown_grace.0,
            header_read_timeout: server.header_read_timeout.get_ref().0,
            max_header_bytes: server.max_header_bytes.get_ref().0,
            tunnel_idle_timeout: Some(server.tunnel_idle_timeout.0).filter(|d| !d.is_zero()),
            body_idle_timeout: Some(server.body_idle_timeout.0).filter(|d| !d.is_zero()),
            max_connections: server.max_connections,
            log_format: server.log_format,
            audit_log: self.audit_log(path, server.audit_log.as_ref()),
            trusted_proxies,
            limiter_prune_interval: server.limiter_prune_interval.get_ref().0,
            access_log: server.access_log,
            metrics: server.metrics,
            tls_listen,
            redirect_http: *server.redirect_http.get_ref(),
            tls,
            tls_files,
            resolve: t.resolve.get_ref().clone(),
            api_key_header: t.api_key.header.get_ref().to_ascii_lowercase(),
            jwt_header: t.jwt.header.get_ref().to_ascii_lowercase(),
            tenant_claim: t.jwt.tenant_claim.get_ref().clone(),
            jwt_cookie: t.jwt.cookie.as_ref().map(|c| c.get_ref().clone()),
            jwt_leeway: t.jwt.leeway.0,
            jwt_global,
            tenant_header: t.header.get_ref().to_ascii_lowercase(),
            path_prefix: t.path_prefix.get_ref().clone(),
            forward_header: t.forward_header.get_ref().to_ascii_lowercase(),
            upstreams,
            tenants,
            cluster,
            state_dir,
        })
    }

    /// `[cluster]`, validated; `None` without one or without `redis`.
    fn cluster(&mut self, f: &FileConfig) -> Option<ClusterSettings> {
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

    /// `on_store_failure` says what a cluster-scope tenant gets while Redis is away; on
    /// a table whose limits are local it would say nothing, silently.
    fn store_failure_needs_cluster_scope(&mut self, f: &FileConfig) {
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
    fn burst_needs_rate(&mut self, f: &FileConfig) {
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
            }
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

    /// Without a usable `[cluster] redis`, no `scope = "cluster"` can work.
    fn cluster_scope_needs_redis(&mut self, f: &FileConfig) {
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

    fn audit_log(&mut self, config: &Path, raw: Option<&Spanned<String>>) -> Option<PathBuf> {
        let raw = raw?;
        if raw.get_ref().is_empty() {
            self.error(
                raw.span(),
                "`server.audit_log` must be a file path (leave it out to turn the audit log off)"
                    .to_owned(),
            );
            return None;
        }
        let file = config.parent().unwrap_or(Path::new("")).join(raw.get_ref());
        // The path's type, not opened (`check` must not block, nor make the file): a
        // FIFO, a device or a socket is refused where the gateway would refuse it (at
        // start, in a reload), with the same words.
        match std::fs::metadata(&file) {
            Ok(m) if m.is_dir() => self.error(
                raw.span(),
                format!(
                    "`server.audit_log` {:?} is a directory; name a file in it",
                    raw.get_ref()
                ),
            ),
            Ok(m) if !m.is_file() => self.error(
                raw.span(),
                audit_log_not_regular(raw.get_ref(), crate::file::kind(m.file_type())),
            ),
            _ => {}
        }
        // The log would be appended to the config itself (at start, and at every
        // reload): the file then fails to parse, and the next start fails.
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same(&file, config) {
            self.error(
                raw.span(),
                format!(
                    "`server.audit_log` {:?} is this configuration file; name another file",
                    raw.get_ref()
                ),
            );
        }
        Some(file)
    }

    fn missing_upstream(&mut self, u: &Spanned<String>, who: &str) {
        self.error(
            u.span(),
            format!(
                "{who} names upstream {:?}, which is not defined in [upstreams] or has no targets",
                u.get_ref()
            ),
        );
    }

    fn limits(&mut self, l: &LimitsConfig) {
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
}

/// `burst` and `per_client_burst`: at least 1, and 32 bits.
fn valid_burst(b: u64) -> bool {
    (1..=u64::from(u32::MAX)).contains(&b)
}

fn merge_limits(t: &LimitsConfig, d: &LimitsConfig) -> Limits {
    let pick = |a: &Option<Spanned<u64>>, b: &Option<Spanned<u64>>| {
        a.as_ref().or(b.as_ref()).map(|s| *s.get_ref())
    };
    Limits {
        requests_per_second: t
            .requests_per_second
            .as_ref()
            .or(d.requests_per_second.as_ref())
            .map(|s| s.get_ref().0),
        burst: pick(&t.burst, &d.burst),
        max_body: t
            .max_body
            .as_ref()
            .or(d.max_body.as_ref())
            .map(|s| s.get_ref().0),
        max_in_flight: pick(&t.max_in_flight, &d.max_in_flight),
        per_client_requests_per_second: t
            .per_client_requests_per_second
            .as_ref()
            .or(d.per_client_requests_per_second.as_ref())
            .map(|s| s.get_ref().0),
        per_client_burst: pick(&t.per_client_burst, &d.per_client_burst),
        scope: t
            .scope
            .as_ref()
            .or(d.scope.as_ref())
            .map_or(Scope::Local, |s| *s.get_ref()),
        on_store_failure: t
            .on_store_failure
            .as_ref()
            .or(d.on_store_failure.as_ref())
            .map_or(OnStoreFailure::Open, |s| *s.get_ref()),
        requests_per_day: pick(&t.requests_per_day, &d.requests_per_day),
        requests_per_month: pick(&t.requests_per_month, &d.requests_per_month),
    }
}

/// `url` with whatever sits between `://` and its last `@` (the user and password)
/// replaced by `***`, for messages; a URL with no `@` is shown as it is.
fn without_password(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_owned(),
        },
    }
}

/// `server.audit_log` (`name`, as written or resolved) is `kind` ("a FIFO"): the one
/// message for `check`, the start and a reload.
pub(crate) fn audit_log_not_regular(name: &str, kind: &str) -> String {
    format!("`server.audit_log` {name:?} is {kind}, not a regular file; the audit log is appended to a regular file (made when missing), never to a FIFO, a device or a socket, whose writes can block or be lost")
}

/// Why `url` is not a Redis URL the store could connect to, as a phrase naming it as
/// `n` (the URL with `***` for its user and password); `None` when it is one. The
/// schemes are redis-rs's: `redis://` and `valkey://`, `rediss://` and `valkeys://`
/// with TLS, each `[USER][:PASSWORD@]HOST[:PORT][/DB]`; and `unix://`,
/// `redis+unix://` and `valkey+unix://` for a socket's path, for a single server only
/// (`cluster`: one of a Redis Cluster's seed nodes, which the client reaches by the IP
/// addresses and ports the cluster announces).
fn redis_url_problem(url: &str, n: &str, cluster: bool) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some(format!(
            "{n:?} is not a URL: write redis://HOST[:PORT][/DB] (rediss:// for TLS)"
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    match scheme.as_str() {
        "redis" | "rediss" | "valkey" | "valkeys" => {}
        "unix" | "redis+unix" | "valkey+unix" => {
            if cluster {
                return Some(format!("{n:?}: the nodes of a Redis Cluster are reached over TCP at the addresses the cluster announces, not by a unix socket"));
            }
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            let path = path.split(['?', '#']).next().unwrap_or("");
            if !path.starts_with('/') || path.len() < 2 {
                return Some(format!("{n:?} names no socket: write {scheme}:///PATH/TO/redis.sock (an absolute path)"));
            }
            return None;
        }
        _ => {
            return Some(format!("{n:?}: the scheme must be redis:// or rediss:// (TLS); valkey://, valkeys:// and, for a unix socket, unix:// are taken too; not {scheme:?}"));
        }
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(end);
    // The user and password end at the last '@'.
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = if let Some(v6) = host_port.strip_prefix('[') {
        let Some((addr, tail)) = v6.split_once(']') else {
            return Some(format!("{n:?}: an IPv6 address is closed by ']'"));
        };
        match addr.parse::<std::net::Ipv6Addr>() {
            Ok(a) if a.is_unspecified() => {
                return Some(format!("{n:?} names the wildcard address [::], which no client can connect to: write the Redis server's address"));
            }
            Ok(_) => {}
            Err(_) => return Some(format!("{n:?}: [{addr}] is not a valid IPv6 address")),
        }
        match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => return Some(format!("{n:?}: only a ':' and a port may follow ']'")),
        }
    } else {
        let (host, port) = match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        };
        if host.is_empty() {
            return Some(if after.contains('@') {
                // `redis://:pa/ss@host`: the authority ended at the '/'.
                format!("{n:?} names no host: a '/', '?' or '#' in the user or password must be percent-encoded (%2F, %3F, %23)")
            } else {
                format!("{n:?} names no host: write {scheme}://HOST[:PORT][/DB]")
            });
        }
        if host.strip_suffix('.').unwrap_or(host) == "0.0.0.0" {
            return Some(format!("{n:?} names the wildcard address 0.0.0.0, which no client can connect to: write the Redis server's address"));
        }
        if let Some(why) = host_name_problem(host) {
            return Some(format!("{n:?}: {why}"));
        }
        port
    };
    if let Some(p) = port {
        match port_number(p) {
            Some(0) => return Some(format!("{n:?} names port 0, where no Redis can listen")),
            Some(_) => {}
            None => {
                return Some(format!(
                "{n:?}: the port must be a number from 1 to 65535 (6379 when left out), not {p:?}"
            ))
            }
        }
    }
    let path = after.split(['?', '#']).next().unwrap_or("");
    let db = path.trim_matches('/');
    if let Some(minus) = db.strip_prefix('-') {
        if !minus.is_empty() && minus.bytes().all(|b| b.is_ascii_digit()) {
            return Some(format!(
                "{n:?} names database {db}; databases are numbered from 0"
            ));
        }
    }
    if !db.is_empty() && (!db.bytes().all(|b| b.is_ascii_digit()) || db.parse::<i64>().is_err()) {
        return Some(format!(
            "{n:?}: the path names the database, a number such as /0, not {path:?}"
        ));
    }
    if let Some((_, fragment)) = after.split_once('#') {
        if fragment != "insecure" && (scheme == "rediss" || scheme == "valkeys") {
            return Some(format!("{n:?}: the one fragment a {scheme}:// URL takes is #insecure (the server's certificate is then not verified)"));
        }
    }
    None
}

/// Whether two listeners would take the same port: the same address, or a wildcard
/// (`0.0.0.0`, `::`) that covers the other (`::` covers IPv4 too, as Linux binds it
/// dual-stack). Port 0 (any free port) never does.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// `[a-z0-9][a-z0-9_-]{0,62}`
pub fn valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Why no request path holds `p`: a query or fragment mark, or a byte that the
/// request parsers refuse in a path (`http::uri`'s rules: controls, space, `<`, `>`,
/// a backquote; `"`, `{`, `}` and UTF-8 pass). `reader` says what reads the path.
fn not_in_a_path(p: &str, reader: &str) -> Option<String> {
    p.chars().find_map(|c| match c {
        '?' => Some(format!("{reader} without its query string ('?' starts it)")),
        '#' => Some("a fragment ('#') is never sent in a request".to_owned()),
        c if c.is_ascii_control() || matches!(c, ' ' | '<' | '>' | '`') => Some(format!(
            "{c:?} is not valid in a request path (percent-encode it: %{:02X})",
            u32::from(c)
        )),
        _ => None,
    })
}

/// Why `h` (lower case, without its trailing dot) is neither a host name nor an IPv4
/// address, as a phrase to follow `host "…"`; `None` when it is one. Names follow RFC
/// 1123 (labels of letters, digits and '-', not at either end, 63 bytes at most, 253 in
/// all), and also take '_', as internal names often do. A name whose last label is all
/// digits can only be an IPv4 address (RFC 1123 §2.1); `wildcard`: `h` follows `*.`.
/// `Some("")`: not a name at all, which the caller says in its own words.
fn host_problem(h: &str, trailing_dot: bool, wildcard: bool) -> Option<String> {
    let last = h.rsplit('.').next().unwrap_or("");
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return if wildcard || h.parse::<std::net::Ipv4Addr>().is_err() {
            Some(if wildcard {
                " cannot be a wildcard: a host name cannot end in an all-digit label".to_owned()
            } else {
                " is not a valid IPv4 address, and a host name cannot end in an all-digit label"
                    .to_owned()
            })
        } else if trailing_dot {
            Some(": an IP address takes no trailing dot".to_owned())
        } else {
            None
        };
    }
    let plain = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
    if !plain {
        return Some(String::new());
    }
    h.split('.')
        .find(|l| l.starts_with('-') || l.ends_with('-'))
        .map(|l| format!(": label {l:?} starts or ends with '-'"))
}

/// Parses a `hosts` entry: `acme.example.com` or `*.acme.example.com`.
pub fn parse_host_pattern(raw: &str) -> Result<HostPattern, String> {
    let lower = raw.to_ascii_lowercase();
    if let Some((_, rest)) = lower.split_once("://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = host.rsplit('@').next().unwrap_or(host);
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        return Err(format!(
            "host {raw:?} is a URL; write the host name alone: {host:?}"
        ));
    }
    let h = lower.strip_suffix('.').unwrap_or(&lower);
    if h.starts_with('[') || h.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!(
            "host {raw:?}: IPv6 literals are not supported in `hosts`"
        ));
    }
    if h.contains(':') {
        return Err(format!(
            "host {raw:?} must not carry a port (host matching ignores the port)"
        ));
    }
    if !h.is_ascii() {
        return Err(format!(
            "host {raw:?} must be ASCII: write an internationalised name in its punycode form (xn--...)"
        ));
    }
    let trailing_dot = h.len() < lower.len();
    let (pattern, why) = match h.strip_prefix("*.") {
        Some(rest) => (
            HostPattern::Wildcard(rest.to_owned()),
            host_problem(rest, trailing_dot, true),
        ),
        None => (
            HostPattern::Exact(h.to_owned()),
            host_problem(h, trailing_dot, false),
        ),
    };
    match why {
        None => Ok(pattern),
        Some(why) if why.is_empty() => Err(format!(
            "host {raw:?} is not a valid host name or `*.domain` wildcard"
        )),
        Some(why) => Err(format!("host {raw:?}{why}")),
    }
}

/// Parses an upstream target (`host:port` or `http://host:port`) to `host:port`.
/// A target as `host:port`, and whether it is `https://` (whose port defaults to 443).
pub fn parse_target(raw: &str) -> Result<(String, bool), String> {
    // A target carries no user or password (any `@` is refused below), so one that
    // does is parsed, and named in messages, with them replaced by `***`.
    let shown = without_password(raw);
    let raw = shown.as_str();
    let (rest, https) = if let Some(r) = raw.strip_prefix("http://") {
        (r, false)
    } else if let Some(r) = raw.strip_prefix("https://") {
        (r, true)
    } else if raw.contains("://") {
        return Err(format!(
            "target {raw:?}: only http:// and https:// targets are supported"
        ));
    } else {
        (raw, false)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let auth: http::uri::Authority = rest.parse().map_err(|_| {
        format!(
            "target {raw:?} must be \"host:port\", \"http://host:port\" or \"https://host[:port]\""
        )
    })?;
    let host = auth.host();
    if rest.contains('@') || host.is_empty() {
        return Err(format!("target {raw:?} must be a host and a port"));
    }
    if !host.starts_with('[') {
        if let Some(why) = host_name_problem(host) {
            return Err(format!("target {raw:?}: {why}"));
        }
    }
    // `http::uri::Authority` takes "+80" for 80, and has no port for "99999".
    let port = auth.as_str().get(host.len()..).unwrap_or("");
    match port.strip_prefix(':') {
        None | Some("") if https => Ok((format!("{host}:443"), true)),
        None | Some("") => Err(format!(
            "target {raw:?} must name a port, e.g. \"127.0.0.1:9001\""
        )),
        Some(p) => match port_number(p) {
            Some(0) => Err(format!("target {raw:?}: port 0 cannot be connected to")),
            Some(_) => Ok((auth.as_str().to_owned(), https)),
            None => Err(format!(
                "target {raw:?}: the port must be a number from 1 to 65535"
            )),
        },
    }
}

/// Why `host` (a name or an IPv4 address, not bracketed, as written in a target or a
/// Redis URL) is not one to connect to, as "HOST is not a valid host name" or "host
/// HOST…"; `None` when it is one. Case and one trailing dot do not count.
fn host_name_problem(host: &str) -> Option<String> {
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    match host_problem(name, name.len() < lower.len(), false)? {
        why if why.is_empty() => Some(format!("{host:?} is not a valid host name")),
        why => Some(format!("host {host:?}{why}")),
    }
}

/// A port written as digits only (`u16::from_str` also takes "+80"), 0 included.
fn port_number(p: &str) -> Option<u16> {
    p.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| p.parse().ok())
        .flatten()
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
