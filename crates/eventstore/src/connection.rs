//! A Redis connection that is never required to exist.
//!
//! Why this module exists: a consumer must start, and keep consuming, while Redis is
//! down, and must use Redis again as soon as it is back, without a restart. The
//! `redis` crate's `ConnectionManager` reconnects by itself, but it insists on an
//! initial connection, and a connection that stops answering without being closed
//! (a half-open TCP connection) is never replaced. This wrapper:
//!
//! - creates the manager lazily, on first use, and again on any later use until one
//!   attempt succeeds;
//! - bounds every operation, connecting included, by the configured timeout;
//! - configures the manager to try each reconnect once (so a failed attempt is retried
//!   on the next operation, not after a long backoff sleep);
//! - drops the manager after operations have failed for a while without a single success,
//!   so the next operation starts from a fresh connection.
//!
//! Public as [`crate::RedisConnection`]: chatpersistence's write-behind queue uses the
//! same never-required, always-bounded connection.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;

use crate::EventStoreError;

/// After operations have failed for this long without one success, the connection is
/// thrown away and built anew (at least this long, or ten timeouts).
const RESET_AFTER_MIN: Duration = Duration::from_secs(5);

pub struct Connection {
    client: redis::Client,
    config: ConnectionManagerConfig,
    timeout: Duration,
    reset_after: Duration,
    current: Mutex<Option<ConnectionManager>>,
    /// Only one task at a time builds a manager; the others wait (within their timeout).
    connecting: tokio::sync::Mutex<()>,
    failing_since: Mutex<Option<Instant>>,
}

impl Connection {
    pub fn new(client: redis::Client, timeout: Duration) -> Self {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            // One attempt per reconnect: a failure surfaces as an error, and the next
            // operation starts the next attempt immediately. (The crate's backoff sleeps
            // at least a second between attempts, and with its default factor the
            // second sleep is a minute, during which nothing could heal.)
            .set_number_of_retries(0)
            .set_factor(2)
            .set_max_delay(1_000);
        Self {
            client,
            config,
            timeout,
            reset_after: RESET_AFTER_MIN.max(timeout.saturating_mul(10)),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            failing_since: Mutex::new(None),
        }
    }

    /// Runs `op` on a connection, connecting first if needed, all within the timeout.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, EventStoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempt = async {
            let manager = self.manager().await?;
            op(manager).await.map_err(EventStoreError::from)
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(EventStoreError::Timeout(self.timeout)),
        };
        match &result {
            Ok(_) => *lock(&self.failing_since) = None,
            Err(_) => self.note_failure(),
        }
        result
    }

    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(manager) = lock(&self.current).clone() {
            return Ok(manager);
        }
        let _building = self.connecting.lock().await;
        if let Some(manager) = lock(&self.current).clone() {
            return Ok(manager);
        }
        let manager = ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await?;
        *lock(&self.current) = Some(manager.clone());
        Ok(manager)
    }

    fn note_failure(&self) {
        let now = Instant::now();
        let mut failing_since = lock(&self.failing_since);
        match *failing_since {
            None => *failing_since = Some(now),
            Some(since) if now.duration_since(since) >= self.reset_after => {
                tracing::debug!("event store connection failing for {:?}, reconnecting from scratch", self.reset_after);
                *lock(&self.current) = None;
                *failing_since = Some(now);
            }
            Some(_) => {}
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain values: a panic elsewhere cannot leave them inconsistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
