//! Minting HS256 user tokens, for local development and tests.
//!
//! Why this module exists: the tests and the local stack need tokens the services
//! accept (and tokens they must refuse, such as expired ones) without an identity
//! provider. Production tokens come from the product's issuer, never from here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatstream::UserId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Debug, Serialize)]
struct MintClaims {
    sub: String,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

fn encode(secret: &str, claims: &MintClaims) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .unwrap_or_default()
}

/// Mints an HS256 user token valid for `ttl` from now.
pub fn mint_hs256(secret: &str, user: &UserId, ttl: Duration, issuer: Option<&str>, audience: Option<&str>) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims = MintClaims {
        sub: user.to_string(),
        iat: Some(now),
        exp: now + ttl.as_secs(),
        iss: issuer.map(str::to_owned),
        aud: audience.map(str::to_owned),
    };
    encode(secret, &claims)
}

/// Mints an HS256 token with an explicit expiry (seconds since the epoch), for tests
/// of expired tokens.
pub fn mint_hs256_expiring_at(secret: &str, user: &str, exp: u64) -> String {
    encode(secret, &MintClaims { sub: user.to_owned(), iat: None, exp, iss: None, aud: None })
}
