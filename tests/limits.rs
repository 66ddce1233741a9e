//! Per-tenant limits through real sockets: rate and burst, body size, in-flight caps,
//! per-client rates, and limiter state across snapshot swaps.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead::snapshot::Snapshot;
use bulkhead::Config;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

fn assert_rate_limited(r: &Reply) -> u64 {
    assert_error(r, 429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(r.header("ratelimit-policy"), Some("\"tenant\";q=5;w=1"));
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"tenant\";r=0;t={retry}").as_str())
    );
    retry
}

#[tokio::test]
async fn rate_and_burst_per_tenant_and_no_starvation() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        r#"
[upstreams.u]
targets = ["{}"]
[defaults]
upstream = "u"
[tenants.limited]
hosts = ["limited.com"]
[tenants.limited.limits]
requests_per_second = 10
burst = 5
[tenants.other]
hosts = ["other.com"]
"#,
        up.addr
    ));
    // Hammer the other tenant at the same time.
    let addr = gw.addr;
    let other = tokio::spawn(async move {
        let mut ok = 0;
        for _ in 0..200 {
            if get(addr, "/", &[("host", "other.com")]).await.status == 200 {
                ok += 1;
            }
        }
        ok
    });
    let mut admitted = 0;
    let mut retry_after = 0;
    for _ in 0..40 {
        let r = get(gw.addr, "/", &[("host", "limited.com")]).await;
        if r.status == 200 {
            admitted += 1;
            assert_eq!(r.header("ratelimit-policy"), Some("\"tenant\";q=5;w=1"));
            assert!(r.header("ratelimit").unwrap().starts_with("\"tenant\";r="));
        } else {
            retry_after = assert_rate_limited(&r);
        }
    }
    assert!((5..=7).contains(&admitted), "admitted {admitted} of 40");
    assert_eq!(
        other.await.unwrap(),
        200,
        "the other tenant was never limited"
    );
    assert!(
        up.seen()
            .iter()
            .filter(|s| s.headers["x-tenant-id"] == "limited")
            .count()
            == admitted
    );

    // After waiting Retry-After, requests are admitted again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let r = get(gw.addr, "/", &[("host", "limited.com")]).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
}

#[tokio::test]
async fn retry_after_comes_from_the_limiter() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[upstreams.u]\ntargets = [\"{}\"]\n[tenants.slow]\nhosts = [\"slow.com\"]\nupstream = \"u\"\n[tenants.slow.limits]\nrequests_per_second = 0.2\nburst = 1\n",
        up.addr
    ));
    assert_eq!(get(gw.addr, "/", &[("host", "slow.com")]).await.status, 200);
    let r = get(gw.addr, "/", &[("host", "slow.com")]).await;
    assert_error(&r, 429, "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (4..=5).contains(&retry),
        "one request per 5 s: Retry-After {retry}"
    );
}

async fn body_gateway() -> (Gateway, Upstream) {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n[tenants.t.limits]\nmax_body = \"1KiB\"\n",
        up.addr
    ));
    (gw, up)
}

