//! chatpersistence's settings: MongoDB, capture (outbox relay or Debezium), history
//! paging, plus the shared authentication and Kafka sections.
//!
//! Why this module exists: every knob the service has is named here once, with its
//! documented environment variable and its default, so `docs/chatpersistence.md`
//! and the code cannot disagree about what a setting is called or what it defaults to.

use std::time::Duration;

use chatauth::AuthSettings;
use chatstream::IdSettings;
use kafkawrapper::KafkaSettings;
use serde::{Deserialize, Serialize};
use servicekit::EnvMap;

/// Where messages are stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MongoSettings {
    /// `MONGODB_URI`: the connection string (a replica set in production).
    pub uri: String,
    /// `MONGODB_DATABASE`: the database holding the messages collection.
    pub database: String,
    /// `MONGODB_MESSAGES_COLLECTION`: the messages collection (Debezium captures it).
    pub messages_collection: String,
    /// `MONGODB_TIMEOUT`: server selection, connect and per-operation bound. A
    /// MongoDB that does not answer within it makes the API answer 503.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `MONGODB_INSERT_BATCH`: most messages written by one `insert_many` (group
    /// commit: requests arriving during a write share the next one).
    pub insert_batch: usize,
    /// `MONGODB_INSERT_WRITERS`: batches written concurrently.
    pub insert_writers: usize,
    /// `MONGODB_INSERT_RESOLVE_TIMEOUT`: how long an insert whose outcome is unknown
    /// (sent, but no answer) is resolved by message id before the API answers.
    #[serde(with = "humantime_serde")]
    pub insert_resolve_timeout: Duration,
}

impl Default for MongoSettings {
    fn default() -> Self {
        Self {
            uri: "mongodb://127.0.0.1:27017".to_owned(),
            database: "chat".to_owned(),
            messages_collection: "messages".to_owned(),
            timeout: Duration::from_secs(2),
            insert_batch: 128,
            insert_writers: 1,
            insert_resolve_timeout: Duration::from_secs(20),
        }
    }
}

impl MongoSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("MONGODB_URI", "uri"),
        ("MONGODB_DATABASE", "database"),
        ("MONGODB_MESSAGES_COLLECTION", "messages_collection"),
        ("MONGODB_TIMEOUT", "timeout"),
        ("MONGODB_INSERT_BATCH", "insert_batch"),
        ("MONGODB_INSERT_WRITERS", "insert_writers"),
        ("MONGODB_INSERT_RESOLVE_TIMEOUT", "insert_resolve_timeout"),
    ];
}

/// Who puts new messages on the change topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// The built-in relay: inserts carry `outbox_pending: true`, the relay publishes
    /// and clears the marker.
    #[default]
    Outbox,
    /// Debezium captures the collection; the relay is off and no marker is written.
    Debezium,
}

/// The outbox relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptureSettings {
    /// `CAPTURE_MODE`: `outbox` (default) or `debezium`.
    pub mode: CaptureMode,
    /// `CHAT_CHANGES_TOPIC`: where change events go.
    pub topic: String,
    /// `KAFKA_TOPIC_PARTITIONS`: partitions the relay creates the topic with when it
    /// does not exist (an existing topic is left alone).
    pub partitions: i32,
    /// `RELAY_BATCH_SIZE`: most messages read from the outbox per scan.
    pub batch_size: u32,
    /// `RELAY_POLL_INTERVAL`: fallback scan interval (local inserts wake the relay at
    /// once; the poll finds other replicas' inserts and leftovers).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `RELAY_LEASE_TTL`: how long a relay's leadership lasts without renewal; a
    /// dead leader is replaced within about this long. Renewed every TTL/3.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// `RELAY_MAX_BACKOFF`: the cap of the wait between attempts while the broker
    /// refuses messages.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            mode: CaptureMode::Outbox,
            topic: "chat.changes".to_owned(),
            partitions: 6,
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl CaptureSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("CAPTURE_MODE", "mode"),
        ("CHAT_CHANGES_TOPIC", "topic"),
        ("KAFKA_TOPIC_PARTITIONS", "partitions"),
        ("RELAY_BATCH_SIZE", "batch_size"),
        ("RELAY_POLL_INTERVAL", "poll_interval"),
        ("RELAY_LEASE_TTL", "lease_ttl"),
        ("RELAY_MAX_BACKOFF", "max_backoff"),
    ];
}

