//! Presence: while a user has a socket on this pod, `{PRESENCE_KEY_PREFIX}:{user_id}`
//! exists in Redis; when the last one closes, it goes.
//!
//! Why this module exists: other services (the email handler first) must be able to
//! ask "is this user online right now" with one `EXISTS`, without knowing which pod
//! holds the user's sockets. This pod is the only one that knows, so it writes the
//! answer where everyone can read it, and keeps it true:
//!
//! - a socket opening or closing marks its user as changed; one worker task applies the
//!   changes (SET with a TTL while the user has a local socket, delete when not) in one
//!   pipelined round trip, reading the hub's *current* state, so the order in which
//!   changes arrive never matters;
//! - every `PRESENCE_REFRESH` the same worker sets every locally connected user's key
//!   again (pipelined, one round trip per 5,000 users), so a key outlives its pod by at
//!   most `PRESENCE_TTL` and reappears after Redis restarts empty;
//! - the value of a key is this process's instance id, and a key is only deleted while
//!   it still holds that value (a Lua compare-and-delete), so a pod whose last socket
//!   for a user closed never deletes the key another pod wrote for the same user;
//! - presence is best effort: Redis being down is logged once (and once when it is
//!   back), counted, and never blocks a socket or a notification.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chatstream::UserId;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use servicekit::Shutdown;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use wsfanout::Hub;

use crate::settings::PresenceSettings;

/// Counter: presence write round trips (refreshes and immediate updates) that failed.
pub const METRIC_FAILURES: &str = "presence_refresh_failures_total";
/// Gauge: 1 while the last presence round trip reached Redis, 0 after one failed.
pub const METRIC_UP: &str = "presence_redis_up";
/// Gauge: users with at least one socket on this pod (as of the last refresh).
pub const METRIC_USERS: &str = "presence_users";
/// Gauge: users whose presence change waits for the worker.
pub const METRIC_PENDING: &str = "presence_pending_updates";
/// Counter: changes not recorded because the pending set was full.
pub const METRIC_DROPPED: &str = "presence_updates_dropped_total";

/// The most users whose change may wait for the worker. Beyond it a change is dropped
/// and counted: a missed SET is repaired by the next refresh, a missed delete lapses
/// after `PRESENCE_TTL`.
const PENDING_LIMIT: usize = 65_536;
/// Commands per pipelined round trip.
const PIPELINE_CHUNK: usize = 5_000;
/// `DEL KEYS[1]` only while it holds this instance's id (`ARGV[1]`).
const DELETE_IF_OURS: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Why a presence round trip failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain values: a panic elsewhere cannot leave them inconsistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A Redis connection that need not exist: made on first use, dropped after any
/// failure and made again on the next use, every round trip bounded by the timeout.
struct Link {
    client: redis::Client,
    config: AsyncConnectionConfig,
    timeout: Duration,
    current: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|err| format!("REDIS_URL: {err}"))?;
        let config = AsyncConnectionConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout);
        Ok(Self { client, config, timeout, current: tokio::sync::Mutex::new(None) })
    }

    async fn run<T, F, Fut>(&self, op: F) -> Result<T, PresenceError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempt = async {
            let connection = self.connection().await?;
            op(connection).await
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result.map_err(PresenceError::from),
            Err(_) => Err(PresenceError::Timeout(self.timeout)),
        };
        if result.is_err() {
            // Start from a fresh connection next time (a half-open one never heals);
            // if another task is connecting right now, that one is fresh already.
            if let Ok(mut current) = self.current.try_lock() {
                *current = None;
            }
        }
        result
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.client.get_multiplexed_async_connection_with_config(&self.config).await?;
        *current = Some(connection.clone());
        Ok(connection)
    }
}

/// Whether Redis answers, logged once per change of state.
#[derive(Default)]
struct Health {
    up: Mutex<Option<bool>>,
}

impl Health {
    fn success(&self) {
        let mut up = lock(&self.up);
        if *up != Some(true) {
            if *up == Some(false) {
                tracing::info!("Redis answers again; presence is recorded");
            }
            *up = Some(true);
            metrics::gauge!(METRIC_UP).set(1.0);
        }
    }

