//! The errors of this crate.
//!
//! Why this module exists: callers need to tell a configuration mistake (fix the
//! deployment) from a broker problem (wait, retry, alert) from a failed delivery (the
//! message was not written), and the handler's own error type lives in
//! [`crate::handler`] because it drives retries rather than reporting failure.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why a Kafka operation of this crate failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings cannot work (no group id, no topics, a property librdkafka rejects).
    #[error("invalid kafka settings: {0}")]
    Config(String),
    /// The client reported an error (creating it, subscribing, committing, metadata).
    #[error("kafka client error: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker did not accept a produced message.
    #[error("delivery to topic {topic} failed: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// No delivery report arrived within the delivery timeout.
    #[error("delivery to topic {topic} not confirmed within {timeout:?}")]
    DeliveryTimeout { topic: String, timeout: Duration },
    /// The broker refused to create a topic.
    #[error("creating topic {topic} failed: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
    /// The topic does not exist (or has no partitions) according to the broker.
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    /// The consumer's polling thread ended abnormally.
    #[error("kafka consumer thread failed: {0}")]
    Thread(String),
}
