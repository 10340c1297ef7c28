//! `GET /presence?user_id=…`: is a user online (has a notification socket on any pod).
//!
//! Why this module exists: clients (a "last seen" dot) and services alike ask the same
//! question, and the answer must be the one other services get from Redis directly
//! (`EXISTS presence:{user_id}`), so it is read from Redis here too, never from this
//! pod's own sockets alone.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chatauth::{AuthUser, ServiceCaller};
use chatstream::UserId;
use serde::Serialize;
use servicekit::{ApiError, ApiQuery};

use crate::app::{AppState, UserQuery};

/// The answer.
#[derive(Debug, Serialize)]
pub struct Online {
    user_id: UserId,
    online: bool,
}

async fn look_up(state: &AppState, query: &UserQuery) -> Result<Json<Online>, ApiError> {
    let user = query.user()?;
    match state.presence.is_online(&user).await {
        Ok(online) => Ok(Json(Online { user_id: user, online })),
        Err(err) => Err(ApiError::unavailable(format!("presence is unavailable: {err}"), Duration::from_secs(2))),
    }
}

/// Public: any authenticated user may ask about any user.
pub async fn for_user(
    State(state): State<AppState>,
    _caller: AuthUser,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> Result<Json<Online>, ApiError> {
    look_up(&state, &query).await
}

/// Internal: services with the service token.
pub async fn for_service(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> Result<Json<Online>, ApiError> {
    look_up(&state, &query).await
}
