//! Per-tenant metrics: exact values after known traffic, the exposition accepted by
//! `promtool`, a real Prometheus server scraping it, removed tenants disappearing, and
//! unknown hosts creating no series.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead::snapshot::Snapshot;
use bulkhead::Config;
use support::*;

async fn metrics_text(admin: std::net::SocketAddr) -> String {
    let r = get(admin, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// `name{labels} value` lines, keyed by `name{labels}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test.sh installs the Debian prometheus package)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const TWO_TENANTS: &str = r#"
[upstreams.u]
targets = ["UP"]
[upstreams.dead]
targets = ["DEAD"]
[defaults]
upstream = "u"
[tenants.alpha]
hosts = ["alpha.com"]
[tenants.alpha.limits]
requests_per_second = 0.001
burst = 3
max_in_flight = 50
[[tenants.alpha.routes]]
prefix = "/dead"
upstream = "dead"
[tenants.beta]
hosts = ["beta.com"]
"#;

async fn two_tenant_gateway() -> (Gateway, Upstream) {
    let up = Upstream::echo("u").await;
    let dead_guard = Refused::new();
    let dead = dead_guard.addr();
    let gw = Gateway::start(
        &TWO_TENANTS
            .replace("UP", &up.addr.to_string())
            .replace("DEAD", &dead.to_string()),
    );
    (gw, up)
}

#[tokio::test]
async fn exact_counters_after_known_traffic() {
    let (gw, _up) = two_tenant_gateway().await;
    // alpha: burst 3, then 429s; one of the admitted is a 502 on the dead route.
    let mut alpha_bytes_out = 0;
    for _ in 0..2 {
        let r = send(
            gw.addr,
            "POST",
            "/",
            &[("host", "alpha.com")],
            vec![b'x'; 100].into(),
        )
        .await;
        assert_eq!(r.status, 200);
        alpha_bytes_out += r.body.len();
    }
    let r = get(gw.addr, "/dead", &[("host", "alpha.com")]).await;
    assert_error(&r, 502, "upstream_error");
    alpha_bytes_out += r.body.len();
    for _ in 0..4 {
        let r = get(gw.addr, "/", &[("host", "alpha.com")]).await;
        assert_error(&r, 429, "rate_limited");
        alpha_bytes_out += r.body.len();
    }
    // beta: 5 × 200 with 10-byte bodies; one unknown host.
    let mut beta_bytes_out = 0;
    for _ in 0..5 {
        let r = send(
            gw.addr,
            "PUT",
            "/",
            &[("host", "beta.com")],
            vec![b'y'; 10].into(),
        )
        .await;
        assert_eq!(r.status, 200);
        beta_bytes_out += r.body.len();
    }
    assert_error(
        &get(gw.addr, "/", &[("host", "nobody.com")]).await,
        404,
        "unknown_tenant",
    );

    // The last response's accounting runs when its body is done; give it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = metrics_text(gw.admin).await;
    let m = samples(&text);
    let v = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(
        v(r#"bulkhead_requests_total{tenant="alpha",status="200"}"#),
        2.0
    );
    assert_eq!(
        v(r#"bulkhead_requests_total{tenant="alpha",status="502"}"#),
        1.0
    );
    assert_eq!(
        v(r#"bulkhead_requests_total{tenant="alpha",status="429"}"#),
        4.0
    );
    assert_eq!(
        v(r#"bulkhead_requests_total{tenant="beta",status="200"}"#),
        5.0
    );
    assert_eq!(
        v(r#"bulkhead_requests_total{tenant="_unknown",status="404"}"#),
        1.0
    );
    assert_eq!(
        v(r#"bulkhead_rejected_total{tenant="alpha",reason="rate_limited"}"#),
        4.0
    );
    assert_eq!(
        v(r#"bulkhead_rejected_total{tenant="alpha",reason="upstream_error"}"#),
        1.0
    );
    assert_eq!(
        v(r#"bulkhead_rejected_total{tenant="_unknown",reason="unknown_tenant"}"#),
        1.0
    );
    assert_eq!(
        v(r#"bulkhead_upstream_errors_total{tenant="alpha",upstream="dead",kind="connect"}"#),
        1.0
    );
    assert_eq!(
        v(r#"bulkhead_request_body_bytes_total{tenant="alpha"}"#),
        200.0
    );
    assert_eq!(
        v(r#"bulkhead_request_body_bytes_total{tenant="beta"}"#),
        50.0
    );
    assert_eq!(
        v(r#"bulkhead_response_body_bytes_total{tenant="alpha"}"#),
        alpha_bytes_out as f64
    );
    assert_eq!(
        v(r#"bulkhead_response_body_bytes_total{tenant="beta"}"#),
        beta_bytes_out as f64
    );
    assert_eq!(
        v(r#"bulkhead_request_duration_seconds_count{tenant="alpha"}"#),
        7.0
    );
    assert_eq!(
        v(r#"bulkhead_request_duration_seconds_bucket{tenant="alpha",le="+Inf"}"#),
        7.0
    );
    assert_eq!(
        v(r#"bulkhead_request_duration_seconds_count{tenant="beta"}"#),
        5.0
    );
    assert_eq!(v(r#"bulkhead_in_flight{tenant="alpha"}"#), 0.0);
    assert_eq!(
        v(r#"bulkhead_tenant_limit{tenant="alpha",limit="burst"}"#),
        3.0
    );
    assert_eq!(
        v(r#"bulkhead_tenant_limit{tenant="alpha",limit="requests_per_second"}"#),
        0.001
    );
    assert_eq!(
        v(r#"bulkhead_tenant_limit{tenant="alpha",limit="max_in_flight"}"#),
        50.0
    );
    assert!(!m
        .keys()
        .any(|k| k.contains("bulkhead_tenant_limit{tenant=\"beta\"")));
    assert_eq!(
        v(r#"bulkhead_tenant_info{tenant="alpha",status="active"}"#),
        1.0
    );
    assert_eq!(v(r#"bulkhead_config_reloads_total{result="failure"}"#), 0.0);
    assert!(m
        .keys()
        .any(|k| k.starts_with("bulkhead_config_info{version=")));
    promtool_check(&text);
}

#[tokio::test]
async fn removed_tenant_series_are_gone_after_a_reload() {
    let (gw, up) = two_tenant_gateway().await;
    assert_eq!(get(gw.addr, "/", &[("host", "beta.com")]).await.status, 200);
    assert_eq!(
        get(gw.addr, "/", &[("host", "alpha.com")]).await.status,
        200
    );
    assert!(metrics_text(gw.admin).await.contains("tenant=\"beta\""));

    let without_beta = TWO_TENANTS
        .split("[tenants.beta]")
        .next()
        .unwrap()
        .replace("UP", &up.addr.to_string())
        .replace("DEAD", "127.0.0.1:1");
    let config = Config::parse(Path::new("t.toml"), &with_test_listeners(&without_beta)).unwrap();
    let shared = &gw.running.as_ref().unwrap().shared;
    shared.snapshot.store(Arc::new(
        Snapshot::build(&config, Some(&shared.snapshot.load())).unwrap(),
    ));

    let text = metrics_text(gw.admin).await;
    assert!(!text.contains("tenant=\"beta\""), "{text}");
    // alpha's counters carried over.
    let m = samples(&text);
    assert_eq!(
        m[r#"bulkhead_requests_total{tenant="alpha",status="200"}"#],
        1.0
    );
}

#[tokio::test]
async fn a_real_prometheus_scrapes_per_tenant_values() {
    let (gw, _up) = two_tenant_gateway().await;
    for _ in 0..3 {
        assert_eq!(
            get(gw.addr, "/", &[("host", "alpha.com")]).await.status,
            200
        );
    }
    for _ in 0..7 {
        assert_eq!(get(gw.addr, "/", &[("host", "beta.com")]).await.status, 200);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: bulkhead\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // Prometheus on a port that was free a moment ago; when another process took it in
    // between, Prometheus exits, and is started again on another.
    let spawn = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus is installed (scripts/test.sh installs the Debian prometheus package)",
            );
        (port, Kill(child))
    };
    let (mut port, mut prom) = spawn();
    let query = "sum by (tenant) (bulkhead_requests_total)";
    let url = format!(
        "/api/v1/query?query={}",
        query
            .replace(' ', "%20")
            .replace('(', "%28")
            .replace(')', "%29")
    );
    let t0 = Instant::now();
    let found = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Prometheus never returned the values"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !matches!(prom.0.try_wait(), Ok(None)) {
            drop(prom);
            (port, prom) = spawn();
            continue;
        }
        let prom_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), async {
            let c = client();
            c.request(
                http::Request::get(format!("http://{prom_addr}{url}"))
                    .body(Default::default())
                    .unwrap(),
            )
            .await
        })
        .await
        else {
            continue;
        };
        let r = read(resp).await;
        if r.status != 200 {
            continue;
        }
        let j = r.json();
        let mut by_tenant = BTreeMap::new();
        for s in j["data"]["result"].as_array().unwrap() {
            let v: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
            by_tenant.insert(s["metric"]["tenant"].as_str().unwrap().to_owned(), v);
        }
        if by_tenant.len() == 2 {
            break by_tenant;
        }
    };
    assert_eq!(found["alpha"], 3.0);
    assert_eq!(found["beta"], 7.0);
}

/// Many requests with random unknown hosts, through the real binary: no new series and
/// no memory growth beyond noise.
#[tokio::test]
async fn unknown_hosts_create_no_series_and_no_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo("u").await;
    let gw = Process::start(&format!(
        "[server]\nworkers = 2\naccess_log = false\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    // Pipelined HTTP/1.1 on a few connections, so the count is reached quickly.
    async fn flood(addr: std::net::SocketAddr, seed: u64, n: u64) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = s.split();
        let writer = async {
            let mut x = seed;
            let mut buf = Vec::with_capacity(64 * 1024);
            for i in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.extend_from_slice(
                    format!("GET / HTTP/1.1\r\nhost: h{x:016x}.example\r\n\r\n").as_bytes(),
                );
                if buf.len() > 60_000 || i + 1 == n {
                    wr.write_all(&buf).await.unwrap();
                    buf.clear();
                }
            }
        };
        let reader = async {
            let mut seen = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            let needle = b"HTTP/1.1 404";
            let mut carry = Vec::new();
            while seen < n {
                let k = rd.read(&mut buf).await.unwrap();
                assert!(k > 0, "connection closed after {seen} responses");
                carry.extend_from_slice(&buf[..k]);
                let mut i = 0;
                while let Some(p) = carry[i..].windows(needle.len()).position(|w| w == needle) {
                    seen += 1;
                    i += p + needle.len();
                }
                carry.drain(..i);
            }
        };
        tokio::join!(writer, reader);
    }
    // Warm up, then measure.
    flood(gw.addr, 1, 20_000).await;
    let before = metrics_text(gw.admin).await;
    let (_, rss_before) = gw.memory_kib();
    let per_conn = 125_000;
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let addr = gw.addr;
            tokio::spawn(async move { flood(addr, 0x9e37_79b9 + i, per_conn).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (_, rss_after) = gw.memory_kib();
    let after = metrics_text(gw.admin).await;
    let series = |t: &str| samples(t).keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        series(&before),
        series(&after),
        "1,000,000 unknown hosts changed the series set"
    );
    let m = samples(&after);
    assert_eq!(
        m[r#"bulkhead_requests_total{tenant="_unknown",status="404"}"#],
        1_020_000.0
    );
    let grown_mib = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
    assert!(
        grown_mib < 8.0,
        "RSS grew by {grown_mib:.1} MiB ({rss_before} → {rss_after} KiB)"
    );
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[server]\nmetrics = false\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
    assert_error(
        &get(gw.addr, "/", &[("host", "x.com")]).await,
        404,
        "unknown_tenant",
    );
    let text = metrics_text(gw.admin).await;
    assert!(!text.contains("bulkhead_requests_total"), "{text}");
    assert!(!text.contains("bulkhead_rejected_total"), "{text}");
    assert!(
        text.contains("bulkhead_request_body_bytes_total{tenant=\"t\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("bulkhead_tenant_info{tenant=\"t\",status=\"active\"} 1"),
        "{text}"
    );
}
