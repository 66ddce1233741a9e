//! The request path, top to bottom: snapshot → resolve → admit → route → rewrite →
//! forward. Each stage returns `Result<_, ProxyError>`; [`handle`] alone turns an
//! error into a response.

use std::convert::Infallible;
use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::config::TenantStatus;
use crate::error::ProxyError;
use crate::headers::{self, Forward, X_REQUEST_ID};
use crate::server::Shared;
use crate::snapshot::{Snapshot, Tenant};
use crate::tenant;
use crate::upstream::{self, UpstreamClient};

/// What a connection's requests share: the gateway state, this worker's upstream
/// client and the client address, formatted once.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub client: UpstreamClient,
    pub peer_ip: HeaderValue,
}

/// The service function: never fails, every error becomes a response.
pub async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = ctx.shared.snapshot.load_full();
    let request_id = headers::request_id(req.headers());
    let mut tenant = None;
    let mut resp = match proxy(req, &snap, &ctx, &request_id, &mut tenant).await {
        Ok(resp) => resp,
        Err(e) => {
            let id = tenant.map(|t: &Tenant| &*t.id);
            tracing::debug!(error = e.code(), tenant = id, request_id = ?request_id, "rejected");
            e.to_response(id, &request_id)
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    Ok(resp)
}

async fn proxy<'s>(
    req: Request<Incoming>,
    snap: &'s Snapshot,
    ctx: &ConnCtx,
    request_id: &HeaderValue,
    tenant_out: &mut Option<&'s Tenant>,
) -> Result<Response<ProxyBody>, ProxyError> {
    check_header_size(&req, snap.max_header_bytes)?;
    let resolved = tenant::resolve(snap, req.uri(), req.headers())?;
    let tenant = snap.tenant(resolved.tenant);
    *tenant_out = Some(tenant);
    admit(tenant)?;

    let (mut parts, body) = req.into_parts();
    let path_and_query = forwarded_path(&parts.uri, resolved.strip_path);
    let upstream = tenant.route(path_and_query.path());
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
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(target);
    uri.path_and_query = Some(path_and_query);
    parts.uri = Uri::from_parts(uri).expect("scheme, authority and path are all set");
    parts.version = Version::HTTP_11;

    let resp = upstream::send(
        &ctx.client,
        Request::from_parts(parts, body),
        &upstream.name,
        tenant.request_timeout,
    )
    .await?;
    let (mut rparts, rbody) = resp.into_parts();
    headers::rewrite_response(&mut rparts.headers, request_id);
    Ok(Response::from_parts(rparts, ProxyBody::Upstream(rbody)))
}

/// Status today; rate, in-flight and body limits join here.
fn admit(tenant: &Tenant) -> Result<(), ProxyError> {
    match tenant.status {
        TenantStatus::Active => Ok(()),
        TenantStatus::Suspended => Err(ProxyError::TenantSuspended),
    }
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
