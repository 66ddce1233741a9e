//! Criterion micro-benchmarks of the per-request hot path: tenant resolution (cost
//! must not grow with the tenant count), admission (status + rate + in-flight) and
//! header rewriting; HPACK as the HTTP/2 server uses it. Run:
//! `cargo bench --bench hot_path`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;

use bulkhead::h2::hpack;
use bulkhead::headers::{self, Forward};
use bulkhead::snapshot::Snapshot;
use bulkhead::tenant;
use bulkhead::Config;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Uri};

fn snapshot(tenants: usize) -> Snapshot {
    let mut text = String::from(
        "[tenancy]\nresolve = [\"host\", \"header\"]\n[upstreams.u]\ntargets = [\"127.0.0.1:9\"]\n[defaults]\nupstream = \"u\"\n[defaults.limits]\nrequests_per_second = 1e9\nburst = 1000000000\nmax_in_flight = 1000000\n",
    );
    for i in 0..tenants {
        let _ = write!(
            text,
            "[tenants.t{i}]\nhosts = [\"t{i}.example.com\", \"*.t{i}.example.com\"]\nfeatures = [\"f1\", \"f2\"]\n"
        );
    }
    let config = Config::parse(Path::new("bench.toml"), &text).expect("bench config is valid");
    Snapshot::build(&config, None).expect("bench snapshot builds")
}

fn request(host: &str) -> (Uri, HeaderMap) {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_str(host).expect("valid host"));
    h.insert("user-agent", HeaderValue::from_static("wrk"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    (Uri::from_static("/api/v1/items?limit=10"), h)
}

fn resolution(c: &mut Criterion) {
    let mut g = c.benchmark_group("resolve");
    for n in [1usize, 10_000] {
        let snap = snapshot(n);
        let host = format!("t{}.example.com:8080", n / 2);
        let (uri, headers) = request(&host);
        g.bench_function(format!("exact_host_{n}_tenants"), |b| {
            b.iter(|| tenant::resolve(black_box(&snap), black_box(&uri), black_box(&headers), None))
        });
        let (uri, headers) = request(&format!("eu.t{}.example.com", n / 2));
        g.bench_function(format!("wildcard_host_{n}_tenants"), |b| {
            b.iter(|| tenant::resolve(black_box(&snap), black_box(&uri), black_box(&headers), None))
        });
    }
    g.finish();
}

fn admission(c: &mut Criterion) {
    let snap = snapshot(1);
    let t = snap.tenant(0);
    c.bench_function("admit/rate_and_in_flight", |b| {
        b.iter(|| {
            let rate = t
                .limits
                .check_rate(&t.stats, None)
                .expect("far below the limit");
            let permit = t.limits.acquire(&t.stats).expect("far below the cap");
            black_box((rate.header(), permit));
        })
    });
}

fn rewrite(c: &mut Criterion) {
    let snap = snapshot(1);
    let t = snap.tenant(0);
    let peer = HeaderValue::from_static("127.0.0.1");
    let rid = headers::new_request_id();
    let (_, base) = request("t0.example.com");
    let forward = Forward {
        tenancy: &snap.tenancy,
        tenant: t,
        peer_ip: &peer,
        request_id: &rid,
        https: false,
    };
    // Hyper's paths: the gateway's headers inserted into the map.
    c.bench_function("headers/rewrite_request", |b| {
        b.iter(|| {
            let mut h = base.clone();
            let mut added = headers::rewrite_request(&mut h, None, &forward);
            added.apply(&mut h);
            black_box(h)
        })
    });
    // The fast path: the gateway's headers written after the map's, not inserted.
    let mut out = Vec::with_capacity(1024);
    c.bench_function("headers/rewrite_request_written", |b| {
        b.iter(|| {
            let mut h = base.clone();
            let added = headers::rewrite_request(&mut h, None, &forward);
            out.clear();
            let host = bulkhead::h1::wire::write_headers(&mut out, &h);
            added.write(&mut out, host);
            black_box(out.len())
        })
    });
    c.bench_function("headers/request_id_generate", |b| {
        b.iter(headers::new_request_id)
    });
}

/// `/metrics` with 10,000 tenants that have all served traffic (a 200 and a 429 each).
fn exposition(c: &mut Criterion) {
    use std::time::{Duration, SystemTime};
    let snap = snapshot(10_000);
    for t in &snap.tenants {
        t.stats.record(200, Duration::from_micros(700));
        t.stats.record(429, Duration::from_micros(50));
        t.stats
            .record_error(&bulkhead::error::ProxyError::RateLimited {
                retry_after: 1,
                policy: "tenant",
                limit: 1.0,
            });
        t.stats.add_response_bytes(100);
    }
    let reloads = bulkhead::metrics::ReloadCounters {
        succeeded: 1,
        failed: 0,
        last_success: SystemTime::now(),
    };
    let body = bulkhead::metrics::render(&snap, &reloads);
    eprintln!(
        "metrics/render_10000_tenants: {} bytes, {} lines, {} bytes per tenant",
        body.len(),
        body.iter().filter(|b| **b == b'\n').count(),
        body.len() / 10_000
    );
    let mut g = c.benchmark_group("metrics");
    g.sample_size(10);
    g.bench_function("render_10000_tenants", |b| {
        b.iter(|| bulkhead::metrics::render(black_box(&snap), &reloads))
    });
    g.finish();
}

/// Credential checks per request: an API-key lookup among 10,000 tenants' keys, and
/// verifying an HS256 and an RS256 token.
fn credentials(c: &mut Criterion) {
    use bulkhead::credentials::{hash_key, parse_digest, ApiKeys};
    use bulkhead::jwt::{KeyMaterial, KeySet, ResolvedJwt};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    let mut keys = ApiKeys::default();
    for i in 0..10_000u32 {
        let d = parse_digest(&hash_key(format!("key-{i}").as_bytes())).expect("valid digest");
        keys.insert(d, i);
    }
    c.bench_function("credentials/api_key_lookup_10000_tenants", |b| {
        b.iter(|| keys.find(black_box(b"key-5000")))
    });

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = serde_json::json!({"tenant": "t0", "sub": "u1", "exp": exp});
    let hs = KeySet::build(
        &ResolvedJwt {
            keys: vec![KeyMaterial::Hs256Secret(b"bench-secret".to_vec())],
            ..ResolvedJwt::default()
        },
        30,
    );
    let hs_token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"bench-secret"),
    )
    .expect("token encodes");
    c.bench_function("credentials/jwt_hs256_verify", |b| {
        b.iter(|| {
            hs.verify(black_box(&hs_token), Algorithm::HS256)
                .expect("verifies")
        })
    });

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
    let private = std::fs::read(format!("{dir}/globex-rs256-private.pem")).expect("fixture");
    let public = std::fs::read(format!("{dir}/globex-rs256-public.pem")).expect("fixture");
    let rs = KeySet::build(
        &ResolvedJwt {
            keys: vec![KeyMaterial::Pem(public)],
            ..ResolvedJwt::default()
        },
        30,
    );
    let rs_token = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&private).expect("fixture key"),
    )
    .expect("token encodes");
    c.bench_function("credentials/jwt_rs256_verify", |b| {
        b.iter(|| {
            rs.verify(black_box(&rs_token), Algorithm::RS256)
                .expect("verifies")
        })
    });
}

