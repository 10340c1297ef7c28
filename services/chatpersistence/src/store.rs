//! The messages collection in MongoDB: the one write per message, history reads,
//! the outbox marker the relay scans for, and the indexes all of that needs.
//!
//! Why this module exists: MongoDB is the source of truth of the whole pipeline, so
//! every query against it (and every way it can fail) lives in one place. Driver
//! errors are sorted here into "MongoDB is unreachable or too slow" (the API answers
//! 503 and the relay retries), "duplicate key" (an idempotent retry) and the rest.
//!
//! Equality filters are written `{field: {$eq: value}}` on purpose. To MongoDB that
//! is the same query; the local stand-in (nx-27017 on neosqlite) turns a bare
//! `{field: value}` into SQL that also matches arrays containing the value, which
//! SQLite cannot answer from an index, so every history read and outbox scan became
//! a full scan (60 ms at 40k messages instead of under 1 ms).

use std::future::IntoFuture;
use std::time::Duration;

use std::collections::HashMap;

use chatstream::{ChatMessage, MessageContent, MessageId, MessageState, StreamId, UserId};
use chrono::{TimeZone, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::{Acknowledgment, ClientOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, IndexModel};
use serde::{Deserialize, Serialize};

use crate::settings::MongoSettings;
use crate::writer::Writer;

/// Why a store operation failed (`Corrupt`: a stored document is not a valid chat message).
pub use mongokit::StoreError;

/// A message document as stored. `_id` is the message id, so the document is
/// addressed by the same id everywhere (Debezium's record `_id`, the API, the events).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MessageDoc {
    #[serde(rename = "_id")]
    id: String,
    message_id: String,
    stream_id: String,
    sender_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    receiver_id: Option<String>,
    /// Stored as one space-separated string (`chatstream::stored_recipients`).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "chatstream::stored_recipients")]
    recipients: Vec<String>,
    content: String,
    created_at: DateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "mongokit::lenient_bool")]
    outbox_pending: Option<bool>,
    /// The message's number in its conversation (1, 2, ...), for unread counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    /// Epoch milliseconds of the last edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) edited_at: Option<i64>,
    /// Epoch milliseconds of the deletion (the content is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deleted_at: Option<i64>,
    /// Who reacted with what: hex of the emoji → user ids.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    reactions: HashMap<String, Vec<String>>,
    /// Revision of `reactions` (optimistic concurrency of reaction writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reactions_rev: Option<i64>,
    /// Edits and the deletion so far.

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<i32>,
    /// Epoch milliseconds of the last change of any kind (replays find changes by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    changed_at: Option<i64>,
    /// What the relay publishes the marked document as (`u`: a change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outbox_op: Option<String>,
    /// The W3C `traceparent` of the POST (the relay's record header; with Debezium
    /// the connector copies it into one, see debezium/README.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
}

impl MessageDoc {
    fn new(message: &ChatMessage, client_message_id: Option<&str>, outbox: bool) -> Self {
        Self {
            id: message.message_id.to_string(),
            message_id: message.message_id.to_string(),
            stream_id: message.stream_id.to_string(),
            sender_id: message.sender_id.to_string(),
            receiver_id: message.receiver_id.as_ref().map(ToString::to_string),
            recipients: message.recipients.iter().map(ToString::to_string).collect(),
            content: message.content.as_str().to_owned(),
            created_at: DateTime::from_millis(message.created_at.timestamp_millis()),
            client_message_id: client_message_id.map(str::to_owned),
            outbox_pending: outbox.then_some(true),
            seq: None,
            edited_at: None,
            deleted_at: None,
            reactions: HashMap::new(),
            reactions_rev: None,
            version: None,
            changed_at: None,
            outbox_op: None,
            trace: message.state.trace.clone(),
        }
    }

