//! Tenant resolution, routing and the forwarded headers, through real sockets.

mod support;

use support::*;

async fn three_tenants(resolve: &str) -> (Gateway, Upstream, Upstream, Upstream, Upstream) {
    let a = Upstream::echo("acme-up").await;
    let g = Upstream::echo("globex-up").await;
    let i = Upstream::echo("initech-up").await;
    let r = Upstream::echo("acme-reports").await;
    let gw = Gateway::start(&format!(
        r#"
[tenancy]
resolve = {resolve}

[upstreams.acme-up]
targets = ["{}"]
[upstreams.globex-up]
targets = ["http://{}"]
[upstreams.initech-up]
targets = ["{}"]
[upstreams.acme-reports]
targets = ["{}"]

[tenants.acme]
hosts = ["acme.example.com", "*.acme.example.com"]
upstream = "acme-up"
features = ["beta-search", "sso"]
[[tenants.acme.routes]]
prefix = "/reports"
upstream = "acme-reports"
[[tenants.acme.routes]]
prefix = "/rep"
upstream = "globex-up"

[tenants.globex]
hosts = ["globex.example.com"]
upstream = "globex-up"

[tenants.initech]
hosts = ["initech.example.com", "special.acme.example.com"]
upstream = "initech-up"

[tenants.gone]
hosts = ["gone.example.com"]
upstream = "initech-up"
status = "suspended"
"#,
        a.addr, g.addr, i.addr, r.addr
    ));
    (gw, a, g, i, r)
}

