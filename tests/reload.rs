//! Hot reload through every trigger (file watcher, SIGHUP, POST /reload), rejected
//! configs, reloads under load, and the history and audit trail, through real sockets.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead::Config;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

async fn admin_get(admin: SocketAddr, path: &str) -> serde_json::Value {
    let r = get(admin, path, &[]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn post_reload(admin: SocketAddr) -> Reply {
    send(admin, "POST", "/reload", &[], Bytes::new()).await
}

/// Polls `/config/history` until its newest entry satisfies `pred`.
async fn until_history(
    admin: SocketAddr,
    deadline: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let h = admin_get(admin, "/config/history").await;
        let entries = h.as_array().unwrap().clone();
        if pred(&entries[0]) {
            return entries;
        }
        assert!(
            start.elapsed() < deadline,
            "history never matched: {}",
            serde_json::to_string_pretty(&entries[0]).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- acceptance 1: every trigger applies a new upstream within 2 s ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_file_takes_effect_within_two_seconds() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();
    let before = admin_get(gw.admin, "/config").await;
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    // Written in place (truncate, then write), as many tools do.
    write_config(&path, &blue_green_config("green", &blue, &green));
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(2)).await;
    assert_eq!(upstream_for(gw.addr, "globex.example.com").await, "blue");

    let after = admin_get(gw.admin, "/config").await;
    assert_ne!(after["version"], before["version"]);
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(h[0]["trigger"], "file");
    assert_eq!(h[0]["result"], "success");
    assert_eq!(h[0]["previous_version"], before["version"]);
    assert_eq!(h[0]["version"], after["version"]);

    // Saved the way editors do: a new file renamed over the old one.
    let tmp = dir.path().join(".gateway.toml.swp");
    std::fs::write(
        &tmp,
        with_test_listeners(&blue_green_config("blue", &blue, &green)),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    until_served_by(gw.addr, "acme.example.com", "blue", Duration::from_secs(2)).await;

    // Touching the file or writing the same bytes applies nothing new.
    let entries = h.as_array().unwrap().len();
    write_config(&path, &blue_green_config("blue", &blue, &green));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(h.as_array().unwrap().len(), entries + 1, "{h:#}");
    assert_eq!(shared(&gw).reload.succeeded(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_picked_up() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The layout kubelet makes for a ConfigMap volume.
    std::fs::create_dir(d.join("..2024_01_01_00_00_00.1")).unwrap();
    write_config(
        &d.join("..2024_01_01_00_00_00.1/gateway.toml"),
        &blue_green_config("blue", &blue, &green),
    );
    std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gateway.toml", d.join("gateway.toml")).unwrap();
    let gw = Gateway::start_at(&d.join("gateway.toml"));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    for (n, up) in [(2, "green"), (3, "blue")] {
        let new_dir = format!("..2024_01_01_00_00_00.{n}");
        let old_dir = format!("..2024_01_01_00_00_00.{}", n - 1);
        std::fs::create_dir(d.join(&new_dir)).unwrap();
        write_config(
            &d.join(&new_dir).join("gateway.toml"),
            &blue_green_config(up, &blue, &green),
        );
        std::os::unix::fs::symlink(&new_dir, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join(&old_dir)).unwrap();
        until_served_by(gw.addr, "acme.example.com", up, Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_applies_the_file_now() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let first = admin_get(gw.admin, "/config").await;
    assert_eq!(first["tenants"], 2);
    let loaded = first["loaded_at"].as_str().unwrap();
    humantime::parse_rfc3339(loaded).unwrap_or_else(|e| panic!("{loaded}: {e}"));
    let v = first["version"].as_str().unwrap();
    assert_eq!(v.len(), 12, "{v}");

    // No watcher here: nothing changes until asked.
    write_config(&path, &blue_green_config("green", &blue, &green));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let version = r.json()["version"].clone();
    assert_eq!(admin_get(gw.admin, "/config").await["version"], version);
    assert_ne!(version, first["version"]);
    // The swap happened before the answer: no polling needed.
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "green");

    // Reloading the same bytes again succeeds and changes nothing.
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], version);
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(h[0]["trigger"], "admin");
    assert_eq!(h[0]["version"], h[0]["previous_version"]);
    assert_eq!(
        h[1]["changed"][0]["fields"],
        serde_json::json!(["upstream"])
    );
    assert_eq!(h[2]["trigger"], "startup");
    assert_eq!(shared(&gw).reload.succeeded(), 2);

    assert_eq!(get(gw.admin, "/reload", &[]).await.status, 405);
    assert_eq!(
        send(gw.admin, "POST", "/config", &[], Bytes::new())
            .await
            .status,
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_logs_rejections_with_position() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    // Without the watcher, only the signal can have applied the change.
    let bin = Process::start_with_args(&blue_green_config("blue", &blue, &green), &["--no-watch"]);
    assert_eq!(upstream_for(bin.addr, "acme.example.com").await, "blue");

    write_config(&bin.path, &blue_green_config("green", &blue, &green));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(upstream_for(bin.addr, "acme.example.com").await, "blue");
    bin.signal("HUP");
    until_served_by(
        bin.addr,
        "acme.example.com",
        "green",
        Duration::from_secs(2),
    )
    .await;
    bin.log_line(&["configuration reloaded", "trigger=signal"])
        .await;

    // An invalid file: a warning with PATH:LINE:COL, and the old config keeps serving.
    write_config(
        &bin.path,
        &format!(
            "{}\n[tenants.acme.limits]\nburst = \"lots\"\n",
            blue_green_config("blue", &blue, &green)
        ),
    );
    bin.signal("HUP");
    let line = bin
        .log_line(&["WARN", "configuration rejected", "trigger=signal"])
        .await;
    let path = bin.path.display().to_string();
    assert!(line.contains(&format!("{path}:")), "{line}");
    let pos = line.split(&format!("{path}:")).nth(1).unwrap();
    let mut nums = pos.split(':').take(2).map(|n| n.parse::<u32>());
    assert!(
        matches!((nums.next(), nums.next()), (Some(Ok(_)), Some(Ok(_)))),
        "no LINE:COL after the path: {line}"
    );
    assert_eq!(upstream_for(bin.addr, "acme.example.com").await, "green");
    let h = admin_get(bin.admin, "/config/history").await;
    assert_eq!(h[0]["trigger"], "signal");
    assert_eq!(h[0]["result"], "failure");
}

/// The gateway reads its file, then starts watching it; an edit in between raises no
/// event the watcher sees. The binary logs "serving" before its watch is in place, so
/// an operator (or a test) that edits the file at once hit this gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_before_the_watch_starts_is_applied_when_it_starts() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let before = admin_get(gw.admin, "/config").await["version"].clone();
    write_config(&path, &blue_green_config("green", &blue, &green));
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(2)).await;
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(h[0]["trigger"], "file");
    assert_eq!(h[0]["result"], "success");
    assert_eq!(h[0]["previous_version"], before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_watches_its_config_file() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let bin = Process::start(&blue_green_config("blue", &blue, &green));
    assert_eq!(upstream_for(bin.addr, "acme.example.com").await, "blue");
    let tmp = bin.path.with_file_name("gateway.toml.new");
    std::fs::write(
        &tmp,
        with_test_listeners(&blue_green_config("green", &blue, &green)),
    )
    .unwrap();
    std::fs::rename(&tmp, &bin.path).unwrap();
    until_served_by(
        bin.addr,
        "acme.example.com",
        "green",
        Duration::from_secs(2),
    )
    .await;
    bin.log_line(&["configuration reloaded", "trigger=file"])
        .await;
}

// ---- acceptance 2: invalid configs are rejected and the old one keeps serving ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_toml_then_a_duplicate_host_are_both_rejected() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let state = shared(&gw);
    let version = admin_get(gw.admin, "/config").await["version"].clone();

    // 1. Not TOML at all (and the good change in it must not leak through).
    write_config(
        &path,
        &format!(
            "{}\n[tenants.broken\n",
            blue_green_config("green", &blue, &green)
        ),
    );
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 422, "{:?}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["error"], "invalid_config");
    let msg = j["message"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!("{}:", path.display())),
        "the message starts with PATH:LINE:COL: {msg}"
    );
    assert_eq!(state.reload.failed(), 1);
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");

    // 2. Valid TOML, but a host that belongs to two tenants.
    write_config(
        &path,
        &format!(
            "{}\n[tenants.copycat]\nhosts = [\"ACME.example.com\"]\n",
            blue_green_config("green", &blue, &green)
        ),
    );
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 422);
    let j = r.json();
    assert_eq!(j["error"], "invalid_config");
    let msg = j["message"].as_str().unwrap();
    assert!(msg.contains("already belongs to tenant \"acme\""), "{msg}");
    assert!(msg.contains(&format!("{}:", path.display())), "{msg}");
    assert_eq!(state.reload.failed(), 2);
    assert_eq!(state.reload.succeeded(), 0);
    let metrics = get(gw.admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("bulkhead_config_reloads_total{result=\"failure\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(&format!("bulkhead_config_info{{version={}}} 1", version)),
        "the old version is still the one in force: {text}"
    );

    // Traffic still flows on the old config, which /config still reports.
    for host in ["acme.example.com", "globex.example.com"] {
        assert_eq!(upstream_for(gw.addr, host).await, "blue");
    }
    assert_error(
        &get(gw.addr, "/", &[("host", "copycat.example.com")]).await,
        404,
        "unknown_tenant",
    );
    assert_eq!(admin_get(gw.admin, "/config").await["version"], version);

    let h = admin_get(gw.admin, "/config/history").await;
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 3, "{h:#?}");
    assert_eq!(h[0]["result"], "failure");
    assert!(h[0]["error"]
        .as_str()
        .unwrap()
        .contains("already belongs to tenant"));
    assert_eq!(h[1]["result"], "failure");
    assert!(h[1]["error"].as_str().unwrap().contains(":"));
    assert_ne!(h[0]["error"], h[1]["error"]);
    for e in &h[..2] {
        assert_eq!(
            e["previous_version"], version,
            "the old version stays in force"
        );
        assert_eq!(e["trigger"], "admin");
    }
    assert_eq!(h[2]["trigger"], "startup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_rejects_a_broken_file_and_recovers_when_it_is_fixed() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();

    write_config(&path, "[upstreams.blue]\ntargets = \"oops\n");
    let h = until_history(gw.admin, Duration::from_secs(5), |e| {
        e["result"] == "failure"
    })
    .await;
    assert_eq!(h[0]["trigger"], "file");
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
    assert_eq!(shared(&gw).reload.failed(), 1);

    write_config(&path, &blue_green_config("green", &blue, &green));
    until_served_by(gw.addr, "acme.example.com", "green", Duration::from_secs(2)).await;
    assert_eq!(
        shared(&gw).reload.failed(),
        1,
        "a bad file is reported once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_changes_are_rejected_as_needing_a_restart() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 3\n{}",
            blue_green_config("green", &blue, &green)
        ),
    )
    .unwrap();
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 422);
    let msg = r.json()["message"].as_str().unwrap().to_owned();
    // PATH:LINE:COL of the key, as for any other rejection.
    assert!(
        msg.starts_with(&format!(
            "{}:4:11: server.workers changed; this needs a restart",
            path.display()
        )),
        "{msg}"
    );
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_bytes_may_grow_only_within_the_running_listener() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let with_limit = |limit: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\nmax_header_bytes = \"{limit}\"\n{}",
            blue_green_config("green", &blue, &green)
        )
    };
    // 64 KiB would need hyper's limit (fixed at start: 64 KiB) to grow.
    std::fs::write(&path, with_limit("64KiB")).unwrap();
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 422);
    let msg = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("server.max_header_bytes") && msg.contains("restart"),
        "{msg}"
    );
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
    // 32 KiB fits in what the listener was started with.
    std::fs::write(&path, with_limit("32KiB")).unwrap();
    assert_eq!(post_reload(gw.admin).await.status, 200);
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "green");
    let big = "v".repeat(24 * 1024);
    let r = get(
        gw.addr,
        "/",
        &[("host", "acme.example.com"), ("x-big", &big)],
    )
    .await;
    assert_eq!(r.status, 200, "a 24 KiB head passes the raised limit");
}