    fn into_message(self) -> Result<ChatMessage, StoreError> {
        let id = self.id.clone();
        let corrupt = |reason: String| StoreError::Corrupt { id: id.clone(), reason };
        let message = ChatMessage {
            message_id: MessageId::parse(&self.message_id).map_err(|e| corrupt(e.to_string()))?,
            stream_id: StreamId::parse(&self.stream_id).map_err(|e| corrupt(e.to_string()))?,
            sender_id: UserId::parse(&self.sender_id).map_err(|e| corrupt(e.to_string()))?,
            receiver_id: self
                .receiver_id
                .as_deref()
                .map(UserId::parse)
                .transpose()
                .map_err(|e| corrupt(e.to_string()))?,
            recipients: self
                .recipients
                .iter()
                .map(|r| UserId::parse(r))
                .collect::<Result<_, _>>()
                .map_err(|e| corrupt(e.to_string()))?,
            content: if self.deleted_at.is_some() {
                MessageContent::removed()
            } else {
                MessageContent::parse(&self.content).map_err(|e| corrupt(e.to_string()))?
            },
            created_at: Utc
                .timestamp_millis_opt(self.created_at.timestamp_millis())
                .single()
                .ok_or_else(|| corrupt("created_at out of range".into()))?,
            state: MessageState {
                edited_at: self.edited_at.and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
                deleted_at: self.deleted_at.and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
                reactions: self
                    .reactions
                    .iter()
                    .filter(|(_, users)| !users.is_empty())
                    .filter_map(|(key, users)| {
                        let emoji = String::from_utf8(hex::decode(key).ok()?).ok()?;
                        Some((emoji, users.len() as u32))
                    })
                    .collect(),
                version: self.version.unwrap_or(0).max(0) as u32,
                trace: self.trace.clone(),
            },
        };
        Ok(message)
    }
}

/// A change to a stored message.
#[derive(Debug, Clone)]
pub enum MessageChange {
    Edit(MessageContent),
    Delete,
}

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// The oldest messages of the stream.
    Start,
    /// Messages after this id (exclusive).
    Since(MessageId),
    /// Messages just before this id (exclusive).
    Before(MessageId),
}

/// Whose messages of a conversation a history read returns. A conversation id is
/// never enough on its own: under the legacy id format two pairs can share one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    /// An internal service: every message stored under the id.
    Service,
    /// Exactly the messages between these two users.
    Pair(UserId, UserId),
    /// The messages this user sent or received.
    Participant(UserId),
}

impl Reader {
    /// Whether `message` belongs on this reader's page (the filter of
    /// [`Store::history`], for messages that are not in MongoDB yet).
    pub fn may_see(&self, message: &ChatMessage) -> bool {
        let receiver = message.receiver_id.as_ref();
        match self {
            Reader::Service => true,
            Reader::Pair(a, b) => {
                let pair = |u: Option<&UserId>| u.is_some_and(|u| u == a || u == b);
                pair(Some(&message.sender_id)) && pair(receiver)
            }
            Reader::Participant(user) => &message.sender_id == user || receiver == Some(user),
        }
    }
}

/// What an insert did.
#[derive(Debug)]
pub enum Inserted {
    /// The message was written.
    Created,
    /// `(sender_id, client_message_id)` was used before: this is the original.
    Replay(Box<ChatMessage>),
    /// The write reached MongoDB but no answer came back, and MongoDB stayed
    /// unreachable for the whole `MONGODB_INSERT_RESOLVE_TIMEOUT`: the message may
    /// or may not be stored (the only answer that is not definite).
    Unresolved,
}

/// Counts an insert of unknown outcome by how it was resolved
/// (`message_write_outcome_unknown_total{resolved}`).
fn resolved(how: &'static str, inserted: Inserted) -> Inserted {
    metrics::counter!("message_write_outcome_unknown_total", "resolved" => how).increment(1);
    inserted
}

/// The messages collection (and the relay's lease collection next to it).
#[derive(Clone)]
pub struct Store {
    client: Client,
    messages: Collection<MessageDoc>,
    writer: Writer<MessageDoc>,
    leases: Collection<Document>,
    timeout: Duration,
    /// `MONGODB_INSERT_RESOLVE_TIMEOUT`: how long an insert of unknown outcome is resolved.
    resolve_timeout: Duration,
    outbox: bool,
}

