//! What a service implements to consume messages: a [`Handler`] that is given each
//! [`Record`] and says, through [`HandlerError`], whether a failure is worth retrying.
//!
//! Why this module exists: the consumer runner owns ordering, retries, dead-lettering
//! and commits; a service only decides what a message means and how a failure should
//! be treated. Keeping the contract this small is what lets every consumer in
//! chatfleet behave the same under failure.

use std::future::Future;

/// An owned copy of a consumed message, so handlers can keep it across `.await`s and
/// the consumer can release librdkafka's buffer at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers in wire order; a header may carry no value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Milliseconds since the Unix epoch (create or log-append time), if known.
    pub timestamp: Option<i64>,
}

impl Record {
    /// The key as UTF-8, if it is present and valid.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The last `traceparent` header (W3C trace context), if it is valid UTF-8.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(name, _)| name == servicekit::trace::TRACEPARENT)
            .and_then(|(_, value)| value.as_deref())
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The payload as UTF-8, if it is present and valid.
    pub fn payload_str(&self) -> Option<&str> {
        self.payload.as_deref().and_then(|p| std::str::from_utf8(p).ok())
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    /// The value of the first header named `name`, as UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub(crate) fn from_message<M: rdkafka::Message>(message: &M) -> Self {
        use rdkafka::message::Headers;
        let headers = message
            .headers()
            .map(|headers| {
                (0..headers.count())
                    .filter_map(|i| headers.try_get(i))
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: message.timestamp().to_millis(),
        }
    }
}

/// How a handler failed, which decides what happens to the message next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Might work later (a dependency is down, a partial delivery): retried with
    /// backoff, then given up on when the retries are exhausted.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Will never work (the message is valid but refused, e.g. a 4xx from a
    /// dependency): given up on at once.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The message cannot be parsed: given up on at once.
    #[error("malformed: {0}")]
    Malformed(String),
}

impl HandlerError {
    pub fn retryable(reason: impl std::fmt::Display) -> Self {
        Self::Retryable(reason.to_string())
    }

    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        Self::Permanent(reason.to_string())
    }

    pub fn malformed(reason: impl std::fmt::Display) -> Self {
        Self::Malformed(reason.to_string())
    }

    /// The reason without the kind prefix.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retryable(r) | Self::Permanent(r) | Self::Malformed(r) => r,
        }
    }

    /// The `x-error-kind` value of a message given up on with this error:
    /// `retryable-exhausted`, `permanent` or `malformed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retryable(_) => "retryable-exhausted",
            Self::Permanent(_) => "permanent",
            Self::Malformed(_) => "malformed",
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// A service's message handler. Messages of one partition are handed over one at a
/// time in offset order; different partitions are handled concurrently, so the
/// handler must be `Sync`.
///
/// ```
/// use kafkawrapper::{Handler, HandlerError, Record};
///
/// struct Print;
///
/// impl Handler for Print {
///     async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
///         let text = record.payload_str().ok_or_else(|| HandlerError::malformed("not UTF-8"))?;
///         println!("{text}");
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles one message. `Ok` commits it; see [`HandlerError`] for the rest. A
    /// panic counts as a retryable failure.
    fn handle(&self, record: &Record) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The failover hook: called once for each message the consumer gives up on
    /// (retries exhausted, permanent or malformed), before it is dead-lettered and
    /// committed. `error` is the last error; match on it to act only on, say,
    /// exhausted retries. (If the dead-letter publish cannot complete before the
    /// partition is given up, the message is redelivered and the hook runs again.)
    fn on_exhausted(&self, record: &Record, error: &HandlerError) -> impl Future<Output = ()> + Send {
        let _ = (record, error);
        async {}
    }
}
