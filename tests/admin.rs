//! The admin listener as an HTTP server: methods (405 with `Allow`, HEAD wherever GET
//! is), its cap on connections, the header read timeout, and accept failures.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TENANT: &str = "[upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n";

#[tokio::test]
async fn a_wrong_method_is_405_with_allow() {
    let gw = Gateway::start(TENANT);
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/readyz", "GET, HEAD"),
        ("PUT", "/config", "GET, HEAD"),
        ("POST", "/config/history", "GET, HEAD"),
        // Was 404: /metrics exists, only not for POST.
        ("POST", "/metrics", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/reload", "POST"),
        ("HEAD", "/reload", "POST"),
        ("DELETE", "/tenants/t/usage", "GET, HEAD"),
        ("GET", "/tenants/t/usage/reset", "POST"),
    ] {
        let r = send(gw.admin, method, path, &[], Bytes::new()).await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        if method != "HEAD" {
            assert_eq!(r.json()["error"], "method_not_allowed", "{method} {path}");
        }
    }
    for path in ["/nope", "/tenants/t", "/tenants/t/other", "/metrics/x"] {
        let r = send(gw.admin, "POST", path, &[], Bytes::new()).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"], "not_found", "{path}");
        assert_eq!(r.header("allow"), None, "{path}");
    }
}

/// HEAD answers wherever GET does, with the GET's headers and no body (RFC 9110
/// §9.3.2). Read off the wire, so that a body sent anyway would show.
#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let gw = Gateway::start(TENANT);
    for path in [
        "/healthz",
        "/readyz",
        "/config",
        "/config/history",
        "/tenants/t/usage",
    ] {
        let got = get(gw.admin, path, &[]).await;
        assert_eq!(got.status, 200, "GET {path}");
        let raw = raw_exchange(
            gw.admin,
            &format!("HEAD {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"),
        )
        .await;
        let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with("HTTP/1.1 200"), "HEAD {path}: {head}");
        assert_eq!(body, "", "HEAD {path} sent a body");
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: application/json"),
            "HEAD {path}: {head}"
        );
        assert!(
            lower.contains(&format!("content-length: {}", got.body.len())),
            "HEAD {path}: the GET's length ({}) in {head}",
            got.body.len()
        );
    }
    let raw = raw_exchange(
        gw.admin,
        "HEAD /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    assert_eq!(body, "");
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, request.as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the admin listener closes after connection: close")
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// More connections that send nothing than the cap: the admin listener says so, serves
/// no more than the cap at once, closes the longest idle ones to make room for the
/// newer ones, closes the rest after `header_read_timeout`, and then answers again.
#[tokio::test]
async fn idle_admin_connections_are_capped_and_closed() {
    let gw = Process::start(&format!("[server]\nheader_read_timeout = \"3s\"\n{TENANT}"));
    let pid = gw.child.id();
    let before = sockets(pid);
    let cap = 256;
    let extra = 20;
    let mut idle = Vec::new();
    for _ in 0..cap + extra {
        idle.push(TcpStream::connect(gw.admin).await.unwrap());
    }
    gw.log_line(&["admin connection limit reached", "limit=256"])
        .await;
    // A connection that sends nothing is closed by the gateway (EOF on our side): the
    // oldest ones to make room for the newest, ...
    let mut b = [0u8; 16];
    for (i, s) in idle.iter_mut().take(extra).enumerate() {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("connection {i}, among the oldest, is closed"));
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    // ... never serving more than the cap (and one accepted, waiting for a slot).
    let held = sockets(pid).saturating_sub(before);
    assert!(held <= cap + 1, "{held} admin connections open");
    // ... and the newest after header_read_timeout.
    let mut last = idle.pop().unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), last.read(&mut b))
        .await
        .expect("an idle admin connection is closed after header_read_timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The idle ones are still held open on our side; their slots come back all the same.
    let t0 = Instant::now();
    let r = loop {
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            get(gw.admin, "/metrics", &[]).await
        })
        .await;
        if let Ok(r) = r {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "/metrics never answered"
        );
    };
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("bulkhead_"));
    drop(idle);
}

