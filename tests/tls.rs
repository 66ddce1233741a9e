//! TLS at the edge through real sockets: certificates made in the test (rcgen), real
//! clients (rustls, curl, openssl s_client, h2load).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::pki::{self, Ca};
use support::{assert_error, get, run_check, send, Gateway, Upstream};

/// One test's world: a temporary directory with a CA and the default, acme's and
/// globex's certificates (serials 1, 100, 200), and the two tenants' echo upstreams.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    acme: Upstream,
    globex: Upstream,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "test-ca");
        ca.server("default", &["gateway.test"], 1);
        ca.server("acme", &["acme.test", "*.acme.test"], 100);
        ca.server("globex", &["globex.test"], 200);
        Setup {
            dir,
            ca,
            acme: Upstream::echo("acme-up").await,
            globex: Upstream::echo("globex-up").await,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a gateway on `toml`, written into the directory.
    fn start(&self, toml: &str) -> Gateway {
        Gateway::start_file(self.dir(), toml).0
    }

    /// A client trusting the test CA, without a client certificate.
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        pki::client_config(&self.ca.pem, None, alpn)
    }
}

fn config(acme: &Upstream, globex: &Upstream, extra_server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
tls_listen = "127.0.0.1:0"
{extra_server}
[server.tls]
default_cert = "default.pem"
default_key = "default.key"

[tenancy]
resolve = ["sni", "host"]

[upstreams.acme]
targets = ["{}"]
[upstreams.globex]
targets = ["{}"]

[tenants.acme]
hosts = ["acme.test", "*.acme.test"]
upstream = "acme"
[tenants.acme.tls]
cert = "acme.pem"
key = "acme.key"

[tenants.globex]
hosts = ["globex.test"]
upstream = "globex"
[tenants.globex.tls]
cert = "globex.pem"
key = "globex.key"
{extra}
"#,
        acme.addr, globex.addr
    )
}

fn hex(serial: u64) -> String {
    // x509-parser prints the serial's DER bytes as colon-separated hex.
    let bytes = serial.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(7);
    let mut v = bytes[first..].to_vec();
    if v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    v.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs (scripts/test.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `openssl s_client` with these protocol options; stdout and stderr together.
fn s_client(addr: SocketAddr, sni: &str, opts: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .args(opts)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs (scripts/test.sh installs it)");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---- acceptance 1: SNI picks the tenant's certificate ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_tenants_certificate_and_an_unknown_name_gets_the_default() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let gw = s.start(&config(acme, globex, "", ""));
    let cfg = s.client(&[b"http/1.1"]);

    for (sni, serial, upstream) in [
        ("acme.test", 100, "acme-up"),
        ("api.acme.test", 100, "acme-up"),
        ("globex.test", 200, "globex-up"),
    ] {
        let (r, seen) = pki::tls_get(gw.tls(), sni, cfg.clone(), "/x", sni)
            .await
            .unwrap();
        assert_eq!(seen.serial, hex(serial), "{sni}");
        assert_eq!(r.status, 200, "{sni}");
        assert_eq!(r.json()["upstream"], upstream, "{sni}");
    }
    // An unknown name gets the default certificate (which does not cover it: a client
    // that checks names refuses it, one that does not sees serial 1).
    let err = pki::tls_get(gw.tls(), "unknown.test", cfg.clone(), "/", "unknown.test").await;
    assert!(
        err.is_err(),
        "the default certificate does not cover unknown.test"
    );
    let (r, seen) = pki::tls_get(gw.tls(), "gateway.test", cfg.clone(), "/", "gateway.test")
        .await
        .unwrap();
    assert_eq!(seen.serial, hex(1));
    assert_error(&r, 404, "unknown_tenant");
    let (_, text) = s_client(gw.tls(), "unknown.test", &[]);
    assert!(
        text.contains("CN = gateway.test") || text.contains("CN=gateway.test"),
        "{text}"
    );

    // The upstream sees x-forwarded-proto: https.
    let seen = acme.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["x-forwarded-proto"], "https");

    // curl with the test CA, names resolved to the listener.
    let port = gw.tls().port();
    let ca = s.ca.path.to_str().unwrap();
    for (host, upstream) in [("acme.test", "acme-up"), ("globex.test", "globex-up")] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/curl");
        let (ok, out, err) = curl(&["--resolve", &resolve, "--cacert", ca, &url]);
        assert!(ok, "curl {host}: {err}");
        assert!(out.contains(upstream), "{host}: {out}");
    }
}

