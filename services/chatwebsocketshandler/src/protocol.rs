//! The chat socket protocol: the JSON frames the server sends and accepts, the event
//! ids that make retries and the replay seam idempotent, and the resync close.
//!
//! Why this module exists: `docs/socket-protocol.md` is a contract with every
//! frontend; keeping every frame's shape in one module keeps the code and the
//! document comparable line by line.

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::extract::ws::Utf8Bytes;
use chatstream::{
    ChatMessage, ConversationEvent, ConversationEventKind, ConversationKind, MessageId, StreamId, UserId,
};
use serde::{Deserialize, Serialize};
use wsfanout::{close_code, Close, EventId, Frame, Inbound};

use crate::live::TypingState;

/// The kinds of chat events the change handler forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Message,
    MessageUpdated,
    MessageDeleted,
}

/// Every frame the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Message { message: &'a ChatMessage },
    MessageUpdated { message: &'a ChatMessage },
    MessageDeleted { message: &'a ChatMessage },
    Resync { reason: &'a str },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> Utf8Bytes {
        // Serializing these plain structs cannot fail; an empty frame would be
        // noticed by any client test.
        Utf8Bytes::from(serde_json::to_string(self).unwrap_or_default())
    }
}

/// The audience a chat socket is registered with, and what a message's frame is
/// offered to: the two users of the conversation, sorted, space-separated (user ids
/// never contain a space). A socket only receives messages between exactly its user
/// and its peer, even where another pair shares the stream id (the legacy format).
pub fn pair_audience(a: &UserId, b: &UserId) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("{first} {second}")
}

/// Whether a socket registered with `audience` may see `message`: a pair socket
/// only its own pair's messages, a group socket (audience: its user) only messages
/// that involve its user (sender or addressed recipient when accepted).
pub fn may_see(message: &ChatMessage, audience: &str) -> bool {
    match &message.receiver_id {
        Some(receiver) => pair_audience(&message.sender_id, receiver) == audience,
        None => message.sender_id.as_str() == audience || message.recipients.iter().any(|r| r.as_str() == audience),
    }
}

/// Who may see one message or event, prepared once so that offering its frame to a
/// stream's sockets checks each socket in constant time. (Asking [`may_see`] per
/// socket walks a group message's `recipients` for every socket, and
/// [`may_see_event`] copies the member list for every socket: quadratic in the size
/// of a group, a million steps per message or read marker at 1,000 members.)
pub enum Viewers {
    /// The pair's audience (`pair_audience`); no socket matches `None`.
    Pair(Option<String>),
    /// A group's users.
    Group(std::collections::HashSet<String>),
}

impl Viewers {
    pub fn of_message(message: &ChatMessage) -> Self {
        match &message.receiver_id {
            Some(receiver) => Self::Pair(Some(pair_audience(&message.sender_id, receiver))),
            None => Self::Group(
                std::iter::once(&message.sender_id).chain(&message.recipients).map(ToString::to_string).collect(),
            ),
        }
    }

    pub fn of_event(event: &ConversationEvent) -> Self {
        match event.conversation_id.kind() {
            ConversationKind::Group => Self::Group(
                event.members.iter().chain(std::iter::once(&event.user_id)).map(ToString::to_string).collect(),
            ),
            ConversationKind::Pair | ConversationKind::LegacyPair => match event.members.as_slice() {
                [a, b] => Self::Pair(Some(pair_audience(a, b))),
                _ => Self::Pair(None),
            },
        }
    }

    /// Whether a socket registered with `audience` may see it.
    pub fn admit(&self, audience: &str) -> bool {
        match self {
            Self::Pair(pair) => pair.as_deref() == Some(audience),
            Self::Group(users) => users.contains(audience),
        }
    }
}

/// Frames a chat client may send besides `ping`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Typing { state: TypingState },
}

/// Just the `type` of a client frame.
#[derive(Debug, Deserialize)]
struct FrameType {
    #[serde(rename = "type")]
    kind: String,
}