fn upstream_of(r: &Reply) -> String {
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["upstream"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn hosts_route_tenants_to_their_own_upstreams() {
    let (gw, a, g, i, _r) = three_tenants(r#"["host"]"#).await;
    let at = |host: &'static str| {
        let addr = gw.addr;
        async move { get(addr, "/x", &[("host", host)]).await }
    };
    assert_eq!(upstream_of(&at("acme.example.com").await), "acme-up");
    assert_eq!(upstream_of(&at("globex.example.com").await), "globex-up");
    assert_eq!(upstream_of(&at("initech.example.com").await), "initech-up");
    // Case, port and one wildcard label.
    assert_eq!(upstream_of(&at("ACME.Example.COM:8080").await), "acme-up");
    assert_eq!(upstream_of(&at("eu.acme.example.com").await), "acme-up");
    // An exact host beats the wildcard that also covers it.
    assert_eq!(
        upstream_of(&at("special.acme.example.com").await),
        "initech-up"
    );
    // A wildcard covers exactly one label.
    assert_error(&at("a.b.acme.example.com").await, 404, "unknown_tenant");
    assert_error(&at("example.com").await, 404, "unknown_tenant");
    let r = at("nobody.example.org").await;
    assert_error(&r, 404, "unknown_tenant");
    assert!(r.json()["tenant"].is_null());
    assert_eq!(a.seen().len(), 3);
    assert_eq!(g.seen().len(), 1);
    assert_eq!(i.seen().len(), 2);
}

#[tokio::test]
async fn suspended_tenant_gets_403() {
    let (gw, _a, _g, i, _r) = three_tenants(r#"["host"]"#).await;
    let r = get(gw.addr, "/", &[("host", "gone.example.com")]).await;
    assert_error(&r, 403, "tenant_suspended");
    assert_eq!(r.json()["tenant"], "gone");
    assert!(i.seen().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn longest_route_prefix_wins_at_segment_boundaries() {
    let (gw, _a, _g, _i, r) = three_tenants(r#"["host"]"#).await;
    let h = [("host", "acme.example.com")];
    assert_eq!(
        upstream_of(&get(gw.addr, "/reports/7?x=1", &h).await),
        "acme-reports"
    );
    assert_eq!(
        upstream_of(&get(gw.addr, "/reports", &h).await),
        "acme-reports"
    );
    assert_eq!(upstream_of(&get(gw.addr, "/rep/1", &h).await), "globex-up");
    assert_eq!(upstream_of(&get(gw.addr, "/reportsx", &h).await), "acme-up");
    assert_eq!(r.seen()[0].path, "/reports/7?x=1");

    // Routes match the path as the upstream reads it: other spellings of a path go
    // where it goes (and are forwarded as sent), and one that leaves the prefix does
    // not stay in it.
    for (spelt, upstream) in [
        ("//reports/1", "acme-reports"),
        ("/x/../reports/1", "acme-reports"),
        ("/%72eports/1", "acme-reports"),
        ("/./reports", "acme-reports"),
        ("/reports/../secret", "acme-up"),
        ("/reports/%2e%2e/secret", "acme-up"),
    ] {
        assert_eq!(
            upstream_of(&get(gw.addr, spelt, &h).await),
            upstream,
            "{spelt}"
        );
    }
    let seen: Vec<String> = r.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        seen[seen.len() - 4..],
        [
            "//reports/1",
            "/x/../reports/1",
            "/%72eports/1",
            "/./reports"
        ]
    );
}

#[tokio::test]
async fn percent_escapes_in_route_prefixes_match_in_either_case() {
    // `%2f` and `%2F` are the same octet (RFC 3986 §6.2.2.1): a route written with
    // either takes requests spelt with either, as the path normaliser reads them.
    let base = Upstream::echo("base").await;
    let lower = Upstream::echo("lower").await;
    let upper = Upstream::echo("upper").await;
    let gw = Gateway::start(&format!(
        r#"
[upstreams.base]
targets = ["{}"]
[upstreams.lower]
targets = ["{}"]
[upstreams.upper]
targets = ["{}"]
[tenants.acme]
hosts = ["acme.example.com"]
upstream = "base"
[[tenants.acme.routes]]
prefix = "/files/a%2fb"
upstream = "lower"
[[tenants.acme.routes]]
prefix = "/docs/%C3%A9t%C3%A9"
upstream = "upper"
"#,
        base.addr, lower.addr, upper.addr
    ));
    let h = [("host", "acme.example.com")];
    for (spelt, upstream) in [
        ("/files/a%2fb/1", "lower"),
        ("/files/a%2Fb/1", "lower"),
        ("/files/a%2Fb", "lower"),
        ("/files/a%2Fbc", "base"),
        ("/files/a/b/1", "base"),
        ("/docs/%C3%A9t%C3%A9/x", "upper"),
        ("/docs/%c3%a9t%c3%a9/x", "upper"),
        ("/docs/%c3%A9t%C3%a9", "upper"),
    ] {
        assert_eq!(
            upstream_of(&get(gw.addr, spelt, &h).await),
            upstream,
            "{spelt}"
        );
    }
    // Forwarded as the client spelt it.
    assert_eq!(lower.seen()[1].path, "/files/a%2Fb/1");
    assert_eq!(upper.seen()[1].path, "/docs/%c3%a9t%c3%a9/x");
}

#[tokio::test]
async fn header_and_path_sources_and_mismatch() {
    let (gw, a, g, _i, _r) = three_tenants(r#"["host", "header", "path"]"#).await;
    // Header source alone.
    let r = get(
        gw.addr,
        "/h",
        &[("host", "unknown.org"), ("x-tenant-id", "globex")],
    )
    .await;
    assert_eq!(upstream_of(&r), "globex-up");
    // Path source alone: "/t/{tenant}" is stripped before forwarding.
    let r = get(
        gw.addr,
        "/t/globex/deep/path?q=1",
        &[("host", "unknown.org")],
    )
    .await;
    assert_eq!(upstream_of(&r), "globex-up");
    assert_eq!(g.seen().last().unwrap().path, "/deep/path?q=1");
    // All three agree.
    let r = get(
        gw.addr,
        "/t/acme/x",
        &[("host", "acme.example.com"), ("x-tenant-id", "acme")],
    )
    .await;
    assert_eq!(upstream_of(&r), "acme-up");
    assert_eq!(a.seen().last().unwrap().path, "/x");
    // Host says acme, header says globex.
    let r = get(
        gw.addr,
        "/",
        &[("host", "acme.example.com"), ("x-tenant-id", "globex")],
    )
    .await;
    assert_error(&r, 403, "tenant_mismatch");
    // Host says acme, path says globex.
    let r = get(gw.addr, "/t/globex/", &[("host", "acme.example.com")]).await;
    assert_error(&r, 403, "tenant_mismatch");
    // The first source that yields names nobody.
    let r = get(
        gw.addr,
        "/",
        &[("host", "unknown.org"), ("x-tenant-id", "nobody")],
    )
    .await;
    assert_error(&r, 404, "unknown_tenant");
    assert_eq!(a.seen().len(), 1);
    assert_eq!(g.seen().len(), 2);
}

#[tokio::test]
async fn client_sent_tenant_header_never_reaches_the_upstream() {
    let (gw, a, _g, _i, _r) = three_tenants(r#"["host"]"#).await;
    let r = get(
        gw.addr,
        "/",
        &[
            ("host", "acme.example.com"),
            ("x-tenant-id", "globex"),
            ("x-tenant-features", "admin"),
        ],
    )
    .await;
    assert_eq!(upstream_of(&r), "acme-up");
    let seen = &a.seen()[0];
    let ids: Vec<_> = seen.headers.get_all("x-tenant-id").iter().collect();
    assert_eq!(ids, ["acme"]);
    let feats: Vec<_> = seen.headers.get_all("x-tenant-features").iter().collect();
    assert_eq!(feats, ["beta-search,sso"]);
}

#[tokio::test]
async fn hop_by_hop_headers_removed_forwarded_headers_added() {
    let (gw, a, _g, _i, _r) = three_tenants(r#"["host"]"#).await;
    let r = get(
        gw.addr,
        "/",
        &[
            ("host", "acme.example.com"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-connection", "keep-alive"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-request-id", "req-abc-123"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-request-id"),
        Some("req-abc-123"),
        "the request id is echoed back"
    );
    let h = &a.seen()[0].headers;
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(h["x-end-to-end"], "kept");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "acme.example.com");
    assert_eq!(h["x-request-id"], "req-abc-123");
    assert_eq!(h["host"], "acme.example.com");

    // No id (or an insane one) from the client: one is generated and echoed.
    let long = "x".repeat(200);
    let r = get(
        gw.addr,
        "/",
        &[("host", "acme.example.com"), ("x-request-id", &long)],
    )
    .await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(id.len(), 16);
    assert_eq!(a.seen()[1].headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn upstream_hop_by_hop_headers_do_not_reach_the_client() {
    // A raw upstream that sends hop-by-hop headers on its response.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: x-internal\r\nx-internal: secret\r\nkeep-alive: timeout=5\r\nx-visible: yes\r\ncontent-length: 2\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let gw = Gateway::start(&format!(
        "[upstreams.u]\ntargets = [\"{addr}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n"
    ));
    let r = get(gw.addr, "/", &[("host", "t.com")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(r.header("x-visible"), Some("yes"));
    assert!(r.header("x-internal").is_none());
    assert!(r.header("keep-alive").is_none());
}

#[tokio::test]
async fn round_robin_over_targets() {
    let u1 = Upstream::echo("one").await;
    let u2 = Upstream::echo("two").await;
    let gw = Gateway::start(&format!(
        "[upstreams.pool]\ntargets = [\"{}\", \"{}\"]\n[defaults]\nupstream = \"pool\"\n[tenants.t]\nhosts = [\"t.com\"]\n",
        u1.addr, u2.addr
    ));
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/", &[("host", "t.com")]).await.status, 200);
    }
    assert_eq!(u1.seen().len(), 5);
    assert_eq!(u2.seen().len(), 5);
}

/// HTTP/2 with prior knowledge through the real curl: `:authority` picks the tenant,
/// and the HTTP/1.1 upstream gets a `Host`.
#[tokio::test]
async fn http2_prior_knowledge_uses_authority() {
    let (gw, a, g, _i, _r) = three_tenants(r#"["host"]"#).await;
    let port = gw.addr.port();
    let curl = |host: &'static str| async move {
        tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .arg("--resolve")
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg(format!("http://{host}:{port}/h2path"))
            .output()
            .await
            .expect("curl runs")
    };
    let out = curl("acme.example.com").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n2 200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("acme-up"), "{text}");
    let out = curl("globex.example.com").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n2 200") && text.contains("globex-up"),
        "{text}"
    );
    let h = &a.seen()[0].headers;
    assert_eq!(h["host"], format!("acme.example.com:{port}").as_str());
    assert_eq!(h["x-tenant-id"], "acme");
    assert_eq!(g.seen()[0].path, "/h2path");
    let out = curl("nobody.example.org").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n2 404") && text.contains("unknown_tenant"),
        "{text}"
    );
}

#[tokio::test]
async fn forward_header_can_be_turned_off() {
    let up = Upstream::echo("u").await;
    let gw = Gateway::start(&format!(
        "[tenancy]\nforward_header = \"\"\n[upstreams.u]\ntargets = [\"{}\"]\n[tenants.t]\nhosts = [\"t.com\"]\nupstream = \"u\"\n",
        up.addr
    ));
    let r = get(
        gw.addr,
        "/",
        &[("host", "t.com"), ("x-tenant-id", "spoofed")],
    )
    .await;
    assert_eq!(r.status, 200);
    let h = &up.seen()[0].headers;
    assert!(
        !h.contains_key("x-tenant-id"),
        "no tenant header, and the client's copy removed: {h:?}"
    );
}
