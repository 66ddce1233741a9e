//! Upstream failures, slow clients and oversized heads, through real sockets.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn one_tenant(upstream: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[server]\nheader_read_timeout = \"1s\"\nworkers = 1\n[upstreams.u]\ntargets = [\"{upstream}\"]\n[defaults]\nupstream = \"u\"\n{extra}\n[tenants.t]\nhosts = [\"t.com\"]\n"
    ))
}

#[tokio::test]
async fn upstream_down_is_502() {
    // A port bound and not listening: connections to it are refused.
    let free_guard = Refused::new();
    let free = free_guard.addr();
    let gw = one_tenant(&free.to_string(), "");
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_error(&r, 502, "upstream_error");
    assert_eq!(r.json()["tenant"], "t");
}

#[tokio::test]
async fn upstream_garbage_and_reset_are_502() {
    let garbage = Upstream::start("g", Behavior::Garbage).await;
    let gw = one_tenant(&garbage.addr.to_string(), "");
    assert_error(
        &get(gw.addr, "/", &[("host", "t.com")]).await,
        502,
        "upstream_error",
    );
}

#[tokio::test]
async fn upstream_closing_mid_body_cuts_the_client_response() {
    let up = Upstream::start("c", Behavior::CloseMidBody).await;
    let gw = one_tenant(&up.addr.to_string(), "");
    let resp = client()
        .request(
            http::Request::get(gw.url("/"))
                .header("host", "t.com")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the head was already on its way");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "a truncated body must not look complete");
}

#[tokio::test]
async fn upstream_slower_than_request_timeout_is_504() {
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(3))).await;
    let gw = one_tenant(&slow.addr.to_string(), "request_timeout = \"300ms\"");
    let started = Instant::now();
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_error(&r, 504, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "did not wait for the upstream"
    );
}

/// Reads until the server closes; returns what it sent.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            n = s.read(&mut buf) => match n {
                Ok(0) | Err(_) => return Some(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
            },
            _ = &mut deadline => return None,
        }
    }
}

#[tokio::test]
async fn half_a_request_line_is_cut_off_after_header_read_timeout() {
    let up = Upstream::echo("u").await;
    let gw = one_tenant(&up.addr.to_string(), "");
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /slow").await.unwrap();
    let closed = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(
        closed.is_some(),
        "the connection stayed open well past the 1s timeout"
    );

    // A client that sends nothing at all is cut off too.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert!(read_until_closed(&mut s, Duration::from_secs(8))
        .await
        .is_some());

    // Trickling header lines one at a time does not reset the clock.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let trickle = async {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(format!("x-h{i}: v\r\n").as_bytes())
                .await
                .is_err()
            {
                return true;
            }
        }
        false
    };
    let cut = tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .unwrap();
    assert!(cut, "a trickling client was never cut off");
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn oversized_header_block_is_431() {
    let up = Upstream::echo("u").await;
    let gw = one_tenant(&up.addr.to_string(), "");
    let big = "v".repeat(20 * 1024);
    let r = get(gw.addr, "/", &[("host", "t.com"), ("x-big", &big)]).await;
    assert_error(&r, 431, "headers_too_large");
    // Many small headers adding up to 20 KiB as well.
    let values: Vec<(String, String)> = (0..40)
        .map(|i| (format!("x-h{i}"), "v".repeat(500)))
        .collect();
    let mut headers: Vec<(&str, &str)> = values
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.push(("host", "t.com"));
    assert_error(&get(gw.addr, "/", &headers).await, 431, "headers_too_large");
    // Far beyond what the server reads of a head (64 KiB here): the gateway's 431 with
    // its JSON body and the close, while the client is still sending (hyper's answer
    // was an empty 431, counted and logged nowhere).
    let huge = "v".repeat(200 * 1024);
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nhost: t.com\r\nx-huge: {huge}\r\n\r\n").as_bytes())
        .await
        .ok();
    let out = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap();
    assert_eq!(body["error"], "headers_too_large", "{text}");
    assert_eq!(body["tenant"], serde_json::Value::Null);
    assert!(up.seen().is_empty());
    // Normal requests still pass.
    assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
}

