//! What happens to one message: handle, retry with backoff, give up (failover hook),
//! dead-letter; and when the partition is being given up, leave it for redelivery.
//!
//! Why this module exists: this is the per-message policy of the seed design ("Retry
//! Strategy and Failover"), kept apart from the consumer's partition bookkeeping so
//! it can be read (and reasoned about) on its own. The one rule it must never break:
//! it reports a message as finished (committable) only if the handler succeeded, or
//! the message was given up on *and* its dead letter was written (when a dead-letter
//! topic is configured).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics as m;
use crate::{Handler, HandlerError, Producer, Record, RetrySettings};

/// Headers added to every dead letter.
pub mod headers {
    /// The reason the message was given up on (the handler's error text).
    pub const ERROR: &str = "x-error";
    /// `retryable-exhausted`, `permanent` or `malformed`.
    pub const ERROR_KIND: &str = "x-error-kind";
    /// How many times the handler was called for the message.
    pub const ATTEMPTS: &str = "x-attempts";
    /// Where the message was consumed from.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";

    pub(crate) const ALL: &[&str] = &[ERROR, ERROR_KIND, ATTEMPTS, ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET];
}

/// How processing one message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handled, or given up on and dead-lettered: its offset may be committed.
    Finished,
    /// The partition is being given up (shutdown or revocation) before the message
    /// was finished: it must not be committed, and nothing after it either.
    Abandoned,
}

pub(crate) struct DeadLetters {
    pub topic: String,
    pub producer: Producer,
}

/// The per-message policy, shared by all partition workers of a consumer.
pub(crate) struct Processor<H> {
    pub handler: Arc<H>,
    pub retry: RetrySettings,
    pub dead_letters: Option<DeadLetters>,
}

impl<H: Handler> Processor<H> {
    /// Processes `record` to the end, or until `stop` interrupts a wait, inside the
    /// record's entry span: it continues the trace of the record's `traceparent`
    /// header (written by the relay, or by Debezium from the document's `trace`).
    pub async fn process(&self, record: &Record, stop: &CancellationToken) -> Outcome {
        let span = tracing::info_span!(
            target: servicekit::trace::TARGET,
            "message",
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            trace_id = tracing::field::Empty,
        );
        servicekit::trace::adopt(&span, record.traceparent());
        self.process_in_span(record, stop).instrument(span).await
    }