/// History paging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HistorySettings {
    /// `HISTORY_DEFAULT_LIMIT`: page size when the request names none.
    pub default_limit: u32,
    /// `HISTORY_MAX_LIMIT`: larger requested limits are cut to this.
    pub max_limit: u32,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self { default_limit: 50, max_limit: 200 }
    }
}

impl HistorySettings {
    pub const ENV: &'static [(&'static str, &'static str)] =
        &[("HISTORY_DEFAULT_LIMIT", "default_limit"), ("HISTORY_MAX_LIMIT", "max_limit")];
}

/// The write path's abuse limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WriteSettings {
    /// `RATE_LIMIT_POST_PER_SECOND`: messages one user may post per second,
    /// sustained (`0`: no limit).
    pub rate_limit_post_per_second: f64,
    /// `RATE_LIMIT_POST_BURST`: messages one user may post at once.
    pub rate_limit_post_burst: f64,
    /// `STREAM_LOCK_TIMEOUT`: the longest a write waits for its conversation's
    /// write lock before answering `503` + `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub stream_lock_timeout: Duration,
    /// `GROUP_MAX_MEMBERS`: the most members a group may have.
    pub group_max_members: usize,
    /// `EDIT_WINDOW`: how long after sending a message its sender may edit it.
    #[serde(with = "humantime_serde")]
    pub edit_window: Duration,
    /// `BOTS`: comma-separated user ids of the bots (empty: none). Only they may be
    /// the sender of `POST /chat/bot-messages` (`bot_api`).
    pub bots: String,
}

impl Default for WriteSettings {
    fn default() -> Self {
        Self {
            rate_limit_post_per_second: 20.0,
            rate_limit_post_burst: 40.0,
            stream_lock_timeout: Duration::from_secs(2),
            group_max_members: 256,
            edit_window: Duration::from_secs(15 * 60),
            bots: String::new(),
        }
    }
}

impl WriteSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("RATE_LIMIT_POST_PER_SECOND", "rate_limit_post_per_second"),
        ("RATE_LIMIT_POST_BURST", "rate_limit_post_burst"),
        ("STREAM_LOCK_TIMEOUT", "stream_lock_timeout"),
        ("GROUP_MAX_MEMBERS", "group_max_members"),
        ("EDIT_WINDOW", "edit_window"),
        ("BOTS", "bots"),
    ];
}

/// The read path's abuse limit: one token bucket per authenticated caller, shared
/// by every public `GET` (history, message status, the inbox, one conversation,
/// presence), so one user flooding reads cannot take MongoDB and Redis away from
/// the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadSettings {
    /// `RATE_LIMIT_READ_PER_SECOND`: public reads one user may make per second,
    /// sustained (`0`: no limit).
    pub rate_limit_read_per_second: f64,
    /// `RATE_LIMIT_READ_BURST`: public reads one user may make at once.
    pub rate_limit_read_burst: f64,
}

impl Default for ReadSettings {
    fn default() -> Self {
        // Far above what a client does (an app start reads the inbox, a page of
        // history and a few presences; pollers in the fleet's tests poll at 10 to
        // 50 per second at most), far below what one flooding loop does.
        Self { rate_limit_read_per_second: 50.0, rate_limit_read_burst: 100.0 }
    }
}

impl ReadSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("RATE_LIMIT_READ_PER_SECOND", "rate_limit_read_per_second"),
        ("RATE_LIMIT_READ_BURST", "rate_limit_read_burst"),
    ];
}

/// A token bucket's settings make sense: a finite rate `>= 0` (`0`: off) and a
/// finite burst `>= 1`.
fn check_rate(per_second: (&str, f64), burst: (&str, f64)) -> Result<(), String> {
    let rate_ok = per_second.1.is_finite() && per_second.1 >= 0.0;
    if !rate_ok || !burst.1.is_finite() || burst.1 < 1.0 {
        return Err(format!("{} must be >= 0 and {} >= 1 (finite numbers)", per_second.0, burst.0));
    }
    Ok(())
}

/// Where the inbox reads who is online (the notification sockets' presence keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceSettings {
    /// `REDIS_URL`: the Redis the notification pods keep presence keys in. Empty:
    /// no online flags in the conversation list.
    pub redis_url: String,
    /// `PRESENCE_KEY_PREFIX`: a user is online while `{prefix}:{user_id}` exists.
    pub key_prefix: String,
    /// `REDIS_TIMEOUT`: bound on one presence lookup (then everyone shows offline).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        Self { redis_url: String::new(), key_prefix: "presence".to_owned(), timeout: Duration::from_millis(200) }
    }
}

