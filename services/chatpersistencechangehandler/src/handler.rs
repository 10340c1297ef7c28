//! A pipeline's handler: one Kafka record in, deduplicated concurrent forwards out.
//!
//! For each record on one of the pipeline's topics:
//! 1. parse it — a chat change (flattened or raw Debezium form) or, on a domain topic,
//!    a purchase, payment or shipment document; unparseable → dead-letter;
//! 2. work out the calls the pipeline's targets make for it (socket frame, chat
//!    notification for new messages, domain notification); none → done. A
//!    conversation event (membership, title, read marker; `chatstream::ChatChange`)
//!    goes once to the conversation's socket pod (`/chat/forward-event`) and to the
//!    notification socket of each user it concerns (`/notifications/conversation`;
//!    a `read` only to the reader, whose other devices clear their badges);
//! 3. claim it in the pipeline's event store under its dedup key (per event, or per
//!    conversation and recipient): already done → skip; claimed by a consumer that is
//!    still working on it (a rebalance race, or a crash whose lease has not run out) →
//!    wait for that lease, then claim again; Redis down → process anyway;
//! 4. make the calls concurrently; all must succeed for the change to count as done;
//! 5. mark it done (the offset is committed after this returns), or release the claim
//!    so the retry can take it.
//!
//! When the retries run out, each target whose last call failed gets its own action
//! (`Pipeline::action_for`): failover — for the `chat_websocket` target only — closes
//! the stream's sockets with the resync code so the clients fetch what they missed
//! from history; log-and-skip and dead-letter only log and count (the consumer writes
//! the dead letter when the pipeline has a dead-letter topic). A notification that
//! could not be delivered therefore never closes anyone's chat sockets. Which targets
//! failed is remembered per partition between the attempt and the give-up (a
//! partition hands over one record at a time, so one entry per partition suffices).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chatstream::domain::{DomainEvent, DomainKind};
use chatstream::{
    ChangeEvent, ChangeOp, ChangeRecord, ChatChange, ConversationEvent, ConversationEventKind, EventError, StreamId,
};
use eventstore::{Claim, ClaimToken, EventKey, RedisEventStore};
use futures::future::join_all;
use kafkawrapper::{Handler, HandlerError, Record, RetrySettings, Retryable};
use serde_json::{json, Value};

use crate::bot::Bots;
use crate::forward::Forwarder;
use crate::forward_batch::{Approach, ForwardBatcher};
use crate::notify_batch::{Batcher, Item};
use crate::pipeline::{domain_kind, DedupBy, OnExhausted, Pipeline, Target};

/// How often a consumer waiting on another's lease asks again.
const LEASE_POLL: Duration = Duration::from_millis(100);

/// One change, as this pipeline reads it.
#[derive(Debug)]
enum Change {
    Chat(ChangeEvent),
    /// A membership change, title change or read marker of a conversation.
    Conversation(ConversationEvent),
    Domain(DomainEvent),
    /// A domain document was deleted: nothing to notify.
    DomainDelete,
}

/// One HTTP call a target makes for a change.
struct Call {
    target: Target,
    url: String,
    /// Shared by the calls of one change that send the same body (a group message's
    /// notifications), so a batch sends it once.
    body: Arc<Value>,
    /// For a per-user notification: the user and the batch item's kind; such calls may
    /// go together in `POST /notifications/batch` (`crate::notify_batch`).
    notify: Option<(String, &'static str)>,
    /// For a message forward: its stream; such calls of concurrent records may go
    /// together in `POST /chat/forward-batch` (`crate::forward_batch`).
    stream: Option<String>,
}

impl Call {
    fn new(target: Target, url: String, body: Value) -> Self {
        Self { target, url, body: Arc::new(body), notify: None, stream: None }
    }
}

/// The base URLs of the targets.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub chat_websocket_url: String,
    pub notifications_url: String,
    pub failover_timeout: Duration,
    /// `NOTIFICATIONS_BATCH_SIZE`: per-user notifications per batch request (below 2: one
    /// request each).
    pub notifications_batch: usize,
    /// `CHAT_WEBSOCKET_FORWARD_BATCH`: message forwards per request at most (below 2:
    /// one request each).
    pub forward_batch: usize,
    /// `CHAT_WEBSOCKET_FORWARD_LINGER`: how long a batch's first forward waits for more.
    pub forward_linger: Duration,
}

/// The targets whose calls failed on the last attempt at one record.
#[derive(Debug)]
struct LastAttempt {
    offset: i64,
    failed: Vec<(Target, HandlerError)>,
    /// Which of the record's calls succeeded: a retry makes only the others.
    done: Vec<bool>,
}