    async fn process_in_span(&self, record: &Record, stop: &CancellationToken) -> Outcome {
        let topic = record.topic.clone();
        let mut backoff = self.retry.backoff();
        let mut attempts: u32 = 0;
        let error = loop {
            attempts += 1;
            let started = Instant::now();
            let result = AssertUnwindSafe(self.handler.handle(record)).catch_unwind().await.unwrap_or_else(|panic| {
                Err(HandlerError::Retryable(format!("handler panicked: {}", panic_text(&panic))))
            });
            metrics::histogram!(m::HANDLE_DURATION_SECONDS, "topic" => topic.clone())
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    let outcome = if attempts == 1 { "ok" } else { "retried_ok" };
                    metrics::counter!(m::MESSAGES_TOTAL, "topic" => topic, "outcome" => outcome).increment(1);
                    if attempts > 1 {
                        tracing::info!(topic = %record.topic, partition = record.partition, offset = record.offset, attempts, "handled after retries");
                    } else {
                        tracing::debug!("message handled");
                    }
                    return Outcome::Finished;
                }
                Err(HandlerError::Retryable(reason)) => {
                    let Some(wait) = backoff.next() else { break HandlerError::Retryable(reason) };
                    metrics::counter!(m::RETRIES_TOTAL, "topic" => topic.clone()).increment(1);
                    tracing::warn!(
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        attempt = attempts, retry_in = ?wait, %reason, "handler failed; will retry"
                    );
                    if !sleep_unless_stopped(wait, stop).await {
                        tracing::info!(
                            topic = %record.topic, partition = record.partition, offset = record.offset,
                            "partition given up during a retry wait; message left uncommitted for redelivery"
                        );
                        return Outcome::Abandoned;
                    }
                }
                Err(error) => break error,
            }
        };
        self.give_up(record, error, attempts, stop).await
    }

    async fn give_up(&self, record: &Record, error: HandlerError, attempts: u32, stop: &CancellationToken) -> Outcome {
        let outcome = match error {
            HandlerError::Retryable(_) => "exhausted",
            HandlerError::Permanent(_) => "permanent",
            HandlerError::Malformed(_) => "malformed",
        };
        metrics::counter!(m::MESSAGES_TOTAL, "topic" => record.topic.clone(), "outcome" => outcome).increment(1);
        tracing::error!(
            topic = %record.topic, partition = record.partition, offset = record.offset,
            attempts, kind = error.kind(), reason = error.reason(),
            dead_letter_topic = self.dead_letters.as_ref().map(|d| d.topic.as_str()),
            "giving up on message"
        );
        if let Err(panic) = AssertUnwindSafe(self.handler.on_exhausted(record, &error)).catch_unwind().await {
            tracing::error!(topic = %record.topic, offset = record.offset, panic = panic_text(&panic), "on_exhausted panicked");
        }
        match &self.dead_letters {
            Some(dead_letters) => self.dead_letter(dead_letters, record, &error, attempts, stop).await,
            None => Outcome::Finished,
        }
    }

    /// Publishes the dead letter, retrying (with the retry schedule, without a limit)
    /// until it is written or the partition is given up.
    async fn dead_letter(
        &self,
        dead_letters: &DeadLetters,
        record: &Record,
        error: &HandlerError,
        attempts: u32,
        stop: &CancellationToken,
    ) -> Outcome {
        let headers = dead_letter_headers(record, error, attempts);
        let header_refs: Vec<(&str, Option<&[u8]>)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let mut backoff = self.retry.unbounded();
        loop {
            match dead_letters
                .producer
                .send_raw(&dead_letters.topic, record.key.as_deref(), record.payload.as_deref(), &header_refs)
                .await
            {
                Ok((partition, offset)) => {
                    metrics::counter!(m::DEAD_LETTERS_TOTAL, "topic" => record.topic.clone(), "kind" => error.kind())
                        .increment(1);
                    tracing::warn!(
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        dead_letter_topic = %dead_letters.topic, dead_letter_partition = partition,
                        dead_letter_offset = offset, "message dead-lettered"
                    );
                    return Outcome::Finished;
                }
                Err(err) => {
                    metrics::counter!(m::DEAD_LETTER_FAILURES_TOTAL, "topic" => record.topic.clone()).increment(1);
                    let wait = backoff.next().unwrap_or(self.retry.max_interval);
                    tracing::error!(
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        dead_letter_topic = %dead_letters.topic, error = %err, retry_in = ?wait,
                        "dead-letter publish failed; not committing, will retry"
                    );
                    if !sleep_unless_stopped(wait, stop).await {
                        return Outcome::Abandoned;
                    }
                }
            }
        }
    }
}

/// The headers of a dead letter: the original headers (minus any earlier `x-error*`
/// / `x-original-*` ones, so a replayed message that fails again describes its
/// latest failure), then ours.
pub(crate) fn dead_letter_headers(
    record: &Record,
    error: &HandlerError,
    attempts: u32,
) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out: Vec<(String, Option<Vec<u8>>)> =
        record.headers.iter().filter(|(k, _)| !headers::ALL.contains(&k.as_str())).cloned().collect();
    let ours = [
        (headers::ERROR, error.reason().to_owned()),
        (headers::ERROR_KIND, error.kind().to_owned()),
        (headers::ATTEMPTS, attempts.to_string()),
        (headers::ORIGINAL_TOPIC, record.topic.clone()),
        (headers::ORIGINAL_PARTITION, record.partition.to_string()),
        (headers::ORIGINAL_OFFSET, record.offset.to_string()),
    ];
    out.extend(ours.into_iter().map(|(k, v)| (k.to_owned(), Some(v.into_bytes()))));
    out
}

/// Sleeps for `wait`; false if `stop` fired first.
async fn sleep_unless_stopped(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

fn panic_text(panic: &Box<dyn Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_describe_the_failure_and_keep_other_headers() {
        let record = Record {
            topic: "chat".into(),
            partition: 2,
            offset: 41,
            key: Some(b"k".to_vec()),
            payload: Some(b"p".to_vec()),
            headers: vec![("trace".into(), Some(b"abc".to_vec())), ("x-error".into(), Some(b"old".to_vec()))],
            timestamp: None,
        };
        let hs = dead_letter_headers(&record, &HandlerError::malformed("bad json"), 1);
        let get = |name: &str| {
            hs.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("trace"), vec!["abc"]);
        assert_eq!(get("x-error"), vec!["bad json"], "the old x-error is replaced");
        assert_eq!(get("x-error-kind"), vec!["malformed"]);
        assert_eq!(get("x-attempts"), vec!["1"]);
        assert_eq!(get("x-original-topic"), vec!["chat"]);
        assert_eq!(get("x-original-partition"), vec!["2"]);
        assert_eq!(get("x-original-offset"), vec!["41"]);
    }
}
