//! HTTP/1.1 on the wire, for the fast path: the request head parsed into
//! `http::request::Parts` without copying header values, the forwarded request head
//! written out, the upstream's response head rewritten straight into the bytes the
//! client gets (hop-by-hop headers out, the gateway's headers in), and the chunked
//! decoder. Pure functions over byte slices; the connection loop is in `mod.rs`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri, Version};

use crate::error::ProxyError;

/// Header lines the fast path reads in one head; a request with more goes to hyper
/// (which allows 256), a response with more is refused as malformed.
const MAX_HEADERS: usize = 128;

/// The most header fields an upstream's response head may have, on every path: the
/// gateway's own exchange parses this many, and hyper's client (`https://` and
/// WebSocket upstreams, `upstream.rs`) is set to the same, so that a head one path
/// passes on is not a 502 on another (hyper's own default is 100).
pub const MAX_RESPONSE_FIELDS: usize = MAX_HEADERS;

/// The largest upstream response head (status line to the empty line), on every path:
/// here, hyper's client (`max_header_size`) and, as HTTP/2 counts a header list, the
/// HTTP/2 client's `SETTINGS_MAX_HEADER_LIST_SIZE` (hyper's defaults were ~400 KiB
/// and 16 KiB). Longer is a 502 `upstream_error`.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What the client's buffered bytes hold. Returned and matched at once, never
/// stored, so the large variant is not boxed (that would be an allocation per request).
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Something the fast path leaves to hyper: HTTP/1.0, a body without a length
    /// (`Transfer-Encoding`), `Expect`, `Upgrade`, `CONNECT`, more than 128 headers.
    Fallback,
    /// A head the gateway refuses itself, where hyper would have answered with an
    /// empty 400 or 431: not HTTP/1.1 at all (`MalformedRequest`: what httparse found
    /// wrong, a bad `Content-Length`), or more than [`MAX_HEADER_FIELDS`] header lines
    /// (`TooManyHeaderFields`).
    Refused(ProxyError),
    Request(Head),
}

/// A request head, taken out of the buffer.
pub struct Head {
    pub parts: http::request::Parts,
    /// `Content-Length`, 0 when absent.
    pub body_len: u64,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    /// The head as read, for handing the request to hyper after all.
    pub raw: Bytes,
}

/// Parses one request head at the front of `buf`; on success the head's bytes are
/// split off `buf` (which keeps whatever follows: body bytes, pipelined requests),
/// and the header values point into them.
pub fn parse_request(buf: &mut BytesMut) -> Parsed {
    let mut spans = Spans::default();
    let (head_len, method, path, body_len, close) = {
        let mut headers = no_headers();
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            // hyper takes up to MAX_HEADER_FIELDS; more it refuses as well.
            Err(httparse::Error::TooManyHeaders) if header_lines(buf) > MAX_HEADER_FIELDS => {
                return Parsed::Refused(ProxyError::TooManyHeaderFields {
                    limit: MAX_HEADER_FIELDS,
                });
            }
            Err(httparse::Error::TooManyHeaders) => return Parsed::Fallback,
            Err(e) => return malformed(why(e)),
        };
        if req.version != Some(1) {
            return Parsed::Fallback;
        }
        let Some(method) = req
            .method
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        else {
            return Parsed::Fallback;
        };
        if method == Method::CONNECT {
            return Parsed::Fallback;
        }
        // RFC 9112 §3.2: the origin form, the absolute form, or `*` for OPTIONS (the
        // authority form is CONNECT's). Anything else — `t/acme/x`, `host:80` — is a
        // JSON 400 here, not hyper's empty one (or, for `host:80`, a request for `/`).
        match req.path.map(str::as_bytes) {
            Some([b'/', ..]) => {}
            Some(b"*") if method == Method::OPTIONS => {}
            Some(p) if absolute_form(p) => {}
            _ => return malformed("invalid request target"),
        }
        let Some(path) = req.path.map(|p| span(buf, p.as_bytes())) else {
            return Parsed::Fallback;
        };
        let mut body_len: Option<u64> = None;
        let mut close = false;
        let mut hosts = 0;
        let mut te: Option<&[u8]> = None;
        let mut chunked = 0;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if is_name(name, b"content-length") {
                let Some(n) = parse_length(h.value) else {
                    return malformed("invalid content-length");
                };
                match body_len {
                    Some(b) if b != n => return malformed("conflicting content-lengths"),
                    // The same length twice is forwarded once.
                    Some(_) => continue,
                    None => body_len = Some(n),
                }
            } else if is_name(name, b"transfer-encoding") {
                te = Some(h.value);
                chunked += count_chunked(h.value);
            } else if is_name(name, b"upgrade") || is_name(name, b"expect") {
                return Parsed::Fallback;
            } else if is_name(name, b"connection") {
                close |= has_token(h.value, b"close");
            } else if is_name(name, b"host") {
                hosts += 1;
            }
            spans.push(buf, name, h.value);
        }
        if let Some(value) = te {
            // Bodies with a transfer coding are hyper's to read; but RFC 9112 §6.3: a
            // request whose last coding is not chunked has no length to read — 400 and
            // close (hyper's answer would be empty, and in no log).
            if let Some(why) = coding_problem(value, chunked) {
                return malformed(why);
            }
            return Parsed::Fallback;
        }
        // RFC 9112 §3.2 (as `proxy::host_problem` on hyper's path): one `Host`, and
        // none only beside an absolute-form target, which names the authority.
        if hosts > 1 {
            return malformed("more than one Host header");
        }
        if hosts == 0 && matches!(req.path.and_then(|p| p.bytes().next()), Some(b'/' | b'*')) {
            return malformed("no Host header");
        }
        (head_len, method, path, body_len.unwrap_or(0), close)
    };
    let head = buf.split_to(head_len).freeze();
    let mut map = super::spare::header_map(spans.len + crate::headers::ADDED_TO_REQUESTS);
    for (ns, nl, vs, vl) in spans.iter() {
        let name = &head[ns as usize..ns as usize + nl as usize];
        let Ok(name) = HeaderName::from_bytes(name) else {
            return fallback_after_split(buf, head);
        };
        let value = head.slice(vs as usize..(vs + vl) as usize);
        let Ok(value) = HeaderValue::from_maybe_shared(value) else {
            return fallback_after_split(buf, head);
        };
        map.append(name, value);
    }
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0 as usize..(path.0 + path.1) as usize))
    else {
        return fallback_after_split(buf, head);
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = map;
    Parsed::Request(Head {
        parts,
        body_len,
        close,
        raw: head,
    })
}

