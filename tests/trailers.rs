//! Trailers across every pair of client and upstream protocol, through real sockets:
//! clients on HTTP/1.1 (plain: the fast path; TLS: hyper's server), h2c and h2 over
//! TLS (the gateway's HTTP/2 server); upstreams on `http://` and `https://` HTTP/1.1
//! (raw sockets that show the wire) and HTTP/2 over prior knowledge and TLS (hyper's
//! server). Each matrix test records what arrived in every cell and compares the
//! whole table, so a change in any cell shows the table.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::pki::{self, Ca};
use support::{serve_tcp, Gateway};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- HTTP/1.1 on the wire ----

/// A byte stream read line by line or by length.
struct Wire<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(s: S) -> Wire<S> {
        Wire { s, buf: Vec::new() }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// One line without its CRLF; `None` at the end of the stream.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// A start line and its fields (names lower-cased).
    async fn head(&mut self) -> Option<(String, Vec<(String, String)>)> {
        let start = self.line().await?;
        Some((start, self.fields().await?))
    }

    /// Field lines up to a blank line.
    async fn fields(&mut self) -> Option<Vec<(String, String)>> {
        let mut fields = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                return Some(fields);
            }
            let (n, v) = line.split_once(':')?;
            fields.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }

    /// A body framed by `fields`: (data, trailer fields, chunked?).
    async fn body(&mut self, fields: &[(String, String)]) -> Option<Message> {
        let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut data = Vec::new();
            loop {
                let size = self.line().await?;
                let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
                if size == 0 {
                    break;
                }
                data.extend(self.exact(size).await?);
                self.line().await?;
            }
            let trailers = self.fields().await?;
            return Some(Message {
                data,
                trailers,
                framing: "chunked",
            });
        }
        let len = get("content-length").map_or(0, |v| v.parse().unwrap());
        Some(Message {
            data: self.exact(len).await?,
            trailers: Vec::new(),
            framing: if get("content-length").is_some() {
                "length"
            } else {
                "none"
            },
        })
    }
}

/// What one side received of a message.
#[derive(Debug, Default, Clone)]
struct Message {
    data: Vec<u8>,
    trailers: Vec<(String, String)>,
    framing: &'static str,
}

impl Message {
    /// The cell of a table: the trailer fields that arrived, or `-`.
    fn cell(&self) -> String {
        if self.trailers.is_empty() {
            return "-".into();
        }
        let mut t: Vec<String> = self
            .trailers
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        t.sort();
        t.join(",")
    }
}

type Seen = Arc<Mutex<Vec<Message>>>;

/// The response every upstream sends: `pong`, chunked on HTTP/1.1 (declaring its
/// trailer, as RFC 9110 §6.6.2 asks), then the trailer `x-up: done`. On `/streamed`
/// the last chunk and the trailer section come in a write of their own, after the
/// gateway has had the head.
async fn serve_h1<S: AsyncRead + AsyncWrite + Unpin>(s: S, seen: Seen) {
    let mut w = Wire::new(s);
    while let Some((start, fields)) = w.head().await {
        let Some(msg) = w.body(&fields).await else {
            return;
        };
        seen.lock().unwrap().push(msg);
        let head =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-up\r\n\r\n4\r\npong\r\n";
        let end = b"0\r\nx-up: done\r\n\r\n";
        if start.contains("/streamed") {
            let _ = w.s.write_all(head).await;
            let _ = w.s.flush().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _ = w.s.write_all(end).await;
        } else {
            let _ = w.s.write_all(&[&head[..], &end[..]].concat()).await;
        }
        let _ = w.s.flush().await;
    }
}

type Frames =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn frames(data: &[u8], trailers: &[(&'static str, &'static str)]) -> Frames {
    let mut t = HeaderMap::new();
    for (n, v) in trailers {
        t.insert(*n, HeaderValue::from_static(v));
    }
    let frames = vec![
        Ok(Frame::data(Bytes::copy_from_slice(data))),
        Ok(Frame::trailers(t)),
    ];
    StreamBody::new(futures_util::stream::iter(frames))
}

fn fields_of(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    map.into_iter()
        .flatten()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect()
}

async fn serve_h2<S>(s: S, seen: Seen)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let framing = if req.headers().contains_key("content-length") {
                "length"
            } else {
                "none"
            };
            let got = req.into_body().collect().await.unwrap();
            seen.lock().unwrap().push(Message {
                trailers: fields_of(got.trailers()),
                data: got.to_bytes().to_vec(),
                framing,
            });
            Ok::<_, Infallible>(Response::new(frames(b"pong", &[("x-up", "done")])))
        }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(s), svc)
        .await;
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Up {
    H1,
    H1s,
    H2c,
    H2s,
}

