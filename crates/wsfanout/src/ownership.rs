//! Closing the sockets of keys this pod no longer owns.
//!
//! Why this module exists: socket pods sit on a consistent-hash ring (Envoy or nginx)
//! keyed by stream id or user id, and the change handler's forwards reach whichever pod
//! the ring names. When a pod joins the ring (scale-out), about 1/N of the keys move to
//! it: new subscribes and new forwards go there, but the sockets already open stay on
//! the old pod, which no longer receives forwards for them, so they would miss live
//! events until the client happened to reconnect.
//!
//! How: every `WS_OWNERSHIP_CHECK_INTERVAL` each pod asks the proxy's internal listener
//! (`WS_OWNERSHIP_CHECK_URL`), through the very route forwards take, which pod answers
//! for each key it holds sockets for. The answering pod names itself with its
//! [`PodIdentity`]. Keys another pod answers for are closed with the service's
//! "reconnect" close (chat: `resync` + 4000, so the client reconnects with `since` and
//! the new owner replays what it missed), and the client's reconnect lands on the
//! owner. Any doubt (proxy unreachable, an error, a malformed answer) keeps the
//! sockets: a check never closes what it could not prove has moved.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use servicekit::Shutdown;

use crate::hub::{Close, Hub};

/// How long one ownership question may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// This process's name in ownership answers: random per process, so two processes
/// never share one (not even two pods with the same host name, or a restarted pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity(Arc<str>);

impl PodIdentity {
    /// A fresh identity, prefixed with `POD_NAME` (or `HOSTNAME`) for readable logs.
    pub fn generate() -> Self {
        let host = std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_default();
        let tag = uuid::Uuid::now_v7().simple().to_string();
        Self(if host.is_empty() { tag } else { format!("{host}-{tag}") }.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer of an owner endpoint: which pod took the question, and how many
/// sockets of the key it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerAnswer {
    pub pod: String,
    pub connections: usize,
}

impl OwnerAnswer {
    /// What `hub` on the pod `identity` answers for `key`.
    pub fn of<K>(hub: &Hub<K>, identity: &PodIdentity, key: &K) -> Self
    where
        K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
    {
        Self { pod: identity.to_string(), connections: hub.connections_of(key) }
    }
}

/// The periodic check. Built by a service with its hub, its route and its close.
pub struct OwnershipCheck<K> {
    hub: Hub<K>,
    identity: PodIdentity,
    http: reqwest::Client,
    /// `<proxy internal URL><owner path>`, e.g. `http://envoy:9101/chat/forward-to-websocket`.
    endpoint: String,
    /// The query parameter the proxy hashes on (`stream_id`, `user_id`).
    param: &'static str,
    token: String,
    interval: Duration,
    concurrency: usize,
    close: Close,
}

/// What one round found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub checked: usize,
    pub moved: usize,
    pub errors: usize,
}

impl<K> OwnershipCheck<K>
where
    K: Eq + Hash + Clone + fmt::Debug + fmt::Display + Send + Sync + 'static,
{
    /// `None` when `WS_OWNERSHIP_CHECK_URL` is empty (the check is off).
    pub fn new(
        hub: Hub<K>,
        identity: PodIdentity,
        path: &str,
        param: &'static str,
        token: &str,
        close: Close,
    ) -> Option<Self> {
        let settings = hub.settings().clone();
        let base = settings.ownership_check_url.trim().trim_end_matches('/');
        if base.is_empty() {
            return None;
        }
        let http = reqwest::Client::builder().timeout(CHECK_TIMEOUT).build().ok()?;
        Some(Self {
            hub,
            identity,
            http,
            endpoint: format!("{base}{path}"),
            param,
            token: token.to_owned(),
            interval: settings.ownership_check_interval,
            concurrency: settings.ownership_check_concurrency.max(1),
            close,
        })
    }

    /// Adds the check to `launch` as a worker (when it is on) that runs until shutdown.
    pub fn attach(check: Option<Self>, launch: servicekit::Launch, shutdown: &Shutdown) -> servicekit::Launch {
        match check {
            Some(check) => {
                let stop = shutdown.clone();
                launch.worker("ownership check", async move {
                    check.run(stop).await;
                    Ok(())
                })
            }
            None => launch,
        }
    }

    /// Runs a round every interval until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        tracing::info!(hub = self.hub.name(), endpoint = %self.endpoint, interval = ?self.interval, "ownership checks on");
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = ticker.tick() => {}
            }
            let round = self.round().await;
            if round.moved > 0 || round.errors > 0 {
                tracing::info!(hub = self.hub.name(), ?round, "ownership check");
            }
        }
    }

    /// Asks about every key once; closes the keys another pod answers for.
    pub async fn round(&self) -> Round {
        let keys = self.hub.keys();
        let answers = futures::stream::iter(keys)
            .map(|key| async move {
                let owner = self.owner(&key).await;
                (key, owner)
            })
            .buffer_unordered(self.concurrency)
            .collect::<Vec<_>>()
            .await;
        let hub = self.hub.name();
        let mut round = Round::default();
        for (key, owner) in answers {
            round.checked += 1;
            match owner {
                Ok(pod) if pod == self.identity.as_str() => {}
                Ok(pod) => {
                    let closed = self.hub.close_key(&key, self.close.clone());
                    if closed > 0 {
                        round.moved += 1;
                        metrics::counter!("ws_moved_keys_total", "hub" => hub).increment(1);
                        tracing::info!(hub, %key, owner = %pod, closed, "key moved to another pod: sockets closed");
                    }
                }
                Err(err) => {
                    round.errors += 1;
                    metrics::counter!("ws_ownership_check_errors_total", "hub" => hub).increment(1);
                    tracing::debug!(hub, %key, error = %err, "ownership check failed; sockets kept");
                }
            }
        }
        metrics::counter!("ws_ownership_checks_total", "hub" => hub).increment(round.checked as u64);
        round
    }

    async fn owner(&self, key: &K) -> Result<String, String> {
        let key = key.to_string();
        let response = self
            .http
            .get(&self.endpoint)
            .query(&[(self.param, key.as_str())])
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let answer: OwnerAnswer = response.json().await.map_err(|e| e.to_string())?;
        if answer.pod.is_empty() {
            return Err("empty pod name".to_owned());
        }
        Ok(answer.pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differ_between_calls() {
        let a = PodIdentity::generate();
        let b = PodIdentity::generate();
        assert_ne!(a, b);
        assert!(!a.as_str().is_empty());
    }
}