// ---- acceptance 3: no failed request while reloading under load ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_fails_no_request_and_closes_no_connection() {
    const CLIENTS: usize = 4;
    const RELOADS: u64 = 60;
    const MIN_REQUESTS: u64 = 5_000;
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));

    let done = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (done, total, addr) = (done.clone(), total.clone(), gw.addr);
        clients.push(tokio::spawn(async move {
            // One connection per client for the whole test: any reset or close fails it.
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let (mut blue_n, mut green_n) = (0u64, 0u64);
            while !done.load(Ordering::Relaxed) {
                let req = http::Request::get("/")
                    .header("host", "acme.example.com")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender
                    .send_request(req)
                    .await
                    .expect("no connection error while reloading");
                assert_eq!(resp.status(), 200);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
                match j["upstream"].as_str() {
                    Some("blue") => blue_n += 1,
                    Some("green") => green_n += 1,
                    other => panic!("answered by {other:?}"),
                }
                total.fetch_add(1, Ordering::Relaxed);
            }
            drop(sender);
            conn.await.unwrap().expect("the connection ends cleanly");
            (blue_n, green_n)
        }));
    }

    for i in 0..RELOADS {
        // Let traffic run between reloads so that every reload lands mid-stream.
        let mark = total.load(Ordering::Relaxed);
        let want = (MIN_REQUESTS / RELOADS + 1).max(50);
        let start = Instant::now();
        while total.load(Ordering::Relaxed) < mark + want {
            assert!(start.elapsed() < Duration::from_secs(30), "traffic stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let up = if i % 2 == 0 { "green" } else { "blue" };
        write_config(&path, &blue_green_config(up, &blue, &green));
        let r = post_reload(gw.admin).await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    let start = Instant::now();
    while total.load(Ordering::Relaxed) < MIN_REQUESTS {
        assert!(start.elapsed() < Duration::from_secs(30), "traffic stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done.store(true, Ordering::Relaxed);
    let (mut blue_n, mut green_n) = (0, 0);
    for c in clients {
        let (b, g) = c.await.unwrap();
        blue_n += b;
        green_n += g;
    }
    assert!(blue_n + green_n >= MIN_REQUESTS);
    assert!(blue_n > 0 && green_n > 0, "blue {blue_n}, green {green_n}");
    let state = shared(&gw);
    assert_eq!(state.reload.succeeded(), RELOADS);
    assert_eq!(state.reload.failed(), 0);
}

// ---- acceptance 4: a reload that changes tenant B leaves tenant A's limits alone ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_for_one_tenant_keeps_anothers_rate_bucket_and_in_flight_count() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(8))).await;
    let toml = |b_up: &str| {
        format!(
            r#"
[upstreams.blue]
targets = ["{}"]
[upstreams.green]
targets = ["{}"]
[upstreams.slow]
targets = ["{}"]

[tenants.a]
hosts = ["a.example.com"]
upstream = "blue"
[tenants.a.limits]
requests_per_second = 0.01
burst = 2

[tenants.held]
hosts = ["held.example.com"]
upstream = "slow"
[tenants.held.limits]
max_in_flight = 1
[[tenants.held.routes]]
prefix = "/fast"
upstream = "blue"

[tenants.b]
hosts = ["b.example.com"]
upstream = "{b_up}"
"#,
            blue.addr, green.addr, slow.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &toml("blue"));

    // Tenant a spends its burst; tenant held has one request in flight.
    for _ in 0..2 {
        assert_eq!(
            get(gw.addr, "/", &[("host", "a.example.com")]).await.status,
            200
        );
    }
    assert_error(
        &get(gw.addr, "/", &[("host", "a.example.com")]).await,
        429,
        "rate_limited",
    );
    let addr = gw.addr;
    let held = tokio::spawn(async move { get(addr, "/", &[("host", "held.example.com")]).await });
    // Once the slow upstream has the request, the gateway has admitted it: its permit is held.
    let start = Instant::now();
    while slow.seen().is_empty() {
        assert!(
            !held.is_finished(),
            "the held request ended before reaching its upstream"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the held request never reached its upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_error(
        &get(gw.addr, "/fast", &[("host", "held.example.com")]).await,
        503,
        "too_many_in_flight",
    );

    write_config(&path, &toml("green"));
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(upstream_for(gw.addr, "b.example.com").await, "green");
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(
        h[0]["changed"],
        serde_json::json!([{"tenant": "b", "fields": ["upstream"]}])
    );

    // The drained bucket and the running request are still counted.
    assert_error(
        &get(gw.addr, "/", &[("host", "a.example.com")]).await,
        429,
        "rate_limited",
    );
    assert_error(
        &get(gw.addr, "/fast", &[("host", "held.example.com")]).await,
        503,
        "too_many_in_flight",
    );
    // And the request that started on the old snapshot finishes normally.
    let r = held.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["upstream"], "slow");
    // Its slot is free again once the response is done (polled: the gateway drops
    // the body a moment after the client has read it).
    let start = Instant::now();
    while get(gw.addr, "/fast", &[("host", "held.example.com")])
        .await
        .status
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the in-flight slot was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- acceptance 6: history and audit log name what changed ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_audit_log_show_added_removed_and_changed_tenants() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let with_audit = |body: &str| format!("[server]\naudit_log = \"audit.jsonl\"\n{body}");
    let (gw, path) = Gateway::start_file(
        dir.path(),
        &with_audit(&blue_green_config("blue", &blue, &green)),
    );
    let audit_path = dir.path().join("audit.jsonl");
    let audit = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let v0 = admin_get(gw.admin, "/config").await["version"].clone();
    let lines = audit();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["trigger"], "startup");
    assert_eq!(lines[0]["version"], v0);

    // globex serves traffic, so it has series to lose.
    assert_eq!(
        get(gw.addr, "/", &[("host", "globex.example.com")])
            .await
            .status,
        200
    );
    let metrics = get(gw.admin, "/metrics", &[]).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("tenant=\"globex\""));

    // acme: new upstream, rate and burst; globex removed; initech added.
    let changed = blue_green_config("green", &blue, &green)
        .replace(
            "[tenants.globex]\nhosts = [\"globex.example.com\"]\n",
            "[tenants.initech]\nhosts = [\"initech.example.com\"]\n",
        )
        .replace(
            "upstream = \"green\"\n",
            "upstream = \"green\"\nlimits = { requests_per_second = 1000000, burst = 5 }\n",
        );
    write_config(&path, &with_audit(&changed));
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let v1 = r.json()["version"].clone();
    // The removed tenant's series are gone from /metrics.
    let metrics = get(gw.admin, "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(!text.contains("tenant=\"globex\""), "{text}");
    assert!(
        text.contains("bulkhead_tenant_info{tenant=\"initech\",status=\"active\"} 1"),
        "{text}"
    );

    let h = admin_get(gw.admin, "/config/history").await;
    let e = &h[0];
    assert_eq!(e["result"], "success");
    assert_eq!(e["version"], v1);
    assert_eq!(e["previous_version"], v0);
    assert_eq!(e["error"], serde_json::Value::Null);
    assert_eq!(e["added"], serde_json::json!(["initech"]));
    assert_eq!(e["removed"], serde_json::json!(["globex"]));
    assert_eq!(
        e["changed"],
        serde_json::json!([{"tenant": "acme", "fields": ["upstream", "limits.requests_per_second", "limits.burst"]}])
    );
    humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap();

    // A rejected file and an unchanged one add history, not audit lines.
    write_config(&path, "[tenants.x\n");
    assert_eq!(post_reload(gw.admin).await.status, 422);
    write_config(&path, &with_audit(&changed));
    assert_eq!(post_reload(gw.admin).await.status, 200);
    let lines = audit();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let a = &lines[1];
    assert_eq!(a["version"], v1);
    assert_eq!(a["previous_version"], v0);
    assert_eq!(a["trigger"], "admin");
    assert_eq!(a["added"], e["added"]);
    assert_eq!(a["removed"], e["removed"]);
    assert_eq!(a["changed"], e["changed"]);
    assert_eq!(a["time"], e["time"]);
    assert_eq!(
        admin_get(gw.admin, "/config/history")
            .await
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(admin_get(gw.admin, "/config").await["tenants"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_the_last_fifty_attempts() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    for i in 0..55 {
        let up = if i % 2 == 0 { "green" } else { "blue" };
        write_config(&path, &blue_green_config(up, &blue, &green));
        assert_eq!(post_reload(gw.admin).await.status, 200);
    }
    let h = admin_get(gw.admin, "/config/history").await;
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 50);
    assert!(
        h.iter().all(|e| e["trigger"] == "admin"),
        "startup fell off the end"
    );
    assert_eq!(
        h[0]["version"],
        admin_get(gw.admin, "/config").await["version"]
    );
}

// ---- acceptance 5: how long a reload takes (run by hand, in release) ----

/// A config with `n` tenants, each with its own host and limits; tenant t0 uses `up`.
fn many_tenants(n: usize, up: &str, blue: &Upstream, green: &Upstream) -> String {
    let mut s = format!(
        "[upstreams.blue]\ntargets = [\"{}\"]\n[upstreams.green]\ntargets = [\"{}\"]\n\
         [defaults]\nupstream = \"blue\"\n[defaults.limits]\nrequests_per_second = 1000000\n\
         burst = 100000\nmax_in_flight = 100\nmax_body = \"1MiB\"\n",
        blue.addr, green.addr
    );
    for i in 0..n {
        let upstream = if i == 0 { up } else { "blue" };
        s.push_str(&format!(
            "[tenants.t{i}]\nhosts = [\"t{i}.example.com\", \"*.t{i}.example.com\"]\n\
             upstream = \"{upstream}\"\nfeatures = [\"f{}\"]\n",
            i % 7
        ));
    }
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `cargo test --release --test reload -- --ignored --nocapture reload_benchmark`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by hand in release mode"]
async fn reload_benchmark() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    println!(
        "tenants | parse+validate ms | build ms | diff ms | whole reload (read, parse, build, diff, swap) ms"
    );
    for n in [10, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let texts = [
            with_test_listeners(&many_tenants(n, "blue", &blue, &green)),
            with_test_listeners(&many_tenants(n, "green", &blue, &green)),
        ];
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &texts[0]).unwrap();
        let gw = Gateway::start_at(&path);
        let state = shared(&gw);
        let (mut parse, mut build, mut diff, mut whole) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut old = Config::parse(&path, &texts[0]).unwrap();
        for i in 0..9 {
            let text = &texts[(i + 1) % 2];
            let t = Instant::now();
            let config = Config::parse(&path, text).unwrap();
            parse.push(t.elapsed());
            let t = Instant::now();
            let prev = state.snapshot.load_full();
            let snap = bulkhead::snapshot::Snapshot::build(&config, Some(&prev)).unwrap();
            build.push(t.elapsed());
            drop(snap);
            let t = Instant::now();
            let changes = bulkhead::reload::diff(&old, &config);
            diff.push(t.elapsed());
            assert_eq!(changes.changed.len(), 1);
            old = config;

            std::fs::write(&path, text).unwrap();
            let t = Instant::now();
            bulkhead::reload::reload(&state, bulkhead::reload::Trigger::Admin).unwrap();
            whole.push(t.elapsed());
        }
        println!(
            "{n:>7} | {:>17.2} | {:>8.2} | {:>7.2} | {:>8.2}",
            ms(median(parse)),
            ms(median(build)),
            ms(median(diff)),
            ms(median(whole))
        );
    }

    // Throughput with and without a reload every second (10,000 tenants).
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        with_test_listeners(&many_tenants(10_000, "blue", &blue, &green)),
        with_test_listeners(&many_tenants(10_000, "green", &blue, &green)),
    ];
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &texts[0]).unwrap();
    let gw = Gateway::start_at(&path);
    let state = shared(&gw);
    for reloading in [false, true, false, true] {
        let done = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for c in 0..8 {
            let (done, total, addr) = (done.clone(), total.clone(), gw.addr);
            clients.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let host = format!("t{}.example.com", c * 1000);
                while !done.load(Ordering::Relaxed) {
                    let req = http::Request::get("/")
                        .header("host", &host)
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                    total.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let secs = 5;
        let start = Instant::now();
        let mut reloads = 0;
        for s in 0..secs {
            tokio::time::sleep_until((start + Duration::from_secs(s + 1)).into()).await;
            if reloading {
                std::fs::write(&path, &texts[(s as usize + 1) % 2]).unwrap();
                let state = state.clone();
                tokio::task::spawn_blocking(move || {
                    bulkhead::reload::reload(&state, bulkhead::reload::Trigger::Admin).unwrap()
                })
                .await
                .unwrap();
                reloads += 1;
            }
        }
        done.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed();
        for c in clients {
            c.await.unwrap();
        }
        println!(
            "10,000 tenants, {} reloads in {:.1} s: {:.0} requests/s",
            reloads,
            elapsed.as_secs_f64(),
            total.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
        );
    }
}

/// A tenant that one reload removes and the next adds back keeps its state: its quota
/// count (not a fresh day's worth) and its in-flight count (not a second
/// `max_in_flight` beside the requests still running), as when a reload leaves it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_removed_and_added_back_keeps_its_counts() {
    let fast = Upstream::echo("fast").await;
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(8))).await;
    let with_a = format!(
        "[upstreams.fast]\ntargets = [\"{}\"]\n[upstreams.slow]\ntargets = [\"{}\"]\n\
         [tenants.a]\nhosts = [\"a.example.com\"]\nupstream = \"fast\"\n\
         [tenants.a.limits]\nrequests_per_day = 3\nmax_in_flight = 1\n\
         [[tenants.a.routes]]\nprefix = \"/slow\"\nupstream = \"slow\"\n\
         [tenants.b]\nhosts = [\"b.example.com\"]\nupstream = \"fast\"\n",
        fast.addr, slow.addr
    );
    let without_a = format!(
        "[upstreams.fast]\ntargets = [\"{}\"]\n[tenants.b]\nhosts = [\"b.example.com\"]\nupstream = \"fast\"\n",
        fast.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &with_a);
    let h = [("host", "a.example.com")];
    assert_eq!(get(gw.addr, "/", &h).await.status, 200);
    // One request of a's in flight.
    let addr = gw.addr;
    let held = tokio::spawn(async move { get(addr, "/slow", &[("host", "a.example.com")]).await });
    let start = Instant::now();
    while slow.seen().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never reached its upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for toml in [&without_a, &with_a] {
        write_config(&path, toml);
        let r = post_reload(gw.admin).await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    // Still one in flight: the limit of 1 holds.
    assert_error(&get(gw.addr, "/", &h).await, 503, "too_many_in_flight");
    assert_eq!(held.await.unwrap().status, 200);
    // Two of the day's three were used before: one more, then the quota.
    let start = Instant::now();
    let mut r = get(gw.addr, "/", &h).await;
    while r.status == 503 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = get(gw.addr, "/", &h).await;
    }
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_error(&get(gw.addr, "/", &h).await, 429, "quota_exhausted");
}

