//! An HTTP/1.1 upstream's response trailer section (what follows its last chunk),
//! passed on: as fields for a client hyper or the HTTP/2 server writes to
//! ([`fields`]), re-encoded for one the fast path writes to ([`write_fields`]). Only
//! fields `headers::response_trailer_passes` allows go on; a section that does not
//! parse, or has more fields than a response head may, is dropped whole (the body it
//! ends is complete all the same).

use http::{HeaderMap, HeaderName, HeaderValue};

use super::wire::MAX_RESPONSE_FIELDS;

/// Calls `field` with each field of `section` (field lines and the blank line that
/// ends them) that may go on; false when the section is dropped.
fn each_field(section: &[u8], mut field: impl FnMut(HeaderName, &[u8])) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_FIELDS];
    let Ok(httparse::Status::Complete((_, parsed))) =
        httparse::parse_headers(section, &mut headers)
    else {
        return false;
    };
    for h in parsed {
        if let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) {
            if crate::headers::response_trailer_passes(&name) {
                field(name, h.value);
            }
        }
    }
    true
}

/// The fields of `section` that go on; `None` when there are none.
pub fn fields(section: &[u8]) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    each_field(section, |name, value| {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            map.append(name, v);
        }
    });
    (!map.is_empty()).then_some(map)
}

/// Appends the field lines of `section` that go on to `out` (names lower-cased),
/// after a last chunk's `0\r\n`; the caller ends them with the blank line.
pub fn write_fields(section: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    if !each_field(section, |name, value| {
        super::wire::write_header(out, name.as_str().as_bytes(), value)
    }) {
        out.truncate(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_fields_pass_unless_hop_by_hop_or_read_from_the_head() {
        let section = b"x-checksum: abc\r\nGrpc-Status: 0\r\ncontent-length: 9\r\n\
                        connection: close\r\nset-cookie: a=b\r\nx-checksum: def\r\n\r\n";
        let mut out = Vec::new();
        write_fields(section, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-checksum: abc\r\ngrpc-status: 0\r\nx-checksum: def\r\n"
        );
        let map = fields(section).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map["grpc-status"], "0");
        assert_eq!(fields(b"\r\n"), None);
        assert_eq!(fields(b"content-type: x\r\n\r\n"), None);
    }

    #[test]
    fn a_section_that_does_not_parse_is_dropped_whole() {
        let mut out = b"0\r\n".to_vec();
        write_fields(b"x-ok: 1\r\nbad line\r\n\r\n", &mut out);
        assert_eq!(out, b"0\r\n");
        assert_eq!(fields(b"x-ok: 1\r\nbad line\r\n\r\n"), None);
        let many = "x-a: 1\r\n".repeat(MAX_RESPONSE_FIELDS + 1) + "\r\n";
        assert_eq!(fields(many.as_bytes()), None);
    }

    #[test]
    fn a_kept_trailer_section_survives_any_split_of_the_body() {
        use super::super::wire::Chunked;
        let body = b"3\r\nabc\r\n0\r\nx-a: 1\r\nconnection: x\r\n\r\n";
        for at in 0..=body.len() {
            let mut c = Chunked::default().keeping_trailers();
            let mut out = Vec::new();
            c.decode(&body[..at], &mut out).unwrap();
            c.decode(&body[at..], &mut out).unwrap();
            assert!(c.is_done());
            // Re-chunked as it came; the filtered section after the last chunk.
            assert!(out.ends_with(b"\r\n0\r\nx-a: 1\r\n\r\n"), "split at {at}");
            assert!(
                !out.ends_with(b"\r\n0\r\nx-a: 1\r\n\r\n\r\n"),
                "split at {at}"
            );
            let mut c = Chunked::payload_only().keeping_trailers();
            let mut out = Vec::new();
            c.decode(&body[..at], &mut out).unwrap();
            c.decode(&body[at..], &mut out).unwrap();
            assert_eq!(out, b"abc");
            let section = c.take_trailers().unwrap();
            assert_eq!(section, b"x-a: 1\r\nconnection: x\r\n\r\n", "split at {at}");
        }
        // No fields: the plain last chunk, and nothing kept.
        let mut c = Chunked::default().keeping_trailers();
        let mut out = Vec::new();
        c.decode(b"1\r\na\r\n0\r\n\r\n", &mut out).unwrap();
        assert_eq!(out, b"1\r\na\r\n0\r\n\r\n");
        assert_eq!(c.take_trailers(), None);
    }
}
