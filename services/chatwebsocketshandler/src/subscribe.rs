//! `GET /chat/subscribe`: who may open a chat socket, and how it starts.
//!
//! Why this module exists: the checks before an upgrade are the socket's whole
//! security (a refused upgrade gets a JSON error and never a socket), and the order
//! of its first steps is what makes `since` exact: the connection is registered
//! *before* the history is read, so a message persisted meanwhile is either in the
//! history or queued live, and the driver drops a live copy of a replayed one.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use chatauth::AuthUser;
use chatstream::{MessageId, StreamId, UserId};
use serde::Deserialize;
use servicekit::{ApiError, ApiQuery};
use wsfanout::{Close, Driver, Ended, Frame, Registration};

use crate::app::AppState;
use crate::history::HistoryError;
use crate::protocol::{self, resync_reason, EventKind};

/// The query of `GET /chat/subscribe` (the `access_token` parameter is read by the
/// authenticator).
#[derive(Debug, Deserialize)]
pub struct SubscribeQuery {
    #[serde(default)]
    stream_id: Option<String>,
    #[serde(default)]
    sender_id: Option<String>,
    #[serde(default)]
    receiver_id: Option<String>,
    #[serde(default)]
    since: Option<String>,
}

/// A subscription that passed every check.
#[derive(Debug, PartialEq, Eq)]
struct Subscription {
    stream: StreamId,
    since: Option<MessageId>,
}

fn required<'a>(field: &str, value: &'a Option<String>) -> Result<&'a str, ApiError> {
    value.as_deref().ok_or_else(|| ApiError::bad_request(format!("{field} is required")))
}

/// The checks of a subscription: well-formed ids, a stream id that really is the
/// pair's (recomputed, never trusted), and a caller who is one of the two.
fn authorize(caller: &UserId, query: &SubscribeQuery) -> Result<Subscription, ApiError> {
    let invalid = |field: &str, err: &dyn std::fmt::Display| ApiError::bad_request(format!("{field}: {err}"));
    let stream = StreamId::parse(required("stream_id", &query.stream_id)?).map_err(|e| invalid("stream_id", &e))?;
    let sender = UserId::parse(required("sender_id", &query.sender_id)?).map_err(|e| invalid("sender_id", &e))?;
    let receiver =
        UserId::parse(required("receiver_id", &query.receiver_id)?).map_err(|e| invalid("receiver_id", &e))?;
    if sender == receiver {
        return Err(invalid("receiver_id", &"must differ from sender_id"));
    }
    if !stream.is_pair_of(&sender, &receiver) {
        return Err(invalid("stream_id", &"is not the stream of sender_id and receiver_id"));
    }
    if caller != &sender && caller != &receiver {
        return Err(ApiError::forbidden("you are not a participant of this stream"));
    }
    let since = match query.since.as_deref() {
        None => None,
        Some(raw) => Some(MessageId::parse(raw).map_err(|e| invalid("since", &e))?),
    };
    Ok(Subscription { stream, since })
}

/// `GET /chat/subscribe?stream_id=…&sender_id=…&receiver_id=…[&since=…]`.
pub async fn subscribe(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiQuery(query): ApiQuery<SubscribeQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let subscription = authorize(&caller, &query)?;
    let (upgrade, registration) = wsfanout::admit(&state.hub, subscription.stream, upgrade)?;
    tracing::debug!(stream = %subscription.stream, user = %caller, connection = %registration.id(), "socket admitted");
    let since = subscription.since;
    Ok(upgrade.on_upgrade(move |socket| serve(state, socket, registration, since)))
}

/// Runs one upgraded socket: replay (when asked), then live.
async fn serve(state: AppState, socket: WebSocket, registration: Registration<StreamId>, since: Option<MessageId>) {
    let stream = *registration.key();
    let driver = Driver::new(socket, registration, state.shutdown.token()).on_client(protocol::answer_client);
    let ended = match since {
        None => driver.run().await,
        Some(since) => {
            let fetched = tokio::select! {
                fetched = state.history.after(stream, since) => Some(fetched),
                _ = state.shutdown.wait() => None,
            };
            match fetched {
                None => driver.close(Close::going_away()).await,
                Some(Ok(messages)) => {
                    metrics::counter!("chat_replayed_messages_total").increment(messages.len() as u64);
                    let frames: Vec<Frame> = messages
                        .iter()
                        .map(|message| protocol::event_frame(EventKind::Message, message, None))
                        .collect();
                    driver.replay(frames).run().await
                }
                Some(Err(err)) => {
                    let reason = match err {
                        HistoryError::TooFarBehind { .. } => resync_reason::TOO_FAR_BEHIND,
                        HistoryError::Unavailable(_) => resync_reason::HISTORY_UNAVAILABLE,
                    };
                    tracing::warn!(%stream, error = %err, "cannot replay; asking the client to resync");
                    metrics::counter!("chat_replay_failures_total", "reason" => reason).increment(1);
                    driver.close(protocol::resync(reason)).await
                }
            }
        }
    };
    if let Ended::HeartbeatTimeout = ended {
        tracing::info!(%stream, "socket dropped: no pong within WS_PONG_TIMEOUT");
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    fn query(stream: &str, sender: &str, receiver: &str, since: Option<&str>) -> SubscribeQuery {
        SubscribeQuery {
            stream_id: Some(stream.to_owned()),
            sender_id: Some(sender.to_owned()),
            receiver_id: Some(receiver.to_owned()),
            since: since.map(str::to_owned),
        }
    }

    #[test]
    fn participants_may_subscribe_to_their_stream() {
        let stream = StreamId::for_pair(&user("alice"), &user("bob"));
        let since = MessageId::new();
        for caller in ["alice", "bob"] {
            let ok = authorize(&user(caller), &query(stream.as_str(), "alice", "bob", Some(&since.to_string())));
            assert_eq!(ok.ok(), Some(Subscription { stream, since: Some(since) }), "{caller}");
        }
        // The pair may be given in either order.
        assert!(authorize(&user("alice"), &query(stream.as_str(), "bob", "alice", None)).is_ok());
    }

    #[test]
    fn bad_subscriptions_are_refused_with_the_right_status() {
        let stream = StreamId::for_pair(&user("alice"), &user("bob"));
        let other = StreamId::for_pair(&user("alice"), &user("carol"));
        let status = |caller: &str, q: SubscribeQuery| authorize(&user(caller), &q).err().map(|e| e.status);
        assert_eq!(status("mallory", query(stream.as_str(), "alice", "bob", None)), Some(StatusCode::FORBIDDEN));
        assert_eq!(status("alice", query(other.as_str(), "alice", "bob", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query("not-a-stream", "alice", "bob", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query(stream.as_str(), "alice", "b o b", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query(stream.as_str(), "alice", "alice", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query(stream.as_str(), "alice", "bob", Some("1"))), Some(StatusCode::BAD_REQUEST));
        let missing = SubscribeQuery { stream_id: None, sender_id: None, receiver_id: None, since: None };
        assert_eq!(status("alice", missing), Some(StatusCode::BAD_REQUEST));
    }
}