    fn failure(&self, what: &str, error: &PresenceError) {
        let mut up = lock(&self.up);
        if *up == Some(false) {
            tracing::debug!(what, %error, "presence still unavailable");
            return;
        }
        *up = Some(false);
        metrics::gauge!(METRIC_UP).set(0.0);
        tracing::warn!(
            what,
            %error,
            "Redis unavailable: presence is not recorded until it is back (sockets and notifications are unaffected)"
        );
    }
}

struct Inner {
    link: Link,
    health: Health,
    prefix: String,
    ttl_ms: u64,
    refresh: Duration,
    instance: String,
    pending: Mutex<HashSet<UserId>>,
    wake: Notify,
}

/// The presence of this pod's users in Redis (cheap to clone).
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

/// What one write round does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Apply the pending changes.
    Changes,
    /// Apply the pending changes and set every connected user's key again.
    Refresh,
    /// Shutting down: delete the keys of every pending and still connected user.
    Final,
}

impl Presence {
    /// `instance` is the value written to the keys: unique per process.
    pub fn new(settings: &PresenceSettings, instance: String) -> Result<Self, String> {
        metrics::describe_counter!(METRIC_FAILURES, "Presence round trips to Redis that failed");
        metrics::describe_gauge!(METRIC_UP, "1 while presence reaches Redis, 0 after a failed round trip");
        metrics::describe_gauge!(METRIC_USERS, "Users with at least one socket on this pod");
        metrics::describe_gauge!(METRIC_PENDING, "Users whose presence change waits to be written");
        metrics::describe_counter!(METRIC_DROPPED, "Presence changes dropped because too many were pending");
        metrics::counter!(METRIC_FAILURES).absolute(0);
        metrics::counter!(METRIC_DROPPED).absolute(0);
        let ttl_ms = u64::try_from(settings.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                link: Link::new(&settings.redis_url, settings.redis_timeout)?,
                health: Health::default(),
                // `presence:` and `presence` name the same keys (as in emailhandler).
                prefix: settings.key_prefix.trim_end_matches(':').to_owned(),
                ttl_ms,
                refresh: settings.refresh,
                instance,
                pending: Mutex::new(HashSet::new()),
                wake: Notify::new(),
            }),
        })
    }

    /// A process-unique instance id: the host name (the pod name on Kubernetes) and a UUID.
    pub fn instance_id() -> String {
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "local".to_owned());
        format!("{host}/{}", uuid::Uuid::now_v7().simple())
    }

    pub fn key(&self, user: &UserId) -> String {
        format!("{}:{}", self.inner.prefix, user)
    }

    /// Records that `user` opened a socket now, and that the socket closed when the
    /// returned guard is dropped (after the socket's registration is gone).
    pub fn track(&self, user: UserId) -> Tracked {
        self.changed(&user);
        Tracked { presence: self.clone(), user }
    }

    fn changed(&self, user: &UserId) {
        {
            let mut pending = lock(&self.inner.pending);
            if pending.len() >= PENDING_LIMIT && !pending.contains(user) {
                metrics::counter!(METRIC_DROPPED).increment(1);
                return;
            }
            pending.insert(user.clone());
            metrics::gauge!(METRIC_PENDING).set(pending.len() as f64);
        }
        self.inner.wake.notify_one();
    }

    /// Whether `user` has a presence key (on any pod): `EXISTS {prefix}:{user}`.
    pub async fn is_online(&self, user: &UserId) -> Result<bool, PresenceError> {
        let key = self.key(user);
        let result = self
            .inner
            .link
            .run(|mut connection| async move {
                redis::cmd("EXISTS").arg(&key).query_async::<i64>(&mut connection).await.map(|n| n > 0)
            })
            .await;
        match &result {
            Ok(_) => self.inner.health.success(),
            Err(err) => self.inner.health.failure("lookup", err),
        }
        result
    }

    /// This process's instance id (the value it writes to its users' keys).
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Who holds each user's presence key: `MGET` of their keys in one round trip,
    /// `None` for a user without one (offline). The batch endpoint asks this about
    /// the users it has no socket for, to tell "offline" from "on another pod".
    pub async fn owners(&self, users: &[&UserId]) -> Result<Vec<Option<String>>, PresenceError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = users.iter().map(|user| self.key(user)).collect();
        let result = self
            .inner
            .link
            .run(|mut connection| async move {
                redis::cmd("MGET").arg(&keys).query_async::<Vec<Option<String>>>(&mut connection).await
            })
            .await;
        match &result {
            Ok(_) => self.inner.health.success(),
            Err(err) => self.inner.health.failure("lookup", err),
        }
        result
    }

    /// The worker: applies changes as they come and refreshes every `PRESENCE_REFRESH`
    /// until shutdown; then waits (up to `drain_for`) for the sockets to close and
    /// deletes this pod's keys.
    pub async fn run(self, hub: Hub<UserId>, shutdown: Shutdown, drain_for: Duration) -> Result<(), String> {
        let refresh = self.inner.refresh;
        let mut tick = tokio::time::interval_at(Instant::now() + refresh, refresh);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let stop = shutdown.wait();
        tokio::pin!(stop);
        // The users whose key this worker set and has not deleted since.
        let mut owned: HashSet<UserId> = HashSet::new();
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = tick.tick() => self.write(&hub, Round::Refresh, &mut owned).await,
                _ = self.inner.wake.notified() => self.write(&hub, Round::Changes, &mut owned).await,
            }
        }
        // Every socket is closing with 1001; once they are gone (or the drain is over),
        // this pod's users are no longer here. Every key it set goes, whether or not
        // the socket's close has been reported yet.
        hub.wait_idle(drain_for).await;
        self.write(&hub, Round::Final, &mut owned).await;
        Ok(())
    }

    async fn write(&self, hub: &Hub<UserId>, round: Round, owned: &mut HashSet<UserId>) {
        let pending: Vec<UserId> = {
            let mut pending = lock(&self.inner.pending);
            metrics::gauge!(METRIC_PENDING).set(0.0);
            std::mem::take(&mut *pending).into_iter().collect()
        };
        let mut sets: Vec<UserId> = Vec::new();
        let mut deletes: Vec<UserId> = Vec::new();
        match round {
            Round::Changes | Round::Refresh => {
                let connected = if round == Round::Refresh { hub.keys() } else { Vec::new() };
                if round == Round::Refresh {
                    metrics::gauge!(METRIC_USERS).set(connected.len() as f64);
                }
                for user in pending {
                    if hub.connections_of(&user) == 0 {
                        deletes.push(user);
                    } else if round == Round::Changes {
                        sets.push(user);
                    }
                }
                sets.extend(connected);
            }
            Round::Final => {
                let mut all: HashSet<UserId> = std::mem::take(owned);
                all.extend(pending);
                all.extend(hub.keys());
                deletes.extend(all);
            }
        }
        // What this worker owns, whatever Redis answers: a failed SET is repeated by the
        // next refresh, and a failed delete lapses after PRESENCE_TTL.
        for user in &deletes {
            owned.remove(user);
        }
        owned.extend(sets.iter().cloned());
        if sets.is_empty() && deletes.is_empty() {
            return;
        }
        let what = match round {
            Round::Changes => "update",
            Round::Refresh => "refresh",
            Round::Final => "shutdown",
        };
        let ops: Vec<(bool, String)> = sets
            .iter()
            .map(|user| (true, self.key(user)))
            .chain(deletes.iter().map(|user| (false, self.key(user))))
            .collect();
        for chunk in ops.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            for (set, key) in chunk {
                if *set {
                    pipe.cmd("SET").arg(key).arg(&self.inner.instance).arg("PX").arg(self.inner.ttl_ms).ignore();
                } else {
                    pipe.cmd("EVAL").arg(DELETE_IF_OURS).arg(1).arg(key).arg(&self.inner.instance).ignore();
                }
            }
            let result = self
                .inner
                .link
                .run(|mut connection| async move { pipe.query_async::<()>(&mut connection).await })
                .await;
            match result {
                Ok(()) => self.inner.health.success(),
                Err(err) => {
                    // Not retried here: a lost SET is repaired by the next refresh, a
                    // lost delete lapses after PRESENCE_TTL.
                    metrics::counter!(METRIC_FAILURES).increment(1);
                    self.inner.health.failure(what, &err);
                    return;
                }
            }
        }
    }
}

/// Marks its user as changed when dropped (the socket is gone).
pub struct Tracked {
    presence: Presence,
    user: UserId,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.presence.changed(&self.user);
    }
}
