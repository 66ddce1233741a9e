//! The "jwt" source through real sockets: HS256 and RS256 tokens name their tenant;
//! expired, not-yet-valid, wrong-issuer, wrong-audience, `alg: none`, tampered and
//! algorithm-confused tokens are 401 with `WWW-Authenticate: Bearer error="invalid_token"`;
//! a token of A on B's host is 403; verified claims are forwarded; tokens never reach
//! the logs.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use support::*;

const ACME_SECRET: &str = "acme-hs256-test-secret-0123456789";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn rs256(claims: serde_json::Value) -> String {
    let pem = std::fs::read(format!("{FIXTURES}/globex-rs256-private.pem")).unwrap();
    encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

fn acme_claims() -> serde_json::Value {
    json!({"tenant": "acme", "sub": "user-42", "exp": now() + 600, "iss": "https://login.acme.example/", "aud": "api"})
}

fn globex_claims() -> serde_json::Value {
    json!({"tenant": "globex", "sub": "g-7", "exp": now() + 600})
}

struct Setup {
    gw: Gateway,
    acme: Upstream,
    globex: Upstream,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("acme.key");
    std::fs::write(&secret, format!("{ACME_SECRET}\n")).unwrap();
    let (acme, globex) = (Upstream::echo("acme").await, Upstream::echo("globex").await);
    let gw = Gateway::start(&format!(
        r#"
[tenancy]
resolve = ["jwt", "host"]
[tenancy.jwt]
leeway = "5s"

[upstreams.acme]
targets = ["{}"]
[upstreams.globex]
targets = ["{}"]

[tenants.acme]
hosts = ["acme.example.com"]
upstream = "acme"
[tenants.acme.jwt]
hs256_secret_file = "{}"
issuer = "https://login.acme.example/"
audience = "api"
forward_claims = {{ sub = "x-user-id" }}

[tenants.globex]
hosts = ["globex.example.com"]
upstream = "globex"
require = ["jwt"]
[tenants.globex.jwt]
public_keys = ["{FIXTURES}/globex-rs256-public.pem"]
"#,
        acme.addr,
        globex.addr,
        secret.display()
    ));
    Setup {
        gw,
        acme,
        globex,
        _dir: dir,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn assert_invalid_token(r: &Reply, what: &str) {
    assert_eq!(
        r.status,
        401,
        "{what}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_error(r, 401, "invalid_token");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{what}"
    );
}

#[tokio::test]
async fn valid_tokens_name_their_tenants_and_forward_claims() {
    let s = setup().await;
    let token = hs256(acme_claims(), ACME_SECRET.as_bytes());
    let auth = bearer(&token);
    let r = get(
        s.gw.addr,
        "/a",
        &[
            ("host", "api.example.net"),
            ("authorization", &auth),
            ("x-user-id", "spoofed"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["upstream"], "acme");
    let seen = &s.acme.seen()[0];
    assert_eq!(seen.headers["x-tenant-id"], "acme");
    let users: Vec<_> = seen.headers.get_all("x-user-id").iter().collect();
    assert_eq!(
        users,
        ["user-42"],
        "the verified claim replaces the client's copy"
    );
    assert_eq!(
        seen.headers["authorization"],
        auth.as_str(),
        "Authorization is forwarded unchanged"
    );

    let auth = bearer(&rs256(globex_claims()));
    let r = get(
        s.gw.addr,
        "/g",
        &[("host", "globex.example.com"), ("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["upstream"], "globex");
}

#[tokio::test]
async fn bad_tokens_are_401() {
    let s = setup().await;
    let mut cases: Vec<(&str, String)> = Vec::new();
    let mut c = acme_claims();
    c["exp"] = json!(now() - 120);
    cases.push(("expired", hs256(c, ACME_SECRET.as_bytes())));
    let mut c = acme_claims();
    c["nbf"] = json!(now() + 120);
    cases.push(("not yet valid", hs256(c, ACME_SECRET.as_bytes())));
    let mut c = acme_claims();
    c["iss"] = json!("https://evil.example/");
    cases.push(("wrong issuer", hs256(c, ACME_SECRET.as_bytes())));
    let mut c = acme_claims();
    c["aud"] = json!("other");
    cases.push(("wrong audience", hs256(c, ACME_SECRET.as_bytes())));
    // A configured issuer and audience are required, not only checked when present;
    // a registered claim of the wrong type is not honoured, so the token is not valid.
    for (what, claim, value) in [
        ("no issuer", "iss", None),
        ("no audience", "aud", None),
        ("issuer not a string", "iss", Some(json!(5))),
        ("audience not a string", "aud", Some(json!(7))),
        ("nbf not a number", "nbf", Some(json!("tomorrow"))),
        ("exp not a number", "exp", Some(json!("later"))),
    ] {
        let mut c = acme_claims();
        match value {
            Some(v) => c[claim] = v,
            None => {
                c.as_object_mut().unwrap().remove(claim);
            }
        }
        cases.push((what, hs256(c, ACME_SECRET.as_bytes())));
    }
    cases.push(("wrong secret", hs256(acme_claims(), b"not-the-secret")));
    let mut c = acme_claims();
    c.as_object_mut().unwrap().remove("tenant");
    cases.push(("no tenant claim", hs256(c, ACME_SECRET.as_bytes())));
    // alg: none, unsigned.
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    cases.push((
        "alg none",
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&acme_claims())
        ),
    ));
    // Tampered: acme's valid token with the payload changed to another user.
    let good = hs256(acme_claims(), ACME_SECRET.as_bytes());
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = acme_claims();
    c["sub"] = json!("admin");
    cases.push(("tampered", format!("{}.{}.{}", parts[0], b64(&c), parts[2])));
    // Algorithm confusion: HS256 "signed" with globex's RS256 public key.
    let public = std::fs::read(format!("{FIXTURES}/globex-rs256-public.pem")).unwrap();
    cases.push((
        "HS256 with the RS256 public key",
        hs256(globex_claims(), &public),
    ));
    cases.push(("garbage", "not.a.token".to_owned()));

    for (what, token) in &cases {
        for host in ["api.example.net", "acme.example.com", "globex.example.com"] {
            let auth = bearer(token);
            let r = get(s.gw.addr, "/", &[("host", host), ("authorization", &auth)]).await;
            assert_invalid_token(&r, what);
        }
    }
    assert!(
        s.acme.seen().is_empty() && s.globex.seen().is_empty(),
        "nothing reached an upstream"
    );
}

#[tokio::test]
async fn a_token_of_one_tenant_on_another_tenants_host_is_403() {
    let s = setup().await;
    let auth = bearer(&hs256(acme_claims(), ACME_SECRET.as_bytes()));
    let r = get(
        s.gw.addr,
        "/",
        &[("host", "globex.example.com"), ("authorization", &auth)],
    )
    .await;
    assert_error(&r, 403, "tenant_mismatch");
    let auth = bearer(&rs256(globex_claims()));
    let r = get(
        s.gw.addr,
        "/",
        &[("host", "acme.example.com"), ("authorization", &auth)],
    )
    .await;
    assert_error(&r, 403, "tenant_mismatch");
    assert!(s.acme.seen().is_empty() && s.globex.seen().is_empty());
}

#[tokio::test]
async fn required_token_and_other_schemes() {
    let s = setup().await;
    // globex requires a token: its host alone, or Basic auth, is not enough.
    let r = get(s.gw.addr, "/", &[("host", "globex.example.com")]).await;
    assert_error(&r, 401, "credentials_required");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = get(
        s.gw.addr,
        "/",
        &[
            ("host", "globex.example.com"),
            ("authorization", "Basic dXNlcjpwYXNz"),
        ],
    )
    .await;
    assert_error(&r, 401, "credentials_required");
    // acme does not: Basic auth is not a token, so it resolves by host.
    let r = get(
        s.gw.addr,
        "/",
        &[
            ("host", "acme.example.com"),
            ("authorization", "Basic dXNlcjpwYXNz"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!s.acme.seen()[0].headers.contains_key("x-user-id"));
}

#[tokio::test]
async fn tokens_never_appear_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("acme.key");
    std::fs::write(&secret, ACME_SECRET).unwrap();
    let up = Upstream::echo("acme").await;
    let gw = Process::start(&format!(
        "[server]\nlog_format = \"json\"\n[tenancy]\nresolve = [\"jwt\", \"host\"]\n[upstreams.acme]\ntargets = [\"{}\"]\n[tenants.acme]\nhosts = [\"acme.example.com\"]\nupstream = \"acme\"\n[tenants.acme.jwt]\nhs256_secret_file = \"{}\"\n",
        up.addr,
        secret.display()
    ));
    let good = hs256(
        json!({"tenant": "acme", "exp": now() + 600}),
        ACME_SECRET.as_bytes(),
    );
    let bad = hs256(
        json!({"tenant": "acme", "exp": now() - 600}),
        ACME_SECRET.as_bytes(),
    );
    assert_eq!(
        get(
            gw.addr,
            "/",
            &[("authorization", &bearer(&good)), ("x-request-id", "t-1")]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get(
            gw.addr,
            "/",
            &[("authorization", &bearer(&bad)), ("x-request-id", "t-2")]
        )
        .await
        .status,
        401
    );
    gw.log_line(&["\"access\"", "t-2"]).await;
    let log = gw.log.lock().unwrap().join("\n");
    for t in [&good, &bad] {
        assert!(!log.contains(t.as_str()), "a token is in the log");
        assert!(
            !log.contains(t.split('.').nth(2).unwrap()),
            "a signature is in the log"
        );
    }
    assert!(!log.contains(ACME_SECRET));
}

#[tokio::test]
async fn jwks_per_tenant_and_token_in_a_cookie() {
    let up = Upstream::echo("globex").await;
    let gw = Gateway::start(&format!(
        "[tenancy]\nresolve = [\"jwt\", \"host\"]\n[tenancy.jwt]\ncookie = \"session\"\n[upstreams.globex]\ntargets = [\"{}\"]\n[tenants.globex]\nhosts = [\"globex.example.com\"]\nupstream = \"globex\"\nrequire = [\"jwt\"]\n[tenants.globex.jwt]\njwks_file = \"{FIXTURES}/globex-jwks.json\"\n",
        up.addr
    ));
    let token = rs256(globex_claims());
    // In the Authorization header, verified with the tenant's JWKS.
    let r = get(gw.addr, "/", &[("authorization", &bearer(&token))]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    // In the configured cookie, among others.
    let cookie = format!("theme=dark; session={token}; lang=en");
    let r = get(gw.addr, "/", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    // A bad token in the cookie is refused like one in the header.
    let mut c = globex_claims();
    c["exp"] = json!(now() - 600);
    let cookie = format!("session={}", rs256(c));
    assert_invalid_token(
        &get(gw.addr, "/", &[("cookie", &cookie)]).await,
        "expired, in a cookie",
    );
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn a_jwks_with_keys_the_gateway_cannot_use_still_verifies_with_the_ones_it_can() {
    // An identity provider's set often holds keys for other algorithms (ES512 here,
    // which this gateway does not verify) and keys of other uses; an RSA key marked
    // HS256 can verify nothing. Those are skipped; the set was refused whole before.
    let globex: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/globex-jwks.json")).unwrap(),
    )
    .unwrap();
    let good = globex["keys"][0].clone();
    let mut mislabelled = good.clone();
    mislabelled["alg"] = json!("HS256");
    mislabelled["kid"] = json!("mislabelled");
    let es512 = json!({"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "p521",
        "x": "AHKZLLOsCOzz5cY97ewNUajB957y-C-U88c3v13nmGZx6sYl_oJXu9A5RkTKqjqvjyekWF-7ytDyRXYgCF5cj0Kt",
        "y": "AdymlHvOiLxXkEhayXQnNCvDX4h9htZaCJN34kfmC6pV5OhQHiraVySsUdaQkAgDPrwQrJmbnX9cwlGfP-HqHZR1"});
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("mixed.json");
    std::fs::write(
        &jwks,
        json!({"keys": [mislabelled, es512, {"kty": "unknown"}, good]}).to_string(),
    )
    .unwrap();
    let up = Upstream::echo("globex").await;
    let gw = Gateway::start(&format!(
        "[tenancy]\nresolve = [\"jwt\", \"host\"]\n[upstreams.globex]\ntargets = [\"{}\"]\n[tenants.globex]\nhosts = [\"globex.example.com\"]\nupstream = \"globex\"\nrequire = [\"jwt\"]\n[tenants.globex.jwt]\njwks_file = \"{}\"\n",
        up.addr,
        jwks.display()
    ));
    let r = get(
        gw.addr,
        "/",
        &[("authorization", &bearer(&rs256(globex_claims())))],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    // A set with nothing usable is still refused.
    std::fs::write(
        &jwks,
        json!({"keys": [mislabelled_only(&globex)]}).to_string(),
    )
    .unwrap();
    let (code, _, err) = run_check(
        &format!(
            "[tenancy]\nresolve = [\"jwt\", \"host\"]\n[upstreams.u]\ntargets = [\"127.0.0.1:1\"]\n[tenants.globex]\nhosts = [\"g.com\"]\nupstream = \"u\"\n[tenants.globex.jwt]\njwks_file = \"{}\"\n",
            jwks.display()
        ),
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("holds no usable key"), "{err}");
    // Nor one whose only key is on a curve its `alg` does not use.
    let b64 = |n: usize| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(vec![7u8; n]);
    let p384_as_es256 =
        json!({"kty": "EC", "crv": "P-384", "alg": "ES256", "x": b64(48), "y": b64(48)});
    std::fs::write(&jwks, json!({"keys": [p384_as_es256]}).to_string()).unwrap();
    let (code, _, err) = run_check(
        &format!(
            "[tenancy]\nresolve = [\"jwt\", \"host\"]\n[upstreams.u]\ntargets = [\"127.0.0.1:1\"]\n[tenants.globex]\nhosts = [\"g.com\"]\nupstream = \"u\"\n[tenants.globex.jwt]\njwks_file = \"{}\"\n",
            jwks.display()
        ),
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("holds no usable key"), "{err}");
}

fn mislabelled_only(globex: &serde_json::Value) -> serde_json::Value {
    let mut k = globex["keys"][0].clone();
    k["alg"] = json!("HS256");
    k
}

/// A header the gateway sets for one tenant from a verified credential (here a claim)
/// must not be forgeable by the clients of another tenant on the same upstream, nor
/// can any client hand the backend an `_` spelling of the gateway's own names, which
/// CGI-style servers fold into the same variable. HTTP/1.1 (the fast path) and h2c.
#[tokio::test]
async fn no_tenant_can_forge_another_tenants_identity_headers() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("acme.key");
    std::fs::write(&secret, format!("{ACME_SECRET}\n")).unwrap();
    let shared = Upstream::echo("shared").await;
    let gw = Gateway::start(&format!(
        r#"
[tenancy]
resolve = ["jwt", "host"]

[upstreams.shared]
targets = ["{}"]

[tenants.acme]
hosts = ["acme.example.com"]
upstream = "shared"
[tenants.acme.jwt]
hs256_secret_file = "{}"
issuer = "https://login.acme.example/"
audience = "api"
forward_claims = {{ sub = "x-user-id" }}

[tenants.hooli]
hosts = ["hooli.example.com"]
upstream = "shared"
"#,
        shared.addr,
        secret.display()
    ));
    let forged = [
        ("host", "hooli.example.com"),
        ("x-user-id", "user-42"),
        ("x_user_id", "user-42"),
        ("x_tenant_id", "acme"),
        ("X_Tenant_Features", "admin"),
        ("x_forwarded_for", "10.0.0.1"),
        ("x_request_id", "forged"),
        ("my_own_header", "kept"),
    ];
    let r = get(gw.addr, "/h1", &forged).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));

    let mut h2 = h2c::<http_body_util::Empty<bytes::Bytes>>(&gw).await;
    let mut req = hyper::Request::get("http://hooli.example.com/h2");
    for (name, value) in &forged[1..] {
        req = req.header(*name, *value);
    }
    let resp = h2.send_request(req.body(Default::default()).unwrap()).await;
    assert_eq!(resp.unwrap().status(), 200);

    let seen = shared.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let names: Vec<&str> = s.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(s.headers["x-tenant-id"], "hooli", "{}: {names:?}", s.path);
        for gone in [
            "x-user-id",
            "x_user_id",
            "x_tenant_id",
            "x_tenant_features",
            "x_forwarded_for",
            "x_request_id",
        ] {
            assert!(
                !s.headers.contains_key(gone),
                "{}: {gone} in {names:?}",
                s.path
            );
        }
        assert_eq!(s.headers["my_own_header"], "kept", "{}", s.path);
    }

    // acme's own verified claim still reaches the same upstream, the client's copy not.
    let auth = bearer(&hs256(acme_claims(), ACME_SECRET.as_bytes()));
    let r = get(
        gw.addr,
        "/acme",
        &[
            ("host", "acme.example.com"),
            ("authorization", &auth),
            ("x-user-id", "spoofed"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let seen = shared.seen();
    let users: Vec<_> = seen[2].headers.get_all("x-user-id").iter().collect();
    assert_eq!(users, ["user-42"]);
}
