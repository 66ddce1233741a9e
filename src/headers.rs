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

/// Why a header name configured in gateway.toml cannot be `name` (lower case), if it
/// cannot: `Host` and the framing headers, which the gateway must read and write itself
/// (a tenant header of `content-length` would be stripped from the request and leave its
/// body to be read as the next one). `sets`: the gateway sets this header on forwarded
/// requests (`forward_header`, `forward_claims`, `forward_client_cert`), so hop-by-hop
/// names (which would tell the upstream to drop headers, or never pass) and the ones it
/// already sets are refused too. A header it only reads may be hop-by-hop: it is read
/// before those are removed (a credential in `Proxy-Authorization`, say).
pub fn reserved(name: &str, sets: bool) -> Option<&'static str> {
    const OWN: [&str; 5] = [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-request-id",
        "x-tenant-features",
    ];
    if ["host", "content-length", "transfer-encoding"].contains(&name) {
        Some("the gateway reads and writes it for every request itself")
    } else if sets && HOP_BY_HOP.contains(&name) {
        Some("it is hop-by-hop: removed at the gateway")
    } else if sets && OWN.contains(&name) {
        Some("the gateway sets it on forwarded requests itself")
    } else {
        None
    }
}

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

/// Fields that framing, routing, authentication or caching read from a message's
/// head, which a trailer section may not carry (RFC 9110 §6.5.1; the list hyper keeps
/// out of the trailers it sends, with `Cookie`, `Expect` and `Range`).
static HEAD_ONLY: [HeaderName; 13] = [
    header::AUTHORIZATION,
    header::CACHE_CONTROL,
    header::CONTENT_ENCODING,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::COOKIE,
    header::EXPECT,
    header::HOST,
    header::MAX_FORWARDS,
    header::RANGE,
    header::SET_COOKIE,
    header::TRAILER,
];

/// Whether an upstream's response trailer field `name` goes on to the client (from
/// an HTTP/1.1 upstream, whose trailer section the gateway decodes itself): not
/// hop-by-hop, and not one read from the head.
pub fn response_trailer_passes(name: &HeaderName) -> bool {
    !(is_hop_by_hop(name) || HEAD_ONLY.contains(name))
}

/// Removes `Connection`, every header it names, and the fixed hop-by-hop list.
/// `Host` and `Content-Length` are never removed through `Connection`: they are end to
/// end — routing needs the one, and the message's framing is the other (a request
/// whose length went while its body was still sent as is would reach the upstream as
/// two).
/// One pass over the names first, so the common message with none of them costs no
/// hashed lookups. Returns whether a `TE` it removed named `trailers` (the client
/// takes response trailers: RFC 9110 §10.1.4), read here where the hop-by-hop
/// fields are looked at anyway.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    if !headers.keys().any(is_hop_by_hop) {
        return false;
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            t.split(|&b| b == b';')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        })
    });
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| name != header::HOST && name != header::CONTENT_LENGTH)
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
    te_trailers
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
    /// The request came over TLS (`x-forwarded-proto: https`).
    pub https: bool,
}

/// The headers the gateway sets on a forwarded request (tenant id, features,
/// `x-request-id`, `Host` from an HTTP/2 authority, `x-forwarded-host`, `-proto`,
/// `-for`), held beside the request's map until its head is written: the HTTP/1.1
/// fast path writes them after the map's own lines, so a request costs no hashed
/// inserts, no growth of the map and no reference counts for them; every other path
/// inserts them with [`Added::apply`]. The client's copies of these names are already
/// gone from the map.
#[must_use = "the gateway's headers are lost unless written or applied"]
#[derive(Debug, Default)]
pub struct Added<'a> {
    tenant: Option<(&'a HeaderName, &'a HeaderValue)>,
    features: Option<&'a HeaderValue>,
    /// `tenant` and `features` as HTTP/1.1 lines, pre-rendered (`Tenant::request_lines`):
    /// what `write` copies instead, from one cache line of the tenant's.
    lines: Option<&'a [u8]>,
    request_id: Option<&'a HeaderValue>,
    /// `Host` from the request's authority, when the map has none.
    host: Option<HeaderValue>,
    /// The request came with a `Host` (the map's, or `host`): `x-forwarded-host`
    /// repeats it.
    forwarded_host: bool,
    /// `x-forwarded-proto` is sent: `https` or `http`.
    https: Option<bool>,
    forwarded_for: ForwardedFor<'a>,
    /// The client sent `TE: trailers`: not a header to add, but read where the
    /// client's `TE` goes; [`Added::apply`] keeps it.
    te_trailers: bool,
}