/// Answers one client frame: `{"type":"typing","state":"start"|"stop"}` is handed to
/// `on_typing` (no reply), `{"type":"ping"}` gets `{"type":"pong"}`, anything else an
/// `error` frame (the socket stays open).
pub fn answer_client(frame: Inbound<'_>, on_typing: impl FnOnce(TypingState)) -> Option<Utf8Bytes> {
    if let Inbound::Text(text) = frame {
        let kind = serde_json::from_str::<FrameType>(text).ok().map(|probe| probe.kind);
        if kind.as_deref() == Some("typing") {
            return match serde_json::from_str::<ClientFrame>(text) {
                Ok(ClientFrame::Typing { state }) => {
                    on_typing(state);
                    None
                }
                Err(_) => Some(wsfanout::unsupported_frame(
                    "a typing frame is {\"type\":\"typing\",\"state\":\"start\"|\"stop\"}",
                )),
            };
        }
    }
    Some(wsfanout::answer_ping(
        frame,
        "or {\"type\":\"typing\",\"state\":\"start\"|\"stop\"}; messages are sent with POST /chat/messages",
    ))
}

/// The id under which an event is deduplicated per socket. A new message is always
/// its message id (the replay seam compares against replayed message ids); an edit
/// or delete uses the id the caller gave (the change handler's dedup id) or one
/// derived from the message, so two different edits are never confused.
pub fn event_id(kind: EventKind, message: &ChatMessage, given: Option<&str>) -> EventId {
    match (kind, given) {
        (EventKind::Message, _) => EventId::from(message.message_id.to_string()),
        (_, Some(given)) => EventId::from(given),
        (EventKind::MessageUpdated, None) => {
            let mut hasher = DefaultHasher::new();
            message.content.as_str().hash(&mut hasher);
            EventId::from(format!("{}.u:{:016x}", message.message_id, hasher.finish()))
        }
        (EventKind::MessageDeleted, None) => EventId::from(format!("{}.d", message.message_id)),
    }
}

/// The frame of one event, serialized once for every socket of the stream.
pub fn event_frame(kind: EventKind, message: &ChatMessage, given_id: Option<&str>) -> Frame {
    // A group message's `recipients` (every other member) decide who may see it;
    // they are not sent on: a 1,000-member group would add ~9 KB to every frame of
    // every socket. Clients get the member list from the conversation.
    let trimmed;
    let message = if message.recipients.is_empty() {
        message
    } else {
        trimmed = ChatMessage { recipients: Vec::new(), ..message.clone() };
        &trimmed
    };
    let text = match kind {
        EventKind::Message => ServerFrame::Message { message },
        EventKind::MessageUpdated => ServerFrame::MessageUpdated { message },
        EventKind::MessageDeleted => ServerFrame::MessageDeleted { message },
    }
    .to_text();
    Frame::event(event_id(kind, message, given_id), text)
}

/// The frame replaying a change a reconnecting client missed (the message's current
/// state): `message_deleted` for a tombstone, `message_updated` otherwise. Its event
/// id is the live change's (`<message_id>.v<version>`), so a live copy of the same
/// change is not sent again; a change of reactions alone (version unchanged) gets an
/// id of its counts.
pub fn change_frame(message: &ChatMessage) -> Frame {
    let kind = if message.state.deleted_at.is_some() { EventKind::MessageDeleted } else { EventKind::MessageUpdated };
    let id = if message.state.version > 0 {
        format!("{}.v{}", message.message_id, message.state.version)
    } else {
        let mut hasher = DefaultHasher::new();
        message.state.reactions.hash(&mut hasher);
        format!("{}.r:{:016x}", message.message_id, hasher.finish())
    };
    event_frame(kind, message, Some(&id))
}

