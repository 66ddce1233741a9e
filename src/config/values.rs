//! Checks of single values, shared by the rules and by the rest of the gateway:
//! tenant ids, host patterns, upstream targets, Redis URLs, bursts, and the limits a
//! tenant ends up with once `[defaults.limits]` fills what it leaves out.

use super::*;

/// `burst` and `per_client_burst`: at least 1, and 32 bits.
pub(super) fn valid_burst(b: u64) -> bool {
    (1..=u64::from(u32::MAX)).contains(&b)
}

pub(super) fn merge_limits(t: &LimitsConfig, d: &LimitsConfig) -> Limits {
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
pub(super) fn without_password(url: &str) -> String {
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
pub(super) fn redis_url_problem(url: &str, n: &str, cluster: bool) -> Option<String> {
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
pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
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
pub(super) fn not_in_a_path(p: &str, reader: &str) -> Option<String> {
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
pub(super) fn host_problem(h: &str, trailing_dot: bool, wildcard: bool) -> Option<String> {
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
pub(super) fn host_name_problem(host: &str) -> Option<String> {
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    match host_problem(name, name.len() < lower.len(), false)? {
        why if why.is_empty() => Some(format!("{host:?} is not a valid host name")),
        why => Some(format!("host {host:?}{why}")),
    }
}

/// A port written as digits only (`u16::from_str` also takes "+80"), 0 included.
pub(super) fn port_number(p: &str) -> Option<u16> {
    p.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| p.parse().ok())
        .flatten()
}
