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
use chatauth::SocketUser;
use chatstream::{MessageId, StreamId, StreamIdFormat, UserId};
use serde::Deserialize;
use servicekit::{AllowedOrigin, ApiError, ApiQuery, ClientIp};
use wsfanout::{Admission, Close, Driver, Ended, Frame, Registration};

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
    /// The other participant (the caller is the one).
    peer: UserId,
    since: Option<MessageId>,
}

fn required<'a>(field: &str, value: &'a Option<String>) -> Result<&'a str, ApiError> {
    value.as_deref().ok_or_else(|| ApiError::bad_request(format!("{field} is required")))
}

/// The checks of a subscription: well-formed ids, a stream id that really is the
/// pair's in the configured format (recomputed, never trusted), and a caller who is
/// one of the two. The socket is then registered for exactly that pair, so even a
/// colliding legacy id shows it nothing of another pair's conversation.
fn authorize(format: StreamIdFormat, caller: &UserId, query: &SubscribeQuery) -> Result<Subscription, ApiError> {
    let invalid = |field: &str, err: &dyn std::fmt::Display| ApiError::bad_request(format!("{field}: {err}"));
    let stream = StreamId::parse(required("stream_id", &query.stream_id)?).map_err(|e| invalid("stream_id", &e))?;
    let sender = UserId::parse(required("sender_id", &query.sender_id)?).map_err(|e| invalid("sender_id", &e))?;
    let receiver =
        UserId::parse(required("receiver_id", &query.receiver_id)?).map_err(|e| invalid("receiver_id", &e))?;
    if sender == receiver {
        return Err(invalid("receiver_id", &"must differ from sender_id"));
    }
    if stream.pair_format() != Some(format) || !stream.is_pair_of(&sender, &receiver) {
        return Err(invalid("stream_id", &"is not the stream of sender_id and receiver_id"));
    }
    let peer = if caller == &sender {
        receiver
    } else if caller == &receiver {
        sender
    } else {
        return Err(ApiError::forbidden("you are not a participant of this stream"));
    };
    let since = match query.since.as_deref() {
        None => None,
        Some(raw) => Some(MessageId::parse(raw).map_err(|e| invalid("since", &e))?),
    };
    Ok(Subscription { stream, peer, since })
}

/// `GET /chat/subscribe?stream_id=…&sender_id=…&receiver_id=…[&since=…]`.
pub async fn subscribe(
    State(state): State<AppState>,
    _origin: AllowedOrigin,
    ClientIp(ip): ClientIp,
    SocketUser { user: caller, expires_at }: SocketUser,
    ApiQuery(query): ApiQuery<SubscribeQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let subscription = authorize(state.format, &caller, &query)?;
    let audience = protocol::pair_audience(&caller, &subscription.peer);
    let who = Admission { user: caller.as_str(), ip, audience: &audience };
    let (upgrade, registration) = wsfanout::admit(&state.hub, subscription.stream, who, upgrade)?;
    tracing::debug!(stream = %subscription.stream, user = %caller, connection = %registration.id(), "socket admitted");
    let since = subscription.since.map(|since| (since, caller, subscription.peer));
    Ok(upgrade.on_upgrade(move |socket| serve(state, socket, registration, since, expires_at)))
}

/// Runs one upgraded socket: replay of the pair's messages after `since` (when
/// asked), then live.
async fn serve(
    state: AppState,
    socket: WebSocket,
    registration: Registration<StreamId>,
    since: Option<(MessageId, UserId, UserId)>,
    expires_at: std::time::SystemTime,
) {
    let stream = *registration.key();
    // Closed with 4003 when the token it was opened with expires.
    let driver = Driver::new(socket, registration, state.shutdown.token())
        .on_client(protocol::answer_client)
        .expires_at(expires_at);
    let ended = match since {
        None => driver.run().await,
        Some((since, user, peer)) => {
            let fetched = tokio::select! {
                fetched = state.history.after(stream, (&user, &peer), since) => Some(fetched),
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
            let ok = authorize(
                StreamIdFormat::V2,
                &user(caller),
                &query(stream.as_str(), "alice", "bob", Some(&since.to_string())),
            );
            let peer = user(if caller == "alice" { "bob" } else { "alice" });
            assert_eq!(ok.ok(), Some(Subscription { stream, peer, since: Some(since) }), "{caller}");
        }
        // The pair may be given in either order.
        assert!(authorize(StreamIdFormat::V2, &user("alice"), &query(stream.as_str(), "bob", "alice", None)).is_ok());
    }

    #[test]
    fn bad_subscriptions_are_refused_with_the_right_status() {
        let stream = StreamId::for_pair(&user("alice"), &user("bob"));
        let other = StreamId::for_pair(&user("alice"), &user("carol"));
        let status =
            |caller: &str, q: SubscribeQuery| authorize(StreamIdFormat::V2, &user(caller), &q).err().map(|e| e.status);
        assert_eq!(status("mallory", query(stream.as_str(), "alice", "bob", None)), Some(StatusCode::FORBIDDEN));
        assert_eq!(status("alice", query(other.as_str(), "alice", "bob", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query("not-a-stream", "alice", "bob", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query(stream.as_str(), "alice", "b o b", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query(stream.as_str(), "alice", "alice", None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("alice", query(stream.as_str(), "alice", "bob", Some("1"))), Some(StatusCode::BAD_REQUEST));
        let missing = SubscribeQuery { stream_id: None, sender_id: None, receiver_id: None, since: None };
        assert_eq!(status("alice", missing), Some(StatusCode::BAD_REQUEST));
        // A legacy id of the right pair is refused while the service uses v2, and the
        // other way round.
        let legacy = StreamId::for_pair_as(StreamIdFormat::Legacy, &user("alice"), &user("bob"));
        assert_eq!(status("alice", query(legacy.as_str(), "alice", "bob", None)), Some(StatusCode::BAD_REQUEST));
        let in_legacy =
            authorize(StreamIdFormat::Legacy, &user("alice"), &query(legacy.as_str(), "alice", "bob", None));
        assert!(in_legacy.is_ok());
        let v2_in_legacy =
            authorize(StreamIdFormat::Legacy, &user("alice"), &query(stream.as_str(), "alice", "bob", None));
        assert_eq!(v2_in_legacy.err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn a_colliding_legacy_pair_subscribes_to_the_same_key_but_another_audience() {
        // The report: u4a888cz subscribes with receiver z4a888c and gets the
        // legacy stream of u4a888c and zz4a888c.
        let victims = (user("u4a888c"), user("zz4a888c"));
        let stranger = (user("u4a888cz"), user("z4a888c"));
        let stream = StreamId::for_pair_as(StreamIdFormat::Legacy, &victims.0, &victims.1);
        let sub = authorize(StreamIdFormat::Legacy, &stranger.0, &query(stream.as_str(), "u4a888cz", "z4a888c", None))
            .expect("the hash alone cannot tell the pairs apart");
        assert_eq!(sub.stream, stream);
        assert_ne!(
            protocol::pair_audience(&stranger.0, &sub.peer),
            protocol::pair_audience(&victims.0, &victims.1),
            "but the socket's audience is its own pair"
        );
    }
}