/// The sockets process `pid` has open. Sockets only: the config watcher, started after
/// the listeners, opens descriptors of its own meanwhile.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 14th
    // field of the line, stime the 15th, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// Sets the soft limit on open files of `pid` (the hard one stays, so it can be raised
/// again).
fn prlimit_nofile(pid: u32, n: u64) {
    let ok = std::process::Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={n}:")])
        .status()
        .expect("prlimit (util-linux) runs")
        .success();
    assert!(ok, "prlimit --nofile={n} failed");
}

/// Out of descriptors, the admin listener's accept fails: it logs that and backs off
/// rather than retrying at once (it spun a core), and serves again once descriptors
/// are free.
#[tokio::test]
async fn admin_accept_failures_back_off() {
    let gw = Process::start(TENANT);
    let pid = gw.child.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    prlimit_nofile(pid, open + 4);
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(TcpStream::connect(gw.admin).await.unwrap());
    }
    gw.log_line(&["admin accept failed"]).await;
    // Spinning, the admin thread used 93 % of a core; backing off, next to nothing.
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu, wall) = (cpu_time(pid) - cpu0, t0.elapsed());
    assert!(
        cpu < wall / 2,
        "the gateway used {cpu:?} of CPU in {wall:?} while accept failed"
    );
    drop(conns);
    prlimit_nofile(pid, 4096);
    let t0 = Instant::now();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), get(gw.admin, "/healthz", &[])).await;
        if let Ok(r) = r {
            assert_eq!(r.status, 200);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "/healthz never answered"
        );
    }
}

/// HTTP/2 with prior knowledge (`curl --http2-prior-knowledge`) is served, as
/// HTTP/1.1 is; before, the connection was closed without an answer.
#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let gw = Gateway::start("[upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n");
    let (mut h2, _conn) = h2c_at::<http_body_util::Empty<bytes::Bytes>>(gw.admin).await;
    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let resp = h2
            .send_request(
                http::Request::get(format!("http://{}{path}", gw.admin))
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), status, "{path}");
    }
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{}/metrics", gw.admin))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&read(resp).await.body).contains("bulkhead_"));
    // HTTP/1.1 still, on the same listener.
    assert_eq!(get(gw.admin, "/healthz", &[]).await.status, 200);
}