/// How the bytes after a request head checked by [`check_head`] are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadFraming {
    /// A body of this many bytes (0: none); the next head follows it.
    Length(u64),
    /// A chunked body; the next head follows its last chunk and trailers.
    Chunked,
    /// The rest of the connection is not HTTP/1.1 messages the gateway can follow
    /// (`CONNECT`, an upgrade).
    Opaque,
}

/// Checks the request head at the front of `buf` as the fast path's
/// [`parse_request`] does, without building anything: for a connection hyper
/// serves (TLS, or one the fast path handed over), so that what the fast path
/// answers with the gateway's JSON error is answered so there too, instead of with
/// hyper's empty 400 or 431. `Ok(None)`: not a whole head yet. `Ok(Some((len,
/// framing)))`: the head is `len` bytes and what follows is framed so.
pub fn check_head(buf: &[u8]) -> Result<Option<(usize, HeadFraming)>, ProxyError> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADER_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::TooManyHeaderFields {
                limit: MAX_HEADER_FIELDS,
            })
        }
        Err(e) => return Err(ProxyError::MalformedRequest { why: why(e) }),
    };
    let bad = |why| Err(ProxyError::MalformedRequest { why });
    let connect = req.method == Some("CONNECT");
    let target = req.path.map(str::as_bytes).unwrap_or_default();
    let origin = matches!(target, [b'/', ..]);
    match target {
        [b'/', ..] => {}
        b"*" if req.method == Some("OPTIONS") => {}
        _ if connect => {}
        p if absolute_form(p) => {
            if Uri::try_from(p).is_err() {
                return bad("invalid request target");
            }
        }
        _ => return bad("invalid request target"),
    }
    let (mut length, mut te, mut hosts, mut upgrade) = (None, None, 0, false);
    let mut chunked = 0;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if is_name(name, b"content-length") {
            let Some(n) = parse_length(h.value) else {
                return bad("invalid content-length");
            };
            if length.is_some_and(|l| l != n) {
                return bad("conflicting content-lengths");
            }
            length = Some(n);
        } else if is_name(name, b"transfer-encoding") {
            te = Some(h.value);
            chunked += count_chunked(h.value);
        } else if is_name(name, b"host") {
            hosts += 1;
        } else if is_name(name, b"upgrade") {
            upgrade = true;
        }
    }
    let framing = if let Some(value) = te {
        if req.version != Some(1) {
            return bad("a transfer-encoding in an HTTP/1.0 request");
        }
        if let Some(why) = coding_problem(value, chunked) {
            return bad(why);
        }
        HeadFraming::Chunked
    } else {
        HeadFraming::Length(length.unwrap_or(0))
    };
    if hosts > 1 {
        return bad("more than one Host header");
    }
    if hosts == 0 && req.version == Some(1) && (origin || target == b"*") {
        return bad("no Host header");
    }
    // After a tunnel or an upgrade the bytes are no longer requests (and after an
    // upgrade that was refused, the rest goes unchecked, to hyper as it comes).
    if connect || upgrade {
        return Ok(Some((len, HeadFraming::Opaque)));
    }
    Ok(Some((len, framing)))
}

/// How many times a `Transfer-Encoding` value lists `chunked`.
fn count_chunked(value: &[u8]) -> usize {
    value
        .split(|&b| b == b',')
        .filter(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .count()
}

/// What makes a request's transfer codings (the last `Transfer-Encoding` field,
/// `chunked` counted over all of them) leave its body without a length the gateway
/// and the upstream would both read alike: RFC 9112 §6.3, `chunked` not last (the
/// body runs to the close: 400); §6.1, `chunked` applied more than once (HAProxy's
/// 400 too — one reader would undo it once, another twice).
fn coding_problem(last_field: &[u8], chunked: usize) -> Option<&'static str> {
    let last = last_field.rsplit(|&b| b == b',').next().unwrap_or(b"");
    if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
        return Some("a transfer-encoding whose last coding is not chunked");
    }
    (chunked > 1).then_some("a transfer-encoding that applies chunked more than once")
}

/// The most header fields a request may have: the fast path parses up to `MAX_HEADERS`
/// and leaves longer heads to hyper, which is set to take this many (`server.rs`).
pub const MAX_HEADER_FIELDS: usize = 256;

