//! The request path, top to bottom: snapshot → resolve → admit → route → rewrite →
//! forward. Each stage returns `Result<_, ProxyError>`; [`handle`] alone turns an
//! error into a response.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::body::{AccessRecord, Finish, ProxyBody};
use crate::config::TenantStatus;
use crate::error::ProxyError;
use crate::headers::{self, Forward, X_REQUEST_ID};
use crate::limits::{self, Permit, RequestBody};
use crate::server::Shared;
use crate::snapshot::{Snapshot, Tenant};
use crate::tenant;
use crate::upstream::{self, UpstreamClient};

/// What a connection's requests share: the gateway state, this worker's upstream
/// client and the client address, formatted once.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub client: Arc<UpstreamClient>,
    pub peer: IpAddr,
    /// `peer`, formatted once for `x-forwarded-for`.
    pub peer_ip: HeaderValue,
}

/// What the stages learned about a request, for the response and the records made
/// when it finishes, whether it was proxied or refused.
#[derive(Default)]
struct Exchange<'s> {
    tenant: Option<&'s Tenant>,
    /// `RateLimit`, for tenants with a rate limit.
    rate_limit: Option<HeaderValue>,
    /// The in-flight slot, held until the response body is done.
    permit: Option<Permit>,
    upstream: Option<Arc<str>>,
    /// Request body bytes, for the access log (present only when it is on).
    bytes_in: Option<Arc<AtomicU64>>,
}

static RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");

/// The service function: never fails, every error becomes a response.
pub async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let snap = ctx.shared.snapshot.load_full();
    let request_id = headers::request_id(req.headers());
    let (method, path) = (
        req.method().clone(),
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let mut ex = Exchange {
        bytes_in: snap.access_log.then(Default::default),
        ..Exchange::default()
    };
    let mut reason = None;
    let mut resp = match proxy(req, &snap, &ctx, &request_id, &mut ex).await {
        Ok(resp) => resp,
        Err(e) => {
            let id = ex.tenant.map(|t| &*t.id);
            tracing::debug!(error = e.code(), tenant = id, request_id = ?request_id, "rejected");
            if snap.metrics {
                ex.tenant
                    .map_or(&snap.unknown_stats, |t| &t.stats)
                    .record_error(&e);
            }
            reason = Some(e.code());
            if let ProxyError::RateLimited {
                retry_after,
                policy,
                ..
            } = &e
            {
                ex.rate_limit = Some(limits::exhausted_header(policy, *retry_after));
            }
            e.to_response(id, &request_id)
        }
    };
    let status = resp.status().as_u16();
    let h = resp.headers_mut();
    if let Some(policy) = ex.tenant.and_then(|t| t.limits.policy.as_ref()) {
        h.insert(RATELIMIT_POLICY.clone(), policy.clone());
        if let Some(v) = ex.rate_limit {
            h.insert(RATELIMIT.clone(), v);
        }
    }
    let stats = snap.metrics.then(|| {
        let stats = ex.tenant.map_or(&snap.unknown_stats, |t| &t.stats);
        stats.record(status, started.elapsed());
        stats.clone()
    });
    let log = ex.bytes_in.map(|bytes_in| {
        Box::new(AccessRecord {
            started,
            method,
            path,
            status,
            tenant: ex.tenant.map(|t| t.id.clone()),
            upstream: ex.upstream,
            request_id: request_id.clone(),
            reason,
            bytes_in,
        })
    });
    h.insert(X_REQUEST_ID.clone(), request_id);
    resp.body_mut().set_finish(Finish {
        permit: ex.permit,
        stats,
        bytes_out: 0,
        log,
    });
    Ok(resp)
}

