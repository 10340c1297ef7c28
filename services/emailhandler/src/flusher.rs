//! The digest flusher: sends chat digests whose batching window has passed.
//!
//! Why this module exists: the consumer only records chat messages in MongoDB (so
//! their offsets can be committed without losing them); this worker turns them into
//! emails. Every `EMAIL_DIGEST_POLL_INTERVAL` it takes up to `EMAIL_DIGEST_BATCH` due
//! digests and, `EMAIL_DIGEST_CONCURRENCY` at a time:
//!
//! 1. takes the digest's lease (so two replicas never send the same digest);
//! 2. asks presence again: a recipient who came online meanwhile has read the chat,
//!    so the digest is dropped (counted as `online`); the user is looked up again too
//!    (opted out since → dropped);
//! 3. renders and sends one email; only after the relay accepted it are the sent
//!    items deleted (a crash in between sends the digest again: at least once);
//! 4. a transient failure is retried on the `MESSAGE_RETRY_*` schedule, at most
//!    `MESSAGE_RETRY_MAX_RETRIES` times; after that, or at once for a permanent (5xx)
//!    rejection, each listed message is dead-lettered as its original chat change
//!    (headers `x-error`, `x-error-kind`, `x-attempts`, `x-original-topic`,
//!    `x-email-recipient`) and the digest is dropped. If the dead letter cannot be
//!    written the digest is kept and tried again later: nothing is dropped unrecorded.

use std::sync::Arc;
use std::time::Duration;

use chatstream::{ChangeEvent, ChangeOp, ChatMessage, MessageContent, MessageId, StreamId, UserId};
use futures::StreamExt;
use kafkawrapper::{headers, Producer, RetrySettings};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::compose;
use crate::digest::{Digest, DigestItem};
use crate::mailer::{Outgoing, SendError};
use crate::metrics as m;
use crate::users::Lookup;
use crate::Shared;

/// The header naming whose digest a dead-lettered message was in.
pub const RECIPIENT_HEADER: &str = "x-email-recipient";

/// How the flusher runs.
#[derive(Debug, Clone)]
pub struct FlushSettings {
    pub poll_interval: Duration,
    pub batch: i64,
    pub concurrency: usize,
    pub lease: Duration,
    pub retry: RetrySettings,
    /// Where digests given up on are recorded; `None` only logs them.
    pub dead_letter_topic: Option<String>,
    /// The `x-original-topic` of those dead letters.
    pub chat_topic: String,
}