/// The frame of a conversation event (`member_joined`, `member_left`,
/// `conversation_updated`, `read`), as `docs/socket-protocol.md` shows it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ConversationFrame<'a> {
    Membership {
        #[serde(rename = "type")]
        kind: &'static str,
        conversation_id: &'a StreamId,
        user_id: &'a UserId,
        actor_id: &'a UserId,
        members: &'a [UserId],
        #[serde(skip_serializing_if = "Option::is_none")]
        title: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    Read {
        #[serde(rename = "type")]
        kind: &'static str,
        conversation_id: &'a StreamId,
        user_id: &'a UserId,
        up_to: Option<&'a MessageId>,
    },
    Reaction {
        #[serde(rename = "type")]
        kind: &'static str,
        conversation_id: &'a StreamId,
        message_id: Option<&'a MessageId>,
        user_id: &'a UserId,
        emoji: Option<&'a str>,
    },
}

/// The frame of a conversation event, deduplicated per socket by its `event_id`.
pub fn conversation_frame(event: &ConversationEvent) -> Frame {
    let frame = match event.kind {
        ConversationEventKind::Read => ConversationFrame::Read {
            kind: event.kind.as_str(),
            conversation_id: &event.conversation_id,
            user_id: &event.user_id,
            up_to: event.up_to.as_ref(),
        },
        kind if kind.is_reaction() => ConversationFrame::Reaction {
            kind: kind.as_str(),
            conversation_id: &event.conversation_id,
            message_id: event.message_id.as_ref(),
            user_id: &event.user_id,
            emoji: event.emoji.as_deref(),
        },
        _ => ConversationFrame::Membership {
            kind: event.kind.as_str(),
            conversation_id: &event.conversation_id,
            user_id: &event.user_id,
            actor_id: &event.actor_id,
            members: &event.members,
            title: event.title.as_deref(),
            reason: event.reason.as_deref(),
        },
    };
    // Serializing these plain structs cannot fail.
    let text = Utf8Bytes::from(serde_json::to_string(&frame).unwrap_or_default());
    Frame::event(EventId::from(event.event_id.as_str()), text)
}

/// Whether a socket registered with `audience` may see a conversation event: in a
/// group, the sockets of the members after the change and of its subject (a member
/// who just left gets their `member_left`); in a pair conversation, the sockets of
/// exactly that pair (both users, all their devices). Broadcasts use
/// [`Viewers::of_event`]; this per-socket form is what it is tested against.
#[cfg(test)]
pub fn may_see_event(event: &ConversationEvent, audience: &str) -> bool {
    match event.conversation_id.kind() {
        ConversationKind::Group => event.audience().iter().any(|user| user.as_str() == audience),
        ConversationKind::Pair | ConversationKind::LegacyPair => match event.members.as_slice() {
            [a, b] => pair_audience(a, b) == audience,
            _ => false,
        },
    }
}

/// Close 4004 (removed): the user is no longer a member; do not reconnect, refresh
/// the conversation list. It follows the `member_left` frame that says so.
pub fn removed() -> Close {
    Close::new(close_code::REMOVED, "you are no longer a member of this conversation")
}

/// Why a socket is told to resync (the `reason` of the `resync` frame).
pub mod resync_reason {
    /// The change handler gave up delivering an event to this stream (failover).
    pub const STREAM_CLOSED: &str = "stream_closed";
    /// The history to replay after `since` could not be read.
    pub const HISTORY_UNAVAILABLE: &str = "history_unavailable";
    /// More than `HISTORY_REPLAY_LIMIT` messages follow `since`.
    pub const TOO_FAR_BEHIND: &str = "too_far_behind";
    /// The proxy's ring now sends this stream to another pod (scale-out): reconnect
    /// with `since` and the new pod replays what this socket missed.
    pub const STREAM_MOVED: &str = "stream_moved";
}

/// Close 4000 preceded by a `resync` frame: fetch history since the last message
/// seen, then reconnect with `since`.
pub fn resync(reason: &str) -> Close {
    Close::new(close_code::RESYNC, reason).with_farewell(ServerFrame::Resync { reason }.to_text())
}

#[cfg(test)]
mod tests {
    use chatstream::{MessageContent, MessageId, StreamId, UserId};
    use serde_json::{json, Value};

    use super::*;

