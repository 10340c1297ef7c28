//! The consumer-group runner: at-least-once, in order per partition, concurrent across
//! partitions, with bounded in-flight work.
//!
//! Why this module exists: getting commits right is the whole game for a CDC
//! consumer. An offset may only be committed once its message is finished (handled,
//! or given up on and dead-lettered); on a rebalance the finished work must be
//! committed before the partition moves, or the next owner repeats it; a slow
//! partition must not stall the others, nor make the consumer buffer without bound.
//!
//! Design:
//! - One OS thread polls a librdkafka consumer (`BaseConsumer`). Rebalance callbacks
//!   run on that thread and may block there (wait for in-flight work, commit
//!   synchronously) without stalling the async runtime, whatever its flavour.
//! - Each assigned partition gets a worker task on the caller's tokio runtime, fed by
//!   its own queue, which handles messages one at a time in offset order (see
//!   [`crate::processing`]). Partitions are handled concurrently.
//! - Each partition may have `max_in_flight / assigned partitions` (at least 1)
//!   messages queued or in its handler. When its share is full the partition is
//!   paused (`consumer.pause`, which keeps the poll loop and heartbeats going) and
//!   resumed once it has drained to half.
//! - Finished offsets are committed every `commit_interval` (async), and
//!   synchronously when partitions are revoked and at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Statistics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::{client_config_from, forward_error, forward_log};
use crate::flow::{Fetched, FlowState, PartitionFlow};
use crate::metrics as m;
use crate::processing::{DeadLetters, Outcome, Processor};
use crate::{Error, Handler, KafkaSettings, Producer, Record, RetrySettings};

type TopicPartition = (String, i32);

/// A consumer group member that runs a [`Handler`] over the configured topics.
pub struct ConsumerGroup<H> {
    settings: KafkaSettings,
    processor: Arc<Processor<H>>,
}

impl<H> std::fmt::Debug for ConsumerGroup<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerGroup")
            .field("group_id", &self.settings.group_id)
            .field("topics", &self.settings.topics)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> ConsumerGroup<H> {
    /// Checks the settings and prepares the dead-letter producer (if a dead-letter
    /// topic is configured). Nothing connects until [`ConsumerGroup::run`].
    pub fn new(settings: KafkaSettings, retry: RetrySettings, handler: H) -> Result<Self, Error> {
        if settings.group_id.trim().is_empty() {
            return Err(Error::Config("KAFKA_GROUP_ID (group_id) must be set for a consumer".to_owned()));
        }
        if settings.topics.is_empty() {
            return Err(Error::Config("KAFKA_TOPICS (topics) must name at least one topic".to_owned()));
        }
        settings.group_membership_properties().map_err(Error::Config)?;
        let dead_letters = match settings.dead_letter_topic() {
            Some(topic) => Some(DeadLetters { topic: topic.to_owned(), producer: Producer::new(&settings)? }),
            None => None,
        };
        Ok(Self { settings, processor: Arc::new(Processor { handler: Arc::new(handler), retry, dead_letters }) })
    }

    /// Joins the group and consumes until `shutdown` is cancelled, then stops
    /// fetching, waits (up to `drain_timeout`) for the messages in handlers, commits
    /// what is finished and leaves the group. Returns an error if the consumer cannot
    /// be created or subscribed, or on a fatal client error.
    ///
    /// Must be called within a tokio runtime (handlers run on it). Dropping the
    /// returned future also stops the consumer.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let stop = shutdown.child_token();
        let _stop_on_drop = stop.clone().drop_guard();
        let settings = self.settings;
        let context = GroupContext {
            group: settings.group_id.clone(),
            processor: self.processor,
            runtime: tokio::runtime::Handle::current(),
            shutdown: stop.clone(),
            max_in_flight: settings.max_in_flight.max(1),
            drain_timeout: settings.drain_timeout,
            share: AtomicUsize::new(settings.max_in_flight.max(1)),
            partitions: Mutex::new(HashMap::new()),
        };
        // Membership first (session, heartbeat, static id), then the properties and the
        // `RDKAFKA_*` variables, which win; the commit settings below always apply.
        let mut properties: std::collections::BTreeMap<String, String> = settings
            .group_membership_properties()
            .map_err(Error::Config)?
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
        properties.extend(settings.effective_properties());
        if let Some(id) = properties.get("group.instance.id") {
            tracing::info!(group = %settings.group_id, instance = %id, "static group membership");
        }
        let config = client_config_from(
            &settings.brokers,
            &properties,
            &[
                ("group.id", settings.group_id.clone()),
                // Offsets are committed by this crate only, after messages are finished.
                ("enable.auto.commit", "false".to_owned()),
                ("enable.auto.offset.store", "false".to_owned()),
            ],
        );
        let consumer: BaseConsumer<GroupContext<H>> =
            config.create_with_context(context).map_err(|e| Error::Config(e.to_string()))?;
        let topics = settings.topics.clone();
        let commit_interval = settings.commit_interval;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("kafka-{}", settings.group_id))
            .spawn(move || {
                let result = poll_loop(consumer, &topics, &stop, commit_interval);
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::Thread(e.to_string()))?;
        done_rx.await.unwrap_or_else(|_| Err(Error::Thread("the consumer thread panicked".to_owned())))
    }
}