/// Header lines in the head at the front of `buf` (after the request line, up to the
/// empty line or the end of what has arrived: then a lower bound).
fn header_lines(buf: &[u8]) -> usize {
    buf.split(|b| *b == b'\n')
        .skip(1)
        .take_while(|line| !line.is_empty() && *line != b"\r")
        .count()
}

/// `scheme://…`: a scheme (a letter, then letters, digits, `+`, `-`, `.`) and `://`.
fn absolute_form(target: &[u8]) -> bool {
    let Some(end) = target.windows(3).position(|w| w == b"://") else {
        return false;
    };
    let scheme = &target[..end];
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

fn malformed(why: &'static str) -> Parsed {
    Parsed::Refused(ProxyError::MalformedRequest { why })
}

/// What is wrong, for the error message.
fn why(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid character in the request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "invalid request head",
    }
}

fn fallback_after_split(buf: &mut BytesMut, head: Bytes) -> Parsed {
    unsplit(buf, &head);
    Parsed::Fallback
}

/// Puts a head that turned out not to be for the fast path back in front of `buf`,
/// so that hyper reads the request from its first byte.
pub fn unsplit(buf: &mut BytesMut, head: &[u8]) {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(buf);
    *buf = whole;
}

/// Room for the header lines of one head, left uninitialised: httparse fills in
/// what it parses, so the 4 KiB are not zeroed for every message.
fn no_headers<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

fn parse_response_head<'h, 'b>(
    resp: &mut httparse::Response<'h, 'b>,
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default().parse_response_with_uninit_headers(resp, buf, headers)
}

/// Where the header lines kept from a parsed head are in its buffer, as (name start,
/// name length, value start, value length), for making the `HeaderMap` once the head is
/// split off. Room on the stack for the usual number, zeroed per head (room for all
/// `MAX_HEADERS` was 2 KiB to zero per message), and a `Vec` for the rest.
#[derive(Default)]
struct Spans {
    stack: [(u32, u16, u32, u32); SPANS_ON_STACK],
    spilled: Vec<(u32, u16, u32, u32)>,
    len: usize,
}

const SPANS_ON_STACK: usize = 24;

impl Spans {
    fn push(&mut self, buf: &[u8], name: &[u8], value: &[u8]) {
        let (ns, nl) = span(buf, name);
        let (vs, vl) = span(buf, value);
        let s = (ns, nl as u16, vs, vl);
        match self.stack.get_mut(self.len) {
            Some(slot) => *slot = s,
            None => self.spilled.push(s),
        }
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u16, u32, u32)> + '_ {
        self.stack[..self.len.min(SPANS_ON_STACK)]
            .iter()
            .chain(&self.spilled)
            .copied()
    }
}

/// Where `part` (a sub-slice of `buf`) starts, and its length.
fn span(buf: &[u8], part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start as u32, part.len() as u32)
}

/// A `Content-Length` value: digits only, no sign, no list.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Writes the forwarded request head (origin form, HTTP/1.1): the map's headers, then
/// the gateway's `added` ones, announcing a chunked body when `chunked`.
pub fn write_request_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    added: &crate::headers::Added<'_>,
    chunked: bool,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let host = write_headers(out, &parts.headers);
    added.write(out, host);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes every header of the map as an HTTP/1.1 line; returns the first `Host`, met
/// on the way (the gateway's `x-forwarded-host` repeats it).
pub fn write_headers<'h>(out: &mut Vec<u8>, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
    let mut host = None;
    for (name, value) in headers {
        if host.is_none() && name == http::header::HOST {
            host = Some(value);
        }
        write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    host
}

pub fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// The upstream's response head, rewritten for the client.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the upstream's head (to be consumed from its buffer).
    pub head_len: usize,
    pub framing: Framing,
    /// The upstream connection may carry another exchange after this body.
    pub reusable: bool,
}

/// The gateway's own response headers, set on every response (replacing the
/// upstream's copies).
pub struct Extra<'a> {
    pub request_id: &'a HeaderValue,
    /// The tenant's `ratelimit-policy` line (`Tenant::policy_line`).
    pub policy: Option<&'a [u8]>,
    pub rate_limit: Option<&'a HeaderValue>,
    /// The client connection closes after this response.
    pub close: bool,
    /// `Shared::draining`: read when the head is written (one relaxed load), so that a
    /// response to a request that was in flight when draining began says
    /// `connection: close` too.
    pub draining: &'a AtomicBool,
}

impl Extra<'_> {
    /// Whether the head says `connection: close`; the connection must then close.
    pub fn closes(&self) -> bool {
        self.close || self.draining.load(Ordering::Relaxed)
    }
}

/// What the upstream's buffered bytes hold.
pub enum Response {
    Partial,
    /// A 1xx interim response of this many bytes, to skip.
    Interim(usize),
    Head(ResponseHead),
}

/// Why an upstream response head was refused.
#[derive(Debug)]
pub struct Malformed;

/// What the upstream's response head says about the message, before anything is
/// written: shared by the two ways a head is passed on (bytes for a fast-path client,
/// `http::response::Parts` for hyper).
struct Scan<'b> {
    status: u16,
    reason: Option<&'b str>,
    framing: Framing,
    reusable: bool,
    /// Codings other than chunked (`gzip, chunked`).
    codings: Vec<u8>,
    /// Header names the upstream listed in `Connection`: hop-by-hop too.
    listed: [&'b [u8]; 16],
    n_listed: usize,
    has_date: bool,
}

