//! The "api_key" source and `require = ["api_key"]`, through real sockets: keys name
//! their tenant, unknown keys and missing credentials are refused, a key of one tenant
//! never reaches another tenant's upstream, keys never reach upstreams or logs.

mod support;

use std::process::{Command, Stdio};

use bulkhead::credentials::hash_key;
use support::*;

const ACME_KEY: &str = "ak_live_acme_0123456789";
const ACME_KEY_NEW: &str = "ak_live_acme_rotated_42";
const GLOBEX_KEY: &str = "ak_live_globex_9876543210";

fn config(acme: &Upstream, globex: &Upstream, initech: &Upstream, server: &str) -> String {
    format!(
        r#"
[server]
workers = 1
{server}
[tenancy]
resolve = ["api_key", "host"]

[upstreams.acme]
targets = ["{}"]
[upstreams.globex]
targets = ["{}"]
[upstreams.initech]
targets = ["{}"]

[tenants.acme]
hosts = ["acme.example.com"]
upstream = "acme"
api_keys = ["{}", "{}"]
require = ["api_key"]

[tenants.globex]
hosts = ["globex.example.com"]
upstream = "globex"
api_keys = ["{}"]

[tenants.initech]
hosts = ["initech.example.com"]
upstream = "initech"
"#,
        acme.addr,
        globex.addr,
        initech.addr,
        hash_key(ACME_KEY.as_bytes()),
        hash_key(ACME_KEY_NEW.as_bytes()),
        hash_key(GLOBEX_KEY.as_bytes()),
    )
}

async fn three() -> (Gateway, Upstream, Upstream, Upstream) {
    let (a, g, i) = (
        Upstream::echo("acme").await,
        Upstream::echo("globex").await,
        Upstream::echo("initech").await,
    );
    let gw = Gateway::start(&config(&a, &g, &i, ""));
    (gw, a, g, i)
}

#[tokio::test]
async fn keys_name_their_tenant_and_never_reach_the_upstream() {
    let (gw, a, g, _i) = three().await;
    // By key alone (no known host), both of acme's keys (rotation), and globex's.
    for key in [ACME_KEY, ACME_KEY_NEW] {
        let r = get(
            gw.addr,
            "/k",
            &[("host", "api.example.net"), ("x-api-key", key)],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["upstream"], "acme");
    }
    let r = get(
        gw.addr,
        "/k",
        &[("host", "api.example.net"), ("x-api-key", GLOBEX_KEY)],
    )
    .await;
    assert_eq!(r.json()["upstream"], "globex");
    // Key and host agree.
    let r = get(
        gw.addr,
        "/k",
        &[("host", "globex.example.com"), ("x-api-key", GLOBEX_KEY)],
    )
    .await;
    assert_eq!(r.status, 200);
    for s in a.seen().iter().chain(g.seen().iter()) {
        assert!(
            !s.headers.contains_key("x-api-key"),
            "the key reached the upstream"
        );
    }
    assert_eq!(a.seen()[0].headers["x-tenant-id"], "acme");
    assert_eq!(g.seen()[0].headers["x-tenant-id"], "globex");
}

#[tokio::test]
async fn unknown_key_is_401_even_on_a_known_host() {
    let (gw, _a, g, _i) = three().await;
    for host in ["api.example.net", "globex.example.com"] {
        let r = get(
            gw.addr,
            "/",
            &[("host", host), ("x-api-key", "ak_live_guess")],
        )
        .await;
        assert_error(&r, 401, "invalid_api_key");
    }
    // Two different keys at once.
    let r = get(
        gw.addr,
        "/",
        &[
            ("host", "globex.example.com"),
            ("x-api-key", GLOBEX_KEY),
            ("x-api-key", ACME_KEY),
        ],
    )
    .await;
    assert_error(&r, 401, "invalid_api_key");
    assert!(g.seen().is_empty());
}

#[tokio::test]
async fn a_key_of_one_tenant_on_another_tenants_host_is_a_mismatch() {
    let (gw, a, g, i) = three().await;
    let r = get(
        gw.addr,
        "/",
        &[("host", "globex.example.com"), ("x-api-key", ACME_KEY)],
    )
    .await;
    assert_error(&r, 403, "tenant_mismatch");
    let r = get(
        gw.addr,
        "/",
        &[("host", "initech.example.com"), ("x-api-key", GLOBEX_KEY)],
    )
    .await;
    assert_error(&r, 403, "tenant_mismatch");
    assert!(a.seen().is_empty() && g.seen().is_empty() && i.seen().is_empty());
}

