//! Conversation events: membership changes, title changes and read markers, as
//! they travel from MongoDB through capture and Kafka to the sockets.
//!
//! Why this module exists: a group's membership and a reader's marker are changes
//! like any message, and must reach the right sockets with the same guarantees
//! (nothing lost, nothing shown twice, in order with the conversation's messages).
//! chatpersistence appends one document per change to the `conversation_events`
//! collection; capture (the outbox relay, or Debezium) publishes it to
//! `chat.changes` keyed by the conversation id, so it shares a partition, and an
//! order, with that conversation's messages. Every consumer reads it with
//! [`ChatChange::parse`], which tells it apart from a message document.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::{ChangeEvent, ChangeOp, ChangeRecord, EventError};
use crate::{MessageId, StreamId, UserId};

/// The MongoDB collection conversation events are appended to.
pub const CONVERSATION_EVENTS_COLLECTION: &str = "conversation_events";

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationEventKind {
    /// `user_id` became a member (a group's creation emits one per initial member).
    MemberJoined,
    /// `user_id` left or was removed (`reason`); their sockets on the conversation close.
    MemberLeft,
    /// The title (or another shared property) changed.
    ConversationUpdated,
    /// `user_id` moved their read marker to `up_to`.
    Read,
    /// `user_id` reacted to `message_id` with `emoji`.
    ReactionAdded,
    /// `user_id` took back their `emoji` reaction to `message_id`.
    ReactionRemoved,
}

impl ConversationEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationEventKind::MemberJoined => "member_joined",
            ConversationEventKind::MemberLeft => "member_left",
            ConversationEventKind::ConversationUpdated => "conversation_updated",
            ConversationEventKind::Read => "read",
            ConversationEventKind::ReactionAdded => "reaction_added",
            ConversationEventKind::ReactionRemoved => "reaction_removed",
        }
    }

    /// Reaction events.
    pub fn is_reaction(self) -> bool {
        matches!(self, ConversationEventKind::ReactionAdded | ConversationEventKind::ReactionRemoved)
    }
}

/// One change to a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationEvent {
    /// A UUIDv7, unique per change (the consumers' dedup id).
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: ConversationEventKind,
    pub conversation_id: StreamId,
    /// Whom the change is about: the member who joined or left, or the reader.
    pub user_id: UserId,
    /// Who made the change (the owner removing someone, the member leaving, ...).
    pub actor_id: UserId,
    /// The members after the change (for a pair conversation: the two users).
    #[serde(default)]
    pub members: Vec<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// `read`: the newest message the reader has seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<MessageId>,
    /// `member_left`: `left` or `removed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Reactions: the message reacted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
    /// Reactions: the emoji.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emoji: Option<String>,
    pub at: DateTime<Utc>,
}

impl ConversationEvent {
    /// Everyone the change concerns: the members after it, and the subject (who may
    /// have just left).
    pub fn audience(&self) -> Vec<UserId> {
        let mut all = self.members.clone();
        if !all.contains(&self.user_id) {
            all.push(self.user_id.clone());
        }
        all
    }

    /// The Kafka record key: the conversation id, like its messages.
    pub fn key(&self) -> String {
        self.conversation_id.to_string()
    }

    /// The flattened (ExtractNewDocumentState) JSON value the relay publishes.
    pub fn to_flattened(&self) -> Value {
        let mut doc = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        doc.insert("_id".into(), Value::String(self.event_id.clone()));
        doc.insert("at".into(), Value::from(self.at.timestamp_millis()));
        doc.insert("__op".into(), Value::String("c".into()));
        doc.insert("__source_ts_ms".into(), Value::from(self.at.timestamp_millis()));
        doc.insert("__deleted".into(), Value::String("false".into()));
        Value::Object(doc)
    }

    fn from_record(record: ChangeRecord) -> Result<Self, EventError> {
        let mut doc = record.plain_document()?;
        if let Some(Value::Number(n)) = doc.get("at") {
            let millis = n.as_i64().unwrap_or(0);
            let at = DateTime::<Utc>::from_timestamp_millis(millis).unwrap_or_else(Utc::now);
            doc.insert("at".into(), Value::String(at.to_rfc3339()));
        }
        if !doc.contains_key("event_id") {
            if let Some(id) = doc.get("_id").cloned() {
                doc.insert("event_id".into(), id);
            }
        }
        doc.remove("_id");
        doc.remove("outbox_pending");
        let event: Self =
            serde_json::from_value(Value::Object(doc)).map_err(|err| EventError::Malformed(err.to_string()))?;
        Ok(event)
    }
}

/// Anything on `chat.changes`: a message change or a conversation event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatChange {
    Message(ChangeEvent),
    Conversation(ConversationEvent),
}

impl ChatChange {
    /// Reads a record value in either the flattened or the raw Debezium form, and
    /// tells a conversation event (it has `event_id`/`type` and no `message_id`)
    /// from a message.
    pub fn parse(payload: &[u8]) -> Result<Self, EventError> {
        let record = ChangeRecord::parse(payload)?;
        // Message documents have `content`; conversation events never do.
        let is_event = record.document.contains_key("type") && !record.document.contains_key("content");
        if is_event {
            if record.op != ChangeOp::Create {
                return Err(EventError::Malformed("conversation events are only ever inserted".into()));
            }
            ConversationEvent::from_record(record).map(ChatChange::Conversation)
        } else {
            ChangeEvent::from_record(record).map(ChatChange::Message)
        }
    }

    /// The conversation the change belongs to (its partition key).
    pub fn conversation_id(&self) -> StreamId {
        match self {
            ChatChange::Message(event) => event.stream_id(),
            ChatChange::Conversation(event) => event.conversation_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    #[test]
    fn a_conversation_event_round_trips_through_the_flattened_form() {
        let event = ConversationEvent {
            event_id: MessageId::new().to_string(),
            kind: ConversationEventKind::MemberLeft,
            conversation_id: StreamId::new_group(),
            user_id: user("carol"),
            actor_id: user("alice"),
            members: vec![user("alice"), user("bob")],
            title: Some("team".into()),
            up_to: None,
            reason: Some("removed".into()),
            message_id: None,
            emoji: None,
            at: DateTime::<Utc>::from_timestamp_millis(1_760_000_000_123).expect("valid"),
        };
        let bytes = serde_json::to_vec(&event.to_flattened()).expect("serialize");
        let Ok(ChatChange::Conversation(back)) = ChatChange::parse(&bytes) else { panic!("a conversation event") };
        assert_eq!(back, event);
        assert_eq!(back.audience(), vec![user("alice"), user("bob"), user("carol")]);
        assert_eq!(ChatChange::Conversation(back).conversation_id(), event.conversation_id);
    }

    #[test]
    fn a_message_record_is_still_a_message() {
        let alice = user("alice");
        let bob = user("bob");
        let message = crate::ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&alice, &bob),
            sender_id: alice,
            receiver_id: Some(bob),
            recipients: Vec::new(),
            content: crate::MessageContent::parse("hi").expect("valid"),
            created_at: DateTime::<Utc>::from_timestamp_millis(1_760_000_000_000).expect("valid"),
            state: Default::default(),
        };
        let change = ChangeEvent::new(ChangeOp::Create, message.clone(), 5);
        let bytes = serde_json::to_vec(&change.to_flattened()).expect("serialize");
        assert_eq!(ChatChange::parse(&bytes), Ok(ChatChange::Message(change)));
    }
}
