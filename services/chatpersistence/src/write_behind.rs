//! Write-behind (`WRITE_MODE=write_behind`): a message is acknowledged (`202`) once
//! it is appended to a Redis Stream, and a background writer bulk-inserts batches
//! into MongoDB.
//!
//! Why this module exists: in direct mode every `201` waits for MongoDB's journal,
//! so a burst above what the database takes at once turns into latency and then
//! 503s. Write-behind takes the burst at Redis speed and lets MongoDB catch up, with
//! no weaker guarantee: nothing is acknowledged that is not durable in the queue
//! (Redis with AOF, see `docs/chatpersistence.md`), and nothing leaves the queue
//! before MongoDB acknowledged it.
//!
//! The parts:
//! - **The queue.** `WRITE_BEHIND_SHARDS` streams `{prefix}:q:{n}`; a conversation
//!   always goes to the same one. One Lua script accepts a message atomically: the
//!   idempotency key (`client_message_id`), the high-water mark, the `XADD`, the
//!   queued copy the status and history reads use (`{prefix}:queued`,
//!   `{prefix}:qc:{conversation}`) and the depth counter.
//! - **The writers.** Every replica runs one task per shard; a shard is written by
//!   whoever holds its lease (`{prefix}:lease:{n}`, `SET NX PX`, renewed every
//!   TTL/3), so a conversation's messages are written in queue order even with
//!   several replicas. Reads go through a consumer group: an entry stays pending until
//!   its batch is in MongoDB; a new lease holder claims the previous holder's pending
//!   entries (`XAUTOCLAIM`) and writes them first.
//! - **A batch.** The conversations' projection (sequence numbers, last message,
//!   sender's read marker, inbox activity) with one read and one conditional update
//!   per conversation, remembering the last entry applied (`wb_last`) so a replayed
//!   batch is not counted twice; then one unordered `insert_many` (a message already
//!   stored fails alone as a duplicate and counts as stored, nothing stored is
//!   overwritten); then the relay is handed the new messages (the insert carries the
//!   outbox marker, so capture is unchanged); then one script acknowledges and
//!   deletes the entries and their queued copies.
//! - **MongoDB down.** The batch stays pending and is retried with a capped backoff;
//!   the queue is the backup queue. Admission stops at `WRITE_BEHIND_HIGH_WATER`
//!   (503 + `Retry-After`), never by dropping.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::{ChatMessage, MessageId, StreamId, UserId};
use eventstore::RedisConnection;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use serde::{Deserialize, Serialize};
use servicekit::Shutdown;
use tokio::sync::Notify;

use crate::conversations::Conversations;
use crate::recent_cache::RecentCache;
use crate::relay::RelayFeed;
use crate::settings::WriteBehindSettings;
use crate::store::{Cursor, Store, StoreError};

/// The consumer group every writer reads through.
const GROUP: &str = "writers";
/// The first wait after a failed batch; doubled up to `WRITE_BEHIND_MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A batch's `insert_many` may take this many `MONGODB_TIMEOUT`s (a thousand
/// documents is one write, but a long one).
const INSERT_TIMEOUTS: u32 = 5;
/// Attempts of one conversation's conditional update before the batch is retried.
const PROJECTION_ATTEMPTS: usize = 4;

/// One queue entry: the message as accepted, and its idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedMessage {
    pub message: ChatMessage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    /// The POST's W3C trace context (the message's own `trace` is not serialized),
    /// put back on the message when it is written (docs/observability.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// Why the queue did not take or answer something.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the write-behind queue is unavailable: {0}")]
    Unavailable(String),
    #[error("the write-behind queue is full ({0} messages queued)")]
    Full(u64),
    /// The message id is not above the conversation's last accepted one (another
    /// replica accepted one in the same millisecond): take a new id and try again.
    #[error("a newer message of this conversation was accepted meanwhile")]
    OutOfOrder,
    #[error("unexpected reply from the write-behind queue: {0}")]
    Protocol(String),
}

impl From<eventstore::EventStoreError> for QueueError {
    fn from(err: eventstore::EventStoreError) -> Self {
        Self::Unavailable(err.to_string())
    }
}

/// What the queue did with a message.
pub enum Admitted {
    /// Appended (durable once Redis persisted it, per its AOF policy).
    Queued,
    /// The same `(sender, client_message_id)` was accepted before: the original.
    Replay(Box<QueuedMessage>),
}