#[tokio::test]
async fn required_credentials() {
    let (gw, a, g, i) = three().await;
    // acme requires a key: its host alone is not enough.
    let r = get(gw.addr, "/", &[("host", "acme.example.com")]).await;
    assert_error(&r, 401, "credentials_required");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.json()["tenant"], "acme");
    assert!(a.seen().is_empty());
    // A spoofed tenant header does not help either.
    let r = get(
        gw.addr,
        "/",
        &[("host", "acme.example.com"), ("x-tenant-id", "acme")],
    )
    .await;
    assert_error(&r, 401, "credentials_required");
    // With the key it passes.
    let r = get(
        gw.addr,
        "/",
        &[("host", "acme.example.com"), ("x-api-key", ACME_KEY)],
    )
    .await;
    assert_eq!(r.status, 200);
    // Tenants without `require` still resolve by host.
    assert_eq!(
        get(gw.addr, "/", &[("host", "globex.example.com")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(gw.addr, "/", &[("host", "initech.example.com")])
            .await
            .status,
        200
    );
    assert_eq!((a.seen().len(), g.seen().len(), i.seen().len()), (1, 1, 1));
}

/// `bulkhead hash-key` with `input` on its standard input: what it printed.
fn hash_key_command(input: &[u8]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn hash_key_command_prints_the_config_form() {
    let acme = hash_key(ACME_KEY.as_bytes());
    assert_eq!(hash_key_command(b"ak_live_acme_0123456789\n"), acme);
    assert_eq!(hash_key_command(b"ak_live_acme_0123456789\r\n"), acme);
    assert_eq!(hash_key_command(b"ak_live_acme_0123456789"), acme);
    // One line ending is dropped, as `echo` adds it; a second is part of the key.
    assert_eq!(
        hash_key_command(b"ak_live_acme_0123456789\n\n"),
        hash_key(b"ak_live_acme_0123456789\n")
    );
}

#[tokio::test]
async fn keys_never_appear_in_logs_or_metrics() {
    let (a, g, i) = (
        Upstream::echo("acme").await,
        Upstream::echo("globex").await,
        Upstream::echo("initech").await,
    );
    let gw = Process::start(&config(&a, &g, &i, "log_format = \"json\""));
    let r = get(
        gw.addr,
        "/x",
        &[
            ("host", "acme.example.com"),
            ("x-api-key", ACME_KEY),
            ("x-request-id", "last-one"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_error(
        &get(gw.addr, "/", &[("x-api-key", "ak_live_guess_secret")]).await,
        401,
        "invalid_api_key",
    );
    let metrics = get(gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics
            .contains(r#"bulkhead_rejected_total{tenant="_unknown",reason="invalid_api_key"} 1"#),
        "{metrics}"
    );
    gw.log_line(&["\"access\"", "last-one"]).await;
    let log = gw.log.lock().unwrap().join("\n");
    for secret in [ACME_KEY, "ak_live_guess_secret"] {
        assert!(!log.contains(secret), "a key is in the log");
        assert!(!metrics.contains(secret), "a key is in the metrics");
    }
}

#[test]
fn check_rejects_bad_key_configs() {
    let run = |text: &str| {
        let (code, _, stderr) = run_check(text, &[]);
        (Some(code), stderr)
    };
    let base = "[tenancy]\nresolve = [\"api_key\", \"host\"]\n[upstreams.u]\ntargets = [\"127.0.0.1:1\"]\n[defaults]\nupstream = \"u\"\n";
    let k = hash_key(b"k");
    let (code, err) = run(&format!(
        "{base}[tenants.a]\napi_keys = [\"plaintext-key\"]\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains(":8:13: tenant \"a\": an api key (13 characters, not quoted here: it may be a key itself) must be \"sha256:<64 hex digits>\""),
        "{err}"
    );
    assert!(!err.contains("plaintext-key"), "{err}");
    let (code, err) = run(&format!(
        "{base}[tenants.a]\napi_keys = [\"{k}\"]\n[tenants.b]\napi_keys = [\"{k}\"]\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("an api key of tenant \"b\" is also a key of tenant \"a\""),
        "{err}"
    );
    let (code, err) = run(&format!(
        "{base}[tenants.a]\nhosts = [\"a.com\"]\nrequire = [\"api_key\"]\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("requires \"api_key\" but has no `api_keys`"),
        "{err}"
    );
    let (code, err) = run(&format!(
        "{base}[tenants.a]\nhosts = [\"a.com\"]\nrequire = [\"jwt\"]\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("tenant \"a\" requires \"jwt\" but has no `[tenants.a.jwt]` keys"),
        "{err}"
    );
    let (code, err) = run(&format!("{base}[tenants.a]\nhosts = [\"a.com\"]\n[tenants.a.jwt]\npublic_keys = [\"/nonexistent.pem\"]\n"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("tenant \"a\": cannot read /nonexistent.pem"),
        "{err}"
    );
    let (code, err) = run(&format!(
        "{}[tenants.a]\napi_keys = [\"{k}\"]\n",
        base.replace("\"api_key\", ", "")
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("has `api_keys` but `tenancy.resolve` has no \"api_key\" source"),
        "{err}"
    );
    let (code, err) = run(&format!(
        "{base}[tenants.a]\napi_keys = [\"{k}\"]\nrequire = [\"api_key\"]\n"
    ));
    assert_eq!(code, Some(0), "{err}");
}

/// A key pasted into `api_keys` instead of its hash is refused without being
/// repeated: the reload's 422 answer and `GET /config/history` (readable by whoever
/// reaches the admin listener; the log line carries the same text) named it whole.
#[tokio::test]
async fn a_raw_key_in_the_config_is_never_repeated_by_a_reload() {
    let up = Upstream::echo("u").await;
    let base = format!(
        "[tenancy]\nresolve = [\"api_key\", \"host\"]\n[upstreams.u]\ntargets = [\"{}\"]\n\
         [tenants.a]\nhosts = [\"a.com\"]\nupstream = \"u\"\n",
        up.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let (gw, path) = Gateway::start_file(dir.path(), &base);
    let secret = "sk_live_4f9a1c2e7b";
    for entry in [secret.to_owned(), format!("sha256:{secret}")] {
        write_config(&path, &format!("{base}api_keys = [\"{entry}\"]\n"));
        let r = send(gw.admin, "POST", "/reload", &[], bytes::Bytes::new()).await;
        assert_eq!(r.status, 422);
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("an api key ("), "{message}");
        assert!(!message.contains(secret), "{message}");
        let history = get(gw.admin, "/config/history", &[]).await;
        assert_eq!(history.json()[0]["result"], "failure");
        let history = String::from_utf8_lossy(&history.body).into_owned();
        assert!(!history.contains(secret), "{history}");
    }
}
