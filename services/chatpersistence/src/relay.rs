//! The built-in outbox relay (`CAPTURE_MODE=outbox`): publishes every message
//! marked `outbox_pending` to the change topic in Debezium's flattened format, then
//! clears the marker.
//!
//! Why this module exists: where Debezium is not deployed (the local stack, CI,
//! small installs) something must still carry each stored message to Kafka, with
//! the same guarantees: at-least-once, nothing lost when the relay dies at any point
//! or the broker is away for a while, one conversation in order, and low latency.
//!
//! How:
//! - The insert itself sets `outbox_pending: true` (one atomic write). Only the
//!   replica holding the lease ([`crate::lease`]) publishes.
//! - Fast path: after a successful insert the API hands the message to the relay
//!   ([`RelayFeed::offer`], sent under the per-stream lock, so in commit order). The
//!   leader publishes it at once, without reading MongoDB back.
//! - Sweeps: a scan of the oldest pending documents (sorted by message id) runs on
//!   `RELAY_POLL_INTERVAL`, when leadership is gained, after a failed publish (once
//!   the backoff has passed) and when the feed overflowed. It finds what the fast
//!   path could not know about: other replicas' inserts, leftovers of a crash,
//!   failed publishes. The routine (poll interval) sweep runs beside the fast path;
//!   the others *hold* it: fed messages wait until the sweep is done (it covers
//!   them too), so older messages always go first. The loop never waits on
//!   MongoDB or the broker itself: scans, deliveries and clears are futures it polls.
//! - Ordered mode: when a sweep finds recent pending messages this replica did not
//!   insert (another replica takes writes), every wake-up becomes a sweep for a
//!   while, so one conversation written through two replicas is still published in
//!   message id order.
//! - A marker is cleared (in coalesced `update_many` batches) only after the broker
//!   acknowledged the message; a crash in between republishes it after restart, and
//!   consumers deduplicate by message id. Publishing is pipelined and the producer
//!   keeps per-partition order (idempotent, `acks=all`).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::{ChangeEvent, ChangeOp, ChatMessage};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kafkawrapper::{Backoff, Producer, RetrySettings, Retryable};
use servicekit::Shutdown;
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use crate::lease::LeaseHandle;
use crate::settings::CaptureSettings;
use crate::store::{Store, StoreError};

/// How long shutdown waits for deliveries already handed to the producer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait after a failure; doubled per failure up to `RELAY_MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Acknowledged markers are cleared in batches at most this often (sooner when a
/// full batch is waiting). Delivery does not wait for clears; a later clear only
/// means a larger re-publish after a crash.
const CLEAR_DELAY: Duration = Duration::from_millis(50);
/// A pending message at least this old that this relay is not publishing was
/// written by another replica (local ones reach the fast path within milliseconds).
const FOREIGN_AGE: Duration = Duration::from_millis(100);
/// How long ordered mode lasts after the last foreign message was seen.
const ORDERED_HOLD: Duration = Duration::from_secs(10);
/// The outbox is counted exactly (for `relay_pending` while a backlog is larger than
/// a scan) at most this often, and never twice at once. A count reads every pending
/// document, and the local MongoDB stand-in answers it with a full collection scan
/// (3 s at 74,000 messages): counted every poll interval, as it was, a backlog made
/// the server spend its whole time counting, the relay's own scans and lease renewals
/// timed out behind the counts, and the backlog never drained.
const COUNT_EVERY: Duration = Duration::from_secs(60);

/// A delivery's outcome: the message id, and whether the broker acknowledged it.
type Delivery = (String, Result<(), kafkawrapper::Error>);
/// A marker clear's outcome: the ids it covered, and what MongoDB said.
type Clear = (Vec<String>, Result<u64, StoreError>);

/// What the relay tracks a marked document under: the message id for a new
/// message, `<id>.v<version>` for a change of it, so a change made while the message
/// itself is still in flight is published too (and its marker cleared only by it).
pub(crate) fn relay_key(message: &ChatMessage) -> String {
    match message.state.version {
        0 => message.message_id.to_string(),
        version => format!("{}.v{version}", message.message_id),
    }
}

/// The API's side of the fast path.
pub struct RelayFeed {
    tx: mpsc::Sender<ChatMessage>,
    overflow: Notify,
    offered: std::sync::Mutex<Offered>,
}

