//! Header rules of SPEC.md "What is forwarded", one small function per concern:
//! hop-by-hop removal (both directions), tenant and feature injection, request ids
//! and `x-forwarded-*`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;

use crate::snapshot::{Tenancy, Tenant};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_TENANT_FEATURES: HeaderName = HeaderName::from_static("x-tenant-features");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers the gateway may add to a forwarded request (tenant id, features,
/// `x-request-id`, `Host`, `x-forwarded-host`, `-proto`, `-for`, one more for a
/// forwarded claim or client certificate): maps built for a request reserve this much
/// room up front.
pub const ADDED_TO_REQUESTS: usize = 8;
/// Headers added to a response (`x-request-id`, `RateLimit`, `RateLimit-Policy`).
pub const ADDED_TO_RESPONSES: usize = 3;

/// The fixed hop-by-hop list (with `Connection` itself), removed in both directions;
/// the HTTP/1.1 fast path matches response header names against it as bytes.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "keep-alive",
    "proxy-connection",
];

/// Whether `name` is on [`HOP_BY_HOP`], compared as `HeaderName`s (standard names
/// compare without looking at bytes).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes `Connection`, every header it names, and the fixed hop-by-hop list.
/// `Host` is never removed through `Connection`: it is end to end and routing needs it.
/// One pass over the names first, so the common message with none of them costs no
/// hashed lookups.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| name != header::HOST)
            .collect();
        for name in listed {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    headers.remove(header::PROXY_AUTHORIZATION);
}

/// The client's `x-request-id` when it is sane (1–128 visible ASCII characters),
/// else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..=0x7e).contains(c)) {
            return v.clone();
        }
    }
    new_request_id()
}

/// 16 hex digits, unique within the process: a bijective mix of a per-process random
/// seed plus a counter, so ids do not reveal request counts.
pub fn new_request_id() -> HeaderValue {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    });
    let n = splitmix64(seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed)));
    let mut buf = [0u8; 16];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    small_value(|out| out.extend_from_slice(&buf)).expect("hex digits are a valid header value")
}

/// Room kept in the shared block for the next value; a value written past it still
/// works (the block grows), it only costs an allocation.
const SMALL_VALUE_ROOM: usize = 128;
/// Size of one shared block of small header values: a few dozen values. Small, because
/// one value kept for long (the request id of a long download) keeps its whole block.
const SMALL_VALUE_BLOCK: usize = 1024;

/// A short header value made per request (the request id, `RateLimit`), written by
/// `write` into a block shared with the values made before it on this thread. One
/// allocation serves a few dozen values, and clones only count references; a value
/// built from its own buffer costs one allocation to make and another at its first
/// clone (when `bytes` turns it into a shared one). A block is freed when the last
/// value cut from it is dropped. `None` when `write` wrote something that is not a
/// valid header value.
pub fn small_value(write: impl FnOnce(&mut bytes::BytesMut)) -> Option<HeaderValue> {
    use std::cell::RefCell;
    thread_local! {
        static BLOCK: RefCell<bytes::BytesMut> = RefCell::new(bytes::BytesMut::new());
    }
    BLOCK.with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() - block.len() < SMALL_VALUE_ROOM {
            *block = bytes::BytesMut::with_capacity(SMALL_VALUE_BLOCK);
        }
        block.clear();
        write(&mut block);
        HeaderValue::from_maybe_shared(block.split().freeze()).ok()
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the rewrite of a forwarded request needs besides the headers themselves.
pub struct Forward<'a> {
    pub tenancy: &'a Tenancy,
    pub tenant: &'a Tenant,
    /// The client's IP address, formatted once per connection.
    pub peer_ip: &'a HeaderValue,
    pub request_id: &'a HeaderValue,
    /// The request's authority when it came in the URI (HTTP/2, absolute form).
    pub authority: Option<&'a http::uri::Authority>,
    /// The request came over TLS (`x-forwarded-proto: https`).
    pub https: bool,
}

