//! Identifier newtypes: [`UserId`], [`StreamId`] and [`MessageId`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Why an identifier was rejected. The messages are meant to be shown to API callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("user id must be 1 to {max} characters long, got {len}", max = UserId::MAX_LEN)]
    UserIdLength { len: usize },
    #[error("user id may contain only letters, digits and _ . : @ -; found {found:?}")]
    UserIdCharacter { found: char },
    #[error("stream id must be exactly 16 lowercase hexadecimal characters")]
    StreamIdFormat,
    #[error("message id must be a UUID (version 7), got {0:?}")]
    MessageIdFormat(String),
}

/// A user identifier: 1 to 128 characters of `[A-Za-z0-9_.:@-]`.
///
/// The alphabet is deliberately narrow: ids travel in URLs, Redis keys and Kafka
/// keys, and none of those should need escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let len = raw.chars().count();
        if len == 0 || len > Self::MAX_LEN {
            return Err(IdError::UserIdLength { len });
        }
        if let Some(found) =
            raw.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-')))
        {
            return Err(IdError::UserIdCharacter { found });
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The conversation identifier of two users.
///
/// `StreamId::for_pair(a, b)` is the first 16 lowercase hex characters of SHA-256
/// over the two user ids sorted (byte order) and concatenated with no separator,
/// byte-compatible with the original Go `ComputeStreamID`. The argument order never
/// matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId([u8; 16]);

impl StreamId {
    pub const LEN: usize = 16;

    pub fn for_pair(a: &UserId, b: &UserId) -> Self {
        let (first, second) = if a.as_str() <= b.as_str() { (a, b) } else { (b, a) };
        let mut hasher = Sha256::new();
        hasher.update(first.as_str().as_bytes());
        hasher.update(second.as_str().as_bytes());
        let digest = hasher.finalize();
        let hex = hex::encode(&digest[..Self::LEN / 2]);
        let mut out = [0u8; 16];
        out.copy_from_slice(hex.as_bytes());
        Self(out)
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let bytes = raw.as_bytes();
        if bytes.len() != Self::LEN || !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(IdError::StreamIdFormat);
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(bytes);
        Ok(Self(out))
    }

    /// Whether this stream id is the conversation of `a` and `b` (in either order).
    pub fn is_pair_of(&self, a: &UserId, b: &UserId) -> bool {
        Self::for_pair(a, b) == *self
    }

    pub fn as_str(&self) -> &str {
        // The bytes are checked ASCII hex at construction.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// A message identifier: a UUID version 7, so ids sort by creation time and a
/// `since=<message_id>` cursor is a plain range query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    /// A fresh id for a message created now.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        match uuid::Uuid::try_parse(raw) {
            Ok(id) if id.get_version_num() == 7 => Ok(Self(id)),
            _ => Err(IdError::MessageIdFormat(raw.chars().take(64).collect())),
        }
    }

    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// Milliseconds since the Unix epoch at which the id was minted.
    pub fn timestamp_millis(&self) -> u64 {
        self.0
            .get_timestamp()
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            })
            .unwrap_or(0)
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

macro_rules! string_like {
    ($ty:ident, $display:expr) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let show: fn(&$ty, &mut fmt::Formatter<'_>) -> fmt::Result = $display;
                show(self, f)
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_like!(UserId, |id, f| f.write_str(id.as_str()));
string_like!(StreamId, |id, f| f.write_str(id.as_str()));
string_like!(MessageId, |id, f| fmt::Display::fmt(&id.0.hyphenated(), f));

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid user id")
    }

    #[test]
    fn stream_id_matches_known_vectors() {
        assert_eq!(StreamId::for_pair(&user("user123"), &user("user456")).as_str(), "7b28e95659ec2171");
        assert_eq!(StreamId::for_pair(&user("alice"), &user("bob")).as_str(), "a83ab2505ace9a87");
    }

    #[test]
    fn stream_id_is_symmetric() {
        for (a, b) in [("alice", "bob"), ("user123", "user456"), ("Z", "a"), ("a", "a.b")] {
            assert_eq!(StreamId::for_pair(&user(a), &user(b)), StreamId::for_pair(&user(b), &user(a)));
        }
    }

    #[test]
    fn stream_id_differs_between_pairs() {
        assert_ne!(
            StreamId::for_pair(&user("alice"), &user("bob")),
            StreamId::for_pair(&user("alice"), &user("carol"))
        );
    }

    #[test]
    fn stream_id_parse_rejects_bad_input() {
        assert!(StreamId::parse("a83ab2505ace9a87").is_ok());
        for bad in
            ["", "a83ab2505ace9a8", "a83ab2505ace9a877", "A83AB2505ACE9A87", "g83ab2505ace9a87", "a83ab2505ace9a8 "]
        {
            assert_eq!(StreamId::parse(bad), Err(IdError::StreamIdFormat), "{bad:?}");
        }
    }

    #[test]
    fn user_id_rejects_bad_input() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse("tenant:42_user-7.x").is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::UserIdLength { len: 0 }));
        assert_eq!(UserId::parse(&"x".repeat(129)), Err(IdError::UserIdLength { len: 129 }));
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
        assert_eq!(UserId::parse("al ice"), Err(IdError::UserIdCharacter { found: ' ' }));
        assert_eq!(UserId::parse("bob/../x"), Err(IdError::UserIdCharacter { found: '/' }));
        assert_eq!(UserId::parse("émile"), Err(IdError::UserIdCharacter { found: 'é' }));
    }

    #[test]
    fn message_ids_sort_by_creation() {
        let ids: Vec<MessageId> = (0..200).map(|_| MessageId::new()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        let as_strings: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut sorted_strings = as_strings.clone();
        sorted_strings.sort();
        assert_eq!(as_strings, sorted_strings, "string order must match creation order");
    }

    #[test]
    fn message_id_round_trips_and_rejects_other_versions() {
        let id = MessageId::new();
        assert_eq!(MessageId::parse(&id.to_string()), Ok(id));
        assert!(MessageId::parse("not-a-uuid").is_err());
        // A version 4 UUID is well formed but not time ordered.
        assert!(MessageId::parse("9b2f1c3e-8d4a-4f6b-9c1d-2e3f4a5b6c7d").is_err());
    }

    #[test]
    fn serde_rejects_bad_ids_with_clear_errors() {
        let err = serde_json::from_str::<UserId>("\"a b\"").expect_err("space is not allowed");
        assert!(err.to_string().contains("user id may contain only"), "{err}");
        let ok: StreamId = serde_json::from_str("\"a83ab2505ace9a87\"").expect("valid");
        assert_eq!(serde_json::to_string(&ok).expect("serialize"), "\"a83ab2505ace9a87\"");
    }
}
