//! `server.max_connections`: at the limit the gateway stops accepting, so a new
//! connection waits in the listen queue (instead of being accepted into EMFILE, where
//! upstream connections and the admin listener would fail too) and is served once
//! another closes; the admin listener answers meanwhile. And the binary raises its soft
//! RLIMIT_NOFILE to the hard limit and says what it allows. Real process, real sockets.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn at_max_connections_new_connections_wait_until_one_closes() {
    let up = Upstream::echo("u").await;
    let gw = Process::start(&format!(
        "[server]\nworkers = 1\nmax_connections = 3\nheader_read_timeout = \"60s\"\n\
         [upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    gw.log_line(&["file descriptors", "nofile=", "max_connections=3"])
        .await;

    // Three idle connections: the limit. A request on each shows it was accepted.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }

    // The fourth connects (the kernel's queue) but is not served …
    let mut fourth = TcpStream::connect(gw.addr).await.unwrap();
    fourth
        .write_all(b"GET / HTTP/1.1\r\nhost: t.com\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(500), fourth.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the limit: {early:?}");
    gw.log_line(&["connection limit reached", "limit=3"]).await;
    // … while the admin listener answers.
    assert_eq!(get(gw.admin, "/healthz", &[]).await.status, 200);

    // One closes: the fourth is accepted and served.
    drop(held.pop());
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), fourth.read_to_end(&mut answer))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn the_default_limit_follows_the_descriptors() {
    use bulkhead::server::connection_limit;
    assert_eq!(connection_limit(500, 1024), 500, "configured");
    assert_eq!(connection_limit(0, 1024), 384, "(1024 - 256) / 2");
    assert_eq!(connection_limit(0, 256), 96, "(256 - 64) / 2");
    assert_eq!(connection_limit(0, 1), 1);
    assert_eq!(connection_limit(0, 1_048_576), 524_160);
}