pub struct PipelineHandler {
    name: String,
    store: RedisEventStore,
    forwarder: Forwarder,
    targets: Vec<Target>,
    dedup_by: DedupBy,
    /// Each target's action when its retries run out.
    actions: Vec<(Target, OnExhausted)>,
    /// The action for a record given up on before reaching any target.
    record_action: OnExhausted,
    /// Per (topic, partition): which targets failed on the last attempt at the record
    /// being handled there; read (and removed) when the record is given up on.
    last_attempts: Mutex<HashMap<(String, i32), LastAttempt>>,
    chat_websocket_url: String,
    notifications_url: String,
    failover_timeout: Duration,
    /// The `bot` target's adapter (set when `BOTS` is; `with_bots`).
    bots: Option<Bots>,
    /// Per-user notifications in batches (`None`: one request each).
    batcher: Option<Batcher>,
    /// Message forwards of concurrent records in one request (`None`: one each).
    forward_batcher: Option<ForwardBatcher>,
}

impl PipelineHandler {
    pub fn new(pipeline: &Pipeline, store: RedisEventStore, forwarder: &Forwarder, endpoints: &Endpoints) -> Self {
        let trim = |url: &str| url.trim().trim_end_matches('/').to_owned();
        let forwarder = forwarder.for_pipeline(&pipeline.name);
        let batcher =
            Batcher::new(forwarder.clone(), &trim(&endpoints.notifications_url), endpoints.notifications_batch);
        let forward_batcher = match pipeline.has(Target::ChatWebsocket) {
            true => ForwardBatcher::start(
                forwarder.clone(),
                &trim(&endpoints.chat_websocket_url),
                endpoints.forward_batch,
                endpoints.forward_linger,
            ),
            false => None,
        };
        Self {
            name: pipeline.name.clone(),
            store,
            forwarder,
            targets: pipeline.targets.clone(),
            dedup_by: pipeline.dedup_by,
            actions: pipeline.actions(),
            record_action: pipeline.record_action(),
            last_attempts: Mutex::new(HashMap::new()),
            chat_websocket_url: trim(&endpoints.chat_websocket_url),
            notifications_url: trim(&endpoints.notifications_url),
            failover_timeout: endpoints.failover_timeout,
            bots: None,
            batcher,
            forward_batcher,
        }
    }

    /// The adapter the `bot` target answers with.
    pub fn with_bots(mut self, bots: Option<Bots>) -> Self {
        self.bots = bots;
        self
    }

    fn parse(record: &Record) -> Result<Change, HandlerError> {
        let payload = record.payload.as_deref().ok_or_else(|| HandlerError::malformed("record has no value"))?;
        let map = |err: EventError| match err {
            EventError::Malformed(reason) => HandlerError::malformed(reason),
            EventError::Unroutable(reason) => HandlerError::permanent(reason),
        };
        match domain_kind(&record.topic) {
            None => match ChatChange::parse(payload).map_err(map)? {
                ChatChange::Message(event) => Ok(Change::Chat(event)),
                ChatChange::Conversation(event) => Ok(Change::Conversation(event)),
            },
            Some(kind) => Self::parse_domain(kind, payload).map_err(map),
        }
    }

    fn parse_domain(kind: DomainKind, payload: &[u8]) -> Result<Change, EventError> {
        match ChangeRecord::parse(payload) {
            Ok(record) if record.op == ChangeOp::Delete => return Ok(Change::DomainDelete),
            // A delete whose envelope carries no document at all.
            Err(EventError::Unroutable(_)) => return Ok(Change::DomainDelete),
            Err(err) => return Err(err),
            Ok(_) => {}
        }
        DomainEvent::parse(kind, payload).map(Change::Domain)
    }

