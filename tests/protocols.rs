//! WebSocket tunnels, HTTP/2 (gRPC-style) upstreams with trailers, and https://
//! upstreams, through real sockets: tokio-tungstenite on both ends of the tunnel,
//! hyper HTTP/2 servers and clients, rustls on both sides of TLS.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::pki::{self, Ca};
use support::{assert_error, get, serve_tcp, Gateway};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server; records the handshake request headers it saw.
#[allow(clippy::result_large_err)] // the callback type is tungstenite's
async fn ws_echo() -> (SocketAddr, Arc<Mutex<Vec<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let addr = serve_tcp(move |tcp| {
        let seen = seen2.clone();
        async move {
            let record = |req: &WsRequest, resp: WsResponse| {
                seen.lock().unwrap().push(req.headers().clone());
                Ok(resp)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() || ws.send(msg).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// Sends `n` messages through `ws` and checks each echo.
async fn round_trips<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, n: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..n {
        let text = format!("message {i} {}", "x".repeat(i % 200));
        ws.send(Message::text(text.clone())).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
            other => panic!("message {i}: {other:?}"),
        }
    }
}

fn ws_request(url: &str, host: &str) -> http::Request<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("host", HeaderValue::from_str(host).unwrap());
    req.headers_mut()
        .insert("x-tenant-id", HeaderValue::from_static("forged"));
    req
}

/// A gateway whose one tenant, `chat.test`, goes to the WebSocket server at `ws_addr`
/// with one request in flight at most; `server` is put in `[server]`.
fn chat_gateway(ws_addr: SocketAddr, server: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[server]
{server}
[upstreams.ws]
targets = ["{ws_addr}"]
[tenants.chat]
hosts = ["chat.test"]
upstream = "ws"
[tenants.chat.limits]
max_in_flight = 1
"#
    ))
}

/// A WebSocket to `chat.test` through the gateway's plain listener.
async fn connect_ws(
    gw: &Gateway,
) -> (
    tokio_tungstenite::WebSocketStream<TcpStream>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    tokio_tungstenite::client_async(
        ws_request(&format!("ws://{}/socket", gw.addr), "chat.test"),
        tcp,
    )
    .await
    .expect("the gateway upgrades the connection")
}