#[tokio::test]
async fn body_over_max_with_content_length_never_reaches_upstream() {
    let (gw, up) = body_gateway().await;
    let r = send(
        gw.addr,
        "POST",
        "/",
        &[("host", "t.com")],
        pattern(2048).into(),
    )
    .await;
    assert_error(&r, 413, "body_too_large");
    assert!(up.seen().is_empty(), "the upstream saw a request");
    // Exactly the limit passes.
    let r = send(
        gw.addr,
        "POST",
        "/",
        &[("host", "t.com")],
        pattern(1024).into(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.seen()[0].body, Digest::of(&pattern(1024)));
}

#[tokio::test]
async fn chunked_body_crossing_max_is_cut_at_the_cap() {
    let (gw, up) = body_gateway().await;
    let client: Client<_, PatternBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(gw.url("/"))
        .header("host", "t.com")
        .body(PatternBody::chunked_by(2048, 256))
        .unwrap();
    let r = read(client.request(req).await.unwrap()).await;
    assert_error(&r, 413, "body_too_large");
    for s in up.seen() {
        assert!(
            s.body.len <= 1024,
            "the upstream received {} bytes",
            s.body.len
        );
    }
    // A chunked body of exactly 1 KiB passes whole.
    let req = Request::post(gw.url("/"))
        .header("host", "t.com")
        .body(PatternBody::chunked_by(1024, 100))
        .unwrap();
    let r = read(client.request(req).await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.seen().last().unwrap().body, Digest::of(&pattern(1024)));
}

async fn in_flight_gateway() -> (Gateway, Upstream) {
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_millis(800))).await;
    let big = Upstream::start(
        "big",
        Behavior::Bytes {
            len: 256 << 20,
            chunked: true,
        },
    )
    .await;
    let dead_guard = Refused::new();
    let dead = dead_guard.addr();
    let gw = Gateway::start(&format!(
        r#"
[upstreams.slow]
targets = ["{}"]
[upstreams.big]
targets = ["{}"]
[upstreams.dead]
targets = ["{dead}"]
[tenants.t]
hosts = ["t.com"]
upstream = "slow"
[tenants.t.limits]
max_in_flight = 2
[[tenants.t.routes]]
prefix = "/big"
upstream = "big"
[[tenants.t.routes]]
prefix = "/dead"
upstream = "dead"
"#,
        slow.addr, big.addr
    ));
    (gw, slow)
}

async fn concurrent(gw: std::net::SocketAddr, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(gw, "/slow", &[("host", "t.com")]).await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn in_flight_cap_and_no_leaked_permits() {
    let (gw, _slow) = in_flight_gateway().await;
    let replies = concurrent(gw.addr, 5).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(
        ok,
        2,
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_error(r, 503, "too_many_in_flight");
        assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    }
    assert_eq!(in_flight(&gw, "t"), 0);
    let again = concurrent(gw.addr, 2).await;
    assert!(again.iter().all(|r| r.status == 200));

    // Upstream errors give their permit back.
    for _ in 0..5 {
        assert_error(
            &get(gw.addr, "/dead", &[("host", "t.com")]).await,
            502,
            "upstream_error",
        );
    }
    assert_eq!(in_flight(&gw, "t"), 0);

    // A client that goes away before the response head.
    let addr = gw.addr;
    let gone = tokio::time::timeout(
        Duration::from_millis(200),
        get(addr, "/slow", &[("host", "t.com")]),
    )
    .await;
    assert!(gone.is_err(), "the slow request should still be running");
    wait_in_flight_zero(&gw, "t", "in-flight").await;

    // A client that goes away in the middle of a large response body.
    {
        let c = client();
        let resp = c
            .request(
                Request::get(gw.url("/big"))
                    .header("host", "t.com")
                    .body(Default::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            in_flight(&gw, "t"),
            1,
            "the permit is held while the body streams"
        );
        drop(resp);
        drop(c);
    }
    wait_in_flight_zero(&gw, "t", "in-flight").await;
    let again = concurrent(gw.addr, 2).await;
    assert!(again.iter().all(|r| r.status == 200));
}

#[tokio::test]
async fn per_client_buckets_behind_a_trusted_proxy_and_pruning() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        r#"
[server]
workers = 2
trusted_proxies = ["127.0.0.1/32"]
limiter_prune_interval = "1s"
[upstreams.u]
targets = ["{}"]
[tenants.t]
hosts = ["t.com"]
upstream = "u"
[tenants.t.limits]
per_client_requests_per_second = 50
per_client_burst = 2
"#,
        up.addr
    ));
    let from = |ip: &'static str| {
        let addr = gw.addr;
        async move { get(addr, "/", &[("host", "t.com"), ("x-forwarded-for", ip)]).await }
    };
    // Each client has its own bucket of 2.
    let mut statuses = Vec::new();
    for ip in [
        "203.0.113.1",
        "203.0.113.1",
        "203.0.113.1",
        "203.0.113.2",
        "203.0.113.2",
    ] {
        statuses.push(from(ip).await);
    }
    assert_eq!(
        statuses.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 200, 429, 200, 200]
    );
    assert_eq!(
        statuses[2].header("ratelimit-policy"),
        Some("\"client\";q=2;w=1")
    );
    assert!(statuses[2].json()["message"]
        .as_str()
        .unwrap()
        .contains("client"));

    // A flood of distinct clients: 1,000 through the gateway, 100,000 more straight
    // into the same limiter the gateway uses.
    for i in 0..1000u32 {
        let ip = format!("198.18.{}.{}", i / 256, i % 256);
        let r = get(gw.addr, "/", &[("host", "t.com"), ("x-forwarded-for", &ip)]).await;
        assert_eq!(r.status, 200);
    }
    let shared = gw.running.as_ref().unwrap().shared.clone();
    let keys = || {
        let snap = shared.snapshot.load();
        snap.tenant(snap.tenant_by_id("t").unwrap())
            .limits
            .client_keys()
    };
    // The pruner runs meanwhile, so sample how many keys were held at once.
    let mut most = 0;
    {
        let snap = shared.snapshot.load_full();
        let t = snap.tenant(snap.tenant_by_id("t").unwrap());
        for i in 0..100_000u32 {
            let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            assert!(t.limits.check_rate(&t.stats, Some(ip)).is_ok());
            if i % 1000 == 999 {
                most = most.max(t.limits.client_keys());
            }
        }
    }
    assert!(
        most >= 1000,
        "distinct clients create keys: at most {most} were held"
    );
    // Buckets refill within 40 ms; the pruner runs every second.
    let t0 = Instant::now();
    while keys() > 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still {} client keys",
            keys()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn untrusted_peer_cannot_pick_its_client_key() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n[tenants.t.limits]\nper_client_requests_per_second = 0.5\nper_client_burst = 1\n",
        up.addr
    ));
    // No trusted proxies: x-forwarded-for is ignored, the peer address is the key.
    let a = get(
        gw.addr,
        "/",
        &[("host", "t.com"), ("x-forwarded-for", "1.1.1.1")],
    )
    .await;
    let b = get(
        gw.addr,
        "/",
        &[("host", "t.com"), ("x-forwarded-for", "2.2.2.2")],
    )
    .await;
    assert_eq!((a.status, b.status), (200, 429));
}

