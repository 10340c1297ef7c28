//! Identifier newtypes: [`UserId`], [`StreamId`] (with its [`ConversationKind`] and
//! pair [`StreamIdFormat`]) and [`MessageId`].

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
    #[error(
        "stream id must be 32 lowercase hexadecimal characters (a pair), 16 (a legacy pair) or g and 32 (a group)"
    )]
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

impl AsRef<str> for UserId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How pair conversation ids are computed for new messages and subscriptions
/// (`STREAM_ID_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamIdFormat {
    /// 32 hex characters (128 bits) of SHA-256 over the length-prefixed sorted pair.
    /// Two different pairs cannot produce the same input, so only a SHA-256
    /// collision could make two conversations share an id.
    #[default]
    V2,
    /// The seed's format: 16 hex characters of SHA-256 over the two sorted ids
    /// concatenated with no separator. **Collision-prone**: `("a", "bc")` and
    /// `("ab", "c")` hash the same bytes. Only for frontends that still compute it;
    /// authorization never rests on it (see `docs/security.md`).
    Legacy,
}

/// The identity settings every service that computes pair ids shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdSettings {
    /// `STREAM_ID_FORMAT`: `v2` (default) or `legacy` (collision-prone, for
    /// frontends that still compute the seed's ids). All services must agree.
    pub stream_id_format: StreamIdFormat,
}

impl IdSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[("STREAM_ID_FORMAT", "stream_id_format")];
}

/// What kind of conversation a [`StreamId`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversationKind {
    /// Two users, id in the [`StreamIdFormat::V2`] format.
    Pair,
    /// Two users, id in the collision-prone [`StreamIdFormat::Legacy`] format.
    LegacyPair,
    /// A group conversation: `g` followed by 32 hex characters, minted by the
    /// server, never derived from its members.
    Group,
}

/// The identifier of a conversation: the key of its messages, its Kafka records,
/// its sockets and the proxies' hash routing.
///
/// Three shapes travel in the same field (`stream_id`), told apart by their form:
/// - a pair in the default format: 32 lowercase hex characters
///   ([`StreamId::for_pair`]);
/// - a pair in the seed's legacy format: 16 lowercase hex characters;
/// - a group: `g` and 32 lowercase hex characters ([`StreamId::new_group`]).
///
/// An id names a conversation; it proves nothing about who is in it. Every door
/// checks the caller against the stored data (the message's sender and receiver,
/// the group's members), never against the id or a hash alone.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    len: u8,
    bytes: [u8; StreamId::MAX_LEN],
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({})", self.as_str())
    }
}

impl StreamId {
    /// Hex characters of a pair id in the default format.
    pub const PAIR_LEN: usize = 32;
    /// Hex characters of a pair id in the legacy format.
    pub const LEGACY_LEN: usize = 16;
    /// The prefix of group ids.
    pub const GROUP_PREFIX: u8 = b'g';
    /// The longest id (a group id).
    pub const MAX_LEN: usize = 33;

    fn from_ascii(ascii: &[u8]) -> Self {
        let mut bytes = [0u8; Self::MAX_LEN];
        bytes[..ascii.len()].copy_from_slice(ascii);
        Self { len: ascii.len() as u8, bytes }
    }

    /// The conversation of `a` and `b` in the default format (argument order never matters).
    pub fn for_pair(a: &UserId, b: &UserId) -> Self {
        Self::for_pair_as(StreamIdFormat::V2, a, b)
    }

    /// The conversation of `a` and `b` in `format` (argument order never matters).
    pub fn for_pair_as(format: StreamIdFormat, a: &UserId, b: &UserId) -> Self {
        let (first, second) = if a.as_str() <= b.as_str() { (a, b) } else { (b, a) };
        let mut hasher = Sha256::new();
        let len = match format {
            StreamIdFormat::V2 => {
                for id in [first, second] {
                    // User ids are at most 128 characters: the length always fits.
                    hasher.update((id.as_str().len() as u32).to_be_bytes());
                    hasher.update(id.as_str().as_bytes());
                }
                Self::PAIR_LEN
            }
            StreamIdFormat::Legacy => {
                hasher.update(first.as_str().as_bytes());
                hasher.update(second.as_str().as_bytes());
                Self::LEGACY_LEN
            }
        };
        let digest = hasher.finalize();
        Self::from_ascii(hex::encode(&digest[..len / 2]).as_bytes())
    }

    /// A fresh group conversation id (122 random bits).
    pub fn new_group() -> Self {
        let mut ascii = [0u8; Self::MAX_LEN];
        ascii[0] = Self::GROUP_PREFIX;
        ascii[1..].copy_from_slice(uuid::Uuid::new_v4().simple().to_string().as_bytes());
        Self::from_ascii(&ascii)
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let bytes = raw.as_bytes();
        let hex = |b: &[u8]| b.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let valid = match bytes.len() {
            Self::PAIR_LEN | Self::LEGACY_LEN => hex(bytes),
            Self::MAX_LEN => bytes[0] == Self::GROUP_PREFIX && hex(&bytes[1..]),
            _ => false,
        };
        if !valid {
            return Err(IdError::StreamIdFormat);
        }
        Ok(Self::from_ascii(bytes))
    }

