//! The chat change handler: one Kafka record in, deduplicated concurrent forwards out.
//!
//! For each change on `chat.changes`:
//! 1. parse it (flattened or raw Debezium form); unparseable → dead-letter;
//! 2. claim it in the event store: already done → skip; claimed by a consumer that
//!    is still working on it (a rebalance race, or a crash whose lease has not run
//!    out) → wait for that lease, then claim again; Redis down → process anyway;
//! 3. forward to the socket pod and, for new messages, to the notification service,
//!    concurrently; both must succeed for the change to count as done;
//! 4. mark it done (the offset is committed after this returns), or release the
//!    claim so the retry can take it.
//!
//! When the retries run out, the failover closes the stream's sockets with the
//! resync code, so the clients fetch what they missed from history.

use std::time::{Duration, Instant};

use chatstream::{ChangeEvent, ChangeOp, EventError};
use eventstore::{Claim, ClaimToken, RedisEventStore};
use futures::future::join_all;
use kafkawrapper::{Handler, HandlerError, Record};
use serde_json::json;

use crate::forward::Forwarder;

/// How often a consumer waiting on another's lease asks again.
const LEASE_POLL: Duration = Duration::from_millis(100);

pub struct ChatChangeHandler {
    store: RedisEventStore,
    forwarder: Forwarder,
    chat_websocket_url: String,
    notifications_url: Option<String>,
    failover_timeout: Duration,
}

impl ChatChangeHandler {
    pub fn new(
        store: RedisEventStore,
        forwarder: Forwarder,
        chat_websocket_url: &str,
        notifications_url: &str,
        failover_timeout: Duration,
    ) -> Self {
        let trim = |url: &str| url.trim_end_matches('/').to_owned();
        Self {
            store,
            forwarder,
            chat_websocket_url: trim(chat_websocket_url),
            notifications_url: Some(trim(notifications_url)).filter(|u| !u.is_empty()),
            failover_timeout,
        }
    }

    fn parse(record: &Record) -> Result<ChangeEvent, HandlerError> {
        let payload = record.payload.as_deref().ok_or_else(|| HandlerError::malformed("record has no value"))?;
        ChangeEvent::parse(payload).map_err(|err| match err {
            EventError::Malformed(reason) => HandlerError::malformed(reason),
            EventError::Unroutable(reason) => HandlerError::permanent(reason),
        })
    }

    /// Claims the event, waiting out another consumer's live lease. `Ok(None)` means
    /// "already done, skip"; `Ok(Some(None))` means "process without a claim" (Redis down).
    async fn claim(&self, key: &eventstore::EventKey) -> Result<Option<Option<ClaimToken>>, HandlerError> {
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

    async fn forward(&self, event: &ChangeEvent) -> Result<(), HandlerError> {
        let stream = event.stream_id();
        let kind = match event.op {
            ChangeOp::Create => "message",
            ChangeOp::Update => "message_updated",
            ChangeOp::Delete => "message_deleted",
        };
        let frame = json!({ "type": kind, "message": event.message });
        let chat_url = format!("{}/chat/forward-to-websocket?stream_id={stream}", self.chat_websocket_url);
        let notification = match (&self.notifications_url, event.op) {
            (Some(base), ChangeOp::Create) => Some((
                format!("{base}/notifications/chat?user_id={}", event.message.receiver_id),
                json!({ "message": event.message }),
            )),
            _ => None,
        };
        let mut calls = vec![self.forwarder.post("chat_websocket", &chat_url, &frame)];
        if let Some((url, body)) = &notification {
            calls.push(self.forwarder.post("notifications", url, body));
        }
        let errors: Vec<HandlerError> = join_all(calls).await.into_iter().filter_map(Result::err).collect();
        match errors.iter().find(|e| e.is_retryable()).or(errors.first()) {
            None => Ok(()),
            Some(first) => Err(first.clone()),
        }
    }

    /// Closes the stream's sockets with the resync code, retrying within the
    /// failover timeout (the pod may be restarting).
    async fn fail_over(&self, event: &ChangeEvent) -> bool {
        let url = format!("{}/chat/close-stream?stream_id={}", self.chat_websocket_url, event.stream_id());
        let deadline = Instant::now() + self.failover_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.forwarder.post("chat_websocket_close", &url, &json!({})).await {
                Ok(()) => return true,
                Err(HandlerError::Retryable(reason)) if Instant::now() + pause < deadline => {
                    tracing::debug!(%reason, "close-stream failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(err) => {
                    tracing::error!(stream_id = %event.stream_id(), error = %err, "failover could not close the stream's sockets");
                    return false;
                }
            }
        }
    }
}

impl Handler for ChatChangeHandler {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        let event = Self::parse(record)?;
        let key = self.store.key(&event.dedup_id(), event.stream_id().as_str());
        let Some(token) = self.claim(&key).await? else {
            metrics::counter!("changes_skipped_duplicate_total").increment(1);
            return Ok(());
        };
        match self.forward(&event).await {
            Ok(()) => {
                if let Some(token) = token {
                    self.store.mark_done(&key, token).await;
                }
                metrics::counter!("changes_forwarded_total", "op" => event.op.code()).increment(1);
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
        let Ok(event) = Self::parse(record) else { return };
        tracing::error!(
            message_id = %event.message_id(),
            stream_id = %event.stream_id(),
            error = %error,
            "giving up on real-time delivery; closing the stream's sockets so clients resync from history"
        );
        let closed = self.fail_over(&event).await;
        metrics::counter!("failovers_total", "outcome" => if closed { "closed" } else { "failed" }).increment(1);
    }
}