const SWAP: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstreams.u]
targets = ["UP"]
[defaults]
upstream = "u"
[tenants.a]
hosts = ["a.com"]
[tenants.a.limits]
requests_per_second = A_RPS
burst = 2
max_in_flight = 10
[tenants.b]
hosts = ["b.com"]
features = ["B_FEATURE"]
"#;

fn swap_to(gw: &Gateway, up: &Upstream, a_rps: &str, b_feature: &str) {
    let text = SWAP
        .replace("UP", &up.addr.to_string())
        .replace("A_RPS", a_rps)
        .replace("B_FEATURE", b_feature);
    let config = Config::parse(Path::new("swap.toml"), &text).unwrap();
    let shared = &gw.running.as_ref().unwrap().shared;
    let next = Snapshot::build(&config, Some(&shared.snapshot.load())).unwrap();
    shared.snapshot.store(Arc::new(next));
}

#[tokio::test]
async fn snapshot_swap_keeps_unchanged_buckets() {
    let up = Upstream::echo("u").await;
    let text = SWAP
        .replace("UP", &up.addr.to_string())
        .replace("A_RPS", "0.1")
        .replace("B_FEATURE", "one");
    let gw = Gateway::start(&text);
    let a = |gw: &Gateway| {
        let addr = gw.addr;
        async move { get(addr, "/", &[("host", "a.com")]).await.status }
    };
    assert_eq!((a(&gw).await, a(&gw).await, a(&gw).await), (200, 200, 429));

    // Only tenant b changes: a's drained bucket stays drained.
    swap_to(&gw, &up, "0.1", "two");
    assert_eq!(a(&gw).await, 429, "the bucket was reset by the swap");
    let r = get(gw.addr, "/", &[("host", "b.com")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.seen().last().unwrap().headers["x-tenant-features"],
        "two"
    );

    // a's limit changes: the new limit applies from the next request, to what a had
    // left (nothing): still 429, but the wait is the new rate's (5 s a request, where
    // the old one's was 10 s).
    swap_to(&gw, &up, "0.2", "two");
    let r = get(gw.addr, "/", &[("host", "a.com")]).await;
    assert_error(&r, 429, "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry <= 5, "Retry-After {retry}");
}

#[tokio::test]
async fn unknown_tenants_create_no_limiter_state() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[upstreams.u]\ntargets = [\"{}\"]\n[defaults]\nupstream = \"u\"\n[defaults.limits]\nrequests_per_second = 1\nburst = 1\nper_client_requests_per_second = 1\n[tenants.t]\nhosts = [\"t.com\"]\n",
        up.addr
    ));
    for i in 0..50 {
        let host = format!("nobody{i}.com");
        assert_error(
            &get(gw.addr, "/", &[("host", &host)]).await,
            404,
            "unknown_tenant",
        );
    }
    let shared = &gw.running.as_ref().unwrap().shared;
    let snap = shared.snapshot.load();
    assert_eq!(snap.tenants.len(), 1);
    assert_eq!(snap.tenant(0).limits.client_keys(), 0);
    // And t's own bucket is untouched.
    assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
}

