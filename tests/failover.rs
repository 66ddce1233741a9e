//! An upstream pool with a target that cannot be connected to: requests go to the
//! pool's other targets instead of failing (nothing was sent, so any method may), the
//! failed target is passed over for 10 s, and each failed connection counts in
//! `upstream_errors_total{kind="connect"}`. Real sockets: a port nobody listens on,
//! real HTTP/1.1 and HTTP/2 upstreams, clients on every path through the gateway.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One series of the gateway's metrics, if exported.
async fn metric(admin: SocketAddr, series: &str) -> Option<u64> {
    let r = get(admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `upstream_errors_total{kind="connect"}` for tenant `t`, upstream `u`.
async fn connect_errors(admin: SocketAddr) -> u64 {
    let key = r#"bulkhead_upstream_errors_total{tenant="t",upstream="u",kind="connect"}"#;
    metric(admin, key).await.unwrap_or(0)
}

fn config(targets: &[SocketAddr], protocol: &str) -> String {
    let list: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [{}]\n{protocol}\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        list.join(", ")
    )
}

/// A raw HTTP/1.1 request on a new connection; the whole answer (the request asks
/// for the close).
async fn raw(gw: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// How a client reaches the gateway, each a different path through it.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// A POST with a body (not idempotent, but nothing had been sent): the fast path.
    FastPost,
    /// A chunked body: hyper's HTTP/1.1 server, the fast path's exchange under it.
    Hyper,
    /// An h2c client: the gateway's own HTTP/2 server.
    H2c,
}

/// Sends `n` requests along `path`; the status of each.
async fn requests(gw: SocketAddr, path: Path, n: usize) -> Vec<u16> {
    let status = |r: &str| r.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut out = Vec::new();
    match path {
        Path::FastPost => {
            let body = "x".repeat(3000);
            let post = format!(
                "POST /p HTTP/1.1\r\nhost: t.com\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            for _ in 0..n {
                let r = raw(gw, &post).await;
                assert!(
                    r.contains("\"body_len\":3000") || !r.contains(" 200 "),
                    "{r}"
                );
                out.push(status(&r));
            }
        }
        Path::Hyper => {
            for _ in 0..n {
                let r = raw(
                    gw,
                    "POST /c HTTP/1.1\r\nhost: t.com\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                )
                .await;
                out.push(status(&r));
            }
        }
        Path::H2c => {
            let (mut send, _conn) = h2c_at::<http_body_util::Empty<Bytes>>(gw).await;
            for _ in 0..n {
                let req = http::Request::get("http://t.com/h2")
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                out.push(send.send_request(req).await.unwrap().status().as_u16());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_target_that_refuses_connections_is_passed_over_on_every_path() {
    for path in [Path::FastPost, Path::Hyper, Path::H2c] {
        let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
        let refused = Refused::new();
        let dead = refused.addr();
        // Round robin starts at the dead target: the first request fails over.
        let gw = Process::start(&config(&[dead, a.addr, b.addr], ""));
        assert_eq!(requests(gw.addr, path, 6).await, [200; 6], "{path:?}");
        // One failed connection, then the target was passed over.
        assert_eq!(connect_errors(gw.admin).await, 1, "{path:?}");
        assert_eq!(a.seen().len() + b.seen().len(), 6, "{path:?}");
        assert!(
            !a.seen().is_empty() && !b.seen().is_empty(),
            "{path:?}: the live targets share the load"
        );
        let line = gw
            .log_line(&["cannot connect to upstream target", &dead.to_string()])
            .await;
        assert!(line.contains("WARN"), "{line}");
        // The gauge says which target is out of rotation.
        let up =
            |a: SocketAddr| format!(r#"bulkhead_upstream_target_up{{upstream="u",target="{a}"}}"#);
        assert_eq!(metric(gw.admin, &up(dead)).await, Some(0), "{path:?}");
        assert_eq!(metric(gw.admin, &up(a.addr)).await, Some(1), "{path:?}");
        assert_eq!(metric(gw.admin, &up(b.addr)).await, Some(1), "{path:?}");
    }
}

/// An HTTP/2 upstream (hyper's client) fails over the same way.
#[tokio::test]
async fn an_http2_pool_fails_over_too() {
    let live = serve_tcp(|tcp| async move {
        let svc = service_fn(|_req| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"h2 ok"))))
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    })
    .await;
    let refused = Refused::new();
    let gw = Process::start(&config(&[refused.addr(), live], "protocol = \"h2\""));
    for i in 0..4 {
        let r = get(gw.addr, "/", &[("host", "t.com")]).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(&r.body[..], b"h2 ok");
    }
    assert_eq!(connect_errors(gw.admin).await, 1);
}

#[tokio::test]
async fn with_no_target_left_the_request_is_502_as_before() {
    let (r1, r2) = (Refused::new(), Refused::new());
    let (d1, d2) = (r1.addr(), r2.addr());
    let gw = Process::start(&config(&[d1, d2], ""));
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_error(&r, 502, "upstream_error");
    // Both were tried: two failed connections.
    assert_eq!(connect_errors(gw.admin).await, 2);
    // Every target passed over: they are tried again rather than none.
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_error(&r, 502, "upstream_error");
    // A pool of one has nothing to fail over to.
    let refused = Refused::new();
    let gw = Process::start(&config(&[refused.addr()], ""));
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_error(&r, 502, "upstream_error");
    assert_eq!(connect_errors(gw.admin).await, 1);
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_error(&r, 502, "upstream_error");
    assert_eq!(connect_errors(gw.admin).await, 2);
}

/// An idle pooled connection that the upstream closes is let go of by the gateway
/// even though no request goes to that target again (README: idle connections are
/// dropped after 30 s): before the workers swept their pools, it stayed half-closed
/// (CLOSE-WAIT) until the target was used again, for ever if it never was.
#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_let_go_of_without_more_traffic() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = serve_tcp(move |mut s| {
        let tx = tx.clone();
        async move {
            if !read_request_head(&mut s).await {
                return;
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            // Idle in the gateway's pool now; the upstream closes its side, as a
            // backend with a short keep-alive timeout does, and waits for the
            // gateway to close its own.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            s.shutdown().await.unwrap();
            let mut buf = [0u8; 64];
            let closed = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .is_ok();
            let _ = tx.send(closed);
        }
    })
    .await;
    let gw = Gateway::start(&config(&[upstream], ""));
    let r = get(gw.addr, "/once", &[("host", "t.com")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        rx.recv().await,
        Some(true),
        "the gateway closed its side of the idle connection"
    );
}