// ---- acceptance 6: WebSocket over the plain and the TLS listener ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_round_trips_a_thousand_messages_and_holds_an_in_flight_slot() {
    let (ws_addr, seen) = ws_echo().await;
    let gw = chat_gateway(ws_addr, "");
    let (mut ws, resp) = connect_ws(&gw).await;
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("x-request-id"));
    round_trips(&mut ws, 1000).await;

    // The upstream saw the upgrade, and the tenant id from the gateway only.
    let h = seen.lock().unwrap()[0].clone();
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(
        h.get_all("x-tenant-id").iter().collect::<Vec<_>>(),
        ["chat"]
    );

    // The open tunnel holds the tenant's only in-flight slot.
    assert_error(
        &get(gw.addr, "/", &[("host", "chat.test")]).await,
        503,
        "too_many_in_flight",
    );
    ws.close(None).await.unwrap();
    drop(ws);
    let start = Instant::now();
    loop {
        let r = get(gw.addr, "/", &[("host", "chat.test")]).await;
        // The slot is free again: the request reaches the (WebSocket-only) upstream,
        // which refuses a plain GET.
        if r.status != 503 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the tunnel's slot was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The tunnel is counted in the tenant's metrics.
    let m = get(gw.admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains(r#"bulkhead_requests_total{tenant="chat",status="101"} 1"#)
            || text.contains(r#"bulkhead_requests_total{status="101",tenant="chat"} 1"#),
        "{}",
        text.lines()
            .filter(|l| l.contains("requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    ca.server("default", &["chat.test"], 7);
    let (ws_addr, _) = ws_echo().await;
    let (gw, _) = Gateway::start_file(
        dir.path(),
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
tls_listen = "127.0.0.1:0"
[server.tls]
default_cert = "default.pem"
default_key = "default.key"
[upstreams.ws]
targets = ["{ws_addr}"]
[tenants.chat]
hosts = ["chat.test"]
upstream = "ws"
"#
        ),
    );
    let cfg = pki::client_config(&ca.pem, None, &[b"http/1.1"]);
    let (tls, _) = pki::connect(gw.tls(), "chat.test", cfg).await.unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async(ws_request("wss://chat.test/socket", "chat.test"), tls)
            .await
            .expect("the gateway upgrades the TLS connection");
    assert_eq!(resp.status(), 101);
    round_trips(&mut ws, 1000).await;
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_tunnel_is_closed_and_frees_its_slot() {
    let (ws_addr, _) = ws_echo().await;
    let gw = chat_gateway(ws_addr, "tunnel_idle_timeout = \"1s\"");
    let (mut ws, _) = connect_ws(&gw).await;
    // Busy for 2.5 times the timeout: a message every 100 ms keeps it open.
    let busy = Instant::now();
    let mut last_echo = busy;
    while busy.elapsed() < Duration::from_millis(2500) {
        round_trips(&mut ws, 1).await;
        last_echo = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_error(
        &get(gw.addr, "/", &[("host", "chat.test")]).await,
        503,
        "too_many_in_flight",
    );
    // Then quiet: the gateway closes both sides and the slot is free again.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the idle tunnel was not closed within 10 s");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "no message was sent: {end:?}"
    );
    // Not before the timeout: the last byte crossed the gateway just before the echo
    // arrived here (loopback), so allow 100 ms for that.
    assert!(
        last_echo.elapsed() >= Duration::from_millis(900),
        "closed {:?} after the last message, before the 1 s timeout",
        last_echo.elapsed()
    );
    let r = get(gw.addr, "/", &[("host", "chat.test")]).await;
    assert_ne!(r.status, 503, "the tunnel's slot is free");
}

// ---- acceptance 7: gRPC-style HTTP/2 with trailers ----

type GrpcBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// An HTTP/2 server (prior knowledge, or TLS with ALPN h2 when `tls` is given) that
/// answers like a gRPC service: the request body echoed back, then trailers.
async fn grpc_upstream(
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, Arc<Mutex<Vec<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let addr = serve_tcp(move |tcp| {
        let seen = seen2.clone();
        let tls = tls.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(req.headers().clone());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    trailers.insert("grpc-message", HeaderValue::from_static("all%20good"));
                    let frames = vec![Ok(Frame::data(body)), Ok(Frame::trailers(trailers))];
                    let mut resp: Response<GrpcBody> =
                        Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                    resp.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            match tls {
                Some(cfg) => {
                    let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                        return;
                    };
                    let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// A gRPC-style call over HTTP/2 prior knowledge to the gateway: (status, data,
/// trailers).
async fn grpc_call(gw: SocketAddr, host: &str, payload: &[u8]) -> (u16, Bytes, Option<HeaderMap>) {
    let tcp = TcpStream::connect(gw).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{host}/echo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::copy_from_slice(payload)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, collected.to_bytes(), trailers)
}

/// A length-prefixed gRPC message.
fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_http2_passes_trailers_through() {
    let (h2c, seen) = grpc_upstream(None).await;
    let gw = Gateway::start(&format!(
        r#"
[upstreams.grpc]
targets = ["{h2c}"]
protocol = "h2"
[tenants.acme]
hosts = ["acme.test"]
upstream = "grpc"
"#
    ));
    let payload = grpc_frame(b"hello over h2");
    for _ in 0..3 {
        let (status, data, trailers) = grpc_call(gw.addr, "acme.test", &payload).await;
        assert_eq!(status, 200);
        assert_eq!(&data[..], &payload[..]);
        let trailers = trailers.expect("the upstream's trailers reach the client");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "all%20good");
    }
    let h = seen.lock().unwrap()[0].clone();
    assert_eq!(h["te"], "trailers", "gRPC needs te: trailers upstream");
    assert_eq!(h["x-tenant-id"], "acme");
    assert_eq!(h["content-type"], "application/grpc");
}

/// A client's request trailers reach an HTTP/2 upstream, but never a field the
/// gateway sets or guards (a client's `x-tenant-id` in a trailer went through as
/// sent), nor one framing or authentication read from the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_an_http2_upstream_without_the_gateways_own_fields() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let h2c = serve_tcp(move |tcp| {
        let seen = seen2.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let collected = req.into_body().collect().await.unwrap();
                    seen.lock().unwrap().push(collected.trailers().cloned());
                    Ok::<_, Infallible>(Response::new(Full::new(collected.to_bytes())))
                }
            });
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        r#"
[upstreams.grpc]
targets = ["{h2c}"]
protocol = "h2"
[tenants.acme]
hosts = ["acme.test"]
upstream = "grpc"
"#
    ));
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("sha256=1"));
    trailers.insert("x-tenant-id", HeaderValue::from_static("evil"));
    trailers.insert("x_tenant_id", HeaderValue::from_static("evil"));
    trailers.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9"));
    trailers.insert("authorization", HeaderValue::from_static("Bearer x"));
    let frames: Vec<Result<_, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::builder()
        .method("POST")
        .uri("http://acme.test/upload")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp: Response<Incoming> = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"payload");
    let got = seen.lock().unwrap()[0]
        .clone()
        .expect("a trailer section upstream");
    let names: Vec<&str> = got.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-checksum"], "{got:?}");
    assert_eq!(got["x-checksum"], "sha256=1");
}