/// A reload refuses what `check` refuses, with the same `PATH:LINE:COL: message` lines:
/// here a dead duplicate route and a `max_header_bytes` that `check` once put at 1:1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refuses_a_dead_route_and_a_small_header_limit_as_check_does() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let config = format!(
        "{}[[tenants.globex.routes]]\nprefix = \"/r\"\nupstream = \"green\"\n\
         [[tenants.globex.routes]]\nprefix = \"/r\"\nupstream = \"blue\"\n",
        blue_green_config("green", &blue, &green)
    );
    // `max_header_bytes` goes into the `[server]` table the test listeners add.
    let config = with_test_listeners(&config).replacen(
        "[server]\n",
        "[server]\nmax_header_bytes = 512\n",
        1,
    );
    std::fs::write(&path, &config).unwrap();
    let msg = refused_as_check_refuses(&gw, &path).await;
    assert!(
        msg.contains("`server.max_header_bytes` must be at least 1KiB"),
        "{msg}"
    );
    assert!(
        msg.contains("is also the prefix of an earlier route"),
        "{msg}"
    );
    assert!(!msg.contains(":1:1:"), "{msg}");
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
}

/// `POST /reload` of the file at `path` is refused (422), with the message `bulkhead
/// check` prints for the same file; returns it.
async fn refused_as_check_refuses(gw: &Gateway, path: &std::path::Path) -> String {
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 422, "{:?}", String::from_utf8_lossy(&r.body));
    let msg = r.json()["message"].as_str().unwrap().to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), msg.trim());
    msg
}