async fn proxy<'s>(
    req: Request<Incoming>,
    snap: &'s Snapshot,
    ctx: &ConnCtx,
    request_id: &HeaderValue,
    ex: &mut Exchange<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    check_header_size(&req, snap.max_header_bytes)?;
    let resolved = tenant::resolve(snap, req.uri(), req.headers())?;
    let tenant = snap.tenant(resolved.tenant);
    ex.tenant = Some(tenant);
    let credential = (tenant.require_api_key && resolved.api_key)
        || (tenant.require_jwt && resolved.claims.is_some());
    if (tenant.require_api_key || tenant.require_jwt) && !credential {
        return Err(ProxyError::CredentialsRequired);
    }
    ex.permit = Some(admit(snap, tenant, ctx, &req, ex)?);
    // Quotas are charged last, so only requests that pass every other check count.
    crate::quota::charge(snap, tenant).await?;

    let (mut parts, body) = req.into_parts();
    let body = RequestBody::new(
        body,
        tenant.limits.max_body,
        snap.metrics.then(|| tenant.stats.clone()),
        ex.bytes_in.clone(),
    );
    let path_and_query = forwarded_path(&parts.uri, resolved.strip_path);
    let upstream = tenant.route(path_and_query.path());
    ex.upstream = Some(upstream.name.clone());
    let target = upstream.pick().clone();

    headers::rewrite_request(
        &mut parts.headers,
        &Forward {
            tenancy: &snap.tenancy,
            tenant,
            peer_ip: &ctx.peer_ip,
            request_id,
            authority: parts.uri.authority(),
        },
    );
    forward_claims(&mut parts.headers, tenant, resolved.claims.as_deref());
    if !parts.headers.contains_key(http::header::HOST) {
        // An HTTP/1.0 client without `Host`, resolved by header or path: HTTP/1.1
        // upstreams need one.
        if let Ok(v) = HeaderValue::from_str(target.as_str()) {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    // Origin form on the wire; the target is chosen by the connection.
    parts.uri = Uri::from(path_and_query);
    parts.version = Version::HTTP_11;

    let (resp, lease) = upstream::send(
        &ctx.client,
        Request::from_parts(parts, body),
        &target,
        &upstream.name,
        tenant.request_timeout,
    )
    .await?;
    let (mut rparts, rbody) = resp.into_parts();
    headers::rewrite_response(&mut rparts.headers);
    Ok(Response::from_parts(
        rparts,
        ProxyBody::upstream(rbody, lease),
    ))
}

/// Copies the verified claims the tenant names into request headers; client copies of
/// those headers are removed whether or not the token carries the claim.
fn forward_claims(
    headers: &mut http::HeaderMap,
    tenant: &Tenant,
    claims: Option<&crate::jwt::Claims>,
) {
    for (claim, header) in &tenant.forward_claims {
        headers.remove(header);
        let value = claims.and_then(|c| c.get(&**claim)).and_then(|v| match v {
            serde_json::Value::String(s) => HeaderValue::from_str(s).ok(),
            serde_json::Value::Number(n) => HeaderValue::from_str(&n.to_string()).ok(),
            serde_json::Value::Bool(b) => {
                Some(HeaderValue::from_static(if *b { "true" } else { "false" }))
            }
            _ => None,
        });
        if let Some(v) = value {
            headers.insert(header.clone(), v);
        }
    }
}

/// Status → rate → in-flight → declared body size, before anything is routed. Only
/// known tenants get here, so nothing here creates state for unknown ones.
fn admit<B>(
    snap: &Snapshot,
    tenant: &Tenant,
    ctx: &ConnCtx,
    req: &Request<B>,
    ex: &mut Exchange<'_>,
) -> Result<Permit, ProxyError> {
    if tenant.status == TenantStatus::Suspended {
        return Err(ProxyError::TenantSuspended);
    }
    let limits = &tenant.limits;
    let client = limits
        .has_client_rate()
        .then(|| limits::client_ip(ctx.peer, req.headers(), &snap.trusted_proxies));
    let rate = limits.check_rate(client)?;
    ex.rate_limit = rate.header();
    let permit = limits.acquire()?;
    limits.check_content_length(req.headers())?;
    Ok(permit)
}

/// The request head's size as the client sent it (request line and header lines), so
/// the same limit holds for HTTP/1.1 and HTTP/2.
fn check_header_size<B>(req: &Request<B>, limit: u64) -> Result<(), ProxyError> {
    let mut size = (req.method().as_str().len() + req.uri().to_string_len() + 12) as u64;
    for (name, value) in req.headers() {
        size += (name.as_str().len() + value.len() + 4) as u64;
    }
    if size > limit {
        return Err(ProxyError::HeadersTooLarge { size, limit });
    }
    Ok(())
}

trait UriLen {
    fn to_string_len(&self) -> usize;
}

impl UriLen for Uri {
    fn to_string_len(&self) -> usize {
        self.authority().map_or(0, |a| a.as_str().len())
            + self.path_and_query().map_or(1, |p| p.as_str().len())
    }
}

/// The path and query sent upstream: the original, minus `/t/{tenant}` when the path
/// source named the tenant.
fn forwarded_path(uri: &Uri, strip: Option<usize>) -> PathAndQuery {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some(n) = strip else { return original };
    let rest = original.path().get(n..).unwrap_or("");
    let mut s = String::with_capacity(original.as_str().len() + 1);
    if !rest.starts_with('/') {
        s.push('/');
    }
    s.push_str(rest);
    if let Some(q) = original.query() {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s).unwrap_or(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_strip() {
        let u: Uri = "/t/acme/reports/1?x=1".parse().unwrap();
        assert_eq!(forwarded_path(&u, Some(7)).as_str(), "/reports/1?x=1");
        let u: Uri = "/t/acme".parse().unwrap();
        assert_eq!(forwarded_path(&u, Some(7)).as_str(), "/");
        let u: Uri = "/t/acme?q".parse().unwrap();
        assert_eq!(forwarded_path(&u, Some(7)).as_str(), "/?q");
        let u: Uri = "/plain?q".parse().unwrap();
        assert_eq!(forwarded_path(&u, None).as_str(), "/plain?q");
    }
}
