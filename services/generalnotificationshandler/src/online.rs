//! `GET /presence?user_id=…` on the internal listener: is a user online (has a
//! notification socket on any pod).
//!
//! Why this module exists: services ask it, and the answer must be the one other
//! services get from Redis directly (`EXISTS presence:{user_id}`), so it is read from
//! Redis here too, never from this pod's own sockets alone. Users do not reach it:
//! their look-up is chatpersistence's public `GET /presence`, which answers only
//! about people who share a conversation with the caller (this pod cannot know that).

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chatauth::ServiceCaller;
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

/// Internal: services with the service token.
pub async fn for_service(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> Result<Json<Online>, ApiError> {
    look_up(&state, &query).await
}
