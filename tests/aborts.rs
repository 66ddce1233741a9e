//! A client that goes away before its response is over: its connection closed (or, on
//! HTTP/2, its stream reset) while the upstream has not answered yet, or while the
//! upstream's body has paused. The gateway lets go of the upstream connection and the
//! tenant's in-flight slot at once, not when `request_timeout` or
//! `server.body_idle_timeout` (30 s and 60 s here, the defaults) would end the
//! exchange, and logs the request with status 499 and reason `client_closed` when no
//! response went out. The real binary, real sockets, every path a client can take:
//! the HTTP/1.1 fast path, hyper's HTTP/1.1 server, the gateway's own HTTP/2 server.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Every wait in these tests is bounded by this, well under the timeouts that would
/// otherwise end the exchanges, so a gateway that holds on fails instead of passing late.
const LIMIT: Duration = Duration::from_secs(10);

/// What the upstream sends once it has read the request head, before it goes quiet.
const NOTHING: &[u8] = b"";
const HEAD_AND_SOME: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789";

/// What the upstream saw of a connection from the gateway.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A request head came.
    Head,
    /// The gateway closed the connection after it.
    Closed,
}

type Events = mpsc::UnboundedReceiver<Seen>;

/// An HTTP/1.1 upstream that reads a request head, sends `then`, and waits until the
/// gateway closes the connection, saying so at each step.
async fn quiet_upstream(then: &'static [u8]) -> (SocketAddr, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_tcp(move |mut s| {
        let tx = tx.clone();
        async move {
            if !read_request_head(&mut s).await {
                return;
            }
            let _ = tx.send(Seen::Head);
            let mut buf = [0u8; 4096];
            let _ = s.write_all(then).await;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(Seen::Closed);
        }
    })
    .await;
    (addr, rx)
}

/// The upstream's next event, which must be `expected`, within [`LIMIT`].
async fn expect(rx: &mut Events, expected: Seen, what: &str) {
    match tokio::time::timeout(LIMIT, rx.recv()).await {
        Ok(Some(seen)) => assert_eq!(seen, expected, "{what}"),
        _ if expected == Seen::Closed => {
            panic!("{what}: the gateway held on to the upstream connection")
        }
        _ => panic!("{what}: the request never reached the upstream"),
    }
}

fn gateway(up: SocketAddr) -> Process {
    Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"{up}\"]\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ))
}