/// An HTTP/2 upstream that refuses a stream (REFUSED_STREAM: RFC 9113 §8.7, not
/// processed) gets the request again on a new connection, whatever its method and
/// body (what had gone of it, then the rest), instead of a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http2_stream_is_sent_again_with_its_body() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Every other stream is refused, starting with the first.
    let streams = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (streams2, conns2) = (streams.clone(), conns.clone());
    let up = serve_tcp(move |tcp| {
        let streams = streams2.clone();
        conns2.fetch_add(1, Ordering::SeqCst);
        async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if streams.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                tokio::spawn(async move {
                    let head = format!("{} {} ", req.method(), req.uri().path());
                    let mut body = req.into_body();
                    let mut got = head.into_bytes();
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        got.extend_from_slice(&data);
                    }
                    let resp = Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut send) = respond.send_response(resp, false) {
                        let _ = send.send_data(Bytes::from(got), true);
                    }
                });
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        r#"
[server]
workers = 1
[upstreams.h2]
targets = ["{up}"]
protocol = "h2"
[tenants.acme]
hosts = ["acme.test"]
upstream = "h2"
"#
    ));
    let r = get(gw.addr, "/first", &[("host", "acme.test")]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..], b"GET /first ");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "sent again on a new connection"
    );
    let r = support::send(
        gw.addr,
        "DELETE",
        "/second",
        &[("host", "acme.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..], b"DELETE /second ");
    assert_eq!(streams.load(Ordering::SeqCst), 4);

    // A gRPC-style call: its body arrives with its head, and goes again whole.
    let payload = grpc_frame(b"hello again");
    let (status, data, _) = grpc_call(gw.addr, "acme.test", &payload).await;
    assert_eq!(status, 200, "{:?}", String::from_utf8_lossy(&data));
    let mut want = b"POST /echo.Echo/Say ".to_vec();
    want.extend_from_slice(&payload);
    assert_eq!(&data[..], &want[..]);
    assert_eq!(streams.load(Ordering::SeqCst), 6);

    // A body still coming when the stream is refused: what went is sent again, and
    // the rest follows on the new stream.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tx.send(Ok(Frame::data(Bytes::from_static(b"first part, "))))
        .await
        .unwrap();
    let req = Request::builder()
        .method("POST")
        .uri("http://acme.test/streaming")
        .body(StreamBody::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
        ))))
        .unwrap();
    let pending = tokio::spawn(async move { send.send_request(req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"second part"))))
        .await
        .unwrap();
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"POST /streaming first part, second part");
    assert_eq!(streams.load(Ordering::SeqCst), 8);
}