/// The consumer thread: poll, dispatch, resume, commit; then drain and leave.
fn poll_loop<H: Handler>(
    consumer: BaseConsumer<GroupContext<H>>,
    topics: &[String],
    stop: &CancellationToken,
    commit_interval: Duration,
) -> Result<(), Error> {
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let context = consumer.context().clone();
    tracing::info!(group = %context.group, topics = ?topics, "consumer started");
    let poll_timeout = commit_interval.clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut next_commit = Instant::now() + commit_interval;
    let mut result = Ok(());
    while !stop.is_cancelled() {
        match consumer.poll(poll_timeout) {
            None => {}
            Some(Ok(message)) => {
                record_age(&message);
                let record = Record::from_message(&message);
                drop(message);
                if let Err(err) = context.dispatch(&consumer, record) {
                    result = Err(err);
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                tracing::error!(group = %context.group, %code, "fatal consumer error");
                result = Err(Error::Kafka(KafkaError::MessageConsumptionFatal(code)));
                break;
            }
            Some(Err(err)) => {
                metrics::counter!(m::CONSUMER_ERRORS_TOTAL, "group" => context.group.clone()).increment(1);
                tracing::warn!(group = %context.group, error = %err, "consumer error");
            }
        }
        context.resume_drained(&consumer);
        if Instant::now() >= next_commit {
            context.commit_finished(&consumer);
            next_commit = Instant::now() + commit_interval;
        }
        context.report_gauges();
    }
    tracing::info!(group = %context.group, "consumer stopping: draining partitions");
    let slots = context.take_all();
    context.finish(&consumer, slots, true);
    // Dropping the consumer closes it: it leaves the group (the revocation callback
    // finds nothing left to do) so the partitions move on without a session timeout.
    drop(consumer);
    context.report_gauges();
    tracing::info!(group = %context.group, "consumer stopped");
    result
}

/// Records how long ago the record was produced (its timestamp is the producer's
/// clock; a negative age from clock skew is recorded as zero).
fn record_age(message: &rdkafka::message::BorrowedMessage<'_>) {
    use rdkafka::Message as _;
    let Some(produced_ms) = message.timestamp().to_millis() else { return };
    let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else { return };
    let age_ms = (now.as_millis() as i64).saturating_sub(produced_ms).max(0);
    metrics::histogram!(m::RECORD_AGE_SECONDS, "topic" => message.topic().to_owned()).record(age_ms as f64 / 1000.0);
}

/// One assigned partition, as the consumer thread sees it.
struct Slot {
    queue: mpsc::UnboundedSender<Record>,
    state: Arc<SlotState>,
    stop: CancellationToken,
    /// Disconnects when the worker task has ended.
    done: std::sync::mpsc::Receiver<()>,
    task: tokio::task::AbortHandle,
    /// Paused or flowing, the records held meanwhile, the offset last committed.
    flow: PartitionFlow<Record>,
    /// When the partition was assigned, until its first record arrives (then logged:
    /// how long a member that just joined takes to fetch, e.g. after a restart).
    assigned_at: Option<Instant>,
}

/// What the worker task and the consumer thread share about a partition.
struct SlotState {
    /// Messages handed to the worker and not finished.
    in_flight: AtomicUsize,
    /// The offset to commit: one past the last finished message (-1: none yet).
    finished: AtomicI64,
}

pub(crate) struct GroupContext<H> {
    group: String,
    processor: Arc<Processor<H>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    max_in_flight: usize,
    drain_timeout: Duration,
    /// Each partition's share of `max_in_flight`.
    share: AtomicUsize,
    partitions: Mutex<HashMap<TopicPartition, Slot>>,
}

impl<H: Handler> GroupContext<H> {
    fn slots(&self) -> MutexGuard<'_, HashMap<TopicPartition, Slot>> {
        self.partitions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update_share(&self, assigned: usize) {
        self.share.store((self.max_in_flight / assigned.max(1)).max(1), Ordering::Relaxed);
    }

    /// Starts a worker for each newly assigned partition.
    fn assign(&self, tpl: &TopicPartitionList) {
        let mut slots = self.slots();
        for element in tpl.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if slots.contains_key(&key) {
                continue;
            }
            let (queue, receiver) = mpsc::unbounded_channel();
            let state = Arc::new(SlotState { in_flight: AtomicUsize::new(0), finished: AtomicI64::new(-1) });
            let stop = self.shutdown.child_token();
            let (done_tx, done) = std::sync::mpsc::channel::<()>();
            let task = self
                .runtime
                .spawn(partition_worker(self.processor.clone(), receiver, state.clone(), stop.clone(), done_tx))
                .abort_handle();
            tracing::info!(group = %self.group, topic = %key.0, partition = key.1, "partition assigned");
            slots.insert(
                key,
                Slot {
                    queue,
                    state,
                    stop,
                    done,
                    task,
                    flow: PartitionFlow::default(),
                    assigned_at: Some(Instant::now()),
                },
            );
        }
        self.update_share(slots.len());
    }

    fn take(&self, tpl: &TopicPartitionList) -> Vec<(TopicPartition, Slot)> {
        let mut slots = self.slots();
        let taken = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                let key = (e.topic().to_owned(), e.partition());
                slots.remove(&key).map(|slot| (key, slot))
            })
            .collect();
        self.update_share(slots.len());
        taken
    }

    fn take_all(&self) -> Vec<(TopicPartition, Slot)> {
        self.slots().drain().collect()
    }

    /// Gives partitions up: stops their workers after the message in hand, waits for
    /// them (up to `drain_timeout`), then commits what they finished.
    fn finish(&self, consumer: &BaseConsumer<Self>, slots: Vec<(TopicPartition, Slot)>, commit: bool) {
        if slots.is_empty() {
            return;
        }
        for ((topic, partition), slot) in &slots {
            slot.stop.cancel();
            if slot.flow.state() == FlowState::Paused {
                // A partition assigned again later must not start out paused.
                if let Err(err) = consumer.resume(&single(topic, *partition)) {
                    tracing::debug!(%topic, partition, error = %err, "resume before revocation failed");
                }
            }
        }
        let deadline = Instant::now() + self.drain_timeout;
        for ((topic, partition), slot) in &slots {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = slot.done.recv_timeout(left) {
                tracing::warn!(
                    group = %self.group, %topic, partition, timeout = ?self.drain_timeout,
                    "handler did not finish in time; its message will be redelivered"
                );
                slot.task.abort();
            }
        }
        if !commit {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), slot) in &slots {
            if let Some(finished) = slot.flow.commit_due(slot.state.finished.load(Ordering::SeqCst)) {
                if let Err(err) = tpl.add_partition_offset(topic, *partition, Offset::Offset(finished)) {
                    tracing::error!(%topic, partition, error = %err, "cannot build commit");
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                tracing::info!(group = %self.group, offsets = ?describe(&tpl), "committed before giving partitions up")
            }
            Err(err) => {
                metrics::counter!(m::COMMIT_FAILURES_TOTAL, "group" => self.group.clone()).increment(1);
                tracing::error!(group = %self.group, error = %err, offsets = ?describe(&tpl), "final commit failed; those messages will be redelivered");
            }
        }
    }

    /// Hands a fetched message to its partition's worker, or holds it and pauses the
    /// partition when the partition's share is full.
    fn dispatch(&self, consumer: &BaseConsumer<Self>, record: Record) -> Result<(), Error> {
        let share = self.share.load(Ordering::Relaxed);
        let mut slots = self.slots();
        let key = (record.topic.clone(), record.partition);
        let Some(slot) = slots.get_mut(&key) else {
            tracing::debug!(topic = %key.0, partition = key.1, offset = record.offset, "message for a partition not assigned; dropped");
            return Ok(());
        };
        if let Some(assigned_at) = slot.assigned_at.take() {
            tracing::info!(
                group = %self.group, topic = %key.0, partition = key.1, offset = record.offset,
                after_ms = assigned_at.elapsed().as_millis() as u64,
                "first record since the partition was assigned"
            );
        }
        match slot.flow.fetched(record, slot.state.in_flight.load(Ordering::SeqCst), share) {
            Fetched::Send(record) => send(slot, record, &key),
            Fetched::Held { pause: false } => Ok(()),
            Fetched::Held { pause: true } => {
                match consumer.pause(&single(&key.0, key.1)) {
                    Ok(()) => {
                        slot.flow.paused();
                        tracing::debug!(topic = %key.0, partition = key.1, share, "partition paused");
                    }
                    Err(err) => {
                        tracing::warn!(topic = %key.0, partition = key.1, error = %err, "pause failed")
                    }
                }
                Ok(())
            }
        }
    }

    /// Feeds held messages to partitions that drained and resumes them.
    fn resume_drained(&self, consumer: &BaseConsumer<Self>) {
        let share = self.share.load(Ordering::Relaxed);
        let mut resumed = Vec::new();
        let mut slots = self.slots();
        for (key, slot) in slots.iter_mut() {
            let mut releasing = false;
            while let Some(record) = slot.flow.release(slot.state.in_flight.load(Ordering::SeqCst), share, releasing) {
                releasing = true;
                if let Some(record) = send_or_return(slot, record) {
                    // The worker is gone; dispatch reports it on the next message.
                    slot.flow.unrelease(record);
                    break;
                }
            }
            if slot.flow.wants_resume() {
                match consumer.resume(&single(&key.0, key.1)) {
                    Ok(()) => {
                        slot.flow.resumed();
                        tracing::debug!(topic = %key.0, partition = key.1, "partition resumed");
                        resumed.push(key.clone());
                    }
                    Err(err) => {
                        tracing::warn!(topic = %key.0, partition = key.1, error = %err, "resume failed")
                    }
                }
            }
        }
        drop(slots);
        for (topic, partition) in resumed {
            nudge_fetcher(consumer, &topic, partition);
        }
    }

    /// Sends an asynchronous commit of every partition whose finished offset moved.
    fn commit_finished(&self, consumer: &BaseConsumer<Self>) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut slots = self.slots();
            for ((topic, partition), slot) in slots.iter_mut() {
                if let Some(finished) = slot.flow.commit_due(slot.state.finished.load(Ordering::SeqCst)) {
                    if tpl.add_partition_offset(topic, *partition, Offset::Offset(finished)).is_ok() {
                        slot.flow.committed(finished);
                    }
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(err) = consumer.commit(&tpl, CommitMode::Async) {
            metrics::counter!(m::COMMIT_FAILURES_TOTAL, "group" => self.group.clone()).increment(1);
            tracing::warn!(group = %self.group, error = %err, "commit failed; will retry");
            self.forget_commits(&tpl);
        }
    }

    /// Marks offsets as not committed so the next commit sends them again.
    fn forget_commits(&self, tpl: &TopicPartitionList) {
        let mut slots = self.slots();
        for element in tpl.elements() {
            if let (Some(slot), Offset::Offset(offset)) =
                (slots.get_mut(&(element.topic().to_owned(), element.partition())), element.offset())
            {
                slot.flow.commit_failed(offset);
            }
        }
    }

    fn report_gauges(&self) {
        let slots = self.slots();
        let in_flight: usize = slots.values().map(|s| s.state.in_flight.load(Ordering::Relaxed) + s.flow.held()).sum();
        let paused = slots.values().filter(|s| s.flow.state() == FlowState::Paused).count();
        metrics::gauge!(m::IN_FLIGHT, "group" => self.group.clone()).set(in_flight as f64);
        metrics::gauge!(m::PAUSED_PARTITIONS, "group" => self.group.clone()).set(paused as f64);
        metrics::gauge!(m::ASSIGNED_PARTITIONS, "group" => self.group.clone()).set(slots.len() as f64);
    }
}