impl PresenceSettings {
    pub const ENV: &'static [(&'static str, &'static str)] =
        &[("REDIS_URL", "redis_url"), ("PRESENCE_KEY_PREFIX", "key_prefix"), ("REDIS_TIMEOUT", "timeout")];
}

/// How `POST /chat/messages` makes a message durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// One group-committed MongoDB insert before the `201` (the default).
    #[default]
    Direct,
    /// Appended to a Redis Stream before the `202`; a background writer bulk-inserts
    /// batches into MongoDB (`write_behind`).
    WriteBehind,
}

/// The write-behind queue and its writer (`WRITE_MODE=write_behind`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WriteBehindSettings {
    /// `WRITE_MODE`: `direct` (default) or `write_behind`.
    pub mode: WriteMode,
    /// `WRITE_BEHIND_REDIS_URL`: the Redis holding the queue (with AOF on); empty:
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `WRITE_BEHIND_REDIS_TIMEOUT`: bound on one queue operation; past it a `POST`
    /// answers 503 (nothing acknowledged).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// `WRITE_BEHIND_KEY_PREFIX`: prefix of every key the queue uses.
    pub key_prefix: String,
    /// `WRITE_BEHIND_SHARDS`: streams the queue is split into (a conversation always
    /// goes to the same one); each is written by one writer at a time.
    pub shards: u32,
    /// `WRITE_BEHIND_BATCH_SIZE`: most entries one bulk write takes.
    pub batch_size: u32,
    /// `WRITE_BEHIND_FLUSH_INTERVAL`: how often an idle writer looks for entries
    /// other replicas queued (its own accepts wake it at once).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// `WRITE_BEHIND_HIGH_WATER`: queued messages at which admission stops (503 +
    /// `Retry-After`).
    pub high_water: u64,
    /// `WRITE_BEHIND_LEASE_TTL`: a shard writer's lease; a dead writer's pending
    /// entries are claimed by another within about this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// `WRITE_BEHIND_MAX_BACKOFF`: the cap of the wait between attempts while
    /// MongoDB fails.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// `WRITE_BEHIND_IDEMPOTENCY_TTL`: how long a `client_message_id` is remembered
    /// in Redis (retries within it are answered from Redis, queued or stored).
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
}

impl Default for WriteBehindSettings {
    fn default() -> Self {
        Self {
            mode: WriteMode::Direct,
            redis_url: String::new(),
            redis_timeout: Duration::from_secs(1),
            key_prefix: "chat:wb".to_owned(),
            shards: 4,
            batch_size: 1000,
            flush_interval: Duration::from_millis(5),
            high_water: 200_000,
            lease_ttl: Duration::from_secs(5),
            max_backoff: Duration::from_secs(2),
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl WriteBehindSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("WRITE_MODE", "mode"),
        ("WRITE_BEHIND_REDIS_URL", "redis_url"),
        ("WRITE_BEHIND_REDIS_TIMEOUT", "redis_timeout"),
        ("WRITE_BEHIND_KEY_PREFIX", "key_prefix"),
        ("WRITE_BEHIND_SHARDS", "shards"),
        ("WRITE_BEHIND_BATCH_SIZE", "batch_size"),
        ("WRITE_BEHIND_FLUSH_INTERVAL", "flush_interval"),
        ("WRITE_BEHIND_HIGH_WATER", "high_water"),
        ("WRITE_BEHIND_LEASE_TTL", "lease_ttl"),
        ("WRITE_BEHIND_MAX_BACKOFF", "max_backoff"),
        ("WRITE_BEHIND_IDEMPOTENCY_TTL", "idempotency_ttl"),
    ];
}

/// The per-conversation recent-history cache in Redis (`recent_cache`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RecentCacheSettings {
    /// `RECENT_CACHE_LENGTH`: most messages kept per conversation (`0`: no cache).
    pub length: u32,
    /// `RECENT_CACHE_TTL`: how long an untouched conversation's cache lives.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for RecentCacheSettings {
    fn default() -> Self {
        Self { length: 200, ttl: Duration::from_secs(7 * 24 * 3600) }
    }
}

impl RecentCacheSettings {
    pub const ENV: &'static [(&'static str, &'static str)] =
        &[("RECENT_CACHE_LENGTH", "length"), ("RECENT_CACHE_TTL", "ttl")];
}