const UPS: [Up; 4] = [Up::H1, Up::H1s, Up::H2c, Up::H2s];

impl Up {
    fn host(self) -> &'static str {
        match self {
            Up::H1 => "h1.test",
            Up::H1s => "h1s.test",
            Up::H2c => "h2c.test",
            Up::H2s => "h2s.test",
        }
    }
}

/// An upstream of kind `up`; what it received goes into the returned list.
async fn upstream(up: Up, tls: Arc<rustls::ServerConfig>) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let addr = serve_tcp(move |tcp| {
        let (seen, tls) = (s2.clone(), tls.clone());
        async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            match up {
                Up::H1 => serve_h1(tcp, seen).await,
                Up::H2c => serve_h2(tcp, seen).await,
                Up::H1s | Up::H2s => {
                    let Ok(s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if up == Up::H1s {
                        serve_h1(s, seen).await
                    } else {
                        serve_h2(s, seen).await
                    }
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// A gateway with a TLS listener and one tenant per upstream kind, and what each
/// upstream receives.
struct Setup {
    gw: Gateway,
    ca: Ca,
    seen: Vec<(Up, Seen)>,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let up_cert = ca.server("upstream", &["localhost"], 2);
        ca.server(
            "default",
            &["h1.test", "h1s.test", "h2c.test", "h2s.test"],
            3,
        );
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\ntls_listen = \"127.0.0.1:0\"\n[server.tls]\n\
             default_cert = \"{d}/default.pem\"\ndefault_key = \"{d}/default.key\"\n",
            d = dir.path().display()
        );
        let mut seen = Vec::new();
        for up in UPS {
            let alpn: &[u8] = if matches!(up, Up::H2c | Up::H2s) {
                b"h2"
            } else {
                b"http/1.1"
            };
            let (addr, s) = upstream(up, pki::server_config(&up_cert, &[alpn])).await;
            seen.push((up, s));
            let (target, protocol) = match up {
                Up::H1 => (format!("http://{addr}"), "http1"),
                Up::H1s => (format!("https://localhost:{}", addr.port()), "http1"),
                Up::H2c => (format!("http://{addr}"), "h2"),
                Up::H2s => (format!("https://localhost:{}", addr.port()), "h2"),
            };
            let name = up.host().trim_end_matches(".test");
            let ca_line = match up {
                Up::H1s | Up::H2s => format!("ca = \"{}\"\n", ca.path.display()),
                Up::H1 | Up::H2c => String::new(),
            };
            toml.push_str(&format!(
                "[upstreams.{name}]\ntargets = [\"{target}\"]\nprotocol = \"{protocol}\"\n\
                 {ca_line}[tenants.{name}]\nhosts = [\"{host}\"]\nupstream = \"{name}\"\n",
                host = up.host(),
            ));
        }
        let gw = Gateway::start(&toml);
        Setup {
            gw,
            ca,
            seen,
            _dir: dir,
        }
    }

    /// What upstream `up` received last.
    fn last(&self, up: Up) -> Message {
        let seen = &self.seen.iter().find(|(u, _)| *u == up).unwrap().1;
        seen.lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream got the request")
    }

    async fn tls(&self, up: Up, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
        let cfg = pki::client_config(&self.ca.pem, None, &[alpn]);
        pki::connect(self.gw.tls(), up.host(), cfg).await.unwrap().0
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Client {
    H1,
    H1s,
    H2c,
    H2s,
}

const CLIENTS: [Client; 4] = [Client::H1, Client::H1s, Client::H2c, Client::H2s];

/// One HTTP/1.1 exchange on `s`: `extra` header lines, a chunked body `ping` with the
/// trailer `x-req: t` when `trailed`; the response as it came on the wire.
async fn h1_exchange<S>(s: S, host: &str, path: &str, extra: &str, trailed: bool) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut w = Wire::new(s);
    let req = if trailed {
        format!(
            "POST {path} HTTP/1.1\r\nhost: {host}\r\n{extra}transfer-encoding: chunked\r\n\r\n\
             4\r\nping\r\n0\r\nx-req: t\r\n\r\n"
        )
    } else {
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n")
    };
    w.s.write_all(req.as_bytes()).await.unwrap();
    let (status, fields) = w.head().await.expect("a response head");
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {fields:?}");
    let msg = w.body(&fields).await.expect("a whole response body");
    assert_eq!(msg.data, b"pong");
    msg
}

/// One HTTP/2 exchange: a body `ping` with the trailer `x-req: t`, declaring its
/// length when `length`; the response's data and trailers.
async fn h2_exchange<S>(s: S, host: &str, path: &str, length: bool) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("https://{host}{path}"))
        .header("te", "trailers");
    if length {
        req = req.header("content-length", "4");
    }
    let req = req.body(frames(b"ping", &[("x-req", "t")])).unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap();
    Message {
        trailers: fields_of(got.trailers()),
        data: got.to_bytes().to_vec(),
        framing: "h2",
    }
}

/// How a client asks.
#[derive(Clone, Copy, Default)]
struct Ask {
    /// HTTP/1.1: `TE: trailers` (HTTP/2 clients always send it).
    te: bool,
    /// HTTP/1.1: a chunked body with a trailer (handed from the fast path to hyper),
    /// else a GET (HTTP/2 clients always send a body with a trailer).
    body: bool,
    /// HTTP/2: the body declares its `content-length`.
    length: bool,
}

impl Setup {
    /// `client` to upstream `up`: the response as the client got it.
    async fn exchange(&self, client: Client, up: Up, path: &str, ask: Ask) -> Message {
        let Ask { te, body, length } = ask;
        let host = up.host();
        let extra = if te {
            "te: trailers\r\nconnection: te\r\n"
        } else {
            ""
        };
        match client {
            Client::H1 => {
                let tcp = TcpStream::connect(self.gw.addr).await.unwrap();
                h1_exchange(tcp, host, path, extra, body).await
            }
            Client::H1s => {
                h1_exchange(self.tls(up, b"http/1.1").await, host, path, extra, body).await
            }
            Client::H2c => {
                let tcp = TcpStream::connect(self.gw.addr).await.unwrap();
                h2_exchange(tcp, host, path, length).await
            }
            Client::H2s => h2_exchange(self.tls(up, b"h2").await, host, path, length).await,
        }
    }
}

/// `rows` as a table, one line per client kind (and variant), one column per
/// upstream kind.
fn table(rows: &[(String, Vec<String>)]) -> String {
    let mut out = format!("{:<22}", "");
    for up in UPS {
        out.push_str(&format!("{:<18}", format!("{up:?}")));
    }
    for (name, cells) in rows {
        out.push_str(&format!("\n{name:<21} "));
        for c in cells {
            out.push_str(&format!("{c:<17} "));
        }
    }
    out
}

/// Compares a table with the one expected, word by word on each line.
fn assert_table(rows: &[(String, Vec<String>)], want: &str) {
    let got = table(rows);
    let words = |t: &str| -> Vec<Vec<String>> {
        t.lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| !l.is_empty())
            .collect()
    };
    assert_eq!(words(&got), words(want), "got:\n{got}\n");
}

/// Request trailers, client to upstream: a body `ping` and the trailer `x-req: t` from
/// every kind of client, to every kind of upstream; the cell is how the body went up
/// (`chunked`, `length`: HTTP/1.1; `none`: HTTP/2 without `content-length`) and the
/// trailer fields the upstream received (`-`: none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailer_matrix() {
    let s = Setup::start().await;
    let mut rows = Vec::new();
    for client in CLIENTS {
        let lengths: &[bool] = if matches!(client, Client::H2c | Client::H2s) {
            &[false, true]
        } else {
            &[false]
        };
        for &length in lengths {
            let mut cells = Vec::new();
            for up in UPS {
                let ask = Ask {
                    te: true,
                    body: true,
                    length,
                };
                s.exchange(client, up, "/req", ask).await;
                let got = s.last(up);
                assert_eq!(got.data, b"ping", "{client:?} -> {up:?}");
                cells.push(format!("{}:{}", got.framing, got.cell()));
            }
            let name = format!("{client:?}{}", if length { "+len" } else { "" });
            rows.push((name, cells));
        }
    }
    // README "Trailers" says why each `-` is one.
    assert_table(
        &rows,
        "
                              H1                H1s               H2c               H2s
        H1                    chunked:x-req=t   chunked:-         none:x-req=t      none:x-req=t
        H1s                   chunked:x-req=t   chunked:-         none:x-req=t      none:x-req=t
        H2c                   chunked:x-req=t   chunked:-         none:x-req=t      none:x-req=t
        H2c+len               length:-          length:-          length:x-req=t    length:x-req=t
        H2s                   chunked:x-req=t   chunked:-         none:x-req=t      none:x-req=t
        H2s+len               length:-          length:-          length:x-req=t    length:x-req=t
        ",
    );
}

