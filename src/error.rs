//! `ProxyError`: every reason the gateway answers a request itself, and the one
//! exhaustive mapping from each to a status, an `error` code and a JSON body.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;

/// How an upstream exchange failed (the `kind` label of `upstream_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The TCP connection could not be made.
    Connect,
    /// The connection was reset or closed before a complete response head.
    Reset,
    /// The upstream sent something that is not HTTP.
    Protocol,
}

impl UpstreamFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Reset => "reset",
            UpstreamFailure::Protocol => "protocol",
        }
    }
}

/// A fact about why a request was not proxied. Carries typed data; the text for
/// humans is made only when the response is built.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyError {
    /// No source named a tenant, or the first one named an id nobody has.
    UnknownTenant {
        named: Option<Box<str>>,
    },
    /// Two sources named different tenants.
    TenantMismatch {
        first: Box<str>,
        first_source: &'static str,
        other: Box<str>,
        other_source: &'static str,
    },
    TenantSuspended,
    /// An API key that matches no tenant (or several different keys at once).
    InvalidApiKey,
    /// A bearer token that does not verify (malformed, bad signature, `alg: none`, an
    /// algorithm not configured for the key, expired, not yet valid, wrong `iss`/`aud`,
    /// no tenant claim).
    InvalidToken,
    /// The tenant has `require` and the request carries no valid credential of those kinds.
    CredentialsRequired,
    /// Over the tenant's (or, with `policy = "client"`, the client's) rate.
    RateLimited {
        retry_after: u64,
        policy: &'static str,
        limit: f64,
    },
    TooManyInFlight {
        limit: u64,
    },
    BodyTooLarge {
        limit: u64,
    },
    /// The client's request body failed mid-stream (it went away, or sent bad chunks).
    BadRequestBody,
    HeadersTooLarge {
        size: u64,
        limit: u64,
    },
    /// More header fields than the HTTP/1.1 server takes (`h1::wire::MAX_HEADER_FIELDS`);
    /// the same `error` code as a head over `max_header_bytes`.
    TooManyHeaderFields {
        limit: usize,
    },
    /// A request head still going past the most the HTTP/1.1 server reads of one
    /// (`limit` bytes), its size unknown; the same `error` code as a head over
    /// `max_header_bytes`.
    HeadTooLong {
        limit: usize,
    },
    UpstreamError {
        upstream: std::sync::Arc<str>,
        failure: UpstreamFailure,
    },
    UpstreamTimeout {
        upstream: std::sync::Arc<str>,
        after: Duration,
    },
    /// The client stopped sending its request body (`server.body_idle_timeout`) before
    /// the upstream answered.
    RequestBodyTimeout {
        after: Duration,
    },
    /// The TLS connection was made for another tenant (SNI names one tenant, the
    /// request another), or the tenant requires a client certificate this connection
    /// did not present.
    Misdirected {
        why: &'static str,
    },
    /// The tenant's `requests_per_day` / `requests_per_month` is used up; `retry_after`
    /// is the number of seconds to the start of the next UTC period.
    QuotaExhausted {
        period: &'static str,
        limit: u64,
        retry_after: u64,
    },
    /// A cluster-scope tenant with `on_store_failure = "closed"` while Redis is unreachable.
    StoreUnavailable,
    /// `CONNECT`: a forward proxy's method, which a reverse proxy has no target for.
    MethodNotAllowed,
    /// A request body in a transfer coding other than chunked (`gzip, chunked`), which
    /// the gateway would otherwise pass on undeclared.
    UnsupportedTransferCoding {
        coding: Box<str>,
    },
    /// A request head that is not HTTP/1.1 (a space in the target, a bad header name,
    /// a control character in a value …): what httparse found wrong.
    MalformedRequest {
        why: &'static str,
    },
}

