//! A raw HTTP/2 client for tests of the gateway's own HTTP/2 server: frames written
//! by hand, HPACK literals out (no Huffman coding), the library's HPACK decoder in.
//! Used by tests/h2_server.rs and tests/h2_conformance.rs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bulkhead::h2::hpack::Decoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every client read is bounded by this, so a hang fails the test instead of blocking it.
/// Every client read is bounded by this, so a hang fails the test instead of blocking it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const HOST: &str = "t1.example.com";
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types, flags, settings and error codes (RFC 9113 §6, §7).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
/// The PRIORITY frame type ([`PRIORITY`] is the HEADERS flag).
pub const PRIORITY_FRAME: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const HEADER_TABLE_SIZE: u16 = 0x1;
pub const ENABLE_PUSH: u16 = 0x2;
pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const MAX_FRAME_SIZE: u16 = 0x5;
pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const MAX_FRAME: usize = 16_384;

// ---------------------------------------------------------------------------------------
// HPACK out: literals without Huffman coding
// ---------------------------------------------------------------------------------------

/// An HPACK integer with an `n`-bit prefix; `first` holds the representation's flag bits.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

pub fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal without indexing whose name is the static table's entry `index`.
pub fn hpack_indexed_name(out: &mut Vec<u8>, index: usize, value: &[u8]) {
    hpack_int(out, 0, 4, index);
    hpack_string(out, value);
}

/// A literal without indexing with a literal name.
pub fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// A request head: `:method`, `:scheme http`, `:path`, `:authority` [`HOST`], then
/// `headers` in order.
pub fn request_block(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    request_block_at(method, path, HOST, headers)
}

