//! `GET /metrics` under concurrent scrapes of a large config: scrapes waiting at the same
//! time share one render, a scrape still sees every count made before it arrived, the
//! renders alive at once are capped, and health checks are answered while one runs.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::task::Poll;

use bytes::Bytes;
use support::*;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// A config whose `/metrics` is about 9 MB: 10,000 tenants with long ids and four
/// limits, and a tenant `t` whose upstream refuses connections (its requests are 502s).
fn large_config(header_read_timeout: &str) -> String {
    let mut toml = format!(
        "[server]\nheader_read_timeout = \"{header_read_timeout}\"\n[defaults.limits]\nrequests_per_second = 1000\nburst = 1000\nmax_body = \"1MiB\"\nmax_in_flight = 5\n\
         [upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    );
    for i in 0..10_000 {
        let id = format!("tenant-{i:05}-{}", "x".repeat(50));
        toml += &format!("[tenants.{id}]\nhosts = [\"{id}.com\"]\nupstream = \"u\"\n");
    }
    toml
}

/// The series (`name{labels}`) of an exposition, checking that every line is a
/// comment or a sample with a number.
fn series(text: &[u8]) -> BTreeSet<String> {
    let text = std::str::from_utf8(text).expect("the exposition is UTF-8");
    assert!(
        text.ends_with('\n'),
        "cut short: {:?}",
        &text[text.len().saturating_sub(80)..]
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l:?}"));
            v.parse::<f64>()
                .unwrap_or_else(|_| panic!("not a value: {l:?}"));
            k.to_owned()
        })
        .collect()
}

/// The value of one sample in an exposition, 0 when it is left out.
fn value(text: &[u8], series: &str) -> f64 {
    String::from_utf8_lossy(text)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// An HTTP/2 connection whose streams start with a flow-control window of 0: an answer
/// stays whole in the gateway until the returned sender is used, which gives every
/// stream a window of 1 MiB.
async fn h2_shut(addr: SocketAddr) -> (h2::client::SendRequest<Bytes>, oneshot::Sender<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, mut connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let (open, opened) = oneshot::channel();
    tokio::spawn(async move {
        tokio::select! {
            _ = &mut connection => return,
            _ = opened => {}
        }
        connection.set_initial_window_size(1 << 20).unwrap();
        let _ = connection.await;
    });
    (client, open)
}

/// Sends `GET /metrics` on `client`; the response head's future.
async fn scrape_on(
    client: &h2::client::SendRequest<Bytes>,
    admin: SocketAddr,
) -> h2::client::ResponseFuture {
    let mut client = client.clone().ready().await.unwrap();
    let req = http::Request::get(format!("http://{admin}/metrics"))
        .body(())
        .unwrap();
    client.send_request(req, true).unwrap().0
}

/// Takes a whole body, giving back the window as it goes.
async fn take_all(mut body: h2::RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        out.extend_from_slice(&chunk);
    }
    out
}