/// A web page on another site can make the browser of someone on the admin host POST
/// to the loopback admin listener (a form, or `fetch` with `mode: "no-cors"`): it
/// cannot read the answer, but the quota reset would happen. Such POSTs (a foreign
/// `Origin`, or `Sec-Fetch-Site: cross-site`) are refused; curl, scripts and the
/// admin's own origin are not.
#[tokio::test]
async fn a_post_from_another_sites_page_is_refused() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n\
         [tenants.t.limits]\nrequests_per_day = 10\n",
        up.addr
    ));
    for _ in 0..2 {
        assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
    }
    let used = |r: &Reply| r.json()["day"]["used"].clone();
    let own = format!("http://{}", gw.admin);
    for headers in [
        vec![("origin", "http://evil.example")],
        vec![("origin", "null")],
        vec![
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
        // DNS rebinding: the attacker's name re-pointed at the admin address is
        // same-origin with itself.
        vec![
            ("host", "rebind.example:9901"),
            ("origin", "http://rebind.example:9901"),
            ("sec-fetch-site", "same-origin"),
        ],
    ] {
        let r = send(
            gw.admin,
            "POST",
            "/tenants/t/usage/reset",
            &headers,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 403, "{headers:?}");
        assert_eq!(r.json()["error"], "cross_origin", "{headers:?}");
        let r = send(gw.admin, "POST", "/reload", &headers, Bytes::new()).await;
        assert_eq!(r.status, 403, "{headers:?}");
        assert_eq!(r.json()["error"], "cross_origin", "{headers:?}");
        assert_eq!(
            used(&get(gw.admin, "/tenants/t/usage", &[]).await),
            2,
            "{headers:?}"
        );
    }
    // GETs stay readable (a browser keeps their answers from other sites' pages).
    let r = get(gw.admin, "/config", &[("origin", "http://evil.example")]).await;
    assert_eq!(r.status, 200);
    // The admin's own origin, and clients that send no Origin, may POST.
    let r = send(
        gw.admin,
        "POST",
        "/tenants/t/usage/reset",
        &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(used(&r), 0);
    let host = format!("localhost:{}", gw.admin.port());
    let origin = format!("http://{host}");
    let r = send(
        gw.admin,
        "POST",
        "/tenants/t/usage/reset",
        &[("host", host.as_str()), ("origin", origin.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
    let r = send(
        gw.admin,
        "POST",
        "/tenants/t/usage/reset",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(used(&r), 0);
}

/// DNS rebinding: a site re-points its own name at the admin address, and its pages,
/// same-origin with that name, read the config, the history, usage and metrics from
/// the browser of someone on the admin host. Whatever a browser sends for a page (an
/// `Origin`, or `Sec-Fetch-Site` other than `none`) to a DNS name other than
/// localhost is refused, GET and HEAD too; clients that are not browsers (Prometheus
/// scraping `gw-1.internal:9901`) and a typed URL (`Sec-Fetch-Site: none`) are not.
#[tokio::test]
async fn a_browser_read_through_a_rebound_name_is_refused() {
    let gw = Gateway::start(&format!(
        "{TENANT}[tenants.t.limits]\nrequests_per_day = 10\n"
    ));
    let port = gw.admin.port();
    let rebound = format!("rebind.example:{port}");
    let rebound_origin = format!("http://{rebound}");
    let paths = [
        "/config",
        "/config/history",
        "/tenants/t/usage",
        "/metrics",
        "/healthz",
        // Not even which paths exist.
        "/nope",
    ];
    for headers in [
        vec![("sec-fetch-site", "same-origin")],
        vec![
            ("sec-fetch-site", "same-origin"),
            ("origin", &rebound_origin),
        ],
        vec![("origin", rebound_origin.as_str())],
        vec![("sec-fetch-site", "cross-site")],
        // `none` is a typed URL, but an `Origin` comes from a page.
        vec![("sec-fetch-site", "none"), ("origin", &rebound_origin)],
    ] {
        let mut headers = headers;
        headers.push(("host", &rebound));
        for path in paths {
            let r = get(gw.admin, path, &headers).await;
            assert_eq!(r.status, 403, "GET {path} {headers:?}");
            assert_eq!(r.json()["error"], "cross_origin", "GET {path} {headers:?}");
            let message = r.json()["message"].as_str().unwrap().to_owned();
            assert!(message.contains("rebind.example"), "{message}");
            let r = send(gw.admin, "HEAD", path, &headers, Bytes::new()).await;
            assert_eq!(r.status, 403, "HEAD {path} {headers:?}");
            assert!(r.body.is_empty());
        }
    }
    // HTTP/2: the name is the `:authority`.
    let (mut h2, _conn) = h2c_at::<http_body_util::Empty<bytes::Bytes>>(gw.admin).await;
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{rebound}/config"))
                .header("sec-fetch-site", "same-origin")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(read(resp).await.json()["error"], "cross_origin");

    // Prometheus, curl and scripts send neither header, at any name; a typed URL
    // (`Sec-Fetch-Site: none`) is the admin's own navigation.
    let scrape = format!("gw-1.internal:{port}");
    for headers in [
        vec![("host", scrape.as_str())],
        vec![("host", rebound.as_str()), ("sec-fetch-site", "none")],
    ] {
        for path in paths.iter().filter(|p| **p != "/nope") {
            assert_eq!(
                get(gw.admin, path, &headers).await.status,
                200,
                "{path} {headers:?}"
            );
        }
    }
    // Browsers at an address or at localhost read as before.
    let names = [
        gw.admin.to_string(),
        format!("localhost:{port}"),
        format!("admin.localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("[::1]:{port}"),
    ];
    for host in &names {
        let origin = format!("http://{host}");
        for headers in [
            vec![("host", host.as_str()), ("sec-fetch-site", "same-origin")],
            vec![("host", host.as_str()), ("origin", origin.as_str())],
            // Another site's page may send it (it cannot read the answer).
            vec![("host", host.as_str()), ("sec-fetch-site", "cross-site")],
        ] {
            let r = get(gw.admin, "/config", &headers).await;
            assert_eq!(r.status, 200, "{headers:?}");
        }
    }
}

/// Reads one HTTP/1.1 response (a head, then a `content-length` body) off `s`.
async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(n > 0, "closed before a whole response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Every slot held by a keep-alive connection that sent one request and is idle
/// (kept alive, a client would send another before `header_read_timeout`): a new
/// client is still answered, because the connection idle longest is closed for it,
/// as nginx does with keep-alive connections; over HTTP/2 too. One in the middle of a
/// request, though its last response is the oldest, is not the one closed; nor is one
/// whose next request's head came, unfinished, with the request before (pipelined:
/// hyper read it with that one, so no byte arrived after the answer; it was closed).
/// Before, the new client waited unaccepted until an idle one timed out (here 60 s).
#[tokio::test]
async fn a_new_admin_connection_takes_the_slot_of_the_one_idle_longest() {
    let gw = Process::start(&format!(
        "[server]\nheader_read_timeout = \"60s\"\n{TENANT}"
    ));
    let cap = 256;
    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n";
    async fn one_request(admin: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(GET).await.unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        s
    }
    // The oldest response of all, then the head of a second request, not finished.
    let mut midway = one_request(gw.admin).await;
    midway
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    // Idle longest: an HTTP/2 connection after one request.
    let (mut h2, h2_task) = h2c_at::<http_body_util::Empty<Bytes>>(gw.admin).await;
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{}/healthz", gw.admin))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(read(resp).await.status, 200);
    // Then a request and, in the same write, the head of the next, not finished.
    let mut pipelined = TcpStream::connect(gw.admin).await.unwrap();
    pipelined
        .write_all(&[GET, b"GET /healthz HTTP/1.1\r\nhost: a\r\n"].concat())
        .await
        .unwrap();
    assert!(read_response(&mut pipelined)
        .await
        .starts_with("HTTP/1.1 200"));
    // The other slots, idle after one request each, oldest first.
    let mut idle = Vec::new();
    for _ in 3..cap {
        idle.push(one_request(gw.admin).await);
    }
    // A new client (Prometheus, a health check) is answered; it keeps its connection.
    let _newcomer = tokio::time::timeout(Duration::from_secs(10), one_request(gw.admin))
        .await
        .expect("a new admin client is answered while every slot is held by an idle connection");
    gw.log_line(&["admin connection limit reached", "limit=256"])
        .await;
    // The HTTP/2 connection, idle longest, was closed for it (GOAWAY, then the end).
    tokio::time::timeout(Duration::from_secs(10), h2_task)
        .await
        .expect("the HTTP/2 connection idle longest is closed")
        .unwrap();
    // And the next new client takes the slot of the oldest HTTP/1.1 one.
    let r = tokio::time::timeout(Duration::from_secs(10), get(gw.admin, "/healthz", &[]))
        .await
        .expect("a second new admin client is answered");
    assert_eq!(r.status, 200);
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), idle[0].read(&mut b))
        .await
        .expect("the HTTP/1.1 connection idle longest is closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The ones in the middle of a request were not: they finish it.
    for s in [&mut midway, &mut pipelined] {
        s.write_all(b"\r\n").await.unwrap();
        assert!(read_response(s).await.starts_with("HTTP/1.1 200"));
    }
    // Nor the others.
    let last = idle.last_mut().unwrap();
    last.write_all(GET).await.unwrap();
    assert!(read_response(last).await.starts_with("HTTP/1.1 200"));
}

/// A client that asks for a large answer and never reads it held its connection, and
/// one of the 256 slots, for good: in the middle of a response, it is never the one
/// closed to make room, and nothing bounded the write. Now a write that makes no
/// progress for `header_read_timeout` closes the connection, the rest of the answer
/// unsent.
#[tokio::test]
async fn an_admin_client_that_reads_nothing_is_closed() {
    // /metrics is about 9 MB, more than the socket buffers of both sides hold (4 MiB at
    // most on the gateway's, with Linux' defaults).
    let gw = Process::start(&large_config());
    let pid = gw.child.id();
    let before = sockets(pid);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    // Accepted, then closed by the gateway: its writes waited 1 s (allowed: 20).
    let t0 = Instant::now();
    while sockets(pid) == before {
        assert!(t0.elapsed() < Duration::from_secs(10), "never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while sockets(pid) > before {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "an admin connection whose client reads nothing is still open after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the kernel already held arrives, then the end: the answer is cut short.
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the connection ends once what was sent is read")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .unwrap();
    assert!(
        len > 8_000_000 && body.len() < len,
        "{} of {len} bytes arrived",
        body.len()
    );
}

/// A config whose `/metrics` is about 9 MB: 10,000 tenants with long ids and four
/// limits; `header_read_timeout` is 1 s.
fn large_config() -> String {
    let mut toml = format!(
        "[server]\nheader_read_timeout = \"1s\"\n[defaults.limits]\nrequests_per_second = 10\nburst = 10\nmax_body = \"1MiB\"\nmax_in_flight = 5\n{TENANT}"
    );
    for i in 0..10_000 {
        let id = format!("tenant-{i:05}-{}", "x".repeat(50));
        toml += &format!("[tenants.{id}]\nhosts = [\"{id}.com\"]\nupstream = \"u\"\n");
    }
    toml
}

/// A client that drip-feeds a request head, a byte every 100 ms (each well within
/// `header_read_timeout` of the one before), cannot hold its connection open: the whole
/// head must arrive within `header_read_timeout` of when the gateway began waiting for
/// it (hyper's timer is set once per head, not restarted by bytes), so it is closed,
/// with a 408. On a new connection, and on one after its first answer. (No defect
/// found: pins it.)
#[tokio::test]
async fn a_request_head_sent_a_byte_at_a_time_is_bounded_as_a_whole() {
    let gw = Gateway::start(&format!("[server]\nheader_read_timeout = \"1s\"\n{TENANT}"));
    async fn drip(mut s: TcpStream) -> String {
        let t0 = Instant::now();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\nx-drip: ")
            .await
            .unwrap();
        let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "a head sent a byte every 100 ms is still being read after {:?}",
                        t0.elapsed()
                    );
                    // Fails once the gateway has closed; the read then says so.
                    let _ = s.write_all(b"a").await;
                }
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }
    let fresh = TcpStream::connect(gw.admin).await.unwrap();
    let mut kept = TcpStream::connect(gw.admin).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    let (fresh, kept) = tokio::join!(drip(fresh), drip(kept));
    // The 408 is lost when the gateway's close, with a byte unread, resets.
    for got in [fresh, kept] {
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got:?}");
    }
}

/// Over HTTP/2 a header block cannot be held open either: a HEADERS frame without
/// END_HEADERS, then a few CONTINUATION frames (more than a handful is refused as a
/// flood), then nothing. While a block is open its client may send no other frame, so
/// it cannot answer the keep-alive PING, and the connection is closed after
/// `header_read_timeout` twice (interval, then the wait for the answer). (No defect
/// found: pins it.)
#[tokio::test]
async fn an_http2_header_block_left_unfinished_is_closed() {
    let gw = Gateway::start(&format!("[server]\nheader_read_timeout = \"1s\"\n{TENANT}"));
    let mut s = TcpStream::connect(gw.admin).await.unwrap();
    let frame = |kind: u8, flags: u8, stream: u8, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, stream]);
        f.extend_from_slice(payload);
        f
    };
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                         // HEADERS, END_STREAM: `:method: GET`, then `x-drip`, a value of 100 bytes to come.
    start.extend(frame(0x1, 0x1, 1, b"\x82\x00\x06x-drip\x64"));
    s.write_all(&start).await.unwrap();
    let t0 = Instant::now();
    let (mut sent, mut buf) = (0, [0u8; 1024]);
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the gateway's SETTINGS, its PING, then its GOAWAY
            },
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "an unfinished header block is still open after {:?}",
                    t0.elapsed()
                );
                if sent < 4 {
                    // CONTINUATION: a byte of the value.
                    let _ = s.write_all(&frame(0x9, 0, 1, b"a")).await;
                    sent += 1;
                }
            }
        }
    }
}

