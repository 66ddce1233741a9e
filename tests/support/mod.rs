//! Test harness: real upstream servers on `127.0.0.1:0`, a gateway started from a
//! TOML string (in process, or as the real binary), and small HTTP clients.
// Each test binary uses a different part of the harness; a panic here fails a test.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bulkhead::{Config, RunningGateway};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub mod pki;
pub mod raw_h2;
pub mod redis;

/// A deterministic byte pattern, so bodies can be checked byte for byte.
pub fn pattern_byte(i: u64) -> u8 {
    ((i.wrapping_mul(31).wrapping_add(7)) % 251) as u8
}

pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern_byte).collect()
}

/// FNV-1a over a body, to compare what was sent with what arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub fnv: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            len: 0,
            fnv: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Digest {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.fnv ^= u64::from(*b);
            self.fnv = self.fnv.wrapping_mul(0x0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }

    pub fn of(data: &[u8]) -> Digest {
        let mut d = Digest::default();
        d.update(data);
        d
    }
}

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Digest,
}

#[derive(Clone, Debug)]
pub enum Behavior {
    /// 200 with a small JSON naming the upstream; records the request.
    Echo,
    /// Answers with this status and an empty body.
    Status(u16),
    /// Waits, then answers like `Echo`.
    Slow(Duration),
    /// Sends `len` pattern bytes, with Content-Length or chunked.
    Bytes { len: u64, chunked: bool },
    /// Sends a head promising 1000 bytes, 10 of them, then closes.
    CloseMidBody,
    /// Replies with bytes that are not HTTP.
    Garbage,
}

/// A server on `127.0.0.1:0` that hands every connection it accepts to `conn`, each in
/// a task of its own; returns its address.
pub async fn serve_tcp<F, Fut>(conn: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(conn(stream));
            }
        }
    });
    addr
}

/// Reads a request head from `s` (a request without a body); false when the
/// connection ends first.
pub async fn read_request_head(s: &mut tokio::net::TcpStream) -> bool {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(s, &mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// An address on which connections are refused for as long as the guard lives: a
/// socket bound and not listening. (A port bound and let go could be taken by another
/// test's listener meanwhile; CI once saw a test gateway's 404 from the "dead" target.)
pub struct Refused(tokio::net::TcpSocket);

impl Refused {
    pub fn new() -> Refused {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Refused(s)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap()
    }
}

/// A real HTTP/1.1 upstream on `127.0.0.1:0`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start(name: &str, behavior: Behavior) -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (name2, seen2) = (name.to_owned(), seen.clone());
        let addr = serve_tcp(move |mut stream| {
            let (name, seen, behavior) = (name2.clone(), seen2.clone(), behavior.clone());
            async move {
                match behavior {
                    Behavior::Garbage => {
                        let mut buf = [0u8; 1024];
                        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                        let _ = stream.write_all(b"SMTP READY\r\n\r\n").await;
                        return;
                    }
                    Behavior::CloseMidBody => {
                        let mut buf = [0u8; 4096];
                        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                            .await;
                        return;
                    }
                    _ => {}
                }
                let svc =
                    service_fn(move |req| serve(req, name.clone(), seen.clone(), behavior.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        })
        .await;
        Upstream {
            addr,
            name: name.to_owned(),
            seen,
        }
    }

    pub async fn echo(name: &str) -> Upstream {
        Upstream::start(name, Behavior::Echo).await
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    req: Request<Incoming>,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    behavior: Behavior,
) -> Result<Response<PatternBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut digest = Digest::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    digest.update(d);
                }
            }
            Err(_) => break,
        }
    }
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string()),
        headers: parts.headers.clone(),
        body: digest,
    });
    let echo = |name: &str| {
        let text = serde_json::json!({
            "upstream": name,
            "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            "body_len": digest.len,
        })
        .to_string();
        Response::new(PatternBody::fixed(Bytes::from(text)))
    };
    Ok(match behavior {
        Behavior::Echo => echo(&name),
        Behavior::Slow(d) => {
            tokio::time::sleep(d).await;
            echo(&name)
        }
        Behavior::Status(s) => {
            let mut r = Response::new(PatternBody::fixed(Bytes::new()));
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            r
        }
        Behavior::Bytes { len, chunked } => Response::new(PatternBody::pattern(len, chunked)),
        Behavior::CloseMidBody | Behavior::Garbage => unreachable!(),
    })
}

/// A body of pattern bytes made on the fly (never held whole in memory), with a known
/// length (Content-Length) or not (chunked); or one fixed buffer.
pub struct PatternBody {
    pos: u64,
    len: u64,
    exact: bool,
    fixed: Option<Bytes>,
    chunk: u64,
}