    /// What kind of conversation this id names (from its form).
    pub fn kind(&self) -> ConversationKind {
        match self.len as usize {
            Self::LEGACY_LEN => ConversationKind::LegacyPair,
            Self::PAIR_LEN => ConversationKind::Pair,
            _ => ConversationKind::Group,
        }
    }

    /// The pair format this id is in (`None` for a group).
    pub fn pair_format(&self) -> Option<StreamIdFormat> {
        match self.kind() {
            ConversationKind::Pair => Some(StreamIdFormat::V2),
            ConversationKind::LegacyPair => Some(StreamIdFormat::Legacy),
            ConversationKind::Group => None,
        }
    }

    /// Whether this id is what the conversation of `a` and `b` (in either order)
    /// hashes to in this id's own format. A consistency check only: under the legacy
    /// format other pairs hash to the same id, so it never authorizes anyone.
    pub fn is_pair_of(&self, a: &UserId, b: &UserId) -> bool {
        self.pair_format().is_some_and(|format| Self::for_pair_as(format, a, b) == *self)
    }

    /// Bytes of the id that are uniformly distributed (the hex digest), for striping.
    pub fn digest_hex(&self) -> &str {
        let s = self.as_str();
        s.strip_prefix('g').unwrap_or(s)
    }

    pub fn as_str(&self) -> &str {
        // The bytes are checked ASCII at construction.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
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
    fn legacy_stream_id_matches_the_seed_vectors() {
        let legacy = |a: &str, b: &str| StreamId::for_pair_as(StreamIdFormat::Legacy, &user(a), &user(b));
        assert_eq!(legacy("user123", "user456").as_str(), "7b28e95659ec2171");
        assert_eq!(legacy("alice", "bob").as_str(), "a83ab2505ace9a87");
        assert_eq!(legacy("alice", "bob").kind(), ConversationKind::LegacyPair);
    }

    #[test]
    fn v2_stream_id_is_128_bits_of_the_length_prefixed_pair() {
        let id = StreamId::for_pair(&user("alice"), &user("bob"));
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(id.kind(), ConversationKind::Pair);
        // SHA-256 of 00000005 "alice" 00000003 "bob", first 16 bytes.
        let mut input = Vec::new();
        input.extend_from_slice(&5u32.to_be_bytes());
        input.extend_from_slice(b"alice");
        input.extend_from_slice(&3u32.to_be_bytes());
        input.extend_from_slice(b"bob");
        assert_eq!(id.as_str(), &hex::encode(Sha256::digest(&input))[..32]);
    }

    #[test]
    fn legacy_format_collides_and_v2_does_not() {
        // The report: ("u4a888c", "zz4a888c") and ("u4a888cz", "z4a888c").
        let (a, b, c, d) = (user("u4a888c"), user("zz4a888c"), user("u4a888cz"), user("z4a888c"));
        let legacy = |x: &UserId, y: &UserId| StreamId::for_pair_as(StreamIdFormat::Legacy, x, y);
        assert_eq!(legacy(&a, &b), legacy(&c, &d), "the seed's format collides");
        assert!(legacy(&a, &b).is_pair_of(&c, &d), "so the consistency check cannot tell them apart");
        assert_ne!(StreamId::for_pair(&a, &b), StreamId::for_pair(&c, &d));
        assert!(!StreamId::for_pair(&a, &b).is_pair_of(&c, &d));
        assert_ne!(StreamId::for_pair(&user("a"), &user("bc")), StreamId::for_pair(&user("ab"), &user("c")));
    }

    #[test]
    fn stream_id_is_symmetric() {
        for (a, b) in [("alice", "bob"), ("user123", "user456"), ("Z", "a"), ("a", "a.b")] {
            for format in [StreamIdFormat::V2, StreamIdFormat::Legacy] {
                assert_eq!(
                    StreamId::for_pair_as(format, &user(a), &user(b)),
                    StreamId::for_pair_as(format, &user(b), &user(a))
                );
            }
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
    fn group_ids_are_a_variant_and_never_a_pair() {
        let group = StreamId::new_group();
        assert_eq!(group.kind(), ConversationKind::Group);
        assert_eq!(group.as_str().len(), 33);
        assert!(group.as_str().starts_with('g'));
        assert_eq!(StreamId::parse(group.as_str()), Ok(group));
        assert_eq!(group.digest_hex().len(), 32);
        assert!(!group.is_pair_of(&user("alice"), &user("bob")));
        assert_ne!(StreamId::new_group(), group);
    }

    #[test]
    fn stream_id_parse_rejects_bad_input() {
        assert!(StreamId::parse("a83ab2505ace9a87").is_ok());
        assert!(StreamId::parse(&"0123456789abcdef".repeat(2)).is_ok());
        assert!(StreamId::parse(&format!("g{}", "0123456789abcdef".repeat(2))).is_ok());
        for bad in [
            "",
            "a83ab2505ace9a8",
            "a83ab2505ace9a877",
            "A83AB2505ACE9A87",
            "g83ab2505ace9a87",
            "a83ab2505ace9a8 ",
            &format!("h{}", "0".repeat(32)),
            &format!("g{}", "0".repeat(31)),
            &"0".repeat(33),
            &"0".repeat(64),
        ] {
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
        let format: StreamIdFormat = serde_json::from_str("\"legacy\"").expect("valid");
        assert_eq!(format, StreamIdFormat::Legacy);
    }
}
