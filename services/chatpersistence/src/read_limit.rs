//! `ReadUser`: the authenticated caller of a public read, admitted by the per-user
//! read bucket (`RATE_LIMIT_READ_PER_SECOND`, `RATE_LIMIT_READ_BURST`).
//!
//! Why this module exists: only writes were limited, so one user looping on
//! `GET /presence` or the inbox could take MongoDB and Redis away from everyone.
//! Every public `GET` handler takes its caller through this one extractor instead
//! of `AuthUser`: the token is verified once, and the bucket is keyed on the user
//! the token proves, never on an id the client sent. An empty bucket answers what
//! the write limit answers (`KeyedLimiter::admit`: `429 rate_limited` with
//! `Retry-After`, `rate_limited_total{limit="read"}`) before the handler touches a
//! store. Service-token routes and the health and metrics routes do not use it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chatauth::AuthUser;
use chatstream::UserId;
use servicekit::ApiError;

use crate::api::AppState;

/// The authenticated caller of a public read that the read bucket admitted.
#[derive(Debug, Clone)]
pub struct ReadUser(pub UserId);

impl FromRequestParts<AppState> for ReadUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let AuthUser(caller) = AuthUser::from_request_parts(parts, state).await?;
        state.read_limiter().admit(&caller, "reads")?;
        Ok(ReadUser(caller))
    }
}