// ---- upstream TLS ----

/// An HTTP/1.1 echo upstream over TLS.
async fn https_echo(cfg: Arc<rustls::ServerConfig>) -> SocketAddr {
    serve_tcp(move |tcp| {
        let cfg = cfg.clone();
        async move {
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
            let svc = service_fn(move |_req: Request<Incoming>| {
                let body = serde_json::json!({"upstream": "tls-echo", "sni": sni}).to_string();
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        }
    })
    .await
}

/// A 204 from an `https://` upstream that names a length (and sends that many bytes)
/// reaches clients without it: RFC 9110 §8.6 forbids it, and HTTP/2 clients (curl's
/// nghttp2) reset the stream over it — the fast path already left it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_204_with_a_length_from_an_https_upstream_reaches_http2_clients_without_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "upstream-ca");
    let cert = ca.server("backend", &["localhost"], 5);
    let cfg = pki::server_config(&cert, &[b"http/1.1"]);
    let up = serve_tcp(move |tcp| {
        let cfg = cfg.clone();
        async move {
            let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tls
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello")
                .await;
            let _ = tls.read(&mut buf).await;
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        r#"
[upstreams.tls]
targets = ["https://localhost:{}"]
ca = "{}"
[tenants.acme]
hosts = ["acme.test"]
upstream = "tls"
"#,
        up.port(),
        ca.path.display()
    ));
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .args([
            "-H",
            "host: acme.test",
            &format!("http://{}/nothing", gw.addr),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        out.status.success(),
        "{head}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(head.starts_with("http/2 204"), "{head}");
    assert!(head.contains("x-up: 1"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_their_ca_with_sni() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "upstream-ca");
    let cert = ca.server("backend", &["localhost"], 5);
    let other_ca = Ca::new(dir.path(), "other-ca");
    let h1 = https_echo(pki::server_config(&cert, &[b"http/1.1"])).await;
    let (h2, seen) = grpc_upstream(Some(pki::server_config(&cert, &[b"h2"]))).await;
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
# One worker, one pool: "wrongca" must not reuse the connection "good" verified.
workers = 1
[upstreams.good]
targets = ["https://localhost:{p1}"]
ca = "{ca}"
[upstreams.wrongca]
targets = ["https://localhost:{p1}"]
ca = "{other}"
[upstreams.insecure]
targets = ["https://localhost:{p1}"]
tls_insecure_skip_verify = true
[upstreams.grpctls]
targets = ["https://localhost:{p2}"]
protocol = "h2"
ca = "{ca}"
[tenants.good]
hosts = ["good.test"]
upstream = "good"
[tenants.wrongca]
hosts = ["wrongca.test"]
upstream = "wrongca"
[tenants.insecure]
hosts = ["insecure.test"]
upstream = "insecure"
[tenants.grpc]
hosts = ["grpc.test"]
upstream = "grpctls"
"#,
        p1 = h1.port(),
        p2 = h2.port(),
        ca = ca.path.display(),
        other = other_ca.path.display(),
    );
    let (gw, _) = Gateway::start_file(dir.path(), &toml);

    let r = get(gw.addr, "/", &[("host", "good.test")]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["sni"], "localhost", "SNI is the target's host");
    assert_error(
        &get(gw.addr, "/", &[("host", "wrongca.test")]).await,
        502,
        "upstream_error",
    );
    assert_eq!(
        get(gw.addr, "/", &[("host", "insecure.test")]).await.status,
        200
    );

    let payload = grpc_frame(b"over TLS");
    let (status, data, trailers) = grpc_call(gw.addr, "grpc.test", &payload).await;
    assert_eq!(status, 200);
    assert_eq!(&data[..], &payload[..]);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn check_warns_about_insecure_upstreams_and_rejects_ca_on_plain_targets() {
    let (code, _, err) = support::run_check(
        "[upstreams.u]\ntargets = [\"http://127.0.0.1:9\"]\ntls_insecure_skip_verify = true\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:3:28:") && err.contains("https:// targets only"),
        "{err}"
    );
    let (code, out, err) = support::run_check(
        "[upstreams.u]\ntargets = [\"https://127.0.0.1:9\"]\ntls_insecure_skip_verify = true\n",
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        format!("{out}{err}").contains("tls_insecure_skip_verify"),
        "check warns: {out}{err}"
    );
    let (code, _, err) = support::run_check(
        "[upstreams.u]\ntargets = [\"https://a:1\", \"http://b:2\"]\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("mixes http and https"), "{err}");
}

/// A WebSocket's access-log line is written when its tunnel closes, with the bytes
/// that crossed it each way and the tunnel's life as its duration; the tenant's body
/// byte counters count them too. Before, the line came at the 101 with 0 and 0.
#[tokio::test]
async fn a_websocket_is_logged_when_it_closes_with_its_bytes() {
    let (ws_addr, _) = ws_echo().await;
    let gw = support::Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.ws]\ntargets = [\"{ws_addr}\"]\n\
         [tenants.chat]\nhosts = [\"chat.test\"]\nupstream = \"ws\"\n"
    ));
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut req = ws_request(&format!("ws://{}/socket", gw.addr), "chat.test");
    req.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("ws-1"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    round_trips(&mut ws, 10).await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let line = gw.log_line(&["access:", "ws-1"]).await;
    assert!(line.contains("status=101"), "{line}");
    let field = |name: &str| -> u64 {
        let at = line.find(&format!(" {name}=")).unwrap() + name.len() + 2;
        line[at..].split(' ').next().unwrap().parse().unwrap()
    };
    // Ten messages of 9–19 bytes each way (masked from the client: 6 bytes of frame
    // head each; 2 back), and the close frames.
    assert!(field("bytes_in") >= 10 * 15, "{line}");
    assert!(field("bytes_out") >= 10 * 11, "{line}");
    let metrics = String::from_utf8_lossy(&get(gw.admin, "/metrics", &[]).await.body).into_owned();
    let counter = |name: &str| -> u64 {
        let key = format!("bulkhead_{name}{{tenant=\"chat\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(
        counter("request_body_bytes_total"),
        field("bytes_in"),
        "{metrics}"
    );
    assert_eq!(
        counter("response_body_bytes_total"),
        field("bytes_out"),
        "{metrics}"
    );
}

// ---- upstream response-head limits ----

/// A response of `path`: `/fields/N` has N header fields (its `content-length` among
/// them), `/head/N` a head of exactly N bytes (status line and empty line included).
fn sized_response(path: &str) -> Vec<u8> {
    let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    if let Some(n) = path.strip_prefix("/fields/") {
        for i in 1..n.parse::<usize>().unwrap() {
            head.extend_from_slice(format!("x-f{i}: v\r\n").as_bytes());
        }
    } else if let Some(n) = path.strip_prefix("/head/") {
        let total: usize = n.parse().unwrap();
        let mut i = 0;
        // Lines of `x-pNNN: aaa…\r\n`, 8,000 bytes but the last, which is longer than
        // 8,000 only when what is left would not hold a line at all.
        while total - head.len() - 2 > 0 {
            let left = total - head.len() - 2;
            let len = if left < 16_000 { left } else { 8_000 };
            head.extend_from_slice(format!("x-p{i:03}: ").as_bytes());
            head.resize(head.len() + len - 10, b'a');
            head.extend_from_slice(b"\r\n");
            i += 1;
        }
    }
    head.extend_from_slice(b"\r\nok");
    head
}

/// Answers each request head read from `s` with `answer(path)`, on a plain or TLS
/// connection, until the client closes or a write fails.
async fn serve_heads<S, F>(mut s: S, answer: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: Fn(&str) -> Vec<u8>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).into_owned();
        got.drain(..end + 4);
        let path = head.split(' ').nth(1).unwrap_or("/");
        if s.write_all(&answer(path)).await.is_err() {
            return;
        }
    }
}

/// Serves [`sized_response`]s on a plain or TLS connection, one per request head.
async fn serve_sized<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: S) {
    serve_heads(s, sized_response).await;
}

/// The status curl gets for `url` (`--http2-prior-knowledge` when `h2c`).
fn curl_status(url: &str, host: &str, h2c: bool) -> String {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("host: {host}"));
    if h2c {
        cmd.arg("--http2-prior-knowledge");
    }
    let out = cmd.arg(url).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An upstream's response head is held to the same limits on every path — 64 KiB and
/// 128 header fields (README) — whether the gateway's own exchange reads it (plain
/// `http://` targets, from HTTP/1.1 and HTTP/2 clients) or hyper's client (`https://`
/// targets, HTTP/2 upstreams): hyper's defaults (100 fields and ~400 KiB for
/// HTTP/1.1, a 16 KiB header list for HTTP/2) had a head one path passed on answered
/// 502 by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_response_head_has_the_same_limits_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "upstream-ca");
    let cert = ca.server("backend", &["localhost"], 5);
    let cfg = pki::server_config(&cert, &[b"http/1.1"]);
    let plain = serve_tcp(serve_sized).await;
    let tls = serve_tcp(move |tcp| {
        let cfg = cfg.clone();
        async move {
            if let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                serve_sized(tls).await;
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        r#"
[upstreams.plain]
targets = ["{plain}"]
[upstreams.tls]
targets = ["https://localhost:{}"]
ca = "{}"
[tenants.plain]
hosts = ["plain.test"]
upstream = "plain"
[tenants.tls]
hosts = ["tls.test"]
upstream = "tls"
"#,
        tls.port(),
        ca.path.display()
    ));
    for (path, want) in [
        ("/fields/100", "200"),
        ("/fields/128", "200"),
        ("/fields/129", "502"),
        ("/head/65536", "200"),
        ("/head/65537", "502"),
        ("/head/100000", "502"),
    ] {
        let mut got = Vec::new();
        for (host, h2c) in [
            ("plain.test", false),
            ("plain.test", true),
            ("tls.test", false),
            ("tls.test", true),
        ] {
            let status = curl_status(&format!("http://{}{path}", gw.addr), host, h2c);
            got.push(format!("{host} h2c={h2c}: {status}"));
        }
        assert!(
            got.iter().all(|g| g.ends_with(want)),
            "{path}: want {want} on every path, got {got:?}"
        );
    }

    // An HTTP/2 upstream's head to the same size, as HTTP/2 counts a header list
    // (hyper's client default was 16 KiB: a 32 KiB head was a 502 there only).
    let h2 = serve_tcp(|tcp| async move {
        let svc = service_fn(|req: Request<Incoming>| async move {
            let n: usize = req
                .uri()
                .path()
                .strip_prefix("/big/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
            let value = HeaderValue::from_str(&"a".repeat(n)).unwrap();
            resp.headers_mut().insert("x-big", value);
            Ok::<_, Infallible>(resp)
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    })
    .await;
    let gw = Gateway::start(&format!(
        "[upstreams.h2]\ntargets = [\"{h2}\"]\nprotocol = \"h2\"\n\
         [tenants.h2]\nhosts = [\"h2.test\"]\nupstream = \"h2\"\n"
    ));
    for (path, want) in [("/big/32000", "200"), ("/big/100000", "502")] {
        let status = curl_status(&format!("http://{}{path}", gw.addr), "h2.test", false);
        assert_eq!(status, want, "HTTP/2 upstream, {path}");
    }
}

// ---- upstream status codes ----

/// Answers each request head with the status its path names (`/status/NNN`), on a
/// plain or TLS connection.
async fn serve_status<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: S) {
    serve_heads(s, |path| {
        let status = path.strip_prefix("/status/").unwrap_or("200");
        format!("HTTP/1.1 {status} Odd\r\ncontent-length: 2\r\n\r\nok").into_bytes()
    })
    .await;
}

/// An upstream status outside 100–599 (RFC 9110 §15: a status code is three digits,
/// 100 to 599) is no HTTP response: 502 `upstream_error`, whichever client path and
/// upstream path the response takes — the gateway's own exchange (`http://` targets),
/// hyper's HTTP/1.1 client (`https://` targets) and its HTTP/2 client (`protocol =
/// "h2"`), to clients over plain HTTP/1.1, h2c, and HTTPS with HTTP/1.1 or HTTP/2.
/// httparse, hyper and the `http` crate all take 100–999, so 600–999 was relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_status_outside_100_to_599_is_502_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let up_cfg = pki::server_config(&ca.server("backend", &["localhost"], 5), &[b"http/1.1"]);
    ca.server("gateway", &["plain.test", "tls.test", "h2.test"], 6);
    let plain = serve_tcp(serve_status).await;
    let tls = serve_tcp(move |tcp| {
        let cfg = up_cfg.clone();
        async move {
            if let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                serve_status(tls).await;
            }
        }
    })
    .await;
    let h2 = serve_tcp(|tcp| async move {
        let svc = service_fn(|req: Request<Incoming>| async move {
            let status = req
                .uri()
                .path()
                .strip_prefix("/status/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(200);
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            Ok::<_, Infallible>(resp)
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    })
    .await;
    let (gw, _) = Gateway::start_file(
        dir.path(),
        &format!(
            r#"
[server]
tls_listen = "127.0.0.1:0"
[server.tls]
default_cert = "gateway.pem"
default_key = "gateway.key"
[upstreams.plain]
targets = ["{plain}"]
[upstreams.tls]
targets = ["https://localhost:{}"]
ca = "{}"
[upstreams.h2]
targets = ["{h2}"]
protocol = "h2"
[tenants.plain]
hosts = ["plain.test"]
upstream = "plain"
[tenants.tls]
hosts = ["tls.test"]
upstream = "tls"
[tenants.h2]
hosts = ["h2.test"]
upstream = "h2"
"#,
            tls.port(),
            ca.path.display()
        ),
    );
    let (port, tls_port) = (gw.addr.port(), gw.tls().port());
    let mut wrong = Vec::new();
    for (status, want) in [
        ("599", "599"),
        ("600", "502"),
        ("999", "502"),
        ("200", "200"),
    ] {
        for host in ["plain.test", "tls.test", "h2.test"] {
            for client in ["http1.1", "http2-prior-knowledge", "https1.1", "https2"] {
                let mut cmd = std::process::Command::new("curl");
                cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"]);
                let url = match client {
                    "http1.1" | "http2-prior-knowledge" => {
                        cmd.arg(format!("--{client}"))
                            .args(["-H", &format!("host: {host}")]);
                        format!("http://127.0.0.1:{port}/status/{status}")
                    }
                    _ => {
                        cmd.arg(if client == "https1.1" {
                            "--http1.1"
                        } else {
                            "--http2"
                        })
                        .arg("--cacert")
                        .arg(&ca.path)
                        .args(["--resolve", &format!("{host}:{tls_port}:127.0.0.1")]);
                        format!("https://{host}:{tls_port}/status/{status}")
                    }
                };
                let out = cmd.arg(url).output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let (body, got) = text.rsplit_once('\n').unwrap_or(("", &text));
                let right =
                    got == want && (want != "502" || body.contains(r#""error":"upstream_error""#));
                if !right {
                    wrong.push(format!(
                        "{status} from {host} to {client}: got {got} {body}{}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Counted as the upstream's protocol errors.
    let metrics = get(gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    for (tenant, upstream) in [("plain", "plain"), ("tls", "tls"), ("h2", "h2")] {
        let line = format!(
            r#"bulkhead_upstream_errors_total{{tenant="{tenant}",upstream="{upstream}",kind="protocol"}} 8"#
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}
