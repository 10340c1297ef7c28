//! The recent-history cache: each conversation's newest stored messages in Redis,
//! serving history pages without MongoDB, repaired from MongoDB on a miss.
//!
//! Why this module exists: the newest messages of a conversation are what is read
//! most (a client catching up with `since`, a socket replaying after a reconnect,
//! the newest page), and in write-behind mode they are read while MongoDB is busy
//! absorbing the backlog. Active in write-behind mode (its Redis is already on the
//! write path there; direct mode keeps reads on MongoDB).
//!
//! The rules that keep it exact (cache loss is never data loss, and a page from the
//! cache is the page MongoDB would give):
//! - Per conversation: `{prefix}:recent:{id}` (a sorted set of `<message id>|<json>`,
//!   ordered by id), `{prefix}:recent:{id}:floor` (the cache holds every stored
//!   message after this id; `start`: the whole conversation) and
//!   `{prefix}:recent:{id}:ver` (bumped by every write and invalidation).
//! - Filled on write: the write-behind writer appends a batch's messages *before*
//!   it removes them from the queue (so a reader that no longer finds a message
//!   queued finds it cached), only to a cache that exists, and trims it to
//!   `RECENT_CACHE_LENGTH` (raising the floor).
//! - A request the cache cannot answer whole (no cache, a cursor below the floor)
//!   reads MongoDB and repairs the cache in the background: the newest
//!   `RECENT_CACHE_LENGTH` messages, written only if the version did not move
//!   meanwhile (a write or change in between makes the repair give up).
//! - Edits, deletions and reactions invalidate the conversation's cache before and
//!   after the change (a change is refused with 503 when the first invalidation
//!   cannot be made).
//! - Everything expires after `RECENT_CACHE_TTL` without writes.

use std::time::Duration;

use chatstream::{ChatMessage, MessageId, StreamId};
use eventstore::RedisConnection;

use crate::settings::RecentCacheSettings;
use crate::store::{Cursor, Reader, Store};

/// A message id above every real one (version 7, all time bits set).
const NEWEST: &str = "ffffffff-ffff-7fff-bfff-ffffffffffff";

const READ: &str = r#"
-- KEYS: set, floor, version; ARGV: mode, cursor id, limit
local floor = redis.call('GET', KEYS[2])
if not floor then return {'miss'} end
local ver = redis.call('GET', KEYS[3]) or '0'
local items
if ARGV[1] == 'since' then
  if floor ~= 'start' and ARGV[2] < floor then return {'miss'} end
  items = redis.call('ZRANGEBYLEX', KEYS[1], '(' .. ARGV[2] .. '~', '+', 'LIMIT', 0, ARGV[3])
elseif ARGV[1] == 'before' then
  items = redis.call('ZREVRANGEBYLEX', KEYS[1], '(' .. ARGV[2], '-', 'LIMIT', 0, ARGV[3])
  if floor ~= 'start' and #items < tonumber(ARGV[3]) then return {'miss'} end
else
  if floor ~= 'start' then return {'miss'} end
  items = redis.call('ZRANGEBYLEX', KEYS[1], '-', '+', 'LIMIT', 0, ARGV[3])
end
table.insert(items, 1, 'hit')
return items
"#;

const APPEND: &str = r#"
-- KEYS: set, floor, version; ARGV: length, ttl ms, members...
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 0, ARGV[i]) end
local length = tonumber(ARGV[1])
local size = redis.call('ZCARD', KEYS[1])
if size > length then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, size - length - 1)
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  redis.call('SET', KEYS[2], string.sub(oldest, 1, 36))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"#;

const REPAIR: &str = r#"
-- KEYS: set, floor, version; ARGV: version seen, floor, ttl ms, members...
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], 0, ARGV[i]) end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

const INVALIDATE: &str = r#"
-- KEYS: set, floor, version; ARGV: ttl ms
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return 1
"#;

/// What a cache read found.
pub enum Lookup {
    /// The page, oldest first (nearest the cursor first for `Before`), up to the limit.
    Hit(Vec<ChatMessage>),
    /// Not answerable from the cache; `version` to hand to [`RecentCache::repair`].
    Miss(Option<String>),
}

/// The recent-history cache of one service.
pub struct RecentCache {
    conn: RedisConnection,
    prefix: String,
    length: u32,
    ttl_ms: u64,
    read: redis::Script,
    append: redis::Script,
    repair: redis::Script,
    invalidate: redis::Script,
}

fn member(message: &ChatMessage) -> Option<String> {
    serde_json::to_string(message).ok().map(|json| format!("{}|{json}", message.message_id))
}

fn parse(member: &str) -> Option<ChatMessage> {
    member.split_once('|').and_then(|(_, json)| serde_json::from_str(json).ok())
}