impl Store {
    /// A store on `settings`; `outbox` makes inserts carry the relay's marker.
    /// Nothing is contacted yet (the driver connects in the background), so a
    /// MongoDB that is down at start-up does not stop the service from starting.
    pub async fn new(settings: &MongoSettings, outbox: bool) -> Result<Self, StoreError> {
        let mut options =
            ClientOptions::parse(&settings.uri).await.map_err(|e| StoreError::Other(format!("MONGODB_URI: {e}")))?;
        options.app_name.get_or_insert_with(|| "chatpersistence".to_owned());
        options.server_selection_timeout = Some(settings.timeout);
        options.connect_timeout = Some(settings.timeout);
        // Notice a MongoDB that came back within about a second.
        options.heartbeat_freq = Some(Duration::from_secs(1));
        // A message is acknowledged only once it is durable on a majority (a no-op
        // against a standalone server, which journals anyway).
        options.write_concern = Some(WriteConcern::builder().w(Acknowledgment::Majority).journal(true).build());
        let client = Client::with_options(options).map_err(|e| StoreError::Other(format!("MONGODB_URI: {e}")))?;
        let db = client.database(&settings.database);
        let messages: Collection<MessageDoc> = db.collection(&settings.messages_collection);
        let writer = Writer::start(messages.clone(), settings.insert_writers, settings.insert_batch, settings.timeout);
        Ok(Self {
            messages,
            writer,
            leases: db.collection("relay_leases"),
            client,
            timeout: settings.timeout,
            resolve_timeout: settings.insert_resolve_timeout,
            outbox,
        })
    }

    /// Runs `op` within the MongoDB timeout, so a server that accepted the
    /// connection but stopped answering still fails fast.
    async fn bounded<T>(
        &self,
        op: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, StoreError> {
        mongokit::bounded(self.timeout, op).await
    }

    /// Round trip to the server (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let db = self.client.database(&self.messages.namespace().db);
        self.bounded(db.run_command(doc! { "ping": 1 })).await.map(|_| ())
    }