/// Hands a released record to the worker; gives it back if the worker is gone.
fn send_or_return(slot: &mut Slot, record: Record) -> Option<Record> {
    slot.state.in_flight.fetch_add(1, Ordering::SeqCst);
    let returned = slot.queue.send(record).err().map(|returned| returned.0);
    if returned.is_some() {
        slot.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    returned
}

fn send(slot: &mut Slot, record: Record, key: &TopicPartition) -> Result<(), Error> {
    slot.state.in_flight.fetch_add(1, Ordering::SeqCst);
    if slot.queue.send(record).is_err() {
        slot.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if slot.stop.is_cancelled() {
            return Ok(());
        }
        return Err(Error::Thread(format!("the worker of {} [{}] ended unexpectedly", key.0, key.1)));
    }
    Ok(())
}

/// Makes librdkafka fetch a resumed partition now rather than in up to a second.
///
/// librdkafka's broker thread does not wake up when a partition is resumed: if all
/// its partitions were paused it sleeps up to its fixed 1 s maximum before it
/// fetches again, which throttles a saturated consumer to about one share per
/// second. Any request to the partition's leader wakes that thread, so ask it for
/// the watermarks (one round trip; the answer itself is not needed).
fn nudge_fetcher<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) {
    if let Err(err) = consumer.fetch_watermarks(topic, partition, Duration::from_millis(100)) {
        tracing::debug!(%topic, partition, error = %err, "watermark request after resume failed");
    }
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

fn describe(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements().iter().map(|e| format!("{}[{}]@{:?}", e.topic(), e.partition(), e.offset())).collect()
}

/// Handles one partition's messages in order until the partition is given up.
async fn partition_worker<H: Handler>(
    processor: Arc<Processor<H>>,
    mut queue: mpsc::UnboundedReceiver<Record>,
    state: Arc<SlotState>,
    stop: CancellationToken,
    _done: std::sync::mpsc::Sender<()>,
) {
    loop {
        let record = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            next = queue.recv() => match next {
                Some(record) => record,
                None => break,
            },
        };
        if processor.process(&record, &stop).await == Outcome::Abandoned {
            // Nothing after an unfinished message may be committed: stop here.
            break;
        }
        state.finished.store(record.offset + 1, Ordering::SeqCst);
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<H: Handler> ClientContext for GroupContext<H> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn stats(&self, statistics: Statistics) {
        let slots = self.slots();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || p.consumer_lag < 0 || !slots.contains_key(&(topic.clone(), *partition)) {
                    continue;
                }
                metrics::gauge!(
                    m::CONSUMER_LAG,
                    "group" => self.group.clone(), "topic" => topic.clone(), "partition" => partition.to_string()
                )
                .set(p.consumer_lag as f64);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

impl<H: Handler> ConsumerContext for GroupContext<H> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!(m::REBALANCES_TOTAL, "group" => self.group.clone(), "kind" => "assign").increment(1);
                self.assign(tpl);
            }
            Rebalance::Revoke(tpl) => {
                metrics::counter!(m::REBALANCES_TOTAL, "group" => self.group.clone(), "kind" => "revoke").increment(1);
                let slots = self.take(tpl);
                for ((topic, partition), _) in &slots {
                    tracing::info!(group = %self.group, %topic, partition, "partition revoked");
                    // This pod no longer consumes it: its lag is the new owner's to
                    // report. Left alone, the gauge would keep its last value forever.
                    metrics::gauge!(
                        m::CONSUMER_LAG,
                        "group" => self.group.clone(), "topic" => topic.clone(), "partition" => partition.to_string()
                    )
                    .set(0.0);
                }
                // After a lost assignment (session timeout) the group has moved on and a
                // commit would be refused; the next owner redoes the unfinished work.
                let lost = consumer.assignment_lost();
                self.finish(consumer, slots, !lost);
            }
            Rebalance::Error(err) => {
                tracing::warn!(group = %self.group, error = %err, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(err) = result {
            metrics::counter!(m::COMMIT_FAILURES_TOTAL, "group" => self.group.clone()).increment(1);
            tracing::warn!(group = %self.group, error = %err, offsets = ?describe(offsets), "commit failed; will retry");
            self.forget_commits(offsets);
        }
    }
}
