//! `GET /notifications/subscribe?user_id=…`: who may open a notification socket.
//!
//! Why this module exists: the checks before an upgrade are the socket's whole
//! security (a refused upgrade gets a JSON error and never a socket): a valid user
//! token whose subject is the `user_id` asked for. A user may hold several sockets
//! (tabs, devices); each is registered with the hub under the user id and tracked
//! for presence from the moment it is admitted until it has finished.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use chatauth::SocketUser;
use chatstream::UserId;
use servicekit::{AllowedOrigin, ApiError, ApiQuery, ClientIp};
use wsfanout::{Admission, Driver, Ended, Registration};

use crate::app::{AppState, UserQuery};
use crate::presence::Tracked;
use crate::protocol;

/// The checks of a subscription: a well-formed user id that is the caller's own.
fn authorize(caller: &UserId, query: &UserQuery) -> Result<UserId, ApiError> {
    let user = query.user()?;
    if &user != caller {
        return Err(ApiError::forbidden("you may only subscribe to your own notifications"));
    }
    Ok(user)
}

/// `GET /notifications/subscribe?user_id=…` (user JWT in `Authorization` or `access_token`).
pub async fn subscribe(
    State(state): State<AppState>,
    _origin: AllowedOrigin,
    ClientIp(ip): ClientIp,
    SocketUser { user: caller, expires_at }: SocketUser,
    ApiQuery(query): ApiQuery<UserQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let user = authorize(&caller, &query)?;
    let who = Admission { user: user.as_str(), ip, audience: user.as_str() };
    let (upgrade, registration) = wsfanout::admit(&state.hub, user.clone(), who, upgrade)?;
    let tracked = state.presence.track(user.clone());
    tracing::debug!(%user, connection = %registration.id(), "socket admitted");
    Ok(upgrade.on_upgrade(move |socket| serve(state, socket, registration, tracked, expires_at)))
}

/// Runs one upgraded socket until it ends (at the latest when its token expires: 4003).
async fn serve(
    state: AppState,
    socket: WebSocket,
    registration: Registration<UserId>,
    tracked: Tracked,
    expires_at: std::time::SystemTime,
) {
    let user = registration.key().clone();
    let ended = Driver::new(socket, registration, state.shutdown.token())
        .on_client(protocol::answer_client)
        .expires_at(expires_at)
        .run()
        .await;
    // The registration is gone now: the presence worker sees the user's real count.
    drop(tracked);
    if let Ended::HeartbeatTimeout = ended {
        tracing::info!(%user, "socket dropped: no pong within WS_PONG_TIMEOUT");
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn query(user: Option<&str>) -> UserQuery {
        serde_json::from_value(serde_json::json!({ "user_id": user })).expect("query")
    }

    #[test]
    fn only_the_user_themself_may_subscribe() {
        let alice = UserId::parse("alice").expect("valid");
        assert_eq!(authorize(&alice, &query(Some("alice"))).ok(), Some(alice.clone()));
        let status = |q: UserQuery| authorize(&alice, &q).err().map(|e| e.status);
        assert_eq!(status(query(Some("bob"))), Some(StatusCode::FORBIDDEN));
        assert_eq!(status(query(Some("a l i c e"))), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(query(None)), Some(StatusCode::BAD_REQUEST));
    }
}
