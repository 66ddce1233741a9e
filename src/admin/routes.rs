//! What the admin listener answers: the routing of its paths and methods, the checks
//! against browsers sent through a rebound name or from another site, and each
//! endpoint's answer. The connections themselves are [`super::serve`]'s.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::renders::{Renders, Scrape, MAX_RENDERS};
use crate::body::ProxyBody;
use crate::reload::Trigger;
use crate::server::Shared;

/// The methods an admin path answers, for routing and the 405's `Allow`.
#[derive(Clone, Copy)]
enum Allowed {
    /// GET, and HEAD (the GET's headers without the body: RFC 9110 §9.3.2).
    Get,
    Post,
}

impl Allowed {
    fn of(path: &str) -> Option<Allowed> {
        match path {
            "/reload" => Some(Allowed::Post),
            "/metrics" | "/healthz" | "/readyz" | "/config" | "/config/history" => {
                Some(Allowed::Get)
            }
            _ => match path.strip_prefix("/tenants/")?.split_once('/')?.1 {
                "usage" => Some(Allowed::Get),
                "usage/reset" => Some(Allowed::Post),
                _ => None,
            },
        }
    }

    fn permits(self, method: &Method) -> bool {
        match self {
            Allowed::Get => method == Method::GET || method == Method::HEAD,
            Allowed::Post => method == Method::POST,
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Allowed::Get => "GET, HEAD",
            Allowed::Post => "POST",
        })
    }
}

pub(super) async fn route(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    renders: Arc<Renders>,
) -> Response<ProxyBody> {
    // First, for every path and method: a page on a rebound name must not learn even
    // which paths exist.
    if let Some(host) = rebound(&req) {
        let body = serde_json::json!({
            "error": "cross_origin",
            "message": format!("refused: a request a browser sent to {host}, a DNS name (DNS rebinding: a web site's name re-pointed at this address would let its pages read the answers); browsers may use the admin API at an IP address or localhost, other clients (curl, Prometheus, scripts) at any name"),
        });
        return json_value(StatusCode::FORBIDDEN, &body);
    }
    let path = req.uri().path();
    let Some(allowed) = Allowed::of(path) else {
        return json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#);
    };
    if !allowed.permits(req.method()) {
        let mut r = json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#,
        );
        r.headers_mut().insert(header::ALLOW, allowed.header());
        return r;
    }
    if *req.method() == Method::POST {
        if let Some(origin) = cross_site(&req) {
            let body = serde_json::json!({
                "error": "cross_origin",
                "message": format!("refused: a POST sent by a web page of another site ({origin}); the admin API takes POSTs from non-browser clients (curl, scripts) or from its own origin only"),
            });
            return json_value(StatusCode::FORBIDDEN, &body);
        }
    }
    // hyper sends no body in answer to HEAD; the headers are the GET's.
    if let Some(rest) = path.strip_prefix("/tenants/") {
        return tenant_usage(rest, &shared).await;
    }
    match path {
        "/reload" => reload(shared).await,
        "/config" => {
            let snap = shared.snapshot.load();
            let body = serde_json::json!({
                "version": snap.version,
                "loaded_at": humantime::format_rfc3339_millis(snap.loaded_at).to_string(),
                "tenants": snap.tenants.len(),
            });
            json_value(StatusCode::OK, &body)
        }
        "/config/history" => history(&shared).await,
        "/metrics" => metrics(&shared, &renders).await,
        "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#),
        "/readyz" => {
            if shared.draining.load(Ordering::SeqCst) {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
            } else {
                json(StatusCode::OK, r#"{"status":"ready"}"#)
            }
        }
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    }
}

/// Whether `req` was sent by a browser on behalf of a page of another site: what it
/// names (the `Origin`, or the `Sec-Fetch-Site` value) if so. A page anywhere on the
/// web can make the browser of someone on the admin host POST to a loopback address
/// (a form, or `fetch` with `mode: "no-cors"`): it cannot read the answer, but the
/// reset or reload happens. Browsers send `Origin` with every POST and
/// `Sec-Fetch-Site` with every request; curl, Prometheus and scripts send neither.
/// (A page of a site whose name was re-pointed here is same-origin with itself:
/// [`rebound`] refuses those.)
fn cross_site(req: &Request<Incoming>) -> Option<String> {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("?");
    let own = authority(req).is_some_and(|host| {
        ["http://", "https://"].iter().any(|scheme| {
            let (s, rest) = (origin.get(..scheme.len()), origin.get(scheme.len()..));
            s.is_some_and(|s| s.eq_ignore_ascii_case(scheme))
                && rest.is_some_and(|r| r.eq_ignore_ascii_case(host))
        })
    });
    (!own).then(|| format!("Origin: {origin}"))
}