    /// The calls this pipeline's targets make for `change`.
    fn calls(&self, change: &Change) -> Vec<Call> {
        let mut calls = Vec::new();
        for target in &self.targets {
            match (target, change) {
                (Target::ChatWebsocket, Change::Chat(event)) => {
                    let kind = match event.op {
                        // A deletion is stored as a tombstone (an update with deleted_at).
                        _ if event.message.state.deleted_at.is_some() => "message_deleted",
                        ChangeOp::Create => "message",
                        ChangeOp::Update => "message_updated",
                        ChangeOp::Delete => "message_deleted",
                    };
                    let stream = event.stream_id().to_string();
                    calls.push(Call {
                        stream: Some(stream.clone()),
                        ..Call::new(
                            *target,
                            format!("{}/chat/forward-to-websocket?stream_id={stream}", self.chat_websocket_url),
                            if kind == "message" {
                                json!({ "type": kind, "message": event.message })
                            } else {
                                // Each edit or deletion is its own event on the socket.
                                json!({ "type": kind, "message": event.message, "event_id": event.dedup_id() })
                            },
                        )
                    });
                }
                // Every addressee but the sender: the receiver, or each group recipient.
                (Target::ChatNotification, Change::Chat(event)) if event.op == ChangeOp::Create => {
                    let body = Arc::new(json!({ "message": event.message }));
                    for user in event.message.addressees() {
                        calls.push(Call {
                            target: *target,
                            url: format!("{}/notifications/chat?user_id={user}", self.notifications_url),
                            body: body.clone(),
                            notify: Some((user.to_string(), "chat")),
                            stream: None,
                        });
                    }
                }
                // Once per conversation: the socket pod holds all of its sockets.
                (Target::ChatWebsocket, Change::Conversation(event)) => {
                    calls.push(Call::new(
                        *target,
                        format!("{}/chat/forward-event?stream_id={}", self.chat_websocket_url, event.conversation_id),
                        serde_json::to_value(event).unwrap_or(Value::Null),
                    ));
                }
                // Each user the change concerns, so their inbox updates; a read marker
                // only concerns the reader (the other members see it on the chat socket).
                (Target::ChatNotification, Change::Conversation(event)) => {
                    let users = match event.kind {
                        ConversationEventKind::Read => vec![event.user_id.clone()],
                        // Reactions show on the chat sockets only; inboxes do not change.
                        kind if kind.is_reaction() => Vec::new(),
                        _ => event.audience(),
                    };
                    let body = Arc::new(json!({ "event": event }));
                    for user in users {
                        calls.push(Call {
                            target: *target,
                            url: format!("{}/notifications/conversation?user_id={user}", self.notifications_url),
                            body: body.clone(),
                            notify: Some((user.to_string(), "conversation")),
                            stream: None,
                        });
                    }
                }
                // A message a bot answers: the call is made by `crate::bot`, not posted.
                (Target::Bot, Change::Chat(event)) => {
                    if let Some(bot) = self.bots.as_ref().and_then(|bots| bots.trigger(event)) {
                        calls.push(Call::new(
                            *target,
                            format!("bot:{bot}"),
                            json!({ "bot": bot, "message": event.message }),
                        ));
                    }
                }
                (Target::DomainNotification, Change::Domain(event)) => {
                    let document = &event.document;
                    calls.push(Call::new(
                        *target,
                        format!(
                            "{}{}?user_id={}",
                            self.notifications_url,
                            document.kind().endpoint(),
                            document.user_id()
                        ),
                        serde_json::to_value(document).unwrap_or(Value::Null),
                    ));
                }
                _ => {}
            }
        }
        calls
    }

    /// The event-store key `change` is deduplicated under.
    fn key(&self, change: &Change) -> Option<EventKey> {
        match (change, self.dedup_by) {
            (Change::Chat(event), DedupBy::Event) => {
                Some(self.store.key(&event.dedup_id(), event.stream_id().as_str()))
            }
            (Change::Chat(event), DedupBy::Stream) => {
                let receiver = event.message.receiver_id.as_ref().map_or("group", |r| r.as_str());
                Some(self.store.key(event.stream_id().as_str(), receiver))
            }
            // Per event whatever the pipeline's dedup: a conversation window must not
            // swallow a membership change or a read marker.
            (Change::Conversation(event), _) => Some(self.store.key(&event.event_id, event.conversation_id.as_str())),
            (Change::Domain(event), _) => Some(self.store.key(&event.dedup_id(), event.document.user_id().as_str())),
            (Change::DomainDelete, _) => None,
        }
    }

    /// Claims the event, waiting out another consumer's live lease. `Ok(None)` means
    /// "already done, skip"; `Ok(Some(None))` means "process without a claim" (Redis down).
    async fn claim(&self, key: &EventKey) -> Result<Option<Option<ClaimToken>>, HandlerError> {
        let deadline = Instant::now() + self.store.settings().processing_lease + Duration::from_secs(1);
        loop {
            match self.store.claim(key).await {
                Claim::Acquired(token) => return Ok(Some(Some(token))),
                Claim::Unavailable => return Ok(Some(None)),
                Claim::AlreadyDone => return Ok(None),
                Claim::InProgress if Instant::now() < deadline => tokio::time::sleep(LEASE_POLL).await,
                Claim::InProgress => return Err(HandlerError::retryable("another consumer holds the event")),
            }
        }
    }