/// A raw keep-alive upstream that counts connections and closes each one `close_after`
/// its first response, without saying so (no `Connection: close`).
async fn counting_upstream(
    close_after: Option<Duration>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            c2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut pending = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if let Some(d) = close_after {
                            tokio::time::sleep(d).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (addr, conns) = counting_upstream(None).await;
    let gw = one_tenant(&addr.to_string(), "");
    for _ in 0..20 {
        assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
    }
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one keep-alive connection served all"
    );
}

#[tokio::test]
async fn upstream_closing_idle_connections_causes_no_errors() {
    let (addr, conns) = counting_upstream(Some(Duration::from_millis(20))).await;
    let gw = one_tenant(&addr.to_string(), "");
    for i in 0..10 {
        let r = get(gw.addr, "/", &[("host", "t.com")]).await;
        assert_eq!(
            r.status,
            200,
            "request {i}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 10);
}

fn authority_gateway() -> Gateway {
    Gateway::start(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n[defaults]\nupstream = \"u\"\n[tenants.t]\nhosts = [\"t.com\", \"*.t.com\"]\n",
    )
}

/// Each head (without its blank line) gets the gateway's 400 bad_request, on the fast
/// path and on hyper's (HTTP/1.0 and a chunked body are handed to it).
async fn assert_400_on_every_http1_path(gw: &Gateway, heads: &[&str]) {
    for head in heads {
        for variant in [
            format!("{head}connection: close\r\n\r\n"),
            format!(
                "{}connection: close\r\n\r\n",
                head.replace("HTTP/1.1", "HTTP/1.0")
            ),
            format!(
                "{}connection: close\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                head.replacen("GET", "POST", 1)
            ),
        ] {
            let mut s = TcpStream::connect(gw.addr).await.unwrap();
            s.write_all(variant.as_bytes()).await.unwrap();
            let answer = read_until_closed(&mut s, Duration::from_secs(10))
                .await
                .expect("answered and closed");
            let text = String::from_utf8_lossy(&answer);
            assert!(
                text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.0 400"),
                "{variant:?}: {text}"
            );
            assert!(
                text.contains(r#""error":"bad_request""#),
                "{variant:?}: {text}"
            );
        }
    }
}

/// `Host: x@t.com` and `https://x@t.com/` name no host a tenant could have: 400
/// bad_request on every path (RFC 9110 §4.2.4: no userinfo in http(s) URIs), not 404
/// unknown_tenant.
#[tokio::test]
async fn userinfo_in_the_authority_is_400_on_every_path() {
    let gw = authority_gateway();
    assert_400_on_every_http1_path(
        &gw,
        &[
            "GET / HTTP/1.1\r\nHost: x@t.com\r\n",
            "GET / HTTP/1.1\r\nHost: x@a.t.com\r\n",
            "GET https://x@t.com/ HTTP/1.1\r\nHost: t.com\r\n",
            "GET https://x@t.com/ HTTP/1.1\r\nHost: x@t.com\r\n",
        ],
    )
    .await;
    // HTTP/2: the `:authority`.
    let mut h2 = h2c::<http_body_util::Empty<bytes::Bytes>>(&gw).await;
    for uri in ["http://x@t.com/", "http://x:y@a.t.com/"] {
        let resp = h2
            .send_request(http::Request::get(uri).body(Default::default()).unwrap())
            .await
            .unwrap();
        assert_error(&read(resp).await, 400, "bad_request");
    }
    // Nobody's host is still 404.
    assert_error(
        &get(gw.addr, "/", &[("host", "nobody.com")]).await,
        404,
        "unknown_tenant",
    );
}

/// A list in `Host` is not one authority: 400 bad_request on every HTTP/1.x path, not
/// 404 unknown_tenant.
#[tokio::test]
async fn a_list_in_host_is_400_on_every_path() {
    let gw = authority_gateway();
    assert_400_on_every_http1_path(
        &gw,
        &[
            "GET / HTTP/1.1\r\nHost: t.com, t.com\r\n",
            "GET / HTTP/1.1\r\nHost: a.example.com, b.example.com\r\n",
            "GET / HTTP/1.1\r\nHost: nobody.com, a.t.com\r\n",
        ],
    )
    .await;
}
