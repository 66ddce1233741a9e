//! Cross-tenant isolation: for every ordered pair of tenants (caller, victim) and every
//! way a client can name a tenant — bearer token (also one signed by the wrong tenant),
//! API key, host (case, trailing dot, port, absolute
//! form, HTTP/2 authority), tenant header (also repeated), path, `x-forwarded-host` —
//! the caller tries to reach the victim's upstream. No request may land on an upstream
//! other than the one of the tenant its credential names, and every request an upstream
//! sees carries that upstream's owner in `x-tenant-id`.

mod support;

use bulkhead::credentials::hash_key;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TENANTS: [&str; 5] = ["t0", "t1", "t2", "t3", "t4"];

fn key(t: &str) -> String {
    format!("key-of-{t}-s3cr3t")
}

fn secret(t: &str) -> String {
    format!("jwt-secret-of-{t}-0123456789abcdef")
}

/// A valid HS256 token of tenant `t`, signed with `t`'s secret.
fn token(t: &str) -> String {
    token_signed(t, &secret(t))
}

fn token_signed(claims_tenant: &str, secret: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"tenant": claims_tenant, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn host(t: &str) -> String {
    format!("{t}.example.com")
}

/// What one attempt sent, and which tenant its credential (if any) names.
struct Attempt {
    what: String,
    headers: Vec<(String, String)>,
    path: String,
    /// The tenant a valid key in this request names.
    key_of: Option<&'static str>,
}

fn attempts(caller: &'static str, victim: &'static str) -> Vec<Attempt> {
    let k = key(caller);
    let mut out = Vec::new();
    let mut add =
        |what: &str, headers: Vec<(&str, String)>, path: &str, key_of: Option<&'static str>| {
            out.push(Attempt {
                what: format!("{caller}→{victim}: {what}"),
                headers: headers
                    .into_iter()
                    .map(|(a, b)| (a.to_owned(), b))
                    .collect(),
                path: path.to_owned(),
                key_of,
            })
        };
    let v = victim;
    add(
        "key + victim host",
        vec![("x-api-key", k.clone()), ("host", host(v))],
        "/",
        Some(caller),
    );
    add(
        "key + victim host, mixed case",
        vec![("x-api-key", k.clone()), ("host", host(v).to_uppercase())],
        "/",
        Some(caller),
    );
    add(
        "key + victim host, trailing dot",
        vec![("x-api-key", k.clone()), ("host", format!("{}.", host(v)))],
        "/",
        Some(caller),
    );
    add(
        "key + victim host:port",
        vec![
            ("x-api-key", k.clone()),
            ("host", format!("{}:443", host(v))),
        ],
        "/",
        Some(caller),
    );
    add(
        "key + victim header",
        vec![("x-api-key", k.clone()), ("x-tenant-id", v.to_owned())],
        "/",
        Some(caller),
    );
    add(
        "key + victim path",
        vec![("x-api-key", k.clone())],
        &format!("/t/{v}/data"),
        Some(caller),
    );
    add(
        "key + x-forwarded-host",
        vec![
            ("x-api-key", k.clone()),
            ("host", host(caller)),
            ("x-forwarded-host", host(v)),
        ],
        "/",
        Some(caller),
    );
    add(
        "own host + victim header",
        vec![("host", host(caller)), ("x-tenant-id", v.to_owned())],
        "/",
        None,
    );
    add(
        "own host + both headers",
        vec![
            ("host", host(caller)),
            ("x-tenant-id", caller.to_owned()),
            ("x-tenant-id", v.to_owned()),
        ],
        "/",
        None,
    );
    add(
        "own host + victim path",
        vec![("host", host(caller))],
        &format!("/t/{v}/x"),
        None,
    );
    // Naming a tenant by header alone, with nothing of one's own, is indistinguishable
    // from that tenant's own client unless the tenant requires a credential (t0 does).
    if v == "t0" {
        add(
            "victim header only, victim requires a key",
            vec![
                ("host", "nobody.example.org".to_owned()),
                ("x-tenant-id", v.to_owned()),
            ],
            "/",
            None,
        );
        add(
            "victim host only, victim requires a key",
            vec![("host", host(v))],
            "/",
            None,
        );
        add(
            "victim path only, victim requires a key",
            vec![],
            "/t/t0/x",
            None,
        );
    }
    add(
        "victim key guessed",
        vec![
            ("x-api-key", format!("key-of-{v}-guess")),
            ("host", host(v)),
        ],
        "/",
        None,
    );
    add(
        "two keys",
        vec![("x-api-key", k.clone()), ("x-api-key", key(v))],
        "/",
        None,
    );
    let bearer = |t: String| format!("Bearer {t}");
    let tk = bearer(token(caller));
    add(
        "token + victim host",
        vec![("authorization", tk.clone()), ("host", host(v))],
        "/",
        Some(caller),
    );
    add(
        "token + victim header",
        vec![("authorization", tk.clone()), ("x-tenant-id", v.to_owned())],
        "/",
        Some(caller),
    );
    add(
        "token + victim path",
        vec![("authorization", tk.clone())],
        &format!("/t/{v}/"),
        Some(caller),
    );
    add(
        "token + victim key",
        vec![("authorization", tk.clone()), ("x-api-key", key(v))],
        "/",
        None,
    );
    add(
        "victim claim signed with own secret",
        vec![
            ("authorization", bearer(token_signed(v, &secret(caller)))),
            ("host", host(caller)),
        ],
        "/",
        None,
    );
    add(
        "two tokens",
        vec![
            ("authorization", tk.clone()),
            ("authorization", bearer(token(v))),
        ],
        "/",
        None,
    );
    out
}

