//! The consumer: one Kafka record in, an email (or a digest entry, or a counted
//! skip) out.
//!
//! For every record:
//! 1. parse it: a domain topic's record as a [`DomainEvent`] of that topic's kind,
//!    anything else (`chat.changes`) as a [`ChangeEvent`]; unparseable → malformed →
//!    dead letter;
//! 2. claim it in the event store (24 h): done already → skip; Redis down → go on;
//! 3. chat: a new message to a recipient who is offline, known and opted in joins the
//!    recipient's pending digest in MongoDB (the flusher sends it); domain: render and
//!    send one email now;
//! 4. success marks the event done and the offset is committed; a failure releases
//!    the claim so the retry can take it. SMTP 4xx, timeouts and an unreachable
//!    MongoDB are retried (`MESSAGE_RETRY_*`, 10 times by default) and then
//!    dead-lettered; an SMTP 5xx is dead-lettered at once, with the reply as reason.
//!
//! A user who is unknown, has no usable address or did not opt in is not an error:
//! the event is counted (`emails_skipped_total{reason}`), marked done and committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstream::domain::{DomainEvent, DomainKind};
use chatstream::{ChangeEvent, ChangeOp, ChatChange, EventError, UserId};
use eventstore::{Claim, ClaimToken, EventKey};
use kafkawrapper::{Handler, HandlerError, Record};

use crate::compose;
use crate::digest::{DigestItem, Enqueued};
use crate::mailer::{Outgoing, SendError};
use crate::metrics as m;
use crate::users::Lookup;
use crate::Shared;

/// How often a consumer waiting on another's lease asks again.
const LEASE_POLL: Duration = Duration::from_millis(100);

pub struct EmailHandler {
    shared: Arc<Shared>,
}

enum Claimed {
    Duplicate,
    Process(Option<ClaimToken>),
}

fn parse_error(err: EventError) -> HandlerError {
    match err {
        EventError::Malformed(reason) => HandlerError::malformed(reason),
        EventError::Unroutable(reason) => HandlerError::permanent(reason),
    }
}

fn send_error(err: SendError) -> HandlerError {
    match err {
        SendError::Transient(_) => HandlerError::retryable(err),
        SendError::Permanent(_) => HandlerError::permanent(err),
    }
}

