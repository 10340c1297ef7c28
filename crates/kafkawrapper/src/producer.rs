//! An idempotent, keyed producer that reports where each message was written.
//!
//! Why this module exists: services publish events and the consumer publishes dead
//! letters; both need "written, acknowledged by all in-sync replicas, exactly once in
//! the log even if the client retried" before they move on, with a bounded wait.
//! `send` resolves only on the broker's delivery report.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::client::{client_config, TracingContext};
use crate::{Error, KafkaSettings};

/// A cloneable producer handle (clones share one librdkafka client).
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<TracingContext>,
    delivery_timeout: Duration,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("delivery_timeout", &self.delivery_timeout).finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer with `acks=all`, `enable.idempotence` from
    /// [`KafkaSettings::idempotence`] and `message.timeout.ms` from
    /// [`KafkaSettings::delivery_timeout`]; librdkafka properties in the settings and
    /// `RDKAFKA_*` variables override these. Connecting happens in the background.
    pub fn new(settings: &KafkaSettings) -> Result<Self, Error> {
        let mut defaults = vec![
            ("acks", "all".to_owned()),
            ("enable.idempotence", settings.idempotence.to_string()),
            ("message.timeout.ms", settings.delivery_timeout.as_millis().max(1).to_string()),
        ];
        // Properties from settings/environment win over the derived defaults.
        let properties = settings.effective_properties();
        defaults.retain(|(key, _)| !properties.contains_key(*key));
        let config = client_config(settings, &defaults);
        let delivery_timeout = config
            .get("message.timeout.ms")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(settings.delivery_timeout);
        let inner: FutureProducer<TracingContext> =
            config.create_with_context(TracingContext).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self { inner, delivery_timeout })
    }

    /// Writes one keyed message and waits for the broker to acknowledge it; returns
    /// its `(partition, offset)`. Messages with the same key go to the same partition
    /// (librdkafka's default partitioner), so they are consumed in the order sent.
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), Error> {
        let headers: Vec<(&str, Option<&[u8]>)> = headers.iter().map(|(k, v)| (*k, Some(*v))).collect();
        self.send_raw(topic, Some(key), Some(payload), &headers).await
    }

    /// Like [`Producer::send`], but key and payload may be absent (a tombstone has no
    /// payload; a dead letter keeps whatever the original had), and so may header values.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> Result<(i32, i64), Error> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if !headers.is_empty() {
            let mut owned = OwnedHeaders::new_with_capacity(headers.len());
            for (name, value) in headers {
                owned = owned.insert(Header { key: name, value: *value });
            }
            record = record.headers(owned);
        }
        // librdkafka fails the delivery itself after message.timeout.ms; the outer
        // timeout only guards against a report that never arrives.
        let send = self.inner.send(record, Timeout::After(self.delivery_timeout));
        match tokio::time::timeout(self.delivery_timeout + Duration::from_secs(5), send).await {
            Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
            Ok(Err((source, _message))) => Err(Error::Delivery { topic: topic.to_owned(), source }),
            Err(_) => Err(Error::DeliveryTimeout { topic: topic.to_owned(), timeout: self.delivery_timeout }),
        }
    }

    /// Waits until everything queued has been delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        self.inner.flush(timeout).map_err(Error::from)
    }

    /// The bound on one `send`.
    pub fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }
}