/// Response trailers, upstream to client: every upstream answers `pong` with the
/// trailer `x-up: done` (on `/whole` in one write with the head, on `/streamed` in a
/// later one); the cell is how the body came (`chunked`, `length`: HTTP/1.1) and the
/// trailer fields the client received (`-`: none). HTTP/1.1 clients ask with and
/// without `TE: trailers`, by GET (the fast path on the plain listener) and by a
/// chunked POST (`+body`: handed to hyper's server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailer_matrix() {
    let s = Setup::start().await;
    let mut rows = Vec::new();
    for client in CLIENTS {
        let h1 = matches!(client, Client::H1 | Client::H1s);
        let asks: &[(Ask, &str)] = if h1 {
            &[
                (
                    Ask {
                        te: true,
                        body: false,
                        length: false,
                    },
                    "+te",
                ),
                (
                    Ask {
                        te: false,
                        body: false,
                        length: false,
                    },
                    "",
                ),
            ]
        } else {
            &[(
                Ask {
                    te: true,
                    body: true,
                    length: false,
                },
                "",
            )]
        };
        let with_body = (
            Ask {
                te: true,
                body: true,
                length: false,
            },
            "+te+body",
        );
        let asks = asks
            .iter()
            .chain((client == Client::H1).then_some(&with_body));
        for &(ask, label) in asks {
            for path in ["/whole", "/streamed"] {
                let mut cells = Vec::new();
                for up in UPS {
                    let got = s.exchange(client, up, path, ask).await;
                    cells.push(format!("{}:{}", got.framing, got.cell()));
                }
                rows.push((format!("{client:?}{label}{path}"), cells));
            }
        }
    }
    // README "Trailers" says why each `-` is one.
    assert_table(
        &rows,
        "
                              H1                H1s               H2c               H2s
        H1+te/whole           chunked:x-up=done chunked:-         chunked:-         chunked:-
        H1+te/streamed        chunked:x-up=done chunked:-         chunked:-         chunked:-
        H1/whole              chunked:-         chunked:-         chunked:-         chunked:-
        H1/streamed           chunked:-         chunked:-         chunked:-         chunked:-
        H1+te+body/whole      length:-          chunked:-         chunked:-         chunked:-
        H1+te+body/streamed   chunked:-         chunked:-         chunked:-         chunked:-
        H1s+te/whole          length:-          chunked:-         chunked:-         chunked:-
        H1s+te/streamed       chunked:-         chunked:-         chunked:-         chunked:-
        H1s/whole             length:-          chunked:-         chunked:-         chunked:-
        H1s/streamed          chunked:-         chunked:-         chunked:-         chunked:-
        H2c/whole             h2:x-up=done      h2:x-up=done      h2:x-up=done      h2:x-up=done
        H2c/streamed          h2:x-up=done      h2:x-up=done      h2:x-up=done      h2:x-up=done
        H2s/whole             h2:x-up=done      h2:x-up=done      h2:x-up=done      h2:x-up=done
        H2s/streamed          h2:x-up=done      h2:x-up=done      h2:x-up=done      h2:x-up=done
        ",
    );
}