/// Wrong types in two tenants: a reload names both, as `check` does (each part of the
/// file is read on its own once the whole fails; only the first was named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_type_errors_of_every_tenant_as_check_does() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let config = blue_green_config("green", &blue, &green)
        .replace("[tenants.acme]\n", "[tenants.acme]\nstatus = 1\n")
        .replace(
            "[tenants.globex]\n",
            "[tenants.globex]\nrequest_timeout = 30\n",
        );
    write_config(&path, &config);
    let msg = refused_as_check_refuses(&gw, &path).await;
    assert_eq!(msg.trim().lines().count(), 2, "{msg}");
    assert!(
        msg.contains("invalid type: `1`, expected a string"),
        "{msg}"
    );
    assert!(msg.contains("invalid type: integer `30`"), "{msg}");
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
}

/// The history (and the audit log) names changes to who may present what credential:
/// a reload that drops a tenant's `require`, rotates its API keys, or renames the
/// token's tenant claim showed as a tenant field `other`, or as no change at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_names_credential_changes() {
    let up = Upstream::echo("u").await;
    let key = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let config = |header: &str, claim: &str, keys: &str, require: &str| {
        format!(
            "[tenancy]\nresolve = [\"jwt\", \"api_key\", \"host\"]\n\
             [tenancy.api_key]\nheader = \"{header}\"\n\
             [tenancy.jwt]\ntenant_claim = \"{claim}\"\n\
             [upstreams.u]\ntargets = [\"{}\"]\n\
             [tenants.acme]\nhosts = [\"acme.example.com\"]\nupstream = \"u\"\n\
             api_keys = [{keys}]\n{require}",
            up.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let before = config(
        "x-api-key",
        "tenant",
        &format!("\"{}\"", key('a')),
        "require = [\"api_key\"]\n",
    );
    let (gw, path) = Gateway::start_file(dir.path(), &before);
    let after = config("x-key", "org", &format!("\"{}\"", key('b')), "");
    write_config(&path, &after);
    assert_eq!(post_reload(gw.admin).await.status, 200);
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(h[0]["result"], "success", "{h:#}");
    assert_eq!(
        h[0]["changed"],
        serde_json::json!([{"tenant": "acme", "fields": ["api_keys", "require"]}]),
        "{h:#}"
    );
    assert_eq!(
        h[0]["settings"],
        serde_json::json!(["tenancy.api_key.header", "tenancy.jwt.tenant_claim"]),
        "{h:#}"
    );
}

/// A reload holds the config lock from reading the new file until it has swapped it
/// in: seconds for a very large file (here 100,000 tenants, 4.7 MB). `GET
/// /config/history` and the health checks, answered on the admin thread, go on
/// answering meanwhile: the history was behind that lock, and the admin thread waited
/// on it, health checks included. (This test first held the reload with a key file
/// that was a FIFO nobody wrote to, then with an audit log that was a FIFO whose
/// reader had fallen behind; both are now refused at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_and_health_answer_while_a_reload_is_under_way() {
    use std::fmt::Write;
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &blue_green_config("blue", &blue, &green));
    let mut large = blue_green_config("green", &blue, &green);
    for i in 0..100_000 {
        writeln!(large, "[tenants.t{i}]\nhosts = [\"t{i}.example.com\"]").unwrap();
    }
    write_config(&path, &large);
    let admin = gw.admin;
    let reload = tokio::spawn(async move { post_reload(admin).await });
    // Until a reader of the config in force waits: the reload has its lock.
    let state = shared(&gw);
    let start = Instant::now();
    let waiting = loop {
        let state = state.clone();
        let probe = std::thread::spawn(move || drop(state.reload.config()));
        std::thread::sleep(Duration::from_millis(100));
        if !probe.is_finished() {
            break probe;
        }
        assert!(
            !reload.is_finished(),
            "the reload finished before it was seen holding its lock"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the reload never took its lock"
        );
    };
    for path in ["/config/history", "/healthz"] {
        let r = tokio::time::timeout(Duration::from_secs(10), get(gw.admin, path, &[]))
            .await
            .unwrap_or_else(|_| panic!("GET {path} waited for the reload"));
        assert_eq!(r.status, 200, "{path}");
    }
    assert!(!reload.is_finished());
    let r = reload.await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    waiting.join().unwrap();
    let h = admin_get(gw.admin, "/config/history").await;
    assert_eq!(h[0]["trigger"], "admin");
    assert_eq!(h[0]["result"], "success", "{h:#}");
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "green");
}

