//! The chat message model every service shares, and its validated content.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{ConversationKind, MessageId, StreamId, UserId};

/// The most characters (Unicode scalar values) a message may hold after trimming.
pub const MAX_CONTENT_CHARS: usize = 4000;

/// Why message content was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("content must not be empty")]
    Empty,
    #[error("content must be at most {MAX_CONTENT_CHARS} characters, got {0}")]
    TooLong(usize),
    #[error("content must not contain control characters other than newline and tab (found U+{0:04X})")]
    ControlCharacter(u32),
}

/// Message text: 1 to [`MAX_CONTENT_CHARS`] characters once leading and trailing
/// white space is trimmed, with no control characters other than newline and tab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MessageContent(String);

impl MessageContent {
    pub fn parse(raw: &str) -> Result<Self, ContentError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(ContentError::Empty);
        }
        let len = trimmed.chars().count();
        if len > MAX_CONTENT_CHARS {
            return Err(ContentError::TooLong(len));
        }
        if let Some(c) = trimmed.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return Err(ContentError::ControlCharacter(u32::from(c)));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The content of a deleted message: nothing.
    pub fn removed() -> Self {
        Self(String::new())
    }

    pub fn is_removed(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    /// Stored and forwarded messages: an empty content is a deleted message's
    /// (see [`ChatMessage::check_consistent`]); anything else must be valid.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        if raw.is_empty() {
            return Ok(Self::removed());
        }
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A stored chat message, as the API returns it and as change events carry it.
///
/// A message of a pair conversation names its `receiver_id`; a message of a group
/// has none and carries `recipients`: the members other than the sender when it
/// was accepted (who gets notified; a later member reads it from history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub message_id: MessageId,
    pub stream_id: StreamId,
    pub sender_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver_id: Option<UserId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<UserId>,
    pub content: MessageContent,
    pub created_at: DateTime<Utc>,
    /// Edits, deletion and reactions (all absent on a new message).
    #[serde(flatten)]
    pub state: MessageState,
}

/// What happened to a message after it was sent. Equality ignores `trace`: it is
/// transport metadata (which request posted it), not part of the message.
#[derive(Debug, Clone, Eq, Default, Serialize, Deserialize)]
pub struct MessageState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<DateTime<Utc>>,
    /// Set on a deleted message (a tombstone: its content is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
    /// Reaction counts by emoji.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, u32>,
    /// How many times the message changed (edits and the deletion): each change
    /// event is deduplicated under its own version.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
    /// The W3C `traceparent` of the request that posted the message, stored with it
    /// so the relay (or Debezium, as a record header) carries the trace on. Read
    /// from documents and change events; never written into API answers or frames.
    #[serde(default, skip_serializing)]
    pub trace: Option<String>,
}

impl PartialEq for MessageState {
    fn eq(&self, other: &Self) -> bool {
        self.edited_at == other.edited_at
            && self.deleted_at == other.deleted_at
            && self.reactions == other.reactions
            && self.version == other.version
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ChatMessage {
    /// Whether the message's fields agree with its conversation id: a pair id is the
    /// hash of sender and receiver (in the id's own format) and has no recipients
    /// list; a group message has no receiver. A consistency check, not authorization.
    pub fn check_consistent(&self) -> Result<(), String> {
        if self.content.is_removed() != self.state.deleted_at.is_some() {
            return Err("only a deleted message has no content".into());
        }
        match (self.stream_id.kind(), &self.receiver_id) {
            (ConversationKind::Group, None) => Ok(()),
            (ConversationKind::Group, Some(_)) => Err("a group message has no receiver_id".into()),
            (_, None) => Err("a pair conversation's message needs receiver_id".into()),
            (_, Some(receiver))
                if !self.recipients.is_empty() || !self.stream_id.is_pair_of(&self.sender_id, receiver) =>
            {
                Err(format!("stream_id {} does not belong to {} and {}", self.stream_id, self.sender_id, receiver))
            }
            _ => Ok(()),
        }
    }

    /// Who the message is addressed to (not the sender): the receiver, or the
    /// group's recipients.
    pub fn addressees(&self) -> impl Iterator<Item = &UserId> {
        self.receiver_id.iter().chain(self.recipients.iter())
    }

    /// Whether `user` took part in the message (sent it or is addressed by it).
    pub fn involves(&self, user: &UserId) -> bool {
        &self.sender_id == user || self.addressees().any(|u| u == user)
    }
}

/// How a message document stores its `recipients` (in MongoDB, and so in the
/// change records captured from it): one string of user ids separated by single
/// spaces (a user id never contains a space). A 1,000-member group's message would
/// otherwise carry an array of 999 strings through the database and every hop, and
/// a document store handles an array element by element (the local stand-in spent
/// about 1.7 ms of its one thread per group message on them; one string is a copy).
/// Reading accepts the array form as well (documents written before this form, or
/// by another writer). The API and socket frames keep the array (`ChatMessage`).
pub mod stored_recipients {
    use serde::{Deserialize, Deserializer, Serializer};

    /// The stored form of `ids`.
    pub fn join<S: AsRef<str>>(ids: &[S]) -> String {
        let mut joined = String::with_capacity(ids.iter().map(|id| id.as_ref().len() + 1).sum());
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                joined.push(' ');
            }
            joined.push_str(id.as_ref());
        }
        joined
    }

