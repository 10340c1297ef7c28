//! Kafka for chatfleet: consumer groups that never lose a message, an idempotent
//! producer, and topic creation.
//!
//! Why this crate exists: every consumer in chatfleet (the CDC change handler, the
//! notification and e-mail handlers) needs the same guarantees — an offset is
//! committed only after its message is finished, messages of a partition are handled
//! in order, failures are retried with exponential backoff and then failed over and
//! dead-lettered, rebalances and shutdowns commit what was done — and they are easy
//! to get subtly wrong. Services implement a [`Handler`]; this crate does the rest.
//!
//! ```no_run
//! use kafkawrapper::{ConsumerGroup, Handler, HandlerError, KafkaSettings, Record, RetrySettings};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Forward;
//!
//! impl Handler for Forward {
//!     async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
//!         let _event: serde_json::Value = serde_json::from_slice(record.payload.as_deref().unwrap_or_default())
//!             .map_err(HandlerError::malformed)?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), kafkawrapper::Error> {
//! let settings = KafkaSettings {
//!     group_id: "chat-cdc".into(),
//!     topics: vec!["chat.messages".into()],
//!     dead_letter_topic: Some("chat.messages.dlt".into()),
//!     ..KafkaSettings::default()
//! };
//! kafkawrapper::ensure_topics(&settings.brokers, &[("chat.messages", 6), ("chat.messages.dlt", 1)]).await?;
//! let shutdown = CancellationToken::new();
//! ConsumerGroup::new(settings, RetrySettings::default(), Forward)?.run(shutdown).await
//! # }
//! ```
//!
//! See `docs/kafkawrapper.md` for the guarantees, the retry schedule, dead letters,
//! metrics and every setting.

pub mod admin;
mod client;
pub mod consumer;
pub mod error;
mod flow;
pub mod handler;
pub mod metrics;
mod processing;
pub mod producer;
pub mod retry;
pub mod settings;

pub use admin::{committed_offsets, end_offsets, ensure_topics};
pub use consumer::ConsumerGroup;
pub use error::Error;
pub use handler::{Handler, HandlerError, Record};
pub use processing::headers;
pub use producer::Producer;
pub use retry::{Backoff, RetrySettings, Retryable};
pub use settings::{properties_from_env, properties_from_vars, KafkaSettings};

/// A shared handler is a handler (so a service can keep a handle on its state).
impl<H: Handler> Handler for std::sync::Arc<H> {
    fn handle(&self, record: &Record) -> impl std::future::Future<Output = Result<(), HandlerError>> + Send {
        (**self).handle(record)
    }

    fn on_exhausted(&self, record: &Record, error: &HandlerError) -> impl std::future::Future<Output = ()> + Send {
        (**self).on_exhausted(record, error)
    }
}