    /// Makes the calls concurrently, except those `done` says an earlier attempt at the
    /// same record made already; returns the targets whose call failed and, per call,
    /// whether it has succeeded now (or before). Per-user notifications of one target
    /// go in batches when there are at least two of them (`crate::notify_batch`), each
    /// user's result its own.
    async fn forward(
        &self,
        calls: &[Call],
        done: &[bool],
        approach: Option<Approach>,
    ) -> (Vec<(Target, HandlerError)>, Vec<bool>) {
        // Handed to the record's message forward (one per record), dropped once queued.
        let approach = &Mutex::new(approach);
        let already = |index: usize| done.get(index).copied().unwrap_or(false);
        let mut batched: Vec<Vec<usize>> = Vec::new();
        let mut single: Vec<usize> = Vec::new();
        for (index, call) in calls.iter().enumerate() {
            if already(index) {
                continue;
            }
            let batchable = self.batcher.is_some() && call.notify.is_some();
            match batched.iter_mut().find(|group| calls[group[0]].target == call.target) {
                Some(group) if batchable => group.push(index),
                None if batchable => batched.push(vec![index]),
                _ => single.push(index),
            }
        }
        // A lone notification gains nothing from a batch.
        for group in batched.iter_mut().filter(|group| group.len() < 2) {
            single.append(group);
        }
        batched.retain(|group| !group.is_empty());
        let singles = join_all(single.iter().map(|&index| async move {
            let call = &calls[index];
            let result = match (call.target, &self.bots, &self.forward_batcher, &call.stream) {
                (Target::Bot, Some(bots), _, _) => Self::answer(bots, &call.body).await,
                (_, _, Some(batcher), Some(stream)) => {
                    let approach = approach.lock().unwrap_or_else(PoisonError::into_inner).take();
                    batcher.forward(stream, &call.url, &call.body, approach).await
                }
                _ => self.forwarder.post(call.target.name(), &call.url, &call.body).await,
            };
            vec![(index, result)]
        }));
        let batches = join_all(batched.iter().map(|group| async move {
            let Some(batcher) = &self.batcher else { return Vec::new() };
            let items: Vec<Item> = group
                .iter()
                .map(|&index| {
                    let call = &calls[index];
                    let (user, kind) = call.notify.clone().unwrap_or_default();
                    Item { user, kind, body: call.body.clone(), single_url: call.url.clone() }
                })
                .collect();
            let target = calls[group[0]].target;
            group.iter().copied().zip(batcher.deliver(target.name(), &items).await).collect()
        }));
        let (singles, batches) = futures::join!(singles, batches);
        let mut now_done: Vec<bool> = (0..calls.len()).map(already).collect();
        let mut failed = Vec::new();
        for (index, result) in singles.into_iter().chain(batches).flatten() {
            match result {
                Ok(()) => now_done[index] = true,
                Err(err) => failed.push((calls[index].target, err)),
            }
        }
        (failed, now_done)
    }

    /// A `bot` call: the bot answers the message in its body.
    async fn answer(bots: &Bots, body: &Value) -> Result<(), HandlerError> {
        let bot = serde_json::from_value(body["bot"].clone());
        let message = serde_json::from_value(body["message"].clone());
        match (bot, message) {
            (Ok(bot), Ok(message)) => bots.answer(&bot, &message).await,
            _ => Err(HandlerError::permanent("bot: the call has no bot or message")),
        }
    }

    /// The error of an attempt: a retryable failure wins over a permanent one, so a
    /// change is only given up on at once when nothing could be retried.
    fn combined(failed: &[(Target, HandlerError)]) -> Option<HandlerError> {
        failed.iter().map(|(_, e)| e).find(|e| e.is_retryable()).or(failed.first().map(|(_, e)| e)).cloned()
    }

