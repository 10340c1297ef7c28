//! Authentication for every chatfleet edge.
//!
//! Why this crate exists: the public API, the chat sockets and the notification
//! sockets must all accept exactly the same tokens and reject the same forgeries, and
//! every internal endpoint must demand the same service token. One implementation,
//! used everywhere, is the only way to keep that true.
//!
//! - Users present a JWT (`Authorization: Bearer …`, or `?access_token=…` on a
//!   WebSocket upgrade, since browsers cannot set headers there). HS256 with a shared
//!   secret by default, RS256 with a PEM public key as an option; `exp` is required,
//!   issuer and audience are checked when configured. `sub` is the [`UserId`].
//! - Services calling internal endpoints present `Authorization: Bearer <INTERNAL_SERVICE_TOKEN>`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use chatstream::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use servicekit::ApiError;

/// Which signature scheme user tokens use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
}

/// Authentication settings (see `docs/configuration.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// `JWT_ALGORITHM`: `HS256` (shared secret) or `RS256` (public key).
    pub jwt_algorithm: JwtAlgorithm,
    /// `JWT_SECRET`: the HS256 shared secret. Must be set for HS256.
    pub jwt_secret: String,
    /// `JWT_PUBLIC_KEY_FILE`: path to the RS256 PEM public key.
    pub jwt_public_key_file: String,
    /// `JWT_ISSUER`: required `iss`, when not empty.
    pub jwt_issuer: String,
    /// `JWT_AUDIENCE`: required `aud`, when not empty.
    pub jwt_audience: String,
    /// `JWT_LEEWAY`: clock skew tolerated on `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// `INTERNAL_SERVICE_TOKEN`: the bearer token internal endpoints demand.
    pub internal_service_token: String,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_secret: String::new(),
            jwt_public_key_file: String::new(),
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwt_leeway: Duration::from_secs(30),
            internal_service_token: String::new(),
        }
    }
}

impl AuthSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("JWT_ALGORITHM", "jwt_algorithm"),
        ("JWT_SECRET", "jwt_secret"),
        ("JWT_PUBLIC_KEY_FILE", "jwt_public_key_file"),
        ("JWT_ISSUER", "jwt_issuer"),
        ("JWT_AUDIENCE", "jwt_audience"),
        ("JWT_LEEWAY", "jwt_leeway"),
        ("INTERNAL_SERVICE_TOKEN", "internal_service_token"),
    ];
}

/// Why authentication failed or could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token is expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(String),
    #[error("authentication is misconfigured: {0}")]
    Config(String),
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Config(detail) => ApiError::internal(detail),
            other => ApiError::unauthorized(other.to_string()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// Verifies user tokens and the internal service token.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    key: DecodingKey,
    validation: Validation,
    service_token: String,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let (key, algorithm) = match settings.jwt_algorithm {
            JwtAlgorithm::HS256 => {
                if settings.jwt_secret.len() < 16 {
                    return Err(AuthError::Config("JWT_SECRET must be set to at least 16 bytes for HS256".into()));
                }
                (DecodingKey::from_secret(settings.jwt_secret.as_bytes()), Algorithm::HS256)
            }
            JwtAlgorithm::RS256 => {
                let pem = std::fs::read(&settings.jwt_public_key_file).map_err(|err| {
                    AuthError::Config(format!("JWT_PUBLIC_KEY_FILE {:?}: {err}", settings.jwt_public_key_file))
                })?;
                let key = DecodingKey::from_rsa_pem(&pem)
                    .map_err(|err| AuthError::Config(format!("JWT_PUBLIC_KEY_FILE is not an RSA PEM key: {err}")))?;
                (key, Algorithm::RS256)
            }
        };
        if settings.internal_service_token.len() < 16 {
            return Err(AuthError::Config("INTERNAL_SERVICE_TOKEN must be set to at least 16 bytes".into()));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.jwt_leeway.as_secs();
        let mut required = vec!["exp", "sub"];
        if !settings.jwt_issuer.is_empty() {
            required.push("iss");
        }
        if !settings.jwt_audience.is_empty() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        if !settings.jwt_issuer.is_empty() {
            validation.set_issuer(&[settings.jwt_issuer.as_str()]);
        }
        if settings.jwt_audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[settings.jwt_audience.as_str()]);
        }
        Ok(Self { inner: Arc::new(Inner { key, validation, service_token: settings.internal_service_token.clone() }) })
    }

    /// The user a token speaks for.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.inner.key, &self.inner.validation).map_err(|err| match err
                .kind()
            {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(err.to_string()),
            })?;
        UserId::parse(&data.claims.sub).map_err(|err| AuthError::BadSubject(err.to_string()))
    }

    /// Whether `token` is the internal service token (constant-time comparison).
    pub fn is_service_token(&self, token: &str) -> bool {
        let expected = self.inner.service_token.as_bytes();
        let given = token.as_bytes();
        if expected.len() != given.len() {
            return false;
        }
        expected.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// The service token, for clients calling other services' internal endpoints.
    pub fn service_token(&self) -> &str {
        &self.inner.service_token
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

fn query_token(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "access_token").then(|| percent_decode(value))
    })
}

fn percent_decode(raw: &str) -> String {
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

/// The authenticated user of a request: from the `Authorization` header, or from
/// the `access_token` query parameter (WebSocket upgrades from browsers).
#[derive(Debug, Clone)]
pub struct AuthUser(pub UserId);

impl<S> FromRequestParts<S> for AuthUser
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
        auth.verify(&token).map(AuthUser).map_err(|err| {
            tracing::debug!(error = %err, "rejected user token");
            ApiError::from(err)
        })
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

/// Mints an HS256 user token (local development and tests).
pub fn mint_hs256(secret: &str, user: &UserId, ttl: Duration, issuer: Option<&str>, audience: Option<&str>) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims = Claims {
        sub: user.to_string(),
        iat: Some(now),
        exp: now + ttl.as_secs(),
        iss: issuer.map(str::to_owned),
        aud: audience.map(str::to_owned),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .unwrap_or_default()
}

/// Mints an HS256 token with an explicit expiry (seconds since the epoch), for tests
/// of expired tokens.
pub fn mint_hs256_expiring_at(secret: &str, user: &str, exp: u64) -> String {
    let claims = Claims { sub: user.to_owned(), iat: None, exp, iss: None, aud: None };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