#[derive(Debug, Default)]
enum ForwardedFor<'a> {
    #[default]
    None,
    /// The client's address alone.
    Peer(&'a HeaderValue),
    /// The client's own copies folded into one, then its address.
    Joined(HeaderValue),
}

impl Added<'_> {
    /// Whether the client sent `TE: trailers` (it reads response trailers).
    pub fn te_trailers(&self) -> bool {
        self.te_trailers
    }

    /// Inserts the headers into `headers` (which then holds the whole forwarded set),
    /// leaving `self` empty.
    pub fn apply(&mut self, headers: &mut HeaderMap) {
        let Added {
            tenant,
            features,
            lines: _,
            request_id,
            host,
            forwarded_host,
            https,
            forwarded_for,
            te_trailers,
        } = std::mem::take(self);
        self.te_trailers = te_trailers;
        if tenant.is_none() && request_id.is_none() && https.is_none() {
            return;
        }
        let _ = headers.try_reserve(ADDED_TO_REQUESTS);
        if let Some((name, value)) = tenant {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(v) = features {
            headers.insert(X_TENANT_FEATURES.clone(), v.clone());
        }
        if let Some(v) = request_id {
            headers.insert(X_REQUEST_ID.clone(), v.clone());
        }
        if let Some(v) = host {
            headers.insert(header::HOST, v);
        }
        if forwarded_host {
            if let Some(v) = headers.get(header::HOST).cloned() {
                headers.insert(X_FORWARDED_HOST.clone(), v);
            }
        }
        if let Some(https) = https {
            headers.insert(X_FORWARDED_PROTO.clone(), proto(https));
        }
        match forwarded_for {
            ForwardedFor::None => {}
            ForwardedFor::Peer(v) => {
                headers.insert(X_FORWARDED_FOR.clone(), v.clone());
            }
            ForwardedFor::Joined(v) => {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
    }

    /// Writes the headers as HTTP/1.1 lines; `map_host` is the `Host` of the map
    /// they go out with.
    pub fn write(&self, out: &mut Vec<u8>, map_host: Option<&HeaderValue>) {
        if let Some(lines) = self.lines {
            out.extend_from_slice(lines);
        } else {
            if let Some((name, value)) = self.tenant {
                write_line(out, name, value);
            }
            if let Some(v) = self.features {
                write_line(out, &X_TENANT_FEATURES, v);
            }
        }
        if let Some(v) = self.request_id {
            write_line(out, &X_REQUEST_ID, v);
        }
        if let Some(v) = &self.host {
            write_line(out, &header::HOST, v);
        }
        if self.forwarded_host {
            if let Some(v) = map_host.or(self.host.as_ref()) {
                write_line(out, &X_FORWARDED_HOST, v);
            }
        }
        if let Some(https) = self.https {
            out.extend_from_slice(if https {
                b"x-forwarded-proto: https\r\n"
            } else {
                b"x-forwarded-proto: http\r\n"
            });
        }
        match &self.forwarded_for {
            ForwardedFor::None => {}
            ForwardedFor::Peer(v) => write_line(out, &X_FORWARDED_FOR, v),
            ForwardedFor::Joined(v) => write_line(out, &X_FORWARDED_FOR, v),
        }
    }

    /// The request came with a `Host` (in the map, or `host` from its authority), as
    /// the rewrite found; false once applied (the map then says).
    pub fn has_host(&self) -> bool {
        self.forwarded_host
    }
}

fn write_line(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    crate::h1::wire::write_header(out, name.as_str().as_bytes(), value.as_bytes());
}

fn proto(https: bool) -> HeaderValue {
    HeaderValue::from_static(if https { "https" } else { "http" })
}

/// Request headers no client may send, whatever tenant it is for:
/// - `identity`: what the gateway sets for some tenant from a verified credential (a
///   `forward_client_cert` subject, `forward_claims`). A client of another tenant
///   that shares the upstream could otherwise hand the backend a subject or claim it
///   never proved; the tenant's own are removed and set again as before.
/// - the `_` spelling of every name the gateway sets or reads for tenancy
///   (`x_tenant_id` beside `x-tenant-id`): CGI-style servers (WSGI, Rack, PHP) fold `_`
///   and `-` into one variable, so such a copy would stand beside the gateway's or
///   replace it. nginx drops every name with `_` by default; only these go here.
///
/// `lengths` has bit `n` set for each guarded name of `n` bytes (bit 63: 63 or more), so
/// the rewrite's one pass over the names tells, at a shift and a mask per name, whether
/// any could be one; only then are they compared.
#[derive(Debug, Default)]
pub struct Guarded {
    identity: Box<[HeaderName]>,
    /// Every guarded name (`-` spelling), identity names included.
    names: Box<[HeaderName]>,
    lengths: u64,
}

impl Guarded {
    /// `own`: names the gateway sets or strips for tenancy on every request (its tenant
    /// header, the API-key header, `forward_header`); `identity`: every tenant's
    /// credential-derived names.
    pub fn new(
        own: impl IntoIterator<Item = HeaderName>,
        identity: impl IntoIterator<Item = HeaderName>,
    ) -> Guarded {
        let mut ids: Vec<HeaderName> = identity.into_iter().collect();
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        ids.dedup();
        let fixed = [
            &X_TENANT_FEATURES,
            &X_REQUEST_ID,
            &X_FORWARDED_FOR,
            &X_FORWARDED_HOST,
            &X_FORWARDED_PROTO,
        ];
        let mut names: Vec<HeaderName> = own
            .into_iter()
            .chain(fixed.into_iter().cloned())
            .chain(ids.iter().cloned())
            .collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        let lengths = names.iter().fold(0u64, |m, n| m | length_bit(n));
        Guarded {
            identity: ids.into_boxed_slice(),
            names: names.into_boxed_slice(),
            lengths,
        }
    }

    /// Whether `name` may be guarded: its length is one of theirs.
    #[inline]
    fn may_be(&self, name: &HeaderName) -> bool {
        self.lengths & length_bit(name) != 0
    }

    /// Whether `name` must go: an identity name, or a guarded name spelt with `_`.
    fn doomed(&self, name: &HeaderName) -> bool {
        if self.identity.contains(name) {
            return true;
        }
        let s = name.as_str().as_bytes();
        s.contains(&b'_')
            && self.names.iter().any(|g| {
                let g = g.as_str().as_bytes();
                g.len() == s.len()
                    && g.iter()
                        .zip(s)
                        .all(|(&g, &c)| g == c || (g == b'-' && c == b'_'))
            })
    }

    /// Whether a request trailer field `name` goes on to the upstream: not one the
    /// gateway sets or guards, in either spelling (a backend that merges trailers into
    /// its headers would take it for the gateway's), not hop-by-hop, and not one that
    /// framing, routing, authentication or caching read from the head (RFC 9110
    /// §6.5.1; the list hyper keeps out of the trailers it sends).
    pub fn trailer_passes(&self, name: &HeaderName) -> bool {
        response_trailer_passes(name) && !(self.names.contains(name) || self.doomed(name))
    }

    /// Removes every doomed name from `headers`.
    fn remove_from(&self, headers: &mut HeaderMap) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| self.may_be(n) && self.doomed(n))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }
}