fn hpack_codec(c: &mut Criterion) {
    // A request head as nghttp2 sends it once the connection's first request has put
    // :authority and user-agent in the table: five indexed fields.
    let mut first = vec![0x82, 0x86, 0x84, 0x41, 14];
    first.extend_from_slice(b"t1.example.com");
    first.extend_from_slice(&[0x7a, 20]);
    first.extend_from_slice(b"h2load nghttp2/1.52.");
    let steady = [0x82, 0x86, 0x84, 0xbf, 0xbe];
    let mut dec = hpack::Decoder::new(4096);
    dec.decode(&first, |_, _| {}).expect("a valid block");
    c.bench_function("h2/hpack_decode_request", |b| {
        b.iter(|| {
            let mut n = 0;
            dec.decode(black_box(&steady), |name, value| {
                n += name.len() + value.len()
            })
            .expect("a valid block");
            n
        })
    });
    // The response head of the load benchmark, after the connection's first response.
    let fields: [(&str, &[u8], bool); 7] = [
        ("server", b"nginx/1.22.1", false),
        ("date", b"Sun, 06 Dec 2026 12:45:44 GMT", false),
        ("content-type", b"text/plain", false),
        ("content-length", b"13", false),
        ("ratelimit-policy", b"\"tenant\";q=10000000;w=1", false),
        ("ratelimit", b"\"tenant\";r=9999999;t=1", true),
        ("x-request-id", b"489596c3229d815d", true),
    ];
    let mut enc = hpack::Encoder::default();
    let mut block = Vec::with_capacity(256);
    let encode = |enc: &mut hpack::Encoder, block: &mut Vec<u8>| {
        block.clear();
        enc.begin(block);
        hpack::encode_status(200, block);
        for (name, value, sensitive) in fields {
            enc.field(name, value, sensitive, block);
        }
    };
    encode(&mut enc, &mut block);
    c.bench_function("h2/hpack_encode_response", |b| {
        b.iter(|| {
            encode(&mut enc, &mut block);
            block.len()
        })
    });
}

criterion_group!(
    benches,
    resolution,
    admission,
    rewrite,
    exposition,
    credentials,
    hpack_codec
);
criterion_main!(benches);