/// Reads the framing and connection headers of a parsed response head; `None` for a
/// 1xx interim response (to skip).
fn scan<'b>(
    resp: &httparse::Response<'_, 'b>,
    head_request: bool,
) -> Result<Option<Scan<'b>>, Malformed> {
    let status = resp.code.ok_or(Malformed)?;
    if !(100..=599).contains(&status) {
        // Three digits, but no status code (RFC 9110 §15: 100 to 599); httparse
        // takes any three.
        return Err(Malformed);
    }
    if (100..200).contains(&status) {
        // 101 is only ever an answer to an upgrade, which the fast path never sends.
        return if status == 101 {
            Err(Malformed)
        } else {
            Ok(None)
        };
    }
    let http10 = resp.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    // Kept for the client, which gets them in front of its own chunked.
    let mut codings: Vec<u8> = Vec::new();
    let mut keep_alive = !http10;
    let mut has_date = false;
    let mut listed: [&[u8]; 16] = [&[]; 16];
    let mut n_listed = 0;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if is_name(name, b"content-length") {
            let n = parse_length(h.value).ok_or(Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(Malformed);
            }
            length = Some(n);
        } else if is_name(name, b"transfer-encoding") {
            transfer_encoding = true;
            for t in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if !t.is_empty() && !t.eq_ignore_ascii_case(b"chunked") {
                    if !codings.is_empty() {
                        codings.extend_from_slice(b", ");
                    }
                    codings.extend_from_slice(t);
                }
            }
            // Only the last coding says how the message ends.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if is_name(name, b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"host") {
                    if n_listed == listed.len() {
                        return Err(Malformed);
                    }
                    listed[n_listed] = t;
                    n_listed += 1;
                }
            }
        } else if is_name(name, b"date") {
            has_date = true;
        }
    }
    let no_body = head_request || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if transfer_encoding {
        // A coding other than chunked last: the body runs to the end of the connection.
        Framing::Close
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let reusable =
        keep_alive && framing != Framing::Close && !(transfer_encoding && length.is_some());
    Ok(Some(Scan {
        status,
        reason: resp.reason,
        framing,
        reusable,
        codings,
        listed,
        n_listed,
        has_date,
    }))
}

impl Scan<'_> {
    /// Whether the header is passed on: not hop-by-hop, not named in `Connection`, and
    /// `Content-Length` once, whatever `Connection` names (it is the body's framing:
    /// without it the client would read the body to the connection's end, and every
    /// later response with it), but never beside a body that is re-framed, nor on a
    /// 204 (RFC 9110 §8.6).
    fn passes(&self, name: &[u8], wrote_length: &mut bool) -> bool {
        if is_name(name, b"content-length") {
            if *wrote_length
                || self.status == 204
                || matches!(self.framing, Framing::Chunked | Framing::Close)
            {
                return false;
            }
            *wrote_length = true;
            return true;
        }
        !is_hop_by_hop(name)
            && !self.listed[..self.n_listed]
                .iter()
                .any(|l| l.eq_ignore_ascii_case(name))
    }

    fn head(&self, head_len: usize) -> ResponseHead {
        ResponseHead {
            status: self.status,
            head_len,
            framing: self.framing,
            reusable: self.reusable,
        }
    }
}