/// A series of the gateway's metrics for tenant `t` (0 when absent).
async fn metric(gw: &Process, series: &str) -> u64 {
    let r = get(gw.admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn wait_nothing_in_flight(gw: &Process, what: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let n = metric(gw, r#"bulkhead_in_flight{tenant="t"}"#).await;
        if n == 0 {
            return;
        }
        assert!(t0.elapsed() < LIMIT, "{what}: in-flight count stuck at {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `request` on a new connection, waits until the upstream has its head (and,
/// with `head`, until the response head has come), then closes the connection.
async fn send_then_close(rx: &mut Events, gw: &Process, request: &str, head: bool, what: &str) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    expect(rx, Seen::Head, what).await;
    if head {
        let mut first = [0u8; 12];
        tokio::time::timeout(LIMIT, s.read_exact(&mut first))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200", "{what}");
    }
}

/// Sends `request`, closes the connection (after the response head, with `head`) and
/// waits until the gateway has let go of the upstream connection and the slot; the
/// request's access-log line.
async fn abandon(
    rx: &mut Events,
    gw: &Process,
    what: &str,
    rid: &str,
    request: &str,
    head: bool,
) -> String {
    send_then_close(rx, gw, request, head, what).await;
    expect(rx, Seen::Closed, what).await;
    wait_nothing_in_flight(gw, what).await;
    gw.log_line(&["access", rid]).await
}

/// One request on the fast path (a plain GET) and one on hyper's server (a chunked
/// body sends it there): what, its `x-request-id` (`{prefix}-fast`, `{prefix}-hyper`),
/// the bytes.
fn both_paths(prefix: &str) -> [(&'static str, String, String); 2] {
    let fast = format!("{prefix}-fast");
    let hyper = format!("{prefix}-hyper");
    [
        (
            "fast path",
            fast.clone(),
            format!("GET /{prefix} HTTP/1.1\r\nhost: t.com\r\nx-request-id: {fast}\r\n\r\n"),
        ),
        (
            "hyper",
            hyper.clone(),
            format!(
                "POST /{prefix} HTTP/1.1\r\nhost: t.com\r\nx-request-id: {hyper}\r\n\
                 transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
    ]
}

#[tokio::test]
async fn a_client_that_closes_before_the_answer_is_let_go_at_once_and_logged_499() {
    let (up, mut rx) = quiet_upstream(NOTHING).await;
    let gw = gateway(up);
    for (what, rid, request) in both_paths("gone") {
        let line = abandon(&mut rx, &gw, what, &rid, &request, false).await;
        assert!(
            line.contains("status=499") && line.contains(r#"reason="client_closed""#),
            "{what}: {line}"
        );
    }
    // HTTP/2: a stream reset by the client, then a connection closed.
    for (what, rid, whole_connection) in [
        ("h2c stream reset", "gone-h2-stream", false),
        ("h2c connection closed", "gone-h2-conn", true),
    ] {
        let (mut send, conn) = h2c_at(gw.addr).await;
        let req = http::Request::get("http://t.com/c")
            .header("x-request-id", rid)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let waiting = tokio::spawn(send.send_request(req));
        expect(&mut rx, Seen::Head, what).await;
        // Dropping the response future resets the stream; aborting the connection's
        // task closes the socket.
        waiting.abort();
        if whole_connection {
            conn.abort();
        }
        expect(&mut rx, Seen::Closed, what).await;
        wait_nothing_in_flight(&gw, what).await;
        let line = gw.log_line(&["access", rid]).await;
        assert!(
            line.contains("status=499") && line.contains(r#"reason="client_closed""#),
            "{what}: {line}"
        );
    }
    // No response went out: `requests_total` counts responses sent (SPEC).
    assert_eq!(
        metric(&gw, r#"bulkhead_requests_total{tenant="t",status="499"}"#).await,
        0
    );
}

#[tokio::test]
async fn a_client_that_closes_while_the_body_pauses_is_let_go_at_once() {
    let (up, mut rx) = quiet_upstream(HEAD_AND_SOME).await;
    let gw = gateway(up);
    for (what, rid, request) in both_paths("paused") {
        let line = abandon(&mut rx, &gw, what, &rid, &request, true).await;
        // The status that went out, and why the response is not whole: on every
        // path alike.
        assert!(line.contains("status=200"), "{what}: {line}");
        assert!(line.contains(r#"reason="client_closed""#), "{what}: {line}");
    }
    // HTTP/2: the client resets the stream after the head.
    let (mut send, _conn) = h2c_at(gw.addr).await;
    let req = http::Request::get("http://t.com/")
        .header("x-request-id", "paused-h2")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(LIMIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    expect(&mut rx, Seen::Head, "h2c").await;
    let mut body = resp.into_body();
    let first = tokio::time::timeout(LIMIT, body.frame()).await.unwrap();
    assert!(matches!(first, Some(Ok(_))), "the first bytes of the body");
    drop(body);
    expect(&mut rx, Seen::Closed, "h2c").await;
    wait_nothing_in_flight(&gw, "h2c").await;
    let line = gw.log_line(&["access", "paused-h2"]).await;
    assert!(
        line.contains("status=200") && line.contains(r#"reason="client_closed""#),
        "h2c: {line}"
    );
}

/// A client that sends its next request before the slow answer to the first one
/// (pipelining) has not gone away: both are answered, in order.
#[tokio::test]
async fn a_pipelined_request_during_a_slow_answer_is_not_taken_for_a_close() {
    let up = Upstream::start("u", Behavior::Slow(Duration::from_millis(300))).await;
    let gw = Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"{}\"]\n\
         [tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nhost: t.com\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET /second HTTP/1.1\r\nhost: t.com\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut got))
        .await
        .expect("both answers, then the close the second asked for")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    let seen: Vec<String> = up.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, ["/first", "/second"]);
}
