//! Pending chat digests, kept in MongoDB so that committing a Kafka offset never
//! loses a message that has not been emailed yet.
//!
//! Why this module exists: a chat message is batched with the recipient's other
//! messages for `EMAIL_DIGEST_WINDOW` before one email goes out. Holding that batch
//! only in memory would lose it on a crash after the offset was committed, so the
//! consumer writes each message here (then commits), and the flusher sends due
//! digests and deletes what the SMTP relay accepted.
//!
//! One document per recipient (`_id` = user id) holds the items, the schedule and a
//! lease. Every write is a compare-and-swap on a `version` field: `insert_one` (a
//! duplicate `_id` means someone else created it first), `replace_one` and
//! `delete_one` filtered on `{_id, version}`. That is deliberate: the local MongoDB
//! stand-in (nx-27017 0.8.1) mishandles the array operators one would otherwise use
//! (`$push` with `$each`/`$slice` stores the items as JSON strings, `$pull` with a
//! condition empties the array, and queries on `items.message_id` match nothing),
//! while whole-document writes with a filter behave exactly like MongoDB. Items are
//! deduplicated by `message_id` in code; the list is bounded by
//! `EMAIL_DIGEST_MAX_ITEMS` (beyond it messages are only counted, `overflow`).

use std::future::IntoFuture;
use std::time::Duration;

use futures::TryStreamExt;
use kafkawrapper::RetrySettings;
use mongodb::bson::{doc, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};

use crate::store::{with_timeout, StoreError};

/// How many times a compare-and-swap is retried against concurrent writers.
const CAS_ATTEMPTS: u32 = 32;

/// One chat message waiting in a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestItem {
    pub message_id: String,
    pub stream_id: String,
    pub sender_id: String,
    pub sender_name: String,
    pub receiver_id: String,
    pub content: String,
    /// When the message was written (ms since the epoch).
    pub created_at: i64,
    /// When it joined the digest (ms since the epoch).
    pub enqueued_at: i64,
}

/// A recipient's pending digest as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// The recipient's user id.
    #[serde(rename = "_id")]
    pub recipient: String,
    pub version: i64,
    pub items: Vec<DigestItem>,
    /// Messages that arrived while the list was full: counted, not listed.
    #[serde(default)]
    pub overflow: i64,
    /// When the batching window of the oldest item ends (ms).
    pub due_at: i64,
    /// When the flusher may next try to send (ms): `due_at`, or later after failures.
    pub next_attempt_at: i64,
    /// Failed send attempts so far.
    #[serde(default)]
    pub attempts: i64,
    /// A flusher owns the digest until then (ms); 0 = nobody.
    #[serde(default)]
    pub lease_until: i64,
    #[serde(default)]
    pub lease_holder: String,
    #[serde(default)]
    pub last_error: String,
}

impl Digest {
    /// A digest of `items` due at `due_at`, untried and unleased.
    fn scheduled(recipient: String, version: i64, items: Vec<DigestItem>, overflow: i64, due_at: i64) -> Self {
        Self {
            recipient,
            version,
            items,
            overflow,
            due_at,
            next_attempt_at: due_at,
            attempts: 0,
            lease_until: 0,
            lease_holder: String::new(),
            last_error: String::new(),
        }
    }
}

/// What [`DigestStore::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The message is in the recipient's digest now.
    Added,
    /// It was there already (a redelivery).
    AlreadyPending,
    /// The digest is full: the message is counted in "and N more".
    Overflow,
}

/// The `email_digests` collection.
#[derive(Clone)]
pub struct DigestStore {
    digests: Collection<Document>,
    timeout: Duration,
    window_ms: i64,
    max_items: usize,
}

fn to_document(digest: &Digest) -> Result<Document, StoreError> {
    mongodb::bson::to_document(digest).map_err(|err| StoreError::Other(format!("cannot encode digest: {err}")))
}

