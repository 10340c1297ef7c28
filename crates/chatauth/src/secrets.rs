//! The strength rules for the fleet's shared secrets, checked before a service starts.
//!
//! Why this module exists: a short HS256 secret can be brute-forced offline from one
//! token, and a secret copied from this repository's sample files is public. Either
//! lets anyone mint tokens for any user, so a service refuses to start with one
//! rather than run open.

use crate::AuthError;

/// The least number of bytes `JWT_SECRET` and `INTERNAL_SERVICE_TOKEN` may have
/// (256 bits: as many as the HS256 digest, RFC 7518 section 3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Secret values that were ever committed to this repository as samples
/// (`deploy/compose/chatfleet.env`, `deploy/helm/chatfleet/README.md`, the Helm
/// render test). They are public, so a service
/// refuses to start with any of them. When a sample value is added anywhere in the
/// repository, add it here too.
pub const KNOWN_SAMPLE_SECRETS: &[&str] = &[
    // deploy/compose/chatfleet.env before first-run generation
    "compose-dev-jwt-secret-change-me-0123456789",
    "compose-dev-service-token-change-me-0123456789",
    // deploy/helm/chatfleet/README.md (render check) and tests/tests/fleet/deploy_helm.rs
    "x0123456789abcdef",
    "test-secret-0123456789",
    "test-secret-0123456789-0123456789-abc",
];

/// Checks one shared secret named `name` (its environment variable) and explains
/// what to do when it is refused. The value itself never appears in the message.
pub fn check_secret(name: &str, value: &str) -> Result<(), AuthError> {
    if value.is_empty() {
        return Err(AuthError::Config(format!(
            "{name} is not set: set it to a random value of at least {MIN_SECRET_BYTES} bytes \
             (for example `openssl rand -base64 48`)"
        )));
    }
    if KNOWN_SAMPLE_SECRETS.contains(&value) {
        return Err(AuthError::Config(format!(
            "{name} is a sample value published in the chatfleet repository: generate your own \
             (for example `openssl rand -base64 48`)"
        )));
    }
    if value.len() < MIN_SECRET_BYTES {
        return Err(AuthError::Config(format!(
            "{name} is {} bytes long; it must be at least {MIN_SECRET_BYTES} bytes \
             (for example `openssl rand -base64 48`)",
            value.len()
        )));
    }
    Ok(())
}