/// What became of one digest.
enum Delivery {
    Sent,
    Dropped(&'static str),
    Failed(SendError),
}

pub struct Flusher {
    shared: Arc<Shared>,
    settings: FlushSettings,
    producer: Option<Producer>,
    holder: String,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Flusher {
    pub fn new(shared: Arc<Shared>, settings: FlushSettings, producer: Option<Producer>) -> Self {
        let holder = format!("{}-{}", std::process::id(), now_ms());
        Self { shared, settings, producer, holder }
    }

    /// Runs passes until `shutdown`; a failed pass (MongoDB down) is logged and the
    /// next one tries again.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), String> {
        let mut ticker = tokio::time::interval(self.settings.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticker.tick() => {}
            }
            match self.pass().await {
                Ok(()) if failing => {
                    tracing::info!("digest flusher reaches MongoDB again");
                    failing = false;
                }
                Ok(()) => {}
                Err(err) if !failing => {
                    tracing::warn!(error = %err, "digest flusher cannot read pending digests; retrying every pass");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// One pass over the due digests.
    pub async fn pass(&self) -> Result<(), crate::store::StoreError> {
        let due = self.shared.digests.due(now_ms(), self.settings.batch).await?;
        futures::stream::iter(due).for_each_concurrent(self.settings.concurrency, |d| self.flush(d)).await;
        let pending = self.shared.digests.pending().await?;
        metrics::gauge!(m::DIGEST_PENDING).set(pending as f64);
        Ok(())
    }

    async fn flush(&self, digest: Digest) {
        let recipient = digest.recipient.clone();
        let digest = match self.shared.digests.claim(&digest, &self.holder, now_ms(), self.settings.lease).await {
            Ok(Some(digest)) => digest,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(user = %recipient, error = %err, "could not take the digest's lease");
                return;
            }
        };
        let ids: Vec<String> = digest.items.iter().map(|i| i.message_id.clone()).collect();
        let events = digest.items.len() as u64 + u64::try_from(digest.overflow).unwrap_or(0);
        let outcome = match self.deliver(&digest).await {
            Delivery::Sent => {
                tracing::info!(user = %recipient, messages = events, "digest sent");
                self.shared.digests.complete(&recipient, &ids, digest.overflow).await
            }
            Delivery::Dropped(reason) => {
                tracing::info!(user = %recipient, reason, messages = events, "digest dropped");
                m::skipped(reason, events);
                self.shared.digests.complete(&recipient, &ids, digest.overflow).await
            }
            Delivery::Failed(err) => {
                let attempts = digest.attempts + 1;
                let exhausted = attempts > i64::from(self.settings.retry.max_retries);
                // The reason as the consumer's dead letters give it: "transient SMTP failure: …".
                let reason = err.to_string();
                match err {
                    SendError::Permanent(_) => self.give_up(&digest, "permanent", &reason, attempts).await,
                    SendError::Transient(_) if exhausted => {
                        self.give_up(&digest, "retryable-exhausted", &reason, attempts).await
                    }
                    SendError::Transient(_) => {
                        let wait = self.settings.retry.wait_before(u64::try_from(attempts).unwrap_or(1));
                        tracing::warn!(user = %recipient, attempt = attempts, retry_in = ?wait, %reason, "digest not sent; will retry");
                        self.shared.digests.reschedule(&recipient, attempts, now_ms() + millis(wait), &reason).await
                    }
                }
            }
        };
        if let Err(err) = outcome {
            // The lease runs out and a later pass picks the digest up again.
            tracing::warn!(user = %recipient, error = %err, "could not record the digest's outcome");
        }
    }

    async fn deliver(&self, digest: &Digest) -> Delivery {
        if self.shared.presence.is_online(&digest.recipient).await {
            return Delivery::Dropped("online");
        }
        let Ok(user) = UserId::parse(&digest.recipient) else { return Delivery::Dropped("unknown_user") };
        let recipient = match self.shared.users.recipient(&user).await {
            Ok(Lookup::Found(recipient)) => recipient,
            Ok(Lookup::Skip(reason)) => return Delivery::Dropped(reason.label()),
            Err(err) => return Delivery::Failed(SendError::Transient(format!("user lookup: {err}"))),
        };
        let context = compose::digest_context(&recipient, digest);
        let rendered = match self.shared.templates.render("chat_digest", recipient.locale.as_deref(), &context) {
            Ok(rendered) => rendered,
            Err(err) => return Delivery::Failed(SendError::Permanent(err.to_string())),
        };
        let mail = Outgoing { kind: "chat_digest", to: recipient.mailbox(), rendered, key: digest_key(digest) };
        match self.shared.mailer.send(&mail).await {
            Ok(()) => Delivery::Sent,
            Err(err) => Delivery::Failed(err),
        }
    }

    /// Dead-letters every listed message of the digest, then drops the digest. If a
    /// dead letter cannot be written the digest stays and is tried again later.
    async fn give_up(
        &self,
        digest: &Digest,
        kind: &'static str,
        reason: &str,
        attempts: i64,
    ) -> Result<(), crate::store::StoreError> {
        let recipient = &digest.recipient;
        let reason_label = if kind == "permanent" { "permanent" } else { "retries_exhausted" };
        tracing::error!(user = %recipient, kind, %reason, attempts, messages = digest.items.len(), overflow = digest.overflow, "giving up on digest");
        if let (Some(producer), Some(topic)) = (&self.producer, &self.settings.dead_letter_topic) {
            let attempts_text = attempts.to_string();
            for item in &digest.items {
                let (key, payload) = dead_letter_record(item);
                let record_headers: [(&str, &[u8]); 5] = [
                    (headers::ERROR, reason.as_bytes()),
                    (headers::ERROR_KIND, kind.as_bytes()),
                    (headers::ATTEMPTS, attempts_text.as_bytes()),
                    (headers::ORIGINAL_TOPIC, self.settings.chat_topic.as_bytes()),
                    (RECIPIENT_HEADER, recipient.as_bytes()),
                ];
                if let Err(err) = producer.send(topic, key.as_bytes(), &payload, &record_headers).await {
                    let wait = self.settings.retry.max_interval;
                    tracing::error!(user = %recipient, error = %err, retry_in = ?wait, "could not dead-letter the digest; keeping it");
                    return self
                        .shared
                        .digests
                        .reschedule(recipient, attempts, now_ms() + millis(wait), &format!("dead letter failed: {err}"))
                        .await;
                }
            }
        } else {
            tracing::error!(user = %recipient, "no dead-letter topic configured; the digest is only logged");
        }
        metrics::counter!(m::DIGEST_DEAD_LETTERS, "reason" => reason_label).increment(1);
        let ids: Vec<String> = digest.items.iter().map(|i| i.message_id.clone()).collect();
        self.shared.digests.complete(recipient, &ids, digest.overflow).await
    }
}

/// Identifies a digest's content: the same messages give the same Message-ID.
fn digest_key(digest: &Digest) -> String {
    let mut ids: Vec<&str> = digest.items.iter().map(|i| i.message_id.as_str()).collect();
    ids.sort_unstable();
    let hash = Sha256::digest(ids.join(",").as_bytes());
    format!("chat_digest:{}:{}", digest.recipient, hex::encode(&hash[..8]))
}

/// The dead letter of one digest item: the chat change it came from (so it can be
/// replayed onto the chat topic), keyed by stream id. An item that no longer parses
/// as a chat message is written as the stored item itself.
fn dead_letter_record(item: &DigestItem) -> (String, Vec<u8>) {
    let message = (|| {
        Some(ChatMessage {
            message_id: MessageId::parse(&item.message_id).ok()?,
            stream_id: StreamId::parse(&item.stream_id).ok()?,
            sender_id: UserId::parse(&item.sender_id).ok()?,
            receiver_id: Some(UserId::parse(&item.receiver_id).ok()?),
            recipients: Vec::new(),
            content: MessageContent::parse(&item.content).ok()?,
            created_at: chrono::DateTime::from_timestamp_millis(item.created_at)?,
            state: Default::default(),
        })
    })();
    let payload = match message {
        Some(message) => {
            serde_json::to_vec(&ChangeEvent::new(ChangeOp::Create, message, item.created_at).to_flattened())
        }
        None => serde_json::to_vec(item),
    };
    (item.stream_id.clone(), payload.unwrap_or_default())
}
