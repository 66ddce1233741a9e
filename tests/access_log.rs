//! The access log: one line per request with the SPEC fields, as text or JSON, and
//! `server.access_log = false` turns it off. Read from the real binary's stderr.

mod support;

use std::time::Duration;

use support::*;

fn config(up: &Upstream, server: &str) -> String {
    format!(
        "[server]\nworkers = 1\n{server}\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n[tenants.t.limits]\nmax_body = 100\n",
        up.addr
    )
}

#[tokio::test]
async fn json_lines_carry_every_field() {
    let up = Upstream::echo("u").await;
    let gw = Process::start(&config(&up, "log_format = \"json\""));
    let first = send(
        gw.addr,
        "POST",
        "/orders?secret=token123",
        &[("host", "t.com"), ("x-request-id", "rid-1")],
        vec![b'a'; 40].into(),
    )
    .await;
    assert_eq!(first.status, 200);
    let r = send(
        gw.addr,
        "POST",
        "/big",
        &[("host", "t.com"), ("x-request-id", "rid-2")],
        vec![b'a'; 400].into(),
    )
    .await;
    assert_error(&r, 413, "body_too_large");
    assert_error(
        &get(
            gw.addr,
            "/",
            &[("host", "nobody.com"), ("x-request-id", "rid-3")],
        )
        .await,
        404,
        "unknown_tenant",
    );

    let line = gw.log_line(&["\"access\"", "rid-1"]).await;
    let j: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    let f = &j["fields"];
    assert_eq!(f["tenant"], "t");
    assert_eq!(f["method"], "POST");
    assert_eq!(
        f["path"], "/orders",
        "only the path, never the query string"
    );
    assert_eq!(f["status"], 200);
    assert_eq!(f["bytes_in"], 40);
    assert_eq!(f["bytes_out"], first.body.len());
    assert_eq!(f["upstream"], "u");
    assert_eq!(f["request_id"], "rid-1");
    assert_eq!(f["reason"], "-");
    assert!(f["duration_us"].as_u64().is_some());
    assert!(!line.contains("token123"));

    let j: serde_json::Value =
        serde_json::from_str(&gw.log_line(&["\"access\"", "rid-2"]).await).unwrap();
    assert_eq!(j["fields"]["status"], 413);
    assert_eq!(j["fields"]["reason"], "body_too_large");
    assert_eq!(j["fields"]["upstream"], "-");
    let j: serde_json::Value =
        serde_json::from_str(&gw.log_line(&["\"access\"", "rid-3"]).await).unwrap();
    assert_eq!(j["fields"]["tenant"], "_unknown");
    assert_eq!(j["fields"]["reason"], "unknown_tenant");
}

#[tokio::test]
async fn text_lines_by_default_and_off_when_disabled() {
    let up = Upstream::echo("u").await;
    let gw = Process::start(&config(&up, ""));
    assert_eq!(
        get(
            gw.addr,
            "/x",
            &[("host", "t.com"), ("x-request-id", "rid-text")]
        )
        .await
        .status,
        200
    );
    let line = gw.log_line(&["access:", "rid-text"]).await;
    for part in [
        "tenant=\"t\"",
        "method=\"GET\"",
        "path=\"/x\"",
        "status=200",
        "upstream=\"u\"",
        "reason=\"-\"",
        "bytes_in=0",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }

    let quiet = Process::start(&config(&up, "access_log = false"));
    assert_eq!(
        get(
            quiet.addr,
            "/x",
            &[("host", "t.com"), ("x-request-id", "rid-quiet")]
        )
        .await
        .status,
        200
    );
    // A request after it has surely been logged, had logging been on.
    assert_eq!(
        get(quiet.addr, "/y", &[("host", "t.com")]).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = quiet.log.lock().unwrap().join("\n");
    assert!(
        !log.contains("rid-quiet") && !log.contains("access"),
        "{log}"
    );
}

/// A head refused before hyper reads it (here on a connection the fast path handed to
/// hyper; TLS connections are read the same way) has its access-log line, as the fast
/// path's refusals do: no tenant, method `-`, path `*`.
#[tokio::test]
async fn a_head_refused_on_hypers_path_is_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::echo("u").await;
    let gw = Process::start(&config(&up, ""));
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.0\r\nhost: t.com\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    // As the fast path answers a head it refuses: an HTTP/1.1 status line.
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let line = gw
        .log_line(&["access:", "status=400", r#"reason="bad_request""#])
        .await;
    for part in [r#"tenant="_unknown""#, r#"method="-""#, r#"path="*""#] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
}
