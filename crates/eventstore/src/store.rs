//! The claim / lease / done protocol on top of Redis.
//!
//! Why this module exists: "check whether the key exists, process, then set it" (what
//! the Go services did) lets two consumers that receive the same event at the same time
//! — typical right after a Kafka rebalance — both see "not processed" and both process
//! it. Here the check and the reservation are one atomic step: a consumer *claims* the
//! event with a short lease (`SET key "processing:<uuid>" NX PX <lease>`), and only the
//! winner processes it. Afterwards the lease becomes a `done` marker that lives for the
//! deduplication TTL; on failure the lease is released so the event can be retried.
//!
//! Every operation is bounded by the configured timeout and fails open: when Redis
//! cannot be reached the event is processed anyway (duplicates are better than a
//! stalled fleet), and the outage is logged once and counted.

use std::sync::Arc;
use std::time::Duration;

use chatstream::{MessageId, StreamId};
use redis::Script;

use crate::connection::Connection;
use crate::health::{self, Health, METRIC_CLAIMS, METRIC_LEASE_LOST};
use crate::settings::redact_url;
use crate::{EventKey, EventStoreError, EventStoreSettings};

/// The value of a key whose event was handled.
const DONE: &str = "done";
/// The prefix of a lease value; the rest is the claimer's unique token.
const LEASE_PREFIX: &str = "processing:";

/// Takes the lease if the key is free. Replies 1 (acquired), 0 (done), 2 (someone
/// else's lease). Any value that is not a lease counts as done, so markers written by
/// the Go services (`"1"`) keep deduplicating during a migration.
const CLAIM_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, string.len(ARGV[3])) == ARGV[3] then
  return 2
end
return 0
";

/// Sets the done marker unconditionally (the event *was* processed) and replies what
/// was there: 1 our lease, 0 nothing (our lease expired), 2 another lease, 3 done.
const DONE_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if current == ARGV[1] then
  return 1
elseif not current then
  return 0
elseif current == ARGV[2] then
  return 3
end
return 2
";

/// Deletes the key only if it still holds our lease. Replies 1 if deleted.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The proof that we hold an event's processing lease. Hand it back to
/// [`RedisEventStore::mark_done`] or [`RedisEventStore::release`]; it is not `Clone`,
/// so it is used once.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimToken(String);

impl ClaimToken {
    fn new() -> Self {
        Self(format!("{LEASE_PREFIX}{}", uuid::Uuid::now_v7()))
    }

    /// The lease value stored in Redis (`processing:<uuid>`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What [`RedisEventStore::claim`] found.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a claim tells whether to process the event"]
pub enum Claim {
    /// The event is ours to process; finish with `mark_done` or `release`.
    Acquired(ClaimToken),
    /// The event was processed already (within the TTL): skip it.
    AlreadyDone,
    /// Another consumer holds a live lease on it: retry later (do not skip, it may fail).
    InProgress,
    /// Redis could not be asked in time: process the event without deduplication.
    Unavailable,
}

impl Claim {
    /// The `outcome` label of `eventstore_claims_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Claim::Acquired(_) => "acquired",
            Claim::AlreadyDone => "already_done",
            Claim::InProgress => "in_progress",
            Claim::Unavailable => "unavailable",
        }
    }

    /// Whether the caller should process the event now (acquired, or failing open).
    pub fn should_process(&self) -> bool {
        matches!(self, Claim::Acquired(_) | Claim::Unavailable)
    }
}

/// The Redis event store. Cheap to clone: clones share one connection and one health
/// state.
#[derive(Clone)]
pub struct RedisEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    settings: EventStoreSettings,
    ttl_ms: u64,
    lease_ms: u64,
    connection: Connection,
    health: Health,
    claim: Script,
    done: Script,
    release: Script,
}

impl std::fmt::Debug for RedisEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEventStore").field("settings", &self.inner.settings).field("up", &self.is_up()).finish()
    }
}