/// Parses the upstream's response head at the front of `buf` and, when it is whole,
/// writes the client's head into `out`.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    extra: &Extra<'_>,
    out: &mut Vec<u8>,
) -> Result<Response, Malformed> {
    let mut headers = no_headers();
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match parse_response_head(&mut resp, buf, &mut headers) {
        // Checked here as well as while reading (`exchange::read_head`): a head that
        // arrived whole in one read may be longer than the limit.
        Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
        Ok(httparse::Status::Complete(_)) => return Err(Malformed),
        Ok(httparse::Status::Partial) => return Ok(Response::Partial),
        Err(_) => return Err(Malformed),
    };
    let Some(scan) = scan(&resp, head_request)? else {
        return Ok(Response::Interim(head_len));
    };
    let status = scan.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    match scan.reason.filter(|r| !r.is_empty()) {
        Some(r) => out.extend_from_slice(r.as_bytes()),
        None => out.extend_from_slice(
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
    let mut wrote_length = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if !scan.passes(name, &mut wrote_length)
            || is_name(name, b"x-request-id")
            || (extra.policy.is_some() && is_name(name, b"ratelimit-policy"))
            || (extra.rate_limit.is_some() && is_name(name, b"ratelimit"))
        {
            continue;
        }
        write_lower(out, name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if matches!(scan.framing, Framing::Chunked | Framing::Close) {
        out.extend_from_slice(b"transfer-encoding: ");
        if !scan.codings.is_empty() {
            out.extend_from_slice(&scan.codings);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"chunked\r\n");
    }
    write_extra(out, extra, scan.has_date);
    Ok(Response::Head(scan.head(head_len)))
}

/// What the upstream's buffered bytes hold, for a response passed to hyper.
pub enum Parted {
    Partial,
    /// A 1xx interim response of this many bytes, to skip.
    Interim(usize),
    /// The head, split off the buffer; header values point into its bytes.
    Head(http::response::Parts, ResponseHead),
}

/// Parses the upstream's response head at the front of `buf` into
/// `http::response::Parts` without copying header values, for a response hyper
/// writes (to an HTTP/2 or TLS client): hop-by-hop headers are left out, and so is
/// `Content-Length` beside a body that is re-framed. Transfer codings other than
/// chunked cannot be passed on this way (HTTP/2 has none); they are dropped, as
/// hyper's own client does. The gateway's headers are added by the caller.
pub fn parse_response_parts(buf: &mut BytesMut, head_request: bool) -> Result<Parted, Malformed> {
    let mut spans = Spans::default();
    let head = {
        let mut headers = no_headers();
        let mut resp = httparse::Response::new(&mut []);
        let head_len = match parse_response_head(&mut resp, buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
            Ok(httparse::Status::Complete(_)) => return Err(Malformed),
            Ok(httparse::Status::Partial) => return Ok(Parted::Partial),
            Err(_) => return Err(Malformed),
        };
        let Some(scan) = scan(&resp, head_request)? else {
            return Ok(Parted::Interim(head_len));
        };
        let mut wrote_length = false;
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if !scan.passes(name, &mut wrote_length) {
                continue;
            }
            spans.push(buf, name, h.value);
        }
        scan.head(head_len)
    };
    let status = http::StatusCode::from_u16(head.status).map_err(|_| Malformed)?;
    let bytes = buf.split_to(head.head_len).freeze();
    let mut map = HeaderMap::with_capacity(spans.len + crate::headers::ADDED_TO_RESPONSES);
    for (ns, nl, vs, vl) in spans.iter() {
        let name = HeaderName::from_bytes(&bytes[ns as usize..ns as usize + nl as usize])
            .map_err(|_| Malformed)?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..(vs + vl) as usize))
            .map_err(|_| Malformed)?;
        map.append(name, value);
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = map;
    Ok(Parted::Head(parts, head))
}

/// The gateway's headers and the end of the head.
pub fn write_extra(out: &mut Vec<u8>, extra: &Extra<'_>, has_date: bool) {
    if let Some(line) = extra.policy {
        out.extend_from_slice(line);
    }
    if let Some(r) = extra.rate_limit {
        write_header(out, b"ratelimit", r.as_bytes());
    }
    write_header(out, b"x-request-id", extra.request_id.as_bytes());
    if !has_date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    if extra.closes() {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn write_lower(out: &mut Vec<u8>, name: &[u8]) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
}

fn is_hop_by_hop(name: &[u8]) -> bool {
    // Most names have a length no hop-by-hop name has: one bit test instead of eight
    // comparisons.
    const LENGTHS: u64 = {
        let mut mask = 0u64;
        let mut i = 0;
        while i < crate::headers::HOP_BY_HOP.len() {
            mask |= 1 << crate::headers::HOP_BY_HOP[i].len();
            i += 1;
        }
        mask
    };
    name.len() < 64
        && LENGTHS & (1 << name.len()) != 0
        && crate::headers::HOP_BY_HOP
            .iter()
            .any(|h| is_name(name, h.as_bytes()))
}

/// Whether the header name `name` is `lower` (lower-case letters, digits and `-`) in
/// any case, for names httparse has parsed (token characters only). Setting bit 5
/// lower-cases a letter and leaves a digit or `-` as it is, and no token character
/// becomes a letter, digit or `-` it is not, so eight bytes are compared at a time
/// (`eq_ignore_ascii_case` maps byte by byte: ~8 instructions a byte, and the fast
/// path compares every response header name with several of these).
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    if name.len() != lower.len() {
        return false;
    }
    const CASE: u64 = 0x2020_2020_2020_2020;
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_ne_bytes(w)
    };
    let (mut n, mut l) = (name.chunks_exact(8), lower.chunks_exact(8));
    for (a, b) in (&mut n).zip(&mut l) {
        if word(a) | CASE != word(b) {
            return false;
        }
    }
    n.remainder()
        .iter()
        .zip(l.remainder())
        .all(|(a, b)| a | 0x20 == *b)
}

/// `std::fmt::Write` into a byte vector.
struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends one chunk of the client's chunked body.
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let _ = write!(Fmt(out), "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The current time as an HTTP date, formatted at most once a second per thread.
pub(crate) fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [b' '; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                c.1.copy_from_slice(s.as_bytes());
                c.0 = secs;
            }
        }
        out.extend_from_slice(&c.1);
    });
}

/// An error in a chunked body.
#[derive(Debug)]
pub struct BadChunk;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the size line (hex digits, then extensions, then CRLF).
    Size,
    Data,
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

/// Decodes a chunked body incrementally and re-encodes its data for the client
/// (extensions are dropped; the trailer section too, unless kept:
/// [`Chunked::keeping_trailers`]).
#[derive(Debug, Clone)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes left in the current chunk (`Data`) or digits seen (`Size`).
    size: u64,
    digits: u8,
    /// The size line is past its digits (extensions) .
    in_ext: bool,
    /// Length of the current line (size line or trailer line), for the limits.
    line: usize,
    /// The current trailer line is empty so far.
    blank: bool,
    /// Data is written re-chunked (for an HTTP/1.1 client) rather than as is.
    rechunk: bool,
    /// The trailer section's bytes, when kept (its field lines, and the blank line
    /// that ends them when there are any: an empty section allocates nothing);
    /// `None` when not kept, or when it grew past [`MAX_TRAILER_SECTION`] (and is
    /// dropped).
    trailer: Option<Vec<u8>>,
    /// Following a client's request body for hyper's server ([`Chunked::request`]).
    request: bool,
    /// The last byte of the trailer section was a CR.
    cr: bool,
}

