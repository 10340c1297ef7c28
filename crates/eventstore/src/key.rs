//! Event keys: `eventstore:{prefix}:{first}:{second}`.
//!
//! Why this module exists: every consumer that deduplicates must build the same key for
//! the same event, or two pods would not see each other's markers. The format is the one
//! the original Go services used (`eventstore:chat-cdc:<message_id>:<stream_id>`), so the
//! two can share a Redis during a migration.
//!
//! The two parts are plain strings so other event kinds can use the store too (a
//! purchase id and a user id, or a stream id alone for per-stream deduplication). A part
//! that itself contains `:` or `%` has those characters percent-encoded (`%3A`, `%25`):
//! otherwise `("a:b", "c")` and `("a", "b:c")` would be the same key and one event would
//! silently be dropped as a duplicate of the other. Message ids and stream ids never
//! contain either character, so their keys are exactly the documented format.

use std::borrow::Cow;
use std::fmt;

use chatstream::{MessageId, StreamId};

/// The Redis key of one event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey(String);

impl EventKey {
    /// The first segment of every key, so the store's keys are easy to find and to
    /// tell apart from anything else in the same Redis.
    pub const NAMESPACE: &'static str = "eventstore";

    /// `eventstore:{prefix}:{first}:{second}`; `first` and `second` are escaped as
    /// described in the module documentation, `prefix` is used as is.
    pub fn new(prefix: &str, first: &str, second: &str) -> Self {
        Self(format!("{}:{prefix}:{}:{}", Self::NAMESPACE, escape(first), escape(second)))
    }

    /// The key of a chat message event: `eventstore:{prefix}:{message_id}:{stream_id}`.
    pub fn for_message(prefix: &str, message_id: &MessageId, stream_id: &StreamId) -> Self {
        Self::new(prefix, &message_id.to_string(), stream_id.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for EventKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Percent-encodes `%` and `:` so a part can never be mistaken for a separator.
fn escape(part: &str) -> Cow<'_, str> {
    if !part.contains([':', '%']) {
        return Cow::Borrowed(part);
    }
    let mut out = String::with_capacity(part.len() + 8);
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_have_the_documented_format() {
        let message_id = MessageId::parse("0192f1a4-7b3c-7d2e-8f10-1a2b3c4d5e6f").expect("valid id");
        let stream_id = StreamId::parse("a83ab2505ace9a87").expect("valid id");
        let key = EventKey::for_message("chat-cdc", &message_id, &stream_id);
        assert_eq!(key.as_str(), "eventstore:chat-cdc:0192f1a4-7b3c-7d2e-8f10-1a2b3c4d5e6f:a83ab2505ace9a87");
        assert_eq!(key.to_string(), key.as_str());
    }

    #[test]
    fn plain_parts_are_used_verbatim() {
        assert_eq!(
            EventKey::new("email-events", "purchase-42", "user_7").as_str(),
            "eventstore:email-events:purchase-42:user_7"
        );
        assert_eq!(EventKey::new("p", "", "").as_str(), "eventstore:p::");
    }

    #[test]
    fn separators_inside_parts_cannot_collide() {
        let a = EventKey::new("p", "a:b", "c");
        let b = EventKey::new("p", "a", "b:c");
        assert_ne!(a, b);
        assert_eq!(a.as_str(), "eventstore:p:a%3Ab:c");
        assert_eq!(b.as_str(), "eventstore:p:a:b%3Ac");
        // An escaped-looking part cannot collide with an escaped one either.
        assert_ne!(EventKey::new("p", "a%3Ab", "c"), a);
        assert_eq!(EventKey::new("p", "100%", "x").as_str(), "eventstore:p:100%25:x");
    }
}