/// Everything chatpersistence reads besides servicekit's base settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub mongo: MongoSettings,
    pub capture: CaptureSettings,
    pub history: HistorySettings,
    pub writes: WriteSettings,
    pub reads: ReadSettings,
    pub presence: PresenceSettings,
    pub write_behind: WriteBehindSettings,
    pub recent_cache: RecentCacheSettings,
    pub ids: IdSettings,
    pub auth: AuthSettings,
    pub kafka: KafkaSettings,
}

impl Settings {
    /// The documented environment variables of this service.
    pub fn env_map() -> EnvMap {
        EnvMap::new()
            .section("mongo", MongoSettings::ENV)
            .section("capture", CaptureSettings::ENV)
            .section("history", HistorySettings::ENV)
            .section("writes", WriteSettings::ENV)
            .section("reads", ReadSettings::ENV)
            .section("presence", PresenceSettings::ENV)
            .section("write_behind", WriteBehindSettings::ENV)
            .section("recent_cache", RecentCacheSettings::ENV)
            .section("ids", IdSettings::ENV)
            .section("auth", AuthSettings::ENV)
            .section("kafka", KafkaSettings::ENV)
    }

    /// Rejects combinations that cannot work, naming the variable to fix.
    /// A message write must be answered before `HTTP_REQUEST_TIMEOUT` abandons it
    /// with a `503` of unknown outcome: the stream lock, the group commit (queue and
    /// write, twice `MONGODB_TIMEOUT`) and resolving an unanswered insert must fit.
    pub fn fits_request_timeout(&self, request_timeout: Duration) -> Result<(), String> {
        let worst = self.writes.stream_lock_timeout + self.mongo.timeout * 3 + self.mongo.insert_resolve_timeout;
        if worst >= request_timeout {
            return Err(format!(
                "STREAM_LOCK_TIMEOUT + 3 × MONGODB_TIMEOUT + MONGODB_INSERT_RESOLVE_TIMEOUT ({worst:?}) must be \
                 below HTTP_REQUEST_TIMEOUT ({request_timeout:?}), or a write's answer could be a 503 of unknown outcome"
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.mongo.timeout.is_zero() {
            return Err("MONGODB_TIMEOUT must be greater than zero".into());
        }
        if self.mongo.insert_batch == 0 || self.mongo.insert_writers == 0 {
            return Err("MONGODB_INSERT_BATCH and MONGODB_INSERT_WRITERS must be at least 1".into());
        }
        if self.history.default_limit == 0 || self.history.max_limit == 0 {
            return Err("HISTORY_DEFAULT_LIMIT and HISTORY_MAX_LIMIT must be at least 1".into());
        }
        check_rate(
            ("RATE_LIMIT_POST_PER_SECOND", self.writes.rate_limit_post_per_second),
            ("RATE_LIMIT_POST_BURST", self.writes.rate_limit_post_burst),
        )?;
        check_rate(
            ("RATE_LIMIT_READ_PER_SECOND", self.reads.rate_limit_read_per_second),
            ("RATE_LIMIT_READ_BURST", self.reads.rate_limit_read_burst),
        )?;
        if self.writes.group_max_members < 2 {
            return Err("GROUP_MAX_MEMBERS must be at least 2".into());
        }
        crate::bot_api::parse_bots(&self.writes.bots)?;
        if self.writes.stream_lock_timeout.is_zero() {
            return Err("STREAM_LOCK_TIMEOUT must be greater than zero".into());
        }
        if self.history.default_limit > self.history.max_limit {
            return Err("HISTORY_DEFAULT_LIMIT must not exceed HISTORY_MAX_LIMIT".into());
        }
        self.validate_write_behind()?;
        if self.capture.mode == CaptureMode::Outbox {
            if self.capture.topic.trim().is_empty() {
                return Err("CHAT_CHANGES_TOPIC must not be empty".into());
            }
            if self.capture.partitions < 1 {
                return Err("KAFKA_TOPIC_PARTITIONS must be at least 1".into());
            }
            if self.capture.batch_size == 0 {
                return Err("RELAY_BATCH_SIZE must be at least 1".into());
            }
            if self.capture.poll_interval.is_zero() {
                return Err("RELAY_POLL_INTERVAL must be greater than zero".into());
            }
            if self.capture.lease_ttl < Duration::from_millis(300) {
                return Err("RELAY_LEASE_TTL must be at least 300ms".into());
            }
        }
        Ok(())
    }
}

impl Settings {
    /// The Redis the write-behind queue uses (`WRITE_BEHIND_REDIS_URL`, else `REDIS_URL`).
    pub fn write_behind_redis_url(&self) -> &str {
        match self.write_behind.redis_url.as_str() {
            "" => &self.presence.redis_url,
            url => url,
        }
    }

    fn validate_write_behind(&self) -> Result<(), String> {
        let wb = &self.write_behind;
        if wb.mode != WriteMode::WriteBehind {
            return Ok(());
        }
        if self.write_behind_redis_url().is_empty() {
            return Err("WRITE_MODE=write_behind needs WRITE_BEHIND_REDIS_URL or REDIS_URL".into());
        }
        if wb.shards == 0 || wb.shards > 1024 {
            return Err("WRITE_BEHIND_SHARDS must be 1 to 1024".into());
        }
        if wb.batch_size == 0 || wb.high_water == 0 {
            return Err("WRITE_BEHIND_BATCH_SIZE and WRITE_BEHIND_HIGH_WATER must be at least 1".into());
        }
        if wb.flush_interval.is_zero() || wb.redis_timeout.is_zero() || wb.max_backoff.is_zero() {
            return Err(
                "WRITE_BEHIND_FLUSH_INTERVAL, WRITE_BEHIND_REDIS_TIMEOUT and WRITE_BEHIND_MAX_BACKOFF must be greater than zero"
                    .into(),
            );
        }
        if wb.lease_ttl < Duration::from_millis(300) {
            return Err("WRITE_BEHIND_LEASE_TTL must be at least 300ms".into());
        }
        if wb.idempotency_ttl < Duration::from_secs(1) {
            return Err("WRITE_BEHIND_IDEMPOTENCY_TTL must be at least 1s".into());
        }
        if wb.key_prefix.trim().is_empty() {
            return Err("WRITE_BEHIND_KEY_PREFIX must not be empty".into());
        }
        if self.recent_cache.length > 0 && self.recent_cache.ttl < Duration::from_secs(1) {
            return Err("RECENT_CACHE_TTL must be at least 1s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Settings {
        servicekit::config::load_from(&Settings::env_map(), servicekit::config::lookup(vars)).expect("settings load")
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = load(&[]);
        assert_eq!(s.mongo.uri, "mongodb://127.0.0.1:27017");
        assert_eq!(s.mongo.database, "chat");
        assert_eq!(s.mongo.messages_collection, "messages");
        assert_eq!(s.mongo.timeout, Duration::from_secs(2));
        assert_eq!(s.capture.mode, CaptureMode::Outbox);
        assert_eq!(s.capture.topic, "chat.changes");
        assert_eq!(s.capture.partitions, 6);
        assert_eq!(s.history.default_limit, 50);
        assert_eq!(s.history.max_limit, 200);
        assert_eq!(s.writes.rate_limit_post_per_second, 20.0);
        assert_eq!(s.writes.rate_limit_post_burst, 40.0);
        assert_eq!(s.reads.rate_limit_read_per_second, 50.0);
        assert_eq!(s.reads.rate_limit_read_burst, 100.0);
        assert_eq!(s.writes.stream_lock_timeout, Duration::from_secs(2));
        assert_eq!(s.ids.stream_id_format, chatstream::StreamIdFormat::V2);
        assert_eq!(s.write_behind.mode, WriteMode::Direct);
        assert_eq!(s.write_behind.batch_size, 1000);
        assert_eq!(s.recent_cache.ttl, Duration::from_secs(7 * 24 * 3600));
        assert!(s.validate().is_ok());
        let wb = load(&[("WRITE_MODE", "write_behind")]);
        assert_eq!(wb.write_behind.mode, WriteMode::WriteBehind);
        assert!(wb.validate().is_err(), "write-behind needs a Redis");
        let wb = load(&[("WRITE_MODE", "write_behind"), ("REDIS_URL", "redis://r:6379")]);
        assert_eq!(wb.write_behind_redis_url(), "redis://r:6379");
        assert!(wb.validate().is_ok());
    }

    #[test]
    fn documented_variables_are_read() {
        let s = load(&[
            ("MONGODB_URI", "mongodb://db:27017/?replicaSet=rs0"),
            ("MONGODB_DATABASE", "c2"),
            ("MONGODB_MESSAGES_COLLECTION", "m2"),
            ("MONGODB_TIMEOUT", "750ms"),
            ("CAPTURE_MODE", "debezium"),
            ("CHAT_CHANGES_TOPIC", "t"),
            ("KAFKA_TOPIC_PARTITIONS", "3"),
            ("RELAY_BATCH_SIZE", "10"),
            ("RELAY_POLL_INTERVAL", "1s"),
            ("RELAY_LEASE_TTL", "2s"),
            ("HISTORY_MAX_LIMIT", "100"),
            ("KAFKA_BROKERS", "k:9092"),
            ("STREAM_ID_FORMAT", "legacy"),
            ("RATE_LIMIT_POST_PER_SECOND", "0"),
            ("STREAM_LOCK_TIMEOUT", "500ms"),
        ]);
        assert_eq!(s.ids.stream_id_format, chatstream::StreamIdFormat::Legacy);
        assert_eq!(s.writes.rate_limit_post_per_second, 0.0);
        assert_eq!(s.writes.stream_lock_timeout, Duration::from_millis(500));
        assert_eq!(s.mongo.uri, "mongodb://db:27017/?replicaSet=rs0");
        assert_eq!(s.mongo.database, "c2");
        assert_eq!(s.mongo.messages_collection, "m2");
        assert_eq!(s.mongo.timeout, Duration::from_millis(750));
        assert_eq!(s.capture.mode, CaptureMode::Debezium);
        assert_eq!(s.capture.topic, "t");
        assert_eq!(s.capture.partitions, 3);
        assert_eq!(s.capture.batch_size, 10);
        assert_eq!(s.capture.poll_interval, Duration::from_secs(1));
        assert_eq!(s.capture.lease_ttl, Duration::from_secs(2));
        assert_eq!(s.history.max_limit, 100);
        assert_eq!(s.kafka.brokers, "k:9092");
    }

    #[test]
    fn the_read_limit_is_read_from_the_environment_and_checked() {
        let s = load(&[("RATE_LIMIT_READ_PER_SECOND", "2"), ("RATE_LIMIT_READ_BURST", "5")]);
        assert_eq!((s.reads.rate_limit_read_per_second, s.reads.rate_limit_read_burst), (2.0, 5.0));
        assert!(s.validate().is_ok());
        // The write limit is a separate bucket, untouched.
        assert_eq!(s.writes.rate_limit_post_per_second, 20.0);
        let off = load(&[("RATE_LIMIT_READ_PER_SECOND", "0")]);
        assert_eq!(off.reads.rate_limit_read_per_second, 0.0);
        assert!(off.validate().is_ok(), "0 turns the read limit off");
        for (rate, burst) in [(-1.0, 100.0), (50.0, 0.5), (f64::NAN, 100.0), (f64::INFINITY, 100.0), (50.0, f64::NAN)] {
            let mut s = load(&[]);
            s.reads.rate_limit_read_per_second = rate;
            s.reads.rate_limit_read_burst = burst;
            let err = s.validate().expect_err("refused");
            assert!(err.contains("RATE_LIMIT_READ_PER_SECOND"), "{rate}/{burst}: {err}");
        }
        // The environment can spell them ("NaN", "inf" parse as numbers); the bucket's
        // `min` ignores a NaN, so such a rate would silently mean "no limit".
        let nan = load(&[("RATE_LIMIT_POST_PER_SECOND", "NaN")]);
        assert!(nan.writes.rate_limit_post_per_second.is_nan());
        assert!(nan.validate().expect_err("refused").contains("RATE_LIMIT_POST_PER_SECOND"));
        let inf = load(&[("RATE_LIMIT_READ_PER_SECOND", "inf")]);
        assert!(inf.validate().expect_err("refused").contains("RATE_LIMIT_READ_PER_SECOND"));
        let garbage = servicekit::config::load_from::<Settings, _>(
            &Settings::env_map(),
            servicekit::config::lookup(&[("RATE_LIMIT_READ_BURST", "lots")]),
        );
        assert!(garbage.is_err(), "a burst that is not a number is refused at start-up");
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let mut s = load(&[]);
        s.history.default_limit = 500;
        assert!(s.validate().is_err());
        let mut s = load(&[]);
        s.capture.batch_size = 0;
        assert!(s.validate().is_err());
        s.capture.mode = CaptureMode::Debezium;
        assert!(s.validate().is_ok(), "relay settings do not matter without the relay");
    }
}
