//! "Is this user online right now?" — for the email handler (no email to someone
//! reading live) and for the inbox (the online dots next to members).
//!
//! Why this crate exists: generalnotificationshandler keeps `presence:{user_id}`
//! alive in Redis (short TTL, refreshed by heartbeats) while the user has a socket
//! open, and two services read those keys; one reader keeps them agreeing on what
//! "online" means. The answer is advisory: if Redis is down or slow every user
//! counts as offline (the email goes out; the dots stay grey). The connection is
//! made lazily and every call is bounded by the timeout, so a service starts and
//! keeps working without Redis.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use std::collections::HashSet;

/// Presence lookups against Redis.
pub struct Presence {
    client: redis::Client,
    config: ConnectionManagerConfig,
    timeout: Duration,
    prefix: String,
    current: Mutex<Option<ConnectionManager>>,
    connecting: tokio::sync::Mutex<()>,
    /// Set while lookups fail, so an outage is logged once, not per message.
    down: AtomicBool,
    /// The counter of failed lookups (each service names its own).
    failure_metric: &'static str,
}

impl Presence {
    /// A reader of `{prefix}:{user}` keys; failures count in `failure_metric`.
    pub fn new(redis_url: &str, prefix: &str, timeout: Duration, failure_metric: &'static str) -> Result<Self, String> {
        let client = redis::Client::open(redis_url).map_err(|err| format!("REDIS_URL is not usable: {err}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            // One attempt per reconnect; the next lookup tries again at once.
            .set_number_of_retries(0);
        Ok(Self {
            client,
            config,
            timeout,
            prefix: prefix.trim_end_matches(':').to_owned(),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            down: AtomicBool::new(false),
            failure_metric,
        })
    }

    /// The key that exists while `user` is online.
    pub fn key(&self, user: &str) -> String {
        format!("{}:{user}", self.prefix)
    }

    fn cached(&self) -> Option<ConnectionManager> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn store(&self, manager: Option<ConnectionManager>) {
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = manager;
    }

    async fn manager(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(manager) = self.cached() {
            return Ok(manager);
        }
        let _building = self.connecting.lock().await;
        if let Some(manager) = self.cached() {
            return Ok(manager);
        }
        let manager = ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await?;
        self.store(Some(manager.clone()));
        Ok(manager)
    }

    /// Whether `user` has a live presence key. Errors and timeouts answer `false`.
    pub async fn is_online(&self, user: &str) -> bool {
        let key = self.key(user);
        let lookup = async {
            let mut manager = self.manager().await?;
            redis::cmd("EXISTS").arg(&key).query_async::<i64>(&mut manager).await
        };
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(count)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("presence checks reach Redis again");
                }
                count > 0
            }
            Ok(Err(err)) => {
                self.failed(&key, &err.to_string());
                false
            }
            Err(_) => {
                self.failed(&key, &format!("no answer within {:?}", self.timeout));
                false
            }
        }
    }

    /// Which of `users` are online, in one round trip. Errors and timeouts answer
    /// "nobody".
    pub async fn online_of<'a>(&self, users: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
        let users: Vec<&str> = users.into_iter().collect();
        if users.is_empty() {
            return HashSet::new();
        }
        let lookup = async {
            let mut manager = self.manager().await?;
            let mut pipe = redis::pipe();
            for user in &users {
                pipe.cmd("EXISTS").arg(self.key(user));
            }
            pipe.query_async::<Vec<i64>>(&mut manager).await
        };
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(found)) => {
                self.down.store(false, Ordering::Relaxed);
                users.iter().zip(found).filter(|(_, n)| *n > 0).map(|(u, _)| (*u).to_owned()).collect()
            }
            Ok(Err(err)) => {
                self.failed(&self.key("*"), &err.to_string());
                HashSet::new()
            }
            Err(_) => {
                self.failed(&self.key("*"), &format!("no answer within {:?}", self.timeout));
                HashSet::new()
            }
        }
    }

    fn failed(&self, key: &str, error: &str) {
        metrics::counter!(self.failure_metric).increment(1);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(%key, %error, "presence check failed; users count as offline until Redis answers again");
        }
        // A half-open connection is never replaced by the manager: start afresh.
        self.store(None);
    }
}
