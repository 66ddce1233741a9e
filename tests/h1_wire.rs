//! HTTP/1.1 on the wire, byte for byte: requests written by hand on plain TCP, upstreams
//! that answer with exactly the bytes each test chooses, and responses parsed by hand.
//! These pin what the plain-TCP HTTP/1.1 path does today (framing, keep-alive,
//! pipelining, header rewriting, malformed input, upstream failures), so that a rewrite
//! of that path can be checked against them.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{h2c, pattern, serve_tcp, Gateway, Process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every client read is bounded by this, so a hang fails the test instead of blocking it.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const HOST: &str = "t1.example.com";

// ---------------------------------------------------------------------------------------
// Bytes on a socket
// ---------------------------------------------------------------------------------------

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Header fields in wire order: (lowercase name, value).
#[derive(Clone, Debug, Default)]
struct Fields(Vec<(String, String)>);

impl Fields {
    /// Every value of `name`, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of `name`; panics when it appears more than once.
    fn get(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(
            all.len() <= 1,
            "{name} appears {} times: {self:?}",
            all.len()
        );
        all.first().copied()
    }

    /// The one value of `name`; panics unless it appears exactly once.
    fn one(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// Every field, sorted by name then value: for comparing sets of fields.
    fn sorted(&self) -> Vec<(String, String)> {
        let mut v = self.0.clone();
        v.sort();
        v
    }

    /// The names present, sorted (a name sent twice appears twice).
    fn sorted_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names
    }
}

/// `pairs` as [`Fields::sorted`] returns them.
fn sorted_pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

fn parse_field(line: &[u8]) -> (String, String) {
    let line = String::from_utf8_lossy(line);
    let (name, value) = line
        .split_once(':')
        .unwrap_or_else(|| panic!("not a header line: {line:?}"));
    (name.to_ascii_lowercase(), value.trim().to_owned())
}

/// A head (through its blank line) as its start line and fields.
fn parse_head(head: &[u8]) -> (String, Fields) {
    let text = &head[..head.len() - 4];
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    (start, Fields(lines.map(parse_field).collect()))
}

/// A chunked body as read off the wire.
#[derive(Default)]
struct Chunked {
    body: Vec<u8>,
    trailers: Fields,
    /// The terminating chunk and the trailer section arrived.
    complete: bool,
}

