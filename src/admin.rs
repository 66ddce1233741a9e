//! The admin listener (`server.admin_listen`): health, readiness, reload and the
//! config version and history; metrics plug into [`route`]. Never served on the data
//! plane.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::reload::Trigger;
use crate::server::Shared;

/// Serves the admin API until `stop` turns true.
pub async fn serve(listener: StdListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener unusable");
            return;
        }
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                let conn = builder.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(route(req, shared).await) }
                    }),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => return,
        }
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<ProxyBody> {
    if let Some(rest) = req.uri().path().strip_prefix("/tenants/") {
        return tenant_usage(req.method(), rest, &shared).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/reload") => reload(shared).await,
        (&Method::GET, "/config") => {
            let snap = shared.snapshot.load();
            let body = serde_json::json!({
                "version": snap.version,
                "loaded_at": humantime::format_rfc3339_millis(snap.loaded_at).to_string(),
                "tenants": snap.tenants.len(),
            });
            json_value(StatusCode::OK, &body)
        }
        (&Method::GET, "/config/history") => json_value(StatusCode::OK, &shared.reload.history()),
        (_, "/reload") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#,
        ),
        (_, "/config" | "/config/history") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#,
        ),
        (&Method::GET, "/metrics") => metrics(&shared),
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        (&Method::GET, "/readyz") => {
            if shared.draining.load(Ordering::SeqCst) {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
            } else {
                json(StatusCode::OK, r#"{"status":"ready"}"#)
            }
        }
        (_, "/healthz" | "/readyz") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#,
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    }
}

/// `GET /tenants/{id}/usage` and `POST /tenants/{id}/usage/reset` (quota.rs).
async fn tenant_usage(method: &Method, rest: &str, shared: &Shared) -> Response<ProxyBody> {
    let snap = shared.snapshot.load_full();
    let (status, body) = match (method, rest.split_once('/')) {
        (&Method::GET, Some((id, "usage"))) => crate::usage::usage(&snap, id).await,
        (&Method::POST, Some((id, "usage/reset"))) => crate::usage::reset(&snap, id).await,
        (_, Some((_, "usage" | "usage/reset"))) => {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method_not_allowed"}"#,
            )
        }
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

fn metrics(shared: &Shared) -> Response<ProxyBody> {
    let reloads = crate::metrics::ReloadCounters {
        succeeded: shared.reload.succeeded(),
        failed: shared.reload.failed(),
        last_success: shared.reload.last_success(),
    };
    let body = crate::metrics::render(&shared.snapshot.load(), &reloads);
    let mut r = Response::new(ProxyBody::full(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