impl PatternBody {
    pub fn pattern(len: u64, chunked: bool) -> PatternBody {
        PatternBody {
            pos: 0,
            len,
            exact: !chunked,
            fixed: None,
            chunk: 64 * 1024,
        }
    }

    /// Sent in frames of `chunk` bytes.
    pub fn chunked_by(len: u64, chunk: u64) -> PatternBody {
        PatternBody {
            chunk,
            ..PatternBody::pattern(len, true)
        }
    }

    pub fn fixed(b: Bytes) -> PatternBody {
        PatternBody {
            pos: 0,
            len: b.len() as u64,
            exact: true,
            fixed: Some(b),
            chunk: 64 * 1024,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(b) = this.fixed.take() {
            this.pos = this.len;
            return Poll::Ready(if b.is_empty() {
                None
            } else {
                Some(Ok(Frame::data(b)))
            });
        }
        if this.pos >= this.len {
            return Poll::Ready(None);
        }
        let n = (this.len - this.pos).min(this.chunk);
        let chunk: Vec<u8> = (this.pos..this.pos + n).map(pattern_byte).collect();
        this.pos += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.len && self.fixed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.len - self.pos.min(self.len))
        } else {
            SizeHint::default()
        }
    }
}

/// A gateway running in this process on `127.0.0.1:0`.
pub struct Gateway {
    pub running: Option<RunningGateway>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// `server.tls_listen`, when the config has one.
    pub tls: Option<SocketAddr>,
}

impl Gateway {
    /// Starts a gateway from a TOML string. `listen`/`admin_listen` default to port 0.
    pub fn start(toml: &str) -> Gateway {
        let text = with_test_listeners(toml);
        let config = Config::parse(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
        Gateway::run(config)
    }

    /// Starts a gateway from the config file at `path` (relative paths in it, such as
    /// certificate files, are taken from its directory).
    pub fn start_at(path: &Path) -> Gateway {
        let config = Config::load(path).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
        Gateway::run(config)
    }

    /// Writes `toml` (with test listeners, `write_config`) to `dir/gateway.toml` and
    /// starts a gateway from it, so that reloads have a real file to read.
    pub fn start_file(dir: &Path, toml: &str) -> (Gateway, std::path::PathBuf) {
        let path = dir.join("gateway.toml");
        write_config(&path, toml);
        (Gateway::start_at(&path), path)
    }

    fn run(config: Config) -> Gateway {
        let running = RunningGateway::start(config).expect("gateway starts");
        Gateway {
            addr: running.listen_addr,
            admin: running.admin_addr,
            tls: running.tls_addr,
            running: Some(running),
        }
    }

    /// The TLS listener's address; panics when the config has none.
    pub fn tls(&self) -> SocketAddr {
        self.tls.expect("the config has server.tls_listen")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            // Don't block the test runtime on the drain; the threads end by themselves.
            std::thread::spawn(move || r.wait());
        }
    }
}

// ---- reload and watcher tests (tests/reload.rs, tests/watch.rs) ----

/// Two upstreams `blue` and `green`; tenant acme uses `acme_up`, globex the default.
pub fn blue_green_config(acme_up: &str, blue: &Upstream, green: &Upstream) -> String {
    format!(
        r#"
[upstreams.blue]
targets = ["{}"]
[upstreams.green]
targets = ["{}"]

[defaults]
upstream = "blue"

[tenants.acme]
hosts = ["acme.example.com"]
upstream = "{acme_up}"

[tenants.globex]
hosts = ["globex.example.com"]
"#,
        blue.addr, green.addr
    )
}

/// Writes `toml` (with test listeners) to `path` in place, as `echo > file` does.
pub fn write_config(path: &Path, toml: &str) {
    std::fs::write(path, with_test_listeners(toml)).unwrap();
}

/// The state an in-process gateway shares with its reload and watcher.
pub fn shared(gw: &Gateway) -> Arc<bulkhead::server::Shared> {
    gw.running.as_ref().unwrap().shared.clone()
}

/// Which upstream answered a request for `host`; for any status but 200, the status
/// and body, so a comparison with an upstream's name fails saying what came instead.
pub async fn upstream_for(gw: SocketAddr, host: &str) -> String {
    let r = get(gw, "/", &[("host", host)]).await;
    if r.status != 200 {
        return format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body));
    }
    r.json()["upstream"].as_str().unwrap().to_owned()
}