/// A socket with a read buffer: heads, lines and bodies are taken from the front.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more into the buffer; false once the stream has ended (or was reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next head through its blank line; `None` when the stream ends first (a
    /// partial head stays in `buf`).
    async fn read_head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                return Some(self.buf.drain(..end + 4).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next line, without its CRLF.
    async fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..end + 2).collect();
                line.truncate(end);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// `n` bytes, or fewer when the stream ends first.
    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if !self.fill().await {
                break;
            }
        }
        let n = n.min(self.buf.len());
        self.buf.drain(..n).collect()
    }

    /// Everything until the peer closes.
    async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    async fn read_chunked(&mut self) -> Chunked {
        let mut out = Chunked::default();
        loop {
            let Some(line) = self.read_line().await else {
                return out;
            };
            let line = String::from_utf8_lossy(&line).into_owned();
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("not a chunk-size line: {line:?}"));
            if size == 0 {
                loop {
                    let Some(line) = self.read_line().await else {
                        return out;
                    };
                    if line.is_empty() {
                        out.complete = true;
                        return out;
                    }
                    out.trailers.0.push(parse_field(&line));
                }
            }
            let data = self.take(size + 2).await;
            out.body.extend_from_slice(&data[..data.len().min(size)]);
            if data.len() < size + 2 {
                return out;
            }
            assert_eq!(&data[size..], b"\r\n", "chunk data not followed by CRLF");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------------------

/// A response as the client read it.
#[derive(Debug)]
struct Response {
    /// The head exactly as sent, through its blank line.
    head: String,
    version: String,
    status: u16,
    reason: String,
    headers: Fields,
    body: Vec<u8>,
    /// Framed with `Transfer-Encoding: chunked`.
    chunked: bool,
    trailers: Fields,
    /// The body arrived whole (by its length, its last chunk, or the close).
    complete: bool,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// The gateway's own JSON error: status, code, content type, and the request id
    /// that is also in the header.
    fn assert_error(&self, status: u16, code: &str, tenant: Option<&str>) {
        assert_eq!(self.status, status, "{}{}", self.head, self.text());
        assert_eq!(self.headers.get("content-type"), Some("application/json"));
        let j = self.json();
        assert_eq!(j["error"], code, "{j}");
        assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        assert_eq!(j["tenant"].as_str(), tenant, "{j}");
        assert_eq!(j["request_id"].as_str(), self.headers.get("x-request-id"));
    }
}

/// A client connection to the gateway.
struct Client {
    wire: Wire,
}

impl Client {
    async fn connect(gw: &Gateway) -> Client {
        Client::connect_to(gw.addr).await
    }

    async fn connect_to(addr: SocketAddr) -> Client {
        Client {
            wire: Wire::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wire.stream.write_all(bytes).await.unwrap();
    }

    /// The next response (1xx included); `None` when the gateway closes before a whole
    /// head. `head_request`: the request was HEAD, so no body follows.
    async fn try_response(&mut self, head_request: bool) -> Option<Response> {
        let read = async {
            let head = self.wire.read_head().await?;
            let (start, headers) = parse_head(&head);
            let mut parts = start.splitn(3, ' ');
            let version = parts.next().unwrap_or_default().to_owned();
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not a status line: {start:?}"));
            let reason = parts.next().unwrap_or_default().to_owned();
            let bodyless = head_request || status < 200 || status == 204 || status == 304;
            // Chunked when it is the last transfer coding.
            let chunked = !bodyless
                && headers.get("transfer-encoding").is_some_and(|v| {
                    v.rsplit(',')
                        .next()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
                });
            let (body, trailers, complete) = if bodyless {
                (Vec::new(), Fields::default(), true)
            } else if chunked {
                let c = self.wire.read_chunked().await;
                (c.body, c.trailers, c.complete)
            } else if let Some(len) = headers.get("content-length") {
                let len: usize = len.parse().expect("a numeric content-length");
                let body = self.wire.take(len).await;
                let complete = body.len() == len;
                (body, Fields::default(), complete)
            } else {
                (self.wire.read_to_end().await, Fields::default(), true)
            };
            Some(Response {
                head: String::from_utf8_lossy(&head).into_owned(),
                version,
                status,
                reason,
                headers,
                body,
                chunked,
                trailers,
                complete,
            })
        };
        tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .expect("the gateway answered within the read timeout")
    }

    /// The next response, which must arrive whole.
    async fn response(&mut self) -> Response {
        let r = self
            .try_response(false)
            .await
            .expect("a response before the connection closed");
        assert!(r.complete, "truncated response: {r:?}");
        r
    }

    /// Sends a GET for `path` to the test tenant and reads the response.
    async fn get(&mut self, path: &str) -> Response {
        self.send(&get(path)).await;
        self.response().await
    }

    /// Waits until the gateway closes the connection; returns what it sent before.
    async fn closed(&mut self) -> Vec<u8> {
        tokio::time::timeout(READ_TIMEOUT, self.wire.read_to_end())
            .await
            .expect("the gateway closed the connection")
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------
// The upstream side
// ---------------------------------------------------------------------------------------

/// One request as an upstream read it.
#[derive(Clone, Debug)]
struct Seen {
    /// Which accepted connection (0, 1, …) carried it.
    conn: usize,
    /// The head exactly as received, through its blank line.
    head: String,
    method: String,
    target: String,
    version: String,
    headers: Fields,
    /// Decoded (de-chunked) body.
    body: Vec<u8>,
    /// Framed with `Transfer-Encoding: chunked`.
    chunked: bool,
    /// The trailer section of a chunked body.
    trailers: Fields,
}

/// What an upstream does after reading a request.
enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Closes the connection (without a `Connection: close`).
    Close,
}

type Script = dyn Fn(&Seen) -> Vec<Step> + Send + Sync;

/// A raw HTTP/1.1 upstream: reads requests one after another on each connection,
/// records them, and runs the test's script for each.
struct RawUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    conns: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> RawUpstream {
        let script: Arc<Script> = Arc::new(script);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (seen2, conns2) = (seen.clone(), conns.clone());
        let addr = serve_tcp(move |stream| {
            let conn = conns2.fetch_add(1, Ordering::SeqCst);
            serve_upstream_conn(Wire::new(stream), conn, script.clone(), seen2.clone())
        })
        .await;
        RawUpstream { addr, seen, conns }
    }

    /// Answers every request with 200 and the request target as the body.
    async fn echo() -> RawUpstream {
        RawUpstream::start(|r| vec![Step::Write(ok(r.target.as_bytes()))]).await
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn serve_upstream_conn(
    mut wire: Wire,
    conn: usize,
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    loop {
        let Some(head) = wire.read_head().await else {
            return;
        };
        let (start, headers) = parse_head(&head);
        let mut parts = start.split(' ');
        let (method, target, version) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let mut trailers = Fields::default();
        let body = if chunked {
            let c = wire.read_chunked().await;
            if !c.complete {
                return;
            }
            trailers = c.trailers;
            c.body
        } else if let Some(len) = headers.get("content-length") {
            let len: usize = len.parse().expect("a numeric content-length");
            let body = wire.take(len).await;
            if body.len() < len {
                return;
            }
            body
        } else {
            Vec::new()
        };
        let req = Seen {
            conn,
            head: String::from_utf8_lossy(&head).into_owned(),
            method,
            target,
            version,
            headers,
            body,
            chunked,
            trailers,
        };
        let steps = script(&req);
        seen.lock().unwrap().push(req);
        for step in steps {
            match step {
                Step::Write(bytes) => {
                    if wire.stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => return,
            }
        }
    }
}

/// `200 OK` with a Content-Length body.
fn ok(body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// A gateway with one worker (so one upstream pool) and tenant `t1` on [`HOST`];
/// `tenant_extra` is appended to `[tenants.t1]`.
fn gateway(up: &RawUpstream, tenant_extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[server]\nworkers = 1\n\n[upstreams.u]\ntargets = [\"{}\"]\n\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n{tenant_extra}",
        up.addr
    ))
}

// ---------------------------------------------------------------------------------------
// Keep-alive and pipelining
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_requests_share_one_upstream_connection() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/one", "/two", "/three"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), path);
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(
            r.headers.get("content-length"),
            Some(&*path.len().to_string())
        );
        assert!(!r.headers.has("connection"), "{}", r.head);
    }
    let seen = up.seen();
    assert_eq!(
        seen.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
        ["/one", "/two", "/three"]
    );
    assert!(seen.iter().all(|s| s.conn == 0 && s.version == "HTTP/1.1"));
    assert_eq!(
        up.conns(),
        1,
        "one pooled upstream connection served all three"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    let mut burst = get("/p1");
    burst.extend(get("/p2?x=1"));
    burst.extend(get("/p3"));
    c.send(&burst).await;
    for path in ["/p1", "/p2?x=1", "/p3"] {
        let r = c.response().await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), path);
    }
    assert_eq!(up.seen().len(), 3);
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn pipelined_bursts_of_every_size_around_the_schedulers_budget_are_answered() {
    // tokio lets a task do 128 socket operations per turn; once they are used up, a
    // readiness check answers "not yet" without registering the waker and wakes it
    // after the turn instead. A connection that goes idle at that moment parks with
    // only that deferred wake-up to bring it back. Refusals (unknown hosts) cost one
    // operation each, so bursts of 120..=136 and 250..=260 requests cover the edge.
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    for n in (120..=136).chain(250..=260) {
        let mut c = Client::connect(&gw).await;
        let burst: Vec<u8> = (0..n)
            .flat_map(|i| {
                format!("GET /{i} HTTP/1.1\r\nHost: unknown{i}.test\r\n\r\n").into_bytes()
            })
            .collect();
        c.send(&burst).await;
        for i in 0..n {
            let r = c.response().await;
            assert_eq!(r.status, 404, "burst {n}, response {i}: {}", r.head);
        }
        // The connection went idle after the burst; it must still be served.
        assert_eq!(
            c.get("/after").await.text(),
            "/after",
            "after a burst of {n}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Response framing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_response_passes_through() {
    let up = RawUpstream::start(|r| {
        vec![Step::Write(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\
                 X-Path: {}\r\n\r\nhello world",
                r.target
            )
            .into_bytes(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/a", "/b"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.reason, "OK");
        assert_eq!(r.body, b"hello world");
        assert!(!r.chunked);
        assert_eq!(r.headers.get("content-length"), Some("11"));
        assert_eq!(r.headers.get("content-type"), Some("text/plain"));
        assert_eq!(r.headers.get("x-path"), Some(path));
        // The gateway adds the date when the upstream sent none.
        assert!(r.headers.has("date"), "{}", r.head);
    }
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn chunked_response_with_extension_and_trailers() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n\
              5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-checksum: abc\r\n\r\n"
                .to_vec(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for _ in 0..2 {
        let r = c.get("/chunks").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello world");
        assert!(r.chunked, "re-sent chunked: {}", r.head);
        assert!(!r.headers.has("content-length"));
        // `Trailer` is hop-by-hop and removed; the trailer section is not forwarded to a
        // client that sent no `TE: trailers` (tests/trailers.rs has one that did).
        assert!(!r.headers.has("trailer"), "{}", r.head);
        assert!(r.trailers.0.is_empty(), "{:?}", r.trailers);
    }
    // The chunked body ends with its trailer section, so the upstream connection is
    // reused (hyper, before the fast path, closed it after a trailer section).
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn close_delimited_response_reaches_the_client_whole_and_chunked() {
    let up = RawUpstream::start(|r| {
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec();
        out.extend_from_slice(format!("until close {}", r.target).as_bytes());
        vec![Step::Write(out), Step::Close]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/first", "/second"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("until close {path}"));
        // The client connection survives: the gateway re-frames the body as chunked.
        assert!(r.chunked, "{}", r.head);
        assert!(!r.headers.has("connection"), "{}", r.head);
    }
    assert_eq!(up.conns(), 2);
}

#[tokio::test]
async fn large_body_written_in_small_pieces_arrives_whole() {
    const LEN: usize = 64 * 1024 + 7;
    let up = RawUpstream::start(|r| {
        let body = pattern(LEN);
        let mut steps = Vec::new();
        if r.target == "/chunked" {
            steps.push(Step::Write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            ));
            for piece in body.chunks(3000) {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(piece);
                chunk.extend_from_slice(b"\r\n");
                steps.push(Step::Write(chunk));
                steps.push(Step::Sleep(Duration::from_millis(2)));
            }
            steps.push(Step::Write(b"0\r\n\r\n".to_vec()));
        } else {
            steps.push(Step::Write(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").into_bytes(),
            ));
            for piece in body.chunks(4000) {
                steps.push(Step::Write(piece.to_vec()));
                steps.push(Step::Sleep(Duration::from_millis(2)));
            }
        }
        steps
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    let r = c.get("/length").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-length"), Some(&*LEN.to_string()));
    assert!(
        r.body == pattern(LEN),
        "body differs ({} bytes)",
        r.body.len()
    );
    let r = c.get("/chunked").await;
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    assert!(
        r.body == pattern(LEN),
        "body differs ({} bytes)",
        r.body.len()
    );
    assert_eq!(c.get("/after").await.status, 200);
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn head_response_keeps_content_length_and_has_no_body() {
    let up = RawUpstream::start(|r| {
        if r.method == "HEAD" {
            vec![Step::Write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ncontent-type: text/plain\r\n\r\n"
                    .to_vec(),
            )]
        } else {
            vec![Step::Write(ok(b"after head"))]
        }
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(format!("HEAD /h HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.try_response(true).await.expect("a HEAD response");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-length"), Some("1234"), "{}", r.head);
    assert_eq!(
        r.headers.sorted_names(),
        ["content-length", "content-type", "date", "x-request-id"],
        "{}",
        r.head
    );
    // A GET right after: any stray body byte would corrupt its status line.
    let r = c.get("/g").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "after head");
    let seen = up.seen();
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(seen[1].method, "GET");
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    let up = RawUpstream::start(|r| {
        let out: &[u8] = match r.target.as_str() {
            "/204" => b"HTTP/1.1 204 No Content\r\nx-kind: none\r\n\r\n",
            "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext",
        };
        vec![Step::Write(out.to_vec())]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    let r = c.get("/204").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.reason, "No Content");
    assert_eq!(r.headers.get("x-kind"), Some("none"));
    assert_eq!(
        r.headers.sorted_names(),
        ["date", "x-kind", "x-request-id"],
        "{}",
        r.head
    );
    assert!(
        !r.headers.has("content-length") && !r.headers.has("transfer-encoding"),
        "{}",
        r.head
    );
    assert_eq!(c.get("/ok").await.text(), "next");
    let r = c.get("/304").await;
    assert_eq!(r.status, 304);
    assert_eq!(r.reason, "Not Modified");
    assert_eq!(r.headers.get("etag"), Some("\"v1\""));
    assert_eq!(
        r.headers.sorted_names(),
        ["date", "etag", "x-request-id"],
        "{}",
        r.head
    );
    assert!(!r.headers.has("transfer-encoding"), "{}", r.head);
    assert_eq!(c.get("/ok").await.text(), "next");
    assert_eq!(up.conns(), 1);
}

// ---------------------------------------------------------------------------------------
// Upstream connection lifetime
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_connection_close_does_not_close_the_client() {
    let up = RawUpstream::start(|r| {
        let mut out = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\n".to_vec();
        out.extend_from_slice(&r.target.as_bytes()[..5]);
        vec![Step::Write(out), Step::Close]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/aaaa", "/bbbb", "/cccc"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), path);
        assert!(!r.headers.has("connection"), "{}", r.head);
    }
    assert_eq!(up.conns(), 3, "a new upstream connection for each");
}

#[tokio::test]
async fn idle_pooled_connection_closed_by_upstream_is_not_an_error() {
    let up = RawUpstream::start(|r| {
        vec![
            Step::Write(ok(r.target.as_bytes())),
            Step::Sleep(Duration::from_millis(50)),
            Step::Close,
        ]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/1", "/2", "/3"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{}{}", r.head, r.text());
        assert_eq!(r.text(), path);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(up.conns(), 3);
}

// ---------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_request_body_sent_in_pieces() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let body = pattern(10_000);
    let mut c = Client::connect(&gw).await;
    c.send(
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 10000\r\n\r\n")
            .as_bytes(),
    )
    .await;
    for piece in [&body[..3000], &body[3000..7000], &body[7000..]] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.send(piece).await;
    }
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = up.seen();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].headers.get("content-length"), Some("10000"));
    assert!(!seen[0].chunked);
    assert!(seen[0].body == body, "the upstream got other bytes");
    assert_eq!(c.get("/next").await.text(), "/next");
}

#[tokio::test]
async fn chunked_request_body_is_forwarded_chunked() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let body = pattern(5000);
    let mut c = Client::connect(&gw).await;
    let mut req =
        format!("POST /chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for piece in body.chunks(1500) {
        req.extend(format!("{:x};ext=1\r\n", piece.len()).into_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nx-client-trailer: t\r\n\r\n");
    c.send(&req).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = &up.seen()[0];
    assert!(seen.body == body, "the upstream got other bytes");
    assert!(seen.chunked, "{}", seen.head);
    assert!(!seen.headers.has("content-length"), "{}", seen.head);
    // Chunk extensions are not forwarded; the client's trailer section is.
    assert!(!seen.head.contains("ext="), "{}", seen.head);
    assert_eq!(
        seen.trailers.sorted(),
        sorted_pairs(&[("x-client-trailer", "t")])
    );
    assert_eq!(c.get("/next").await.text(), "/next");
}

/// Request trailers go on after the re-chunked body (as HAProxy forwards them; they
/// were dropped), but never one the gateway sets or guards, in either spelling (a
/// backend that merges trailers into headers would take `x-tenant-id` from the
/// client), nor a field that framing, routing or authentication read from the head.
#[tokio::test]
async fn request_trailers_are_forwarded_but_never_the_gateways_own_fields() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "POST /trailed HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\
             Trailer: x-checksum, grpc-status\r\n\r\n3\r\nabc\r\n0\r\n\
             x-checksum: sha256=1\r\ngrpc-status: 0\r\nx-tenant-id: evil\r\n\
             x_tenant_id: evil\r\nx-forwarded-for: 10.9.9.9\r\nx-request-id: forged\r\n\
             content-length: 99\r\nhost: evil.example\r\nauthorization: Bearer x\r\n\
             transfer-encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.status, 200);
    let seen = &up.seen()[0];
    assert_eq!(seen.body, b"abc");
    assert!(!seen.headers.has("trailer"), "{}", seen.head);
    assert_eq!(
        seen.trailers.sorted(),
        sorted_pairs(&[("grpc-status", "0"), ("x-checksum", "sha256=1")])
    );
    // The connection is in step after the trailer section, on both sides.
    assert_eq!(c.get("/next").await.text(), "/next");
    assert_eq!(up.conns(), 1);

    // An HTTP/2 client's trailers, on a body of no declared length, the same way.
    let mut h2: hyper::client::conn::http2::SendRequest<Trailed> = h2c(&gw).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "sha256=2".parse().unwrap());
    trailers.insert("x-tenant-features", "admin".parse().unwrap());
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{HOST}/h2-trailed"))
        .body(Trailed(
            Some(bytes::Bytes::from_static(b"xyz")),
            Some(trailers),
        ))
        .unwrap();
    let r = h2_exchange(&mut h2, req).await;
    assert_eq!(r.status, 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(seen.target, "/h2-trailed");
    assert!(seen.chunked, "{}", seen.head);
    assert_eq!(seen.body, b"xyz");
    assert_eq!(
        seen.trailers.sorted(),
        sorted_pairs(&[("x-checksum", "sha256=2")])
    );
}

/// A request body of one data frame and then trailers.
struct Trailed(Option<bytes::Bytes>, Option<http::HeaderMap>);

impl http_body::Body for Trailed {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let frame = match self.0.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => self.1.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

#[tokio::test]
async fn content_length_over_max_body_is_413_before_the_upstream() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "[tenants.t1.limits]\nmax_body = 1024\n");
    let mut c = Client::connect(&gw).await;
    let mut req =
        format!("POST /big HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2000\r\n\r\n").into_bytes();
    req.extend(pattern(2000));
    c.send(&req).await;
    let r = c.response().await;
    r.assert_error(413, "body_too_large", Some("t1"));
    // The body came whole with the head, yet the connection closes after the answer,
    // as nginx closes after every 413 and as the TLS listener does (tests/tls).
    assert_eq!(r.headers.get("connection"), Some("close"), "{}", r.head);
    assert_eq!(c.closed().await, b"");
    assert!(up.seen().is_empty(), "nothing of /big reached the upstream");
}

#[tokio::test]
async fn chunked_body_over_max_body_is_413() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "[tenants.t1.limits]\nmax_body = 1024\n");
    let mut c = Client::connect(&gw).await;
    let mut req =
        format!("POST /big HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for piece in pattern(2000).chunks(500) {
        req.extend(format!("{:x}\r\n", piece.len()).into_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.send(&req).await;
    let r = c.response().await;
    r.assert_error(413, "body_too_large", Some("t1"));
    // The rest of the body is left unread, so the connection closes after the answer.
    assert_eq!(r.headers.get("connection"), Some("close"), "{}", r.head);
    assert_eq!(c.closed().await, b"");
    assert!(
        up.seen().is_empty(),
        "the upstream never got a whole request"
    );
}

// ---------------------------------------------------------------------------------------
// Header rewriting
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "GET /hop HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive, x-drop-me\r\nx-drop-me: 1\r\n\
             Keep-Alive: timeout=5\r\nProxy-Authorization: x\r\nProxy-Connection: keep-alive\r\n\
             TE: gzip\r\nx-kept: yes\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    for name in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            !r.headers.has(name),
            "{name} reached the client:\n{}",
            r.head
        );
    }
    assert_eq!(r.headers.get("x-kept"), Some("yes"));
    let seen = &up.seen()[0];
    for name in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
    ] {
        assert!(
            !seen.headers.has(name),
            "{name} reached the upstream:\n{}",
            seen.head
        );
    }
    assert_eq!(seen.headers.get("x-kept"), Some("yes"));
    // The client's `Connection: keep-alive` went with the rest; the connection stays.
    assert_eq!(c.get("/again").await.status, 200);
}

#[tokio::test]
async fn forwarded_headers_and_tenant_identity() {
    let up = RawUpstream::echo().await;
    // A feature listed twice is forwarded once (`check` warns at the second).
    let gw = gateway(&up, "features = [\"beta\", \"sso\", \"beta\"]\n");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "GET /id?q=1 HTTP/1.1\r\nHost: {HOST}\r\nx-tenant-id: evil\r\nX-Tenant-Id: evil2\r\n\
             x-tenant-features: all\r\nx-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: evil.example\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    let seen = &up.seen()[0];
    assert_eq!(seen.target, "/id?q=1");
    assert_eq!(seen.headers.all("x-tenant-id"), ["t1"]);
    assert_eq!(seen.headers.all("x-tenant-features"), ["beta,sso"]);
    assert_eq!(seen.headers.all("host"), [HOST]);
    assert_eq!(
        seen.headers.all("x-forwarded-for"),
        ["203.0.113.9, 127.0.0.1"]
    );
    assert_eq!(seen.headers.all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.headers.all("x-forwarded-host"), [HOST]);
    // A generated request id: 16 hex digits, the same on the response.
    let id = seen.headers.one("x-request-id");
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(r.headers.all("x-request-id"), [id]);

    // Without client copies: the plain values; a sane client request id is kept.
    c.send(
        format!("GET /id2 HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: abc-123\r\n\r\n").as_bytes(),
    )
    .await;
    let r = c.response().await;
    let seen = &up.seen()[1];
    assert_eq!(seen.headers.all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.headers.all("x-request-id"), ["abc-123"]);
    assert_eq!(r.headers.all("x-request-id"), ["abc-123"]);
}

/// How an HPACK header block (RFC 7541) represents each field; only the representation
/// and the name's table index are read, no string is decoded.
#[derive(Debug, PartialEq)]
enum Hpack {
    Indexed(usize),
    /// A literal that enters the connection's dynamic table.
    Inserted(usize),
    NotIndexed(usize),
    NeverIndexed(usize),
    SizeUpdate,
}

fn hpack_fields(block: &[u8]) -> Vec<Hpack> {
    fn int(b: &[u8], i: &mut usize, prefix: u32) -> usize {
        let mask = (1usize << prefix) - 1;
        let mut v = usize::from(b[*i]) & mask;
        *i += 1;
        if v == mask {
            let mut shift = 0;
            loop {
                let x = b[*i];
                *i += 1;
                v += usize::from(x & 0x7f) << shift;
                shift += 7;
                if x & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn literal(b: &[u8], i: &mut usize, prefix: u32) -> usize {
        let name = int(b, i, prefix);
        if name == 0 {
            let len = int(b, i, 7);
            *i += len;
        }
        let len = int(b, i, 7);
        *i += len;
        name
    }
    let (mut out, mut i) = (Vec::new(), 0);
    while i < block.len() {
        let first = block[i];
        out.push(match first {
            f if f & 0x80 != 0 => Hpack::Indexed(int(block, &mut i, 7)),
            f if f & 0xc0 == 0x40 => Hpack::Inserted(literal(block, &mut i, 6)),
            f if f & 0xe0 == 0x20 => {
                int(block, &mut i, 5);
                Hpack::SizeUpdate
            }
            f if f & 0xf0 == 0x10 => Hpack::NeverIndexed(literal(block, &mut i, 4)),
            _ => Hpack::NotIndexed(literal(block, &mut i, 4)),
        });
    }
    out
}

/// Writes an HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends a GET for `path` on `stream` and returns the HPACK block of its response head,
/// acknowledging the server's settings on the way.
async fn h2_raw_get(s: &mut TcpStream, stream: u32, path: &str) -> Vec<u8> {
    // :method GET, :scheme http (static), :path and :authority as plain literals.
    let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, u8::try_from(HOST.len()).unwrap()]);
    block.extend_from_slice(HOST.as_bytes());
    s.write_all(&h2_frame(1, 0x5, stream, &block))
        .await
        .unwrap();
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout(READ_TIMEOUT, s.read_exact(&mut head))
            .await
            .expect("a frame in time")
            .unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).await.unwrap();
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match (head[3], head[4]) {
            (4, flags) if flags & 1 == 0 => s.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap(),
            (1, flags) if id == stream => {
                assert_ne!(flags & 0x4, 0, "the head fits one frame");
                return payload;
            }
            (3 | 7, _) => panic!("stream reset or connection closed: {head:?} {payload:?}"),
            _ => {}
        }
    }
}

/// The gateway's HTTP/2 server puts what repeats in the client's HPACK table with the
/// first response (`server`, `content-type`, `RateLimit-Policy`, and the first
/// `x-request-id` and `RateLimit` for their names) and nothing after it: later
/// responses name those by index, and the values that differ each time (`date`,
/// `x-request-id`, `RateLimit`) are literals. (hyper's server, `BULKHEAD_H2=hyper`,
/// compared each new `date` with every older one in the table.)
#[tokio::test]
async fn http2_responses_add_nothing_to_the_hpack_table_after_the_first() {
    let up = RawUpstream::start(|r| {
        let second = r.target.trim_start_matches('/');
        vec![Step::Write(
            format!(
                "HTTP/1.1 200 OK\r\nserver: raw\r\ndate: Fri, 27 Nov 2026 16:00:0{second} GMT\r\n\
                 content-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
            )
            .into_bytes(),
        )]
    })
    .await;
    let gw = gateway(
        &up,
        "[tenants.t1.limits]\nrequests_per_second = 100\nburst = 50\n",
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    for (n, stream) in [(1, 1), (2, 3), (3, 5)] {
        let fields = hpack_fields(&h2_raw_get(&mut s, stream, &format!("/{n}")).await);
        assert_eq!(fields.first(), Some(&Hpack::Indexed(8)), "{n}: :status 200");
        assert_eq!(fields.len(), 8, "{n}: {fields:?}");
        assert!(!fields.contains(&Hpack::SizeUpdate), "{n}: {fields:?}");
        // `date` (static name 33) and `content-length` (28): plain literals.
        for name in [33, 28] {
            assert!(fields.contains(&Hpack::NotIndexed(name)), "{n}: {fields:?}");
        }
        let inserted = fields
            .iter()
            .filter(|f| matches!(f, Hpack::Inserted(_)))
            .count();
        let dynamic = |f: &Hpack| match f {
            Hpack::Indexed(i) | Hpack::NeverIndexed(i) => *i >= 62,
            _ => false,
        };
        if n == 1 {
            // server (static name 54), content-type (31), then three literal names.
            assert_eq!(inserted, 5, "{n}: {fields:?}");
            for name in [54, 31] {
                assert!(fields.contains(&Hpack::Inserted(name)), "{n}: {fields:?}");
            }
            assert!(!fields.iter().any(dynamic), "{n}: {fields:?}");
        } else {
            assert_eq!(inserted, 0, "{n}: {fields:?}");
            // server, content-type, ratelimit-policy by index; x-request-id and
            // RateLimit never-indexed values after an indexed name.
            let indexed = fields
                .iter()
                .filter(|f| matches!(f, Hpack::Indexed(i) if *i >= 62))
                .count();
            let never = fields
                .iter()
                .filter(|f| matches!(f, Hpack::NeverIndexed(i) if *i >= 62))
                .count();
            assert_eq!((indexed, never), (3, 2), "{n}: {fields:?}");
        }
    }
    assert_eq!(up.conns(), 1);
}

/// An HTTP/1.0 request without `Host`, its tenant named by the path: the upstream gets
/// the target as `Host`, and no `x-forwarded-host` (the client named no host).
#[tokio::test]
async fn http10_request_without_host_gets_the_targets_host_and_no_forwarded_host() {
    let up = RawUpstream::echo().await;
    let gw = Gateway::start(&format!(
        "[server]\nworkers = 1\n\n[tenancy]\nresolve = [\"path\"]\n\n\
         [upstreams.u]\ntargets = [\"{}\"]\n\n[tenants.t1]\nupstream = \"u\"\n",
        up.addr
    ));
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /t/t1/x HTTP/1.0\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = &up.seen()[0];
    assert!(
        seen.head.starts_with("GET /x HTTP/1.1\r\n"),
        "{}",
        seen.head
    );
    assert_eq!(
        seen.headers.all("host"),
        [up.addr.to_string()],
        "{}",
        seen.head
    );
    assert!(!seen.headers.has("x-forwarded-host"), "{}", seen.head);
    assert_eq!(seen.headers.all("x-tenant-id"), ["t1"]);
}

#[tokio::test]
async fn gateway_headers_replace_the_upstreams_own() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nx-request-id: from-upstream\r\nratelimit-policy: upstream\r\n\
              ratelimit: upstream\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        )]
    })
    .await;
    let gw = gateway(
        &up,
        "[tenants.t1.limits]\nrequests_per_second = 100\nburst = 50\n",
    );
    let mut c = Client::connect(&gw).await;
    let r = c.get("/rl").await;
    assert_eq!(r.status, 200);
    let sent = up.seen()[0].headers.one("x-request-id").to_owned();
    assert_eq!(r.headers.all("x-request-id"), [sent.as_str()]);
    assert_eq!(r.headers.all("ratelimit-policy"), ["\"tenant\";q=50;w=1"]);
    let rl = r.headers.all("ratelimit");
    assert_eq!(rl.len(), 1, "{}", r.head);
    assert!(rl[0].starts_with("\"tenant\";r="), "{}", r.head);
}

#[tokio::test]
async fn exact_fields_of_a_plain_exchange() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nServer: raw\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "GET /plain?a=b HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: raw/1\r\nAccept: */*\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    let seen = &up.seen()[0];
    assert!(
        seen.head.starts_with("GET /plain?a=b HTTP/1.1\r\n"),
        "{}",
        seen.head
    );
    let id = seen.headers.one("x-request-id");
    // Nothing more and nothing less: no Content-Length on a GET without a body, no
    // `Connection` of the gateway's own.
    assert_eq!(
        seen.headers.sorted(),
        sorted_pairs(&[
            ("host", HOST),
            ("user-agent", "raw/1"),
            ("accept", "*/*"),
            ("x-tenant-id", "t1"),
            ("x-request-id", id),
            ("x-forwarded-host", HOST),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-for", "127.0.0.1"),
        ]),
        "{}",
        seen.head
    );
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head);
    let names = r.headers.sorted_names();
    assert_eq!(
        names,
        ["content-length", "date", "server", "x-request-id"],
        "{}",
        r.head
    );
    assert_eq!(r.headers.get("server"), Some("raw"));
    assert_eq!(r.headers.get("x-request-id"), Some(id));
}

