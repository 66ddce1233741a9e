//! `server.body_idle_timeout`: a response body that stops moving — the upstream sends
//! nothing more, or the client takes nothing more — is cut off, and its in-flight slot
//! and upstream connection are let go. Real sockets, real clients and servers, each
//! path through the gateway: the HTTP/1.1 fast path, hyper's HTTP/1.1 server, the
//! gateway's own HTTP/2 server, the fast path's exchange under hyper, hyper's client to
//! an HTTP/2 upstream.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Every wait in these tests is bounded by this, so a hang fails instead of blocking.
const LIMIT: Duration = Duration::from_secs(10);

/// A gateway with one worker, `body_idle_timeout = "300ms"`, tenant `t` on `t.com`
/// proxying to `up` (`protocol` added to the upstream when given).
fn gateway(up: SocketAddr, protocol: Option<&str>) -> Gateway {
    let protocol = protocol.map_or(String::new(), |p| format!("protocol = \"{p}\"\n"));
    Gateway::start(&format!(
        "[server]\nworkers = 1\nbody_idle_timeout = \"300ms\"\n\
         [upstreams.u]\ntargets = [\"{up}\"]\n{protocol}\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ))
}

/// An HTTP/1.1 upstream that reads each connection's first request head, then runs
/// `then` on the connection; `released` gets a message when `then` returns (it returns
/// when the gateway lets go of the connection).
async fn h1_upstream<F, Fut>(then: F) -> (SocketAddr, mpsc::UnboundedReceiver<()>)
where
    F: Fn(TcpStream) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_tcp(move |mut s| {
        let (tx, then) = (tx.clone(), then.clone());
        async move {
            if read_request_head(&mut s).await {
                then(s).await;
                let _ = tx.send(());
            }
        }
    })
    .await;
    (addr, rx)
}

/// An HTTP/1.1 upstream that answers with a head promising 1,000 bytes, sends 10 of
/// them and then nothing, until the gateway closes the connection.
async fn quiet_h1_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    h1_upstream(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            .await;
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// An HTTP/2 (prior knowledge) upstream that answers with one data frame and then
/// nothing; `released` gets a message when the gateway drops such a response (resets
/// the stream or closes the connection).
async fn quiet_h2_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_tcp(move |s| {
        let tx = tx.clone();
        async move {
            let svc = service_fn(move |_req| {
                let tx = tx.clone();
                async move {
                    let (body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                    let _ = body_tx
                        .send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
                        .await;
                    tokio::spawn(async move {
                        body_tx.closed().await;
                        let _ = tx.send(());
                    });
                    let body = StreamBody::new(tokio_stream_from(body_rx));
                    Ok::<_, Infallible>(http::Response::new(body))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    })
    .await;
    (addr, rx)
}

/// A stream over an mpsc receiver (no tokio-stream dependency).
fn tokio_stream_from<T>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
{
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An HTTP/1.1 upstream that answers with a body of a gibibyte and writes it as fast
/// as it is taken, until a write fails (the gateway closed the connection).
async fn endless_h1_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    h1_upstream(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// `GET http://t.com/` on an HTTP/2 connection: the response head, within [`LIMIT`].
async fn h2_get(send: &mut H2) -> http::Response<hyper::body::Incoming> {
    let req = http::Request::get("http://t.com/")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    tokio::time::timeout(LIMIT, send.send_request(req))
        .await
        .expect("a response head in time")
        .unwrap()
}

async fn released(rx: &mut mpsc::UnboundedReceiver<()>, what: &str) {
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: the gateway never let go of the upstream connection"));
}

/// `upstream_errors_total{kind="timeout"}` for tenant `t`, upstream `u`.
async fn upstream_timeouts(gw: &Gateway) -> u64 {
    let r = get(gw.admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let key = r#"bulkhead_upstream_errors_total{tenant="t",upstream="u",kind="timeout"} "#;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Sends a GET on a raw connection and reads until the gateway closes it; returns what
/// came.
async fn raw_get_until_closed(gw: SocketAddr, extra: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nhost: t.com\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LIMIT, s.read(&mut buf)).await {
            Err(_) => panic!(
                "the gateway kept a stalled response open: {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn an_upstream_that_goes_quiet_mid_body_is_cut_off_on_the_fast_path() {
    let (up, mut rx) = quiet_h1_upstream().await;
    let gw = gateway(up, None);
    let got = raw_get_until_closed(gw.addr, "").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("0123456789"),
        "the 10 bytes sent, then the close: {text}"
    );
    released(&mut rx, "fast path").await;
    wait_in_flight_zero(&gw, "t", "fast path").await;
    assert_eq!(upstream_timeouts(&gw).await, 1);
    // The gateway is fine: the next request on a new connection is served the same way.
    let again = raw_get_until_closed(gw.addr, "").await;
    assert!(String::from_utf8_lossy(&again).ends_with("0123456789"));
    released(&mut rx, "fast path, again").await;
    assert_eq!(upstream_timeouts(&gw).await, 2);
}

#[tokio::test]
async fn an_upstream_that_goes_quiet_mid_body_is_cut_off_for_http2_clients() {
    // h2c client: the gateway's own HTTP/2 server, the fast path's exchange upstream.
    let (up, mut rx) = quiet_h1_upstream().await;
    let gw = gateway(up, None);
    let mut send = h2c(&gw).await;
    let resp = h2_get(&mut send).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(LIMIT, resp.into_body().collect())
        .await
        .expect("the stalled body was cut off");
    assert!(body.is_err(), "a truncated body must not look complete");
    released(&mut rx, "h2c client").await;
    wait_in_flight_zero(&gw, "t", "h2c client").await;
    assert_eq!(upstream_timeouts(&gw).await, 1);
    // The connection itself carries on: the stream was reset, not the connection.
    let resp = h2_get(&mut send).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn an_http2_upstream_that_goes_quiet_mid_body_is_cut_off() {
    // hyper's client to an HTTP/2 upstream; the client on the fast path.
    let (up, mut rx) = quiet_h2_upstream().await;
    let gw = gateway(up, Some("h2"));
    let got = raw_get_until_closed(gw.addr, "").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut-off chunked body must not end with the last chunk: {text}"
    );
    released(&mut rx, "h2 upstream").await;
    wait_in_flight_zero(&gw, "t", "h2 upstream").await;
    assert_eq!(upstream_timeouts(&gw).await, 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_upstream_let_go() {
    let (up, mut rx) = endless_h1_upstream().await;
    let gw = gateway(up, None);
    // Plain GET: the fast path. A chunked request body: hyper's HTTP/1.1 server.
    for (what, extra) in [
        ("fast path", ""),
        ("hyper", "transfer-encoding: chunked\r\n\r\n0\r\n"),
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let method = if extra.is_empty() { "GET" } else { "POST" };
        s.write_all(format!("{method} / HTTP/1.1\r\nhost: t.com\r\n{extra}\r\n").as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(LIMIT, s.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "{what}");
        // Read nothing more, and keep the connection open.
        released(&mut rx, what).await;
        wait_in_flight_zero(&gw, "t", what).await;
        drop(s);
    }
    assert_eq!(
        upstream_timeouts(&gw).await,
        0,
        "a client that stops reading is not the upstream's failure"
    );
}

#[tokio::test]
async fn zero_means_never_and_a_bad_value_is_refused() {
    let ok = |t: &str| {
        let (code, _, err) = run_check(
            &format!("[server]\nbody_idle_timeout = \"{t}\"\n[upstreams.u]\ntargets = [\"127.0.0.1:1\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"),
            &[],
        );
        (code, err)
    };
    assert_eq!(ok("0s").0, 0);
    assert_eq!(ok("90s").0, 0);
    let (code, err) = ok("soon");
    assert_ne!(code, 0);
    assert!(
        err.contains("PATH:2:21") && err.contains("invalid duration \"soon\""),
        "{err}"
    );
    // "0s": a quiet upstream keeps the response open.
    let (up, mut rx) = quiet_h1_upstream().await;
    let gw = Gateway::start(&format!(
        "[server]\nworkers = 1\nbody_idle_timeout = \"0s\"\n\
         [upstreams.u]\ntargets = [\"{up}\"]\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ));
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"0123456789") {
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    // Two seconds, well past the 300 ms the other tests use: still open, still held.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .is_err(),
        "with \"0s\" the response must stay open"
    );
    assert_eq!(in_flight(&gw, "t"), 1);
    drop(s);
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn an_http2_stream_whose_client_opens_no_window_is_reset_and_the_connection_carries_on() {
    // hyper's client reads its connection but, with the body never polled, gives the
    // stream no more window once its buffer is full: the response waits on flow
    // control, not on the socket.
    let (up, mut rx) = endless_h1_upstream().await;
    let gw = gateway(up, None);
    let mut send = h2c(&gw).await;
    let resp = h2_get(&mut send).await;
    assert_eq!(resp.status(), 200);
    released(&mut rx, "h2 stream").await;
    wait_in_flight_zero(&gw, "t", "h2 stream").await;
    // What the client buffered, then the reset.
    let body = tokio::time::timeout(LIMIT, resp.into_body().collect())
        .await
        .expect("the reset stream ends");
    assert!(body.is_err(), "a reset stream must not look complete");
    // Only that stream: the connection answers the next request.
    let resp = h2_get(&mut send).await;
    assert_eq!(resp.status(), 200);
    drop(resp);
    released(&mut rx, "h2 stream, dropped by the client").await;
    assert_eq!(upstream_timeouts(&gw).await, 0);
}

// ---------------------------------------------------------------------------------------
// Request bodies: `request_timeout` counts from the end of the upload, which is bounded
// by `body_idle_timeout` while it goes on.
// ---------------------------------------------------------------------------------------

/// A gateway with `request_timeout = "500ms"`, `body_idle_timeout = "1s"`, tenant `t`
/// on `t.com` to `up` (`protocol` added when given).
fn upload_gateway(up: SocketAddr, protocol: Option<&str>) -> Gateway {
    let protocol = protocol.map_or(String::new(), |p| format!("protocol = \"{p}\"\n"));
    Gateway::start(&format!(
        "[server]\nworkers = 1\nbody_idle_timeout = \"1s\"\n\
         [upstreams.u]\ntargets = [\"{up}\"]\n{protocol}\
         [defaults]\nrequest_timeout = \"500ms\"\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ))
}

/// An HTTP/2 (prior knowledge) upstream that reads the whole request body and answers
/// with its length.
async fn h2_counting_upstream() -> SocketAddr {
    serve_tcp(|s| async move {
        let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
            let n = req
                .into_body()
                .collect()
                .await
                .map_or(0, |b| b.to_bytes().len());
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                format!("{{\"body_len\":{n}}}"),
            ))))
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    })
    .await
}

/// Sends `head` (without its blank line), then each of `pieces` `gap` apart, and
/// reads the response until the gateway closes or 10 s pass; returns the response.
async fn upload(gw: SocketAddr, head: &str, pieces: &[&[u8]], gap: Duration) -> String {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(format!("{head}\r\n").as_bytes()).await.unwrap();
    for p in pieces {
        tokio::time::sleep(gap).await;
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while t0.elapsed() < LIMIT {
        match tokio::time::timeout(LIMIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                out.extend_from_slice(&buf[..n]);
                // A whole response (these bodies are small): stop.
                let text = String::from_utf8_lossy(&out);
                if let Some((h, b)) = text.split_once("\r\n\r\n") {
                    let len = h
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(str::to_owned)
                        })
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if len.is_some_and(|n| b.len() >= n) {
                        break;
                    }
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn an_upload_longer_than_request_timeout_is_served_while_it_moves() {
    // Twenty pieces 100 ms apart: two seconds of upload, four times request_timeout,
    // never a second without a byte.
    let h1 = Upstream::echo("u").await;
    let h2 = h2_counting_upstream().await;
    let pieces: Vec<&[u8]> = vec![b"0123456789"; 20];
    let chunked: Vec<Vec<u8>> = (0..20).map(|_| b"a\r\n0123456789\r\n".to_vec()).collect();
    let mut chunked: Vec<&[u8]> = chunked.iter().map(Vec::as_slice).collect();
    chunked.push(b"0\r\n\r\n");
    for (what, gw, head, body) in [
        (
            "fast path",
            upload_gateway(h1.addr, None),
            "POST / HTTP/1.1\r\nhost: t.com\r\ncontent-length: 200\r\n",
            &pieces,
        ),
        (
            "hyper server, fast path's exchange",
            upload_gateway(h1.addr, None),
            "POST / HTTP/1.1\r\nhost: t.com\r\ntransfer-encoding: chunked\r\n",
            &chunked,
        ),
        (
            "hyper's client to an HTTP/2 upstream",
            upload_gateway(h2, Some("h2")),
            "POST / HTTP/1.1\r\nhost: t.com\r\ncontent-length: 200\r\n",
            &pieces,
        ),
    ] {
        let r = upload(gw.addr, head, body, Duration::from_millis(100)).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{what}: {r}");
        assert!(
            r.contains("\"body_len\":200"),
            "{what}: the whole body went up: {r}"
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_and_the_upstream_is_let_go() {
    let (h1, mut rx) = counting_h1_upstream().await;
    let h2 = h2_counting_upstream().await;
    for (what, gw, head, piece) in [
        (
            "fast path",
            upload_gateway(h1, None),
            "POST / HTTP/1.1\r\nhost: t.com\r\ncontent-length: 100\r\n",
            &b"0123456789"[..],
        ),
        (
            "hyper server, fast path's exchange",
            upload_gateway(h1, None),
            "POST / HTTP/1.1\r\nhost: t.com\r\ntransfer-encoding: chunked\r\n",
            &b"a\r\n0123456789\r\n"[..],
        ),
        (
            "hyper's client to an HTTP/2 upstream",
            upload_gateway(h2, Some("h2")),
            "POST / HTTP/1.1\r\nhost: t.com\r\ncontent-length: 100\r\n",
            &b"0123456789"[..],
        ),
    ] {
        // Ten bytes, then nothing (the connection stays open).
        let t0 = Instant::now();
        let r = upload(gw.addr, head, &[piece], Duration::ZERO).await;
        assert!(r.starts_with("HTTP/1.1 408"), "{what}: {r}");
        assert!(
            r.contains("\"error\":\"request_body_timeout\""),
            "{what}: {r}"
        );
        assert!(t0.elapsed() < LIMIT, "{what}");
        assert!(
            r.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{what}: the rest of the body will not come, the connection cannot go on: {r}"
        );
        if !what.contains("HTTP/2") {
            released(&mut rx, what).await;
        }
        wait_in_flight_zero(&gw, "t", what).await;
        let m = get(gw.admin, "/metrics", &[]).await;
        let text = String::from_utf8_lossy(&m.body);
        assert!(
            text.contains(r#"bulkhead_rejected_total{tenant="t",reason="request_body_timeout"} 1"#),
            "{what}: {text}"
        );
        assert_eq!(
            upstream_timeouts(&gw).await,
            0,
            "{what}: not the upstream's failure"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_stops_taking_the_body_is_504() {
    // It reads the head and nothing more; the client has 16 MiB to send.
    let up = serve_tcp(|mut s| async move {
        if read_request_head(&mut s).await {
            tokio::time::sleep(LIMIT).await;
        }
    })
    .await;
    let gw = upload_gateway(up, None);
    let body = vec![b'x'; 16 << 20];
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        format!(
            "POST / HTTP/1.1\r\nhost: t.com\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (mut r, mut w) = s.into_split();
    tokio::spawn(async move {
        let _ = w.write_all(&body).await;
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, r.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("upstream_timeout"), "{text}");
    wait_in_flight_zero(&gw, "t", "upstream not reading").await;
    assert_eq!(upstream_timeouts(&gw).await, 1);
}

/// An HTTP/1.1 upstream that reads a request with a `content-length` body and answers
/// with its length; `released` gets a message when a connection closes before its
/// request was whole (the gateway gave up on it).
async fn counting_h1_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_tcp(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(());
                        return;
                    }
                    Ok(n) => n,
                };
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: ").map(str::to_owned))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let whole = match len {
                    Some(n) => body.len() >= n,
                    None => body.ends_with("0\r\n\r\n"),
                };
                if whole {
                    let reply = format!("{{\"body_len\":{}}}", body.len());
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{reply}",
                                reply.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    got.clear();
                }
            }
        }
    })
    .await;
    (addr, rx)
}

/// How an upstream breaks a response after its head.
#[derive(Clone, Copy, Debug)]
enum Break {
    /// Closes with 990 of the 1,000 promised bytes missing.
    Close,
    /// Resets the connection (RST) mid-body.
    Reset,
    /// Sends a chunk-size line that is no number.
    Garbage,
}

/// An upstream that sends a head and 10 body bytes, waits for `go`, then breaks the
/// response as told.
async fn breaking_upstream(how: Break, go: Arc<tokio::sync::Notify>) -> SocketAddr {
    let (addr, _) = h1_upstream(move |mut s| {
        let go = go.clone();
        async move {
            let head: &[u8] = match how {
                Break::Garbage => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n"
                }
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789",
            };
            let _ = s.write_all(head).await;
            go.notified().await;
            match how {
                Break::Close => {}
                Break::Reset => {
                    let _ = s.set_zero_linger();
                }
                Break::Garbage => {
                    let _ = s.write_all(b"zz\r\n").await;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    addr
}

/// Each way of breaking, and the `upstream_errors_total` kind it counts as.
const BREAKS: [(Break, &str); 3] = [
    (Break::Close, "reset"),
    (Break::Reset, "reset"),
    (Break::Garbage, "protocol"),
];

/// A gateway (the binary, for its log) in front of an upstream that breaks its
/// response `how`, once told to by the notify returned.
async fn breaking_gateway(how: Break) -> (Process, Arc<tokio::sync::Notify>) {
    let go = Arc::new(tokio::sync::Notify::new());
    let up = breaking_upstream(how, go.clone()).await;
    let gw = Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"{up}\"]\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ));
    (gw, go)
}

/// `upstream_errors_total{kind}` of tenant `t`, upstream `u`.
async fn upstream_errors(admin: SocketAddr, kind: &str) -> u64 {
    let text = String::from_utf8_lossy(&get(admin, "/metrics", &[]).await.body).into_owned();
    let key =
        format!("bulkhead_upstream_errors_total{{tenant=\"t\",upstream=\"u\",kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A response the upstream breaks after its head (closed early, reset, garbage in
/// the chunked framing) is cut off, and says so: the access log's reason is
/// `upstream_error` and `upstream_errors_total` counts it by kind, as a stall is
/// counted as a timeout. Before, its line read like a complete 200 and no metric
/// moved.
#[tokio::test]
async fn an_upstream_that_breaks_mid_body_is_counted_and_logged_on_the_fast_path() {
    for (how, kind) in BREAKS {
        let (gw, go) = breaking_gateway(how).await;
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\nx-request-id: cut-1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        loop {
            match tokio::time::timeout(LIMIT, s.read(&mut buf)).await {
                Err(_) => panic!("{how:?}: the response was never cut off"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
            if !told && (got.ends_with(b"0123456789") || got.ends_with(b"0123456789\r\n")) {
                told = true;
                go.notify_one();
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{how:?}: {text}");
        let line = gw.log_line(&["access:", "cut-1"]).await;
        assert!(line.contains("status=200"), "{how:?}: {line}");
        assert!(
            line.contains("reason=\"upstream_error\""),
            "{how:?}: {line}"
        );
        assert_eq!(upstream_errors(gw.admin, kind).await, 1, "{how:?}");
    }
}

/// The same through the gateway's HTTP/2 server (the fast path's exchange upstream,
/// its body handed over frame by frame), and through hyper's client to an HTTP/2
/// upstream that resets its stream mid-body: the client's stream is reset, the line
/// says `upstream_error`, the metric counts it.
#[tokio::test]
async fn an_upstream_that_breaks_mid_body_is_counted_and_logged_over_http2_and_hypers_client() {
    for (how, kind) in BREAKS {
        let (gw, go) = breaking_gateway(how).await;
        let (mut send, _conn) = h2c_at::<http_body_util::Empty<Bytes>>(gw.addr).await;
        let req = http::Request::get("http://t.com/")
            .header("x-request-id", "cut-h2")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(LIMIT, send.send_request(req))
            .await
            .expect("a response head in time")
            .unwrap();
        assert_eq!(resp.status(), 200, "{how:?}");
        let mut body = resp.into_body();
        let first = tokio::time::timeout(LIMIT, body.frame())
            .await
            .expect("the first bytes in time");
        assert!(matches!(first, Some(Ok(_))), "{how:?}: {first:?}");
        go.notify_one();
        let rest = tokio::time::timeout(LIMIT, body.collect())
            .await
            .expect("the broken body was cut off");
        assert!(
            rest.is_err(),
            "{how:?}: a cut-off body must not look complete"
        );
        let line = gw.log_line(&["access:", "cut-h2"]).await;
        assert!(line.contains("status=200"), "{how:?}: {line}");
        assert!(
            line.contains("reason=\"upstream_error\""),
            "{how:?}: {line}"
        );
        assert_eq!(upstream_errors(gw.admin, kind).await, 1, "{how:?}");
    }

    // hyper's client: an HTTP/2 upstream that sends 10 bytes, then, told to, resets
    // the stream.
    let go = Arc::new(tokio::sync::Notify::new());
    let told = go.clone();
    let addr = serve_tcp(move |s| {
        let go = told.clone();
        async move {
            let svc = service_fn(move |_req| {
                let go = go.clone();
                async move {
                    let body = StreamBody::new(futures_util::stream::unfold(0, move |n| {
                        let go = go.clone();
                        async move {
                            match n {
                                0 => Some((
                                    Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(
                                        b"0123456789",
                                    ))),
                                    1,
                                )),
                                1 => {
                                    go.notified().await;
                                    Some((Err(std::io::Error::other("the upstream gives up")), 2))
                                }
                                _ => None,
                            }
                        }
                    }));
                    Ok::<_, Infallible>(http::Response::new(body))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    })
    .await;
    let gw = Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"{addr}\"]\nprotocol = \"h2\"\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ));
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\nx-request-id: cut-up-h2\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LIMIT, s.read(&mut buf)).await {
            Err(_) => panic!("not cut off: {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        if got.windows(10).any(|w| w == b"0123456789") {
            go.notify_one();
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "cut off, not ended: {text}");
    let line = gw.log_line(&["access:", "cut-up-h2"]).await;
    assert!(line.contains("reason=\"upstream_error\""), "{line}");
    assert_eq!(upstream_errors(gw.admin, "reset").await, 1);
}
