//! A request head as HPACK decodes it: pseudo-headers and fields checked against
//! RFC 9113 §8 as they arrive, then the request's URI.

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};

/// The fields of a request head, as decoded.
#[derive(Default)]
pub(super) struct Decoded {
    pub(super) method: Option<Method>,
    pub(super) scheme: Option<Bytes>,
    pub(super) authority: Option<Bytes>,
    pub(super) path: Option<Bytes>,
    pub(super) headers: HeaderMap,
    /// Any pseudo-header at all (trailers must have none).
    pub(super) pseudo: bool,
    pub(super) regular_seen: bool,
    pub(super) malformed: bool,
    pub(super) size: usize,
    pub(super) limit: usize,
}

impl Decoded {
    pub(super) fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.malformed || self.size > self.limit {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            self.pseudo = true;
            let slot = match pseudo {
                b"method" => {
                    if self.method.is_some() {
                        self.malformed = true;
                    }
                    match Method::from_bytes(value) {
                        Ok(m) => self.method = Some(m),
                        Err(_) => self.malformed = true,
                    }
                    return;
                }
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                _ => {
                    self.malformed = true;
                    return;
                }
            };
            if self.regular_seen || slot.is_some() {
                self.malformed = true;
                return;
            }
            *slot = Some(Bytes::copy_from_slice(value));
            return;
        }
        self.regular_seen = true;
        // RFC 9113 §8.2.1: no uppercase in names, no whitespace around values.
        let padded = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        if name.iter().any(u8::is_ascii_uppercase) || padded(value.first()) || padded(value.last())
        {
            self.malformed = true;
            return;
        }
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            self.malformed = true;
            return;
        };
        if connection_specific(&name) || (name == header::TE && value != "trailers") {
            self.malformed = true;
            return;
        }
        if name == header::CONTENT_LENGTH {
            // One length: a repeat of the same is dropped (RFC 9110 §8.6), another is
            // malformed — the upstream, which gets the map, might frame by either.
            if let Some(old) = self.headers.get(header::CONTENT_LENGTH) {
                if *old != value {
                    self.malformed = true;
                }
                return;
            }
        }
        if name == header::COOKIE {
            // RFC 9113 §8.2.3: split cookies are joined for an HTTP/1.1 upstream.
            if let Some(old) = self.headers.get_mut(header::COOKIE) {
                let mut joined = Vec::with_capacity(old.len() + 2 + value.len());
                joined.extend_from_slice(old.as_bytes());
                joined.extend_from_slice(b"; ");
                joined.extend_from_slice(value.as_bytes());
                match HeaderValue::from_bytes(&joined) {
                    Ok(v) => *old = v,
                    Err(_) => self.malformed = true,
                }
                return;
            }
        }
        self.headers.append(name, value);
    }

    /// The request's URI; `None` when the head is malformed.
    pub(super) fn uri(&mut self) -> Option<Uri> {
        let method = self.method.as_ref()?;
        let mut parts = http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            parts.authority = Some(Authority::from_maybe_shared(self.authority.take()?).ok()?);
            return Uri::from_parts(parts).ok();
        }
        let (scheme, path) = (self.scheme.take()?, self.path.take()?);
        // RFC 9113 §8.3.1: the target URI's scheme, checked with or without
        // `:authority` (an upstream never sees it, but a request that names none is
        // malformed).
        if !matches!(&scheme[..], b"http" | b"https") && !is_scheme(&scheme) {
            return None;
        }
        // RFC 9113 §8.3.1: a path in origin form, or `*` for OPTIONS only.
        match path.first() {
            Some(b'/') => {}
            Some(b'*') if path.len() == 1 && method == Method::OPTIONS => {}
            _ => return None,
        }
        if let Some(a) = self.authority.take() {
            // RFC 9113 §8.3.1: a `host` that names another entity than `:authority`
            // (another host, or port) is malformed; the upstream, which gets the
            // `host`, would otherwise see another authority than the tenant was
            // resolved by.
            if self
                .headers
                .get(header::HOST)
                .is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(&a))
            {
                return None;
            }
            parts.scheme = Some(match &scheme[..] {
                b"http" => Scheme::HTTP,
                b"https" => Scheme::HTTPS,
                other => Scheme::try_from(other).ok()?,
            });
            parts.authority = Some(Authority::from_maybe_shared(a).ok()?);
        }
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(path).ok()?);
        Uri::from_parts(parts).ok()
    }
}

/// RFC 3986 §3.1: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &[u8]) -> bool {
    s.first().is_some_and(u8::is_ascii_alphabetic)
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