#[tokio::test]
async fn repeated_headers_keep_their_order_and_values() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nX-Other: o\r\nset-cookie: b=2\r\n\
              X-Mixed-Case: MiXeD\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "GET /multi HTTP/1.1\r\nHost: {HOST}\r\nX-Multi: a\r\nx-other: between\r\nx-multi: b\r\n\
             X-Value-Case: KeepThis\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.all("set-cookie"), ["a=1; Path=/", "b=2"]);
    assert_eq!(r.headers.all("x-mixed-case"), ["MiXeD"]);
    let seen = &up.seen()[0];
    assert_eq!(seen.headers.all("x-multi"), ["a", "b"]);
    assert_eq!(seen.headers.all("x-value-case"), ["KeepThis"]);
    // Names go out lowercase in both directions (today the copies of one name are
    // also moved next to each other; that is not asserted).
    for line in ["x-multi: a", "x-multi: b", "x-value-case: KeepThis"] {
        assert!(
            seen.head.contains(&format!("\r\n{line}\r\n")),
            "{}",
            seen.head
        );
    }
    for line in [
        "set-cookie: a=1; Path=/",
        "set-cookie: b=2",
        "x-mixed-case: MiXeD",
    ] {
        assert!(r.head.contains(&format!("\r\n{line}\r\n")), "{}", r.head);
    }
}