    /// The ids of a stored form (empty parts, from doubled spaces, are skipped).
    pub fn split(stored: &str) -> impl Iterator<Item = &str> {
        stored.split(' ').filter(|part| !part.is_empty())
    }

    pub fn serialize<S: Serializer>(ids: &[String], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&join(ids))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Joined(String),
            List(Vec<String>),
        }
        Ok(match Stored::deserialize(deserializer)? {
            Stored::Joined(joined) => split(&joined).map(str::to_owned).collect(),
            Stored::List(list) => list,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_trimmed_and_bounded() {
        assert_eq!(MessageContent::parse("  hi\n").map(|c| c.0), Ok("hi".to_owned()));
        assert_eq!(MessageContent::parse(" \n\t "), Err(ContentError::Empty));
        assert!(MessageContent::parse(&"é".repeat(MAX_CONTENT_CHARS)).is_ok());
        assert_eq!(
            MessageContent::parse(&"x".repeat(MAX_CONTENT_CHARS + 1)),
            Err(ContentError::TooLong(MAX_CONTENT_CHARS + 1))
        );
    }

    #[test]
    fn content_rejects_control_characters_but_keeps_newlines_and_tabs() {
        assert!(MessageContent::parse("line one\n\tline two").is_ok());
        assert_eq!(MessageContent::parse("bell\u{7}"), Err(ContentError::ControlCharacter(7)));
        assert_eq!(MessageContent::parse("a\u{0}b"), Err(ContentError::ControlCharacter(0)));
        assert_eq!(MessageContent::parse("a\rb"), Err(ContentError::ControlCharacter(13)));
    }

    #[test]
    fn chat_message_round_trips_through_json() {
        let alice = UserId::parse("alice").expect("valid");
        let bob = UserId::parse("bob").expect("valid");
        let message = ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&alice, &bob),
            sender_id: alice,
            receiver_id: Some(bob),
            recipients: Vec::new(),
            content: MessageContent::parse("<b>hello</b>").expect("valid"),
            created_at: Utc::now(),
            state: Default::default(),
        };
        let json = serde_json::to_string(&message).expect("serialize");
        let back: ChatMessage = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, message);
        assert!(!json.contains("recipients"), "{json}");
        assert!(message.check_consistent().is_ok());
    }

    #[test]
    fn group_and_pair_messages_are_checked_for_consistency() {
        let user = |raw: &str| UserId::parse(raw).expect("valid");
        let pair = ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&user("alice"), &user("bob")),
            sender_id: user("alice"),
            receiver_id: Some(user("bob")),
            recipients: Vec::new(),
            content: MessageContent::parse("x").expect("valid"),
            created_at: Utc::now(),
            state: Default::default(),
        };
        assert!(pair.check_consistent().is_ok());
        assert!(pair.involves(&user("bob")) && !pair.involves(&user("carol")));
        let forged = ChatMessage { receiver_id: Some(user("carol")), ..pair.clone() };
        assert!(forged.check_consistent().is_err());
        let group = ChatMessage {
            stream_id: StreamId::new_group(),
            receiver_id: None,
            recipients: vec![user("bob"), user("carol")],
            ..pair.clone()
        };
        assert!(group.check_consistent().is_ok());
        assert_eq!(group.addressees().count(), 2);
        assert!(group.involves(&user("carol")));
        let json = serde_json::to_value(&group).expect("serialize");
        assert!(json.get("receiver_id").is_none(), "{json}");
        assert!(ChatMessage { receiver_id: Some(user("bob")), ..group }.check_consistent().is_err());
        assert!(ChatMessage { receiver_id: None, ..pair }.check_consistent().is_err());
    }

    #[test]
    fn stored_recipients_are_one_string_and_read_back_from_either_form() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Doc {
            #[serde(with = "stored_recipients")]
            recipients: Vec<String>,
        }
        let doc = Doc { recipients: vec!["bob".into(), "carol".into(), "d.e@f".into()] };
        let json = serde_json::to_value(&doc).expect("serialize");
        assert_eq!(json, serde_json::json!({ "recipients": "bob carol d.e@f" }));
        assert_eq!(serde_json::from_value::<Doc>(json).expect("joined"), doc);
        let list = serde_json::json!({ "recipients": ["bob", "carol", "d.e@f"] });
        assert_eq!(serde_json::from_value::<Doc>(list).expect("array"), doc);
        assert_eq!(stored_recipients::split(" bob  carol ").collect::<Vec<_>>(), ["bob", "carol"]);
        assert_eq!(stored_recipients::join::<&str>(&[]), "");
    }
}
