//! The upstream side: one pool of keep-alive HTTP/1.1 connections per worker thread
//! (no cross-thread lock on the request path), the request timeout, and the
//! classification of upstream failures into the `kind`s of SPEC.md.
//!
//! A connection is lent for one exchange and comes back to its pool only when the
//! response body has been read to the end ([`Lease`]); a request that a pooled
//! connection could not even start sending (the upstream had closed it) is retried
//! once on a fresh connection, so a keep-alive race never reaches the client.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{ProxyError, UpstreamFailure};
use crate::limits::{RequestBody, RequestBodyError};

/// Idle upstream connections are closed after this long; it must stay below the
/// upstreams' own keep-alive timeout (nginx: 75 s) so we never write to a connection
/// the upstream is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per target and worker.
const MAX_IDLE_PER_TARGET: usize = 1024;

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// One worker's connections to every upstream target.
#[derive(Default)]
pub struct UpstreamClient {
    idle: Mutex<HashMap<Authority, Vec<Idle>, foldhash::fast::RandomState>>,
}

/// A connection lent to one exchange. [`Lease::release`] gives it back once the
/// response body has ended; dropping it instead closes the connection when hyper is
/// done with it.
pub struct Lease {
    pool: Arc<UpstreamClient>,
    target: Authority,
    sender: SendRequest<RequestBody>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("target", &self.target)
            .finish()
    }
}

impl Lease {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(self.target).or_default();
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

impl UpstreamClient {
    pub fn new() -> Arc<UpstreamClient> {
        Arc::new(UpstreamClient::default())
    }

    /// The most recently used idle connection that is ready for a request. Closed and
    /// expired ones are dropped; busy ones (still finishing a previous exchange) stay.
    fn checkout(&self, target: &Authority) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(target)?;
        let now = Instant::now();
        list.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < POOL_IDLE_TIMEOUT);
        let pos = list.iter().rposition(|i| i.sender.is_ready())?;
        Some(list.swap_remove(pos).sender)
    }
}

async fn connect(target: &Authority) -> Result<SendRequest<RequestBody>, UpstreamFailure> {
    let stream = match target.as_str().parse::<SocketAddr>() {
        Ok(addr) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await,
        Err(_) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.as_str())).await,
    };
    let stream = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %e, "upstream connect failed");
            return Err(UpstreamFailure::Connect);
        }
        Err(_) => return Err(UpstreamFailure::Connect),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| UpstreamFailure::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `req` to `target` and waits for the response head for at most `timeout`.
pub async fn send(
    pool: &Arc<UpstreamClient>,
    req: Request<RequestBody>,
    target: &Authority,
    upstream: &Arc<str>,
    timeout: Duration,
) -> Result<(Response<Incoming>, Lease), ProxyError> {
    let exchange = async {
        let mut req = req;
        let mut fresh_tried = false;
        loop {
            let (mut sender, pooled) = match pool.checkout(target) {
                Some(s) if !fresh_tried => (s, true),
                _ => {
                    let s = connect(target).await.map_err(|f| (f, None))?;
                    fresh_tried = true;
                    (s, false)
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Lease {
                            pool: pool.clone(),
                            target: target.clone(),
                            sender,
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection was closed under us.
                    Some(back) if pooled => req = back,
                    _ => {
                        let err = e.into_error();
                        return Err(match body_error(&err) {
                            Some(RequestBodyError::TooLarge { limit }) => (
                                UpstreamFailure::Reset,
                                Some(ProxyError::BodyTooLarge { limit: *limit }),
                            ),
                            Some(RequestBodyError::Client(_)) => {
                                (UpstreamFailure::Reset, Some(ProxyError::BadRequestBody))
                            }
                            None => {
                                tracing::debug!(upstream = %upstream, error = %err, source = ?err.source(), "upstream request failed");
                                (classify(&err), None)
                            }
                        });
                    }
                },
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err((_, Some(own)))) => Err(own),
        Ok(Err((failure, None))) => Err(ProxyError::UpstreamError {
            upstream: upstream.clone(),
            failure,
        }),
        Err(_) => Err(ProxyError::UpstreamTimeout {
            upstream: upstream.clone(),
            after: timeout,
        }),
    }
}

/// The request body's own failure, found in the error's source chain: not the
/// upstream's fault.
fn body_error(e: &hyper::Error) -> Option<&RequestBodyError> {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<RequestBodyError>() {
            return Some(b);
        }
        source = s.source();
    }
    None
}

fn classify(e: &hyper::Error) -> UpstreamFailure {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        UpstreamFailure::Protocol
    } else {
        UpstreamFailure::Reset
    }
}
