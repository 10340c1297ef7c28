//! The axum extractors that put authentication in front of handlers.
//!
//! Why this module exists: where a token may come from is part of the security
//! design. A token in a URL ends up in browser history, proxy and server access logs
//! and `Referer` headers, so it is accepted only where browsers have no other way:
//! the two WebSocket subscribe routes ([`SocketUser`]). Every other route takes the
//! `Authorization` header only ([`AuthUser`]) and refuses a request that carries
//! `access_token` in its query, even a valid one, so clients cannot drift into the
//! leaky form. Nothing here logs a token or a query string.

use std::time::SystemTime;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use chatstream::UserId;
use servicekit::ApiError;

use crate::{AuthError, Authenticator, Verified};

/// The name of the query parameter that carries a token on socket upgrades.
const QUERY_PARAMETER: &str = "access_token";

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The `access_token` query parameter, percent-decoded (names are decoded too, so
/// `access%5Ftoken` counts).
fn query_token(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name) == QUERY_PARAMETER).then(|| percent_decode(value))
    })
}

pub(crate) fn percent_decode(raw: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn verified(auth: &Authenticator, token: &str) -> Result<Verified, ApiError> {
    auth.verify(token).await.map_err(|err| {
        // The error names what was wrong; never the token.
        tracing::debug!(error = %err, "rejected user token");
        ApiError::from(err)
    })
}

/// The authenticated user of a request, from the `Authorization: Bearer` header
/// only. A request with `access_token` in its query string is refused with `401`.
#[derive(Debug, Clone)]
pub struct AuthUser(pub UserId);

impl<S> FromRequestParts<S> for AuthUser
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if query_token(parts).is_some() {
            tracing::debug!("refused a token in the query string outside the subscribe routes");
            return Err(AuthError::QueryTokenNotAllowed.into());
        }
        let auth = Authenticator::from_ref(state);
        let token = bearer(parts).ok_or(AuthError::Missing)?;
        Ok(AuthUser(verified(&auth, token).await?.user))
    }
}

/// The authenticated user of a WebSocket upgrade, from the `Authorization` header or
/// the `access_token` query parameter (browsers cannot set headers on an upgrade),
/// and when the token expires: the socket must be closed then. Use it on the
/// subscribe routes only.
#[derive(Debug, Clone)]
pub struct SocketUser {
    pub user: UserId,
    pub expires_at: SystemTime,
}

impl<S> FromRequestParts<S> for SocketUser
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = Authenticator::from_ref(state);
        let token = match bearer(parts) {
            Some(token) => token.to_owned(),
            None => query_token(parts).ok_or(AuthError::Missing)?,
        };
        let Verified { user, expires_at } = verified(&auth, &token).await?;
        Ok(SocketUser { user, expires_at })
    }
}

/// Proof that the caller presented the internal service token.
#[derive(Debug, Clone, Copy)]
pub struct ServiceCaller;

impl<S> FromRequestParts<S> for ServiceCaller
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = Authenticator::from_ref(state);
        match bearer(parts) {
            Some(token) if auth.is_service_token(token) => Ok(ServiceCaller),
            Some(_) => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "invalid service token")),
            None => Err(ApiError::unauthorized("internal endpoints require the service token")),
        }
    }
}