/// The relay keys this process offered to the feed lately (kept [`OFFERED_SPAN`] to
/// twice that, as 64-bit hashes, at most [`OFFERED_MAX`] per span). A sweep that
/// finds an old pending message uses it to tell "written here, still on its way
/// through the feed" from "written by another replica": the write-behind writer
/// stores messages long after they were accepted (`created_at` is the acceptance),
/// and taking its own backlog for another replica's put the relay in ordered mode
/// for as long as the backlog lasted (delivery fell tens of seconds behind storage).
#[derive(Default)]
struct Offered {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    since: Option<Instant>,
}

/// How long an offered key is remembered at least.
const OFFERED_SPAN: Duration = Duration::from_secs(30);
/// The most keys one span remembers (beyond it, old messages may look foreign again).
const OFFERED_MAX: usize = 500_000;

fn key_hash(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

impl Offered {
    fn rotate(&mut self, now: Instant) {
        match self.since {
            Some(since) if now.duration_since(since) < OFFERED_SPAN => {}
            _ => {
                self.previous = std::mem::take(&mut self.current);
                self.since = Some(now);
            }
        }
    }

    fn insert(&mut self, key: &str, now: Instant) {
        self.rotate(now);
        if self.current.len() < OFFERED_MAX {
            self.current.insert(key_hash(key));
        }
    }

    fn contains(&self, key: &str) -> bool {
        let hash = key_hash(key);
        self.current.contains(&hash) || self.previous.contains(&hash)
    }
}

impl RelayFeed {
    /// A feed holding up to `capacity` messages, and the relay's end of it.
    pub fn new(capacity: usize) -> (Arc<Self>, mpsc::Receiver<ChatMessage>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Arc::new(Self { tx, overflow: Notify::new(), offered: Default::default() }), rx)
    }

    /// Hands a just-inserted message to the relay. Never waits: when the feed is
    /// full the relay is told to sweep instead (the message is in MongoDB, marked).
    pub fn offer(&self, message: ChatMessage) {
        self.offered.lock().unwrap_or_else(|p| p.into_inner()).insert(&relay_key(&message), Instant::now());
        if self.tx.try_send(message).is_err() {
            self.overflow.notify_one();
        }
    }

    /// Whether this process offered the message under relay key `key` lately.
    fn offered(&self, key: &str) -> bool {
        self.offered.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }
}

/// The relay task.
pub struct Relay {
    store: Store,
    producer: Producer,
    brokers: String,
    settings: CaptureSettings,
    feed: Arc<RelayFeed>,
    rx: mpsc::Receiver<ChatMessage>,
    lease: LeaseHandle,
}

/// The relay's working state between wake-ups.
struct Pipeline {
    /// Published or being published, marker not cleared yet: never published again.
    in_flight: HashSet<String>,
    deliveries: FuturesUnordered<BoxFuture<'static, Delivery>>,
    /// Acknowledged, waiting for the next clear, and when the oldest was acknowledged.
    acked: Vec<String>,
    acked_since: Option<Instant>,
    clearing: Option<BoxFuture<'static, Clear>>,
    /// Fed messages taken from the feed, not published yet.
    queued: VecDeque<ChatMessage>,
    /// Fed messages handed over to the next sweep instead (so it knows they are local).
    deferred: HashSet<String>,
    /// Pending documents that are not valid messages (logged once, skipped).
    poisoned: HashSet<String>,
    /// Markers cleared while a scan runs: the scan may still report them as pending.
    cleared_during_scan: HashSet<String>,
    /// The scan running now, its limit, and whether the fast path waits for it.
    sweeping: Option<BoxFuture<'static, Scan>>,
    sweep_limit: usize,
    sweep_holds: bool,
    /// A sweep the fast path must wait for (older messages may be pending).
    hold_due: bool,
    /// A routine sweep (poll interval): runs beside the fast path.
    tick_due: bool,
    /// When the next exact count of the outbox may start, and whether one runs.
    next_count: Instant,
    counting: Arc<AtomicBool>,
    ordered_until: Option<Instant>,
    resume_at: Option<Instant>,
}

/// A scan's outcome: the pending messages found, oldest first.
type Scan = Result<Vec<Result<ChatMessage, StoreError>>, StoreError>;