    /// Creates the indexes the queries rely on (idempotent).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let indexes = vec![
            IndexModel::builder()
                .keys(doc! { "message_id": 1 })
                .options(IndexOptions::builder().name("message_id_unique".to_owned()).unique(true).build())
                .build(),
            IndexModel::builder()
                .keys(doc! { "stream_id": 1, "changed_at": 1 })
                .options(
                    IndexOptions::builder()
                        .name("stream_changes".to_owned())
                        .partial_filter_expression(doc! { "changed_at": { "$exists": true } })
                        .build(),
                )
                .build(),
            IndexModel::builder()
                .keys(doc! { "stream_id": 1, "message_id": 1 })
                .options(IndexOptions::builder().name("stream_history".to_owned()).build())
                .build(),
            IndexModel::builder()
                .keys(doc! { "sender_id": 1, "client_message_id": 1 })
                .options(
                    IndexOptions::builder()
                        .name("sender_client_message_id_unique".to_owned())
                        .unique(true)
                        .partial_filter_expression(doc! { "client_message_id": { "$exists": true } })
                        .build(),
                )
                .build(),
            // What a retry's look-up (`sender_id` and `client_message_id`) is answered
            // from. The compound unique index above is enough for MongoDB; the local
            // stand-in plans with single-field indexes only and scanned the whole
            // collection for every POST that carried a client_message_id (46 ms at
            // 10,000 messages, growing with the collection). Costs one small index.
            IndexModel::builder()
                .keys(doc! { "client_message_id": 1 })
                .options(
                    IndexOptions::builder()
                        .name("client_message_id".to_owned())
                        .partial_filter_expression(doc! { "client_message_id": { "$exists": true } })
                        .build(),
                )
                .build(),
            IndexModel::builder()
                .keys(doc! { "outbox_pending": 1, "message_id": 1 })
                .options(
                    IndexOptions::builder()
                        .name("outbox_pending".to_owned())
                        .partial_filter_expression(doc! { "outbox_pending": true })
                        .build(),
                )
                .build(),
        ];
        for index in indexes {
            self.bounded(self.messages.create_index(index)).await?;
        }
        Ok(())
    }

    /// Writes `message` once. A second write with the same `(sender_id,
    /// client_message_id)` writes nothing and returns the original.
    pub async fn insert(
        &self,
        message: &ChatMessage,
        client_message_id: Option<&str>,
        seq: Option<i64>,
    ) -> Result<Inserted, StoreError> {
        let new_doc = || {
            let mut doc = MessageDoc::new(message, client_message_id, self.outbox);
            doc.seq = seq;
            doc
        };
        match self.writer.insert(new_doc()).await {
            Ok(()) => Ok(Inserted::Created),
            Err(StoreError::Duplicate(detail)) => self.original_of(message, client_message_id, detail).await,
            // Sent but unanswered (a timeout, a dropped connection, an unconfirmed
            // write concern): it may have committed, or may still commit.
            Err(StoreError::Unavailable(detail)) => self.resolve(&new_doc(), message, client_message_id, detail).await,
            Err(other) => Err(other),
        }
    }

    /// The answer to a duplicate key on a new message: the original of a retried
    /// `client_message_id`.
    async fn original_of(
        &self,
        message: &ChatMessage,
        client_message_id: Option<&str>,
        detail: String,
    ) -> Result<Inserted, StoreError> {
        let Some(client_message_id) = client_message_id else {
            // Only a colliding message id could do this: ids are UUIDv7.
            return Err(StoreError::Other(format!("message id collision: {detail}")));
        };
        match self.by_client_message_id(&message.sender_id, client_message_id).await? {
            Some(original) => Ok(Inserted::Replay(Box::new(original))),
            None => Err(StoreError::Other(format!("duplicate key but no original: {detail}"))),
        }
    }

    /// Finds out whether an insert whose outcome is unknown committed, so the
    /// answer is definite: a client that retries after a `503` without a
    /// `client_message_id` must not store the message twice.
    ///
    /// Reading the document back is not enough on its own: the first attempt may
    /// still sit in MongoDB's receive buffer (a paused server) and commit after the
    /// read. So the same document (same `_id`) is written again. Either that write
    /// stores it, and the first attempt then fails on the unique `_id` whenever it
    /// runs, or it fails with a duplicate key and a read by `_id` shows the first
    /// attempt committed. Both end with exactly one copy and a `201`. Tried with
    /// backoff for up to `MONGODB_INSERT_RESOLVE_TIMEOUT`.
    async fn resolve(
        &self,
        doc: &MessageDoc,
        message: &ChatMessage,
        client_message_id: Option<&str>,
        first: String,
    ) -> Result<Inserted, StoreError> {
        tracing::warn!(message_id = %doc.id, error = %first, "insert outcome unknown: resolving by message id");
        let deadline = tokio::time::Instant::now() + self.resolve_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.bounded(self.messages.insert_one(doc)).await {
                Ok(_) => return Ok(resolved("written_again", Inserted::Created)),
                Err(StoreError::Duplicate(detail)) => {
                    match self.bounded(self.messages.find_one(doc! { "_id": { "$eq": &doc.id } })).await {
                        Ok(Some(_)) => return Ok(resolved("already_stored", Inserted::Created)),
                        // Not ours: another message holds this client_message_id.
                        Ok(None) => {
                            let original = self.original_of(message, client_message_id, detail).await?;
                            return Ok(resolved("replay", original));
                        }
                        Err(err) => tracing::debug!(error = %err, "resolve read failed"),
                    }
                }
                Err(StoreError::Unavailable(detail)) => tracing::debug!(error = %detail, "resolve write failed"),
                Err(other) => {
                    metrics::counter!("message_write_outcome_unknown_total", "resolved" => "error").increment(1);
                    return Err(other);
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                tracing::error!(message_id = %doc.id, "insert outcome still unknown after {:?}", self.resolve_timeout);
                return Ok(resolved("unresolved", Inserted::Unresolved));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Inserts a write-behind batch with one unordered `insert_many` (marked for the
    /// relay in outbox mode): each message's outcome, in order. A message already
    /// there (a batch retried after a crash) fails alone with `Duplicate`, which the
    /// caller treats as stored; nothing already stored is overwritten (an edit made
    /// after the first write survives a replayed batch).
    pub async fn insert_batch(
        &self,
        batch: &[(&ChatMessage, Option<&str>, Option<i64>)],
        timeout: Duration,
    ) -> Vec<Result<(), StoreError>> {
        let docs: Vec<MessageDoc> = batch
            .iter()
            .map(|(message, client_message_id, seq)| {
                let mut doc = MessageDoc::new(message, *client_message_id, self.outbox);
                doc.seq = *seq;
                doc
            })
            .collect();
        if docs.is_empty() {
            return Vec::new();
        }
        let write = self.messages.insert_many(&docs).ordered(false).into_future();
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => crate::writer::outcomes(result, docs.len()),
            Err(_) => {
                let err = StoreError::Unavailable(format!("no answer within {timeout:?}"));
                (0..docs.len()).map(|_| Err(err.clone())).collect()
            }
        }
    }

    pub async fn by_client_message_id(
        &self,
        sender: &UserId,
        client_message_id: &str,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let filter =
            doc! { "sender_id": { "$eq": sender.as_str() }, "client_message_id": { "$eq": client_message_id } };
        self.bounded(self.messages.find_one(filter)).await?.map(MessageDoc::into_message).transpose()
    }

    /// Up to `limit` messages of `stream` from `cursor` that `reader` may see, oldest first.
    pub async fn history(
        &self,
        stream: &StreamId,
        reader: &Reader,
        cursor: Cursor,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let base = doc! { "stream_id": { "$eq": stream.as_str() } };
        let filters = match reader {
            Reader::Service => vec![base],
            Reader::Pair(a, b) => {
                let pair = [a.as_str(), b.as_str()];
                let mut filter = base;
                filter.insert("sender_id", doc! { "$in": pair.to_vec() });
                filter.insert("receiver_id", doc! { "$in": pair.to_vec() });
                vec![filter]
            }
            // Two indexed reads merged here instead of one `$or` (which the local
            // stand-in answers with a full scan): the caller sent it or received it.
            Reader::Participant(user) => ["sender_id", "receiver_id"]
                .into_iter()
                .map(|field| {
                    let mut filter = base.clone();
                    filter.insert(field, doc! { "$eq": user.as_str() });
                    filter
                })
                .collect(),
        };
        let mut merged: Vec<ChatMessage> = Vec::new();
        for filter in filters {
            merged.extend(self.history_page(filter, cursor, limit).await?);
        }
        merged.sort_by_key(|message| message.message_id);
        merged.dedup_by_key(|message| message.message_id);
        // Keep the `limit` nearest the cursor: the oldest for `Start`/`Since`, the
        // newest for `Before`.
        if merged.len() > limit as usize {
            match cursor {
                Cursor::Before(_) => {
                    merged.drain(..merged.len() - limit as usize);
                }
                _ => merged.truncate(limit as usize),
            }
        }
        Ok(merged)
    }

    async fn history_page(
        &self,
        mut filter: Document,
        cursor: Cursor,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let ascending = match cursor {
            Cursor::Start => true,
            Cursor::Since(id) => {
                filter.insert("message_id", doc! { "$gt": id.to_string() });
                true
            }
            Cursor::Before(id) => {
                filter.insert("message_id", doc! { "$lt": id.to_string() });
                false
            }
        };
        let order = if ascending { 1 } else { -1 };
        let find = async {
            self.messages
                .find(filter)
                .sort(doc! { "message_id": order })
                .limit(i64::from(limit))
                .await?
                .try_collect::<Vec<MessageDoc>>()
                .await
        };
        let docs = self.bounded(find).await?;
        docs.into_iter().map(MessageDoc::into_message).collect()
    }

    /// The oldest `limit` messages still marked for the relay, oldest first.
    /// Corrupt documents are returned as errors in place so the caller can skip them.
    pub async fn pending(&self, limit: u32) -> Result<Vec<Result<ChatMessage, StoreError>>, StoreError> {
        let find = async {
            self.messages
                .find(doc! { "outbox_pending": { "$eq": true } })
                .sort(doc! { "message_id": 1 })
                .limit(i64::from(limit))
                .await?
                .try_collect::<Vec<MessageDoc>>()
                .await
        };
        Ok(self.bounded(find).await?.into_iter().map(MessageDoc::into_message).collect())
    }

    /// Clears the outbox marker of the relay keys `keys` (after the broker
    /// acknowledged them): a new message's marker only while it is unchanged, a
    /// change's marker only while it is still that version, so a newer change keeps
    /// its marker and is published too.
    pub async fn clear_pending(&self, keys: &[String]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // Not journaled: a clear lost in a crash only means the message is
        // published once more, and skipping the journal flush keeps clears cheap.
        let unjournaled = WriteConcern::builder().w(Acknowledgment::Nodes(1)).journal(false).build();
        let update = doc! { "$unset": { "outbox_pending": "", "outbox_op": "" } };
        let (changes, new): (Vec<&String>, Vec<&String>) = keys.iter().partition(|key| key.contains(".v"));
        let mut cleared = 0;
        if !new.is_empty() {
            let filter =
                doc! { "_id": { "$in": new }, "outbox_pending": { "$eq": true }, "version": { "$exists": false } };
            let clear = self.messages.update_many(filter, update.clone()).write_concern(unjournaled.clone());
            cleared += self.bounded(clear).await?.modified_count;
        }
        for key in changes {
            let Some((id, version)) = key.rsplit_once(".v") else { continue };
            let version: i32 = version.parse().unwrap_or(-1);
            let filter =
                doc! { "_id": { "$eq": id }, "outbox_pending": { "$eq": true }, "version": { "$eq": version } };
            let clear = self.messages.update_one(filter, update.clone()).write_concern(unjournaled.clone());
            cleared += self.bounded(clear).await?.modified_count;
        }
        Ok(cleared)
    }

    /// How many messages wait for the relay.
    pub async fn count_pending(&self) -> Result<u64, StoreError> {
        self.bounded(self.messages.count_documents(doc! { "outbox_pending": { "$eq": true } })).await
    }

    /// Another collection of the same database (the domain collections).
    pub fn collection(&self, name: &str) -> Collection<Document> {
        self.client.database(&self.messages.namespace().db).collection(name)
    }

    /// Another collection of the same database, typed.
    pub fn typed_collection<T: Send + Sync>(&self, name: &str) -> Collection<T> {
        self.client.database(&self.messages.namespace().db).collection(name)
    }

    /// Message `id`, whatever its conversation.
    pub async fn message(&self, id: &MessageId) -> Result<Option<ChatMessage>, StoreError> {
        let found = self.bounded(self.messages.find_one(doc! { "_id": { "$eq": id.to_string() } })).await?;
        found.map(MessageDoc::into_message).transpose()
    }

    /// Applies `change` to message `id` unless it is deleted; `false` when nothing
    /// matched (deleted meanwhile). Marks it for the relay as a change.
    pub async fn change(&self, id: &MessageId, change: MessageChange, at: i64) -> Result<bool, StoreError> {
        let mut set = doc! { "changed_at": at };
        let mut unset = doc! {};
        match &change {
            MessageChange::Edit(content) => {
                set.insert("content", content.as_str());
                set.insert("edited_at", at);
            }
            MessageChange::Delete => {
                set.insert("content", "");
                set.insert("deleted_at", at);
                unset.insert("reactions", "");
            }
        }
        if self.outbox {
            set.insert("outbox_pending", true);
            set.insert("outbox_op", "u");
        }
        let mut update = doc! { "$set": set, "$inc": { "version": 1_i32 } };
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        let filter = doc! { "_id": { "$eq": id.to_string() }, "deleted_at": { "$exists": false } };
        let result = self.bounded(self.messages.update_one(filter, update)).await?;
        Ok(result.matched_count > 0)
    }

    /// Adds or removes `user`'s `emoji` reaction; `true` when it changed anything.
    pub async fn react(
        &self,
        id: &MessageId,
        user: &UserId,
        emoji: &str,
        add: bool,
        at: i64,
    ) -> Result<bool, StoreError> {
        // Read, change, write back under a revision check (optimistic concurrency):
        // the local stand-in supports neither `$addToSet` on a missing array nor
        // dotted paths into a missing object, and reports no-ops as modifications.
        // Callers hold the conversation's write lock, so a retry is rare (another
        // replica reacting at the same instant).
        let key = hex::encode(emoji);
        for _ in 0..3 {
            let filter = doc! { "_id": { "$eq": id.to_string() }, "deleted_at": { "$exists": false } };
            let Some(current) = self.bounded(self.messages.find_one(filter.clone())).await? else {
                return Ok(false);
            };
            let mut reactions = current.reactions.clone();
            let users = reactions.entry(key.clone()).or_default();
            let has = users.iter().any(|u| u == user.as_str());
            if has == add {
                return Ok(false);
            }
            if add {
                users.push(user.to_string());
            } else {
                users.retain(|u| u != user.as_str());
            }
            reactions.retain(|_, users| !users.is_empty());
            let mut guarded = filter;
            match current.reactions_rev {
                Some(rev) => guarded.insert("reactions_rev", doc! { "$eq": rev }),
                None => guarded.insert("reactions_rev", doc! { "$exists": false }),
            };
            let reactions = mongodb::bson::to_bson(&reactions).map_err(|e| StoreError::Other(e.to_string()))?;
            let update = doc! {
                "$set": { "reactions": reactions, "changed_at": at, "reactions_rev": current.reactions_rev.unwrap_or(0) + 1 },
            };
            if self.bounded(self.messages.update_one(guarded, update)).await?.matched_count > 0 {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable("the message's reactions kept changing; retry".into()))
    }

    /// Messages of `stream` changed (edited, deleted, reacted to) after `after_ms`
    /// whose ids are at most `up_to`: what a reconnecting client missed of messages it
    /// had already seen.
    pub async fn changed_since(
        &self,
        stream: &StreamId,
        after_ms: i64,
        up_to: &MessageId,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let filter = doc! {
            "stream_id": { "$eq": stream.as_str() },
            "changed_at": { "$gt": after_ms },
            "message_id": { "$lte": up_to.to_string() },
        };
        let find = async {
            self.messages
                .find(filter)
                .sort(doc! { "message_id": 1 })
                .limit(i64::from(limit))
                .await?
                .try_collect::<Vec<MessageDoc>>()
                .await
        };
        self.bounded(find).await?.into_iter().map(MessageDoc::into_message).collect()
    }

    /// The sequence number of message `id` in `stream` (`None`: no such message there).
    pub async fn message_seq(&self, stream: &StreamId, id: &MessageId) -> Result<Option<i64>, StoreError> {
        let filter = doc! { "_id": { "$eq": id.to_string() }, "stream_id": { "$eq": stream.as_str() } };
        let found = self.bounded(self.messages.find_one(filter)).await?;
        Ok(found.map(|doc| doc.seq.unwrap_or(0)))
    }

    /// The relay's lease collection.
    pub fn leases(&self) -> &Collection<Document> {
        &self.leases
    }

    /// The bound every operation runs under.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a lease operation under the same bound and error sorting.
    pub async fn run<T>(
        &self,
        op: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, StoreError> {
        self.bounded(op).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> ChatMessage {
        let a = UserId::parse("alice").expect("valid");
        let b = UserId::parse("bob").expect("valid");
        ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&a, &b),
            sender_id: a,
            receiver_id: Some(b),
            recipients: Vec::new(),
            content: MessageContent::parse("hi").expect("valid"),
            created_at: Utc.timestamp_millis_opt(1_760_000_000_123).single().expect("valid"),
            state: Default::default(),
        }
    }

    #[test]
    fn documents_round_trip_and_carry_the_marker_only_in_outbox_mode() {
        let m = message();
        let doc = MessageDoc::new(&m, Some("c-1"), true);
        assert_eq!(doc.id, m.message_id.to_string());
        assert_eq!(doc.outbox_pending, Some(true));
        let bson = mongodb::bson::to_document(&doc).expect("serialize");
        assert!(bson.get_datetime("created_at").is_ok(), "created_at is a BSON date: {bson}");
        assert_eq!(bson.get_bool("outbox_pending"), Ok(true));
        let plain = mongodb::bson::to_document(&MessageDoc::new(&m, None, false)).expect("serialize");
        assert!(!plain.contains_key("outbox_pending") && !plain.contains_key("client_message_id"), "{plain}");
        assert_eq!(doc.into_message().expect("valid"), m);
    }

    #[test]
    fn a_group_message_stores_its_recipients_as_one_string_and_reads_the_array_form_too() {
        let user = |raw: &str| UserId::parse(raw).expect("valid");
        let group = ChatMessage {
            stream_id: StreamId::new_group(),
            receiver_id: None,
            recipients: vec![user("bob"), user("carol")],
            ..message()
        };
        let mut bson = mongodb::bson::to_document(&MessageDoc::new(&group, None, false)).expect("serialize");
        assert_eq!(bson.get_str("recipients"), Ok("bob carol"), "{bson}");
        let doc: MessageDoc = mongodb::bson::from_document(bson.clone()).expect("joined form");
        assert_eq!(doc.into_message().expect("valid"), group);
        bson.insert("recipients", vec!["bob", "carol"]);
        let doc: MessageDoc = mongodb::bson::from_document(bson).expect("array form");
        assert_eq!(doc.into_message().expect("valid"), group);
        let plain = mongodb::bson::to_document(&MessageDoc::new(&message(), None, false)).expect("serialize");
        assert!(!plain.contains_key("recipients"), "a pair message has none: {plain}");
    }

    #[test]
    fn corrupt_documents_are_reported() {
        let mut doc = MessageDoc::new(&message(), None, false);
        doc.stream_id = "nope".into();
        assert!(matches!(doc.into_message(), Err(StoreError::Corrupt { .. })));
    }
}