fn length_bit(name: &HeaderName) -> u64 {
    1 << name.as_str().len().min(63)
}

/// Rewrites the headers of a request about to be forwarded: what must not reach the
/// upstream is removed from `headers` (hop-by-hop, the client's tenant header and
/// features, an API key used as the credential, and the client's copies of every
/// header the gateway sets); what the gateway sets is returned, to be written or
/// applied. `authority` is the request's when it came in the URI (HTTP/2, absolute
/// form).
pub fn rewrite_request<'a>(
    headers: &mut HeaderMap,
    authority: Option<&http::uri::Authority>,
    f: &Forward<'a>,
) -> Added<'a> {
    let te_trailers = remove_hop_by_hop(headers);

    // One pass over the names says which of the gateway's names the client sent, so
    // the common request, with none of them, costs no hashed lookups. Tenant identity
    // comes from the gateway only: every client copy of the forwarded header goes.
    let forward = f.tenancy.forward_header.as_ref();
    let (mut tenant_header, mut features, mut api_key, mut forwarded, mut request_id) =
        (false, false, false, false, false);
    let (mut fwd_host, mut fwd_proto, mut fwd_for) = (false, false, false);
    let mut guarded = false;
    for name in headers.keys() {
        guarded |= f.tenancy.guarded.may_be(name);
        tenant_header |= name == f.tenancy.header;
        features |= name == X_TENANT_FEATURES;
        api_key |= name == f.tenancy.api_key_header;
        forwarded |= forward.is_some_and(|h| name == h);
        request_id |= name == X_REQUEST_ID;
        fwd_host |= name == X_FORWARDED_HOST;
        fwd_proto |= name == X_FORWARDED_PROTO;
        fwd_for |= name == X_FORWARDED_FOR;
    }
    if tenant_header {
        headers.remove(&f.tenancy.header);
    }
    if guarded {
        f.tenancy.guarded.remove_from(headers);
    }
    // The upstream learns the tenant from the gateway, never the key itself.
    if api_key && f.tenancy.api_key_source {
        headers.remove(&f.tenancy.api_key_header);
    }
    if let (true, Some(name)) = (forwarded, forward) {
        headers.remove(name);
    }
    if features {
        headers.remove(&X_TENANT_FEATURES);
    }
    if request_id {
        headers.remove(&X_REQUEST_ID);
    }
    if fwd_host {
        headers.remove(&X_FORWARDED_HOST);
    }
    if fwd_proto {
        headers.remove(&X_FORWARDED_PROTO);
    }
    let forwarded_for = if fwd_for {
        let joined = forwarded_for(headers, f.peer_ip);
        headers.remove(&X_FORWARDED_FOR);
        ForwardedFor::Joined(joined)
    } else {
        ForwardedFor::Peer(f.peer_ip)
    };

    // An HTTP/2 request carries its host in the URI; HTTP/1.1 upstreams need `Host`.
    let map_host = headers.contains_key(header::HOST);
    let host = match map_host {
        true => None,
        false => {
            authority.and_then(|a| small_value(|b| b.extend_from_slice(a.as_str().as_bytes())))
        }
    };
    let added = Added {
        tenant: forward.map(|name| (name, &f.tenant.id_value)),
        features: f.tenant.features.as_ref(),
        // Rendered for the snapshot's `forward_header`, which `forward` is.
        lines: f.tenant.request_lines(),
        request_id: Some(f.request_id),
        // Decided now: a `Host` the caller adds later (an HTTP/1.0 request without
        // one gets the target's) is not the client's and is not forwarded as such.
        forwarded_host: map_host || host.is_some(),
        host,
        https: Some(f.https),
        forwarded_for,
        te_trailers,
    };
    // `forward` is never one of the headers set above: the config refuses those names
    // (`reserved`), so the lines can be written after the client's without a duplicate.
    added
}