fn from_document(document: Document) -> Result<Digest, StoreError> {
    let id = document.get("_id").map(ToString::to_string).unwrap_or_default();
    mongodb::bson::from_document(document)
        .map_err(|err| StoreError::Corrupt { id: format!("digest {id}"), reason: err.to_string() })
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The pauses between compare-and-swap tries: the fleet's retry policy, a few
/// milliseconds with full jitter so racing writers spread out.
fn cas_pauses() -> kafkawrapper::Backoff {
    RetrySettings {
        max_retries: CAS_ATTEMPTS,
        initial_interval: Duration::from_millis(2),
        max_interval: Duration::from_millis(8),
        multiplier: 1.5,
        randomization_factor: 1.0,
    }
    .backoff()
}

impl DigestStore {
    pub fn new(digests: Collection<Document>, timeout: Duration, window: Duration, max_items: usize) -> Self {
        Self { digests, timeout, window_ms: millis(window).max(1), max_items: max_items.max(1) }
    }

    /// The flusher's scan index. Failing is logged: scans still work, only slower.
    pub async fn ensure_indexes(&self) {
        let index = IndexModel::builder()
            .keys(doc! { "next_attempt_at": 1 })
            .options(IndexOptions::builder().name("next_attempt_at".to_owned()).build())
            .build();
        if let Err(err) = with_timeout(self.timeout, self.digests.create_index(index).into_future()).await {
            tracing::warn!(error = %err, "could not create the email_digests index");
        }
    }

    /// The stored digest of `recipient`, if any.
    pub async fn get(&self, recipient: &str) -> Result<Option<Digest>, StoreError> {
        let found =
            with_timeout(self.timeout, self.digests.find_one(doc! { "_id": { "$eq": recipient } }).into_future())
                .await?;
        found.map(from_document).transpose()
    }

    /// Replaces `digest` (stored at `digest.version`) with `next`; false if someone
    /// else changed it first.
    async fn swap(&self, digest: &Digest, next: &Digest) -> Result<bool, StoreError> {
        let filter = doc! { "_id": { "$eq": &digest.recipient }, "version": { "$eq": digest.version } };
        let replacement = to_document(next)?;
        let result = with_timeout(self.timeout, self.digests.replace_one(filter, replacement).into_future()).await?;
        Ok(result.matched_count == 1)
    }

    /// Deletes `digest` if it is still at its version; false if someone changed it.
    async fn remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let filter = doc! { "_id": { "$eq": &digest.recipient }, "version": { "$eq": digest.version } };
        let result = with_timeout(self.timeout, self.digests.delete_one(filter).into_future()).await?;
        Ok(result.deleted_count == 1)
    }

    /// Adds `item` to `recipient`'s digest (creating it, due one window from now).
    pub async fn enqueue(&self, recipient: &str, item: DigestItem) -> Result<Enqueued, StoreError> {
        let mut pauses = cas_pauses();
        for _ in 0..CAS_ATTEMPTS {
            match self.get(recipient).await? {
                None => {
                    let due_at = item.enqueued_at.saturating_add(self.window_ms);
                    let digest = Digest::scheduled(recipient.to_owned(), 1, vec![item.clone()], 0, due_at);
                    let insert = self.digests.insert_one(to_document(&digest)?).into_future();
                    match with_timeout(self.timeout, insert).await {
                        Ok(_) => return Ok(Enqueued::Added),
                        Err(StoreError::Duplicate(_)) => {}
                        Err(err) => return Err(err),
                    }
                }
                Some(digest) => {
                    if digest.items.iter().any(|i| i.message_id == item.message_id) {
                        return Ok(Enqueued::AlreadyPending);
                    }
                    let mut next = digest.clone();
                    next.version += 1;
                    let outcome = if next.items.len() >= self.max_items {
                        next.overflow += 1;
                        Enqueued::Overflow
                    } else {
                        next.items.push(item.clone());
                        Enqueued::Added
                    };
                    if self.swap(&digest, &next).await? {
                        return Ok(outcome);
                    }
                }
            }
            tokio::time::sleep(pauses.next().unwrap_or_default()).await;
        }
        Err(StoreError::Unavailable(format!("digest of {recipient} kept changing; gave up after {CAS_ATTEMPTS} tries")))
    }

    /// Digests whose time has come and that no flusher holds, oldest first.
    pub async fn due(&self, now_ms: i64, limit: i64) -> Result<Vec<Digest>, StoreError> {
        let filter = doc! { "next_attempt_at": { "$lte": now_ms }, "lease_until": { "$lt": now_ms } };
        let find = async {
            self.digests.find(filter).sort(doc! { "next_attempt_at": 1 }).limit(limit).await?.try_collect().await
        };
        let documents: Vec<Document> = with_timeout(self.timeout, find).await?;
        documents.into_iter().map(from_document).collect()
    }

    /// Takes the lease of `digest` for `lease`; `None` if another flusher was faster
    /// or the digest changed since it was read (it is then picked up on a later pass).
    pub async fn claim(
        &self,
        digest: &Digest,
        holder: &str,
        now_ms: i64,
        lease: Duration,
    ) -> Result<Option<Digest>, StoreError> {
        if digest.lease_until >= now_ms {
            return Ok(None);
        }
        let mut next = digest.clone();
        next.version += 1;
        next.lease_until = now_ms.saturating_add(millis(lease));
        next.lease_holder = holder.to_owned();
        Ok(self.swap(digest, &next).await?.then_some(next))
    }

    /// Removes the items that were sent (or given up on) and the overflow they
    /// accounted for; deletes the digest when nothing is left, otherwise schedules
    /// what arrived meanwhile one window after its oldest item.
    pub async fn complete(&self, recipient: &str, done_ids: &[String], done_overflow: i64) -> Result<(), StoreError> {
        let mut pauses = cas_pauses();
        for _ in 0..CAS_ATTEMPTS {
            let Some(digest) = self.get(recipient).await? else { return Ok(()) };
            let remaining: Vec<DigestItem> =
                digest.items.iter().filter(|i| !done_ids.contains(&i.message_id)).cloned().collect();
            let overflow = (digest.overflow - done_overflow).max(0);
            let swapped = if remaining.is_empty() && overflow == 0 {
                self.remove(&digest).await?
            } else {
                let oldest = remaining.iter().map(|i| i.enqueued_at).min().unwrap_or(digest.due_at - self.window_ms);
                let due_at = oldest.saturating_add(self.window_ms);
                let next = Digest::scheduled(digest.recipient.clone(), digest.version + 1, remaining, overflow, due_at);
                self.swap(&digest, &next).await?
            };
            if swapped {
                return Ok(());
            }
            tokio::time::sleep(pauses.next().unwrap_or_default()).await;
        }
        Err(StoreError::Unavailable(format!("digest of {recipient} kept changing; gave up after {CAS_ATTEMPTS} tries")))
    }

    /// Records a failed attempt: releases the lease and sets when to try again.
    pub async fn reschedule(
        &self,
        recipient: &str,
        attempts: i64,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut pauses = cas_pauses();
        for _ in 0..CAS_ATTEMPTS {
            let Some(digest) = self.get(recipient).await? else { return Ok(()) };
            let mut next = digest.clone();
            next.version += 1;
            next.attempts = attempts;
            next.next_attempt_at = next_attempt_at;
            next.lease_until = 0;
            next.lease_holder = String::new();
            next.last_error = error.chars().take(500).collect();
            if self.swap(&digest, &next).await? {
                return Ok(());
            }
            tokio::time::sleep(pauses.next().unwrap_or_default()).await;
        }
        Err(StoreError::Unavailable(format!("digest of {recipient} kept changing; gave up after {CAS_ATTEMPTS} tries")))
    }

    /// How many digests are pending (for the `email_digest_pending` gauge).
    pub async fn pending(&self) -> Result<u64, StoreError> {
        with_timeout(self.timeout, self.digests.count_documents(doc! {}).into_future()).await
    }
}
