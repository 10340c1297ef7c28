//! The built-in outbox relay (`CAPTURE_MODE=outbox`): publishes every message
//! marked `outbox_pending` to the change topic in Debezium's flattened format, then
//! clears the marker.
//!
//! Why this module exists: where Debezium is not deployed (the local stack, CI,
//! small installs) something must still carry each stored message to Kafka, with
//! the same guarantees: at-least-once, nothing lost when the relay dies at any point
//! or the broker is away for a while, one conversation in order, and low latency.
//!
//! How: the insert itself sets `outbox_pending: true` (one atomic write). The relay
//! wakes on a local insert (a `Notify`), on `RELAY_POLL_INTERVAL` as a fallback (other
//! replicas' inserts, leftovers of a crash) or when it becomes leader; scans the
//! oldest pending messages (sorted by message id); and publishes each one keyed by
//! its stream id. The marker is cleared only for messages whose delivery the broker
//! acknowledged, so a crash between publish and clear republishes them (consumers
//! deduplicate by message id). Publishing is pipelined: the next scan does not wait
//! for earlier deliveries or clears; messages already in flight are skipped, and the
//! producer keeps per-partition order (idempotent, `acks=all`). Only the holder of
//! the lease ([`crate::lease`]) scans and publishes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chatstream::{ChangeEvent, ChangeOp, ChatMessage};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kafkawrapper::Producer;
use servicekit::Shutdown;
use tokio::sync::Notify;

use crate::lease::LeaseHandle;
use crate::settings::CaptureSettings;
use crate::store::{Store, StoreError};

/// How long shutdown waits for deliveries already handed to the producer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait after a failure; doubled per failure up to `RELAY_MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A delivery's outcome: the message id, and whether the broker acknowledged it.
type Delivery = (String, Result<(), kafkawrapper::Error>);
/// A marker clear's outcome: the ids it covered, and what MongoDB said.
type Clear = (Vec<String>, Result<u64, StoreError>);

/// The relay task.
pub struct Relay {
    store: Store,
    producer: Producer,
    brokers: String,
    settings: CaptureSettings,
    wake: std::sync::Arc<Notify>,
    lease: LeaseHandle,
}

/// A capped exponential backoff.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { next: FIRST_BACKOFF.min(max), max }
    }

    fn fail(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF.min(self.max);
    }
}

/// The relay's working state between wake-ups.
struct Pipeline {
    /// Published or being published, marker not cleared yet: never scanned again.
    in_flight: HashSet<String>,
    deliveries: FuturesUnordered<BoxFuture<'static, Delivery>>,
    /// Acknowledged, waiting for the next clear.
    acked: Vec<String>,
    clearing: Option<BoxFuture<'static, Clear>>,
    /// Pending documents that are not valid messages (logged once, skipped).
    poisoned: HashSet<String>,
}

impl Relay {
    pub fn new(
        store: Store,
        producer: Producer,
        brokers: String,
        settings: CaptureSettings,
        wake: std::sync::Arc<Notify>,
        lease: LeaseHandle,
    ) -> Self {
        Self { store, producer, brokers, settings, wake, lease }
    }

