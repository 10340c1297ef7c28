//! Errors of the event store.
//!
//! Why this module exists: most operations fail *open* and never return an error (an
//! unreachable Redis must not stop consumption), but construction can fail on bad
//! settings, and the few query-style operations ([`crate::RedisEventStore::is_done`])
//! let the caller decide. One error type names both kinds of problem.

use std::time::Duration;

/// Why the event store could not be built or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    /// The `REDIS_URL` could not be parsed (the URL itself is not repeated, it may
    /// hold a password).
    #[error("invalid REDIS_URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// A setting has a value the store cannot work with.
    #[error("invalid event store setting {name}: {message}")]
    InvalidSetting { name: &'static str, message: String },
    /// Redis did not answer within the configured per-operation timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A script answered something the protocol does not know.
    #[error("unexpected reply from redis: {0}")]
    UnexpectedReply(String),
}