    fn last_attempts(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), LastAttempt>> {
        self.last_attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers which targets failed on this attempt at `record` (replacing whatever
    /// an earlier record of its partition left behind).
    #[cfg(test)]
    fn remember(&self, record: &Record, failed: Vec<(Target, HandlerError)>) {
        self.remember_attempt(record, failed, Vec::new());
    }

    /// Remembers which targets failed on this attempt at `record`, and which of its
    /// calls succeeded (a retry of the same record makes only the others).
    fn remember_attempt(&self, record: &Record, failed: Vec<(Target, HandlerError)>, done: Vec<bool>) {
        let key = (record.topic.clone(), record.partition);
        if failed.is_empty() {
            self.last_attempts().remove(&key);
        } else {
            self.last_attempts().insert(key, LastAttempt { offset: record.offset, failed, done });
        }
    }

    /// The calls an earlier attempt at this same record made successfully (forgetting
    /// whatever an earlier record of the partition left behind).
    fn done_before(&self, record: &Record) -> Vec<bool> {
        let earlier = self.last_attempts().remove(&(record.topic.clone(), record.partition));
        earlier.filter(|last| last.offset == record.offset).map(|last| last.done).unwrap_or_default()
    }

    /// The targets that failed on the last attempt at `record`. When it is not known
    /// (the attempt failed before calling anyone, e.g. another consumer held the
    /// change, or the handler panicked) every target with a call for it counts as
    /// failed with `error`: its delivery is not known to have happened.
    fn failed_targets(&self, record: &Record, error: &HandlerError) -> Vec<(Target, HandlerError)> {
        let remembered = self.last_attempts().remove(&(record.topic.clone(), record.partition));
        if let Some(last) = remembered.filter(|last| last.offset == record.offset) {
            return last.failed;
        }
        match Self::parse(record) {
            Ok(change) => self.calls(&change).into_iter().map(|call| (call.target, error.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn action_for(&self, target: Target) -> OnExhausted {
        self.actions.iter().find(|(t, _)| *t == target).map_or(self.record_action, |(_, action)| *action)
    }

    fn count_given_up(&self, target: &'static str, action: OnExhausted, error: &HandlerError) {
        metrics::counter!(
            "changes_given_up_total",
            "pipeline" => self.name.clone(),
            "target" => target,
            "action" => action.name(),
            "kind" => error.kind()
        )
        .increment(1);
    }

    fn log_given_up(&self, record: &Record, target: &'static str, action: OnExhausted, error: &HandlerError) {
        let what = match action {
            OnExhausted::DeadLetter => "giving up on this change for this target; it goes to the dead-letter topic",
            OnExhausted::LogAndSkip | OnExhausted::Failover => "giving up on this change for this target; skipping it",
        };
        tracing::warn!(
            pipeline = %self.name,
            target,
            action = action.name(),
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            error = %error,
            "{what}"
        );
    }

    /// Closes the stream's sockets with the resync code, retrying on the fleet's
    /// retry policy (100 ms doubling to 2 s) within the failover timeout (the pod
    /// may be restarting).
    async fn fail_over(&self, stream: StreamId) -> bool {
        let url = format!("{}/chat/close-stream?stream_id={stream}", self.chat_websocket_url);
        let policy = RetrySettings::doubling(Duration::from_millis(100), Duration::from_secs(2), u32::MAX);
        let body = json!({});
        let close = (|| self.forwarder.post("chat_websocket_close", &url, &body))
            .retry(&policy)
            .when(|err| matches!(err, HandlerError::Retryable(_)))
            .notify(|err, wait| tracing::debug!(reason = %err, ?wait, "close-stream failed; trying again"));
        let result = match tokio::time::timeout(self.failover_timeout, close).await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::retryable(format!("no answer within {:?}", self.failover_timeout))),
        };
        if let Err(err) = &result {
            tracing::error!(pipeline = %self.name, stream_id = %stream, error = %err, "failover could not close the stream's sockets");
        }
        result.is_ok()
    }
}

impl Handler for PipelineHandler {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        // What an earlier attempt at this record delivered is not sent again; anything
        // else an earlier attempt left behind is stale now.
        let done_before = self.done_before(record);
        let change = Self::parse(record)?;
        let calls = self.calls(&change);
        let pipeline = self.name.clone();
        let (Some(key), false) = (self.key(&change), calls.is_empty()) else {
            metrics::counter!("changes_skipped_total", "pipeline" => pipeline, "reason" => "no_target").increment(1);
            return Ok(());
        };
        // Tells a lingering forward batch that this record's forward is on its way.
        let approach = match &self.forward_batcher {
            Some(batcher) if calls.iter().any(|call| call.stream.is_some()) => Some(batcher.approach()),
            _ => None,
        };
        let Some(token) = self.claim(&key).await? else {
            metrics::counter!("changes_skipped_duplicate_total", "pipeline" => pipeline).increment(1);
            return Ok(());
        };
        let (failed, done) = self.forward(&calls, &done_before, approach).await;
        let result = Self::combined(&failed).map_or(Ok(()), Err);
        self.remember_attempt(record, failed, done);
        match result {
            Ok(()) => {
                if let Some(token) = token {
                    self.store.mark_done(&key, token).await;
                }
                let op = match &change {
                    Change::Chat(event) => event.op.code(),
                    Change::Conversation(_) => "c",
                    Change::Domain(event) => event.op.code(),
                    Change::DomainDelete => "d",
                };
                metrics::counter!("changes_forwarded_total", "pipeline" => pipeline, "op" => op).increment(1);
                Ok(())
            }
            Err(err) => {
                if let Some(token) = token {
                    self.store.release(&key, token).await;
                }
                Err(err)
            }
        }
    }

    async fn on_exhausted(&self, record: &Record, error: &HandlerError) {
        let failed = self.failed_targets(record, error);
        if failed.is_empty() {
            // Given up on before any target was involved (malformed, unroutable).
            let action = self.record_action;
            self.count_given_up("none", action, error);
            self.log_given_up(record, "none", action, error);
            return;
        }
        for (target, target_error) in &failed {
            let action = self.action_for(*target);
            self.count_given_up(target.name(), action, target_error);
            match action {
                OnExhausted::Failover => {
                    // A message or a conversation event: either way the sockets of the
                    // conversation may have missed it, so they resync.
                    let (stream, what) = match Self::parse(record) {
                        Ok(Change::Chat(event)) => (event.stream_id(), event.message_id().to_string()),
                        Ok(Change::Conversation(event)) => (event.conversation_id, event.event_id.clone()),
                        _ => continue,
                    };
                    tracing::error!(
                        pipeline = %self.name,
                        target = target.name(),
                        event = %what,
                        stream_id = %stream,
                        error = %target_error,
                        "giving up on real-time delivery; closing the stream's sockets so clients resync from history"
                    );
                    let closed = self.fail_over(stream).await;
                    let outcome = if closed { "closed" } else { "failed" };
                    metrics::counter!("failovers_total", "pipeline" => self.name.clone(), "outcome" => outcome)
                        .increment(1);
                }
                OnExhausted::LogAndSkip | OnExhausted::DeadLetter => {
                    self.log_given_up(record, target.name(), action, target_error)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{resolve, PipelineSettings, RetryOverride, StoreOverride};
    use crate::settings::Settings;

    fn handler(targets: &[Target], dedup_by: DedupBy, topic: &str) -> PipelineHandler {
        let mut settings = Settings::default();
        settings.forward.notifications_url = "http://notify:9/".to_owned();
        settings.pipelines = vec![PipelineSettings {
            name: "t".into(),
            topics: vec![topic.into()],
            group_id: "g".into(),
            dead_letter_topic: None,
            targets: targets.to_vec(),
            event_store: StoreOverride { key_prefix: Some("p".into()), ..StoreOverride::default() },
            dedup_by,
            retry: RetryOverride::default(),
            on_exhausted: OnExhausted::LogAndSkip,
            on_exhausted_per_target: Default::default(),
        }];
        handler_for(&settings)
    }

    /// The first pipeline of `settings`, with test endpoints and token.
    fn handler_for(settings: &Settings) -> PipelineHandler {
        let pipeline = resolve(settings).expect("valid").remove(0);
        let store = RedisEventStore::new(pipeline.store.clone()).expect("store");
        let token = crate::forward::ServiceToken::parse("0123456789abcdef0123456789abcdef").expect("token");
        let forwarder = Forwarder::new(Duration::from_secs(1), token).expect("client");
        let endpoints = Endpoints {
            chat_websocket_url: "http://ws:8".into(),
            notifications_url: settings.forward.notifications_url.clone(),
            failover_timeout: Duration::from_secs(1),
            notifications_batch: 500,
            forward_batch: 0,
            forward_linger: Duration::ZERO,
        };
        PipelineHandler::new(&pipeline, store, &forwarder, &endpoints)
    }

    fn record(topic: &str, value: Value) -> Record {
        Record {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(value.to_string().into_bytes()),
            headers: Vec::new(),
            timestamp: None,
        }
    }

    fn chat(op: &str) -> Value {
        let stream = chatstream::StreamId::for_pair(
            &chatstream::UserId::parse("alice").expect("valid"),
            &chatstream::UserId::parse("bob").expect("valid"),
        );
        json!({"_id": "m-1", "message_id": "0195c1a4-0000-7000-8000-000000000001", "stream_id": stream.to_string(),
            "sender_id": "alice", "receiver_id": "bob", "content": "hi", "created_at": 1_760_000_000_000_i64,
            "__op": op, "__source_ts_ms": 5, "__deleted": "false"})
    }

    #[tokio::test]
    async fn chat_targets_make_their_calls() {
        let h = handler(&[Target::ChatWebsocket, Target::ChatNotification], DedupBy::Event, "chat.changes");
        let Ok(change) = PipelineHandler::parse(&record("chat.changes", chat("c"))) else { panic!("parses") };
        let calls = h.calls(&change);
        assert_eq!(calls.len(), 2);
        assert!(calls[0].url.starts_with("http://ws:8/chat/forward-to-websocket?stream_id="), "{}", calls[0].url);
        assert_eq!(calls[0].body["type"], "message");
        assert_eq!(calls[1].url, "http://notify:9/notifications/chat?user_id=bob");
        assert_eq!(calls[1].body["message"]["sender_id"], "alice");

        let Ok(edit) = PipelineHandler::parse(&record("chat.changes", chat("u"))) else { panic!("parses") };
        let calls = h.calls(&edit);
        assert_eq!(calls.len(), 1, "an edit is not notified");
        assert_eq!(calls[0].body["type"], "message_updated");
    }

    fn conversation_event(kind: &str, group: &chatstream::StreamId) -> Value {
        let mut event = json!({"_id": "0195c1a4-0000-7000-8000-0000000000e1", "type": kind,
            "conversation_id": group.to_string(), "user_id": "carol", "actor_id": "alice",
            "members": ["alice", "bob"], "at": 1_760_000_000_000_i64,
            "__op": "c", "__source_ts_ms": 5, "__deleted": "false"});
        if kind == "member_left" {
            event["reason"] = json!("removed");
        }
        if kind == "read" {
            event["members"] = json!(["alice", "bob", "carol"]);
            event["up_to"] = json!("0195c1a4-0000-7000-8000-000000000001");
        }
        event
    }

    #[tokio::test]
    async fn a_conversation_event_goes_once_to_the_socket_pod_and_to_each_user_it_concerns() {
        let h = handler(&[Target::ChatWebsocket, Target::ChatNotification], DedupBy::Event, "chat.changes");
        let group = chatstream::StreamId::new_group();
        let rec = record("chat.changes", conversation_event("member_left", &group));
        let Ok(change) = PipelineHandler::parse(&rec) else { panic!("parses") };
        let calls = h.calls(&change);
        let urls: Vec<&str> = calls.iter().map(|c| c.url.as_str()).collect();
        let forward = format!("http://ws:8/chat/forward-event?stream_id={group}");
        assert_eq!(
            urls,
            [
                forward.as_str(),
                "http://notify:9/notifications/conversation?user_id=alice",
                "http://notify:9/notifications/conversation?user_id=bob",
                "http://notify:9/notifications/conversation?user_id=carol",
            ],
            "the socket pod once; every member and the one who left"
        );
        assert_eq!(calls[0].body["type"], "member_left");
        assert_eq!(calls[0].body["event_id"], "0195c1a4-0000-7000-8000-0000000000e1");
        assert_eq!(calls[0].body["reason"], "removed");
        assert!(calls[0].body.get("__op").is_none(), "the event as chatstream serializes it");
        assert_eq!(calls[1].body["event"]["user_id"], "carol");
        assert_eq!(
            h.key(&change).expect("key").as_str(),
            format!("eventstore:p:0195c1a4-0000-7000-8000-0000000000e1:{group}")
        );
        // Per event even where the pipeline deduplicates per conversation.
        let by_stream = handler(&[Target::ChatNotification], DedupBy::Stream, "chat.changes");
        assert_eq!(by_stream.key(&change), h.key(&change));

        // A read marker: the socket pod (the other members and the reader's devices),
        // and only the reader's notification sockets.
        let Ok(read) = PipelineHandler::parse(&record("chat.changes", conversation_event("read", &group))) else {
            panic!("parses")
        };
        let calls = h.calls(&read);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].url, forward);
        assert_eq!(calls[0].body["up_to"], "0195c1a4-0000-7000-8000-000000000001");
        assert_eq!(calls[1].url, "http://notify:9/notifications/conversation?user_id=carol");

        // Failover covers conversation events too; a failed notification does not.
        let mut rec = rec;
        rec.offset = 3;
        let unknown = h.failed_targets(&rec, &failure("held"));
        assert_eq!(unknown.iter().filter(|(t, _)| *t == Target::ChatWebsocket).count(), 1);
        assert_eq!(unknown.iter().filter(|(t, _)| *t == Target::ChatNotification).count(), 3);
    }

    /// A new message from alice to a group of bob, carol and dave.
    fn group_message(group: &chatstream::StreamId) -> Change {
        let value = json!({"_id": "m-1", "message_id": "0195c1a4-0000-7000-8000-000000000002",
            "stream_id": group.to_string(), "sender_id": "alice", "recipients": ["bob", "carol", "dave"],
            "content": "hi all", "created_at": 1_760_000_000_000_i64, "__op": "c", "__source_ts_ms": 5,
            "__deleted": "false"});
        let Ok(change) = PipelineHandler::parse(&record("chat.changes", value)) else { panic!("parses") };
        change
    }

    #[tokio::test]
    async fn a_group_message_is_forwarded_once_and_notified_per_recipient() {
        let h = handler(&[Target::ChatWebsocket, Target::ChatNotification], DedupBy::Event, "chat.changes");
        let group = chatstream::StreamId::new_group();
        let calls = h.calls(&group_message(&group));
        let forwards: Vec<&Call> = calls.iter().filter(|c| c.target == Target::ChatWebsocket).collect();
        assert_eq!(forwards.len(), 1, "one forward per conversation, not per member");
        assert_eq!(forwards[0].url, format!("http://ws:8/chat/forward-to-websocket?stream_id={group}"));
        let notified: Vec<&str> = calls
            .iter()
            .filter(|c| c.target == Target::ChatNotification)
            .map(|c| c.url.rsplit('=').next().unwrap_or_default())
            .collect();
        assert_eq!(notified, ["bob", "carol", "dave"]);
    }

    #[tokio::test]
    async fn a_retry_makes_only_the_calls_that_failed_before() {
        let h = handler(&[Target::ChatWebsocket, Target::ChatNotification], DedupBy::Event, "chat.changes");
        let calls = h.calls(&group_message(&chatstream::StreamId::new_group()));
        assert_eq!(calls.len(), 4);
        assert!(calls[1..].iter().all(|c| Arc::ptr_eq(&c.body, &calls[1].body)), "one body for every member");
        // Everything but carol's notification went through before: only hers is made
        // (and fails: nothing listens at the test addresses).
        let (failed, done) = h.forward(&calls, &[true, true, false, true], None).await;
        assert_eq!(failed.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![Target::ChatNotification]);
        assert_eq!(done, vec![true, true, false, true]);
        // Nothing left to make: nothing fails.
        let (failed, done) = h.forward(&calls, &[true; 4], None).await;
        assert!(failed.is_empty());
        assert_eq!(done, vec![true; 4]);
    }

    fn failure(reason: &str) -> HandlerError {
        HandlerError::retryable(reason)
    }

    #[tokio::test]
    async fn each_failed_target_gets_its_own_action() {
        let mut settings = Settings::default();
        settings.forward.notifications_url = "http://notify:9".to_owned();
        let h = handler_for(&settings);
        assert_eq!(h.action_for(Target::ChatWebsocket), OnExhausted::Failover);
        assert_eq!(h.action_for(Target::ChatNotification), OnExhausted::DeadLetter);

        // The targets that failed on the last attempt are the ones given up on.
        let mut rec = record("chat.changes", chat("c"));
        rec.offset = 7;
        h.remember(&rec, vec![(Target::ChatNotification, failure("500"))]);
        let failed = h.failed_targets(&rec, &failure("500"));
        assert_eq!(failed.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![Target::ChatNotification]);
        // Read once: a second give-up of the same record (redelivery) does not reuse it.
        let unknown = h.failed_targets(&rec, &failure("another consumer holds the event"));
        assert_eq!(
            unknown.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![Target::ChatWebsocket, Target::ChatNotification],
            "unknown → every target with a call counts as failed"
        );

        // What an earlier record of the partition left behind does not apply to a later one.
        h.remember(&rec, vec![(Target::ChatNotification, failure("500"))]);
        let mut edit = record("chat.changes", chat("u"));
        edit.offset = 8;
        let failed = h.failed_targets(&edit, &failure("timeout"));
        assert_eq!(failed.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![Target::ChatWebsocket]);

        // A record that never parsed reached no target.
        let mut bad = record("chat.changes", json!({"nonsense": true}));
        bad.offset = 9;
        assert!(h.failed_targets(&bad, &HandlerError::malformed("x")).is_empty());
    }

    #[test]
    fn a_retryable_failure_wins_over_a_permanent_one() {
        let failed =
            vec![(Target::ChatNotification, HandlerError::permanent("401")), (Target::ChatWebsocket, failure("500"))];
        assert!(matches!(PipelineHandler::combined(&failed), Some(HandlerError::Retryable(_))));
        assert!(PipelineHandler::combined(&[]).is_none());
    }

    #[tokio::test]
    async fn stream_dedup_keys_on_conversation_and_recipient() {
        let h = handler(&[Target::ChatNotification], DedupBy::Stream, "chat.changes");
        let Ok(change) = PipelineHandler::parse(&record("chat.changes", chat("c"))) else { panic!("parses") };
        let Change::Chat(event) = &change else { panic!("chat") };
        let key = h.key(&change).expect("key");
        assert_eq!(key.as_str(), format!("eventstore:p:{}:bob", event.stream_id()));
        let by_event = handler(&[Target::ChatNotification], DedupBy::Event, "chat.changes");
        assert_eq!(
            by_event.key(&change).expect("key").as_str(),
            format!("eventstore:p:{}:{}", event.message_id(), event.stream_id())
        );
    }

    #[tokio::test]
    async fn domain_records_become_typed_notifications_for_their_user() {
        let h = handler(&[Target::DomainNotification], DedupBy::Event, "payments.changes");
        let value = json!({"_id": "pay-1", "payment_id": "pay-1", "user_id": "carol", "status": "overdue",
            "amount_minor": 1250, "currency": "EUR", "due_date": "2026-01-31T00:00:00Z",
            "outbox_pending": true, "__op": "c", "__source_ts_ms": 42});
        let Ok(change) = PipelineHandler::parse(&record("payments.changes", value)) else { panic!("parses") };
        let calls = h.calls(&change);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].url, "http://notify:9/notifications/payment-reminder?user_id=carol");
        assert_eq!(calls[0].body["payment_id"], "pay-1");
        assert_eq!(calls[0].body["status"], "overdue");
        assert!(calls[0].body.get("outbox_pending").is_none(), "only the typed document is sent");
        assert_eq!(h.key(&change).expect("key").as_str(), "eventstore:p:pay-1.overdue.42:carol");

        let deleted = json!({"_id": "pay-1", "__op": "d", "__deleted": "true", "__source_ts_ms": 43});
        let Ok(change) = PipelineHandler::parse(&record("payments.changes", deleted)) else {
            panic!("a delete parses")
        };
        assert!(h.calls(&change).is_empty(), "a deleted document notifies no one");

        let bad = json!({"payment_id": "pay-1", "user_id": "carol", "status": "lost", "__op": "c"});
        assert!(matches!(PipelineHandler::parse(&record("payments.changes", bad)), Err(HandlerError::Malformed(_))));
    }
}
