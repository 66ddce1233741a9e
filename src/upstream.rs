//! The upstream side: one pooled keep-alive HTTP/1.1 client per worker thread (no
//! cross-thread pool lock), the request timeout, and the classification of upstream
//! failures into the `kind`s of SPEC.md.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::{ProxyError, UpstreamFailure};
use crate::limits::{RequestBody, RequestBodyError};

pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// Idle upstream connections are closed after this long; it must stay below the
/// upstreams' own keep-alive timeout (nginx: 75 s) so we never write to a connection
/// the upstream is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for one worker thread.
pub fn client() -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
    conn.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .set_host(false)
        .build(conn)
}

/// Sends `req` and waits for the response head for at most `timeout`.
pub async fn send(
    client: &UpstreamClient,
    req: Request<RequestBody>,
    upstream: &Arc<str>,
    timeout: Duration,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            // The request body's own failure is not the upstream's fault.
            match body_error(&e) {
                Some(RequestBodyError::TooLarge { limit }) => {
                    return Err(ProxyError::BodyTooLarge { limit: *limit })
                }
                Some(RequestBodyError::Client(_)) => return Err(ProxyError::BadRequestBody),
                None => {}
            }
            let failure = classify(&e);
            tracing::debug!(upstream = %upstream, error = %e, source = ?e.source(), "upstream request failed");
            Err(ProxyError::UpstreamError {
                upstream: upstream.clone(),
                failure,
            })
        }
        Err(_) => Err(ProxyError::UpstreamTimeout {
            upstream: upstream.clone(),
            after: timeout,
        }),
    }
}

fn body_error(e: &hyper_util::client::legacy::Error) -> Option<&RequestBodyError> {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<RequestBodyError>() {
            return Some(b);
        }
        source = s.source();
    }
    None
}

fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamFailure {
    if e.is_connect() {
        return UpstreamFailure::Connect;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return UpstreamFailure::Protocol;
            }
        }
        source = s.source();
    }
    UpstreamFailure::Reset
}