impl RedisEventStore {
    /// Builds the store. Does not connect: a Redis that is down at start is not an
    /// error, the store connects on first use (and, inside a Tokio runtime, tries once in
    /// the background right away). Fails only on settings it cannot work with.
    pub fn new(settings: EventStoreSettings) -> Result<Self, EventStoreError> {
        let ttl_ms = positive_millis("ttl (DEDUPLICATION_TTL)", settings.ttl)?;
        let lease_ms = positive_millis("processing_lease (EVENT_STORE_PROCESSING_LEASE)", settings.processing_lease)?;
        positive_millis("timeout (REDIS_TIMEOUT)", settings.timeout)?;
        if settings.key_prefix.is_empty() {
            return Err(EventStoreError::InvalidSetting {
                name: "key_prefix (EVENT_STORE_KEY_PREFIX)",
                message: "must not be empty".to_owned(),
            });
        }
        let client = redis::Client::open(settings.redis_url.as_str()).map_err(EventStoreError::InvalidUrl)?;
        health::describe();
        let store = Self {
            inner: Arc::new(Inner {
                ttl_ms,
                lease_ms,
                connection: Connection::new(client, settings.timeout),
                health: Health::new(&settings.key_prefix),
                claim: Script::new(CLAIM_SCRIPT),
                done: Script::new(DONE_SCRIPT),
                release: Script::new(RELEASE_SCRIPT),
                settings,
            }),
        };
        tracing::debug!(redis = %redact_url(&store.inner.settings.redis_url), prefix = %store.prefix(), "event store created");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Warm up: connect now rather than on the first event, and report an
            // outage at start-up. A failure here is only logged; use retries later.
            let warm = store.clone();
            runtime.spawn(async move {
                let _ = warm.ping().await;
            });
        }
        Ok(store)
    }

    pub fn settings(&self) -> &EventStoreSettings {
        &self.inner.settings
    }

    /// The configured key prefix.
    pub fn prefix(&self) -> &str {
        self.inner.health.prefix()
    }

    /// The key of an event identified by two parts, under this store's prefix.
    pub fn key(&self, first: &str, second: &str) -> EventKey {
        EventKey::new(self.prefix(), first, second)
    }

    /// The key of a chat message event, under this store's prefix.
    pub fn message_key(&self, message_id: &MessageId, stream_id: &StreamId) -> EventKey {
        EventKey::for_message(self.prefix(), message_id, stream_id)
    }

    /// Whether the last Redis operation succeeded (false before the first one). This is
    /// what the `eventstore_up` gauge shows.
    pub fn is_up(&self) -> bool {
        self.inner.health.is_up()
    }

    /// Tries to take the processing lease of `key`. Never fails: when Redis cannot be
    /// reached within the timeout the answer is [`Claim::Unavailable`].
    pub async fn claim(&self, key: &EventKey) -> Claim {
        let token = ClaimToken::new();
        let lease = token.as_str();
        let inner = &self.inner;
        let reply = inner
            .connection
            .run(|mut conn| async move {
                inner
                    .claim
                    .key(key.as_str())
                    .arg(lease)
                    .arg(inner.lease_ms)
                    .arg(LEASE_PREFIX)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        let claim = match reply {
            Ok(1) => Claim::Acquired(token),
            Ok(0) => Claim::AlreadyDone,
            Ok(2) => Claim::InProgress,
            Ok(other) => {
                let error = EventStoreError::UnexpectedReply(format!("claim script replied {other}"));
                self.failed_open("claim", key, &error)
            }
            Err(e) => self.failed_open("claim", key, &e),
        };
        if !matches!(claim, Claim::Unavailable) {
            self.inner.health.success();
        }
        metrics::counter!(METRIC_CLAIMS, "prefix" => self.prefix().to_owned(), "outcome" => claim.outcome())
            .increment(1);
        claim
    }

    fn failed_open(&self, operation: &'static str, key: &EventKey, error: &EventStoreError) -> Claim {
        tracing::debug!(%key, operation, %error, "event store operation failed open");
        self.inner.health.failure(operation, error, true);
        Claim::Unavailable
    }

    /// Records that the event was handled: the key holds `done` for the TTL.
    ///
    /// The marker is written even if our lease has expired or another consumer has
    /// claimed the event since: the event *was* processed, and remembering that is what
    /// stops further duplicates. A lost lease is logged and counted
    /// (`eventstore_lease_lost_total`), as it means the lease is shorter than handling.
    /// Redis errors are logged and counted, never returned: consumption goes on.
    pub async fn mark_done(&self, key: &EventKey, token: ClaimToken) {
        let inner = &self.inner;
        let reply = inner
            .connection
            .run(|mut conn| async move {
                inner
                    .done
                    .key(key.as_str())
                    .arg(token.as_str())
                    .arg(DONE)
                    .arg(inner.ttl_ms)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        match reply {
            Ok(1) => self.inner.health.success(),
            Ok(previous) => {
                self.inner.health.success();
                let found = match previous {
                    0 => "nothing (the lease had expired)",
                    2 => "another consumer's lease",
                    _ => "a done marker",
                };
                metrics::counter!(METRIC_LEASE_LOST, "prefix" => self.prefix().to_owned()).increment(1);
                tracing::warn!(
                    %key,
                    found,
                    lease = ?self.inner.settings.processing_lease,
                    "event marked done after its processing lease was lost; it may have been processed twice"
                );
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "could not mark event done");
                self.inner.health.failure("mark_done", &e, true);
            }
        }
    }

    /// Gives up the lease after a failed attempt, so a retry (ours or another
    /// consumer's) can claim the event. Deletes the key only if it still holds our
    /// token: an expired lease that another consumer has taken since is left alone.
    /// Redis errors are logged and counted, never returned; the lease then simply
    /// expires after `processing_lease`.
    pub async fn release(&self, key: &EventKey, token: ClaimToken) {
        let inner = &self.inner;
        let reply = inner
            .connection
            .run(|mut conn| async move {
                inner.release.key(key.as_str()).arg(token.as_str()).invoke_async::<i64>(&mut conn).await
            })
            .await;
        match reply {
            Ok(deleted) => {
                self.inner.health.success();
                if deleted == 0 {
                    tracing::debug!(%key, "lease not released: it had expired or belongs to someone else now");
                }
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "could not release event lease");
                self.inner.health.failure("release", &e, true);
            }
        }
    }

    /// Whether the event is marked done. Unlike the protocol operations this returns
    /// the error, for callers that want to decide themselves.
    pub async fn is_done(&self, key: &EventKey) -> Result<bool, EventStoreError> {
        let reply = self
            .inner
            .connection
            .run(|mut conn| async move {
                redis::cmd("GET").arg(key.as_str()).query_async::<Option<String>>(&mut conn).await
            })
            .await;
        match reply {
            Ok(value) => {
                self.inner.health.success();
                Ok(value.is_some_and(|v| !v.starts_with(LEASE_PREFIX)))
            }
            Err(e) => {
                self.inner.health.failure("is_done", &e, false);
                Err(e)
            }
        }
    }

    /// Readiness: whether Redis answers `PING` within the timeout.
    pub async fn ping(&self) -> Result<(), String> {
        let reply = self
            .inner
            .connection
            .run(|mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await;
        match reply {
            Ok(_) => {
                self.inner.health.success();
                Ok(())
            }
            Err(e) => {
                self.inner.health.failure("ping", &e, false);
                Err(e.to_string())
            }
        }
    }
}

fn positive_millis(name: &'static str, value: Duration) -> Result<u64, EventStoreError> {
    let millis = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return Err(EventStoreError::InvalidSetting { name, message: format!("must be at least 1ms, got {value:?}") });
    }
    Ok(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_durations_and_bad_urls_are_rejected() {
        let bad = [
            EventStoreSettings { ttl: Duration::ZERO, ..Default::default() },
            EventStoreSettings { processing_lease: Duration::from_micros(10), ..Default::default() },
            EventStoreSettings { timeout: Duration::ZERO, ..Default::default() },
            EventStoreSettings { key_prefix: String::new(), ..Default::default() },
            EventStoreSettings { redis_url: "not a url".to_owned(), ..Default::default() },
        ];
        for settings in bad {
            let shown = format!("{settings:?}");
            assert!(RedisEventStore::new(settings).is_err(), "{shown}");
        }
    }

    #[test]
    fn a_store_can_be_built_without_redis_or_runtime() {
        let settings = EventStoreSettings { redis_url: "redis://127.0.0.1:1".to_owned(), ..Default::default() };
        let store = RedisEventStore::new(settings).expect("no connection at construction");
        assert!(!store.is_up());
        assert_eq!(store.key("a", "b").as_str(), "eventstore:chat-cdc:a:b");
    }

    #[test]
    fn tokens_are_unique_leases() {
        let a = ClaimToken::new();
        let b = ClaimToken::new();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with(LEASE_PREFIX));
    }
}