/// What the relay does with fed messages on a wake-up: the run loop's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not the lease holder: fed messages are dropped (the leader's sweeps find them).
    Follower,
    /// A publish, scan or clear failed: fed messages go to the sweep after the wait.
    BackingOff,
    /// A holding sweep runs (older messages may be pending): fed messages wait.
    Holding,
    /// Fed messages are published at once (fast path); sweeps start when due.
    Flowing,
}

impl Pipeline {
    fn new() -> Self {
        Self {
            in_flight: HashSet::new(),
            deliveries: FuturesUnordered::new(),
            acked: Vec::new(),
            acked_since: None,
            clearing: None,
            queued: VecDeque::new(),
            deferred: HashSet::new(),
            poisoned: HashSet::new(),
            cleared_during_scan: HashSet::new(),
            sweeping: None,
            sweep_limit: 0,
            sweep_holds: false,
            // Whatever a previous leader left is older than anything fed now.
            hold_due: true,
            tick_due: false,
            next_count: Instant::now(),
            counting: Arc::new(AtomicBool::new(false)),
            ordered_until: None,
            resume_at: None,
        }
    }

    fn mode(&self, leader: bool) -> Mode {
        if !leader {
            Mode::Follower
        } else if self.resume_at.is_some() {
            Mode::BackingOff
        } else if self.held() {
            Mode::Holding
        } else {
            Mode::Flowing
        }
    }

    /// Whether a sweep starts now, and if so whether it holds the fast path: due
    /// (a holding or a routine one), none running, and room for what it finds. A
    /// holding sweep takes the queued fed messages along (they were committed
    /// before it starts, so it sees them).
    fn start_sweep(&mut self, max_in_flight: usize) -> Option<bool> {
        let due = self.hold_due || self.tick_due;
        if !due || self.sweeping.is_some() || self.in_flight.len() >= max_in_flight {
            return None;
        }
        self.sweep_holds = self.hold_due;
        if self.sweep_holds {
            self.defer_queued();
        }
        self.hold_due = false;
        self.tick_due = false;
        Some(self.sweep_holds)
    }

    fn ordered(&self) -> bool {
        self.ordered_until.is_some_and(|until| Instant::now() < until)
    }

    /// A holding sweep runs: fed messages wait (in the feed) until it is done.
    fn held(&self) -> bool {
        self.sweeping.is_some() && self.sweep_holds
    }

    /// Whether fed messages are taken from the feed now: when they can be dropped
    /// (not leader), deferred to a sweep that is about to start (backoff, or a due
    /// holding sweep that can start) or published (fast path). Otherwise they wait in
    /// the bounded feed, which asks for a sweep when it overflows.
    fn takes_feed(&self, leader: bool, max_in_flight: usize) -> bool {
        let can_sweep = self.sweeping.is_none() && self.in_flight.len() < max_in_flight;
        !leader || self.resume_at.is_some() || (!self.held() && (!self.hold_due || can_sweep))
    }

    /// Whether an exact count of the outbox starts now (at most one at a time, at most
    /// once per [`COUNT_EVERY`]); if so, it is marked as running.
    fn count_due(&mut self, now: Instant) -> bool {
        if now < self.next_count || self.counting.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.next_count = now + COUNT_EVERY;
        true
    }

    /// Fed messages go to the next sweep instead of the fast path.
    fn defer_queued(&mut self) {
        for message in self.queued.drain(..) {
            self.deferred.insert(relay_key(&message));
        }
    }
}

impl Relay {
    pub fn new(
        store: Store,
        producer: Producer,
        brokers: String,
        settings: CaptureSettings,
        feed: (Arc<RelayFeed>, mpsc::Receiver<ChatMessage>),
        lease: LeaseHandle,
    ) -> Self {
        Self { store, producer, brokers, settings, feed: feed.0, rx: feed.1, lease }
    }

    /// The relay's retry policy: the fleet's, from 100 ms doubling to
    /// `RELAY_MAX_BACKOFF`, without a count limit (the relay never gives up).
    fn backoff(&self) -> Backoff {
        RetrySettings::doubling(FIRST_BACKOFF, self.settings.max_backoff, 0).unbounded()
    }