/// An HTTP/2 admin client that reads its socket and answers the keep-alive PINGs, but
/// never opens its flow-control window, asking for `/metrics` of a large config (about
/// 9 MB) on every stream it may open. Its socket never stalls, so the write bound never
/// fired; each answer, rendered whole, waited in the gateway for a window that never
/// came (in hyper, or handed to the `h2` crate whole, the connection then taken for
/// idle): about 9 MB per stream, held for as long as the client kept its connection.
/// Some connections start every stream's window at 0, the others leave the default
/// 65,535 bytes and never give back what arrives. Before, 8 connections of 16 streams
/// grew the gateway by about 1.3 GB, and 5 to 7 of them were still open after 30 s.
/// Now a connection has at most 4 streams, and one whose response waits
/// `header_read_timeout` for its client to take its next piece is closed: about 0.3 GB
/// at the peak, every connection closed.
#[tokio::test]
async fn an_http2_admin_client_that_never_opens_its_window_is_closed() {
    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 16;
    let gw = Process::start(&large_config());
    // One whole answer first: the pages one render takes count in the baseline.
    let r = get(gw.admin, "/metrics", &[]).await;
    assert!(r.body.len() > 8_000_000, "{} bytes", r.body.len());
    let (peak_before, _) = gw.memory_kib();
    let admin = gw.admin;
    let mut connections = Vec::new();
    for i in 0..CONNECTIONS {
        let tcp = TcpStream::connect(admin).await.unwrap();
        let mut builder = h2::client::Builder::new();
        if i % 2 == 0 {
            builder.initial_window_size(0);
        }
        let (client, connection) = builder.handshake::<_, Bytes>(tcp).await.unwrap();
        // Reads the socket and answers PINGs, and ends once the gateway has closed.
        connections.push(tokio::spawn(connection));
        for _ in 0..STREAMS {
            let client = client.clone();
            tokio::spawn(async move {
                // Past the gateway's SETTINGS_MAX_CONCURRENT_STREAMS, waits here.
                let Ok(mut client) = client.ready().await else {
                    return;
                };
                let req = http::Request::get(format!("http://{admin}/metrics"))
                    .body(())
                    .unwrap();
                let Ok((response, _)) = client.send_request(req, true) else {
                    return;
                };
                // The body is kept and never read: no capacity is released.
                if let Ok(response) = response.await {
                    let _body = response.into_body();
                    std::future::pending::<()>().await;
                }
            });
        }
    }
    let t0 = Instant::now();
    let mut open = 0;
    for c in connections {
        let left = Duration::from_secs(30).saturating_sub(t0.elapsed());
        if tokio::time::timeout(left, c).await.is_err() {
            open += 1;
        }
    }
    let (peak, now) = gw.memory_kib();
    let grew = peak.saturating_sub(peak_before) / 1024;
    eprintln!(
        "VmHWM {} -> {} MiB (+{grew} MiB), VmRSS now {} MiB, {open} of {CONNECTIONS} connections open after {:?}",
        peak_before / 1024,
        peak / 1024,
        now / 1024,
        t0.elapsed()
    );
    assert_eq!(
        open, 0,
        "admin connections whose client never opens its window are still open after 30 s (resident memory grew by {grew} MiB)"
    );
    assert!(
        grew < 512,
        "resident memory grew by {grew} MiB for {CONNECTIONS} connections of {STREAMS} streams"
    );
    // A client that takes its answer gets it whole, in pieces as it opens its window.
    let (mut h2, _conn) = h2c_at::<http_body_util::Empty<Bytes>>(admin).await;
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{admin}/metrics"))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(body.len() > 8_000_000, "{} bytes", body.len());
    assert!(body.ends_with(b"\n"));
}