/// An audit log that is a FIFO. With no reader, a reload that named it applied the
/// change and then waited to open it, under the reload lock, for a reader that never
/// came: `POST /reload` never answered, and every reload after it waited too. With a
/// reader, each line could wait for it. Now the reload is refused at once (422, in the
/// history), the old config keeps serving, and the next reload goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_is_a_fifo_refuses_the_reload_at_once() {
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000; // Linux
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let config = |log: &str, up: &str| {
        format!(
            "[server]\naudit_log = \"{log}\"\n{}",
            blue_green_config(up, &blue, &green)
        )
    };
    let (gw, path) = Gateway::start_file(dir.path(), &config("audit.jsonl", "blue"));
    let fifo = dir.path().join("audit.fifo");
    mkfifo(&fifo);
    write_config(&path, &config("audit.fifo", "green"));
    let refused = || async {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            refused_as_check_refuses(&gw, &path),
        )
        .await
        .expect("the reload waited on the FIFO");
        assert!(
            msg.contains(":4:13: `server.audit_log` ")
                && msg.contains("audit.fifo\" is a FIFO, not a regular file"),
            "{msg}"
        );
        let h = admin_get(gw.admin, "/config/history").await;
        assert_eq!(h[0]["result"], "failure", "{h:#}");
        assert_eq!(h[0]["error"], msg.as_str());
        assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
    };
    refused().await;
    // A log shipper reading it: refused all the same.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    refused().await;
    drop(reader);
    write_config(&path, &config("audit.jsonl", "green"));
    let r = post_reload(gw.admin).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "green");
    let lines = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let triggers: Vec<_> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["trigger"].clone())
        .collect();
    assert_eq!(triggers, ["startup", "admin"]);
}