// ---- acceptance 2: misdirected requests and old protocol versions ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_for_one_tenant_and_host_for_another_is_421() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let gw = s.start(&config(acme, globex, "", ""));
    let cfg = s.client(&[b"http/1.1"]);
    let (r, _) = pki::tls_get(gw.tls(), "acme.test", cfg.clone(), "/", "globex.test")
        .await
        .unwrap();
    assert_error(&r, 421, "misdirected_request");
    // The body names no tenant: the client has proven nothing about globex.
    assert_eq!(r.json()["tenant"], serde_json::Value::Null);
    assert!(!r.json()["message"].as_str().unwrap().contains("globex"));
    // The same connection may still serve its own tenant.
    let (tls, _) = pki::connect(gw.tls(), "acme.test", cfg.clone())
        .await
        .unwrap();
    let mut h1 = pki::H1::over(tls).await;
    assert_error(
        &h1.get("/", &[("host", "globex.test")]).await.unwrap(),
        421,
        "misdirected_request",
    );
    assert_eq!(
        h1.get("/", &[("host", "acme.test")]).await.unwrap().status,
        200
    );
    assert!(globex.seen().is_empty(), "nothing reached globex");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_are_refused_and_min_version_1_3_refuses_1_2() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let gw = s.start(&config(acme, globex, "", ""));
    // The client offers the old version (security level 0 lets OpenSSL send it); the
    // server answers with an alert ("SSL alert number N" is one received from the peer).
    for v in ["-tls1", "-tls1_1"] {
        let (ok, text) = s_client(gw.tls(), "acme.test", &[v, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(!ok, "{v} must be refused: {text}");
        assert!(text.contains("SSL alert number"), "{v}: {text}");
        assert!(
            text.contains("no peer certificate available"),
            "{v}: {text}"
        );
    }
    let (ok, text) = s_client(gw.tls(), "acme.test", &["-tls1_2"]);
    assert!(
        ok && text.contains("TLSv1.2"),
        "1.2 is accepted by default: {text}"
    );
    drop(gw);

    let toml = config(acme, globex, "", "").replace(
        "default_key = \"default.key\"",
        "default_key = \"default.key\"\nmin_version = \"1.3\"",
    );
    let gw = s.start(&toml);
    let (ok, text) = s_client(gw.tls(), "acme.test", &["-tls1_2"]);
    assert!(!ok, "1.2 must be refused with min_version 1.3: {text}");
    assert!(text.contains("SSL alert number"), "{text}");
    let (ok, text) = s_client(gw.tls(), "acme.test", &["-tls1_3"]);
    assert!(ok && text.contains("TLSv1.3"), "{text}");
}

// ---- acceptance 3: HTTP/2 by ALPN ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_chosen_by_alpn_and_h2load_completes() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let gw = s.start(&config(acme, globex, "", ""));
    let cfg = s.client(&[b"h2", b"http/1.1"]);
    let (_, seen) = pki::connect(gw.tls(), "acme.test", cfg).await.unwrap();
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));

    let port = gw.tls().port();
    let resolve = format!("acme.test:{port}:127.0.0.1");
    let url = format!("https://acme.test:{port}/h2");
    let ca = s.ca.path.to_str().unwrap();
    let (ok, out, err) = curl(&[
        "--http2",
        "--resolve",
        &resolve,
        "--cacert",
        ca,
        "-w",
        "\n%{http_version}",
        &url,
    ]);
    assert!(ok, "{err}");
    assert!(out.ends_with("\n2"), "curl spoke HTTP/2: {out}");
    assert!(out.contains("acme-up"), "{out}");

    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "8", "-m", "10"])
        .arg(format!("--connect-to=127.0.0.1:{port}"))
        .arg(&url)
        .output()
        .expect("h2load runs (scripts/test.sh installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "h2load over TLS: {text}"
    );
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert!(text.contains("2000 2xx"), "{text}");
}

