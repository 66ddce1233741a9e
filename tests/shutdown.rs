//! SIGTERM drains: in-flight requests finish, `/readyz` turns 503, new connections
//! are refused, the process exits 0.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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

/// An upstream that reads the request head and never answers; counts the heads.
async fn silent_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    let addr = serve_tcp(move |mut s| {
        let seen = seen.clone();
        async move {
            if read_request_head(&mut s).await {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            std::future::pending::<()>().await;
            drop(s);
        }
    })
    .await;
    (addr, heads)
}

/// Waits (up to 10 s) until `n` request heads reached the upstream.
async fn wait_for_heads(heads: &AtomicUsize, n: usize) {
    let t0 = Instant::now();
    while heads.load(Ordering::SeqCst) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the upstream got {} of {n} requests",
            heads.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a GET for t.com on a new connection and leaves it waiting.
async fn start_request(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t.com\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// Waits (up to `bound`) for the process to exit; its exit code.
async fn exit_code(mut gw: Process, bound: Duration) -> (Option<i32>, Duration, Process) {
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        loop {
            if let Some(s) = gw.child.try_wait().unwrap() {
                return (s.code(), t0.elapsed(), gw);
            }
            assert!(
                t0.elapsed() < bound,
                "the process still ran {bound:?} later; log:\n{}",
                gw.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

/// README: "A second signal exits at once." It waited for all of shutdown_grace.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (upstream, heads) = silent_upstream().await;
    let gw = Process::start(&format!(
        "[server]\nshutdown_grace = \"60s\"\n[upstreams.u]\ntargets = [\"{upstream}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ));
    let _in_flight = start_request(gw.addr, "/never").await;
    wait_for_heads(&heads, 1).await;
    gw.signal("TERM");
    gw.log_line(&["draining"]).await;
    gw.signal("TERM");
    // Far below the 60 s grace; the bound only keeps a broken build from hanging.
    let (code, _, gw) = exit_code(gw, Duration::from_secs(20)).await;
    assert_eq!(code, Some(1), "a second signal exits 1");
    gw.log_line(&["second signal: exiting without waiting"])
        .await;
}

/// An upstream that reads a request head, then waits for `release` before it answers
/// 200 "ok"; counts the heads.
async fn held_upstream() -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::watch::Sender<bool>,
) {
    let heads = Arc::new(AtomicUsize::new(0));
    let (release, rx) = tokio::sync::watch::channel(false);
    let seen = heads.clone();
    let addr = serve_tcp(move |mut s| {
        let (seen, mut rx) = (seen.clone(), rx.clone());
        async move {
            while read_request_head(&mut s).await {
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = rx.wait_for(|r| *r).await;
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, heads, release)
}

/// Waits (up to 10 s) until `/readyz` answers 503: the gateway is draining.
async fn wait_draining(gw: &Process) {
    let t0 = Instant::now();
    while get(gw.admin, "/readyz", &[]).await.status != 503 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A keep-alive request in flight when draining begins is answered with
/// `connection: close`, then the connection closes: the client knows not to send
/// another on it. The fast path sent no `connection: close` (hyper did).
#[tokio::test]
async fn a_response_during_the_drain_says_connection_close() {
    for env in [&[][..], &[("BULKHEAD_H1", "hyper")][..]] {
        let (upstream, heads, release) = held_upstream().await;
        let gw = Process::start_with_env(
            &format!(
                "[server]\nshutdown_grace = \"60s\"\n[upstreams.u]\ntargets = [\"{upstream}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
            ),
            &[],
            env,
        );
        let mut c = start_request(gw.addr, "/held").await;
        wait_for_heads(&heads, 1).await;
        gw.signal("TERM");
        wait_draining(&gw).await;
        release.send(true).unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read_to_end(&mut c, &mut got),
        )
        .await
        .expect("the gateway closes the connection after the response")
        .unwrap();
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let (head, body) = got.split_once("\r\n\r\n").expect("a whole response");
        assert!(head.starts_with("http/1.1 200"), "{env:?}: {head}");
        assert_eq!(body, "ok", "{env:?}");
        assert!(
            head.lines().any(|l| l == "connection: close"),
            "{env:?}: no connection: close in\n{head}"
        );
        let (code, _, _) = exit_code(gw, Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "{env:?}");
    }
}

/// A request still unanswered when shutdown_grace runs out is cut off; it still gets
/// its access-log line (the fast path wrote none), the cut is counted in a warning,
/// and the process exits 0 as SPEC says.
#[tokio::test]
async fn requests_cut_off_by_the_grace_are_logged() {
    for env in [&[][..], &[("BULKHEAD_H1", "hyper")][..]] {
        let (upstream, heads) = silent_upstream().await;
        let gw = Process::start_with_env(
            &format!(
                "[server]\nworkers = 1\nshutdown_grace = \"1s\"\n[upstreams.u]\ntargets = [\"{upstream}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
            ),
            &[],
            env,
        );
        let _in_flight = start_request(gw.addr, "/cut").await;
        wait_for_heads(&heads, 1).await;
        gw.signal("TERM");
        let (code, _, gw) = exit_code(gw, Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "{env:?}");
        gw.log_line(&["connections still open after shutdown_grace", "open=1"])
            .await;
        let line = gw.log_line(&["access", "path=\"/cut\""]).await;
        assert!(line.contains("tenant=\"t\""), "{env:?}: {line}");
        assert!(line.contains("status=503"), "{env:?}: {line}");
        assert!(line.contains("reason=\"shutdown\""), "{env:?}: {line}");
        gw.log_line(&["shutdown_grace ran out: requests cut off", "requests=1"])
            .await;
    }
}

/// A SIGTERM or SIGINT while the gateway is still starting stops it at once: exit 1,
/// "stopped before serving", never "serving". The start is held here where a real one
/// can hang: reading the system's trusted roots for an `https://` upstream, from an
/// `SSL_CERT_FILE` that is a FIFO the test keeps open (a trust store on a hung network
/// mount reads the same way). The signal waited until the start finished, then drained.
#[tokio::test]
async fn a_signal_while_starting_stops_before_serving() {
    for sig in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join("roots.pem");
        mkfifo(&roots);
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            with_test_listeners(
                "[upstreams.u]\ntargets = [\"https://127.0.0.1:9\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
            ),
        )
        .unwrap();
        let mut child = Reaped(
            std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
                .args(["run", "--no-watch", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info")
                .env("SSL_CERT_FILE", &roots)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let (log, reader) = collect_log(child.0.stderr.take().unwrap());

        // The FIFO opens for writing once the gateway has opened it to read its roots:
        // from then on the start waits for the test.
        let t0 = Instant::now();
        let writer = loop {
            let flags = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NONBLOCK;
            match rustix::fs::open(&roots, flags, rustix::fs::Mode::empty()) {
                Ok(fd) => break fd,
                Err(e) => assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the gateway never read its roots ({e}); log:\n{}",
                    log.lock().unwrap().join("\n")
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let kill = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());

        // Far beyond a prompt exit; the bound only tells "stopped" from "waited".
        let exited = wait_exit(&mut child.0, Duration::from_secs(10)).await;
        let Some(code) = exited else {
            // What it did instead: let the start finish, and see.
            drop(writer);
            let code = wait_exit(&mut child.0, Duration::from_secs(20)).await;
            panic!(
                "SIG{sig}: still running 10 s after the signal; once the start could finish it exited {code:?}; log:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        drop(writer);
        // Every line the process wrote: its stderr is at its end once it has exited.
        reader.join().unwrap();
        let log = log.lock().unwrap().join("\n");
        assert_eq!(code, Some(1), "SIG{sig}; log:\n{log}");
        assert!(
            log.contains("stopped before serving"),
            "SIG{sig}; log:\n{log}"
        );
        assert!(
            !log.contains("bulkhead is serving"),
            "SIG{sig}; log:\n{log}"
        );
    }
}

/// A child process killed and reaped when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every line the process writes to `stderr`, as it comes.
/// The lines so far, and the thread that reads them, which ends at the stream's end.
type Log = (
    Arc<std::sync::Mutex<Vec<String>>>,
    std::thread::JoinHandle<()>,
);

fn collect_log(stderr: std::process::ChildStderr) -> Log {
    use std::io::BufRead;
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = log.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
    (log, reader)
}

/// Waits up to `bound` for `child` to exit: `Some(its exit code)`, or `None` if it
/// still runs.
async fn wait_exit(child: &mut std::process::Child, bound: Duration) -> Option<Option<i32>> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s.code());
        }
        if t0.elapsed() > bound {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
