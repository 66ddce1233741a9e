//! Bodies stream through in both directions, byte for byte, without the gateway
//! holding them whole.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const MIB: u64 = 1024 * 1024;

/// Sends `up_len` pattern bytes (chunked or with Content-Length) and digests the
/// response body as it arrives.
async fn exchange(
    gw: std::net::SocketAddr,
    up_len: u64,
    chunked: bool,
) -> (u16, Option<String>, Digest) {
    let client: Client<_, PatternBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{gw}/upload"))
        .header("host", "t.com")
        .body(PatternBody::pattern(up_len, chunked))
        .unwrap();
    let resp = client.request(req).await.expect("the gateway answers");
    let status = resp.status().as_u16();
    let te = resp
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut body = resp.into_body();
    let mut digest = Digest::default();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.expect("the body arrives whole").data_ref() {
            digest.update(d);
        }
    }
    (status, te, digest)
}

fn expected(len: u64) -> Digest {
    Digest::of(&pattern(len as usize))
}

#[tokio::test]
async fn five_mib_each_way_byte_for_byte() {
    for chunked in [false, true] {
        let up = Upstream::start(
            "big",
            Behavior::Bytes {
                len: 5 * MIB,
                chunked,
            },
        )
        .await;
        let gw = Gateway::start(&format!(
            "[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
            up.addr
        ));
        let (status, content_length, down) = exchange(gw.addr, 5 * MIB, chunked).await;
        assert_eq!(status, 200);
        assert_eq!(down, expected(5 * MIB), "response body (chunked={chunked})");
        if chunked {
            assert_eq!(content_length, None);
        } else {
            assert_eq!(content_length.as_deref(), Some("5242880"));
        }
        let seen = up.seen();
        assert_eq!(
            seen[0].body,
            expected(5 * MIB),
            "request body (chunked={chunked})"
        );
        if !chunked {
            assert_eq!(seen[0].headers["content-length"], "5242880");
        } else {
            assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
        }
    }
}

/// 64 MiB up and 64 MiB down through the real binary: its peak RSS grows by far less
/// than the body size, so nothing is buffered whole.
#[tokio::test]
async fn gateway_memory_does_not_grow_with_body_size() {
    let up = Upstream::start(
        "big",
        Behavior::Bytes {
            len: 64 * MIB,
            chunked: true,
        },
    )
    .await;
    let gw = Process::start(&format!(
        "[server]\nworkers = 1\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    // Warm up: connections, pools and buffers exist before the baseline.
    let (status, _, _) = exchange(gw.addr, MIB, true).await;
    assert_eq!(status, 200);
    let (hwm_before, _) = gw.memory_kib();
    let (status, _, down) = exchange(gw.addr, 64 * MIB, true).await;
    assert_eq!(status, 200);
    assert_eq!(down.len, 64 * MIB);
    assert_eq!(up.seen()[1].body.len, 64 * MIB);
    let (hwm_after, _) = gw.memory_kib();
    let grown_mib = (hwm_after.saturating_sub(hwm_before)) as f64 / 1024.0;
    assert!(
        grown_mib < 16.0,
        "peak RSS grew by {grown_mib:.1} MiB while 128 MiB streamed through ({hwm_before} → {hwm_after} KiB)"
    );
    drop(Bytes::new());
}