// ---- acceptance 4: rotation ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_handshakes_and_a_broken_one_is_rejected() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let gw = s.start(&config(acme, globex, "", ""));
    let cfg = s.client(&[b"http/1.1"]);

    let (tls, before) = pki::connect(gw.tls(), "acme.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(before.serial, hex(100));
    let mut old = pki::H1::over(tls).await;
    assert_eq!(
        old.get("/", &[("host", "acme.test")]).await.unwrap().status,
        200
    );

    // A new certificate (serial 101) over the same files, then a reload.
    s.ca.server("acme", &["acme.test", "*.acme.test"], 101);
    let r = send(gw.admin, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (_, after) = pki::connect(gw.tls(), "acme.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(
        after.serial,
        hex(101),
        "new handshakes see the new certificate"
    );
    assert_eq!(
        old.get("/", &[("host", "acme.test")]).await.unwrap().status,
        200,
        "a connection opened before the rotation keeps working"
    );

    // A broken certificate file: the reload is refused and 101 keeps serving.
    pki::write_atomic(&s.dir().join("acme.pem"), b"not a certificate");
    let r = send(gw.admin, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("acme.pem"), "{body}");
    let (_, still) = pki::connect(gw.tls(), "acme.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(still.serial, hex(101));

    // The file watcher sees certificate files too: a good certificate is picked up
    // without any trigger.
    let shared = gw.running.as_ref().unwrap().shared.clone();
    let _watcher = bulkhead::watch::spawn(shared).unwrap();
    s.ca.server("acme", &["acme.test", "*.acme.test"], 102);
    let start = Instant::now();
    loop {
        let (_, now) = pki::connect(gw.tls(), "acme.test", cfg.clone())
            .await
            .unwrap();
        if now.serial == hex(102) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the watcher never applied the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_and_survive_a_reload_that_changes_the_config() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let toml = config(acme, globex, "", "");
    let gw = s.start(&toml);
    // One client config: its session store keeps the tickets the gateway sends.
    let cfg = s.client(&[b"http/1.1"]);
    let (_, first) = pki::tls_get(gw.tls(), "acme.test", cfg.clone(), "/", "acme.test")
        .await
        .unwrap();
    assert!(!first.resumed);
    let (_, second) = pki::tls_get(gw.tls(), "acme.test", cfg.clone(), "/", "acme.test")
        .await
        .unwrap();
    assert!(
        second.resumed,
        "the second connection resumes the first one's session"
    );

    // A reload that changes something builds new TLS configs; the ticket key stays.
    std::fs::write(
        s.dir().join("gateway.toml"),
        toml.replace("upstream = \"globex\"\n", "upstream = \"acme\"\n"),
    )
    .unwrap();
    let r = send(gw.admin, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (r, third) = pki::tls_get(gw.tls(), "globex.test", cfg.clone(), "/", "globex.test")
        .await
        .unwrap();
    assert_eq!(r.json()["upstream"], "acme-up", "the reload took effect");
    assert!(
        !third.resumed,
        "a session of acme.test is not offered for globex.test"
    );
    let (_, fourth) = pki::tls_get(gw.tls(), "acme.test", cfg.clone(), "/", "acme.test")
        .await
        .unwrap();
    assert!(
        fourth.resumed,
        "a session from before the reload resumes after it"
    );
}

// ---- acceptance 5: mTLS ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_and_forwards_its_subject() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let clients = Ca::new(s.dir(), "acme-clients");
    let alice = clients.client("alice", "alice");
    let stranger = Ca::new(s.dir(), "other-ca").client("mallory", "mallory");
    let toml = config(acme, globex, "", "").replace(
        "key = \"acme.key\"",
        "key = \"acme.key\"\nclient_ca = \"acme-clients.pem\"\nforward_client_cert = \"x-client-cert-subject\"",
    );
    let toml = toml.replace("resolve = [\"sni\", \"host\"]", "resolve = [\"host\"]");
    let gw = s.start(&toml);

    // No client certificate, or one from another CA: refused. (In TLS 1.3 the server
    // checks the client's certificate after the client thinks it is done, so the
    // failure shows on the first exchange.)
    for cert in [None, Some(&stranger)] {
        let cfg = pki::client_config(&s.ca.pem, cert, &[b"http/1.1"]);
        let r = pki::tls_get(gw.tls(), "acme.test", cfg, "/", "acme.test").await;
        assert!(r.is_err(), "refused without a valid client certificate");
    }
    assert!(acme.seen().is_empty());

    let cfg = pki::client_config(&s.ca.pem, Some(&alice), &[b"http/1.1"]);
    let (tls, _) = pki::connect(gw.tls(), "acme.test", cfg).await.unwrap();
    let mut h1 = pki::H1::over(tls).await;
    let r = h1
        .get(
            "/",
            &[("host", "acme.test"), ("x-client-cert-subject", "CN=admin")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let seen = acme.seen();
    let subjects: Vec<_> = seen[0]
        .headers
        .get_all("x-client-cert-subject")
        .iter()
        .collect();
    assert_eq!(subjects.len(), 1, "the client's copy is removed");
    // RFC 4514: the last RDN first (the certificate says CN, then O).
    assert_eq!(subjects[0], "O=Acme Corp,CN=alice");

    // A CN that imitates more of the name is escaped, not read as structure; bytes
    // beyond ASCII go as hex pairs.
    for (cn, forwarded) in [
        ("bob, O=Admin Corp", r"O=Acme Corp,CN=bob\, O=Admin Corp"),
        ("#x+y;<z> ", r"O=Acme Corp,CN=\#x\+y\;\<z\>\20"),
        ("José", r"O=Acme Corp,CN=Jos\C3\A9"),
    ] {
        let cert = clients.client("odd", cn);
        let cfg = pki::client_config(&s.ca.pem, Some(&cert), &[b"http/1.1"]);
        let (r, _) = pki::tls_get(gw.tls(), "acme.test", cfg, "/", "acme.test")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let seen = acme.seen();
        assert_eq!(
            seen.last().unwrap().headers["x-client-cert-subject"],
            forwarded,
            "{cn:?}"
        );
    }
    let before = acme.seen().len();

    // The client CA cannot be sidestepped: globex's SNI (no client certificate asked)
    // with acme's Host, or plain HTTP for acme, is misdirected.
    let cfg = s.client(&[b"http/1.1"]);
    let (r, _) = pki::tls_get(gw.tls(), "globex.test", cfg, "/", "acme.test")
        .await
        .unwrap();
    assert_error(&r, 421, "misdirected_request");
    let plain = get(gw.addr, "/", &[("host", "acme.test")]).await;
    assert_error(&plain, 421, "misdirected_request");
    // Neither body names acme to a client that has proven no certificate for it; the
    // metrics still count the refusals under acme.
    for r in [&r, &plain] {
        assert_eq!(
            r.json()["tenant"],
            serde_json::Value::Null,
            "{:?}",
            r.json()
        );
        assert!(!r.json()["message"].as_str().unwrap().contains("acme"));
    }
    let metrics = get(gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics
            .contains(r#"bulkhead_rejected_total{tenant="acme",reason="misdirected_request"} 2"#),
        "{metrics}"
    );
    assert_eq!(acme.seen().len(), before);
    // globex itself needs no client certificate.
    let cfg = s.client(&[b"http/1.1"]);
    let (r, _) = pki::tls_get(gw.tls(), "globex.test", cfg, "/", "globex.test")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// A connection verified by a client CA the tenant has since replaced serves it no
/// more: 421, so the client reconnects and proves its certificate to the new CA (which
/// refuses it here). A reload that leaves the CA alone keeps the connection serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_client_ca_ends_what_the_old_one_verified() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let clients = Ca::new(s.dir(), "acme-clients");
    let alice = clients.client("alice", "alice");
    let toml = config(acme, globex, "", "").replace(
        "key = \"acme.key\"",
        "key = \"acme.key\"\nclient_ca = \"acme-clients.pem\"",
    );
    let toml = toml.replace("resolve = [\"sni\", \"host\"]", "resolve = [\"host\"]");
    let gw = s.start(&toml);
    let cfg = pki::client_config(&s.ca.pem, Some(&alice), &[b"http/1.1"]);
    let (tls, _) = pki::connect(gw.tls(), "acme.test", cfg.clone())
        .await
        .unwrap();
    let mut h1 = pki::H1::over(tls).await;
    let h = [("host", "acme.test")];
    assert_eq!(h1.get("/", &h).await.unwrap().status, 200);

    // A reload that changes something else: the connection serves on.
    std::fs::write(
        s.dir().join("gateway.toml"),
        toml.replace("[tenants.globex]", "[tenants.globex]\nfeatures = [\"x\"]"),
    )
    .unwrap();
    let r = send(gw.admin, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(h1.get("/", &h).await.unwrap().status, 200);

    // The client CA replaced by one that never issued alice's certificate.
    let other = Ca::new(s.dir(), "other-clients");
    pki::write_atomic(&s.dir().join("acme-clients.pem"), other.pem.as_bytes());
    let r = send(gw.admin, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = h1.get("/", &h).await.unwrap();
    assert_error(&r, 421, "misdirected_request");
    assert_eq!(r.json()["tenant"], serde_json::Value::Null);
    let r = pki::tls_get(gw.tls(), "acme.test", cfg, "/", "acme.test").await;
    assert!(
        r.is_err(),
        "a new connection with alice's certificate is refused"
    );
}

/// A plain HTTP request sent to the TLS port gets the gateway's 400 saying so (as
/// nginx answers it), not a silent close; a TLS client on the same port is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_is_told_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::new().await;
    let gw = s.start(&config(&s.acme, &s.globex, "", ""));
    let mut c = tokio::net::TcpStream::connect(gw.tls()).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: acme.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("HTTPS port"),
        "{body}"
    );
    assert!(s.acme.seen().is_empty());
    // Counted as every refusal (it was in no metric and no log line).
    let metrics = String::from_utf8_lossy(&get(gw.admin, "/metrics", &[]).await.body).into_owned();
    for key in [
        "bulkhead_requests_total{tenant=\"_unknown\",status=\"400\"} 1",
        "bulkhead_rejected_total{tenant=\"_unknown\",reason=\"bad_request\"} 1",
    ] {
        assert!(metrics.contains(key), "no {key} in\n{metrics}");
    }
    let (r, _) = pki::tls_get(
        gw.tls(),
        "acme.test",
        s.client(&[b"http/1.1"]),
        "/",
        "acme.test",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

// ---- redirect_http ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_answers_308_to_the_https_listener() {
    let s = Setup::new().await;
    let (acme, globex) = (&s.acme, &s.globex);
    let gw = s.start(&config(acme, globex, "redirect_http = true", ""));
    let r = get(gw.addr, "/a/b?c=1", &[("host", "acme.test:8080")]).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://acme.test:{}/a/b?c=1", gw.tls().port()).as_str())
    );
    assert!(acme.seen().is_empty(), "nothing is proxied in plain text");
}

// ---- configuration errors ----

#[test]
fn check_rejects_missing_mismatched_and_uncovering_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    ca.server("default", &["gateway.test"], 1);
    ca.server("acme", &["acme.test"], 2);
    ca.server("other", &["other.test"], 3);
    let base = |tenant_tls: &str| {
        format!(
            r#"[server]
tls_listen = "127.0.0.1:0"
[server.tls]
default_cert = "{d}/default.pem"
default_key = "{d}/default.key"
[upstreams.u]
targets = ["127.0.0.1:9"]
[tenants.acme]
hosts = ["acme.test"]
upstream = "u"
[tenants.acme.tls]
{tenant_tls}
"#,
            d = dir.path().display()
        )
    };
    let d = dir.path().display();
    let (code, _, err) = run_check(
        &base(&format!("cert = \"{d}/acme.pem\"\nkey = \"{d}/acme.key\"")),
        &[],
    );
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = run_check(
        &base(&format!(
            "cert = \"{d}/missing.pem\"\nkey = \"{d}/acme.key\""
        )),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:12:8: tenant \"acme\": cannot read the certificate"),
        "{err}"
    );

    let (code, _, err) = run_check(
        &base(&format!("cert = \"{d}/acme.pem\"\nkey = \"{d}/other.key\"")),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:13:7:") && err.contains("does not fit the certificate"),
        "{err}"
    );

    let (code, _, err) = run_check(
        &base(&format!(
            "cert = \"{d}/other.pem\"\nkey = \"{d}/other.key\""
        )),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "PATH:12:8: the certificate of tenant \"acme\" does not cover its host \"acme.test\""
        ),
        "{err}"
    );

    let (code, _, err) = run_check(&base(&format!("cert = \"{d}/acme.pem\"")), &[]);
    assert_eq!(code, 1);
    assert!(err.contains("`tls.cert` needs `tls.key`"), "{err}");

    // The verified subject cannot go into a header the request's framing depends on.
    let (code, _, err) = run_check(
        &base(&format!(
            "client_ca = \"{d}/ca.pem\"\nforward_client_cert = \"Content-Length\""
        )),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:13:23: `tls.forward_client_cert` cannot be \"Content-Length\": the gateway reads and writes it for every request itself"),
        "{err}"
    );
    // A leaf certificate as the client CA: it would verify no client, every mTLS
    // handshake of the tenant would fail.
    ca.client_no_ca("leaf", "alice");
    let (code, _, err) = run_check(&base(&format!("client_ca = \"{d}/leaf.pem\"")), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:12:13: tenant \"acme\": ")
            && err.contains("leaf.pem holds a certificate that is not a CA (CN=alice): its basicConstraints say CA:FALSE"),
        "{err}"
    );
    // A PEM block that holds no certificate: said of the certificate, at its key.
    std::fs::write(
        dir.path().join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, _, err) = run_check(
        &base(&format!(
            "cert = \"{d}/garbage.pem\"\nkey = \"{d}/acme.key\""
        )),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:12:8: tenant \"acme\": ")
            && err.contains(
                "garbage.pem: certificate 1 of the chain is not a valid X.509 certificate"
            ),
        "{err}"
    );
    // `[server.tls]` without `server.tls_listen`: certificates nothing serves.
    let (code, _, err) = run_check(
        &base(&format!("cert = \"{d}/acme.pem\"\nkey = \"{d}/acme.key\""))
            .replace("tls_listen = \"127.0.0.1:0\"\n", ""),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:3:16: `[server.tls]` needs `server.tls_listen`"),
        "{err}"
    );
    // Nor into the header that names the tenant for the backend.
    let (code, _, err) = run_check(
        &base(&format!(
            "client_ca = \"{d}/ca.pem\"\nforward_client_cert = \"X-Tenant-Id\""
        )),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:13:23: `tls.forward_client_cert` cannot be \"X-Tenant-Id\": it is `tenancy.forward_header`, which names the tenant"),
        "{err}"
    );

    let (code, _, err) = run_check(
        "[tenancy]\nresolve = [\"sni\"]\n[upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n[tenants.a]\nhosts = [\"a.test\"]\nupstream = \"u\"\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:2:11:") && err.contains("without TLS there is no SNI"),
        "{err}"
    );

    let (code, _, err) = run_check("[server]\ntls_listen = \"127.0.0.1:8443\"\n", &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("PATH:2:14:") && err.contains("needs `[server.tls]`"),
        "{err}"
    );
}