    /// Creates the topic if needed, retrying (with backoff) until the broker answers.
    async fn ensure_topic(&self, shutdown: &Shutdown) -> bool {
        let mut backoff = Backoff::new(self.settings.max_backoff);
        loop {
            let topics = [(self.settings.topic.as_str(), self.settings.partitions)];
            match kafkawrapper::ensure_topics(&self.brokers, &topics).await {
                Ok(()) => return true,
                Err(err) => {
                    let wait = backoff.fail();
                    tracing::warn!(topic = %self.settings.topic, error = %err, ?wait, "cannot ensure the change topic yet");
                    tokio::select! {
                        _ = shutdown.wait() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Runs until shutdown. Never gives up on the broker or MongoDB: it backs off.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<(), String> {
        if !self.ensure_topic(&shutdown).await {
            return Ok(());
        }
        tracing::info!(topic = %self.settings.topic, "outbox relay running");

        let max_in_flight = (self.settings.batch_size as usize).saturating_mul(4).max(1);
        let mut pipe = Pipeline {
            in_flight: HashSet::new(),
            deliveries: FuturesUnordered::new(),
            acked: Vec::new(),
            clearing: None,
            poisoned: HashSet::new(),
        };
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let mut resume_at: Option<Instant> = None;
        let mut next_poll = Instant::now();
        let mut need_scan = true;
        let mut count_pending = true;
        let mut stop = std::pin::pin!(shutdown.wait());

        loop {
            if need_scan && resume_at.is_none() && pipe.in_flight.len() < max_in_flight && self.lease.is_leader() {
                need_scan = false;
                match self.scan(&mut pipe, count_pending).await {
                    Ok(full) => {
                        count_pending = false;
                        // A full batch means more may be waiting: scan again at once.
                        need_scan = full;
                    }
                    Err(err) => {
                        let wait = backoff.fail();
                        tracing::warn!(error = %err, ?wait, "outbox scan failed");
                        resume_at = Some(Instant::now() + wait);
                    }
                }
            }
            if pipe.clearing.is_none() && !pipe.acked.is_empty() && resume_at.is_none() {
                let ids = std::mem::take(&mut pipe.acked);
                let store = self.store.clone();
                pipe.clearing = Some(Box::pin(async move {
                    let t = Instant::now();
                    let result = store.clear_pending(&ids).await;
                    tracing::debug!(count = ids.len(), took = ?t.elapsed(), "clear");
                    (ids, result)
                }));
            }

            tokio::select! {
                _ = &mut stop => break,
                Some((id, result)) = pipe.deliveries.next(), if !pipe.deliveries.is_empty() => {
                    match result {
                        Ok(()) => {
                            metrics::counter!("relay_published_total").increment(1);
                            pipe.acked.push(id);
                        }
                        Err(err) => {
                            metrics::counter!("relay_publish_failures_total").increment(1);
                            // Not acknowledged: the marker stays, the next scan retries it.
                            pipe.in_flight.remove(&id);
                            if resume_at.is_none() {
                                let wait = backoff.fail();
                                tracing::warn!(message_id = %id, error = %err, ?wait, "publish failed; backing off");
                                resume_at = Some(Instant::now() + wait);
                            }
                            need_scan = true;
                        }
                    }
                }
                (ids, result) = next_of(&mut pipe.clearing), if pipe.clearing.is_some() => {
                    pipe.clearing = None;
                    match result {
                        Ok(_) => {
                            backoff.reset();
                            for id in &ids {
                                pipe.in_flight.remove(id);
                            }
                        }
                        Err(err) => {
                            // Still published: keep them in flight (not republished)
                            // and clear them again after the backoff.
                            let wait = backoff.fail();
                            tracing::warn!(error = %err, count = ids.len(), ?wait, "clearing outbox markers failed");
                            pipe.acked.extend(ids);
                            resume_at = Some(Instant::now() + wait);
                        }
                    }
                }
                _ = self.wake.notified() => need_scan = true,
                _ = self.lease.changed() => need_scan = true,
                _ = tokio::time::sleep_until(next_poll.into()) => {
                    next_poll = Instant::now() + self.settings.poll_interval;
                    need_scan = true;
                    count_pending = true;
                }
                _ = tokio::time::sleep_until(resume_at.unwrap_or_else(Instant::now).into()), if resume_at.is_some() => {
                    resume_at = None;
                    need_scan = true;
                }
            }
        }

        self.drain(&mut pipe).await;
        Ok(())
    }

    /// Scans the outbox once and hands new messages to the producer. Returns whether
    /// the batch was full (more may be pending).
    async fn scan(&self, pipe: &mut Pipeline, count_pending: bool) -> Result<bool, StoreError> {
        let batch = self.settings.batch_size as usize;
        let limit = u32::try_from(batch + pipe.in_flight.len() + pipe.poisoned.len()).unwrap_or(u32::MAX);
        let scan_started = Instant::now();
        let pending = self.store.pending(limit).await?;
        let found = pending.len();
        tracing::debug!(found, in_flight = pipe.in_flight.len(), took = ?scan_started.elapsed(), "outbox scan");

        let oldest = pending.iter().filter_map(|m| m.as_ref().ok()).map(|m| m.created_at).min();
        let lag = oldest.map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
        metrics::gauge!("relay_lag_seconds").set(lag);
        if found < limit as usize {
            metrics::gauge!("relay_pending").set(found as f64);
        } else if count_pending {
            if let Ok(count) = self.store.count_pending().await {
                metrics::gauge!("relay_pending").set(count as f64);
            }
        }

        let mut started = 0;
        for item in pending {
            let message = match item {
                Ok(message) => message,
                Err(StoreError::Corrupt { id, reason }) => {
                    if pipe.poisoned.insert(id.clone()) {
                        tracing::error!(%id, %reason, "pending document is not a valid message; skipping it");
                    }
                    continue;
                }
                Err(other) => return Err(other),
            };
            let id = message.message_id.to_string();
            if pipe.in_flight.contains(&id) {
                continue;
            }
            if started == batch || !self.lease.is_leader() {
                return Ok(true);
            }
            pipe.in_flight.insert(id.clone());
            pipe.deliveries.push(self.publish(id, message));
            started += 1;
        }
        Ok(found >= limit as usize)
    }

    /// One delivery: resolves once the broker acknowledged (or refused) it. The
    /// producer enqueues on the first poll, and `FuturesUnordered` first-polls in
    /// push order, so messages reach the producer in scan (message id) order.
    fn publish(&self, id: String, message: ChatMessage) -> BoxFuture<'static, Delivery> {
        let producer = self.producer.clone();
        let topic = self.settings.topic.clone();
        // The change happened when the document was inserted, which is when
        // created_at was taken (Debezium reports the oplog time of the insert).
        let source_ts_ms = message.created_at.timestamp_millis();
        let event = ChangeEvent::new(ChangeOp::Create, message, source_ts_ms);
        let key = event.key();
        let payload = event.to_flattened().to_string();
        Box::pin(async move {
            let t = Instant::now();
            let result = producer.send(&topic, key.as_bytes(), payload.as_bytes(), &[]).await.map(|_| ());
            tracing::debug!(took = ?t.elapsed(), "delivery");
            (id, result)
        })
    }

    /// On shutdown: waits (bounded) for deliveries in flight and clears what was
    /// acknowledged. Whatever is left stays marked and is published after restart.
    async fn drain(&self, pipe: &mut Pipeline) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        if let Some(clearing) = pipe.clearing.take() {
            if let Ok((ids, Err(_))) = tokio::time::timeout_at(deadline.into(), clearing).await {
                pipe.acked.extend(ids);
            }
        }
        while let Ok(Some((id, result))) = tokio::time::timeout_at(deadline.into(), pipe.deliveries.next()).await {
            if result.is_ok() {
                metrics::counter!("relay_published_total").increment(1);
                pipe.acked.push(id);
            }
        }
        if !pipe.acked.is_empty() {
            if let Err(err) = self.store.clear_pending(&pipe.acked).await {
                tracing::warn!(error = %err, count = pipe.acked.len(), "could not clear markers at shutdown; they will be republished");
            }
        }
        tracing::info!(left_in_flight = pipe.deliveries.len(), "outbox relay stopped");
    }
}

/// The output of an optional future; never resolves while there is none.
async fn next_of<T>(slot: &mut Option<BoxFuture<'static, T>>) -> T {
    match slot.as_mut() {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| b.fail().as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.fail(), Duration::from_millis(100));
    }
}