    fn message(content: &str) -> ChatMessage {
        let alice = UserId::parse("alice").expect("valid");
        let bob = UserId::parse("bob").expect("valid");
        let value = json!({
            "message_id": MessageId::new(),
            "stream_id": StreamId::for_pair(&alice, &bob),
            "sender_id": alice,
            "receiver_id": bob,
            "content": MessageContent::parse(content).expect("valid"),
            "created_at": "2024-05-01T12:00:00Z",
        });
        serde_json::from_value(value).expect("valid message")
    }

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("frames are JSON")
    }

    #[test]
    fn event_frames_have_a_type_and_the_message() {
        let m = message("hi");
        let frame = event_frame(EventKind::Message, &m, None);
        let value = parse(frame.text());
        assert_eq!(value["type"], "message");
        assert_eq!(value["message"]["message_id"], m.message_id.to_string());
        assert_eq!(value["message"]["content"], "hi");
        assert_eq!(frame.event_id().map(EventId::as_str), Some(m.message_id.to_string().as_str()));
        assert_eq!(parse(event_frame(EventKind::MessageUpdated, &m, None).text())["type"], "message_updated");
        assert_eq!(parse(event_frame(EventKind::MessageDeleted, &m, None).text())["type"], "message_deleted");
    }

    #[test]
    fn event_ids_tell_creates_edits_and_deletes_apart() {
        let m = message("first");
        let mut edited = m.clone();
        edited.content = MessageContent::parse("second").expect("valid");
        let create = event_id(EventKind::Message, &m, Some("ignored-for-creates"));
        assert_eq!(create.as_str(), m.message_id.to_string());
        let edit_one = event_id(EventKind::MessageUpdated, &m, None);
        let edit_two = event_id(EventKind::MessageUpdated, &edited, None);
        assert_ne!(edit_one, edit_two);
        assert_ne!(create, edit_one);
        assert_eq!(edit_one, event_id(EventKind::MessageUpdated, &m, None), "a retry has the same id");
        assert_eq!(event_id(EventKind::MessageUpdated, &m, Some("x.u17")).as_str(), "x.u17");
        assert_ne!(event_id(EventKind::MessageDeleted, &m, None), create);
    }

    #[test]
    fn client_pings_get_pongs_and_anything_else_an_error_frame() {
        let ignore = |_: TypingState| {};
        let pong = answer_client(Inbound::Text(r#"{"type":"ping"}"#), ignore).expect("reply");
        assert_eq!(parse(pong.as_str()), json!({"type": "pong"}));
        for bad in [r#"{"type":"message","content":"hi"}"#, "not json", "{}"] {
            let reply = answer_client(Inbound::Text(bad), ignore).expect("reply");
            let value = parse(reply.as_str());
            assert_eq!(value["type"], "error", "{bad}");
            assert_eq!(value["error"]["code"], "unsupported_frame");
        }
        let reply = answer_client(Inbound::Binary(b"\x00\x01"), ignore).expect("reply");
        assert_eq!(parse(reply.as_str())["type"], "error");
        let mut typed = Vec::new();
        assert!(answer_client(Inbound::Text(r#"{"type":"typing","state":"start"}"#), |s| typed.push(s)).is_none());
        assert!(answer_client(Inbound::Text(r#"{"type":"typing","state":"stop"}"#), |s| typed.push(s)).is_none());
        assert_eq!(typed, [TypingState::Start, TypingState::Stop]);
        let bad = answer_client(Inbound::Text(r#"{"type":"typing","state":"maybe"}"#), ignore).expect("reply");
        assert_eq!(parse(bad.as_str())["error"]["code"], "unsupported_frame");
    }

    fn conversation_event(kind: ConversationEventKind, conversation: StreamId) -> ConversationEvent {
        let user = |raw: &str| UserId::parse(raw).expect("valid");
        ConversationEvent {
            event_id: MessageId::new().to_string(),
            kind,
            conversation_id: conversation,
            user_id: user("carol"),
            actor_id: user("alice"),
            members: vec![user("alice"), user("bob")],
            title: Some("team".into()),
            up_to: None,
            reason: (kind == ConversationEventKind::MemberLeft).then(|| "removed".to_owned()),
            message_id: None,
            emoji: None,
            at: "2025-01-01T12:00:00Z".parse().expect("time"),
        }
    }

    #[test]
    fn conversation_frames_carry_the_documented_fields_and_their_event_id() {
        let event = conversation_event(ConversationEventKind::MemberLeft, StreamId::new_group());
        let frame = conversation_frame(&event);
        assert_eq!(frame.event_id().map(EventId::as_str), Some(event.event_id.as_str()));
        assert_eq!(
            parse(frame.text()),
            json!({"type": "member_left", "conversation_id": event.conversation_id, "user_id": "carol",
                "actor_id": "alice", "members": ["alice", "bob"], "title": "team", "reason": "removed"})
        );
        let up_to = MessageId::new();
        let read = ConversationEvent {
            kind: ConversationEventKind::Read,
            up_to: Some(up_to),
            ..conversation_event(ConversationEventKind::Read, event.conversation_id)
        };
        assert_eq!(
            parse(conversation_frame(&read).text()),
            json!({"type": "read", "conversation_id": event.conversation_id, "user_id": "carol", "up_to": up_to})
        );
    }

    #[test]
    fn viewers_admit_exactly_whom_may_see_admits() {
        let group = conversation_event(ConversationEventKind::MemberLeft, StreamId::new_group());
        let (alice, bob) = (UserId::parse("alice").expect("valid"), UserId::parse("bob").expect("valid"));
        let pair = ConversationEvent {
            user_id: alice.clone(),
            ..conversation_event(ConversationEventKind::Read, StreamId::for_pair(&alice, &bob))
        };
        let odd_pair = ConversationEvent { members: vec![alice.clone()], ..pair.clone() };
        let audiences =
            ["alice", "bob", "carol", "mallory", "", "alice bob", "bob alice", "alice carol", "alice alice"];
        for event in [&group, &pair, &odd_pair] {
            let viewers = Viewers::of_event(event);
            for who in audiences {
                assert_eq!(viewers.admit(who), may_see_event(event, who), "{who} of {:?}", event.members);
            }
        }
        let mut message = message("hi");
        for pair_message in [false, true] {
            if !pair_message {
                message.receiver_id = None;
                message.recipients = vec![bob.clone(), UserId::parse("carol").expect("valid")];
                message.stream_id = StreamId::new_group();
            } else {
                message.receiver_id = Some(bob.clone());
                message.recipients.clear();
                message.stream_id = StreamId::for_pair(&alice, &bob);
            }
            let viewers = Viewers::of_message(&message);
            for who in audiences {
                assert_eq!(viewers.admit(who), may_see(&message, who), "{who}, pair: {pair_message}");
            }
        }
    }

    #[test]
    fn conversation_events_reach_members_and_the_subject_or_exactly_the_pair() {
        let group = conversation_event(ConversationEventKind::MemberLeft, StreamId::new_group());
        for who in ["alice", "bob", "carol"] {
            assert!(may_see_event(&group, who), "{who}");
        }
        assert!(!may_see_event(&group, "mallory"));
        let (alice, bob) = (UserId::parse("alice").expect("valid"), UserId::parse("bob").expect("valid"));
        let pair = ConversationEvent {
            user_id: alice.clone(),
            ..conversation_event(ConversationEventKind::Read, StreamId::for_pair(&alice, &bob))
        };
        assert!(may_see_event(&pair, &pair_audience(&bob, &alice)));
        assert!(!may_see_event(&pair, "alice"), "a pair socket's audience is the pair");
        assert!(!may_see_event(&pair, &pair_audience(&alice, &UserId::parse("carol").expect("valid"))));
        assert_eq!(removed().code, 4004);
    }

    #[test]
    fn resync_closes_with_4000_after_a_resync_frame() {
        let close = resync(resync_reason::STREAM_CLOSED);
        assert_eq!(close.code, 4000);
        let farewell = close.farewell.expect("a resync frame");
        assert_eq!(parse(farewell.as_str()), json!({"type": "resync", "reason": "stream_closed"}));
    }
}