/// A FIFO where the config file, or a key it names, should be: the reload is refused
/// at once (422, and the history says why), and the old config keeps serving. The read
/// waited for a writer that never came, under the reload lock, so every reload after
/// it (`POST /reload`, `SIGHUP`, the file watcher) waited too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_place_of_the_config_or_a_key_is_refused_and_the_old_config_serves() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::Ca::new(dir.path(), "ca");
    ca.server("default", &["gateway.test"], 1);
    let config = |up: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n\
             [server.tls]\ndefault_cert = \"default.pem\"\ndefault_key = \"default.key\"\n{}",
            blue_green_config(up, &blue, &green)
        )
    };
    let (gw, path) = Gateway::start_file(dir.path(), &config("blue"));
    let _watch = bulkhead::watch::spawn(shared(&gw)).unwrap();
    let before = admin_get(gw.admin, "/config").await["version"].clone();
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
    let admin = gw.admin;
    // POST /reload, within 10 s. Else the reload is stuck reading the FIFOs: they are
    // replaced by these files and the stuck reads let go (so the gateway can stop),
    // and the test fails.
    let reload = |fifos: Vec<(std::path::PathBuf, Vec<u8>)>| async move {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000; // Linux
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(10), post_reload(admin)).await {
            return r;
        }
        let writers: Vec<_> = fifos
            .iter()
            .filter_map(|(p, _)| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(O_NONBLOCK)
                    .open(p)
                    .ok()
            })
            .collect();
        for (p, bytes) in &fifos {
            let _ = std::fs::remove_file(p);
            std::fs::write(p, bytes).unwrap();
        }
        drop(writers);
        panic!("POST /reload did not answer within 10 s: a FIFO is being read");
    };

    // The key (the watcher sees it change, and tries too).
    let key = dir.path().join("default.key");
    let key_pem = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    mkfifo(&key);
    write_config(&path, &config("green"));
    let r = reload(vec![(key.clone(), key_pem.clone())]).await;
    assert_eq!(r.status, 422, "{:?}", r.json());
    assert_eq!(r.json()["error"], "invalid_config");
    let want = format!(
        "cannot read the private key {}: not a regular file (a FIFO)",
        key.display()
    );
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&want), "{message}");
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, &key_pem).unwrap();

    // The config file itself.
    std::fs::remove_file(&path).unwrap();
    mkfifo(&path);
    let green = with_test_listeners(&config("green")).into_bytes();
    let r = reload(vec![(path.clone(), green)]).await;
    assert_eq!(r.status, 422, "{:?}", r.json());
    assert_eq!(r.json()["error"], "invalid_config");
    let want = format!(
        "{}:1:1: cannot read the file: not a regular file (a FIFO)",
        path.display()
    );
    assert_eq!(r.json()["message"], want.as_str());
    let h = admin_get(gw.admin, "/config/history").await;
    let mine = h
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["trigger"] == "admin")
        .unwrap();
    assert_eq!(mine["result"], "failure", "{h:#}");
    assert_eq!(mine["error"], want.as_str());
    assert_eq!(mine["previous_version"], before);

    // The old config serves.
    assert_eq!(admin_get(gw.admin, "/config").await["version"], before);
    assert_eq!(upstream_for(gw.addr, "acme.example.com").await, "blue");
    // A file again: the watcher applies it, and POST /reload answers.
    std::fs::remove_file(&path).unwrap();
    write_config(&path, &config("green"));
    until_served_by(
        gw.addr,
        "acme.example.com",
        "green",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(reload(Vec::new()).await.status, 200);
}

