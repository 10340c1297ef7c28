//! MongoDB failures, classified once for the whole fleet.
//!
//! Why this crate exists: chatpersistence and emailhandler both turn driver errors
//! into "a unique index refused it" (idempotency), "MongoDB is unreachable, retry
//! later" (503 / retry) and "anything else", and both bound every operation with a
//! timeout. Written twice, the lists of retryable error kinds drifted; here they are
//! one list, and [`StoreError`] is the one error type both stores return.

use std::future::IntoFuture;
use std::time::Duration;

use mongodb::error::{ErrorKind, WriteFailure};

/// MongoDB's duplicate key error code.
pub const DUPLICATE_KEY: i32 = 11000;

/// What a failed store operation means to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A unique index refused the write.
    #[error("duplicate key: {0}")]
    Duplicate(String),
    /// MongoDB cannot be reached, did not answer in time, or could not make a write
    /// durable: retrying later may succeed.
    #[error("MongoDB unavailable: {0}")]
    Unavailable(String),
    /// A stored document does not have the shape the service expects.
    #[error("corrupt document {id}: {reason}")]
    Corrupt { id: String, reason: String },
    /// Anything else the driver or the server reported.
    #[error("MongoDB error: {0}")]
    Other(String),
}

impl From<mongodb::error::Error> for StoreError {
    fn from(err: mongodb::error::Error) -> Self {
        classify(&err)
    }
}

/// Sorts a driver error into duplicate, unavailable or other.
pub fn classify(err: &mongodb::error::Error) -> StoreError {
    let text = err.to_string();
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY => StoreError::Duplicate(text),
        ErrorKind::Command(e) if e.code == DUPLICATE_KEY => StoreError::Duplicate(text),
        ErrorKind::Write(WriteFailure::WriteConcernError(_))
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => StoreError::Unavailable(text),
        _ if err.contains_label("RetryableWriteError") || err.contains_label("NetworkError") => {
            StoreError::Unavailable(text)
        }
        _ => StoreError::Other(text),
    }
}

/// Runs one operation; no answer within `timeout` is [`StoreError::Unavailable`].
pub async fn bounded<T>(
    timeout: Duration,
    operation: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, operation.into_future()).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError::Unavailable(format!("no answer within {timeout:?}"))),
    }
}

/// Reads a boolean stored as a boolean or as an integer: the local MongoDB stand-in
/// hands back booleans set by an update as `0`/`1`. Use with
/// `#[serde(default, deserialize_with = "mongokit::lenient_bool")]` on `Option<bool>`.
pub fn lenient_bool<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    use serde::Deserialize;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Int(i64),
        Float(f64),
    }
    Ok(Option::<Flag>::deserialize(deserializer)?.map(|flag| match flag {
        Flag::Bool(b) => b,
        Flag::Int(n) => n != 0,
        Flag::Float(f) => f != 0.0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_operation_without_an_answer_is_unavailable() {
        let never = std::future::pending::<Result<(), mongodb::error::Error>>();
        let result = bounded(Duration::from_millis(10), never).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
    }

    #[test]
    fn a_shutdown_client_is_unavailable_and_anything_unknown_is_other() {
        let shutdown = mongodb::error::Error::from(ErrorKind::Shutdown);
        assert!(matches!(classify(&shutdown), StoreError::Unavailable(_)));
        let other = mongodb::error::Error::custom("something odd");
        assert!(matches!(classify(&other), StoreError::Other(_)));
    }
}