const MAX_LINE: usize = 4096;
/// A trailer section longer than this is dropped: the limit of a response head.
const MAX_TRAILER_SECTION: usize = MAX_RESPONSE_HEAD;

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            in_ext: false,
            line: 0,
            blank: true,
            rechunk: true,
            trailer: None,
            request: false,
            cr: false,
        }
    }
}

impl Chunked {
    /// A decoder that writes the payload as is (for a body hyper frames).
    pub fn payload_only() -> Chunked {
        Chunked {
            rechunk: false,
            ..Chunked::default()
        }
    }

    /// Keeps the trailer section: re-encoded, it goes after the last chunk
    /// (`h1::trailer::write_last_chunk`); as is, it is taken by
    /// [`Chunked::take_trailers`].
    pub fn keeping_trailers(self) -> Chunked {
        Chunked {
            trailer: Some(Vec::new()),
            ..self
        }
    }

    /// Follows a client's chunked request body ahead of hyper's server, which decodes
    /// it (`h1::Checked`): where this and hyper could see the body end in different
    /// places, this one must fail rather than guess. hyper ends the trailer section
    /// only at CRLF CRLF and keeps a bare LF as a byte of a trailer line (then drops
    /// everything after an early empty line), so a bare LF there is an error here;
    /// and hyper's own limits bound the lines (its chunk extensions to 16 KiB), so
    /// none of the response decoder's is kept, which would stop here what hyper takes.
    pub fn request() -> Chunked {
        Chunked {
            rechunk: false,
            request: true,
            ..Chunked::default()
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The trailer section (field lines and the blank line that ends them), once the
    /// body is over, if it was kept and has any.
    pub fn take_trailers(&mut self) -> Option<Vec<u8>> {
        self.trailer
            .take()
            .filter(|t| self.state == ChunkState::Done && !t.is_empty())
    }

    /// Consumes bytes from `input`, appending the data to `out` (re-chunked unless
    /// [`Chunked::payload_only`]). Returns how many bytes were consumed (all of them
    /// unless the body ended earlier) and the number of payload bytes.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, u64), BadChunk> {
        let rechunk = self.rechunk;
        let decoded = self.run(input, |data, last| {
            if last {
                if rechunk {
                    out.extend_from_slice(LAST_CHUNK);
                }
            } else if rechunk {
                write_chunk(out, data);
            } else {
                out.extend_from_slice(data);
            }
        })?;
        if rechunk && self.trailer.as_ref().is_some_and(|t| !t.is_empty()) && self.is_done() {
            // The last chunk ends `out`: the kept trailer fields go before its blank line.
            out.truncate(out.len().saturating_sub(2));
            if let Some(section) = self.trailer.take() {
                super::trailer::write_fields(&section, out);
            }
            out.extend_from_slice(b"\r\n");
        }
        Ok(decoded)
    }

    /// Follows the framing only (a body hyper reads): how many bytes of `input`
    /// belong to the body (all of them unless it ended earlier).
    pub fn frame(&mut self, input: &[u8]) -> Result<usize, BadChunk> {
        self.run(input, |_, _| {}).map(|(n, _)| n)
    }

    /// The decoder: `data(bytes, false)` for each run of payload, `data(&[], true)`
    /// at the end of the body.
    #[inline(always)]
    fn run(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8], bool),
    ) -> Result<(usize, u64), BadChunk> {
        let mut i = 0;
        let mut payload = 0u64;
        while i < input.len() {
            match self.state {
                ChunkState::Size => {
                    let b = input[i];
                    i += 1;
                    self.line += 1;
                    if self.line > MAX_LINE && !self.request {
                        return Err(BadChunk);
                    }
                    match b {
                        b'\n' => {
                            if self.digits == 0 {
                                return Err(BadChunk);
                            }
                            self.line = 0;
                            self.in_ext = false;
                            self.digits = 0;
                            if self.size == 0 {
                                self.state = ChunkState::Trailer;
                                self.blank = true;
                            } else {
                                self.state = ChunkState::Data;
                            }
                        }
                        b'\r' => {}
                        _ if self.in_ext => {}
                        b';' | b' ' | b'\t' => self.in_ext = true,
                        _ => {
                            let d = (b as char).to_digit(16).ok_or(BadChunk)?;
                            // At most 15 digits after leading zeros (hyper takes any
                            // number of those).
                            if self.size >= 1 << 56 {
                                return Err(BadChunk);
                            }
                            self.size = self.size * 16 + u64::from(d);
                            self.digits = self.digits.saturating_add(1);
                        }
                    }
                }
                ChunkState::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    data(&input[i..i + n], false);
                    i += n;
                    payload += n as u64;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataEnd;
                        self.line = 0;
                    }
                }
                ChunkState::DataEnd => {
                    let b = input[i];
                    i += 1;
                    match (b, self.line) {
                        (b'\r', 0) => self.line = 1,
                        (b'\n', _) => {
                            self.state = ChunkState::Size;
                            self.line = 0;
                        }
                        _ => return Err(BadChunk),
                    }
                }
                ChunkState::Trailer => {
                    let b = input[i];
                    i += 1;
                    self.line += 1;
                    if self.line > MAX_LINE * 4 && !self.request {
                        return Err(BadChunk);
                    }
                    if self.request {
                        // CR and LF only together, as hyper reads them.
                        let cr = std::mem::replace(&mut self.cr, b == b'\r');
                        if cr != (b == b'\n') {
                            return Err(BadChunk);
                        }
                    }
                    if let Some(t) = &mut self.trailer {
                        // Not the blank line's bytes (added below, after fields).
                        if !self.blank || (b != b'\r' && b != b'\n') {
                            if t.len() < MAX_TRAILER_SECTION {
                                t.push(b);
                            } else {
                                self.trailer = None;
                            }
                        }
                    }
                    match b {
                        b'\n' if self.blank => {
                            if let Some(t) = self.trailer.as_mut().filter(|t| !t.is_empty()) {
                                t.extend_from_slice(b"\r\n");
                            }
                            self.state = ChunkState::Done;
                            data(&[], true);
                            return Ok((i, payload));
                        }
                        b'\n' => self.blank = true,
                        b'\r' => {}
                        _ => self.blank = false,
                    }
                }
                ChunkState::Done => return Ok((i, payload)),
            }
        }
        Ok((i, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NOT_DRAINING: AtomicBool = AtomicBool::new(false);

    fn extra(rid: &HeaderValue) -> Extra<'_> {
        Extra {
            request_id: rid,
            policy: None,
            rate_limit: None,
            close: false,
            draining: &NOT_DRAINING,
        }
    }

    /// `is_name` says what `eq_ignore_ascii_case` says for every name httparse
    /// accepts: each token character in each position of names of 1 to 20 bytes, and
    /// every case mix of the names the fast path looks for.
    #[test]
    fn header_names_compare_like_eq_ignore_ascii_case() {
        let token: Vec<u8> = (0u8..128)
            .filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            .collect();
        let mut targets: Vec<&[u8]> = crate::headers::HOP_BY_HOP
            .iter()
            .map(|h| h.as_bytes())
            .collect();
        targets.extend([
            &b"content-length"[..],
            b"expect",
            b"date",
            b"x-request-id",
            b"ratelimit-policy",
            b"ratelimit",
            b"a1-b2-c3-d4-e5-f6-g7",
        ]);
        for target in targets {
            // Each position replaced by each token character.
            for i in 0..target.len() {
                for &c in &token {
                    let mut name = target.to_vec();
                    name[i] = c;
                    assert_eq!(
                        is_name(&name, target),
                        name.eq_ignore_ascii_case(target),
                        "{:?} vs {:?}",
                        String::from_utf8_lossy(&name),
                        String::from_utf8_lossy(target)
                    );
                }
            }
            // Upper, lower and alternating case; one byte shorter and longer.
            let upper = target.to_ascii_uppercase();
            let mixed: Vec<u8> = target
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if i % 2 == 0 {
                        b.to_ascii_uppercase()
                    } else {
                        *b
                    }
                })
                .collect();
            assert!(is_name(&upper, target) && is_name(&mixed, target) && is_name(target, target));
            assert!(!is_name(&target[1..], target));
            assert!(!is_name(&[target, b"x"].concat(), target));
        }
        for name in crate::headers::HOP_BY_HOP {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
            assert!(
                is_hop_by_hop(name.to_ascii_uppercase().as_bytes()),
                "{name}"
            );
            // Same length, another name.
            assert!(!is_hop_by_hop(&vec![b'x'; name.len()]), "{name}");
        }
        for name in ["server", "date", "content-length", "content-type", "", "t"] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
        assert!(!is_hop_by_hop(&[b'a'; 100]));
    }

    #[test]
    fn request_head_is_parsed_without_copies_and_leaves_the_rest() {
        let mut buf = BytesMut::from(
            &b"POST /a?b=1 HTTP/1.1\r\nHost: t1.example.com\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabcGET"[..],
        );
        let Parsed::Request(h) = parse_request(&mut buf) else {
            panic!("not parsed")
        };
        assert_eq!(h.parts.method, Method::POST);
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.body_len, 3);
        assert!(!h.close);
        assert_eq!(h.parts.headers["host"], "t1.example.com");
        let all: Vec<_> = h.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(&buf[..], b"abcGET");
    }

    #[test]
    fn what_the_fast_path_leaves_to_hyper() {
        for raw in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            assert!(
                matches!(parse_request(&mut buf), Parsed::Fallback),
                "{raw:?}"
            );
            assert_eq!(&buf[..], raw, "the bytes stay for hyper");
        }
        // More headers than the fast path's 128 slots: hyper takes up to 256.
        let many: Vec<u8> = (0..129)
            .flat_map(|i| format!("x-{i}: v\r\n").into_bytes())
            .chain(*b"\r\n")
            .collect();
        let raw = [&b"GET / HTTP/1.1\r\n"[..], &many].concat();
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(parse_request(&mut buf), Parsed::Fallback));
        // More than the server takes at all: refused here, even before the head ends.
        let too_many: Vec<u8> = (0..=MAX_HEADER_FIELDS)
            .flat_map(|i| format!("x-{i}: v\r\n").into_bytes())
            .collect();
        let raw = [&b"GET / HTTP/1.1\r\n"[..], &too_many].concat();
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            parse_request(&mut buf),
            Parsed::Refused(ProxyError::TooManyHeaderFields {
                limit: MAX_HEADER_FIELDS
            })
        ));
        assert_eq!(header_lines(&raw), MAX_HEADER_FIELDS + 1);
        for (raw, why) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
                "conflicting content-lengths",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "invalid content-length",
            ),
            (b"garbage\r\n\r\n", "invalid character in the request line"),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                "more than one Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nX-Tenant-Id: a\r\n\r\n",
                "no Host header",
            ),
            (b"OPTIONS * HTTP/1.1\r\n\r\n", "no Host header"),
        ] {
            let mut buf = BytesMut::from(raw);
            match parse_request(&mut buf) {
                Parsed::Refused(ProxyError::MalformedRequest { why: w }) => {
                    assert_eq!(w, why, "{raw:?}")
                }
                _ => panic!("{raw:?} is not malformed"),
            }
        }
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a"[..]);
        assert!(matches!(parse_request(&mut buf), Parsed::Partial));
        let mut buf =
            BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n"[..]);
        let Parsed::Request(h) = parse_request(&mut buf) else {
            panic!()
        };
        assert!(h.close);
    }

    #[test]
    fn response_head_loses_hop_by_hop_and_gains_the_gateways_headers() {
        let rid = HeaderValue::from_static("rid1");
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Request-Id: theirs\r\nContent-Length: 5\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nSet-Cookie: a\r\nSet-Cookie: b\r\n\r\nhello";
        let mut out = Vec::new();
        let Ok(Response::Head(h)) = parse_response(raw, false, &extra(&rid), &mut out) else {
            panic!()
        };
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.reusable);
        assert_eq!(&raw[h.head_len..], b"hello");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\nset-cookie: a\r\nset-cookie: b\r\nx-request-id: rid1\r\n\r\n"
        );
    }

    #[test]
    fn response_framings() {
        let rid = HeaderValue::from_static("r");
        let cases: [(&[u8], bool, Framing, bool); 7] = [
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", false, Framing::Close, false),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                true,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 204 No Content\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                false,
                Framing::Length(1),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
                false,
                Framing::Length(1),
                false,
            ),
        ];
        for (raw, head, framing, reusable) in cases {
            let mut out = Vec::new();
            let Ok(Response::Head(h)) = parse_response(raw, head, &extra(&rid), &mut out) else {
                panic!("{raw:?}")
            };
            assert_eq!((h.framing, h.reusable), (framing, reusable), "{raw:?}");
        }
        let mut out = Vec::new();
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 100 Continue\r\n\r\n",
                false,
                &extra(&rid),
                &mut out
            ),
            Ok(Response::Interim(25))
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/1.1 999 High\r\n\r\n",
        ] {
            assert!(parse_response(bad, false, &extra(&rid), &mut out).is_err());
            let mut buf = BytesMut::from(bad);
            assert!(parse_response_parts(&mut buf, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let body = b"5;ext=1\r\nhello\r\n1\r\n,\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            let (a, pa) = c.decode(&body[..split], &mut out).unwrap();
            assert_eq!(a, split);
            let (b, pb) = c.decode(&body[split..], &mut out).unwrap();
            assert!(c.is_done());
            assert_eq!(&body[split + b..], b"NEXT", "split {split}");
            assert_eq!(pa + pb, 16);
            // Re-encoded: decode again and compare payloads.
            let mut again = Chunked::default();
            let mut payload = Vec::new();
            again.decode(&out, &mut payload).unwrap();
            assert!(again.is_done());
        }
        let mut c = Chunked::default();
        assert!(c.decode(b"zz\r\n", &mut Vec::new()).is_err());
        let mut c = Chunked::default();
        assert!(c.decode(b"1\r\nab\r\n", &mut Vec::new()).is_err());
    }

    /// A head with more headers than `parse_response_parts` keeps room for on the stack:
    /// every one that passes arrives, in order, with its value, and the bytes after the
    /// head stay in the buffer.
    #[test]
    fn response_parts_keep_every_header_of_a_long_head() {
        let mut head = b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\n".to_vec();
        for i in 0..40 {
            head.extend_from_slice(format!("X-H{i}: value {i}\r\n").as_bytes());
            if i == 30 {
                head.extend_from_slice(b"X-Hop: gone\r\nKeep-Alive: timeout=5\r\n");
            }
        }
        head.extend_from_slice(b"Content-Length: 4\r\n\r\nbody");
        let mut buf = BytesMut::from(&head[..]);
        let Ok(Parted::Head(parts, h)) = parse_response_parts(&mut buf, false) else {
            panic!("not parsed");
        };
        assert_eq!(h.framing, Framing::Length(4));
        assert_eq!(&buf[..], b"body");
        let got: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let mut want: Vec<(String, String)> = (0..40)
            .map(|i| (format!("x-h{i}"), format!("value {i}")))
            .collect();
        want.push(("content-length".into(), "4".into()));
        assert_eq!(got, want);
    }

    /// A request head with more header lines than `parse_request` keeps room for on the
    /// stack: every one is in the map, in order, and the body stays in the buffer.
    #[test]
    fn request_parts_keep_every_header_of_a_long_head() {
        let mut head = b"POST /x HTTP/1.1\r\nHost: a.example\r\n".to_vec();
        for i in 0..40 {
            head.extend_from_slice(format!("X-H{i}: value {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"Content-Length: 4\r\n\r\nbody");
        let mut buf = BytesMut::from(&head[..]);
        let Parsed::Request(h) = parse_request(&mut buf) else {
            panic!("not parsed");
        };
        assert_eq!(h.body_len, 4);
        assert_eq!(&buf[..], b"body");
        let got: Vec<(String, String)> = h
            .parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let mut want = vec![("host".to_string(), "a.example".to_string())];
        want.extend((0..40).map(|i| (format!("x-h{i}"), format!("value {i}"))));
        want.push(("content-length".into(), "4".into()));
        assert_eq!(got, want);
    }
}