/// Rewrites the headers of a request about to be forwarded.
pub fn rewrite_request(headers: &mut HeaderMap, f: &Forward<'_>) {
    // Room for what is added below, made once rather than by repeated growth.
    let _ = headers.try_reserve(ADDED_TO_REQUESTS);
    remove_hop_by_hop(headers);

    // Tenant identity comes from the gateway only: `insert` replaces every client copy
    // of the forwarded header; the tenant header and features are removed if present.
    let (mut tenant_header, mut features, mut api_key) = (false, false, false);
    for name in headers.keys() {
        tenant_header |= name == f.tenancy.header;
        features |= name == X_TENANT_FEATURES;
        api_key |= name == f.tenancy.api_key_header;
    }
    if tenant_header {
        headers.remove(&f.tenancy.header);
    }
    // The upstream learns the tenant from the gateway, never the key itself.
    if api_key && f.tenancy.api_key_source {
        headers.remove(&f.tenancy.api_key_header);
    }
    if let Some(name) = &f.tenancy.forward_header {
        headers.insert(name.clone(), f.tenant.id_value.clone());
    }
    match &f.tenant.features {
        Some(v) => {
            headers.insert(X_TENANT_FEATURES.clone(), v.clone());
        }
        None if features => {
            headers.remove(&X_TENANT_FEATURES);
        }
        None => {}
    }

    headers.insert(X_REQUEST_ID.clone(), f.request_id.clone());

    // An HTTP/2 request carries its host in the URI; HTTP/1.1 upstreams need `Host`.
    if !headers.contains_key(header::HOST) {
        if let Some(a) = f.authority {
            if let Some(v) = small_value(|b| b.extend_from_slice(a.as_str().as_bytes())) {
                headers.insert(header::HOST, v);
            }
        }
    }
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    let proto = if f.https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    append_forwarded_for(headers, f.peer_ip);
}

/// Appends the client address to `x-forwarded-for`, folding repeated copies into one.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer_ip: &HeaderValue) {
    let mut values = headers.get_all(&X_FORWARDED_FOR).iter();
    let Some(first) = values.next() else {
        headers.insert(X_FORWARDED_FOR.clone(), peer_ip.clone());
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in values {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(v.as_bytes());
    }
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(peer_ip.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => headers.insert(X_FORWARDED_FOR.clone(), v),
        Err(_) => headers.insert(X_FORWARDED_FOR.clone(), peer_ip.clone()),
    };
}

/// Rewrites the headers of an upstream response about to be sent to the client
/// (`x-request-id` is set on every response, proxied or not, by the caller).
pub fn rewrite_response(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_cut_from_one_block_stay_intact() {
        let a = small_value(|b| b.extend_from_slice(b"first")).unwrap();
        let b = small_value(|b| b.extend_from_slice(b"second")).unwrap();
        // Longer than a block: the block grows for it, the values before are untouched.
        let long = "x".repeat(3 * SMALL_VALUE_BLOCK);
        let c = small_value(|b| b.extend_from_slice(long.as_bytes())).unwrap();
        let d = small_value(|b| b.extend_from_slice(b"after")).unwrap();
        assert_eq!(
            (a.as_bytes(), b.as_bytes(), d.as_bytes()),
            (&b"first"[..], &b"second"[..], &b"after"[..])
        );
        assert_eq!(c.as_bytes(), long.as_bytes());
        assert!(small_value(|b| b.extend_from_slice(b"bad\nvalue")).is_none());
        // Many more than fit one block.
        let many: Vec<_> = (0..500)
            .map(|i| small_value(|b| b.extend_from_slice(format!("v{i}").as_bytes())).unwrap())
            .collect();
        for (i, v) in many.iter().enumerate() {
            assert_eq!(v, format!("v{i}").as_str());
        }
        assert_eq!(a.clone(), "first");
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_including_connection_listed() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "x"),
            ("x-kept", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn hop_by_hop_list_and_matcher_agree() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["host", "x-secret", "content-length", "trailers"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[("connection", "host"), ("host", "a.com")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h["host"], "a.com");
    }

    #[test]
    fn request_ids() {
        let sane = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&sane), "abc-123");
        let long = "a".repeat(129);
        let bad = map(&[("x-request-id", &long)]);
        assert_eq!(request_id(&bad).len(), 16);
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn forwarded_for_appends() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
    }
}
