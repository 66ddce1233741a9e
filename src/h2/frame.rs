//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte frame header, the frame types and
//! flags the server uses, error codes, and writers for the frames it sends. Parsing of
//! payloads is done where each frame is handled (`conn.rs`).

pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEAD_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's default, the largest frame this server accepts (it does
/// not advertise a larger one) and sends until the peer allows more.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest flow-control window (2^31 − 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PUSH_PROMISE: u8 = 5;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 1;
pub const SETTINGS_ENABLE_PUSH: u16 = 2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 6;

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    NoError = 0,
    Protocol = 1,
    Internal = 2,
    FlowControl = 3,
    StreamClosed = 5,
    FrameSize = 6,
    RefusedStream = 7,
    Cancel = 8,
    Compression = 9,
    EnhanceYourCalm = 0xb,
}

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

pub fn write_head(dst: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    dst.extend_from_slice(&[l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]);
}

/// Rewrites the length of a frame whose header starts at `at`.
pub fn patch_len(dst: &mut [u8], at: usize, len: usize) {
    let l = (len as u32).to_be_bytes();
    dst[at..at + 3].copy_from_slice(&l[1..]);
}

pub fn write_settings(dst: &mut Vec<u8>, settings: &[(u16, u32)]) {
    write_head(dst, settings.len() * 6, SETTINGS, 0, 0);
    for (id, v) in settings {
        dst.extend_from_slice(&id.to_be_bytes());
        dst.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn write_settings_ack(dst: &mut Vec<u8>) {
    write_head(dst, 0, SETTINGS, ACK, 0);
}

pub fn write_window_update(dst: &mut Vec<u8>, stream: u32, increment: u32) {
    write_head(dst, 4, WINDOW_UPDATE, 0, stream);
    dst.extend_from_slice(&increment.to_be_bytes());
}

pub fn write_rst(dst: &mut Vec<u8>, stream: u32, reason: Reason) {
    write_head(dst, 4, RST_STREAM, 0, stream);
    dst.extend_from_slice(&(reason as u32).to_be_bytes());
}

pub fn write_goaway(dst: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    write_head(dst, 8, GOAWAY, 0, 0);
    dst.extend_from_slice(&last_stream.to_be_bytes());
    dst.extend_from_slice(&(reason as u32).to_be_bytes());
}

pub fn write_ping(dst: &mut Vec<u8>, ack: bool, opaque: &[u8; 8]) {
    write_head(dst, 8, PING, if ack { ACK } else { 0 }, 0);
    dst.extend_from_slice(opaque);
}

/// A DATA frame: header and payload.
pub fn write_data(dst: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool) {
    write_head(
        dst,
        data.len(),
        DATA,
        if end_stream { END_STREAM } else { 0 },
        stream,
    );
    dst.extend_from_slice(data);
}

/// The payload of a frame that may be padded (DATA, HEADERS), without the padding;
/// `None` when the pad length is longer than the payload (PROTOCOL_ERROR).
pub fn unpad(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|end| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip() {
        let mut b = Vec::new();
        write_head(
            &mut b,
            0x01_02_03,
            HEADERS,
            END_HEADERS | END_STREAM,
            0x7fff_fffe,
        );
        let h = Head::parse(&b);
        assert_eq!(
            (h.len, h.kind, h.flags, h.stream),
            (0x01_02_03, HEADERS, 5, 0x7fff_fffe)
        );
        // The reserved bit is ignored.
        b[5] |= 0x80;
        assert_eq!(Head::parse(&b).stream, 0x7fff_fffe);
        patch_len(&mut b, 0, 7);
        assert_eq!(Head::parse(&b).len, 7);
    }

    #[test]
    fn padding_is_removed_or_refused() {
        assert_eq!(unpad(0, b"abc"), Some(&b"abc"[..]));
        assert_eq!(unpad(PADDED, b"\x02abcxx"), Some(&b"abc"[..]));
        assert_eq!(unpad(PADDED, b"\x00"), Some(&b""[..]));
        assert_eq!(unpad(PADDED, b"\x03ab"), None);
        assert_eq!(unpad(PADDED, b""), None);
    }
}
