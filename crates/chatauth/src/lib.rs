//! Authentication for every chatfleet edge.
//!
//! Why this crate exists: the public API, the chat sockets and the notification
//! sockets must all accept exactly the same tokens and reject the same forgeries, and
//! every internal endpoint must demand the same service token. One implementation,
//! used everywhere, is the only way to keep that true.
//!
//! - Users present a JWT in `Authorization: Bearer …` ([`AuthUser`]). Only the two
//!   WebSocket subscribe routes also take `?access_token=…` ([`SocketUser`]), since
//!   browsers cannot set headers on an upgrade; anywhere else a token in the query
//!   string is refused, so tokens do not spread into URLs, proxies and logs.
//! - HS256 with a shared secret (at least 32 bytes) by default; RS256 with a PEM
//!   public key file or the issuer's JWKS ([`jwks`]). `exp` and `sub` are required,
//!   `nbf` is checked when present, issuer and audience when configured, all with
//!   `JWT_LEEWAY` of clock skew. `sub` is the [`UserId`].
//! - Services calling internal endpoints present `Authorization: Bearer <INTERNAL_SERVICE_TOKEN>`
//!   ([`ServiceCaller`]), at least 32 bytes.
//! - Secrets published in this repository as samples are refused at start ([`secrets`]).

mod extract;
mod jwks;
mod mint;
pub mod secrets;
mod settings;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatstream::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use servicekit::ApiError;

pub use extract::{AuthUser, ServiceCaller, SocketUser};
pub use jwks::UNKNOWN_KID_MIN_GAP;
pub use mint::{mint_hs256, mint_hs256_expiring_at};
pub use secrets::{check_secret, KNOWN_SAMPLE_SECRETS, MIN_SECRET_BYTES};
pub use settings::{AuthSettings, JwtAlgorithm};

/// Why authentication failed or could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token is expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("access_token in the query string is accepted only on the WebSocket subscribe routes; send Authorization: Bearer")]
    QueryTokenNotAllowed,
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

/// The claims chatfleet reads; the standard ones it checks (`nbf`, `iss`, `aud`) are
/// validated by jsonwebtoken from the raw token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// A verified user token: who it speaks for and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user: UserId,
    /// The token's `exp`. Sockets opened with it are closed at this instant.
    pub expires_at: SystemTime,
}

/// Verifies user tokens and the internal service token.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

enum Keys {
    Static(DecodingKey),
    Jwks(Arc<jwks::Jwks>),
}

struct Inner {
    keys: Keys,
    validation: Validation,
    service_token: String,
}

impl Authenticator {
    /// An authenticator with a key known now: HS256, or RS256 with
    /// `JWT_PUBLIC_KEY_FILE`. A `JWT_JWKS_URL` needs [`Authenticator::start`].
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let (key, algorithm) = static_key(settings)?;
        Self::build(settings, Keys::Static(key), algorithm)
    }

    /// Any configuration: like [`Authenticator::new`], and with `JWT_JWKS_URL` the key
    /// set is fetched now (failing when it cannot be) and refreshed in the background
    /// every `JWT_JWKS_REFRESH_INTERVAL` for as long as the authenticator lives.
    pub async fn start(settings: &AuthSettings) -> Result<Self, AuthError> {
        Self::start_with(settings, UNKNOWN_KID_MIN_GAP).await
    }

    async fn start_with(settings: &AuthSettings, unknown_kid_min_gap: Duration) -> Result<Self, AuthError> {
        if settings.jwt_algorithm != JwtAlgorithm::RS256 || settings.jwt_jwks_url.is_empty() {
            return Self::new(settings);
        }
        if !settings.jwt_public_key_file.is_empty() {
            return Err(AuthError::Config(
                "JWT_PUBLIC_KEY_FILE and JWT_JWKS_URL are both set: set exactly one of them for RS256".into(),
            ));
        }
        check_secret("INTERNAL_SERVICE_TOKEN", &settings.internal_service_token)?;
        let url = &settings.jwt_jwks_url;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(AuthError::Config(format!("JWT_JWKS_URL must be an http(s) URL, got {url:?}")));
        }
        let jwks = jwks::Jwks::start(url, unknown_kid_min_gap).await?;
        jwks::Jwks::spawn_refresh(&jwks, settings.jwt_jwks_refresh_interval);
        Self::build(settings, Keys::Jwks(jwks), Algorithm::RS256)
    }

    fn build(settings: &AuthSettings, keys: Keys, algorithm: Algorithm) -> Result<Self, AuthError> {
        check_secret("INTERNAL_SERVICE_TOKEN", &settings.internal_service_token)?;
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.jwt_leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if !settings.jwt_issuer.is_empty() {
            required.push("iss");
            validation.set_issuer(&[settings.jwt_issuer.as_str()]);
        }
        if settings.jwt_audience.is_empty() {
            validation.validate_aud = false;
        } else {
            required.push("aud");
            validation.set_audience(&[settings.jwt_audience.as_str()]);
        }
        validation.set_required_spec_claims(&required);
        let service_token = settings.internal_service_token.clone();
        Ok(Self { inner: Arc::new(Inner { keys, validation, service_token }) })
    }

    /// Verifies a user token: signature (with the configured algorithm only), `exp`,
    /// `nbf`, issuer and audience when configured, and a valid `sub`.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let key = match &self.inner.keys {
            Keys::Static(key) => key.clone(),
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|err| AuthError::Invalid(err.to_string()))?;
                if !self.inner.validation.algorithms.contains(&header.alg) {
                    return Err(AuthError::Invalid("the token's algorithm is not accepted".into()));
                }
                jwks.key(header.kid.as_deref()).await?
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation).map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(err.to_string()),
            })?;
        let user = UserId::parse(&data.claims.sub).map_err(|err| AuthError::BadSubject(err.to_string()))?;
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(data.claims.exp))
            .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)));
        Ok(Verified { user, expires_at })
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

/// The key of an HS256 or RS256-from-file configuration, with the settings checked.
fn static_key(settings: &AuthSettings) -> Result<(DecodingKey, Algorithm), AuthError> {
    match settings.jwt_algorithm {
        JwtAlgorithm::HS256 => {
            check_secret("JWT_SECRET", &settings.jwt_secret)?;
            if !settings.jwt_public_key_file.is_empty() || !settings.jwt_jwks_url.is_empty() {
                tracing::warn!("JWT_PUBLIC_KEY_FILE / JWT_JWKS_URL are ignored: JWT_ALGORITHM is HS256");
            }
            Ok((DecodingKey::from_secret(settings.jwt_secret.as_bytes()), Algorithm::HS256))
        }
        JwtAlgorithm::RS256 => {
            if !settings.jwt_jwks_url.is_empty() {
                return Err(AuthError::Config(
                    "JWT_JWKS_URL is set: the service must build its authenticator with Authenticator::start".into(),
                ));
            }
            if settings.jwt_public_key_file.is_empty() {
                return Err(AuthError::Config(
                    "JWT_ALGORITHM is RS256: set JWT_PUBLIC_KEY_FILE (a PEM public key) or JWT_JWKS_URL".into(),
                ));
            }
            let pem = std::fs::read(&settings.jwt_public_key_file).map_err(|err| {
                AuthError::Config(format!("JWT_PUBLIC_KEY_FILE {:?}: {err}", settings.jwt_public_key_file))
            })?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .map_err(|err| AuthError::Config(format!("JWT_PUBLIC_KEY_FILE is not an RSA PEM public key: {err}")))?;
            Ok((key, Algorithm::RS256))
        }
    }
}

#[cfg(test)]
mod tests;