impl ProxyError {
    /// Every `error` code, in the order of [`ProxyError::reason_index`].
    pub const REASONS: [&'static str; 20] = [
        "unknown_tenant",
        "tenant_mismatch",
        "tenant_suspended",
        "rate_limited",
        "too_many_in_flight",
        "body_too_large",
        "bad_request_body",
        "headers_too_large",
        "upstream_error",
        "upstream_timeout",
        "invalid_api_key",
        "credentials_required",
        "invalid_token",
        "misdirected_request",
        "quota_exhausted",
        "store_unavailable",
        "method_not_allowed",
        "unsupported_transfer_coding",
        "bad_request",
        "request_body_timeout",
    ];

    /// The position of [`ProxyError::code`] in [`ProxyError::REASONS`].
    pub fn reason_index(&self) -> usize {
        match self {
            ProxyError::UnknownTenant { .. } => 0,
            ProxyError::TenantMismatch { .. } => 1,
            ProxyError::TenantSuspended => 2,
            ProxyError::RateLimited { .. } => 3,
            ProxyError::TooManyInFlight { .. } => 4,
            ProxyError::BodyTooLarge { .. } => 5,
            ProxyError::BadRequestBody => 6,
            ProxyError::HeadersTooLarge { .. }
            | ProxyError::TooManyHeaderFields { .. }
            | ProxyError::HeadTooLong { .. } => 7,
            ProxyError::UpstreamError { .. } => 8,
            ProxyError::UpstreamTimeout { .. } => 9,
            ProxyError::InvalidApiKey => 10,
            ProxyError::CredentialsRequired => 11,
            ProxyError::InvalidToken => 12,
            ProxyError::Misdirected { .. } => 13,
            ProxyError::QuotaExhausted { .. } => 14,
            ProxyError::StoreUnavailable => 15,
            ProxyError::MethodNotAllowed => 16,
            ProxyError::UnsupportedTransferCoding { .. } => 17,
            ProxyError::MalformedRequest { .. } => 18,
            ProxyError::RequestBodyTimeout { .. } => 19,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownTenant { .. } => StatusCode::NOT_FOUND,
            ProxyError::TenantMismatch { .. } => StatusCode::FORBIDDEN,
            ProxyError::TenantSuspended => StatusCode::FORBIDDEN,
            ProxyError::InvalidApiKey
            | ProxyError::CredentialsRequired
            | ProxyError::InvalidToken => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::TooManyInFlight { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequestBody => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge { .. }
            | ProxyError::TooManyHeaderFields { .. }
            | ProxyError::HeadTooLong { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UpstreamError { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::QuotaExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnsupportedTransferCoding { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::MalformedRequest { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// The `error` field of the body, and the `reason` label of `rejected_total`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::UnknownTenant { .. } => "unknown_tenant",
            ProxyError::TenantMismatch { .. } => "tenant_mismatch",
            ProxyError::TenantSuspended => "tenant_suspended",
            ProxyError::InvalidApiKey => "invalid_api_key",
            ProxyError::CredentialsRequired => "credentials_required",
            ProxyError::InvalidToken => "invalid_token",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::TooManyInFlight { .. } => "too_many_in_flight",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequestBody => "bad_request_body",
            ProxyError::HeadersTooLarge { .. }
            | ProxyError::TooManyHeaderFields { .. }
            | ProxyError::HeadTooLong { .. } => "headers_too_large",
            ProxyError::UpstreamError { .. } => "upstream_error",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::RequestBodyTimeout { .. } => "request_body_timeout",
            ProxyError::Misdirected { .. } => "misdirected_request",
            ProxyError::QuotaExhausted { .. } => "quota_exhausted",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::UnsupportedTransferCoding { .. } => "unsupported_transfer_coding",
            ProxyError::MalformedRequest { .. } => "bad_request",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::UnknownTenant { named: Some(id) } => {
                format!("no tenant {id:?} is configured")
            }
            ProxyError::UnknownTenant { named: None } => {
                "the request names no known tenant".to_owned()
            }
            ProxyError::TenantMismatch {
                first,
                first_source,
                other,
                other_source,
            } => format!(
                "the {first_source} names tenant {first:?} but the {other_source} names {other:?}"
            ),
            ProxyError::TenantSuspended => "this tenant is suspended".to_owned(),
            ProxyError::InvalidApiKey => "the API key matches no tenant".to_owned(),
            ProxyError::CredentialsRequired => {
                "this tenant requires a valid credential (API key or bearer token)".to_owned()
            }
            ProxyError::InvalidToken => "the bearer token is not valid".to_owned(),
            ProxyError::RateLimited {
                retry_after,
                policy,
                limit,
            } => {
                let whose = if *policy == "client" {
                    "this client's"
                } else {
                    "the tenant's"
                };
                format!(
                    "over {whose} limit of {limit} requests per second; retry in {retry_after}s"
                )
            }
            ProxyError::TooManyInFlight { limit } => {
                format!("the tenant already has {limit} requests in flight")
            }
            ProxyError::BodyTooLarge { limit } => {
                format!("the request body is over the limit of {limit} bytes")
            }
            ProxyError::BadRequestBody => "the request body could not be read".to_owned(),
            ProxyError::HeadersTooLarge { size, limit } => {
                format!("request headers are {size} bytes; the limit is {limit}")
            }
            ProxyError::TooManyHeaderFields { limit } => {
                format!("the request has more than {limit} header fields")
            }
            ProxyError::HeadTooLong { limit } => {
                format!("the request head goes on past {limit} bytes")
            }
            ProxyError::UpstreamError { upstream, failure } => match failure {
                UpstreamFailure::Connect => format!("could not connect to upstream {upstream:?}"),
                UpstreamFailure::Reset => {
                    format!("upstream {upstream:?} closed the connection before responding")
                }
                UpstreamFailure::Protocol => {
                    format!("upstream {upstream:?} sent an invalid HTTP response")
                }
            },
            ProxyError::UpstreamTimeout { upstream, after } => format!(
                "upstream {upstream:?} sent no response head within {}ms",
                after.as_millis()
            ),
            ProxyError::RequestBodyTimeout { after } => format!(
                "the request body stopped: no byte of it for {}ms",
                after.as_millis()
            ),
            // The tenant is not named: the client has not proven it may know it (the
            // host it asked for may be someone else's, or its certificate unverified).
            ProxyError::Misdirected { why } => {
                format!("this connection cannot serve the requested host: {why}")
            }
            ProxyError::QuotaExhausted {
                period,
                limit,
                retry_after,
            } => format!(
                "the tenant's quota of {limit} requests per {period} is used up; it renews in {retry_after}s (UTC)"
            ),
            ProxyError::StoreUnavailable => {
                "the shared limit store is unavailable; retry shortly".to_owned()
            }
            ProxyError::MethodNotAllowed => {
                "CONNECT is not forwarded: this gateway is a reverse proxy".to_owned()
            }
            ProxyError::UnsupportedTransferCoding { coding } => format!(
                "transfer coding {coding:?} is not supported: send the body chunked or with a content-length"
            ),
            ProxyError::MalformedRequest { why } => {
                format!("the request is not valid HTTP/1.1 ({why}); nothing was forwarded")
            }
        }
    }

    /// `Retry-After` in whole seconds, for the rejections that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::RateLimited { retry_after, .. } => Some(*retry_after),
            // In-flight slots free up as requests finish: typically within a second.
            ProxyError::TooManyInFlight { .. } => Some(1),
            ProxyError::QuotaExhausted { retry_after, .. } => Some(*retry_after),
            ProxyError::StoreUnavailable => Some(1),
            ProxyError::UnknownTenant { .. }
            | ProxyError::TenantMismatch { .. }
            | ProxyError::TenantSuspended
            | ProxyError::InvalidApiKey
            | ProxyError::CredentialsRequired
            | ProxyError::InvalidToken
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequestBody
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::TooManyHeaderFields { .. }
            | ProxyError::HeadTooLong { .. }
            | ProxyError::UpstreamError { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::RequestBodyTimeout { .. }
            | ProxyError::Misdirected { .. }
            | ProxyError::MethodNotAllowed
            | ProxyError::UnsupportedTransferCoding { .. }
            | ProxyError::MalformedRequest { .. } => None,
        }
    }

    /// The response the client sees.
    pub fn to_response(
        &self,
        tenant: Option<&str>,
        request_id: &HeaderValue,
    ) -> Response<ProxyBody> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'static str,
            message: String,
            tenant: Option<&'a str>,
            request_id: &'a str,
        }
        let tenant = match self {
            // Not to a client that has not authenticated for it (metrics and the
            // access log still carry it).
            ProxyError::Misdirected { .. } => None,
            _ => tenant,
        };
        let body = Body {
            error: self.code(),
            message: self.message(),
            tenant,
            request_id: request_id.to_str().unwrap_or(""),
        };
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        let mut resp = Response::new(ProxyBody::full(Bytes::from(bytes)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after() {
            h.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        match self {
            ProxyError::CredentialsRequired => {
                h.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
            }
            ProxyError::InvalidToken => {
                h.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            ProxyError::MethodNotAllowed => {
                // RFC 9110 §15.5.6: a 405 names what is allowed. Every method but
                // CONNECT is forwarded; these are the standard ones.
                h.insert(
                    http::header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_match_codes() {
        let all = [
            ProxyError::UnknownTenant { named: None },
            ProxyError::TenantMismatch {
                first: "a".into(),
                first_source: "host",
                other: "b".into(),
                other_source: "path",
            },
            ProxyError::TenantSuspended,
            ProxyError::InvalidApiKey,
            ProxyError::CredentialsRequired,
            ProxyError::InvalidToken,
            ProxyError::RateLimited {
                retry_after: 1,
                policy: "tenant",
                limit: 1.0,
            },
            ProxyError::TooManyInFlight { limit: 1 },
            ProxyError::BodyTooLarge { limit: 1 },
            ProxyError::BadRequestBody,
            ProxyError::HeadersTooLarge { size: 2, limit: 1 },
            ProxyError::TooManyHeaderFields { limit: 1 },
            ProxyError::HeadTooLong { limit: 1 },
            ProxyError::UpstreamError {
                upstream: "u".into(),
                failure: UpstreamFailure::Reset,
            },
            ProxyError::UpstreamTimeout {
                upstream: "u".into(),
                after: Duration::from_secs(1),
            },
            ProxyError::RequestBodyTimeout {
                after: Duration::from_secs(1),
            },
            ProxyError::QuotaExhausted {
                period: "day",
                limit: 1,
                retry_after: 5,
            },
            ProxyError::StoreUnavailable,
            ProxyError::Misdirected { why: "sni" },
            ProxyError::MethodNotAllowed,
            ProxyError::UnsupportedTransferCoding {
                coding: "gzip".into(),
            },
            ProxyError::MalformedRequest {
                why: "invalid header name",
            },
        ];
        for e in &all {
            assert_eq!(ProxyError::REASONS[e.reason_index()], e.code());
        }
        // Every reason has a variant (two variants share `headers_too_large`).
        let mut seen: Vec<usize> = all.iter().map(ProxyError::reason_index).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (0..ProxyError::REASONS.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_misdirected_request_names_no_tenant() {
        let rid = HeaderValue::from_static("abc");
        let r = ProxyError::Misdirected { why: "sni" }.to_response(Some("acme"), &rid);
        assert_eq!(r.status(), 421);
        let body = r.into_body().into_full().unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["tenant"], serde_json::Value::Null);
        assert!(
            !body["message"].as_str().unwrap().contains("acme"),
            "{body}"
        );
    }

    #[test]
    fn body_is_the_spec_json() {
        let rid = HeaderValue::from_static("abc");
        let r = ProxyError::TenantSuspended.to_response(Some("acme"), &rid);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    }
}
