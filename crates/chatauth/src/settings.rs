//! The authentication settings every service reads from its environment.
//!
//! Why this module exists: the three public services must be configured the same way
//! (same names, same defaults) or one of them ends up accepting tokens another
//! refuses; one struct, flattened into each service's settings, keeps them equal.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// `JWT_SECRET`: the HS256 shared secret, at least 32 bytes. Ignored for RS256.
    pub jwt_secret: String,
    /// `JWT_PUBLIC_KEY_FILE`: path to the RS256 PEM public key (RS256: this or `JWT_JWKS_URL`).
    pub jwt_public_key_file: String,
    /// `JWT_JWKS_URL`: the issuer's JWKS, fetched at start and refreshed (RS256).
    pub jwt_jwks_url: String,
    /// `JWT_JWKS_REFRESH_INTERVAL`: how often the JWKS is fetched again.
    #[serde(with = "humantime_serde")]
    pub jwt_jwks_refresh_interval: Duration,
    /// `JWT_ISSUER`: required `iss`, when not empty.
    pub jwt_issuer: String,
    /// `JWT_AUDIENCE`: required `aud`, when not empty.
    pub jwt_audience: String,
    /// `JWT_LEEWAY`: clock skew tolerated on `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// `INTERNAL_SERVICE_TOKEN`: the bearer token internal endpoints demand, at least 32 bytes.
    pub internal_service_token: String,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_secret: String::new(),
            jwt_public_key_file: String::new(),
            jwt_jwks_url: String::new(),
            jwt_jwks_refresh_interval: Duration::from_secs(300),
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
        ("JWT_JWKS_URL", "jwt_jwks_url"),
        ("JWT_JWKS_REFRESH_INTERVAL", "jwt_jwks_refresh_interval"),
        ("JWT_ISSUER", "jwt_issuer"),
        ("JWT_AUDIENCE", "jwt_audience"),
        ("JWT_LEEWAY", "jwt_leeway"),
        ("INTERNAL_SERVICE_TOKEN", "internal_service_token"),
    ];
}