impl RecentCache {
    pub fn new(url: &str, prefix: &str, timeout: Duration, settings: &RecentCacheSettings) -> Result<Self, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("the recent cache's Redis URL is not usable: {e}"))?;
        Ok(Self {
            conn: RedisConnection::new(client, timeout),
            prefix: prefix.trim_end_matches(':').to_owned(),
            length: settings.length.max(1),
            ttl_ms: settings.ttl.as_millis().max(1000) as u64,
            read: redis::Script::new(READ),
            append: redis::Script::new(APPEND),
            repair: redis::Script::new(REPAIR),
            invalidate: redis::Script::new(INVALIDATE),
        })
    }

    fn keys(&self, stream: &StreamId) -> [String; 3] {
        let base = format!("{}:recent:{stream}", self.prefix);
        [base.clone(), format!("{base}:floor"), format!("{base}:ver")]
    }

    /// The page for `cursor` if the cache holds all of it; a miss otherwise (and on
    /// any Redis failure, which is counted: the caller reads MongoDB).
    pub async fn read(&self, stream: &StreamId, cursor: Cursor, limit: u32) -> Lookup {
        let (mode, at) = match cursor {
            Cursor::Start => ("start", String::new()),
            Cursor::Since(id) => ("since", id.to_string()),
            Cursor::Before(id) => ("before", id.to_string()),
        };
        let [set, floor, ver] = self.keys(stream);
        let mut invocation = self.read.prepare_invoke();
        invocation.key(set).key(floor).key(&ver).arg(mode).arg(at).arg(limit);
        let found: Result<Vec<String>, _> =
            self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await;
        match found {
            Ok(items) if items.first().map(String::as_str) == Some("hit") => {
                let messages: Option<Vec<ChatMessage>> = items[1..].iter().map(|m| parse(m)).collect();
                match messages {
                    Some(messages) => {
                        metrics::counter!("recent_cache_reads_total", "result" => "hit").increment(1);
                        Lookup::Hit(messages)
                    }
                    None => {
                        metrics::counter!("recent_cache_reads_total", "result" => "corrupt").increment(1);
                        self.invalidate(stream).await.ok();
                        Lookup::Miss(None)
                    }
                }
            }
            Ok(_) => {
                metrics::counter!("recent_cache_reads_total", "result" => "miss").increment(1);
                Lookup::Miss(self.version(stream).await)
            }
            Err(err) => {
                metrics::counter!("recent_cache_reads_total", "result" => "error").increment(1);
                tracing::debug!(error = %err, "recent cache unreachable; reading MongoDB");
                Lookup::Miss(None)
            }
        }
    }

    async fn version(&self, stream: &StreamId) -> Option<String> {
        let [_, _, ver] = self.keys(stream);
        let found: Result<Option<String>, _> =
            self.conn.run(|mut conn| async move { redis::cmd("GET").arg(ver).query_async(&mut conn).await }).await;
        found.ok().map(|v| v.unwrap_or_else(|| "0".to_owned()))
    }

    /// Adds stored messages of one conversation (oldest first) to its cache, if it
    /// has one, and bumps its version either way. An error must stop the caller from
    /// removing them from the queue (the batch is retried, and this is idempotent).
    pub async fn append(&self, stream: &StreamId, messages: &[&ChatMessage]) -> Result<(), String> {
        let [set, floor, ver] = self.keys(stream);
        let mut invocation = self.append.prepare_invoke();
        invocation.key(set).key(floor).key(ver).arg(self.length).arg(self.ttl_ms);
        for message in messages {
            if let Some(member) = member(message) {
                invocation.arg(member);
            }
        }
        let _: i64 = self
            .conn
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Drops a conversation's cache (before and after a change to a stored message).
    pub async fn invalidate(&self, stream: &StreamId) -> Result<(), String> {
        let [set, floor, ver] = self.keys(stream);
        let mut invocation = self.invalidate.prepare_invoke();
        invocation.key(set).key(floor).key(ver).arg(self.ttl_ms);
        let _: i64 = self
            .conn
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
            .map_err(|e| e.to_string())?;
        metrics::counter!("recent_cache_invalidations_total").increment(1);
        Ok(())
    }

    /// Read repair: the conversation's newest messages from MongoDB into an absent
    /// cache, unless a write or change moved its version since `version` was read.
    pub async fn repair(&self, store: &Store, stream: &StreamId, version: String) {
        let Ok(newest) = MessageId::parse(NEWEST) else { return };
        let messages = match store.history(stream, &Reader::Service, Cursor::Before(newest), self.length + 1).await {
            Ok(messages) => messages,
            Err(_) => return,
        };
        // All of it fits: the cache holds the conversation from its start.
        let whole = messages.len() <= self.length as usize;
        let kept = &messages[messages.len().saturating_sub(self.length as usize)..];
        let floor = match (whole, kept.first()) {
            (true, _) => "start".to_owned(),
            (false, Some(oldest)) => oldest.message_id.to_string(),
            (false, None) => return,
        };
        let [set, floor_key, ver] = self.keys(stream);
        let mut invocation = self.repair.prepare_invoke();
        invocation.key(set).key(floor_key).key(ver).arg(version).arg(floor).arg(self.ttl_ms);
        for message in kept {
            if let Some(member) = member(message) {
                invocation.arg(member);
            }
        }
        let repaired: Result<i64, _> =
            self.conn.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await;
        if matches!(repaired, Ok(1)) {
            metrics::counter!("recent_cache_repairs_total").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_marker_is_a_message_id_above_real_ones() {
        let newest = MessageId::parse(NEWEST).expect("a v7 id");
        assert!(MessageId::new() < newest);
    }
}