impl EmailHandler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Claims the event, waiting out another consumer's live lease.
    async fn claim(&self, key: &EventKey) -> Result<Claimed, HandlerError> {
        let store = &self.shared.store;
        let deadline = Instant::now() + store.settings().processing_lease + Duration::from_secs(1);
        loop {
            match store.claim(key).await {
                Claim::Acquired(token) => return Ok(Claimed::Process(Some(token))),
                Claim::Unavailable => return Ok(Claimed::Process(None)),
                Claim::AlreadyDone => return Ok(Claimed::Duplicate),
                Claim::InProgress if Instant::now() < deadline => tokio::time::sleep(LEASE_POLL).await,
                Claim::InProgress => return Err(HandlerError::retryable("another consumer holds the event")),
            }
        }
    }

    /// Marks the event done after success, or releases the claim for the retry.
    async fn settle(&self, key: &EventKey, token: Option<ClaimToken>, result: &Result<(), HandlerError>) {
        let Some(token) = token else { return };
        match result {
            Ok(()) => self.shared.store.mark_done(key, token).await,
            Err(_) => self.shared.store.release(key, token).await,
        }
    }

    async fn chat(&self, payload: &[u8]) -> Result<(), HandlerError> {
        let event = match ChatChange::parse(payload).map_err(parse_error)? {
            ChatChange::Message(event) => event,
            // Membership changes and read markers send no email.
            ChatChange::Conversation(_) => {
                m::skipped("conversation_event", 1);
                return Ok(());
            }
        };
        if event.op != ChangeOp::Create {
            m::skipped("not_new", 1);
            return Ok(());
        }
        let key = self.shared.store.message_key(&event.message_id(), &event.stream_id());
        let token = match self.claim(&key).await? {
            Claimed::Duplicate => {
                m::skipped("duplicate", 1);
                return Ok(());
            }
            Claimed::Process(token) => token,
        };
        let result = self.queue(&event).await;
        self.settle(&key, token, &result).await;
        result
    }

    /// Puts a new chat message into each addressee's pending digest (the receiver,
    /// or every group member but the sender). Each digest deduplicates by message
    /// id, so a retry after a partial failure queues nothing twice.
    async fn queue(&self, event: &ChangeEvent) -> Result<(), HandlerError> {
        for to in event.message.addressees() {
            self.queue_for(event, to).await?;
        }
        Ok(())
    }

    async fn queue_for(&self, event: &ChangeEvent, to: &UserId) -> Result<(), HandlerError> {
        let message = &event.message;
        if self.shared.presence.is_online(to.as_str()).await {
            tracing::debug!(user = %to, message_id = %message.message_id, "recipient is online; no email");
            m::skipped("online", 1);
            return Ok(());
        }
        match self.shared.users.recipient(to).await.map_err(HandlerError::retryable)? {
            Lookup::Skip(reason) => {
                tracing::info!(user = %to, reason = reason.label(), message_id = %message.message_id, "no email for this user");
                m::skipped(reason.label(), 1);
                return Ok(());
            }
            Lookup::Found(_) => {}
        }
        let item = DigestItem {
            message_id: message.message_id.to_string(),
            stream_id: message.stream_id.to_string(),
            sender_id: message.sender_id.to_string(),
            sender_name: self.shared.users.display_name(&message.sender_id).await,
            receiver_id: to.to_string(),
            content: message.content.as_str().to_owned(),
            created_at: message.created_at.timestamp_millis(),
            enqueued_at: chrono::Utc::now().timestamp_millis(),
        };
        match self.shared.digests.enqueue(to.as_str(), item).await.map_err(HandlerError::retryable)? {
            Enqueued::Added => tracing::debug!(user = %to, message_id = %message.message_id, "queued for the digest"),
            Enqueued::AlreadyPending => m::skipped("duplicate", 1),
            Enqueued::Overflow => {
                metrics::counter!(m::DIGEST_OVERFLOW).increment(1);
                tracing::info!(user = %to, message_id = %message.message_id, "digest full; message only counted");
            }
        }
        Ok(())
    }

    async fn domain(&self, kind: DomainKind, payload: &[u8]) -> Result<(), HandlerError> {
        let event = DomainEvent::parse(kind, payload).map_err(parse_error)?;
        if event.op == ChangeOp::Delete {
            m::skipped("deleted", 1);
            return Ok(());
        }
        let key = self.shared.store.key(&event.dedup_id(), kind.name());
        let token = match self.claim(&key).await? {
            Claimed::Duplicate => {
                m::skipped("duplicate", 1);
                return Ok(());
            }
            Claimed::Process(token) => token,
        };
        let result = self.send(kind, &event, &key).await;
        self.settle(&key, token, &result).await;
        result
    }

    /// Renders and sends the email of one domain event.
    async fn send(&self, kind: DomainKind, event: &DomainEvent, key: &EventKey) -> Result<(), HandlerError> {
        let user = event.document.user_id();
        let recipient = match self.shared.users.recipient(user).await.map_err(HandlerError::retryable)? {
            Lookup::Found(recipient) => recipient,
            Lookup::Skip(reason) => {
                tracing::info!(user = %user, reason = reason.label(), event = %key, "no email for this user");
                m::skipped(reason.label(), 1);
                return Ok(());
            }
        };
        let context = compose::domain_context(&recipient, event);
        let rendered = self
            .shared
            .templates
            .render(kind.name(), recipient.locale.as_deref(), &context)
            .map_err(HandlerError::permanent)?;
        let mail = Outgoing { kind: kind.name(), to: recipient.mailbox(), rendered, key: key.to_string() };
        self.shared.mailer.send(&mail).await.map_err(send_error)?;
        tracing::info!(user = %user, kind = kind.name(), event = %key, "email sent");
        Ok(())
    }
}

impl Handler for EmailHandler {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        let payload = record.payload.as_deref().ok_or_else(|| HandlerError::malformed("record has no value"))?;
        // The domain topics have fixed names; any other topic carries chat changes
        // (`chat.changes` unless the deployment renamed it).
        match DomainKind::from_topic(&record.topic) {
            Some(kind) => self.domain(kind, payload).await,
            None => self.chat(payload).await,
        }
    }
}