pub(super) fn connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(fields: &[(&str, &str)]) -> Decoded {
        let mut d = Decoded {
            limit: 16 * 1024,
            ..Decoded::default()
        };
        for (n, v) in fields {
            d.field(n.as_bytes(), v.as_bytes());
        }
        d
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "t1.example.com"),
        (":path", "/a?b"),
    ];

    #[test]
    fn a_request_head_becomes_method_uri_and_headers() {
        let mut fields = GET.to_vec();
        fields.extend([("cookie", "a=1"), ("user-agent", "x"), ("cookie", "b=2")]);
        let mut d = decode(&fields);
        assert!(!d.malformed);
        assert_eq!(d.uri().unwrap().to_string(), "http://t1.example.com/a?b");
        assert_eq!(d.method, Some(Method::GET));
        assert_eq!(d.headers["cookie"], "a=1; b=2");
        assert_eq!(d.headers["user-agent"], "x");
        // Without :authority the URI is the path alone (Host names the tenant).
        let mut d = decode(
            &GET[..2]
                .iter()
                .chain(&GET[3..])
                .copied()
                .collect::<Vec<_>>(),
        );
        assert_eq!(d.uri().unwrap().to_string(), "/a?b");
        let mut d = decode(&[(":method", "CONNECT"), (":authority", "a.example:443")]);
        assert_eq!(d.uri().unwrap().to_string(), "a.example:443");
        // `host` beside `:authority`: the same (up to case) or malformed.
        for (host, ok) in [
            ("t1.example.com", true),
            ("T1.Example.COM", true),
            ("t1.example.com:81", false),
            ("other.example.com", false),
        ] {
            let mut fields = GET.to_vec();
            fields.push(("host", host));
            assert_eq!(decode(&fields).uri().is_some(), ok, "{host}");
        }
    }

    #[test]
    fn malformed_request_heads_are_recognised() {
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":method", "GET"),
            ],
            vec![
                (":method", "GET"),
                ("x", "1"),
                (":scheme", "http"),
                (":path", "/"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":status", "200"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("X-Up", "1"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("connection", "close"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("te", "gzip"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x", "a\nb"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("bad name", "1"),
            ],
            // Whitespace around a value (§8.2.1).
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x", " a"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x", "a\t"),
            ],
            // Two different lengths: the upstream could frame by either.
            vec![
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/"),
                ("content-length", "39"),
                ("content-length", "0"),
            ],
        ];
        for fields in cases {
            assert!(decode(&fields).malformed, "{fields:?}");
        }
        // Missing or empty pseudo-headers give no URI.
        for fields in [
            vec![(":method", "GET"), (":scheme", "http")],
            vec![(":method", "GET"), (":scheme", "http"), (":path", "")],
            // Not origin form; `*` is for OPTIONS only (§8.3.1).
            vec![(":method", "GET"), (":scheme", "http"), (":path", "?x")],
            vec![(":method", "GET"), (":scheme", "http"), (":path", "*")],
            // Not a URI scheme (RFC 3986 §3.1).
            vec![(":method", "GET"), (":scheme", ""), (":path", "/")],
            vec![(":method", "GET"), (":scheme", "a b"), (":path", "/")],
            vec![(":method", "GET"), (":scheme", "1a"), (":path", "/")],
            vec![(":method", "OPTIONS"), (":scheme", "http"), (":path", "*x")],
            vec![(":scheme", "http"), (":path", "/")],
            vec![
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":path", "/"),
            ],
        ] {
            assert!(decode(&fields).uri().is_none(), "{fields:?}");
        }
        let ok = decode(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            ("te", "trailers"),
        ]);
        assert!(!ok.malformed);
        // The same length twice is forwarded once; `OPTIONS *` has a URI.
        let mut twice = decode(&[
            (":method", "OPTIONS"),
            (":scheme", "http"),
            (":path", "*"),
            ("content-length", "3"),
            ("content-length", "3"),
        ]);
        assert!(!twice.malformed);
        assert_eq!(twice.headers.get_all("content-length").iter().count(), 1);
        assert!(twice.uri().is_some());
    }

    #[test]
    fn the_header_list_size_counts_every_field() {
        let mut d = Decoded {
            limit: 100,
            ..Decoded::default()
        };
        d.field(b"x-a", &[b'a'; 40]);
        assert_eq!(d.size, 3 + 40 + 32);
        d.field(b"x-b", &[b'b'; 40]);
        assert!(d.size > d.limit);
        assert!(d.headers.get("x-b").is_none());
    }
}
