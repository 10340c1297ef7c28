//! What every public listener enforces before a handler runs: who the client is
//! (its address, for per-address limits), where a browser page came from (the
//! `Origin` allow-list, for CORS and WebSocket upgrades), how long a request may
//! take, and how many may run at once.
//!
//! Why this module exists: these are the limits that keep one client from
//! starving the others and a browser page on another site from riding a user's
//! token. Every service must apply them identically, so they are layered onto every
//! router by [`crate::kit`] and read by handlers through the extractors here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::ApiError;

/// The edge policy of one listener, from [`crate::kit::HttpSettings`].
#[derive(Debug, Clone, Default)]
pub struct EdgePolicy {
    /// Allowed `Origin` values; empty allows any (non-browser clients).
    pub allowed_origins: Vec<String>,
    /// The header an edge proxy writes the client address into (lowercase), if any.
    pub client_ip_header: Option<HeaderName>,
}

impl EdgePolicy {
    /// Parses `ALLOWED_ORIGINS` (comma-separated) and `CLIENT_IP_HEADER`.
    pub fn new(allowed_origins: &str, client_ip_header: &str) -> Result<Self, String> {
        let allowed_origins: Vec<String> = allowed_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        for origin in &allowed_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(format!(
                    "ALLOWED_ORIGINS: {origin:?} is not an http(s) origin such as https://app.example.com"
                ));
            }
        }
        let client_ip_header = match client_ip_header.trim() {
            "" => None,
            name => Some(
                HeaderName::try_from(name.to_ascii_lowercase())
                    .map_err(|err| format!("CLIENT_IP_HEADER {name:?}: {err}"))?,
            ),
        };
        Ok(Self { allowed_origins, client_ip_header })
    }

    fn allows_any(&self) -> bool {
        self.allowed_origins.is_empty() || self.allowed_origins.iter().any(|o| o == "*")
    }

    /// Whether a request with these headers may proceed: no `Origin` (not a
    /// browser page), or an allowed one.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        match headers.get(header::ORIGIN) {
            None => true,
            Some(_) if self.allows_any() => true,
            Some(origin) => {
                let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
                self.allowed_origins.iter().any(|allowed| allowed == origin)
            }
        }
    }

    /// The CORS layer of the public API, driven by the same list.
    pub fn cors(&self) -> CorsLayer {
        let origin = if self.allows_any() {
            AllowOrigin::any()
        } else {
            let list: Vec<HeaderValue> =
                self.allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
            AllowOrigin::list(list)
        };
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("traceparent")])
            .expose_headers([header::RETRY_AFTER, HeaderName::from_static("idempotent-replay")])
            .max_age(Duration::from_secs(600))
    }
}

/// The client's address: the TCP peer, or, behind a proxy configured with
/// `CLIENT_IP_HEADER`, the rightmost address of that header (the one the proxy
/// itself wrote; anything left of it came from the client and proves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let policy = parts.extensions.get::<Arc<EdgePolicy>>().cloned().unwrap_or_default();
        if let Some(name) = &policy.client_ip_header {
            let forwarded = parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|v| v.trim().parse::<IpAddr>().ok())
                .next_back();
            if let Some(ip) = forwarded {
                return Ok(Self(ip));
            }
        }
        match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => Ok(Self(addr.ip())),
            None => Err(ApiError::internal("no peer address on the request")),
        }
    }
}

/// Refuses a request whose `Origin` is not allowed (WebSocket upgrades: browsers
/// send no CORS preflight for them, so this is their only origin check).
pub fn check_origin(parts_headers: &HeaderMap, policy: Option<&Arc<EdgePolicy>>) -> Result<(), ApiError> {
    match policy {
        Some(policy) if !policy.origin_allowed(parts_headers) => {
            metrics::counter!("origin_refused_total").increment(1);
            Err(ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", "this Origin may not open connections here"))
        }
        _ => Ok(()),
    }
}

/// The `Origin` check as an extractor, for WebSocket upgrade handlers.
#[derive(Debug, Clone, Copy)]
pub struct AllowedOrigin;

impl<S: Send + Sync> FromRequestParts<S> for AllowedOrigin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        check_origin(&parts.headers, parts.extensions.get::<Arc<EdgePolicy>>()).map(|()| Self)
    }
}

/// Middleware for the public API: a browser request (it carries `Origin`) from an
/// origin outside `ALLOWED_ORIGINS` is refused with `403 origin_not_allowed`, CORS
/// preflights included, instead of being served with the CORS headers withheld.
pub async fn refuse_foreign_origin(request: Request, next: Next) -> Response {
    if let Err(err) = check_origin(request.headers(), request.extensions().get::<Arc<EdgePolicy>>()) {
        return err.into_response();
    }
    next.run(request).await
}

/// Middleware: makes the policy available to extractors.
pub async fn with_policy(policy: Arc<EdgePolicy>, mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(policy);
    next.run(request).await
}

/// Middleware: at most `limit` requests of this listener run at once; the rest are
/// refused at once with `503` + `Retry-After` instead of queueing without bound.
pub async fn concurrency_limit(permits: Arc<Semaphore>, request: Request, next: Next) -> Response {
    let Ok(_permit) = permits.try_acquire_owned() else {
        metrics::counter!("http_load_shed_total").increment(1);
        return ApiError::unavailable("the server is at its concurrent request limit", Duration::from_secs(1))
            .into_response();
    };
    next.run(request).await
}

/// Middleware: a handler that has not answered within `timeout` is abandoned with
/// `503` + `Retry-After` (its work is dropped; writes are idempotent by
/// `client_message_id`, so the client's retry is safe).
pub async fn request_timeout(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_timeouts_total").increment(1);
            ApiError::unavailable("the request took too long", Duration::from_secs(1)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("valid"));
        }
        h
    }

    #[test]
    fn origins_are_checked_against_the_list() {
        let policy = EdgePolicy::new("https://app.example.com, http://localhost:8080/", "").expect("valid");
        assert!(policy.origin_allowed(&headers(None)), "non-browser clients send no Origin");
        assert!(policy.origin_allowed(&headers(Some("https://app.example.com"))));
        assert!(policy.origin_allowed(&headers(Some("http://localhost:8080"))));
        assert!(!policy.origin_allowed(&headers(Some("https://evil.example.com"))));
        assert!(!policy.origin_allowed(&headers(Some("https://app.example.com.evil.net"))));
        assert!(!policy.origin_allowed(&headers(Some("null"))));
        let open = EdgePolicy::new("", "").expect("valid");
        assert!(open.origin_allowed(&headers(Some("https://anything.example"))));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(EdgePolicy::new("app.example.com", "").is_err());
        assert!(EdgePolicy::new("", "bad header").is_err());
        let policy = EdgePolicy::new("", "X-Forwarded-For").expect("valid");
        assert_eq!(policy.client_ip_header.as_ref().map(HeaderName::as_str), Some("x-forwarded-for"));
    }
}