// ---------------------------------------------------------------------------------------
// Status lines
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unusual_status_codes_and_reason_phrases() {
    let up = RawUpstream::start(|r| {
        let line: &[u8] = match r.target.as_str() {
            "/299" => b"HTTP/1.1 299 Whatever\r\n",
            "/599" => b"HTTP/1.1 599 Network Thing\r\n",
            "/200" => b"HTTP/1.1 200 Fine Thanks\r\n",
            _ => b"HTTP/1.1 404 Gone Fishing\r\n",
        };
        let mut out = line.to_vec();
        out.extend_from_slice(b"content-length: 1\r\n\r\nx");
        vec![Step::Write(out)]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for (path, status, reason) in [
        ("/299", 299, "Whatever"),
        ("/599", 599, "Network Thing"),
        ("/200", 200, "Fine Thanks"),
        ("/404", 404, "Gone Fishing"),
    ] {
        let r = c.get(path).await;
        assert_eq!(r.status, status, "{}", r.head);
        assert_eq!(r.reason, reason, "{}", r.head);
        assert_eq!(r.body, b"x");
    }
}

#[tokio::test]
async fn interim_100_from_the_upstream_is_not_relayed() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"
                .to_vec(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    let r = c.get("/interim").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "final");
    assert_eq!(c.get("/again").await.text(), "final");
}

/// An upstream that answers each path with the bytes in `answers` (and closes after
/// the paths in `close_after`); `/ok` gets a plain 200.
async fn scripted(
    answers: &'static [(&'static str, &'static [u8])],
    close_after: &'static [&'static str],
) -> RawUpstream {
    RawUpstream::start(move |r| {
        let out = answers.iter().find(|(p, _)| *p == r.target).map_or(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            |(_, b)| *b,
        );
        let mut steps = vec![Step::Write(out.to_vec())];
        if close_after.contains(&r.target.as_str()) {
            steps.push(Step::Close);
        }
        steps
    })
    .await
}

#[tokio::test]
async fn invalid_upstream_heads_are_502() {
    let up = scripted(
        &[
            (
                "/two-lengths",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "/obs-fold",
                b"HTTP/1.1 200 OK\r\nx-f: a\r\n  b\r\ncontent-length: 3\r\n\r\nabc",
            ),
            ("/no-status", b"HTTP/1.1 \r\ncontent-length: 3\r\n\r\nabc"),
            (
                "/status-1000",
                b"HTTP/1.1 1000 Big\r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "/space-colon",
                b"HTTP/1.1 200 OK\r\ncontent-length : 3\r\n\r\nabc",
            ),
        ],
        &[],
    )
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in [
        "/two-lengths",
        "/obs-fold",
        "/no-status",
        "/status-1000",
        "/space-colon",
    ] {
        let r = c.get(path).await;
        r.assert_error(502, "upstream_error", Some("t1"));
        assert!(
            r.text().contains("sent an invalid HTTP response"),
            "{path}: {}",
            r.text()
        );
        // The client connection is not affected.
        assert_eq!(c.get("/ok").await.text(), "ok", "{path}");
    }
}

#[tokio::test]
async fn lenient_upstream_responses_are_accepted() {
    let up = scripted(
        &[
            (
                "/same-length-twice",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "/bare-lf",
                b"HTTP/1.1 200 OK\ncontent-length: 3\nx-lf: 1\n\nabc",
            ),
            (
                "/no-reason",
                b"HTTP/1.1 200\r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "/early-hints",
                b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
                  HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
            ),
            (
                "/extra-bytes",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcEXTRA",
            ),
        ],
        &[],
    )
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in [
        "/same-length-twice",
        "/bare-lf",
        "/no-reason",
        "/early-hints",
        "/extra-bytes",
    ] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert_eq!(r.text(), "abc", "{path}");
        assert_eq!(r.headers.all("content-length"), ["3"], "{path}: {}", r.head);
        assert!(!r.headers.has("link"), "{path}: 103 relayed: {}", r.head);
        match path {
            // An empty reason phrase is replaced by the standard one.
            "/no-reason" => assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head),
            "/bare-lf" => assert_eq!(r.headers.get("x-lf"), Some("1")),
            _ => assert!(
                r.head.starts_with("HTTP/1.1 200 OK\r\n"),
                "{path}: {}",
                r.head
            ),
        }
        assert_eq!(c.get("/ok").await.text(), "ok", "{path}");
    }
}

#[tokio::test]
async fn upstream_content_length_with_transfer_encoding() {
    let up = scripted(
        &[(
            "/both",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )],
        &[],
    )
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    let r = c.get("/both").await;
    assert_eq!(r.status, 200, "{}", r.head);
    // Transfer-Encoding wins (RFC 9112 6.3): the body is read as chunked and sent on
    // chunked, without the upstream's Content-Length. (hyper, before the fast path,
    // forwarded `content-length: 2` beside the chunked body: the client got "ab".)
    assert_eq!(r.headers.get("content-length"), None, "{}", r.head);
    assert!(r.chunked);
    assert_eq!(r.text(), "abc");
    assert_eq!(c.get("/ok").await.text(), "ok");
}

#[tokio::test]
async fn upstream_transfer_codings_other_than_chunked_are_kept() {
    let up = scripted(
        &[
            (
                "/gzip-chunked",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ),
            (
                "/gzip",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc",
            ),
        ],
        &["/gzip"],
    )
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/gzip-chunked", "/gzip"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        // The gzip coding is passed on in front of the client's own chunked (hyper,
        // before the fast path, dropped it: the client read gzip bytes as plain).
        assert_eq!(
            r.headers.all("transfer-encoding"),
            ["gzip, chunked"],
            "{path}: {}",
            r.head
        );
        assert!(!r.headers.has("content-encoding"), "{path}: {}", r.head);
        assert_eq!(r.text(), "abc", "{path}");
    }
    assert_eq!(c.get("/ok").await.text(), "ok");
}

#[tokio::test]
async fn http10_upstream_responses() {
    let up = scripted(
        &[
            ("/ten-close", b"HTTP/1.0 200 OK\r\n\r\nuntil close"),
            (
                "/ten-keep-alive",
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 3\r\n\r\nabc",
            ),
        ],
        &["/ten-close"],
    )
    .await;
    let gw = gateway(&up, "");
    // The gateway speaks HTTP/1.1 to its client whatever the upstream's version.
    let mut c = Client::connect(&gw).await;
    let r = c.get("/ten-keep-alive").await;
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head);
    assert_eq!(r.text(), "abc");
    assert!(!r.headers.has("connection"), "{}", r.head);
    assert_eq!(c.get("/ok").await.text(), "ok");
    // A close-delimited HTTP/1.0 body reaches the HTTP/1.1 client chunked, and the
    // client connection stays usable.
    let r = c.get("/ten-close").await;
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head);
    assert!(r.chunked && !r.headers.has("content-length"), "{}", r.head);
    assert_eq!(r.text(), "until close");
    assert_eq!(c.get("/ok").await.text(), "ok");
}