/// Polls until `host` is served by `want`; panics after `deadline`.
pub async fn until_served_by(gw: SocketAddr, host: &str, want: &str, deadline: Duration) {
    let start = std::time::Instant::now();
    loop {
        let got = upstream_for(gw, host).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "{host} still served by {got:?}, not {want:?}, after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Adds `[server]` listen addresses on port 0 unless the TOML sets them.
pub fn with_test_listeners(toml: &str) -> String {
    if toml.contains("[server]") {
        let mut extra = String::new();
        // A line that sets the key itself: `tls_listen =` and `admin_listen =` are not
        // `listen =` (the gateway would bind its default, 0.0.0.0:8080).
        let sets = |key: &str| {
            toml.lines().any(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        if !sets("listen") {
            extra.push_str("listen = \"127.0.0.1:0\"\n");
        }
        if !sets("admin_listen") {
            extra.push_str("admin_listen = \"127.0.0.1:0\"\n");
        }
        toml.replacen("[server]\n", &format!("[server]\n{extra}"), 1)
    } else {
        format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\n{toml}")
    }
}

/// The bulkhead binary, started on a config file; its listen address is read from
/// its log.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The config file it was started on (in a temporary directory).
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn start(toml: &str) -> Process {
        Process::start_with_args(toml, &[])
    }

    /// Starts the binary on `toml` with extra command-line arguments.
    pub fn start_with_args(toml: &str, args: &[&str]) -> Process {
        Process::start_with_env(toml, args, &[])
    }

    /// Starts the binary with extra command-line arguments and environment variables.
    pub fn start_with_env(toml: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, with_test_listeners(toml)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args(["run", "--config"])
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bulkhead binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("bulkhead is serving") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the gateway logs its listen address");
        let field = |name: &str| -> SocketAddr {
            if line.starts_with('{') {
                // log_format = "json"
                let j: serde_json::Value = serde_json::from_str(&line).unwrap();
                return j["fields"][name].as_str().unwrap().parse().unwrap();
            }
            let start = line.find(&format!(" {name}=")).unwrap() + name.len() + 2;
            line[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Process {
            addr: field("listen"),
            admin: field("admin"),
            child,
            log,
            path,
            _dir: dir,
        }
    }

    /// Waits (up to 5 s) until a log line contains every one of `parts`; returns it.
    pub async fn log_line(&self, parts: &[&str]) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(l) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no log line with {parts:?} in:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Peak resident memory (VmHWM) and current (VmRSS), in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let get = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (get("VmHWM:"), get("VmRSS:"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read whole.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a GET with these headers to the gateway over HTTP/1.1.
pub async fn get(gw: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(gw, "GET", path, headers, Bytes::new()).await
}

pub async fn send(
    gw: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{gw}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(Full::new(body)).unwrap())
        .await
        .expect("the gateway answers");
    read(resp).await
}

pub async fn read<B>(resp: Response<B>) -> Reply
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Asserts the gateway's own JSON error body.
pub fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(
        r.status,
        status,
        "body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["error"], code, "{j}");
    assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
    assert_eq!(
        j["request_id"].as_str(),
        r.header("x-request-id"),
        "the body's request id is the header's"
    );
    assert!(j.get("tenant").is_some(), "{j}");
}

/// Makes a FIFO (named pipe) at `path` with `mkfifo`, as an operator would.
pub fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Runs `bulkhead check` (plus `args`) on `text` written to a temporary gateway.toml.
/// Returns the exit code, stdout, and stderr with the file's path replaced by `PATH`.
pub fn run_check(text: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["check", "--config"])
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(path.to_str().unwrap(), "PATH"),
    )
}

/// hyper's HTTP/2 client over prior knowledge (h2c) to the gateway's plain listener.
pub async fn h2c<B>(gw: &Gateway) -> hyper::client::conn::http2::SendRequest<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    h2c_at(gw.addr).await.0
}

/// [`h2c`] to any address; the connection's task is returned too (aborting it closes
/// the connection).
pub async fn h2c_at<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<()>,
)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

/// Requests of `tenant` in flight now (`bulkhead_in_flight`), read from the gateway.
pub fn in_flight(gw: &Gateway, tenant: &str) -> u64 {
    let snap = gw.running.as_ref().unwrap().shared.snapshot.load();
    snap.tenant(snap.tenant_by_id(tenant).unwrap())
        .stats
        .in_flight()
}

/// Waits (10 s at most, then fails saying `what`) until `tenant` has nothing in flight.
pub async fn wait_in_flight_zero(gw: &Gateway, tenant: &str, what: &str) {
    let t0 = std::time::Instant::now();
    while in_flight(gw, tenant) != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: in-flight count stuck at {}",
            in_flight(gw, tenant)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