async fn setup() -> (Gateway, Vec<Upstream>) {
    let mut ups = Vec::new();
    let mut toml = String::from(
        "[tenancy]\nresolve = [\"jwt\", \"api_key\", \"host\", \"header\", \"path\"]\n",
    );
    // The secrets are read while the config is validated; the directory may go after.
    let dir = tempfile::tempdir().unwrap();
    for t in TENANTS {
        let u = Upstream::echo(t).await;
        let secret_file = dir.path().join(format!("{t}.key"));
        std::fs::write(&secret_file, secret(t)).unwrap();
        toml.push_str(&format!(
            "[upstreams.{t}]\ntargets = [\"{}\"]\n[tenants.{t}]\nhosts = [\"{}\"]\nupstream = \"{t}\"\napi_keys = [\"{}\"]\n{}[tenants.{t}.jwt]\nhs256_secret_file = \"{}\"\n",
            u.addr,
            host(t),
            hash_key(key(t).as_bytes()),
            if t == "t0" { "require = [\"api_key\", \"jwt\"]\n" } else { "" },
            secret_file.display()
        ));
        ups.push(u);
    }
    (Gateway::start(&toml), ups)
}

/// Every request an upstream saw carries its owner's id, and no key.
fn assert_upstreams_clean(ups: &[Upstream]) {
    for (t, u) in TENANTS.iter().zip(ups) {
        for s in u.seen() {
            let ids: Vec<_> = s.headers.get_all("x-tenant-id").iter().collect();
            assert_eq!(ids, [*t], "upstream {t} saw a request for {ids:?}");
            assert!(
                !s.headers.contains_key("x-api-key"),
                "a key reached upstream {t}"
            );
        }
    }
}

#[tokio::test]
async fn no_request_reaches_another_tenants_upstream() {
    let (gw, ups) = setup().await;
    let mut tried = 0;
    for caller in TENANTS {
        for victim in TENANTS.iter().filter(|v| **v != caller) {
            for a in attempts(caller, victim) {
                let headers: Vec<(&str, &str)> = a
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let r = get(gw.addr, &a.path, &headers).await;
                tried += 1;
                if r.status == 200 {
                    let served = r.json()["upstream"].as_str().unwrap().to_owned();
                    assert_ne!(served, *victim, "{}: reached the victim's upstream", a.what);
                    if let Some(k) = a.key_of {
                        assert_eq!(served, k, "{}: a key of {k} was served by {served}", a.what);
                    }
                } else {
                    assert!(
                        [401, 403, 404].contains(&r.status),
                        "{}: unexpected {} {:?}",
                        a.what,
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
            }
        }
    }
    assert!(tried >= 200, "only {tried} attempts");
    assert_upstreams_clean(&ups);
}

/// Absolute-form request targets and HTTP/2 `:authority` against a `Host` header: 403,
/// or (HTTP/2) the stream reset as malformed.
#[tokio::test]
async fn authority_forms_cannot_smuggle_another_tenant() {
    let (gw, ups) = setup().await;
    let mut tried = 0;
    for caller in TENANTS {
        for victim in TENANTS.iter().filter(|v| **v != caller) {
            // HTTP/1.1 absolute form naming the victim, Host naming the caller.
            let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
            let req = format!(
                "GET http://{}/ HTTP/1.1\r\nhost: {}\r\nx-api-key: {}\r\nconnection: close\r\n\r\n",
                host(victim),
                host(caller),
                key(caller)
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(
                out.starts_with("HTTP/1.1 403"),
                "absolute form {caller}→{victim}: {out}"
            );
            tried += 1;

            // HTTP/2: :authority names the victim, a Host header the caller.
            let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get(format!("http://{}/h2", host(victim)))
                .header("host", host(caller))
                .header("x-api-key", key(caller))
                .body(Empty::<Bytes>::new())
                .unwrap();
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(status, 403, "h2 {caller}→{victim}: {body:?}");
                }
                // RFC 9113 §8.3.1: a `host` naming another authority than `:authority`
                // is malformed; the stream is reset before anything is resolved.
                Err(e) => assert!(
                    format!("{e:?}").contains("PROTOCOL_ERROR"),
                    "h2 {caller}→{victim}: {e:?}"
                ),
            }
            tried += 1;
        }
    }
    assert_eq!(tried, 40);
    assert_upstreams_clean(&ups);
    assert!(
        ups.iter().all(|u| u.seen().is_empty()),
        "no conflicting request was proxied"
    );
}