#[tokio::test]
async fn unsolicited_101_from_the_upstream() {
    let up = scripted(
        &[(
            "/switch",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n",
        )],
        &[],
    )
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    // A 101 to a request that asked for no upgrade is not HTTP the gateway can
    // relay: 502 `upstream_error` (hyper, before the fast path, relayed a bare 101 and
    // closed), and the client connection stays usable.
    let r = c.get("/switch").await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(r.json()["error"], "upstream_error", "{}", r.head);
    assert_eq!(c.get("/ok").await.text(), "ok");
}

#[tokio::test]
async fn bad_chunk_from_the_upstream_in_the_first_read_is_502() {
    let up = scripted(
        &[(
            "/bad",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        )],
        &[],
    )
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(&get("/bad")).await;
    // Nothing has been written to the client when the body turns out bad (it came
    // with the head): a 502, not a silent close or a truncated 200.
    let r = c.response().await;
    r.assert_error(502, "upstream_error", Some("t1"));
    // The client's connection carries on; the upstream's broken one is not reused.
    assert_eq!(c.get("/ok").await.text(), "ok");
    let metrics = support::get(gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.contains(r#"bulkhead_requests_total{tenant="t1",status="502"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"bulkhead_requests_total{tenant="t1",status="200"} 2"#),
        "the broken 200 must not count: {metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Malformed and unusual client input
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_get_the_gateways_400_and_close() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    // (what, bytes, what the message names)
    let cases = [
        ("garbage request line", "THIS IS NOT HTTP\r\n\r\n".to_owned(), "invalid"),
        (
            "two different content-lengths",
            format!("POST /cl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello"),
            "conflicting content-lengths",
        ),
        (
            "a content-length list",
            format!("POST /cl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3, 3\r\n\r\nabc"),
            "invalid content-length",
        ),
        (
            "a content-length that is not a number",
            format!("POST /cl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: abc\r\n\r\n"),
            "invalid content-length",
        ),
        (
            "a header line without a colon",
            format!("GET /a HTTP/1.1\r\nHost: {HOST}\r\nbroken header\r\n\r\n"),
            "invalid header name",
        ),
        (
            "whitespace before the colon",
            format!("GET /a HTTP/1.1\r\nHost : {HOST}\r\n\r\n"),
            "invalid header name",
        ),
        (
            "an obs-fold continuation line",
            format!("GET /a HTTP/1.1\r\nHost: {HOST}\r\nx-f: a\r\n  b\r\n\r\n"),
            "invalid header name",
        ),
        (
            "a NUL in a header value",
            format!("GET /a HTTP/1.1\r\nHost: {HOST}\r\nx-n: a\0b\r\n\r\n"),
            "invalid header value",
        ),
        (
            "a method with a delimiter in it",
            format!("G(T /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "invalid character in the request line",
        ),
        (
            "a space in the request target",
            format!("GET /a b HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "invalid HTTP version",
        ),
        (
            "HTTP/2.0 in a request line",
            format!("GET /a HTTP/2.0\r\nHost: {HOST}\r\n\r\n"),
            "invalid HTTP version",
        ),
        ("an HTTP/0.9 request line", "GET /a\r\n\r\n".to_owned(), "invalid"),
    ];
    let n = cases.len();
    for (what, bytes, named) in cases {
        let mut c = Client::connect(&gw).await;
        c.send(bytes.as_bytes()).await;
        let r = c
            .try_response(false)
            .await
            .unwrap_or_else(|| panic!("{what}: closed without an answer"));
        r.assert_error(400, "bad_request", None);
        let body = r.text();
        assert!(body.contains(named), "{what}: {body}");
        assert_eq!(r.headers.get("connection"), Some("close"), "{what}");
        assert_eq!(c.closed().await, b"", "{what}: bytes after the 400");
    }
    assert_eq!(up.conns(), 0, "nothing reached the upstream");
    // Counted under no tenant, like every refusal before a tenant is known.
    let metrics = support::get(gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    let line = format!(r#"bulkhead_rejected_total{{tenant="_unknown",reason="bad_request"}} {n}"#);
    assert!(metrics.contains(&line), "{metrics}");
}

#[tokio::test]
async fn more_header_fields_than_the_server_takes_get_the_gateways_431() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let head = |n: usize| {
        let fields: String = (0..n).map(|i| format!("x-f{i}: v\r\n")).collect();
        format!("GET /many HTTP/1.1\r\nHost: {HOST}\r\n{fields}\r\n")
    };
    // 200 fields (under 16 KiB): more than the fast path parses, fewer than the
    // server takes — served.
    let mut c = Client::connect(&gw).await;
    c.send(head(200).as_bytes()).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(up.seen()[0].headers.all("x-f199"), ["v"]);
    // 300: the gateway's 431 with its JSON body (hyper's was empty), then the close.
    let mut c = Client::connect(&gw).await;
    c.send(head(300).as_bytes()).await;
    let r = c
        .try_response(false)
        .await
        .expect("an answer before the close");
    r.assert_error(431, "headers_too_large", None);
    assert!(
        r.text().contains("more than 256 header fields"),
        "{}",
        r.text()
    );
    assert_eq!(r.headers.get("connection"), Some("close"));
    assert_eq!(c.closed().await, b"");
    assert_eq!(
        up.seen().len(),
        1,
        "the 300-field request reached the upstream"
    );
}

#[tokio::test]
async fn transfer_encoding_in_an_http_1_0_request_gets_the_gateways_400() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    // The fast path leaves HTTP/1.0 to hyper, which answered this with an empty 400;
    // the head is checked before hyper reads it (h1::Checked), as the fast path
    // checks its own.
    let mut c = Client::connect(&gw).await;
    c.send(
        format!("POST /te HTTP/1.0\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let r = c
        .try_response(false)
        .await
        .expect("an answer before the close");
    r.assert_error(400, "bad_request", None);
    assert!(r.text().contains("HTTP/1.0"), "{}", r.text());
    assert_eq!(r.headers.get("connection"), Some("close"));
    assert_eq!(c.closed().await, b"");
    assert_eq!(up.conns(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn lenient_request_forms_are_accepted() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let cases = [
        (
            "a lowercase method, forwarded as it came",
            format!("get /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "get /a HTTP/1.1",
        ),
        (
            "bare LF line ends",
            format!("GET /b HTTP/1.1\nHost: {HOST}\nx-lf: 1\n\n"),
            "GET /b HTTP/1.1",
        ),
        (
            "an empty line before the request line",
            format!("\r\nGET /c HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "GET /c HTTP/1.1",
        ),
        (
            "the same content-length twice",
            format!("POST /d HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
            "POST /d HTTP/1.1",
        ),
        (
            "the asterisk form",
            format!("OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "OPTIONS * HTTP/1.1",
        ),
        (
            "an h2c upgrade offer, ignored",
            format!(
                "GET /e HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                 Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            ),
            "GET /e HTTP/1.1",
        ),
    ];
    // One connection for all of them: each leaves it usable.
    let mut c = Client::connect(&gw).await;
    for (i, (what, bytes, line)) in cases.iter().enumerate() {
        c.send(bytes.as_bytes()).await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{what}: {}", r.head);
        assert!(
            r.head.starts_with("HTTP/1.1 200 OK\r\n"),
            "{what}: {}",
            r.head
        );
        let seen = &up.seen()[i];
        assert!(
            seen.head.starts_with(&format!("{line}\r\n")),
            "{what}: {}",
            seen.head
        );
        assert_eq!(seen.headers.all("host"), [HOST], "{what}");
    }
    let seen = up.seen();
    assert_eq!(seen[1].headers.all("x-lf"), ["1"]);
    assert_eq!(seen[3].headers.all("content-length"), ["3"]);
    assert_eq!(seen[3].body, b"abc");
    for name in ["connection", "upgrade", "http2-settings"] {
        assert!(!seen[5].headers.has(name), "{name}: {}", seen[5].head);
    }
    // The `Upgrade` offer hands the client connection from the fast path to hyper;
    // its bodiless requests still go through the fast path's upstream pool, so one
    // upstream connection carries all six.
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn host_edge_cases() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with two (the same or not),
    // is a 400 and the connection closes — on the fast path and on hyper's (a chunked
    // body). Two copies would leave the upstream to pick one, not the gateway.
    for (what, head) in [
        (
            "no Host",
            "GET /no-host HTTP/1.1\r\nX-Tenant-Id: t1\r\n".to_owned(),
        ),
        (
            "two Hosts",
            format!("GET /two HTTP/1.1\r\nHost: {HOST}\r\nHost: other.example\r\n"),
        ),
        (
            "the same Host twice",
            format!("GET /same HTTP/1.1\r\nHost: {HOST}\r\nHost: {HOST}\r\n"),
        ),
    ] {
        for chunked in [false, true] {
            let mut c = Client::connect(&gw).await;
            let body = if chunked {
                "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            } else {
                "\r\n"
            };
            c.send(format!("{head}{body}").as_bytes()).await;
            let r = c
                .try_response(false)
                .await
                .unwrap_or_else(|| panic!("{what}: an answer before the close"));
            r.assert_error(400, "bad_request", None);
            assert!(
                r.text().contains(if what == "no Host" {
                    "no Host header"
                } else {
                    "more than one Host"
                }),
                "{what}: {}",
                r.text()
            );
            assert_eq!(r.headers.get("connection"), Some("close"), "{what}");
        }
    }
    // RFC 9112 §3.2: a target in none of the request forms (relative, `*` on a GET),
    // or in the authority form, which is CONNECT's: a JSON 400 — not hyper's empty one,
    // nor (authority form) a request for `/`. The authority form on hyper's path too.
    for (what, line, chunked) in [
        ("relative", "GET t1/x HTTP/1.1", false),
        ("authority form", "GET t1.example.com:80 HTTP/1.1", false),
        (
            "authority form, hyper's path",
            "GET t1.example.com:80 HTTP/1.1",
            true,
        ),
        ("* on a GET", "GET * HTTP/1.1", false),
    ] {
        let mut c = Client::connect(&gw).await;
        let body = if chunked {
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        } else {
            "\r\n"
        };
        c.send(format!("{line}\r\nHost: {HOST}\r\n{body}").as_bytes())
            .await;
        let r = c
            .try_response(false)
            .await
            .unwrap_or_else(|| panic!("{what}: an answer before the close"));
        r.assert_error(400, "bad_request", None);
        assert_eq!(r.headers.get("connection"), Some("close"), "{what}");
    }
    assert!(up.seen().is_empty(), "none of them was forwarded");

    let mut c = Client::connect(&gw).await;
    // The absolute form's authority and a different Host: refused, not overridden.
    c.send(format!("GET http://{HOST}/abs HTTP/1.1\r\nHost: other.example\r\n\r\n").as_bytes())
        .await;
    c.response()
        .await
        .assert_error(403, "tenant_mismatch", None);
    // The absolute form without Host: routed by the authority, which becomes the Host.
    c.send(format!("GET http://{HOST}/abs?q HTTP/1.1\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "only the last one was forwarded");
    assert!(
        seen[0].head.starts_with("GET /abs?q HTTP/1.1\r\n"),
        "{}",
        seen[0].head
    );
    assert_eq!(seen[0].headers.all("host"), [HOST]);
    assert_eq!(seen[0].headers.all("x-forwarded-host"), [HOST]);
}

#[tokio::test]
async fn client_connection_close_is_honoured() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(format!("GET /bye HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!(r.text(), "/bye");
    assert_eq!(r.headers.get("connection"), Some("close"), "{}", r.head);
    assert_eq!(c.closed().await, b"");
    assert!(!up.seen()[0].headers.has("connection"));
    assert_eq!(up.conns(), 1);
}

#[tokio::test]
async fn content_length_with_transfer_encoding() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "POST /both HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    // TODAY: Transfer-Encoding wins (RFC 9112 section 6.3), the request is forwarded
    // with its chunked body and without the Content-Length, and the connection closes.
    let r = c.try_response(false).await.expect("an answer");
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    assert_eq!(r.text(), "/both");
    assert_eq!(r.headers.get("connection"), Some("close"), "{}", r.head);
    assert_eq!(c.closed().await, b"");
    let seen = &up.seen()[0];
    assert_eq!(seen.body, b"hello");
    assert!(seen.chunked, "{}", seen.head);
    assert!(!seen.headers.has("content-length"), "{}", seen.head);
}

#[tokio::test]
async fn request_transfer_coding_other_than_chunked_is_501() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    for te in ["gzip, chunked", "x-custom,chunked"] {
        let mut c = Client::connect(&gw).await;
        c.send(
            format!(
                "POST /gz HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: {te}\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        // Only the chunking would be undone: the upstream would get still-coded bytes
        // with nothing saying so (RFC 9112 section 6.1).
        let r = c.response().await;
        r.assert_error(501, "unsupported_transfer_coding", None);
        assert_eq!(
            r.headers.get("connection"),
            Some("close"),
            "{te}: {}",
            r.head
        );
        assert_eq!(c.closed().await, b"", "{te}");
    }
    // Not chunked last: no length to read the body by (RFC 9112 §6.3), a JSON 400 and
    // the close — hyper's answer was empty, and in no log. Over two fields too. And
    // chunked twice (RFC 9112 §6.1), whatever else is listed.
    for te in [
        "gzip",
        "chunked, gzip",
        "chunked\r\nTransfer-Encoding: gzip",
        "chunked, gzip, chunked",
    ] {
        let mut c = Client::connect(&gw).await;
        c.send(
            format!("POST /gz HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: {te}\r\n\r\nabc")
                .as_bytes(),
        )
        .await;
        let r = c
            .try_response(false)
            .await
            .unwrap_or_else(|| panic!("{te}: an answer before the close"));
        r.assert_error(400, "bad_request", None);
        assert_eq!(r.headers.get("connection"), Some("close"), "{te}");
    }
    assert!(up.seen().is_empty(), "none of them was forwarded");
    // Chunked alone (an empty list element is allowed) passes.
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "POST /ok HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: , chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "only the chunked request went upstream");
    assert_eq!(seen[0].body, b"abc");
}

#[tokio::test]
async fn bad_chunk_in_request_body_is_400_bad_request_body_and_close() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "POST /bad HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    r.assert_error(400, "bad_request_body", Some("t1"));
    // The rest of the body is unread: the answer says the connection closes, and it does.
    assert_eq!(r.headers.get("connection"), Some("close"), "{}", r.head);
    assert_eq!(c.closed().await, b"");
    assert!(
        up.seen().is_empty(),
        "the upstream never got a whole request"
    );
}

#[tokio::test]
async fn connect_is_refused_with_405_and_the_connection_closes() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    // What follows the head would be the client's tunnel bytes: never a request.
    c.send(
        format!(
            "CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    r.assert_error(405, "method_not_allowed", None);
    assert!(
        r.headers.get("allow").is_some_and(|a| a.contains("GET")),
        "{}",
        r.head
    );
    assert_eq!(r.headers.get("connection"), Some("close"), "{}", r.head);
    assert_eq!(c.closed().await, b"", "nothing after the 405");
    assert!(up.seen().is_empty(), "the upstream got a request");
}

#[tokio::test]
async fn absolute_form_request_is_routed_in_origin_form() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(format!("GET http://{HOST}/x?y=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    let seen = &up.seen()[0];
    assert_eq!(seen.target, "/x?y=1");
    assert_eq!(seen.headers.all("host"), [HOST]);
}

#[tokio::test]
async fn expect_100_continue() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "POST /expect HTTP/1.1\r\nHost: {HOST}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let interim = c.try_response(false).await.expect("an answer");
    assert_eq!(interim.status, 100, "{}", interim.head);
    assert_eq!(interim.head, "HTTP/1.1 100 Continue\r\n\r\n");
    c.send(b"hello").await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = &up.seen()[0];
    assert_eq!(seen.body, b"hello");
    assert_eq!(
        seen.headers.all("expect"),
        ["100-continue"],
        "{}",
        seen.head
    );
    assert_eq!(c.get("/next").await.text(), "/next");
}

#[tokio::test]
async fn http10_without_keep_alive_gets_one_response_then_close() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(format!("GET /ten HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, "HTTP/1.0", "{}", r.head);
    assert_eq!(r.text(), "/ten");
    assert_eq!(c.closed().await, b"");
    let seen = &up.seen()[0];
    assert_eq!(seen.version, "HTTP/1.1", "the upstream request is HTTP/1.1");
}

#[tokio::test]
async fn http10_with_keep_alive_stays_open() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for path in ["/ka1", "/ka2"] {
        c.send(
            format!("GET {path} HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let r = c.response().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version, "HTTP/1.0", "{}", r.head);
        assert_eq!(
            r.headers.get("connection"),
            Some("keep-alive"),
            "{}",
            r.head
        );
        assert_eq!(r.text(), path);
    }
    let seen = up.seen();
    assert!(!seen[0].headers.has("connection"), "{}", seen[0].head);
}

#[tokio::test]
async fn http10_client_never_gets_a_chunked_body() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
        )]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(format!("GET /u HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    // The whole chunked body came with the upstream's head, so it is passed on with
    // its length (a longer one streams, and an HTTP/1.0 client gets it delimited by
    // the connection's close).
    assert!(!r.chunked, "{}", r.head);
    assert_eq!(r.headers.get("content-length"), Some("3"), "{}", r.head);
    assert_eq!(r.text(), "abc");
}

// ---------------------------------------------------------------------------------------
// Upstream failures and gateway answers
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_dying_mid_body_truncates_and_closes_the_client() {
    let up = RawUpstream::start(|r| {
        if r.target == "/die" {
            vec![
                Step::Write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789".to_vec()),
                Step::Close,
            ]
        } else {
            vec![Step::Write(ok(b"fine"))]
        }
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(&get("/die")).await;
    let r = c
        .try_response(false)
        .await
        .expect("the head was on its way");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-length"), Some("1000"));
    assert!(!r.complete, "a truncated body must not look complete");
    assert_eq!(r.body, b"0123456789");
    assert_eq!(c.closed().await, b"");
    let mut c = Client::connect(&gw).await;
    assert_eq!(c.get("/ok").await.text(), "fine");
}

#[tokio::test]
async fn upstream_garbage_is_502_upstream_error() {
    let up = RawUpstream::start(|_| vec![Step::Write(b"SMTP READY\r\n\r\n".to_vec()), Step::Close])
        .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    for _ in 0..2 {
        let r = c.get("/g").await;
        r.assert_error(502, "upstream_error", Some("t1"));
        assert!(!r.chunked);
        assert_eq!(
            r.headers.get("content-length"),
            Some(&*r.body.len().to_string())
        );
    }
}

#[tokio::test]
async fn silent_upstream_is_504_after_request_timeout() {
    let up = RawUpstream::start(|_| vec![Step::Sleep(Duration::from_secs(60))]).await;
    let gw = gateway(&up, "request_timeout = \"300ms\"\n");
    let mut c = Client::connect(&gw).await;
    for _ in 0..2 {
        let r = c.get("/slow").await;
        r.assert_error(504, "upstream_timeout", Some("t1"));
    }
    assert_eq!(up.conns(), 2, "the timed-out connection is not reused");
}

/// A pooled upstream socket keeps its timer from one exchange to the next: each
/// exchange must still end at its own request's deadline, whether that is earlier
/// than the last one on the socket (another tenant's shorter timeout) or later.
#[tokio::test]
async fn a_reused_upstream_socket_times_out_at_each_requests_own_deadline() {
    let up = RawUpstream::start(|r| match r.target.as_str() {
        "/slow" => vec![Step::Sleep(Duration::from_secs(3600))],
        t => vec![Step::Write(ok(t.as_bytes()))],
    })
    .await;
    let gw = Gateway::start(&format!(
        "[server]\nworkers = 1\n\n[upstreams.u]\ntargets = [\"{}\"]\n\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\nrequest_timeout = \"3600s\"\n\n\
         [tenants.t2]\nhosts = [\"t2.example.com\"]\nupstream = \"u\"\nrequest_timeout = \"300ms\"\n",
        up.addr
    ));
    let mut c = Client::connect(&gw).await;
    let ask = |host: &str, path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    // First an hour's deadline on the socket, then a request whose deadline is earlier;
    // then, on a new socket (the timed-out one is not reused), a deadline and a later one.
    for (first, why) in [
        (
            HOST,
            "the shorter deadline ends the wait, not the socket's hour-long one",
        ),
        ("t2.example.com", "the later deadline still ends the wait"),
    ] {
        c.send(ask(first, "/fast").as_bytes()).await;
        assert_eq!(c.response().await.status, 200);
        c.send(ask("t2.example.com", "/slow").as_bytes()).await;
        let r = tokio::time::timeout(Duration::from_secs(30), c.response())
            .await
            .expect(why);
        r.assert_error(504, "upstream_timeout", Some("t2"));
    }
    let seen = up.seen();
    assert_eq!(
        seen.iter()
            .map(|s| (s.conn, s.target.as_str()))
            .collect::<Vec<_>>(),
        [(0, "/fast"), (0, "/slow"), (1, "/fast"), (1, "/slow")],
        "each /slow went out on the socket the /fast before it used"
    );
}

#[tokio::test]
async fn unknown_host_is_404_and_the_connection_stays_usable() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /who HTTP/1.1\r\nHost: nobody.example.org\r\n\r\n")
        .await;
    let r = c.response().await;
    r.assert_error(404, "unknown_tenant", None);
    assert!(
        r.head.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{}",
        r.head
    );
    let names = r.headers.sorted_names();
    assert_eq!(
        names,
        ["content-length", "content-type", "date", "x-request-id"],
        "{}",
        r.head
    );
    assert_eq!(c.get("/known").await.text(), "/known");
    assert_eq!(up.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Idle connections (parked between requests)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn idle_keep_alive_connections_serve_again_and_close_after_the_header_timeout() {
    let up = RawUpstream::echo().await;
    // 2 s: the first connection must outlast the first round plus the pause below on a
    // slow machine.
    let gw = Gateway::start(&format!(
        "[server]\nworkers = 1\nheader_read_timeout = \"2s\"\n\n[upstreams.u]\n\
         targets = [\"{}\"]\n\n[tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n",
        up.addr
    ));
    // Many connections each parked after one request (left idle for longer than the
    // 100 ms an answered connection keeps its task), then woken by a second one; the
    // third request comes at once, while the connection still has its task.
    let mut clients = Vec::new();
    for i in 0..50 {
        let mut c = Client::connect(&gw).await;
        assert_eq!(
            c.get(&format!("/first/{i}")).await.text(),
            format!("/first/{i}")
        );
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    for (i, c) in clients.iter_mut().enumerate() {
        for round in ["again", "soon"] {
            assert_eq!(
                c.get(&format!("/{round}/{i}")).await.text(),
                format!("/{round}/{i}")
            );
        }
    }
    // Left idle past header_read_timeout, each is closed by the gateway without a
    // response (the close arrives within the client's read timeout).
    for c in &mut clients {
        assert_eq!(c.closed().await, b"");
    }
    // A connection that never sent a byte is closed the same way.
    let mut silent = Client::connect(&gw).await;
    assert_eq!(silent.closed().await, b"");
}

// ---------------------------------------------------------------------------------------
// HTTP/2 clients: hyper serves the client, the fast path's exchange the upstream
// ---------------------------------------------------------------------------------------

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

struct H2Reply {
    status: u16,
    headers: http::HeaderMap,
    /// The body, or why it could not be read to its end.
    body: Result<Vec<u8>, String>,
}

impl H2Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(self.body.as_ref().expect("a whole body")).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends a bodiless request (END_STREAM on its HEADERS frame).
async fn h2_send(send: &mut H2, method: &str, path: &str) -> H2Reply {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{HOST}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    h2_exchange(send, req).await
}

/// Sends `req` and reads the whole reply, each step bounded by [`READ_TIMEOUT`].
async fn h2_exchange<B>(
    send: &mut hyper::client::conn::http2::SendRequest<B>,
    req: http::Request<B>,
) -> H2Reply
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let resp = tokio::time::timeout(READ_TIMEOUT, send.send_request(req))
        .await
        .expect("a response in time")
        .expect("a response");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(READ_TIMEOUT, body.collect())
        .await
        .expect("the body in time")
        .map(|b| b.to_bytes().to_vec())
        .map_err(|e| e.to_string());
    H2Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A chunked response whose body is `body` in chunks of `chunk` bytes.
fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for c in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn http2_client_gets_every_framing_of_a_raw_upstream_response() {
    let big = Arc::new(pattern(1 << 20));
    let big2 = big.clone();
    let up = RawUpstream::start(move |r| {
        let write = |b: &[u8]| vec![Step::Write(b.to_vec())];
        match (r.method.as_str(), r.target.as_str()) {
            ("HEAD", _) => write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (_, "/len") => write(&ok(b"hello")),
            (_, "/chunked") => write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: t\r\n\r\n"),
            (_, "/cl-te") => write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            (_, "/hop") => write(b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nX-Request-Id: theirs\r\ncontent-length: 2\r\n\r\nok"),
            (_, "/big") => {
                // Head and body in separate writes of 64 KiB: the body streams.
                let mut steps = write(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big2.len()).as_bytes());
                steps.extend(big2.chunks(64 * 1024).map(|c| Step::Write(c.to_vec())));
                steps
            }
            (_, "/big-chunked") => write(&chunked(&big2, 16 * 1024 + 7)),
            (_, "/ten-close") => {
                let mut out = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
                out.extend_from_slice(&big2[..100_000]);
                vec![Step::Write(out), Step::Close]
            }
            (_, "/no-content") => write(b"HTTP/1.1 204 No Content\r\n\r\n"),
            (_, "/interim") => write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx"),
            (_, path) => write(&ok(path.as_bytes())),
        }
    })
    .await;
    let gw = gateway(&up, "");
    let mut c: H2 = h2c(&gw).await;

    let r = h2_send(&mut c, "GET", "/len").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert_eq!(r.header("content-length"), Some("5"));
    assert!(r.header("x-request-id").is_some());
    let seen = &up.seen()[0];
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.headers.all("host"), [HOST]);
    assert_eq!(seen.headers.all("x-tenant-id"), ["t1"]);
    assert_eq!(
        seen.headers.all("x-request-id"),
        [r.header("x-request-id").unwrap()]
    );
    // The gateway's headers, each once: `Host` from the request's authority and
    // `x-forwarded-host` after it.
    assert_eq!(seen.headers.all("x-forwarded-host"), [HOST]);
    assert_eq!(seen.headers.all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.headers.all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(
        seen.headers.sorted_names(),
        [
            "host",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-request-id",
            "x-tenant-id"
        ],
        "{}",
        seen.head
    );

    // Chunked, extensions and trailers dropped; the length the upstream sent beside
    // its chunked body is not passed on (the client would stop after two bytes).
    let r = h2_send(&mut c, "GET", "/chunked").await;
    assert_eq!(r.text(), "abcde");
    let r = h2_send(&mut c, "GET", "/cl-te").await;
    assert_eq!(r.text(), "abc");
    assert_ne!(r.header("content-length"), Some("2"));

    let r = h2_send(&mut c, "GET", "/hop").await;
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("x-kept"), Some("yes"));
    for name in ["x-secret", "keep-alive", "connection"] {
        assert!(r.header(name).is_none(), "{name}");
    }
    assert_ne!(r.header("x-request-id"), Some("theirs"));

    // Bodies longer than the first read stream from the upstream socket.
    let r = h2_send(&mut c, "GET", "/big").await;
    assert_eq!(r.body.as_deref(), Ok(&big[..]));
    assert_eq!(r.header("content-length"), Some("1048576"));
    let r = h2_send(&mut c, "GET", "/big-chunked").await;
    assert_eq!(r.body.as_deref(), Ok(&big[..]));
    let r = h2_send(&mut c, "GET", "/ten-close").await;
    assert_eq!(r.body.as_deref(), Ok(&big[..100_000]));

    let r = h2_send(&mut c, "GET", "/no-content").await;
    assert_eq!((r.status, r.body.as_deref()), (204, Ok(&b""[..])));
    let r = h2_send(&mut c, "HEAD", "/len").await;
    assert_eq!((r.status, r.body.as_deref()), (200, Ok(&b""[..])));
    assert_eq!(r.header("content-length"), Some("5"));
    let r = h2_send(&mut c, "GET", "/interim").await;
    assert_eq!((r.status, r.text().as_str()), (200, "x"));

    // One upstream connection carried them all, except after the two responses that
    // end theirs: the length beside chunked (not trusted again) and the close.
    assert_eq!(up.conns(), 3);

    // Concurrent streams on the one client connection, each on its own upstream
    // connection; they all come back to the pool.
    let replies = futures_util::future::join_all((0..40).map(|i| {
        let mut c = c.clone();
        async move { h2_send(&mut c, "GET", &format!("/n{i}")).await }
    }))
    .await;
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.text(), format!("/n{i}"));
    }
    let after = up.conns();
    assert!(after <= 3 + 40, "{after}");
    for i in 0..20 {
        assert_eq!(
            h2_send(&mut c, "GET", &format!("/m{i}")).await.text(),
            format!("/m{i}")
        );
    }
    assert_eq!(
        up.conns(),
        after,
        "sequential requests reuse pooled connections"
    );
}

#[tokio::test]
async fn http2_client_gets_502_504_or_a_reset_stream_from_a_failing_raw_upstream() {
    let up = RawUpstream::start(|r| {
        let write = |b: &[u8]| Step::Write(b.to_vec());
        match r.target.as_str() {
            "/bad-chunk" => vec![write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            )],
            "/garbage" => vec![write(b"garbage\r\n\r\n")],
            "/101" => vec![write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            )],
            "/nothing" => vec![Step::Close],
            "/slow" => vec![Step::Sleep(Duration::from_secs(3)), write(&ok(b"late"))],
            "/dies" => vec![
                write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n0123456789"),
                Step::Sleep(Duration::from_millis(50)),
                Step::Close,
            ],
            "/dies-chunked" => vec![
                write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"),
                Step::Sleep(Duration::from_millis(50)),
                Step::Close,
            ],
            path => vec![write(&ok(path.as_bytes()))],
        }
    })
    .await;
    let gw = gateway(&up, "request_timeout = \"300ms\"\n");
    let mut c: H2 = h2c(&gw).await;
    for path in ["/bad-chunk", "/garbage", "/101", "/nothing"] {
        let r = h2_send(&mut c, "GET", path).await;
        assert_eq!(r.status, 502, "{path}");
        assert!(
            r.text().contains("\"upstream_error\""),
            "{path}: {}",
            r.text()
        );
        assert!(r.header("x-request-id").is_some(), "{path}");
        assert_eq!(
            h2_send(&mut c, "GET", "/ok").await.text(),
            "/ok",
            "after {path}"
        );
    }
    let r = h2_send(&mut c, "GET", "/slow").await;
    assert_eq!(r.status, 504);
    assert!(r.text().contains("\"upstream_timeout\""), "{}", r.text());
    // The head went out before the upstream died: the stream is reset, the client
    // never takes the partial body for the whole one; the connection carries on.
    for path in ["/dies", "/dies-chunked"] {
        let r = h2_send(&mut c, "GET", path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body.is_err(), "{path}: {:?}", r.body);
        assert_eq!(
            h2_send(&mut c, "GET", "/ok").await.text(),
            "/ok",
            "after {path}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies from HTTP/2 clients, over the fast path's upstream exchange
// ---------------------------------------------------------------------------------------

/// A request body the test feeds piece by piece, of no length known in advance.
struct Feed(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for Feed {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(http_body::Frame::data(b))))
    }
}

type AnyBody = http_body_util::Either<http_body_util::Full<bytes::Bytes>, Feed>;
type H2Any = hyper::client::conn::http2::SendRequest<AnyBody>;

/// Sends `body` (a whole one gets a `content-length` from hyper) and reads the reply.
async fn h2_post(send: &mut H2Any, path: &str, body: AnyBody) -> H2Reply {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{HOST}{path}"))
        .body(body)
        .unwrap();
    h2_exchange(send, req).await
}

fn whole(b: &[u8]) -> AnyBody {
    http_body_util::Either::Left(http_body_util::Full::new(bytes::Bytes::copy_from_slice(b)))
}

/// A fed body and the sender feeding it.
fn fed() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, AnyBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (tx, http_body_util::Either::Right(Feed(rx)))
}

#[tokio::test]
async fn http2_request_bodies_reach_a_raw_upstream_with_their_length_or_chunked() {
    let up = RawUpstream::start(|r| {
        let reply = match r.target.as_str() {
            "/cl-te" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
            _ => ok(format!("{} {}", r.target, r.body.len()).as_bytes()),
        };
        vec![Step::Write(reply)]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c: H2Any = h2c(&gw).await;

    // A whole body: its content-length goes with it.
    let small = pattern(1024);
    let r = h2_post(&mut c, "/small", whole(&small)).await;
    assert_eq!((r.status, r.text().as_str()), (200, "/small 1024"));
    let seen = up.seen().pop().unwrap();
    assert_eq!(
        seen.headers.all("content-length"),
        ["1024"],
        "{}",
        seen.head
    );
    assert!(!seen.chunked);
    assert_eq!(seen.body, small);
    assert_eq!(seen.headers.all("x-tenant-id"), ["t1"]);

    // Larger than what is sent with the head: the rest streams, byte-exact.
    let big = pattern(1 << 20);
    let r = h2_post(&mut c, "/big", whole(&big)).await;
    assert_eq!(r.text(), "/big 1048576");
    assert_eq!(up.seen().pop().unwrap().body, big);

    // No length known: chunked upstream, pieces as they come, some after the head.
    let (tx, body) = fed();
    let feeder = tokio::spawn(async move {
        for piece in pattern(200_000).chunks(30_000) {
            tx.send(bytes::Bytes::copy_from_slice(piece)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let r = h2_post(&mut c, "/fed", body).await;
    feeder.await.unwrap();
    assert_eq!(r.text(), "/fed 200000");
    let seen = up.seen().pop().unwrap();
    assert!(seen.chunked, "{}", seen.head);
    assert!(
        seen.headers.all("content-length").is_empty(),
        "{}",
        seen.head
    );
    assert_eq!(seen.body, pattern(200_000));

    // An empty fed body: a chunked body of no chunks.
    let (tx, body) = fed();
    drop(tx);
    let r = h2_post(&mut c, "/empty", body).await;
    assert_eq!(r.text(), "/empty 0");

    // The upstream's length beside chunked is not passed on (the client would stop
    // after two bytes): with hyper's client it was.
    let r = h2_post(&mut c, "/cl-te", whole(b"x")).await;
    assert_eq!(r.text(), "abc");
    assert_ne!(r.header("content-length"), Some("2"));

    // Every exchange left the upstream connection reusable, but the one that answered
    // with a length beside chunked.
    assert_eq!(up.conns(), 1);
    let r = h2_post(&mut c, "/after", whole(b"yz")).await;
    assert_eq!(r.text(), "/after 2");
    assert_eq!(up.conns(), 2);
}

#[tokio::test]
async fn http2_request_body_over_max_body_is_413_before_or_after_the_head_went_up() {
    let up = RawUpstream::start(|r| {
        vec![Step::Write(ok(
            format!("{} {}", r.target, r.body.len()).as_bytes()
        ))]
    })
    .await;
    let gw = gateway(&up, "[tenants.t1.limits]\nmax_body = 1024\n");
    let mut c: H2Any = h2c(&gw).await;

    // Declared too large: refused before anything goes upstream.
    let r = h2_post(&mut c, "/declared", whole(&pattern(2000))).await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains("\"body_too_large\""), "{}", r.text());

    assert_eq!(up.conns(), 0, "nothing reached the upstream");

    // Undeclared, crossing the limit at once (in what came with the head, or just
    // after it, depending on when the data frame arrives).
    let (tx, body) = fed();
    tx.send(bytes::Bytes::from(pattern(2000))).await.unwrap();
    let r = h2_post(&mut c, "/early", body).await;
    assert_eq!(r.status, 413);
    drop(tx);

    // Undeclared, crossing it after the head and a first piece went up: 413, and
    // that upstream connection (holding half a request) is not used again.
    let before = up.conns();
    let (tx, body) = fed();
    let conns = up.conns.clone();
    let feeder = tokio::spawn(async move {
        tx.send(bytes::Bytes::from(pattern(600))).await.unwrap();
        // The second piece only once the head (and the first) went up: the upstream
        // connection is open.
        for _ in 0..1000 {
            if conns.load(Ordering::SeqCst) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tx.send(bytes::Bytes::from(pattern(600))).await;
        // Held open: the gateway answers without waiting for the end.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let r = h2_post(&mut c, "/late", body).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert!(r.text().contains("\"body_too_large\""), "{}", r.text());
    assert_eq!(up.conns(), before + 1);
    feeder.abort();
    let r = h2_post(&mut c, "/next", whole(b"ok")).await;
    assert_eq!(r.text(), "/next 2");
    assert_eq!(
        up.conns(),
        before + 2,
        "the half-sent connection was dropped"
    );
    assert!(up.seen().iter().all(|s| s.target == "/next"));
}

#[tokio::test]
async fn upstream_answering_before_the_whole_body_is_relayed_and_not_reused() {
    // Answers a POST as soon as its head is in, reading nothing of the body (then
    // keeps reading and ignoring what comes); answers a GET normally.
    let conns = Arc::new(AtomicUsize::new(0));
    let conns2 = conns.clone();
    let addr = serve_tcp(move |stream: TcpStream| {
        conns2.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut wire = Wire::new(stream);
            while let Some(head) = wire.read_head().await {
                if head.starts_with(b"POST") {
                    let _ = wire
                        .stream
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope")
                        .await;
                    while wire.fill().await {
                        wire.buf.clear();
                    }
                    return;
                }
                let _ = wire.stream.write_all(&ok(b"fine")).await;
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "[server]\nworkers = 1\n\n[upstreams.u]\ntargets = [\"{addr}\"]\n\n\
         [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n"
    ));
    let mut c: H2Any = h2c(&gw).await;
    let (tx, body) = fed();
    tx.send(bytes::Bytes::from(pattern(1000))).await.unwrap();
    // The rest of the body never comes: the answer must not wait for it.
    let r = h2_post(&mut c, "/upload", body).await;
    assert_eq!((r.status, r.text().as_str()), (401, "nope"));
    drop(tx);
    // Were that connection pooled, this would be sent into the draining upstream
    // and never answered.
    let get = http::Request::builder()
        .uri(format!("http://{HOST}/after"))
        .body(whole(b""))
        .unwrap();
    let r = h2_exchange(&mut c, get).await;
    assert_eq!((r.status, r.text().as_str()), (200, "fine"));
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------
// Framing that `Connection` cannot take away (found by a request-smuggling sweep)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_content_length_named_in_connection_still_frames_the_request() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    // The body is a whole request of its own: were `Content-Length` removed and the
    // body still sent, the upstream would read it as a second request — one that
    // carries a tenant header of the client's choosing and was never checked.
    let smuggled = format!("GET /admin HTTP/1.1\r\nHost: {HOST}\r\nX-Tenant-Id: other\r\n\r\n");
    for connection in ["content-length", "close, content-length"] {
        let mut c = Client::connect(&gw).await;
        let mut req = format!(
            "POST /form HTTP/1.1\r\nHost: {HOST}\r\nConnection: {connection}\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        )
        .into_bytes();
        req.extend_from_slice(smuggled.as_bytes());
        c.send(&req).await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.body, b"/form");
        if connection == "content-length" {
            // Still keep-alive: the next request on the connection is its own.
            let r = c.get("/next").await;
            assert_eq!(r.body, b"/next", "{}", r.head);
        }
    }
    let seen = up.seen();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/form", "/next", "/form"]);
    for r in seen.iter().filter(|r| r.target == "/form") {
        assert_eq!(
            r.headers.get("content-length"),
            Some(smuggled.len().to_string().as_str()),
            "{}",
            r.head
        );
        assert_eq!(r.body, smuggled.as_bytes());
    }
}

#[tokio::test]
async fn a_content_length_named_in_connection_still_frames_the_response() {
    let up = RawUpstream::start(|r| {
        let body = r.target.as_bytes();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        vec![Step::Write(out)]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    // Without its length the client would read the first body to the connection's
    // end, the second response with it.
    for path in ["/one", "/two"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.headers.get("content-length"), Some("4"), "{}", r.head);
        assert_eq!(r.body, path.as_bytes());
    }
}

#[tokio::test]
async fn a_204_loses_its_content_length_and_a_status_under_100_is_502() {
    let up = RawUpstream::start(|r| {
        vec![Step::Write(if r.target == "/none" {
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 099 Weird\r\nContent-Length: 0\r\n\r\n".to_vec()
        })]
    })
    .await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    let r = c.get("/none").await;
    assert_eq!(r.status, 204, "{}", r.head);
    assert_eq!(r.headers.get("content-length"), None, "{}", r.head);
    let r = c.get("/weird").await;
    r.assert_error(502, "upstream_error", Some("t1"));
}

/// hyper's client (here with `BULKHEAD_H1=hyper`, as for every `https://` upstream):
/// an upstream response with both `Content-Length` and `Transfer-Encoding` is read as
/// chunked and reaches the client without the length; a 101 to a request that asked
/// for no upgrade is 502.
#[tokio::test]
async fn hyper_s_client_drops_a_length_beside_chunked_and_refuses_an_unasked_upgrade() {
    let up = RawUpstream::start(|r| {
        vec![Step::Write(match r.target.as_str() {
            "/short" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            "/long" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_vec(),
        })]
    })
    .await;
    let gw = Process::start_with_env(
        &format!(
            "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"{}\"]\n\
             [tenants.t1]\nhosts = [\"{HOST}\"]\nupstream = \"u\"\n",
            up.addr
        ),
        &[],
        &[("BULKHEAD_H1", "hyper")],
    );
    let mut c = Client::connect_to(gw.addr).await;
    for path in ["/short", "/long"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.complete, "{path}: {}", r.head);
        assert_eq!(r.headers.get("content-length"), None, "{}", r.head);
        assert_eq!(r.body, b"hello", "{path}");
    }
    let mut c = Client::connect_to(gw.addr).await;
    let r = c.get("/upgrade").await;
    r.assert_error(502, "upstream_error", Some("t1"));
}

#[tokio::test]
async fn after_a_hand_over_to_hyper_a_bad_head_still_gets_the_gateways_400() {
    let up = RawUpstream::echo().await;
    let gw = gateway(&up, "");
    let mut c = Client::connect(&gw).await;
    // A chunked body is hyper's to read: the connection is handed over with it, and
    // hyper serves the rest of the connection.
    c.send(
        format!(
            "POST /chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.status, 200);
    // A relative target on that connection: the gateway's JSON 400 (hyper's was empty).
    c.send(format!("GET t/acme/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c
        .try_response(false)
        .await
        .expect("an answer before the close");
    r.assert_error(400, "bad_request", None);
    assert_eq!(r.headers.get("connection"), Some("close"));
    assert_eq!(c.closed().await, b"");
    assert_eq!(up.seen().len(), 1);
}
