//! `GET /chat/subscribe`: who may open a chat socket, and how it starts.
//!
//! Why this module exists: the checks before an upgrade are the socket's whole
//! security (a refused upgrade gets a JSON error and never a socket), and the order
//! of its first steps is what makes `since` exact: the connection is registered
//! *before* the history is read, so a message persisted meanwhile is either in the
//! history or queued live, and the driver drops a live copy of a replayed one.
//!
//! Two forms: a pair (`stream_id`, `sender_id`, `receiver_id`, checked against the
//! recomputed id) and a group (`conversation_id=g…`, checked against the group's
//! current members as chatpersistence reports them). A group socket is registered
//! with its user as audience *before* membership is asked, so a removal that lands
//! between the check and the registration still closes it (4004).

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chatauth::SocketUser;
use chatstream::{MessageId, StreamId, StreamIdFormat, UserId};
use serde::Deserialize;
use servicekit::{AllowedOrigin, ApiError, ApiQuery, ClientIp};
use wsfanout::{Admission, Close, Driver, Ended, Frame, Registration};

use crate::app::AppState;
use crate::history::{HistoryError, Reader};
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
    /// The group form: `conversation_id=g…` instead of the three pair parameters.
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    since: Option<String>,
    /// `presence=true`: send this socket the conversation's `presence` frames.
    #[serde(default)]
    presence: Option<String>,
}

impl SubscribeQuery {
    fn wants_presence(&self) -> Result<bool, ApiError> {
        match self.presence.as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some(_) => Err(ApiError::bad_request("presence: must be true or false")),
        }
    }
}

/// Who holds a socket, for typing and presence.
struct Holder {
    user: UserId,
    /// What the socket was registered to see (a pair's audience, or the member).
    audience: String,
    presence: bool,
}

/// Whose messages a socket replays (the owned form of [`Reader`]).
#[derive(Debug, PartialEq, Eq)]
enum Who {
    Pair(UserId, UserId),
    Member(UserId),
}

impl Who {
    fn reader(&self) -> Reader<'_> {
        match self {
            Who::Pair(user, peer) => Reader::Pair(user, peer),
            Who::Member(user) => Reader::Member(user),
        }
    }
}

/// How long a client is asked to wait when membership cannot be checked.
const MEMBERS_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// The refusal of a caller who is not a current member, and of an unknown group:
/// the same status and body, so the answer tells a stranger nothing about which
/// group ids exist.
fn not_a_member() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "not_a_member", "you are not a member of this conversation")
}

/// The checks of a group subscription that need no look-up: a group id, not mixed
/// with the pair parameters, and a well-formed `since`.
fn parse_group(query: &SubscribeQuery) -> Result<(StreamId, Option<MessageId>), ApiError> {
    let invalid = |field: &str, err: &dyn std::fmt::Display| ApiError::bad_request(format!("{field}: {err}"));
    if query.stream_id.is_some() || query.sender_id.is_some() || query.receiver_id.is_some() {
        return Err(invalid("conversation_id", &"replaces stream_id, sender_id and receiver_id; give one form"));
    }
    let conversation = StreamId::parse(required("conversation_id", &query.conversation_id)?)
        .map_err(|e| invalid("conversation_id", &e))?;
    if conversation.kind() != chatstream::ConversationKind::Group {
        return Err(invalid(
            "conversation_id",
            &"is not a group id; subscribe to a 1:1 conversation with stream_id, sender_id and receiver_id",
        ));
    }
    let since = match query.since.as_deref() {
        None => None,
        Some(raw) => Some(MessageId::parse(raw).map_err(|e| invalid("since", &e))?),
    };
    Ok((conversation, since))
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
    if query.conversation_id.is_some() {
        return subscribe_group(state, ip, caller, expires_at, &query, upgrade).await;
    }
    let subscription = authorize(state.format, &caller, &query)?;
    let presence = query.wants_presence()?;
    let audience = protocol::pair_audience(&caller, &subscription.peer);
    let who = Admission { user: caller.as_str(), ip, audience: &audience };
    let (upgrade, registration) = wsfanout::admit(&state.hub, subscription.stream, who, upgrade)?;
    tracing::debug!(stream = %subscription.stream, user = %caller, connection = %registration.id(), "socket admitted");
    let holder = Holder { user: caller.clone(), audience, presence };
    let since = subscription.since.map(|since| (since, Who::Pair(caller, subscription.peer)));
    Ok(upgrade.on_upgrade(move |socket| serve(state, socket, registration, holder, since, expires_at)))
}