const ACCEPT: &str = r#"
-- KEYS: stream, depth, queued hash, conversation's queued set, idempotency key,
--       conversation's last accepted message id
-- ARGV: entry json, message id, high water, idempotency ttl (s), has idempotency key
if ARGV[5] == '1' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return {'dup', prior} end
end
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
if depth >= tonumber(ARGV[3]) then return {'full', tostring(depth)} end
-- Ids (UUIDv7, lower-case hex) compare like their times: a conversation's queue
-- order is its id order, even when replicas' clocks or milliseconds interleave.
local last = redis.call('GET', KEYS[6])
if last and ARGV[2] <= last then return {'order', last} end
redis.call('SET', KEYS[6], ARGV[2], 'EX', 3600)
local entry = redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[2])
depth = redis.call('INCR', KEYS[2])
if ARGV[5] == '1' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[4]) end
return {'ok', entry, tostring(depth)}
"#;

const COMMIT: &str = r#"
-- KEYS: stream, depth, queued hash
-- ARGV: group, n, n entry ids, m, m pairs (message id, conversation's queued set)
local n = tonumber(ARGV[2])
local acked = 0
for i = 1, n do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], ARGV[2 + i])
  redis.call('XDEL', KEYS[1], ARGV[2 + i])
end
local base = 3 + n
local m = tonumber(ARGV[base])
for i = 1, m do
  redis.call('HDEL', KEYS[3], ARGV[base + 2 * i - 1])
  redis.call('ZREM', ARGV[base + 2 * i], ARGV[base + 2 * i - 1])
end
local depth = redis.call('DECRBY', KEYS[2], acked)
if depth < 0 then redis.call('SET', KEYS[2], 0) depth = 0 end
return depth
"#;

const PAGE: &str = r#"
-- KEYS: conversation's queued set, queued hash; ARGV: mode, cursor id, limit
local ids
if ARGV[1] == 'since' then
  ids = redis.call('ZRANGEBYLEX', KEYS[1], '(' .. ARGV[2], '+', 'LIMIT', 0, ARGV[3])
elseif ARGV[1] == 'before' then
  ids = redis.call('ZREVRANGEBYLEX', KEYS[1], '(' .. ARGV[2], '-', 'LIMIT', 0, ARGV[3])
else
  ids = redis.call('ZRANGEBYLEX', KEYS[1], '-', '+', 'LIMIT', 0, ARGV[3])
end
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
"#;

const LEASE: &str = r#"
-- KEYS: lease; ARGV: holder, ttl ms, release ('1': give it up)
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == '1' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"#;

/// The Redis side of write-behind: accepting, looking up, and the writers' reads.
pub struct Queue {
    conn: RedisConnection,
    prefix: String,
    shards: u32,
    high_water: u64,
    idempotency_ttl_secs: u64,
    /// Wakes a shard's local writer after an accept.
    wakes: Vec<Notify>,
    accept: redis::Script,
    commit: redis::Script,
    page: redis::Script,
    lease: redis::Script,
}