    /// Creates the topic if needed, retrying (with backoff) until the broker answers.
    async fn ensure_topic(&self, shutdown: &Shutdown) -> bool {
        let topics = [(self.settings.topic.as_str(), self.settings.partitions)];
        let ensure = (|| kafkawrapper::ensure_topics(&self.brokers, &topics)).retry(self.backoff()).notify(|err, wait| {
            tracing::warn!(topic = %self.settings.topic, error = %err, ?wait, "cannot ensure the change topic yet")
        });
        tokio::select! {
            _ = shutdown.wait() => false,
            result = ensure => result.is_ok(),
        }
    }

    /// Runs until shutdown. Never gives up on the broker or MongoDB: it backs off.
    ///
    /// The loop never waits for MongoDB or the broker itself: scans, deliveries and
    /// marker clears are futures it polls, so a slow scan never delays the fast path
    /// (except a holding scan, which the fast path must wait for to keep order).
    pub async fn run(mut self, shutdown: Shutdown) -> Result<(), String> {
        if !self.ensure_topic(&shutdown).await {
            return Ok(());
        }
        tracing::info!(topic = %self.settings.topic, "outbox relay running");

        let batch = self.settings.batch_size as usize;
        let max_in_flight = batch.saturating_mul(4).max(1);
        let mut pipe = Pipeline::new();
        let mut backoff = self.backoff();
        let mut next_poll = Instant::now() + self.settings.poll_interval;
        let mut was_leader = false;
        let mut stop = std::pin::pin!(shutdown.wait());

        loop {
            let leader = self.lease.is_leader();
            if leader && !was_leader {
                // Whatever the previous leader left is older than anything fed now.
                pipe.hold_due = true;
            }
            was_leader = leader;
            if pipe.takes_feed(leader, max_in_flight) {
                while let Ok(message) = self.rx.try_recv() {
                    pipe.queued.push_back(message);
                }
            }

            match pipe.mode(leader) {
                Mode::Follower => {
                    // The leader (maybe this replica, later) finds these in its sweeps.
                    pipe.queued.clear();
                    pipe.deferred.clear();
                }
                // Backing off: the sweep after the backoff publishes them, in order.
                Mode::BackingOff => pipe.defer_queued(),
                Mode::Holding => {}
                Mode::Flowing => self.flow(&mut pipe, batch, max_in_flight),
            }
            let clear_at =
                pipe.acked_since.map(|since| if pipe.acked.len() >= batch { since } else { since + CLEAR_DELAY });
            if pipe.clearing.is_none() && pipe.resume_at.is_none() && clear_at.is_some_and(|at| at <= Instant::now()) {
                pipe.acked_since = None;
                let ids = std::mem::take(&mut pipe.acked);
                let store = self.store.clone();
                pipe.clearing = Some(Box::pin(async move {
                    let result = store.clear_pending(&ids).await;
                    (ids, result)
                }));
            }
            let clear_timer = clear_at.filter(|_| pipe.clearing.is_none() && pipe.resume_at.is_none());
            let take_feed = pipe.takes_feed(leader, max_in_flight);

            tokio::select! {
                _ = &mut stop => break,
                Some((id, result)) = pipe.deliveries.next(), if !pipe.deliveries.is_empty() => {
                    match result {
                        Ok(()) => {
                            metrics::counter!("relay_published_total").increment(1);
                            pipe.acked.push(id);
                            pipe.acked_since.get_or_insert_with(Instant::now);
                        }
                        Err(err) => {
                            metrics::counter!("relay_publish_failures_total").increment(1);
                            // Not acknowledged: the marker stays and a sweep retries
                            // it (with everything newer, in order) after the backoff.
                            pipe.in_flight.remove(&id);
                            if pipe.resume_at.is_none() {
                                let wait = backoff.next().unwrap_or(self.settings.max_backoff);
                                tracing::warn!(message_id = %id, error = %err, ?wait, "publish failed; backing off");
                                pipe.resume_at = Some(Instant::now() + wait);
                            }
                        }
                    }
                }
                scan = next_of(&mut pipe.sweeping), if pipe.sweeping.is_some() => {
                    pipe.sweeping = None;
                    match scan {
                        Ok(found) => {
                            if self.take_found(&mut pipe, found) {
                                // A full batch: more may be waiting, older than the feed.
                                pipe.hold_due = true;
                            }
                        }
                        Err(err) => {
                            let wait = backoff.next().unwrap_or(self.settings.max_backoff);
                            tracing::warn!(error = %err, ?wait, "outbox scan failed");
                            pipe.resume_at = Some(Instant::now() + wait);
                        }
                    }
                }
                (ids, result) = next_of(&mut pipe.clearing), if pipe.clearing.is_some() => {
                    pipe.clearing = None;
                    match result {
                        Ok(_) => {
                            backoff = self.backoff();
                            for id in &ids {
                                pipe.in_flight.remove(id);
                            }
                            if pipe.sweeping.is_some() {
                                pipe.cleared_during_scan.extend(ids);
                            }
                        }
                        Err(err) => {
                            // Still published: keep them in flight (not republished)
                            // and clear them again after the backoff.
                            let wait = backoff.next().unwrap_or(self.settings.max_backoff);
                            tracing::warn!(error = %err, count = ids.len(), ?wait, "clearing outbox markers failed");
                            pipe.acked.extend(ids);
                            pipe.acked_since.get_or_insert_with(Instant::now);
                            pipe.resume_at = Some(Instant::now() + wait);
                        }
                    }
                }
                Some(message) = self.rx.recv(), if take_feed => pipe.queued.push_back(message),
                _ = self.feed.overflow.notified() => pipe.hold_due = true,
                // Gaining leadership is noticed at the top of the loop.
                _ = self.lease.changed() => {}
                _ = tokio::time::sleep_until(next_poll.into()) => {
                    next_poll = Instant::now() + self.settings.poll_interval;
                    metrics::gauge!("relay_ordered_mode").set(if pipe.ordered() { 1.0 } else { 0.0 });
                    pipe.tick_due = true;
                }
                _ = sleep_until_opt(pipe.resume_at), if pipe.resume_at.is_some() => {
                    pipe.resume_at = None;
                    pipe.hold_due = true;
                }
                _ = sleep_until_opt(clear_timer), if clear_timer.is_some() => {}
            }
        }

        self.drain(&mut pipe).await;
        Ok(())
    }