/// The `x-forwarded-for` to send: the client's copies folded into one, then the
/// client's address.
pub fn forwarded_for(headers: &HeaderMap, peer_ip: &HeaderValue) -> HeaderValue {
    let mut values = headers.get_all(&X_FORWARDED_FOR).iter();
    let Some(first) = values.next() else {
        return peer_ip.clone();
    };
    let mut joined = first.as_bytes().to_vec();
    for v in values {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(v.as_bytes());
    }
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(peer_ip.as_bytes());
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer_ip.clone())
}

/// Rewrites the headers of an upstream response (read by hyper's client) about to be
/// sent to the client (`x-request-id` is set on every response, proxied or not, by the
/// caller). A `Content-Length` beside `Transfer-Encoding` goes first: the body was read
/// by the latter (RFC 9112 §6.3), and the length, left in, would frame the client's
/// copy differently — cut short, or waiting for bytes that never come.
/// Nor on a 204, which has no body and may not name a length (RFC 9110 §8.6; HTTP/2
/// clients reset the stream over one), as the fast path leaves it out.
pub fn rewrite_response(status: http::StatusCode, headers: &mut HeaderMap) {
    if status == http::StatusCode::NO_CONTENT || headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_names_go_in_either_spelling_and_others_stay() {
        let n = |s: &str| HeaderName::from_bytes(s.as_bytes()).unwrap();
        let long = format!("x-{}", "a-".repeat(40));
        let g = Guarded::new([n("x-tenant-id")], [n("x-user-id"), n(&long)]);
        let mut h = HeaderMap::new();
        for name in [
            "x_tenant_id",
            "x-user-id",
            "x_user_id",
            "x_forwarded_proto",
            &long.replace('-', "_"),
            // Kept: the gateway's own spelling is for the rewrite to handle; the rest
            // are not the gateway's.
            "x-tenant-id",
            "x-request-id",
            "user_agent",
            "x_tenant_idx",
            "content-type",
        ] {
            h.append(n(name), HeaderValue::from_static("v"));
        }
        g.remove_from(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "content-type",
                "user_agent",
                "x-request-id",
                "x-tenant-id",
                "x_tenant_idx"
            ]
        );
    }

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

    fn snapshot(tenancy: &str) -> crate::snapshot::Snapshot {
        let text = format!(
            "[tenancy]\nresolve = [\"host\"]\n{tenancy}\n[upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n\
             [defaults]\nupstream = \"u\"\n[tenants.t1]\nhosts = [\"a.example\"]\nfeatures = [\"f1\"]\n"
        );
        let config = crate::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        crate::snapshot::Snapshot::build(&config, None).unwrap()
    }

    type Lines = Vec<(String, String)>;

    /// The forwarded request, as (name, value) lines in any order, is `want` both from
    /// the map with the gateway's headers applied and as the fast path writes it.
    fn assert_forwarded(
        tenancy: &str,
        client: &[(&str, &str)],
        authority: Option<&str>,
        want: &[(&str, &str)],
    ) {
        let (applied, written) =
            with_forward(tenancy, true, |f| forwarded_with(f, client, authority));
        let want = pairs(want);
        assert_eq!(applied, want);
        assert_eq!(written, want);
    }

    /// Calls `test` with a `Forward` for tenant t1 of a one-tenant config: peer
    /// 10.0.0.9, request id `rid-1`.
    fn with_forward<R>(tenancy: &str, https: bool, test: impl FnOnce(&Forward<'_>) -> R) -> R {
        let snap = snapshot(tenancy);
        let (peer, rid) = (
            HeaderValue::from_static("10.0.0.9"),
            HeaderValue::from_static("rid-1"),
        );
        test(&Forward {
            tenancy: &snap.tenancy,
            tenant: snap.tenant(0),
            peer_ip: &peer,
            request_id: &rid,
            https,
        })
    }

    fn forwarded_with(
        f: &Forward<'_>,
        client: &[(&str, &str)],
        authority: Option<&str>,
    ) -> (Lines, Lines) {
        let authority = authority.map(|a| a.parse::<http::uri::Authority>().unwrap());
        let lines = |h: &HeaderMap| -> Lines {
            let mut v: Vec<_> = h
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            v.sort();
            v
        };

        let mut applied = map(client);
        let mut added = rewrite_request(&mut applied, authority.as_ref(), f);
        added.apply(&mut applied);
        let mut again = HeaderMap::new();
        added.apply(&mut again);
        assert!(again.is_empty(), "apply leaves nothing behind: {again:?}");

        let mut written = map(client);
        let added = rewrite_request(&mut written, authority.as_ref(), f);
        let mut out = Vec::new();
        added.write(&mut out, written.get(header::HOST));
        let text = String::from_utf8(out).unwrap();
        for line in text.split_terminator("\r\n") {
            let (n, v) = line.split_once(": ").unwrap();
            written.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        (lines(&applied), lines(&written))
    }

    fn pairs(p: &[(&str, &str)]) -> Lines {
        let mut v: Vec<_> = p
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn gateway_headers_written_or_applied_are_the_same_set() {
        // Client copies of every name the gateway sets are replaced, x-forwarded-for
        // appended to.
        assert_forwarded(
            "",
            &[
                ("host", "a.example"),
                ("x-tenant-id", "evil"),
                ("x-tenant-features", "all"),
                ("x-request-id", "theirs"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
                ("accept", "*/*"),
            ],
            None,
            &[
                ("accept", "*/*"),
                ("host", "a.example"),
                ("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.9"),
                ("x-forwarded-host", "a.example"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "rid-1"),
                ("x-tenant-features", "f1"),
                ("x-tenant-id", "t1"),
            ],
        );

        // HTTP/2: Host from the authority.
        assert_forwarded(
            "",
            &[],
            Some("a.example:8443"),
            &[
                ("host", "a.example:8443"),
                ("x-forwarded-for", "10.0.0.9"),
                ("x-forwarded-host", "a.example:8443"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "rid-1"),
                ("x-tenant-features", "f1"),
                ("x-tenant-id", "t1"),
            ],
        );

        // Neither Host nor authority: no x-forwarded-host; injection turned off.
        assert_forwarded(
            "forward_header = \"\"",
            &[],
            None,
            &[
                ("x-forwarded-for", "10.0.0.9"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "rid-1"),
                ("x-tenant-features", "f1"),
            ],
        );
        // A `forward_header` named like a header the gateway sets itself is refused by
        // the config (`check::header_names_the_gateway_needs_for_itself_are_refused`).
    }

    /// An HTTP/1.0 request without `Host` gets the target's from `commit` after the
    /// rewrite; `x-forwarded-host` still says the client named no host.
    #[test]
    fn a_host_added_after_the_rewrite_is_not_forwarded_as_the_clients() {
        with_forward("", false, |f| {
            let mut h = HeaderMap::new();
            let mut added = rewrite_request(&mut h, None, f);
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9"));
            let mut out = Vec::new();
            added.write(&mut out, h.get(header::HOST));
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("x-forwarded-host"), "{text}");
            added.apply(&mut h);
            assert!(!h.contains_key(&X_FORWARDED_HOST), "{h:?}");
            assert_eq!(h[header::HOST], "127.0.0.1:9");
        });
    }

    #[test]
    fn forwarded_for_appends() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        assert_eq!(forwarded_for(&h, &ip), "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(forwarded_for(&HeaderMap::new(), &ip), "10.0.0.9");
    }
}