// ---- heads hyper would refuse with an empty answer ----

/// Over TLS (hyper's HTTP/1.1 server), a head the plain listener's fast path answers
/// with the gateway's JSON error gets that answer too — not hyper's empty 400 or 431
/// that no log or metric saw — on any request of a keep-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_would_refuse_get_the_gateways_json_errors_over_tls() {
    let s = Setup::new().await;
    let gw = s.start(&config(&s.acme, &s.globex, "", ""));
    let ok = "GET /first HTTP/1.1\r\nhost: acme.test\r\n\r\n";
    let post = "POST /second HTTP/1.1\r\nhost: acme.test\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let big = format!(
        "GET / HTTP/1.1\r\nhost: acme.test\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let cases: [(String, u16, &str); 4] = [
        (format!("{ok}GET t/acme/x HTTP/1.1\r\nhost: acme.test\r\n\r\n"), 400, "bad_request"),
        (
            format!("{ok}{post}POST /x HTTP/1.1\r\nhost: acme.test\r\ntransfer-encoding: gzip\r\n\r\nabc"),
            400,
            "bad_request",
        ),
        (format!("{ok}POST /x HTTP/1.1\r\nhost: acme.test\r\ncontent-length: 1x\r\n\r\n"), 400, "bad_request"),
        (format!("{ok}{big}"), 431, "headers_too_large"),
    ];
    for (bytes, status, code) in &cases {
        let raw = pki::tls_raw(
            gw.tls(),
            "acme.test",
            s.client(&[b"http/1.1"]),
            bytes.as_bytes(),
        )
        .await;
        let answers = pki::responses(&raw);
        let (last_status, head, body) = answers.last().expect("answered");
        assert!(
            answers[..answers.len() - 1].iter().all(|a| a.0 == 200),
            "{answers:?}"
        );
        assert!(
            answers.len() >= 2,
            "the earlier requests were served: {answers:?}"
        );
        assert_eq!(last_status, status, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        let body: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
        assert_eq!(body["error"], *code, "{body}");
        assert_eq!(body["tenant"], serde_json::Value::Null, "{body}");
        assert!(body["request_id"].is_string(), "{body}");
    }
    // Counted, under no tenant, like the fast path's refusals.
    let metrics = get(gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    for line in [
        r#"bulkhead_rejected_total{tenant="_unknown",reason="bad_request"} 3"#,
        r#"bulkhead_rejected_total{tenant="_unknown",reason="headers_too_large"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

/// Every byte each listener sends on a new connection after `bytes` (as `acme.test`
/// over TLS), until it closes: (plain, TLS).
async fn on_both_listeners(s: &Setup, gw: &Gateway, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let plain = plain_raw(gw.addr, bytes).await;
    let tls = pki::tls_raw(gw.tls(), "acme.test", s.client(&[b"http/1.1"]), bytes).await;
    (plain, tls)
}

/// Every byte the plain listener sends on a new connection after `bytes`, until it
/// closes.
async fn plain_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before it has read everything.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("answered and closed in time");
        match read {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Bad input gets the same answer on the TLS listener (hyper's HTTP/1.1 server behind
/// `h1::Checked`) as on the plain one (the fast path): the same status and `error`,
/// and the connection kept or closed alike (each case is followed by a good request,
/// answered only when the connection stays open). Relative targets, transfer codings
/// other than chunked, heads over `max_header_bytes` and over the 64 KiB the server
/// reads, and userinfo in the authority (RFC 9110 §4.2.4: 400, not 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_same_answer_over_tls_as_over_plain_http() {
    let s = Setup::new().await;
    let gw = s.start(&config(&s.acme, &s.globex, "", ""));
    let after = "GET /after HTTP/1.1\r\nhost: acme.test\r\nconnection: close\r\n\r\n";
    let big = |n: usize| {
        format!(
            "GET /big HTTP/1.1\r\nhost: acme.test\r\nx-big: {}\r\n\r\n",
            "a".repeat(n)
        )
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("relative target", "GET foo HTTP/1.1\r\nhost: acme.test\r\n\r\n".into(), 400, "bad_request"),
        ("relative target, HTTP/1.0", "GET foo HTTP/1.0\r\nhost: acme.test\r\n\r\n".into(), 400, "bad_request"),
        (
            "gzip alone",
            "POST /x HTTP/1.1\r\nhost: acme.test\r\ntransfer-encoding: gzip\r\n\r\nabc".into(),
            400,
            "bad_request",
        ),
        (
            "gzip, then chunked",
            "POST /x HTTP/1.1\r\nhost: acme.test\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
            501,
            "unsupported_transfer_coding",
        ),
        ("a 20 KiB head", big(20 * 1024), 431, "headers_too_large"),
        ("a 70 KiB head", big(70 * 1024), 431, "headers_too_large"),
        ("userinfo in Host", "GET / HTTP/1.1\r\nhost: x@acme.test\r\n\r\n".into(), 400, "bad_request"),
        (
            "userinfo in the target",
            "GET https://x@acme.test/ HTTP/1.1\r\nhost: acme.test\r\n\r\n".into(),
            400,
            "bad_request",
        ),
    ];
    let summary = |raw: &[u8]| -> Vec<(u16, String, bool)> {
        pki::responses(raw)
            .into_iter()
            .map(|(status, head, body)| {
                let error = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|b| b["error"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                (
                    status,
                    error,
                    head.to_ascii_lowercase().contains("connection: close"),
                )
            })
            .collect()
    };
    for (what, bad, status, error) in &cases {
        let bytes = format!("{bad}{after}");
        let (plain, tls) = on_both_listeners(&s, &gw, bytes.as_bytes()).await;
        let (plain, tls) = (summary(&plain), summary(&tls));
        assert_eq!(
            plain.first().map(|a| (a.0, a.1.as_str())),
            Some((*status, *error)),
            "{what}, plain: {plain:?}"
        );
        assert_eq!(tls, plain, "{what}: TLS (left) and plain (right)");
    }
    assert!(
        s.acme.seen().iter().all(|r| r.path == "/after"),
        "no bad request was forwarded"
    );
}

/// A 413 for a body the client sent whole, the next request right behind it: both
/// listeners answer the 413 with `connection: close` and close, as nginx does after
/// every 413 (RFC 9110 §15.5.14 lets the server close). The plain listener skipped a
/// body already in its buffer and answered the next request; TLS closed. A body within
/// `max_body` keeps the connection on both (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_for_a_body_already_received_closes_over_tls_as_over_plain_http() {
    let s = Setup::new().await;
    let gw = s.start(&config(
        &s.acme,
        &s.globex,
        "",
        "[tenants.acme.limits]\nmax_body = 1024\n",
    ));
    let after = "GET /after HTTP/1.1\r\nhost: acme.test\r\nconnection: close\r\n\r\n";
    let post = |n: usize| {
        format!(
            "POST /body HTTP/1.1\r\nhost: acme.test\r\ncontent-length: {n}\r\n\r\n{}{after}",
            "b".repeat(n)
        )
    };
    let summary = |raw: &[u8]| -> Vec<(u16, bool)> {
        pki::responses(raw)
            .into_iter()
            .map(|(status, head, _)| {
                let close = head.to_ascii_lowercase().contains("connection: close");
                (status, close)
            })
            .collect()
    };
    let cases = [
        ("2000 bytes, over max_body", post(2000), vec![(413, true)]),
        (
            "1024 bytes, within it",
            post(1024),
            vec![(200, false), (200, true)],
        ),
    ];
    for (what, bytes, want) in cases {
        let (plain, tls) = on_both_listeners(&s, &gw, bytes.as_bytes()).await;
        let (plain, tls) = (summary(&plain), summary(&tls));
        assert_eq!(plain, want, "{what}, plain");
        assert_eq!(tls, want, "{what}, TLS");
    }
    let bodies = s.acme.seen().iter().filter(|r| r.path == "/body").count();
    assert_eq!(bodies, 2, "only the bodies within max_body were forwarded");
}

/// Over TLS, a request that names the `http` scheme (HTTP/2 `:scheme: http`, an
/// HTTP/1.1 `http://` target) is served as nginx and HAProxy serve it: the scheme a
/// client writes is not the connection's (RFC 9113 §8.3.1 does not tie them), and the
/// upstream is told what the connection was — `x-forwarded-proto: https` — never the
/// client's word for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_scheme_over_tls_is_served_as_https() {
    let s = Setup::new().await;
    let gw = s.start(&config(&s.acme, &s.globex, "", ""));
    // HTTP/2.
    let (tls, seen) = pki::connect(gw.tls(), "acme.test", s.client(&[b"h2"]))
        .await
        .unwrap();
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            http::Request::get("http://acme.test/h2")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // HTTP/1.1, absolute form.
    let raw = pki::tls_raw(
        gw.tls(),
        "acme.test",
        s.client(&[b"http/1.1"]),
        b"GET http://acme.test/h1 HTTP/1.1\r\nhost: acme.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(pki::responses(&raw)[0].0, 200);
    let seen = s.acme.seen();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.headers["x-forwarded-proto"], "https", "{}", r.path);
    }
}

/// The heads of a keep-alive TLS connection are found after bodies of every framing
/// (a long `Content-Length` body, a chunked one with extensions and trailers), so the
/// requests after them are served, and their bodies reach the upstream whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_bodies_of_every_framing_are_served_over_tls() {
    let s = Setup::new().await;
    let gw = s.start(&config(&s.acme, &s.globex, "", ""));
    let long = support::pattern(300 * 1024);
    let mut bytes = format!(
        "POST /long HTTP/1.1\r\nhost: acme.test\r\ncontent-length: {}\r\n\r\n",
        long.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&long);
    bytes.extend_from_slice(
        b"POST /chunked HTTP/1.1\r\nhost: acme.test\r\ntransfer-encoding: chunked\r\n\r\n\
          3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: t\r\n\r\n\
          GET /after HTTP/1.1\r\nhost: acme.test\r\n\r\n\
          GET t/bad HTTP/1.1\r\nhost: acme.test\r\n\r\n",
    );
    let raw = pki::tls_raw(gw.tls(), "acme.test", s.client(&[b"http/1.1"]), &bytes).await;
    let answers = pki::responses(&raw);
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [200, 200, 200, 400], "{answers:?}");
    let seen = s.acme.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/long", "/chunked", "/after"]);
    assert_eq!(seen[0].body.len, long.len() as u64);
    assert_eq!(seen[0].body.fnv, support::Digest::of(&long).fnv);
    assert_eq!(seen[1].body.len, 19);
}