/// A Redis URL may carry a password (`redis://:PASSWORD@host`). The gateway logs
/// nodes by address for that reason, but a refused URL was quoted whole in the
/// message that goes to the log, the reload's 422 answer and `GET /config/history`.
#[tokio::test]
async fn a_refused_redis_url_is_never_quoted_with_its_password() {
    let up = Upstream::echo("u").await;
    let base = format!(
        "[upstreams.u]\ntargets = [\"{}\"]\n[tenants.a]\nhosts = [\"a.com\"]\nupstream = \"u\"\n",
        up.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &base);
    for (url, says) in [
        (
            "redis://:hunter2pw@127.0.0.1:0/0",
            "\"redis://***@127.0.0.1:0/0\" names port 0",
        ),
        (
            "redis://app:hunter2pw@127.0.0.1:6379/-1",
            "\"redis://***@127.0.0.1:6379/-1\" names database -1",
        ),
        (
            "rediss://:hunter2pw@[bad/0",
            "\"rediss://***@[bad/0\": an IPv6 address is closed by ']'",
        ),
        // Our wording, not the client's "Redis URL did not parse", as `check` says it.
        (
            "redis://:hunter2pw@127.0.0.1:99999/0",
            "`cluster.redis`: \"redis://***@127.0.0.1:99999/0\": the port must be a number from 1 to 65535",
        ),
    ] {
        write_config(&path, &format!("[cluster]\nredis = \"{url}\"\n{base}"));
        let r = post_reload(gw.admin).await;
        assert_eq!(r.status, 422);
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{message}");
        assert!(!message.contains("hunter2pw"), "{message}");
        let history =
            String::from_utf8_lossy(&get(gw.admin, "/config/history", &[]).await.body).into_owned();
        assert!(!history.contains("hunter2pw"), "{history}");
    }
}