    /// The fast path and the sweeps of [`Mode::Flowing`]: fed messages are published
    /// in commit order unless older ones may be pending (ordered mode, a full
    /// pipeline), in which case a holding sweep is due; a due sweep starts.
    fn flow(&self, pipe: &mut Pipeline, batch: usize, max_in_flight: usize) {
        if pipe.ordered() && !pipe.queued.is_empty() {
            pipe.hold_due = true;
        }
        if !pipe.hold_due {
            // Fast path: this replica's own inserts, in commit order.
            while let Some(message) = pipe.queued.pop_front() {
                if pipe.in_flight.len() >= max_in_flight {
                    pipe.queued.push_front(message);
                    pipe.hold_due = true;
                    break;
                }
                let id = relay_key(&message);
                if pipe.in_flight.insert(id.clone()) {
                    pipe.deliveries.push(self.publish(id, message));
                }
            }
        }
        if pipe.start_sweep(max_in_flight).is_some() {
            pipe.sweep_limit = batch + pipe.in_flight.len() + pipe.poisoned.len();
            let store = self.store.clone();
            let limit = u32::try_from(pipe.sweep_limit).unwrap_or(u32::MAX);
            pipe.sweeping = Some(Box::pin(async move { store.pending(limit).await }));
        }
    }

    /// Publishes what a scan found that is not in flight yet, oldest first, and
    /// updates the outbox gauges. Returns whether the scan was full (more may be
    /// pending).
    fn take_found(&self, pipe: &mut Pipeline, found: Vec<Result<ChatMessage, StoreError>>) -> bool {
        let batch = self.settings.batch_size as usize;
        let limit = pipe.sweep_limit;
        let count = found.len();
        let deferred = std::mem::take(&mut pipe.deferred);
        // Published and cleared after the scan read them: not pending any more.
        let cleared = std::mem::take(&mut pipe.cleared_during_scan);

        let now = chrono::Utc::now();
        let oldest = found.iter().filter_map(|m| m.as_ref().ok()).map(|m| m.created_at).min();
        let lag = oldest.map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
        metrics::gauge!("relay_lag_seconds").set(lag);
        if count < limit {
            metrics::gauge!("relay_pending").set(count as f64);
        } else if pipe.count_due(Instant::now()) {
            // A backlog larger than a scan: counted exactly now and then, in the
            // background (see COUNT_EVERY); the gauge keeps its last value meanwhile.
            let store = self.store.clone();
            let counting = pipe.counting.clone();
            tokio::spawn(async move {
                if let Ok(count) = store.count_pending().await {
                    metrics::gauge!("relay_pending").set(count as f64);
                }
                counting.store(false, Ordering::Release);
            });
        }

        let foreign_before = now - chrono::Duration::from_std(FOREIGN_AGE).unwrap_or_default();
        let mut published = 0;
        let mut foreign = 0;
        for item in found {
            let message = match item {
                Ok(message) => message,
                Err(StoreError::Corrupt { id, reason }) => {
                    if pipe.poisoned.insert(id.clone()) {
                        tracing::error!(%id, %reason, "pending document is not a valid message; skipping it");
                    }
                    continue;
                }
                Err(other) => {
                    tracing::warn!(error = %other, "unexpected scan item");
                    continue;
                }
            };
            let id = relay_key(&message);
            if pipe.in_flight.contains(&id) || cleared.contains(&id) {
                continue;
            }
            if published == batch || !self.lease.is_leader() {
                return true;
            }
            if !deferred.contains(&id) && message.created_at < foreign_before && !self.feed.offered(&id) {
                foreign += 1;
            }
            pipe.in_flight.insert(id.clone());
            pipe.deliveries.push(self.publish(id, message));
            published += 1;
        }
        if foreign > 0 {
            if !pipe.ordered() {
                tracing::info!(foreign, "found messages written by another replica; publishing in ordered mode");
            }
            pipe.ordered_until = Some(Instant::now() + ORDERED_HOLD);
            metrics::gauge!("relay_ordered_mode").set(1.0);
        }
        tracing::debug!(found = count, published, "outbox sweep");
        count >= limit
    }

