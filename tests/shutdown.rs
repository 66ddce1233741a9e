//! SIGTERM drains: in-flight requests finish, `/readyz` turns 503, new connections
//! are refused, the process exits 0.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish() {
    let slow = Upstream::start("slow", Behavior::Slow(Duration::from_secs(2))).await;
    let mut gw = Process::start(&format!(
        "[server]\nshutdown_grace = \"10s\"\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        slow.addr
    ));
    assert_eq!(get(gw.admin, "/readyz", &[]).await.status, 200);

    let addr = gw.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow", &[("host", "t.com")]).await });
    // Wait until the upstream has the request, then ask the gateway to stop.
    let t0 = Instant::now();
    while slow.seen().is_empty() && t0.elapsed() < Duration::from_secs(5) {
        // `seen` is recorded after the body is read, before the 2 s sleep.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slow.seen().len(), 1, "the request reached the upstream");
    gw.signal("TERM");

    // Readiness turns 503 while the request is still running.
    let mut saw_503 = false;
    for _ in 0..50 {
        if get(gw.admin, "/readyz", &[]).await.status == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "/readyz never answered 503 while draining");
    assert!(
        !in_flight.is_finished(),
        "the slow request was still in flight"
    );

    // New connections are refused.
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(gw.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "the listener still accepted connections while draining"
    );

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request completed");
    assert_eq!(r.json()["upstream"], "slow");

    let status = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        loop {
            if let Some(s) = gw.child.try_wait().unwrap() {
                return Some(s);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let status = status.expect("the process exited after draining");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let up = Upstream::echo("u").await;
    let mut gw = Process::start(&format!(
        "[server]\nshutdown_grace = \"30s\"\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    // A keep-alive connection that stays open and idle.
    let c = client();
    let resp = c
        .request(
            http::Request::get(format!("http://{}/", gw.addr))
                .header("host", "t.com")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(read(resp).await.status, 200);
    let t0 = Instant::now();
    gw.signal("TERM");
    let code = tokio::task::spawn_blocking(move || gw.child.wait().unwrap().code())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "shutdown waited for an idle connection"
    );
    drop(c);
}