/// The DNS name a browser's request was sent to, when it is one: DNS rebinding. A
/// site re-points its own name at the admin address; its pages are then same-origin
/// with what answers there, so the browser lets them read `/config`, the history,
/// usage and metrics, and POST too. An address cannot be re-pointed, and browsers
/// resolve `localhost` (and `*.localhost`) themselves, so those names are safe.
/// Refused only for browsers (an `Origin`, or a `Sec-Fetch-Site` other than `none`,
/// which is a typed URL or a bookmark, not a page): curl, scripts and Prometheus
/// (scraping `gw-1.internal:9901`) send neither and may use any name.
fn rebound(req: &Request<Incoming>) -> Option<String> {
    let headers = req.headers();
    let page = headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| !site.as_bytes().eq_ignore_ascii_case(b"none"));
    if !page {
        return None;
    }
    match authority(req) {
        Some(host) => (!address_or_localhost(host)).then(|| format!("{host:?}")),
        // A `Host` that is not text cannot be told to be an address: refused.
        None if headers.contains_key(header::HOST) => Some("a Host that is not text".into()),
        // HTTP/1.0 without `Host`, which no browser sends.
        None => None,
    }
}

/// The authority a request was sent to: `:authority` over HTTP/2 (or an
/// absolute-form target), else `Host`.
fn authority(req: &Request<Incoming>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Whether the host of `authority` is an IP address, `localhost` or a `*.localhost`.
fn address_or_localhost(authority: &str) -> bool {
    let Ok(a) = authority.parse::<http::uri::Authority>() else {
        return false;
    };
    let host = a.host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || host
            .len()
            .checked_sub(".localhost".len())
            .and_then(|i| host.get(i..))
            .is_some_and(|t| t.eq_ignore_ascii_case(".localhost"))
}

/// `GET /tenants/{id}/usage` and `POST /tenants/{id}/usage/reset` (quota.rs); the
/// method was checked by [`route`].
async fn tenant_usage(rest: &str, shared: &Shared) -> Response<ProxyBody> {
    let snap = shared.snapshot.load_full();
    let (status, body) = match rest.split_once('/') {
        Some((id, "usage")) => crate::usage::usage(&snap, id).await,
        Some((id, "usage/reset")) => crate::usage::reset(&snap, id).await,
        _ => return json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    };
    json_value(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

/// `POST /reload`: 200 `{"version": V}`, or 422 `invalid_config` with the message
/// while the old config keeps serving. The build runs on the blocking pool so the
/// admin listener keeps answering health checks meanwhile.
async fn reload(shared: Arc<Shared>) -> Response<ProxyBody> {
    let result =
        tokio::task::spawn_blocking(move || crate::reload::reload(&shared, Trigger::Admin)).await;
    match result {
        Ok(Ok(version)) => json_value(StatusCode::OK, &serde_json::json!({ "version": version })),
        Ok(Err(message)) => json_value(
            StatusCode::UNPROCESSABLE_ENTITY,
            &serde_json::json!({ "error": "invalid_config", "message": message }),
        ),
        Err(e) => {
            tracing::error!(error = %e, "the reload task failed");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"internal_error","message":"the reload task failed; see the log"}"#,
            )
        }
    }
}

/// `GET /config/history`, encoded on the blocking pool: 50 entries that each name
/// every tenant of a large config are megabytes of JSON, and the admin thread also
/// answers the health checks.
async fn history(shared: &Arc<Shared>) -> Response<ProxyBody> {
    let shared = Arc::clone(shared);
    let encoded = tokio::task::spawn_blocking(move || shared.reload.history_json()).await;
    match encoded {
        Ok(Ok(bytes)) => respond(StatusCode::OK, bytes),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot encode the reload history");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"internal_error"}"#,
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "the history task failed");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"internal_error"}"#,
            )
        }
    }
}

fn json_value<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).expect("admin responses are plain JSON values");
    respond(status, Bytes::from(bytes))
}

fn json(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    respond(status, Bytes::from_static(body.as_bytes()))
}

fn respond(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `GET /metrics`, from a render shared with the scrapes waiting at the same time
/// ([`Renders`]).
async fn metrics(shared: &Arc<Shared>, renders: &Arc<Renders>) -> Response<ProxyBody> {
    match renders.scrape(shared).await {
        Scrape::Text(text) => {
            let mut r = Response::new(ProxyBody::full(text));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Scrape::Busy => {
            let body = serde_json::json!({
                "error": "too_many_scrapes",
                "message": format!("{MAX_RENDERS} renders of /metrics are held by answers their clients have not taken yet; try again"),
            });
            let mut r = json_value(StatusCode::SERVICE_UNAVAILABLE, &body);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Scrape::Failed => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"internal_error","message":"the /metrics render failed; see the log"}"#,
        ),
    }
}