/// An upstream's trailer section goes on without the fields that are hop-by-hop or
/// read from a head, to an HTTP/1.1 client on the fast path (which asked with
/// `TE: trailers`) and to an HTTP/2 client; both connections, and the upstream's,
/// carry the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_go_on_filtered_and_connections_stay_in_step() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    let up = serve_tcp(move |tcp| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut w = Wire::new(tcp);
            while let Some((_, fields)) = w.head().await {
                if w.body(&fields).await.is_none() {
                    return;
                }
                let resp =
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\npong\r\n0\r\n\
                    x-checksum: abc\r\ncontent-length: 9\r\nconnection: close\r\n\
                    set-cookie: a=b\r\nGrpc-Status: 0\r\n\r\n";
                if w.s.write_all(resp).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n\
         [upstreams.u]\ntargets = [\"{up}\"]\n[tenants.t]\nhosts = [\"t.test\"]\nupstream = \"u\"\n"
    ));
    let want = "grpc-status=0,x-checksum=abc";
    let mut w = Wire::new(TcpStream::connect(gw.addr).await.unwrap());
    for path in ["/one", "/two"] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: t.test\r\nte: trailers\r\n\r\n");
        w.s.write_all(req.as_bytes()).await.unwrap();
        let (status, fields) = w.head().await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let msg = w.body(&fields).await.unwrap();
        assert_eq!(msg.data, b"pong");
        assert_eq!(msg.cell(), want, "{path}");
    }
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in ["/three", "/four"] {
        let req = Request::get(format!("http://t.test{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let got = resp.into_body().collect().await.unwrap();
        let msg = Message {
            trailers: fields_of(got.trailers()),
            data: got.to_bytes().to_vec(),
            framing: "h2",
        };
        assert_eq!(msg.data, b"pong");
        assert_eq!(msg.cell(), want, "{path}");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "one upstream connection");
}