/// 32 scrapes sent at once, over 8 HTTP/2 connections that leave every answer in the
/// gateway until all 32 response heads have arrived. Each scrape rendered its own copy
/// (about 9 MB) and held it while its client read: before, the gateway grew by about
/// 290 MB, 32 answers. Now scrapes that wait at the same time share one render: a few
/// answers' worth. Each answer is still whole and names the same series.
#[tokio::test]
async fn concurrent_scrapes_of_a_large_config_share_their_renders() {
    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 4;
    let gw = Process::start(&large_config("60s"));
    let admin = gw.admin;
    // One whole answer first: the pages one render takes count in the baseline.
    let first = get(admin, "/metrics", &[]).await;
    assert_eq!(first.status, 200);
    let size = first.body.len();
    assert!(size > 8_000_000, "{size} bytes");
    let want = series(&first.body);
    let (peak_before, _) = gw.memory_kib();

    let (mut opens, mut heads) = (Vec::new(), Vec::new());
    for _ in 0..CONNECTIONS {
        let (client, open) = h2_shut(admin).await;
        for _ in 0..STREAMS {
            heads.push(scrape_on(&client, admin).await);
        }
        opens.push((client, open));
    }
    // Every head has arrived: every render is done, and each answer waits whole for a
    // window.
    let mut bodies = Vec::new();
    for head in futures_util::future::join_all(heads).await {
        let response = head.unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    let (peak, _) = gw.memory_kib();
    let grew_kib = peak.saturating_sub(peak_before);
    let answers = grew_kib as f64 * 1024.0 / size as f64;
    eprintln!(
        "VmHWM {} -> {} MiB: +{answers:.1} answers of {size} bytes for {} scrapes",
        peak_before / 1024,
        peak / 1024,
        CONNECTIONS * STREAMS
    );
    for (_, open) in opens {
        open.send(()).unwrap();
    }
    let taken = futures_util::future::join_all(bodies.into_iter().map(take_all)).await;
    for body in &taken {
        assert!(body.len() > 8_000_000, "{} bytes", body.len());
        assert_eq!(series(body), want);
    }
    assert!(
        answers < 8.0,
        "resident memory grew by {answers:.1} answers ({} MiB) for {} concurrent scrapes",
        grew_kib / 1024,
        CONNECTIONS * STREAMS
    );
}

/// A scrape sees every count made before it arrived, even when it arrives while
/// another scrape's render is running (that render began before the counts): it waits
/// for the next one. Tried until the first scrape was seen still unanswered when the
/// second was sent.
#[tokio::test]
async fn a_scrape_during_a_render_sees_the_counts_made_before_it() {
    let gw = Process::start(&large_config("10s"));
    let admin = gw.admin;
    let key = r#"bulkhead_requests_total{tenant="t",status="502"}"#;
    let (client, _conn) = h2c_at::<http_body_util::Empty<Bytes>>(admin).await;
    let (mut sent, mut overlapped) = (0.0, 0);
    for _ in 0..5 {
        let mut client = client.clone();
        let first = tokio::spawn(async move {
            let req = http::Request::get(format!("http://{admin}/metrics"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let response = client.send_request(req).await.unwrap();
            http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes()
        });
        for _ in 0..3 {
            assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 502);
            sent += 1.0;
        }
        let running = !first.is_finished();
        let second = get(admin, "/metrics", &[]).await;
        assert_eq!(second.status, 200);
        assert_eq!(
            value(&second.body, key),
            sent,
            "{sent} requests made before"
        );
        let first = first.await.unwrap();
        assert!(value(&first, key) <= sent);
        if running {
            overlapped += 1;
            break;
        }
    }
    assert!(
        overlapped > 0,
        "the first scrape was answered before the second was sent every time"
    );
}

/// A health check sent on the same HTTP/2 connection just after a scrape of a large
/// config is answered while the scrape's render runs. Before, the render ran on the
/// admin thread and held up every other admin request until it was done: the health
/// check's answer always came after the scrape's head.
#[tokio::test]
async fn a_health_check_is_answered_while_a_render_runs() {
    let gw = Process::start(&large_config("10s"));
    let admin = gw.admin;
    let (client, _conn) = h2c_at::<http_body_util::Empty<Bytes>>(admin).await;
    let request = |path: &str| {
        http::Request::get(format!("http://{admin}{path}"))
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let mut first = 0;
    for _ in 0..3 {
        let mut c = client.clone();
        let metrics = c.send_request(request("/metrics"));
        let mut metrics = Box::pin(metrics);
        // Sends the scrape's HEADERS before the health check's.
        assert!(futures_util::poll!(metrics.as_mut()).is_pending());
        let health = client
            .clone()
            .send_request(request("/healthz"))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let response = match futures_util::poll!(metrics.as_mut()) {
            Poll::Ready(response) => response.unwrap(),
            Poll::Pending => {
                first += 1;
                metrics.await.unwrap()
            }
        };
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(body.len() > 8_000_000, "{} bytes", body.len());
    }
    assert!(
        first > 0,
        "the health check was answered after the scrape's render every time"
    );
}

/// Clients that each keep an answer of a different render waiting, taking a piece now
/// and then (so they are not closed as stalled), hold that render's bytes: without a
/// cap, 256 connections × 4 streams of them could hold 1,024 renders (9 GB for this
/// config). At most 8 renders are alive at once; a scrape beyond them waits
/// `header_read_timeout` for one to go, then gets 503 `too_many_scrapes` with
/// `Retry-After`. Once a client lets its answer go, scrapes are answered again. Before,
/// the ninth scrape got its own 9 MB like the others.
#[tokio::test]
async fn renders_alive_at_once_are_capped() {
    const MAX_RENDERS: usize = 8;
    let gw = Process::start(&large_config("2s"));
    let admin = gw.admin;
    let mut holders = Vec::new();
    for _ in 0..MAX_RENDERS {
        // One after another: each scrape arrives after the render before has ended, so
        // it gets a render of its own.
        let client = h2_open(admin).await;
        let response = scrape_on(&client, admin).await.await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        holders.push(tokio::spawn(async move {
            let _client = client;
            // A piece now and then: well within header_read_timeout of the last.
            while let Some(Ok(chunk)) = body.data().await {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
        }));
    }
    let refused = get(admin, "/metrics", &[]).await;
    assert_eq!(
        refused.status,
        503,
        "a ninth render while 8 are held: {} bytes",
        refused.body.len()
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"], "too_many_scrapes");
    assert!(refused.json()["message"]
        .as_str()
        .unwrap()
        .contains("8 renders"));
    // The health checks are answered meanwhile.
    assert_eq!(get(admin, "/healthz", &[]).await.status, 200);
    // One client lets its answer go (its stream is reset): its render goes, and the
    // next scrape is answered whole.
    holders.pop().unwrap().abort();
    let answered = get(admin, "/metrics", &[]).await;
    assert_eq!(answered.status, 200);
    assert!(
        answered.body.len() > 8_000_000,
        "{} bytes",
        answered.body.len()
    );
    series(&answered.body);
}

/// An HTTP/2 connection with the default windows, driven in the background.
async fn h2_open(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    client
}