    /// One delivery: resolves once the broker acknowledged (or refused) it. The
    /// producer enqueues on the first poll, and `FuturesUnordered` first-polls in
    /// push order, so messages reach the producer in the order they were pushed.
    fn publish(&self, id: String, message: ChatMessage) -> BoxFuture<'static, Delivery> {
        let producer = self.producer.clone();
        let topic = self.settings.topic.clone();
        // The change happened when the document was inserted, which is when
        // created_at was taken (Debezium reports the oplog time of the insert).
        let source_ts_ms = message.created_at.timestamp_millis();
        // A marked document that changed after it was sent is published as a change.
        let op = if message.state.version > 0 { ChangeOp::Update } else { ChangeOp::Create };
        // The publish continues the POST's trace (stored with the message) and hands
        // it on in the record's `traceparent` header.
        let span = tracing::info_span!(
            target: servicekit::trace::TARGET,
            "relay publish",
            message_id = %message.message_id,
            trace_id = tracing::field::Empty,
        );
        servicekit::trace::adopt(&span, message.state.trace.as_deref());
        let traceparent = span.in_scope(servicekit::trace::traceparent);
        let event = ChangeEvent::new(op, message, source_ts_ms);
        let key = event.key();
        let payload = event.to_flattened().to_string();
        Box::pin(
            async move {
                let started = Instant::now();
                let headers: Vec<(&str, &[u8])> =
                    traceparent.iter().map(|t| (servicekit::trace::TRACEPARENT, t.as_bytes())).collect();
                let result = producer.send(&topic, key.as_bytes(), payload.as_bytes(), &headers).await.map(|_| ());
                metrics::histogram!("relay_publish_duration_seconds").record(started.elapsed().as_secs_f64());
                tracing::debug!(ok = result.is_ok(), "published");
                (id, result)
            }
            .instrument(span),
        )
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

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanning() -> Option<BoxFuture<'static, Scan>> {
        Some(Box::pin(async { Ok(Vec::new()) }))
    }

    #[test]
    fn offered_messages_are_remembered_for_a_span_or_two() {
        let start = Instant::now();
        let mut offered = Offered::default();
        offered.insert("a", start);
        assert!(offered.contains("a") && !offered.contains("b"));
        offered.insert("b", start + OFFERED_SPAN);
        assert!(offered.contains("a"), "still remembered one span later");
        offered.insert("c", start + OFFERED_SPAN * 2);
        assert!(!offered.contains("a") && offered.contains("b") && offered.contains("c"), "forgotten after two");
        let (tx, _rx) = RelayFeed::new(1);
        let first = message();
        let second = message();
        tx.offer(first.clone());
        tx.offer(second.clone());
        assert!(tx.offered(&relay_key(&first)) && tx.offered(&relay_key(&second)), "an overflowing offer counts too");
        assert!(!tx.offered(&relay_key(&message())));
    }

    #[test]
    fn the_mode_follows_leadership_backoff_and_holding_sweeps() {
        let mut pipe = Pipeline::new();
        assert_eq!(pipe.mode(false), Mode::Follower);
        assert_eq!(pipe.mode(true), Mode::Flowing);
        pipe.sweeping = scanning();
        pipe.sweep_holds = false;
        assert_eq!(pipe.mode(true), Mode::Flowing, "a routine sweep runs beside the fast path");
        pipe.sweep_holds = true;
        assert_eq!(pipe.mode(true), Mode::Holding);
        pipe.resume_at = Some(Instant::now());
        assert_eq!(pipe.mode(true), Mode::BackingOff, "a failure wins over a running sweep");
        assert_eq!(pipe.mode(false), Mode::Follower, "and losing the lease over everything");
    }

    #[test]
    fn a_new_leader_starts_with_a_holding_sweep_that_takes_the_fed_messages() {
        let mut pipe = Pipeline::new();
        pipe.queued.push_back(message());
        assert_eq!(pipe.start_sweep(10), Some(true), "holding: a previous leader may have left some");
        assert!(pipe.queued.is_empty() && pipe.deferred.len() == 1, "fed messages go to the sweep");
        assert!(!pipe.hold_due && !pipe.tick_due);
        pipe.sweeping = scanning();
        pipe.tick_due = true;
        assert_eq!(pipe.start_sweep(10), None, "one sweep at a time");
        pipe.sweeping = None;
        assert_eq!(pipe.start_sweep(10), Some(false), "a routine sweep does not hold the fast path");
        assert_eq!(pipe.start_sweep(10), None, "nothing due");
        pipe.hold_due = true;
        pipe.in_flight.insert("x".into());
        assert_eq!(pipe.start_sweep(1), None, "no room for what it would find");
    }

    #[test]
    fn the_feed_is_read_unless_a_holding_sweep_must_come_first() {
        let mut pipe = Pipeline::new();
        assert!(pipe.takes_feed(false, 10), "a follower drops what it is fed");
        assert!(pipe.takes_feed(true, 10), "a due sweep can start: fed messages go to it");
        pipe.sweeping = scanning();
        pipe.sweep_holds = true;
        assert!(!pipe.takes_feed(true, 10), "holding: the feed waits");
        pipe.resume_at = Some(Instant::now());
        assert!(pipe.takes_feed(true, 10), "backing off: fed messages are deferred");
        let mut pipe = Pipeline::new();
        pipe.in_flight.insert("x".into());
        assert!(!pipe.takes_feed(true, 1), "a due holding sweep that cannot start yet");
        pipe.hold_due = false;
        assert!(pipe.takes_feed(true, 1), "fast path");
    }

    #[test]
    fn the_outbox_is_counted_once_at_a_time_and_at_most_once_per_count_interval() {
        let mut pipe = Pipeline::new();
        let now = Instant::now();
        assert!(pipe.count_due(now), "the first backlog is counted");
        assert!(!pipe.count_due(now + COUNT_EVERY * 2), "not while a count runs");
        pipe.counting.store(false, Ordering::Release);
        assert!(!pipe.count_due(now + Duration::from_millis(250)), "not every poll interval");
        assert!(pipe.count_due(now + COUNT_EVERY), "again after the interval");
    }

    fn message() -> ChatMessage {
        let a = chatstream::UserId::parse("alice").expect("valid");
        let b = chatstream::UserId::parse("bob").expect("valid");
        ChatMessage {
            message_id: chatstream::MessageId::new(),
            stream_id: chatstream::StreamId::for_pair(&a, &b),
            sender_id: a,
            receiver_id: Some(b),
            recipients: Vec::new(),
            content: chatstream::MessageContent::parse("hi").expect("valid"),
            created_at: chrono::Utc::now(),
            state: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_full_feed_asks_for_a_sweep_instead_of_waiting() {
        let (feed, mut rx) = RelayFeed::new(1);
        feed.offer(message());
        feed.offer(message());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "the second one was not queued");
        // The overflow left a permit: the relay's next wait returns at once.
        let woke = tokio::time::timeout(Duration::from_millis(50), feed.overflow.notified()).await.is_ok();
        assert!(woke);
    }
}