/// Upstream targets take no credentials; one written with them is refused without
/// quoting them.
#[tokio::test]
async fn a_refused_target_is_never_quoted_with_its_password() {
    let up = Upstream::echo("u").await;
    let tenant = "[tenants.a]\nhosts = [\"a.com\"]\nupstream = \"u\"\n";
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(
        dir.path(),
        &format!("[upstreams.u]\ntargets = [\"{}\"]\n{tenant}", up.addr),
    );
    for target in [
        "http://admin:hunter2pw@127.0.0.1:81",
        "admin:hunter2pw@127.0.0.1:81",
    ] {
        write_config(
            &path,
            &format!("[upstreams.u]\ntargets = [\"{target}\"]\n{tenant}"),
        );
        let r = post_reload(gw.admin).await;
        assert_eq!(r.status, 422);
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("***@127.0.0.1:81"), "{message}");
        assert!(!message.contains("hunter2pw"), "{message}");
    }
}

/// What `check` warns about is logged too, at start and after each reload that applies
/// it: an operator who edits the file and does not run `check` still sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_warnings_are_logged_at_start_and_on_reload() {
    let (blue, green) = (Upstream::echo("blue").await, Upstream::echo("green").await);
    let unread = "[tenancy]\nheader = \"x-customer\"\n";
    let bin = Process::start_with_args(
        &format!("{unread}{}", blue_green_config("blue", &blue, &green)),
        &["--no-watch"],
    );
    let path = bin.path.display().to_string();
    let line = bin
        .log_line(&["WARN", "warning: `tenancy.header` is set"])
        .await;
    // At the key: `PATH:LINE:COL` (the test listeners come first in the file).
    let at = line.split(&format!("{path}:")).nth(1).unwrap_or_default();
    let mut nums = at.split(':').take(2).map(|n| n.parse::<u32>());
    assert!(
        matches!((nums.next(), nums.next()), (Some(Ok(_)), Some(Ok(10)))),
        "{line}"
    );

    // A reload that applies a file with another warning logs it after "reloaded".
    let daily = "[tenants.acme.limits]\nrequests_per_day = 2000\nrequests_per_month = 1000\n";
    write_config(
        &bin.path,
        &format!("{}{daily}", blue_green_config("green", &blue, &green)),
    );
    bin.signal("HUP");
    bin.log_line(&["configuration reloaded", "trigger=signal"])
        .await;
    let line = bin
        .log_line(&[
            "WARN",
            "`requests_per_day` (2000) is more than `requests_per_month` (1000)",
        ])
        .await;
    assert!(line.contains(&format!("{path}:")), "{line}");
}