/// `GET /chat/subscribe?conversation_id=g…[&since=…]`: a member's socket on a group.
async fn subscribe_group(
    state: AppState,
    ip: std::net::IpAddr,
    caller: UserId,
    expires_at: std::time::SystemTime,
    query: &SubscribeQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (conversation, since) = parse_group(query)?;
    let presence = query.wants_presence()?;
    let who = Admission { user: caller.as_str(), ip, audience: caller.as_str() };
    // Registered first: a member_left forwarded while membership is being asked
    // closes this registration, and a removal before the ask makes the ask say no.
    let (upgrade, registration) = wsfanout::admit(&state.hub, conversation, who, upgrade)?;
    match state.history.members(conversation).await {
        Ok(Some(members)) if members.contains(&caller) => {}
        Ok(_) => {
            metrics::counter!("chat_subscribe_refused_total", "reason" => "not_a_member").increment(1);
            return Err(not_a_member());
        }
        Err(err) => {
            tracing::warn!(%conversation, error = %err, "cannot check group membership; refusing the subscription");
            metrics::counter!("chat_subscribe_refused_total", "reason" => "members_unavailable").increment(1);
            return Err(ApiError::unavailable(
                "membership cannot be checked right now; try again",
                MEMBERS_RETRY_AFTER,
            ));
        }
    }
    tracing::debug!(%conversation, user = %caller, connection = %registration.id(), "group socket admitted");
    let holder = Holder { user: caller.clone(), audience: caller.to_string(), presence };
    let since = since.map(|since| (since, Who::Member(caller)));
    Ok(upgrade.on_upgrade(move |socket| serve(state, socket, registration, holder, since, expires_at)))
}

/// Runs one upgraded socket: replay of the pair's messages after `since` and of the
/// changes to the messages up to `since` made since then (when asked), then live;
/// typing and presence from its opening to its end.
async fn serve(
    state: AppState,
    socket: WebSocket,
    registration: Registration<StreamId>,
    holder: Holder,
    since: Option<(MessageId, Who)>,
    expires_at: std::time::SystemTime,
) {
    let stream = *registration.key();
    let id = registration.id();
    // Queued live (after any replay): the others learn this user is here, this
    // socket learns who else is.
    state.live.opened(id, stream, &holder.audience, &holder.user, holder.presence);
    let live = state.live.clone();
    // Closed with 4003 when the token it was opened with expires.
    let driver = Driver::new(socket, registration, state.shutdown.token())
        .on_client(move |frame| protocol::answer_client(frame, |typing| live.typing(id, typing)))
        .expires_at(expires_at);
    let ended = match since {
        None => driver.run().await,
        Some((since, who)) => {
            let fetched = tokio::select! {
                fetched = replay(&state, stream, &who, since) => Some(fetched),
                _ = state.shutdown.wait() => None,
            };
            match fetched {
                None => driver.close(Close::going_away()).await,
                Some(Ok(frames)) => driver.replay(frames).run().await,
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
    state.live.closed(id);
    if let Ended::HeartbeatTimeout = ended {
        tracing::info!(%stream, "socket dropped: no pong within WS_PONG_TIMEOUT");
    }
}

/// What a socket opened with `since` is sent before live frames: the messages after
/// `since` (in their current state), then `message_updated` / `message_deleted` for
/// the messages up to `since` that changed after `since` was minted (the client
/// showed them as they were then). The socket is registered before either is read,
/// so a change made meanwhile is in the read or queued live, and the live copy of a
/// replayed change (same event id) is dropped at the seam.
async fn replay(state: &AppState, stream: StreamId, who: &Who, since: MessageId) -> Result<Vec<Frame>, HistoryError> {
    let messages = state.history.after(stream, who.reader(), since).await?;
    let changed = state.history.changes(stream, who.reader(), since, since.timestamp_millis()).await?;
    metrics::counter!("chat_replayed_messages_total").increment(messages.len() as u64);
    metrics::counter!("chat_replayed_changes_total").increment(changed.len() as u64);
    let mut frames: Vec<Frame> =
        messages.iter().map(|message| protocol::event_frame(EventKind::Message, message, None)).collect();
    frames.extend(changed.iter().map(protocol::change_frame));
    Ok(frames)
}

#[cfg(test)]
mod tests {

    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    fn query(stream: &str, sender: &str, receiver: &str, since: Option<&str>) -> SubscribeQuery {
        SubscribeQuery {
            stream_id: Some(stream.to_owned()),
            sender_id: Some(sender.to_owned()),
            receiver_id: Some(receiver.to_owned()),
            conversation_id: None,
            since: since.map(str::to_owned),
            presence: None,
        }
    }

    #[test]
    fn a_group_subscription_needs_a_group_id_alone() {
        let group = StreamId::new_group();
        let since = MessageId::new();
        let q = |conversation: Option<&str>, stream: Option<&str>, since: Option<&str>| SubscribeQuery {
            stream_id: stream.map(str::to_owned),
            sender_id: None,
            receiver_id: None,
            conversation_id: conversation.map(str::to_owned),
            since: since.map(str::to_owned),
            presence: None,
        };
        assert_eq!(
            parse_group(&q(Some(group.as_str()), None, Some(&since.to_string()))).ok(),
            Some((group, Some(since)))
        );
        let pair = StreamId::for_pair(&user("alice"), &user("bob"));
        let status = |query: SubscribeQuery| parse_group(&query).err().map(|e| e.status);
        assert_eq!(status(q(Some(pair.as_str()), None, None)), Some(StatusCode::BAD_REQUEST), "a pair id");
        assert_eq!(status(q(Some("g123"), None, None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(q(Some(group.as_str()), Some(pair.as_str()), None)), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(q(Some(group.as_str()), None, Some("x"))), Some(StatusCode::BAD_REQUEST));
        let refusal = not_a_member();
        assert_eq!((refusal.status, refusal.code), (StatusCode::FORBIDDEN, "not_a_member"));
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
        let missing = SubscribeQuery {
            stream_id: None,
            sender_id: None,
            receiver_id: None,
            conversation_id: None,
            since: None,
            presence: None,
        };
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