/// A reload that changes a tenant's rate or burst keeps what the tenant had left of
/// its burst (up to the new burst): cutting a flooding tenant's limit, or raising a
/// burst and lowering it again, hands it no fresh bucket. A tenant that had no rate
/// starts with a full one.
#[tokio::test]
async fn a_rate_change_on_reload_keeps_what_was_left_of_the_burst() {
    let up = Upstream::echo("u").await;
    let toml = |flood: &str, spare: &str| {
        format!(
            "[upstreams.u]\ntargets = [\"{}\"]\n[defaults]\nupstream = \"u\"\n\
             [tenants.flood]\nhosts = [\"flood.com\"]\n[tenants.flood.limits]\n{flood}\n\
             [tenants.spare]\nhosts = [\"spare.com\"]\n[tenants.spare.limits]\n{spare}\n",
            up.addr
        )
    };
    let rate = |per_second: f64, burst: u32| {
        format!("requests_per_second = {per_second}\nburst = {burst}")
    };
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &toml(&rate(0.01, 3), &rate(0.01, 4)));
    let addr = gw.addr;
    let admitted = |host: &'static str, n: usize| async move {
        let mut ok = 0;
        for _ in 0..n {
            if get(addr, "/", &[("host", host)]).await.status == 200 {
                ok += 1;
            }
        }
        ok
    };
    // One request of spare's: what its bucket has left after it (`RateLimit: …;r=N`).
    let spare_left = || async move {
        let r = get(addr, "/", &[("host", "spare.com")]).await;
        assert_eq!(r.status, 200);
        let v = r.header("ratelimit").unwrap().to_owned();
        v.split(';')
            .find_map(|p| p.strip_prefix("r="))
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    let reload = |flood: String, spare: String| {
        let path = path.clone();
        async move {
            write_config(&path, &toml(&flood, &spare));
            let r = send(gw.admin, "POST", "/reload", &[], bytes::Bytes::new()).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        }
    };
    assert_eq!(admitted("flood.com", 5).await, 3, "the burst, then 429");
    assert_eq!(spare_left().await, 3);

    // Burst raised: flood has nothing more to spend; spare keeps its 3 (then takes 1).
    reload(rate(0.01, 4), rate(0.01, 5)).await;
    assert_eq!(admitted("flood.com", 3).await, 0);
    assert_eq!(spare_left().await, 2);
    // Flood's rate cut: still nothing; spare's burst cut to 2, which its 2 fit.
    reload(rate(0.005, 4), rate(0.02, 2)).await;
    assert_eq!(admitted("flood.com", 3).await, 0);
    assert_eq!(spare_left().await, 1);
    // Back where they started: still nothing, and spare's last one.
    reload(rate(0.01, 3), rate(0.01, 4)).await;
    assert_eq!(admitted("flood.com", 3).await, 0);
    assert_eq!(spare_left().await, 0);

    // No rate before: a full bucket.
    reload(rate(0.01, 3), "max_in_flight = 10".into()).await;
    reload(rate(0.01, 3), rate(0.01, 2)).await;
    assert_eq!(spare_left().await, 1);
}