impl Queue {
    pub fn new(url: &str, settings: &WriteBehindSettings) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("WRITE_BEHIND_REDIS_URL is not usable: {e}"))?;
        Ok(Self {
            conn: RedisConnection::new(client, settings.redis_timeout),
            prefix: settings.key_prefix.trim_end_matches(':').to_owned(),
            shards: settings.shards.max(1),
            high_water: settings.high_water,
            idempotency_ttl_secs: settings.idempotency_ttl.as_secs().max(1),
            wakes: (0..settings.shards.max(1)).map(|_| Notify::new()).collect(),
            accept: redis::Script::new(ACCEPT),
            commit: redis::Script::new(COMMIT),
            page: redis::Script::new(PAGE),
            lease: redis::Script::new(LEASE),
        })
    }

    /// The shard a conversation's messages are queued in.
    pub fn shard(&self, stream: &StreamId) -> u32 {
        // Stream ids are hex digests (after a group's prefix): their leading bytes are uniform.
        let head = stream.digest_hex().get(..8).unwrap_or_default();
        (u64::from_str_radix(head, 16).unwrap_or(0) % u64::from(self.shards)) as u32
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    fn stream_key(&self, shard: u32) -> String {
        format!("{}:q:{shard}", self.prefix)
    }

    fn depth_key(&self) -> String {
        format!("{}:depth", self.prefix)
    }

    fn queued_key(&self) -> String {
        format!("{}:queued", self.prefix)
    }

    fn conversation_key(&self, stream: &str) -> String {
        format!("{}:qc:{stream}", self.prefix)
    }

    fn idempotency_key(&self, sender: &UserId, client_message_id: &str) -> String {
        format!("{}:idem:{}:{client_message_id}", self.prefix, hex::encode(sender.as_str()))
    }

    fn lease_key(&self, shard: u32) -> String {
        format!("{}:lease:{shard}", self.prefix)
    }

    /// Appends `entry` durably, or answers the original of a retried
    /// `client_message_id`, or refuses at the high-water mark.
    pub async fn accept(&self, entry: &QueuedMessage) -> Result<Admitted, QueueError> {
        let json = serde_json::to_string(entry).map_err(|e| QueueError::Protocol(e.to_string()))?;
        let message = &entry.message;
        let shard = self.shard(&message.stream_id);
        let idempotency = entry.client_message_id.as_deref().map(|c| self.idempotency_key(&message.sender_id, c));
        let mut invocation = self.accept.prepare_invoke();
        invocation
            .key(self.stream_key(shard))
            .key(self.depth_key())
            .key(self.queued_key())
            .key(self.conversation_key(message.stream_id.as_str()))
            .key(idempotency.clone().unwrap_or_else(|| self.depth_key()))
            .key(format!("{}:last:{}", self.prefix, message.stream_id))
            .arg(&json)
            .arg(message.message_id.to_string())
            .arg(self.high_water)
            .arg(self.idempotency_ttl_secs)
            .arg(if idempotency.is_some() { "1" } else { "0" });
        let reply: Vec<String> =
            self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => {
                if let Some(depth) = reply.get(2).and_then(|d| d.parse::<f64>().ok()) {
                    metrics::gauge!("write_behind_queue_depth").set(depth);
                }
                self.wakes[shard as usize].notify_one();
                Ok(Admitted::Queued)
            }
            Some("dup") => {
                let prior = reply.get(1).ok_or_else(|| QueueError::Protocol("dup without original".into()))?;
                let original = serde_json::from_str(prior).map_err(|e| QueueError::Protocol(e.to_string()))?;
                Ok(Admitted::Replay(Box::new(original)))
            }
            Some("full") => Err(QueueError::Full(reply.get(1).and_then(|d| d.parse().ok()).unwrap_or(0))),
            Some("order") => Err(QueueError::OutOfOrder),
            _ => Err(QueueError::Protocol(format!("{reply:?}"))),
        }
    }

    /// The queued (not yet stored) message `id`, if it is queued.
    pub async fn queued(&self, id: &MessageId) -> Result<Option<ChatMessage>, QueueError> {
        let key = self.queued_key();
        let id = id.to_string();
        let found: Option<String> = self
            .conn
            .run(|mut conn| async move { redis::cmd("HGET").arg(key).arg(id).query_async(&mut conn).await })
            .await?;
        found
            .map(|json| serde_json::from_str::<QueuedMessage>(&json).map(|q| q.message))
            .transpose()
            .map_err(|e| QueueError::Protocol(e.to_string()))
    }

    /// Up to `limit` queued messages of `stream` from `cursor` (nearest the cursor first
    /// for `Before`, oldest first otherwise), for merging into a history page.
    pub async fn page(&self, stream: &StreamId, cursor: Cursor, limit: u32) -> Result<Vec<ChatMessage>, QueueError> {
        let (mode, at) = match cursor {
            Cursor::Start => ("start", String::new()),
            Cursor::Since(id) => ("since", id.to_string()),
            Cursor::Before(id) => ("before", id.to_string()),
        };
        let mut invocation = self.page.prepare_invoke();
        invocation.key(self.conversation_key(stream.as_str())).key(self.queued_key()).arg(mode).arg(at).arg(limit);
        let found: Vec<Option<String>> =
            self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        let mut messages = Vec::with_capacity(found.len());
        for json in found.into_iter().flatten() {
            match serde_json::from_str::<QueuedMessage>(&json) {
                Ok(entry) => messages.push(entry.message),
                Err(err) => tracing::warn!(error = %err, "unreadable queued message skipped in a history page"),
            }
        }
        Ok(messages)
    }

    /// Takes or renews shard `shard`'s writer lease for `holder`; `true` while held.
    async fn hold(&self, shard: u32, holder: &str, ttl: Duration) -> Result<bool, QueueError> {
        let mut invocation = self.lease.prepare_invoke();
        invocation.key(self.lease_key(shard)).arg(holder).arg(ttl.as_millis() as u64).arg("0");
        let held: i64 = self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        Ok(held == 1)
    }

    async fn release(&self, shard: u32, holder: &str) {
        let mut invocation = self.lease.prepare_invoke();
        invocation.key(self.lease_key(shard)).arg(holder).arg(1).arg("1");
        let _: Result<i64, _> = self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await;
    }

    /// Creates the consumer group (idempotent) and moves every pending entry of the
    /// shard to `holder`: called when the lease is taken, so a dead writer's entries
    /// are written (first, in order) by the new one.
    async fn take_over(&self, shard: u32, holder: &str) -> Result<u64, QueueError> {
        self.ensure_group(shard).await?;
        let key = self.stream_key(shard);
        let mut start = "0-0".to_owned();
        let mut claimed = 0_u64;
        // Bounded: each round claims up to 1,000 and the cursor only moves forward.
        for _ in 0..10_000 {
            let (key, holder, from) = (key.clone(), holder.to_owned(), start.clone());
            let reply: redis::Value = self
                .conn
                .run(|mut conn| async move {
                    redis::cmd("XAUTOCLAIM")
                        .arg(key)
                        .arg(GROUP)
                        .arg(holder)
                        .arg(0)
                        .arg(from)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("JUSTID")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let items = array(reply);
            let next = items.first().and_then(text).unwrap_or_else(|| "0-0".to_owned());
            claimed += items.get(1).map(|ids| array(ids.clone()).len() as u64).unwrap_or(0);
            if next == "0-0" {
                break;
            }
            start = next;
        }
        Ok(claimed)
    }

    async fn ensure_group(&self, shard: u32) -> Result<(), QueueError> {
        let key = self.stream_key(shard);
        let created: Result<(), QueueError> = self
            .conn
            .run(|mut conn| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(key)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
            .map_err(QueueError::from);
        match created {
            Err(QueueError::Unavailable(err)) if err.contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Up to `count` entries of shard `shard` for `holder`: its own pending ones
    /// (`from = "0"`) or new ones (`">"`). Entries already deleted come back without a
    /// body (`None`).
    async fn read(&self, shard: u32, holder: &str, from: &str, count: u32) -> Result<Vec<Entry>, QueueError> {
        let key = self.stream_key(shard);
        let holder = holder.to_owned();
        let from = from.to_owned();
        let reply: redis::Value = self
            .conn
            .run(|mut conn| async move {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(holder)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(from)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut entries = Vec::new();
        for stream in array(reply) {
            let parts = array(stream);
            for item in parts.get(1).cloned().map(array).unwrap_or_default() {
                let item = array(item);
                let Some(id) = item.first().and_then(text) else { continue };
                let fields = item.get(1).cloned().map(array).unwrap_or_default();
                let body = fields.chunks(2).find(|kv| kv.first().and_then(text).as_deref() == Some("m"));
                entries.push(Entry { id, body: body.and_then(|kv| kv.get(1)).and_then(text) });
            }
        }
        Ok(entries)
    }

    /// Acknowledges and deletes a written batch's entries and their queued copies.
    async fn commit(&self, shard: u32, entries: &[String], messages: &[&ChatMessage]) -> Result<(), QueueError> {
        let mut invocation = self.commit.prepare_invoke();
        invocation.key(self.stream_key(shard)).key(self.depth_key()).key(self.queued_key()).arg(GROUP);
        invocation.arg(entries.len());
        for entry in entries {
            invocation.arg(entry);
        }
        invocation.arg(messages.len());
        for message in messages {
            invocation.arg(message.message_id.to_string()).arg(self.conversation_key(message.stream_id.as_str()));
        }
        let depth: i64 = self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        metrics::gauge!("write_behind_queue_depth").set(depth as f64);
        Ok(())
    }
}

/// One stream entry as read: its id, and its body unless it was deleted already.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    body: Option<String>,
}

fn array(value: redis::Value) -> Vec<redis::Value> {
    match value {
        redis::Value::Array(items) | redis::Value::Set(items) => items,
        _ => Vec::new(),
    }
}

fn text(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// A stream entry id as a comparable pair (`<ms>-<seq>`).
fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn int(doc: &Document, field: &str) -> i64 {
    match doc.get(field) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    }
}

/// The fleet's one retry policy (kafkawrapper::retry), doubling from
/// [`FIRST_BACKOFF`] to `WRITE_BEHIND_MAX_BACKOFF`, without a retry limit: the entries
/// wait in the queue, and admission is what is bounded (the high-water mark).
fn backoff(max: Duration) -> kafkawrapper::Backoff {
    kafkawrapper::RetrySettings::doubling(FIRST_BACKOFF, max, 0).unbounded()
}

/// An existing conversation's update, sent with the batch's others in one command.
struct Planned {
    stream: StreamId,
    filter: Document,
    update: Document,
    newest_entry: String,
}

/// One shard's writer in this replica (active while it holds the shard's lease).
pub struct ShardWriter {
    queue: Arc<Queue>,
    store: Store,
    conversations: Conversations,
    conversation_docs: mongodb::Collection<Document>,
    feed: Option<Arc<RelayFeed>>,
    cache: Option<Arc<RecentCache>>,
    shard: u32,
    holder: String,
    settings: WriteBehindSettings,
    insert_timeout: Duration,
    /// Set once the indexes exist (the unique `(sender, client_message_id)` index
    /// is what refuses a retry whose Redis key expired).
    indexes_ready: Arc<std::sync::atomic::AtomicBool>,
}

/// What every shard writer of a replica shares.
#[derive(Clone)]
pub struct WriterParts {
    pub queue: Arc<Queue>,
    pub store: Store,
    pub conversations: Conversations,
    pub feed: Option<Arc<RelayFeed>>,
    pub cache: Option<Arc<RecentCache>>,
    /// This replica's consumer name and lease holder id.
    pub holder: String,
    pub settings: WriteBehindSettings,
    pub indexes_ready: Arc<std::sync::atomic::AtomicBool>,
}

impl ShardWriter {
    pub fn new(parts: &WriterParts, shard: u32) -> Self {
        let parts = parts.clone();
        Self {
            conversation_docs: parts.store.collection("conversations"),
            insert_timeout: parts.store.timeout() * INSERT_TIMEOUTS,
            queue: parts.queue,
            store: parts.store,
            conversations: parts.conversations,
            feed: parts.feed,
            cache: parts.cache,
            shard,
            holder: parts.holder,
            settings: parts.settings,
            indexes_ready: parts.indexes_ready,
        }
    }

    /// Writes the shard's batches while this replica holds its lease, until shutdown.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), String> {
        let ttl = self.settings.lease_ttl;
        let mut held = false;
        let mut renewed: Option<Instant> = None;
        let mut own_pending_first = true;
        let max_backoff = self.settings.max_backoff;
        let mut backoff = backoff(max_backoff);
        let fail = move |backoff: &mut kafkawrapper::Backoff| backoff.next().unwrap_or(max_backoff);
        let mut last_warning: Option<Instant> = None;
        let wake = &self.queue.wakes[self.shard as usize];
        while !shutdown.is_triggered() {
            if renewed.is_none_or(|at| at.elapsed() >= ttl / 3) {
                match self.queue.hold(self.shard, &self.holder, ttl).await {
                    Ok(true) => {
                        if !held {
                            match self.queue.take_over(self.shard, &self.holder).await {
                                Ok(claimed) => {
                                    tracing::info!(shard = self.shard, claimed, "write-behind shard taken");
                                    held = true;
                                    own_pending_first = true;
                                }
                                Err(err) => {
                                    tracing::warn!(shard = self.shard, error = %err, "cannot take over the shard yet")
                                }
                            }
                        }
                        renewed = Some(Instant::now());
                    }
                    Ok(false) => {
                        if held {
                            tracing::warn!(shard = self.shard, "write-behind shard lease lost to another writer");
                        }
                        held = false;
                        renewed = Some(Instant::now());
                    }
                    Err(err) => {
                        held = false;
                        renewed = None;
                        warn_sometimes(&mut last_warning, &err.to_string(), "write-behind queue unreachable");
                        pause(&shutdown, fail(&mut backoff)).await;
                        continue;
                    }
                }
            }
            metrics::gauge!("write_behind_shards_held", "shard" => self.shard.to_string()).set(if held {
                1.0
            } else {
                0.0
            });
            if !held || !self.indexes_ready.load(std::sync::atomic::Ordering::Acquire) {
                pause(&shutdown, ttl / 3).await;
                continue;
            }
            let from = if own_pending_first { "0" } else { ">" };
            let entries = match self.queue.read(self.shard, &self.holder, from, self.settings.batch_size).await {
                Ok(entries) => entries,
                Err(err) => {
                    if err.to_string().contains("NOGROUP") {
                        // The stream was lost (Redis restarted without its data): start over.
                        held = false;
                        renewed = None;
                    }
                    warn_sometimes(&mut last_warning, &err.to_string(), "write-behind queue unreachable");
                    pause(&shutdown, fail(&mut backoff)).await;
                    continue;
                }
            };
            if entries.is_empty() {
                if own_pending_first {
                    own_pending_first = false;
                    continue;
                }
                tokio::select! {
                    _ = shutdown.wait() => {}
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.flush_interval) => {}
                }
                continue;
            }
            match self.write(entries).await {
                Ok(()) => backoff = self::backoff(max_backoff),
                Err(err) => {
                    metrics::counter!("write_behind_batch_failures_total").increment(1);
                    warn_sometimes(&mut last_warning, &err, "write-behind batch not stored yet; retrying");
                    own_pending_first = true;
                    pause(&shutdown, fail(&mut backoff)).await;
                }
            }
        }
        if held {
            self.queue.release(self.shard, &self.holder).await;
        }
        Ok(())
    }

    /// Writes one batch: projection, insert, relay hand-off, acknowledgement.
    async fn write(&self, entries: Vec<Entry>) -> Result<(), String> {
        let started = Instant::now();
        let mut batch: Vec<(String, QueuedMessage)> = Vec::with_capacity(entries.len());
        let mut done_ids: Vec<String> = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry.body.as_deref().map(serde_json::from_str::<QueuedMessage>) {
                Some(Ok(mut queued)) => {
                    queued.message.state.trace = queued.trace.take();
                    batch.push((entry.id, queued))
                }
                // Deleted already: a commit that landed before a crash.
                None => done_ids.push(entry.id),
                Some(Err(err)) => {
                    metrics::counter!("write_behind_unreadable_entries_total").increment(1);
                    tracing::error!(entry = %entry.id, error = %err, "unreadable queue entry dropped");
                    done_ids.push(entry.id);
                }
            }
        }
        let seqs = self.project(&batch).await.map_err(|e| e.to_string())?;
        let rows: Vec<(&ChatMessage, Option<&str>, Option<i64>)> = batch
            .iter()
            .map(|(_, q)| (&q.message, q.client_message_id.as_deref(), seqs.get(&q.message.message_id).copied()))
            .collect();
        let outcomes = self.store.insert_batch(&rows, self.insert_timeout).await;
        let mut fresh = Vec::with_capacity(batch.len());
        for ((_, queued), outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(()) => fresh.push(&queued.message),
                Err(StoreError::Duplicate(detail)) => {
                    // Stored by an earlier attempt of this batch, or (rare) a retried
                    // client_message_id whose Redis key had expired: that one is not stored.
                    if self.store.message(&queued.message.message_id).await.map_err(|e| e.to_string())?.is_none() {
                        metrics::counter!("write_behind_superseded_total").increment(1);
                        tracing::warn!(message = %queued.message.message_id, %detail, "queued message duplicates a stored one; not stored");
                    }
                }
                Err(err) => return Err(err.to_string()),
            }
        }
        if let Some(feed) = &self.feed {
            for message in &fresh {
                feed.offer((*message).clone());
            }
        }
        if let Some(cache) = &self.cache {
            // Before the queued copies go: a reader that no longer finds a message
            // queued finds it cached (or the cache absent).
            let mut by_stream: Vec<(&StreamId, Vec<&ChatMessage>)> = Vec::new();
            for (_, queued) in &batch {
                let stream = &queued.message.stream_id;
                match by_stream.iter_mut().find(|(s, _)| *s == stream) {
                    Some((_, messages)) => messages.push(&queued.message),
                    None => by_stream.push((stream, vec![&queued.message])),
                }
            }
            for (stream, messages) in by_stream {
                cache.append(stream, &messages).await?;
            }
        }
        done_ids.extend(batch.iter().map(|(id, _)| id.clone()));
        let messages: Vec<&ChatMessage> = batch.iter().map(|(_, q)| &q.message).collect();
        self.queue.commit(self.shard, &done_ids, &messages).await.map_err(|e| e.to_string())?;
        metrics::counter!("write_behind_stored_total").increment(fresh.len() as u64);
        metrics::histogram!("write_behind_batch_size").record(batch.len() as f64);
        metrics::histogram!("write_behind_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        if let Some(oldest) = batch.first() {
            let age = chrono::Utc::now() - oldest.1.message.created_at;
            metrics::gauge!("write_behind_lag_seconds").set(age.num_milliseconds().max(0) as f64 / 1000.0);
        }
        Ok(())
    }

    /// Conversation documents by id.
    async fn read_conversations(&self, ids: Vec<&str>) -> Result<HashMap<String, Document>, StoreError> {
        let find = async {
            self.conversation_docs.find(doc! { "_id": { "$in": ids } }).await?.try_collect::<Vec<Document>>().await
        };
        let found = self.store.run(find).await?;
        Ok(found.into_iter().filter_map(|d| d.get_str("_id").ok().map(str::to_owned).map(|id| (id, d))).collect())
    }

    /// The conversations' share of a batch: each message's sequence number.
    async fn project(&self, batch: &[(String, QueuedMessage)]) -> Result<HashMap<MessageId, i64>, StoreError> {
        let mut order: Vec<&StreamId> = Vec::new();
        let mut groups: HashMap<&StreamId, Vec<(&str, &QueuedMessage)>> = HashMap::new();
        for (entry, queued) in batch {
            let stream = &queued.message.stream_id;
            groups
                .entry(stream)
                .or_insert_with(|| {
                    order.push(stream);
                    Vec::new()
                })
                .push((entry.as_str(), queued));
        }
        let mut current = self.read_conversations(order.iter().map(|s| s.as_str()).collect()).await?;
        let mut seqs = HashMap::with_capacity(batch.len());
        // First pass: existing conversations' updates are collected and sent as one
        // `update` command (one round trip, one journal flush, instead of one per
        // conversation); new conversations are written at once.
        let mut bulk: Vec<Planned> = Vec::new();
        let mut individually: Vec<&StreamId> = Vec::new();
        for stream in &order {
            match self.project_one(stream, &groups[*stream], current.get(stream.as_str()), Some(&mut bulk)).await? {
                Some(done) => seqs.extend(done),
                None => individually.push(stream),
            }
        }
        if !bulk.is_empty() {
            let statements: Vec<Document> = bulk
                .iter()
                .map(|p| doc! { "q": p.filter.clone(), "u": p.update.clone(), "upsert": false, "multi": false })
                .collect();
            let command = doc! {
                "update": self.conversation_docs.name(),
                "updates": statements,
                "ordered": false,
                "writeConcern": { "w": "majority", "j": true },
            };
            let db = self.conversation_docs.client().database(&self.conversation_docs.namespace().db);
            let reply = self.store.run(db.run_command(command)).await?;
            if int(&reply, "n") < bulk.len() as i64 {
                metrics::counter!("write_behind_projection_conflicts_total").increment(1);
                // Some conversation changed meanwhile (another writer): those whose
                // update did not land are projected again, one by one.
                let now = self.read_conversations(bulk.iter().map(|p| p.stream.as_str()).collect()).await?;
                for planned in &bulk {
                    let landed = now.get(planned.stream.as_str()).and_then(|d| d.get_str("wb_last").ok());
                    if landed != Some(planned.newest_entry.as_str()) {
                        individually
                            .push(order.iter().copied().find(|s| **s == planned.stream).unwrap_or(&planned.stream));
                        current.insert(
                            planned.stream.to_string(),
                            now.get(planned.stream.as_str()).cloned().unwrap_or_default(),
                        );
                    }
                }
            }
        }
        for stream in individually {
            let messages = &groups[stream];
            let mut known = current.remove(stream.as_str()).filter(|d| !d.is_empty());
            let mut applied = None;
            for attempt in 0..PROJECTION_ATTEMPTS {
                if attempt > 0 {
                    known = self
                        .store
                        .run(self.conversation_docs.find_one(doc! { "_id": { "$eq": stream.as_str() } }))
                        .await?;
                }
                if let Some(done) = self.project_one(stream, messages, known.as_ref(), None).await? {
                    applied = Some(done);
                    break;
                }
            }
            let applied = applied
                .ok_or_else(|| StoreError::Unavailable(format!("conversation {stream} kept changing; retrying")))?;
            seqs.extend(applied);
        }
        Ok(seqs)
    }

    /// Applies one conversation's messages (in queue order) unless an earlier
    /// attempt did; `None` when the conversation changed meanwhile (try again). With
    /// `bulk`, an existing conversation's update is collected there instead of sent
    /// (the seqs returned hold if it lands).
    async fn project_one(
        &self,
        stream: &StreamId,
        messages: &[(&str, &QueuedMessage)],
        current: Option<&Document>,
        bulk: Option<&mut Vec<Planned>>,
    ) -> Result<Option<Vec<(MessageId, i64)>>, StoreError> {
        let Some((_, first)) = messages.first() else { return Ok(Some(Vec::new())) };
        let pair: Option<Vec<String>> = first.message.receiver_id.as_ref().map(|receiver| {
            let mut members = vec![first.message.sender_id.to_string(), receiver.to_string()];
            members.sort();
            members
        });
        let pair_key = pair.as_ref().map(|m| m.join(" "));
        // Whose inbox rows move: the stored member list (a pair's two users before
        // its document exists). Known members let the activity flush address rows
        // by id, and a list request owe each row to its own user only.
        let members: Option<Vec<String>> = current
            .and_then(|d| d.get_array("members").ok())
            .map(|list| list.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect::<Vec<_>>())
            .filter(|list| !list.is_empty())
            .or_else(|| pair.clone());
        let seq0 = current.map_or(0, |d| int(d, "seq"));
        let last = current.and_then(|d| d.get_str("wb_last").ok()).map(str::to_owned);
        if let (Some(doc), Some(key)) = (current, pair_key.as_deref()) {
            if doc.get_str("pair_key").ok() != Some(key) {
                // A legacy id two pairs share: stored and delivered, no inbox entry
                // (as in direct mode).
                metrics::counter!("legacy_stream_id_collisions_total").increment(1);
                return Ok(Some(Vec::new()));
            }
        }
        // Entries up to `wb_last` were applied by an earlier attempt (they are the
        // newest applied ones: a shard is written in order), the rest are new.
        let done = last
            .as_deref()
            .map_or(0, |last| messages.iter().take_while(|(entry, _)| entry_order(entry) <= entry_order(last)).count());
        let mut out: Vec<(MessageId, i64)> = Vec::with_capacity(messages.len());
        for (i, (_, queued)) in messages[..done].iter().enumerate() {
            let seq = seq0 - done as i64 + 1 + i as i64;
            if seq >= 1 {
                out.push((queued.message.message_id, seq));
            }
        }
        let fresh = &messages[done..];
        let Some((newest_entry, newest)) = fresh.last() else { return Ok(Some(out)) };
        let mut reads = Document::new();
        for (j, (_, queued)) in fresh.iter().enumerate() {
            let seq = seq0 + 1 + j as i64;
            out.push((queued.message.message_id, seq));
            reads.insert(crate::conversations::read_key(&queued.message.sender_id), seq);
        }
        let at = newest.message.created_at.timestamp_millis();
        let last_message = doc! {
            "message_id": newest.message.message_id.to_string(),
            "sender_id": newest.message.sender_id.as_str(),
            "excerpt": crate::api::excerpt(&newest.message.content),
            "created_at": at,
        };
        match (current, &pair) {
            (None, Some(members)) => {
                // A pair's first messages: the conversation and both inbox rows.
                let mut nested = Document::new();
                for (key, value) in &reads {
                    nested.insert(key.trim_start_matches("reads."), value.clone());
                }
                let created = doc! {
                    "_id": stream.as_str(),
                    "kind": "direct",
                    "pair_key": pair_key.clone().unwrap_or_default(),
                    "members": members.clone(),
                    "seq": seq0 + fresh.len() as i64,
                    "last_message": last_message,
                    "created_at": first.message.created_at.timestamp_millis(),
                    "updated_at": at,
                    "reads": nested,
                    "wb_last": *newest_entry,
                };
                match self.store.run(self.conversation_docs.insert_one(created)).await {
                    Ok(_) => {}
                    Err(StoreError::Duplicate(_)) => return Ok(None),
                    Err(err) => return Err(err),
                }
                for member in members.iter().filter_map(|m| UserId::parse(m).ok()) {
                    self.conversations.upsert_membership(stream, &member, true, at).await?;
                }
            }
            (None, None) => {
                // A group that does not exist (any more): the messages are stored without a number.
                tracing::warn!(conversation = %stream, "queued group messages for a missing group");
                return Ok(Some(Vec::new()));
            }
            (Some(_), _) => {
                let mut filter = doc! { "_id": { "$eq": stream.as_str() }, "seq": { "$eq": seq0 } };
                match &last {
                    Some(last) => filter.insert("wb_last", doc! { "$eq": last.as_str() }),
                    None => filter.insert("wb_last", doc! { "$exists": false }),
                };
                let update = doc! {
                    "$inc": { "seq": fresh.len() as i64 },
                    "$set": { "last_message": last_message, "updated_at": at, "wb_last": *newest_entry },
                    "$max": reads,
                };
                if let Some(bulk) = bulk {
                    bulk.push(Planned { stream: *stream, filter, update, newest_entry: (*newest_entry).to_owned() });
                    self.conversations.touch_activity(stream, at, members.as_deref());
                    return Ok(Some(out));
                }
                let result = self.store.run(self.conversation_docs.update_one(filter, update)).await?;
                if result.matched_count == 0 {
                    return Ok(None);
                }
            }
        }
        self.conversations.touch_activity(stream, at, members.as_deref());
        Ok(Some(out))
    }
}

/// Sleeps `wait` unless shutdown comes first.
async fn pause(shutdown: &Shutdown, wait: Duration) {
    tokio::select! {
        _ = shutdown.wait() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

/// Logs `what` at most every ten seconds (an outage is one line, not one per attempt).
fn warn_sometimes(last: &mut Option<Instant>, error: &str, what: &str) {
    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
        tracing::warn!(error, "{what}");
        *last = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_compare_numerically() {
        assert!(entry_order("1700000000000-10") > entry_order("1700000000000-9"));
        assert!(entry_order("1700000000001-0") > entry_order("1700000000000-99"));
        assert_eq!(entry_order("5-1"), (5, 1));
    }
}
