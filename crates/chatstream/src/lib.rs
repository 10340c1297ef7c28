//! Chat domain types shared by every chatfleet service.
//!
//! Why this crate exists: the stream id is the routing key of the whole fleet. The
//! frontend computes it, Kafka partitions by it, the L7 proxy hashes on it and the
//! WebSocket pods group connections by it. If two services computed it differently,
//! messages would silently go to the wrong pod, so it is computed in exactly one place.
//!
//! The identifiers are newtypes that *parse* rather than validate: once you hold a
//! [`UserId`], [`StreamId`] or [`MessageId`] it is known to be well formed, and code
//! further down never has to check again.

pub mod conversation;
pub mod domain;
mod event;
mod ids;
mod message;

pub use conversation::{ChatChange, ConversationEvent, ConversationEventKind, CONVERSATION_EVENTS_COLLECTION};
pub use event::{ChangeEvent, ChangeOp, ChangeRecord, EventError};
pub use ids::{ConversationKind, IdError, IdSettings, MessageId, StreamId, StreamIdFormat, UserId};
pub use message::{stored_recipients, ChatMessage, ContentError, MessageContent, MessageState, MAX_CONTENT_CHARS};