/// [`request_block`] with another `:authority`.
pub fn request_block_at(
    method: &str,
    path: &str,
    authority: &str,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut b = Vec::new();
    match method {
        "GET" => b.push(0x82),
        "POST" => b.push(0x83),
        m => hpack_indexed_name(&mut b, 2, m.as_bytes()),
    }
    b.push(0x86);
    hpack_indexed_name(&mut b, 4, path.as_bytes());
    hpack_indexed_name(&mut b, 1, authority.as_bytes());
    for (n, v) in headers {
        hpack_literal(&mut b, n, v.as_bytes());
    }
    b
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/2 client
// ---------------------------------------------------------------------------------------

/// Writes an HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn window_update(stream: u32, inc: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &inc.to_be_bytes())
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in params {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

/// A frame as received.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// One frame in the log of everything received: (type, flags, stream, length).
pub type Logged = (u8, u8, u32, usize);

/// What the client saw of one stream.
#[derive(Debug, Clone, Default)]
pub struct Resp {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// END_STREAM received.
    pub end: bool,
    /// RST_STREAM received, with its code.
    pub reset: Option<u32>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn done(&self) -> bool {
        self.end || self.reset.is_some()
    }
}

pub struct H2 {
    pub s: TcpStream,
    pub rbuf: Vec<u8>,
    pub decoder: Decoder,
    pub streams: HashMap<u32, Resp>,
    /// GOAWAY received: (last stream id, error code).
    pub goaway: Option<(u32, u32)>,
    pub eof: bool,
    pub log: Vec<Logged>,
    /// Every DATA frame is given back at once (connection and stream WINDOW_UPDATE).
    pub auto_window: bool,
    /// A header block waiting for its CONTINUATIONs: (stream, HEADERS flags, fragment).
    pub block: Option<(u32, u8, Vec<u8>)>,
    /// The server's SETTINGS frames (not the ACKs), in order.
    pub server_settings: Vec<Vec<(u16, u32)>>,
    pub settings_acks: usize,
    pub ping_acks: Vec<Vec<u8>>,
    /// What the server lets this client send: the connection window, the initial
    /// stream window and each stream's window.
    pub send_conn: i64,
    pub send_initial: i64,
    pub send_streams: HashMap<u32, i64>,
}

impl H2 {
    /// Connects and sends the preface with a SETTINGS frame of `params`.
    pub async fn start(addr: SocketAddr, params: &[(u16, u32)]) -> H2 {
        let mut c = H2::connect(addr).await;
        let mut hello = PREFACE.to_vec();
        hello.extend_from_slice(&settings(params));
        c.send(&hello).await;
        c
    }

    /// Connects and sends the preface with an empty SETTINGS frame.
    pub async fn open(addr: SocketAddr) -> H2 {
        H2::start(addr, &[]).await
    }

    /// Connects, sending nothing yet.
    pub async fn connect(addr: SocketAddr) -> H2 {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        H2 {
            s,
            rbuf: Vec::new(),
            decoder: Decoder::new(4096),
            streams: HashMap::new(),
            goaway: None,
            eof: false,
            log: Vec::new(),
            auto_window: true,
            block: None,
            server_settings: Vec::new(),
            settings_acks: 0,
            ping_acks: Vec::new(),
            send_conn: 65_535,
            send_initial: 65_535,
            send_streams: HashMap::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("write to the gateway: {e}; received: {:?}", self.tail()));
    }

    /// Writes, ignoring a connection the server has already closed.
    pub async fn try_send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }

    /// The last frames received, for failure messages.
    pub fn tail(&self) -> &[Logged] {
        &self.log[self.log.len().saturating_sub(20)..]
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.rbuf.len() >= 9 {
                let b = &self.rbuf;
                let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
                if self.rbuf.len() >= 9 + len {
                    let f = Frame {
                        kind: b[3],
                        flags: b[4],
                        stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
                        payload: b[9..9 + len].to_vec(),
                    };
                    self.rbuf.drain(..9 + len);
                    self.log.push((f.kind, f.flags, f.stream, len));
                    return Some(f);
                }
            }
            if self.eof {
                return None;
            }
            let mut buf = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout(READ_TIMEOUT, self.s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                // A reset after the server's last bytes: the same as a close here.
                Ok(Err(_)) => 0,
                Err(_) => panic!(
                    "no frame from the gateway within {READ_TIMEOUT:?}; last frames \
                     (type, flags, stream, length): {:?}",
                    self.tail()
                ),
            };
            if n == 0 {
                self.eof = true;
                assert!(
                    self.rbuf.is_empty(),
                    "the connection closed inside a frame: {:?}",
                    self.rbuf
                );
                return None;
            }
            self.rbuf.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads and handles one frame (acknowledging SETTINGS and PING, keeping the
    /// windows, decoding header blocks); `None` once the connection is closed.
    pub async fn pump(&mut self) -> Option<Logged> {
        let f = self.read_frame().await?;
        let logged = (f.kind, f.flags, f.stream, f.payload.len());
        match f.kind {
            DATA => {
                let data = unpad(f.flags, &f.payload);
                let r = self.streams.entry(f.stream).or_default();
                r.body.extend_from_slice(data);
                let end = f.flags & END_STREAM != 0;
                r.end |= end;
                let n = u32::try_from(f.payload.len()).unwrap();
                if self.auto_window && n > 0 {
                    let mut wu = window_update(0, n);
                    if !end {
                        wu.extend_from_slice(&window_update(f.stream, n));
                    }
                    self.try_send(&wu).await;
                }
            }
            HEADERS => {
                assert!(self.block.is_none(), "HEADERS inside a header block");
                let mut data = unpad(f.flags, &f.payload);
                if f.flags & PRIORITY != 0 {
                    data = &data[5..];
                }
                if f.flags & END_HEADERS != 0 {
                    self.on_block(f.stream, f.flags, data);
                } else {
                    self.block = Some((f.stream, f.flags, data.to_vec()));
                }
            }
            CONTINUATION => {
                let (stream, flags, mut block) =
                    self.block.take().expect("CONTINUATION after HEADERS");
                assert_eq!(stream, f.stream, "CONTINUATION on another stream");
                block.extend_from_slice(&f.payload);
                if f.flags & END_HEADERS != 0 {
                    self.on_block(stream, flags, &block);
                } else {
                    self.block = Some((stream, flags, block));
                }
            }
            RST_STREAM => {
                let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                self.streams.entry(f.stream).or_default().reset = Some(code);
            }
            SETTINGS if f.flags & ACK != 0 => self.settings_acks += 1,
            SETTINGS => {
                let params = settings_params(&f.payload);
                for &(id, v) in &params {
                    if id == INITIAL_WINDOW_SIZE {
                        let delta = i64::from(v) - self.send_initial;
                        self.send_initial = i64::from(v);
                        for w in self.send_streams.values_mut() {
                            *w += delta;
                        }
                    }
                }
                self.server_settings.push(params);
                self.try_send(&frame(SETTINGS, ACK, 0, &[])).await;
            }
            PING if f.flags & ACK != 0 => self.ping_acks.push(f.payload),
            PING => self.try_send(&frame(PING, ACK, 0, &f.payload)).await,
            GOAWAY => {
                let p = &f.payload;
                self.goaway = Some((
                    u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
                    u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                ));
            }
            WINDOW_UPDATE => {
                let inc = i64::from(u32::from_be_bytes(f.payload[..4].try_into().unwrap()));
                if f.stream == 0 {
                    self.send_conn += inc;
                } else if let Some(w) = self.send_streams.get_mut(&f.stream) {
                    *w += inc;
                }
            }
            _ => {}
        }
        Some(logged)
    }

    pub fn on_block(&mut self, stream: u32, flags: u8, block: &[u8]) {
        let mut fields = Vec::new();
        self.decoder
            .decode(block, |n, v| {
                fields.push((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ))
            })
            .expect("the gateway's header block decodes");
        let r = self.streams.entry(stream).or_default();
        if r.status.is_none() {
            let status = fields
                .iter()
                .find(|(n, _)| n == ":status")
                .unwrap_or_else(|| panic!("a response head with :status: {fields:?}"));
            r.status = Some(status.1.parse().unwrap());
            r.headers = fields;
        } else {
            r.trailers = fields;
        }
        r.end |= flags & END_STREAM != 0;
    }

    /// Pumps frames until `cond` holds; panics if the connection closes first.
    pub async fn until(&mut self, what: &str, cond: impl Fn(&H2) -> bool) {
        while !cond(self) {
            if self.pump().await.is_none() {
                panic!(
                    "the connection closed before {what}; goaway {:?}, last frames: {:?}",
                    self.goaway,
                    self.tail()
                );
            }
        }
    }

    /// Waits for stream `id` to end (END_STREAM or RST_STREAM).
    pub async fn response(&mut self, id: u32) -> Resp {
        self.until(&format!("stream {id} ended"), |c| {
            c.streams.get(&id).is_some_and(Resp::done)
        })
        .await;
        self.streams[&id].clone()
    }

    /// Waits for stream `id`'s complete response, which must not be a reset.
    pub async fn ok_response(&mut self, id: u32) -> Resp {
        let r = self.response(id).await;
        assert_eq!(r.reset, None, "stream {id} was reset: {r:?}");
        r
    }

    /// Sends a request head in one HEADERS frame.
    pub async fn headers(&mut self, id: u32, block: &[u8], end_stream: bool) {
        self.send_streams.insert(id, self.send_initial);
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.send(&frame(HEADERS, flags, id, block)).await;
    }

    /// A GET on stream `id`; returns its response.
    pub async fn get(&mut self, id: u32, path: &str) -> Resp {
        self.headers(id, &request_block("GET", path, &[]), true)
            .await;
        self.response(id).await
    }

    /// Sends `data` on stream `id` in DATA frames of at most 16,384 bytes, within the
    /// windows the server gives (reading its frames while they are shut).
    pub async fn send_body(&mut self, id: u32, data: &[u8], end_stream: bool) {
        let mut rest = data;
        loop {
            let stream_w = self.send_streams[&id];
            let n = (rest.len() as i64)
                .min(MAX_FRAME as i64)
                .min(self.send_conn)
                .min(stream_w);
            if n <= 0 && !rest.is_empty() {
                let (conn, sw) = (self.send_conn, stream_w);
                let what = format!(
                    "a WINDOW_UPDATE (connection window {conn}, stream {id} window {sw}, \
                     {} of {} bytes sent)",
                    data.len() - rest.len(),
                    data.len()
                );
                if self.streams.get(&id).is_some_and(Resp::done) {
                    panic!(
                        "stream {id} ended while its body was sent: {:?}",
                        self.streams[&id]
                    );
                }
                self.until(&what, |c| {
                    c.send_conn > conn
                        || c.send_streams[&id] > sw
                        || c.streams.get(&id).is_some_and(Resp::done)
                })
                .await;
                continue;
            }
            let (chunk, tail) = rest.split_at(n as usize);
            rest = tail;
            self.send_conn -= n;
            *self.send_streams.get_mut(&id).unwrap() -= n;
            let last = rest.is_empty();
            let flags = if last && end_stream { END_STREAM } else { 0 };
            self.send(&frame(DATA, flags, id, chunk)).await;
            if last {
                return;
            }
        }
    }

    /// Sends `data` on stream `id` in DATA frames of at most 16,384 bytes within the
    /// connection window only, whatever became of the stream (answered, reset): what a
    /// client whose frames were already on their way does. It keeps to the stream
    /// window by sending no more than the initial one (the rest of `data` is left out).
    pub async fn send_regardless(&mut self, id: u32, data: &[u8]) {
        let data = &data[..data.len().min(usize::try_from(self.send_initial).unwrap())];
        let mut rest = data;
        while !rest.is_empty() {
            let n = (rest.len() as i64)
                .min(MAX_FRAME as i64)
                .min(self.send_conn);
            if n <= 0 {
                let conn = self.send_conn;
                let what = format!(
                    "a connection WINDOW_UPDATE ({} of {} bytes sent on stream {id})",
                    data.len() - rest.len(),
                    data.len()
                );
                self.until(&what, |c| c.send_conn > conn).await;
                continue;
            }
            let (chunk, tail) = rest.split_at(n as usize);
            rest = tail;
            self.send_conn -= n;
            self.send(&frame(DATA, 0, id, chunk)).await;
        }
    }

    /// Sends a PING and waits for its acknowledgement: everything the server wrote
    /// before handling the PING has been read by then.
    pub async fn ping(&mut self, opaque: &[u8; 8]) {
        self.send(&frame(PING, 0, 0, opaque)).await;
        self.until("the PING ACK", |c| c.ping_acks.iter().any(|p| p == opaque))
            .await;
    }

    /// Waits for a GOAWAY and then for the server to close the connection; returns
    /// (last stream id, error code).
    pub async fn goaway_then_close(&mut self) -> (u32, u32) {
        while self.goaway.is_none() {
            if self.pump().await.is_none() {
                panic!(
                    "the connection closed without a GOAWAY; last frames: {:?}",
                    self.tail()
                );
            }
        }
        while self.pump().await.is_some() {}
        self.goaway.unwrap()
    }
}

pub fn unpad(flags: u8, payload: &[u8]) -> &[u8] {
    if flags & PADDED == 0 {
        return payload;
    }
    let pad = usize::from(payload[0]);
    &payload[1..payload.len() - pad]
}

/// A SETTINGS frame's payload as (identifier, value) pairs, in order.
pub fn settings_params(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect()
}
