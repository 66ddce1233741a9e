//! A worker with nothing to do gives freed memory back to the system
//! (`bulkhead::RETURN_FREED_MEMORY`, which the binary sets to mimalloc's collect): when
//! it has no connection open, or every one it has is parked between requests. A worker
//! serving a request does not. The hook here counts its calls; in-process gateway,
//! real sockets, real upstream. Its own test binary: the hook is process-wide.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static CALLS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    CALLS.fetch_add(1, Ordering::SeqCst);
}

async fn calls_pass(after: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while CALLS.load(Ordering::SeqCst) <= after {
        assert!(Instant::now() < deadline, "no give-back {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_worker_gives_freed_memory_back_and_a_busy_one_does_not() {
    bulkhead::RETURN_FREED_MEMORY
        .set(count)
        .expect("only this test sets the hook");
    // An upstream that answers only when told to.
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let release2 = release.clone();
    let up = serve_tcp(move |mut s| {
        let (got_tx, release) = (got_tx.clone(), release2.clone());
        async move {
            let mut buf = [0u8; 1024];
            loop {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = got_tx.send(());
                release.notified().await;
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "[server]\nworkers = 1\nheader_read_timeout = \"60s\"\n\
         [upstreams.u]\ntargets = [\"{up}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ));

    // No connection open: idle.
    calls_pass(0, "from a worker with no connection").await;

    // A request waiting for its upstream: busy, however long it waits.
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
        .await
        .expect("the request reaches the upstream");
    let busy = CALLS.load(Ordering::SeqCst);
    // Four of the worker's checks (every 250 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        busy,
        "gave memory back while serving a request"
    );

    // Answered, the connection waits for its next request, parked: idle again.
    release.notify_one();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"ok") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    calls_pass(busy, "with the one open connection parked").await;

    // And it still serves on that connection.
    c.write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
        .await
        .expect("the second request reaches the upstream");
    release.notify_one();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(gw);
}
