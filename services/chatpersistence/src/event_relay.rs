//! Capture of conversation events (`CAPTURE_MODE=outbox`): publishes every
//! `conversation_events` document marked `outbox_pending` to the chat change topic,
//! keyed by its conversation id, then clears the marker.
//!
//! Why this module exists: membership changes and read markers must reach the
//! sockets the way messages do, through Kafka, with the same at-least-once
//! guarantee (a crash between publish and clear publishes the event again; the
//! consumers deduplicate by `event_id`). It shares the chat topic and key with the
//! messages so a conversation's changes share a partition. Where Debezium is
//! deployed, its chat connector captures the collection instead and this is off.
//!
//! It runs under its own lease and polls every `RELAY_POLL_INTERVAL`; the API wakes
//! it as soon as it writes an event, so an event usually leaves within milliseconds.

use std::sync::Arc;
use std::time::Duration;

use chatstream::ChatChange;
use futures::TryStreamExt;
use kafkawrapper::Producer;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{Map, Value};
use servicekit::Shutdown;
use tokio::sync::Notify;

use crate::conversations::Conversations;
use crate::lease::LeaseHandle;
use crate::store::Store;

/// The longest wait between capture rounds while they fail.
pub(crate) const FAILURE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The waits after consecutive failed capture rounds: from the poll interval,
/// doubling (jittered) to [`FAILURE_MAX_BACKOFF`], never giving up.
pub(crate) fn failure_backoff(poll: Duration) -> kafkawrapper::Backoff {
    kafkawrapper::RetrySettings::doubling(poll.max(Duration::from_millis(50)), FAILURE_MAX_BACKOFF, 0).unbounded()
}

pub struct EventRelay {
    store: Store,
    conversations: Conversations,
    producer: Producer,
    topic: String,
    lease: LeaseHandle,
    poll: Duration,
    batch: i64,
    wake: Arc<Notify>,
}

impl EventRelay {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        conversations: Conversations,
        producer: Producer,
        topic: String,
        lease: LeaseHandle,
        poll: Duration,
        batch: u32,
    ) -> Self {
        let wake = conversations.wake();
        Self { store, conversations, producer, topic, lease, poll, batch: i64::from(batch.max(1)), wake }
    }

    pub async fn run(self, shutdown: Shutdown) -> Result<(), String> {
        let mut failures = failure_backoff(self.poll);
        while !shutdown.is_triggered() {
            let mut wait = None;
            if self.lease.is_leader() {
                match self.cycle().await {
                    // A full batch: more may be waiting.
                    Ok(n) if n as i64 >= self.batch => continue,
                    Ok(_) => failures = failure_backoff(self.poll),
                    Err(err) => {
                        metrics::counter!("conversation_event_relay_failures_total").increment(1);
                        // Backing off (jittered, doubling to FAILURE_MAX_BACKOFF) instead
                        // of polling on: a slow MongoDB gets less work, not more.
                        let next = failures.next().unwrap_or(FAILURE_MAX_BACKOFF);
                        tracing::warn!(error = %err, wait = ?next, "conversation event capture round failed; retrying");
                        wait = Some(next);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => {}
                _ = self.wake.notified(), if wait.is_none() => {}
                _ = tokio::time::sleep(wait.unwrap_or(self.poll)) => {}
            }
        }
        Ok(())
    }

    /// Publishes one batch of marked events, oldest first, and clears their markers.
    async fn cycle(&self) -> Result<usize, String> {
        let events = self.conversations.events();
        let find = async {
            events
                .find(doc! { "outbox_pending": { "$eq": true } })
                .sort(doc! { "event_id": 1 })
                .limit(self.batch)
                .await?
                .try_collect::<Vec<Document>>()
                .await
        };
        let documents = self.store.run(find).await.map_err(|e| e.to_string())?;
        let count = documents.len();
        for document in documents {
            let Some(id) = document.get("_id").cloned() else { continue };
            let (key, value) = flatten(&document);
            let payload = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
            // Never publish what consumers could not read.
            if let Err(err) = ChatChange::parse(&payload) {
                tracing::error!(error = %err, "a stored conversation event does not parse; left in place");
                metrics::counter!("conversation_events_corrupt_total").increment(1);
                continue;
            }
            self.producer.send(&self.topic, key.as_bytes(), &payload, &[]).await.map_err(|e| e.to_string())?;
            metrics::counter!("conversation_events_published_total").increment(1);
            let clear = events.update_one(doc! { "_id": { "$eq": id } }, doc! { "$unset": { "outbox_pending": "" } });
            self.store.run(clear).await.map_err(|e| e.to_string())?;
        }
        Ok(count)
    }
}

/// The record key (the conversation id) and the flattened Debezium-style value.
fn flatten(document: &Document) -> (String, Value) {
    let mut out = Map::new();
    for (name, value) in document {
        if name == "outbox_pending" {
            continue;
        }
        let plain = match value {
            Bson::DateTime(at) => Value::from(at.timestamp_millis()),
            other => other.clone().into_relaxed_extjson(),
        };
        out.insert(name.clone(), plain);
    }
    let at = document.get_i64("at").unwrap_or(0);
    out.insert("__op".into(), Value::String("c".into()));
    out.insert("__source_ts_ms".into(), Value::from(at));
    out.insert("__deleted".into(), Value::String("false".into()));
    let key = document.get_str("conversation_id").unwrap_or_default().to_owned();
    (key, Value::Object(out))
}

#[cfg(test)]
mod tests {
    use chatstream::{ConversationEvent, ConversationEventKind, MessageId, StreamId, UserId};

    use super::*;

    #[test]
    fn a_stored_event_flattens_to_what_consumers_parse() {
        let user = |raw: &str| UserId::parse(raw).expect("valid");
        let event = ConversationEvent {
            event_id: MessageId::new().to_string(),
            kind: ConversationEventKind::Read,
            conversation_id: StreamId::new_group(),
            user_id: user("bob"),
            actor_id: user("bob"),
            members: vec![user("alice"), user("bob")],
            title: Some("t".into()),
            up_to: Some(MessageId::new()),
            reason: None,
            message_id: None,
            emoji: None,
            at: chrono::DateTime::from_timestamp_millis(1_760_000_000_000).expect("valid"),
        };
        // As `Conversations::append_event` stores it.
        let mut document = mongodb::bson::to_document(&event).expect("bson");
        document.insert("_id", event.event_id.clone());
        document.insert("at", event.at.timestamp_millis());
        document.insert("outbox_pending", true);
        let (key, value) = flatten(&document);
        assert_eq!(key, event.conversation_id.to_string());
        let payload = serde_json::to_vec(&value).expect("json");
        assert_eq!(ChatChange::parse(&payload), Ok(ChatChange::Conversation(event)));
    }
}
