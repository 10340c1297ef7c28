//! The HTTP API: `POST /chat/messages` and `GET /chat/messages` on the public
//! listener, and the unchecked history read on the internal one.
//!
//! Why this module exists: this is the fleet's only write path for chat messages,
//! so every rule a message must satisfy (who may send it, what it may contain, which
//! conversation it belongs to, that a retry does not write it twice, that a 201
//! means durable) is enforced here, before anything reaches MongoDB.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRef, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chatauth::{AuthUser, Authenticator, ServiceCaller};
use chatstream::{ChatMessage, ConversationKind, MessageContent, MessageId, StreamId, StreamIdFormat, UserId};
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};
use servicekit::ratelimit::{KeyedLimiter, Rate};
use servicekit::{ApiError, ApiJson, ApiQuery};
use tokio::sync::Mutex;

use crate::conversations::{ConversationError, Conversations};
use crate::read_limit::ReadUser;
use crate::relay::RelayFeed;
use crate::settings::{HistorySettings, ReadSettings, WriteSettings};
use crate::store::{Cursor, Inserted, Reader, Store, StoreError};

/// The response header that marks an idempotent replay (`200`, nothing written).
pub const REPLAY_HEADER: &str = "idempotent-replay";

/// The longest `client_message_id`.
const MAX_CLIENT_MESSAGE_ID: usize = 128;

/// Inserts of one stream are serialized within a process (by stripe), so message
/// ids of a conversation are committed in id order and a `since` cursor never skips
/// a message that committed late.
const STREAM_LOCK_STRIPES: usize = 64;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    store: Store,
    auth: Authenticator,
    history: HistorySettings,
    /// The pair id format new messages get (`STREAM_ID_FORMAT`).
    format: StreamIdFormat,
    /// Groups, the inbox projection and read markers.
    pub(crate) conversations: Conversations,
    /// `GROUP_MAX_MEMBERS`.
    pub(crate) max_members: usize,
    /// Online flags for the conversation list (`REDIS_URL`; absent: none).
    pub(crate) presence: Option<Arc<presence::Presence>>,
    /// `RATE_LIMIT_POST_*`: one bucket per sender.
    post_limiter: Arc<KeyedLimiter<UserId>>,
    /// `RATE_LIMIT_READ_*`: one bucket per reader, over every public `GET`
    /// (`read_limit::ReadUser`).
    read_limiter: Arc<KeyedLimiter<UserId>>,
    /// `STREAM_LOCK_TIMEOUT`.
    lock_timeout: Duration,
    /// `EDIT_WINDOW`.
    edit_window: Duration,
    /// Hands local inserts to the outbox relay (outbox mode only).
    feed: Option<Arc<RelayFeed>>,
    /// Set once the indexes exist; writes wait for it (idempotency needs the
    /// unique index).
    indexes_ready: Arc<AtomicBool>,
    stream_locks: Arc<Vec<Mutex<()>>>,
    /// `BOTS`: the users `POST /chat/bot-messages` may post as (`bot_api`).
    pub(crate) bots: Arc<Vec<UserId>>,
    /// The write-behind queue (`WRITE_MODE=write_behind`; absent in direct mode).
    pub(crate) queue: Option<Arc<crate::write_behind::Queue>>,
    /// The recent-history cache (write-behind mode with `RECENT_CACHE_LENGTH` > 0).
    pub(crate) cache: Option<Arc<crate::recent_cache::RecentCache>>,
}

impl AppState {
    pub fn new(
        store: Store,
        auth: Authenticator,
        limits: Limits,
        conversations: Conversations,
        feed: Option<Arc<RelayFeed>>,
        indexes_ready: Arc<AtomicBool>,
    ) -> Self {
        let stream_locks = Arc::new((0..STREAM_LOCK_STRIPES).map(|_| Mutex::new(())).collect());
        let writes = &limits.writes;
        let rate = Rate::new(writes.rate_limit_post_per_second, writes.rate_limit_post_burst);
        let reads = Rate::new(limits.reads.rate_limit_read_per_second, limits.reads.rate_limit_read_burst);
        Self {
            store,
            auth,
            history: limits.history,
            format: limits.format,
            conversations,
            max_members: limits.max_members,
            presence: limits.presence,
            post_limiter: Arc::new(KeyedLimiter::new("post_message", rate, MAX_LIMITED_USERS)),
            read_limiter: Arc::new(KeyedLimiter::new("read", reads, MAX_LIMITED_USERS)),
            lock_timeout: writes.stream_lock_timeout,
            edit_window: writes.edit_window,
            feed,
            indexes_ready,
            stream_locks,
            // Checked by `Settings::validate` before the state is built.
            bots: Arc::new(crate::bot_api::parse_bots(&limits.writes.bots).unwrap_or_default()),
            queue: None,
            cache: None,
        }
    }

    /// History reads go through the recent cache.
    pub fn with_cache(mut self, cache: Arc<crate::recent_cache::RecentCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Drops `stream`'s recent cache around a change to a stored message: `before`
    /// the change a failure refuses it (503, nothing changed), after it the failure
    /// is only counted (the version bump of the first already stops stale repairs).
    pub(crate) async fn uncache(&self, stream: &StreamId, before: bool) -> Result<(), ApiError> {
        let Some(cache) = &self.cache else { return Ok(()) };
        match cache.invalidate(stream).await {
            Ok(()) => Ok(()),
            Err(err) if before => {
                tracing::warn!(error = %err, "recent cache unreachable; change refused");
                Err(ApiError::unavailable("the message cache is unavailable, retry later", RETRY_AFTER))
            }
            Err(err) => {
                metrics::counter!("recent_cache_invalidation_failures_total").increment(1);
                tracing::warn!(error = %err, "recent cache not invalidated after a change");
                Ok(())
            }
        }
    }

    /// Posts go through the write-behind queue (`WRITE_MODE=write_behind`).
    pub fn with_queue(mut self, queue: Arc<crate::write_behind::Queue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The write lock of `stream`'s stripe, waited for at most `STREAM_LOCK_TIMEOUT`.
    pub(crate) async fn lock_stream(&self, stream: &StreamId) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
        // Stream ids are hex digests (after a group's prefix): their leading bytes are uniform.
        let head = stream.digest_hex().get(..8).unwrap_or_default();
        let stripe = u64::from_str_radix(head, 16).unwrap_or(0) as usize % STREAM_LOCK_STRIPES;
        tokio::time::timeout(self.lock_timeout, self.stream_locks[stripe].lock()).await.map_err(|_| {
            metrics::counter!("stream_lock_timeouts_total").increment(1);
            ApiError::unavailable("this conversation is busy, retry shortly", RETRY_AFTER)
        })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Hands a changed message to the outbox relay (outbox mode), under its stream lock.
    pub(crate) fn offer(&self, message: &ChatMessage) {
        if let Some(feed) = &self.feed {
            feed.offer(message.clone());
        }
    }

    /// The pair id format new messages get (`STREAM_ID_FORMAT`).
    pub(crate) fn format(&self) -> StreamIdFormat {
        self.format
    }

    pub(crate) fn edit_window(&self) -> Duration {
        self.edit_window
    }

    /// The per-user write bucket (`RATE_LIMIT_POST_*`): messages and every other write.
    pub(crate) fn post_limiter(&self) -> &KeyedLimiter<UserId> {
        &self.post_limiter
    }

    /// The per-user read bucket (`RATE_LIMIT_READ_*`): every public `GET`.
    pub(crate) fn read_limiter(&self) -> &KeyedLimiter<UserId> {
        &self.read_limiter
    }

    /// A writable store, or 503 while the indexes are not there yet.
    fn writable(&self) -> Result<&Store, ApiError> {
        if self.indexes_ready.load(Ordering::Acquire) {
            Ok(&self.store)
        } else {
            Err(ApiError::unavailable("the message store is starting (indexes not ready yet)", RETRY_AFTER))
        }
    }
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

/// The most users whose post (and, separately, read) rate is tracked at once (each
/// limiter's memory bound).
const MAX_LIMITED_USERS: usize = 100_000;

/// What the API's limits and formats come from.
pub struct Limits {
    pub max_members: usize,
    pub presence: Option<Arc<presence::Presence>>,
    pub history: HistorySettings,
    pub writes: WriteSettings,
    pub reads: ReadSettings,
    pub format: StreamIdFormat,
}

/// New ids a write-behind post tries when another replica accepted a later id of
/// the same conversation first.
const OUT_OF_ORDER_RETRIES: u32 = 20;

/// What clients are told to wait before retrying after a 503.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub(crate) fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "MongoDB unavailable");
            ApiError::unavailable("the message store is unavailable, retry later", RETRY_AFTER)
        }
        other => ApiError::internal(other),
    }
}

/// The public routes.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/chat/messages", get(public_history).post(post_message))
        .merge(crate::conversations_api::public_routes())
        .merge(crate::message_changes::public_routes())
        .merge(crate::message_status::public_routes())
        .with_state(state)
}

/// The internal routes (service token, internal port only).
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/chat/messages", get(internal_history))
        .route("/chat/messages/changes", get(internal_changes))
        .merge(crate::conversations_api::internal_routes())
        .merge(crate::bot_api::internal_routes())
        .with_state(state)
}

/// `POST /chat/messages` body: `receiver_id` for a pair conversation, or
/// `conversation_id` for a group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    content: String,
    pub(crate) sender_id: String,
    #[serde(default)]
    receiver_id: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    stream_id: Option<String>,
    #[serde(default)]
    client_message_id: Option<String>,
}

/// Where a new message goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Pair(UserId),
    Group,
}

/// A validated `POST /chat/messages`.
#[derive(Debug, PartialEq, Eq)]
struct NewMessage {
    sender: UserId,
    target: Target,
    stream: StreamId,
    content: MessageContent,
    client_message_id: Option<String>,
}

fn invalid(field: &str, err: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{field}: {err}"))
}

/// Checks a post against the caller; every rule of the API in one place (group
/// membership is checked against the stored conversation, under its write lock).
fn validate(format: StreamIdFormat, caller: &UserId, body: PostMessage) -> Result<NewMessage, ApiError> {
    let sender = UserId::parse(&body.sender_id).map_err(|e| invalid("sender_id", e))?;
    if &sender != caller {
        return Err(ApiError::forbidden("sender_id must be the authenticated user"));
    }
    let content = MessageContent::parse(&body.content).map_err(|e| invalid("content", e))?;
    let (target, stream) = match (body.receiver_id.as_deref(), body.conversation_id.as_deref()) {
        (Some(receiver), None) => {
            let receiver = UserId::parse(receiver).map_err(|e| invalid("receiver_id", e))?;
            if receiver == sender {
                return Err(invalid("receiver_id", "must differ from sender_id"));
            }
            let stream = StreamId::for_pair_as(format, &sender, &receiver);
            if let Some(given) = body.stream_id.as_deref() {
                if given != stream.as_str() {
                    return Err(invalid(
                        "stream_id",
                        format!("{given:?} is not the stream of sender_id and receiver_id"),
                    ));
                }
            }
            (Target::Pair(receiver), stream)
        }
        (None, Some(conversation)) => {
            let stream = StreamId::parse(conversation).map_err(|e| invalid("conversation_id", e))?;
            if stream.kind() != ConversationKind::Group {
                return Err(invalid("conversation_id", "is not a group; post to a person with receiver_id"));
            }
            if body.stream_id.as_deref().is_some_and(|given| given != stream.as_str()) {
                return Err(invalid("stream_id", "must equal conversation_id"));
            }
            (Target::Group, stream)
        }
        (Some(_), Some(_)) => return Err(invalid("conversation_id", "give receiver_id or conversation_id, not both")),
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "missing field: receiver_id (a person) or conversation_id (a group) is required",
            ))
        }
    };
    if let Some(id) = body.client_message_id.as_deref() {
        let valid_chars = id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
        if id.is_empty() || id.len() > MAX_CLIENT_MESSAGE_ID || !valid_chars {
            return Err(invalid(
                "client_message_id",
                format!("must be 1 to {MAX_CLIENT_MESSAGE_ID} characters of A-Z a-z 0-9 _ . : -"),
            ));
        }
    }
    Ok(NewMessage { sender, target, stream, content, client_message_id: body.client_message_id })
}

/// The inbox excerpt of a message: its first characters.
pub(crate) fn excerpt(content: &MessageContent) -> String {
    const EXCERPT_CHARS: usize = 100;
    content.as_str().chars().take(EXCERPT_CHARS).collect()
}

/// A retried post (same sender and `client_message_id`) answers with the original,
/// or `409` when it is not the same message.
fn replay(original: ChatMessage, new: &NewMessage) -> Result<Response, ApiError> {
    let same_target = match &new.target {
        Target::Pair(receiver) => original.receiver_id.as_ref() == Some(receiver),
        Target::Group => original.stream_id == new.stream,
    };
    if !same_target || original.content != new.content {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "client_message_id_reused",
            "client_message_id was already used for a different message",
        ));
    }
    metrics::counter!("idempotent_replays_total").increment(1);
    let mut response = (StatusCode::OK, Json(original)).into_response();
    response.headers_mut().insert(REPLAY_HEADER, HeaderValue::from_static("true"));
    Ok(response)
}

pub(crate) fn conversation_error(err: ConversationError) -> ApiError {
    match err {
        ConversationError::NotAMember => {
            ApiError::new(StatusCode::FORBIDDEN, "not_a_member", "you are not a member of this conversation")
        }
        ConversationError::Forbidden(what) => ApiError::forbidden(what),
        ConversationError::Invalid(what) => ApiError::bad_request(what),
        ConversationError::Store(err) => store_error(err),
    }
}

async fn post_message(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiJson(body): ApiJson<PostMessage>,
) -> Result<Response, ApiError> {
    state.post_limiter.admit(&caller, "messages")?;
    write_message(&state, &caller, body).await
}

/// The write path of every message, whoever posts it: `POST /chat/messages` (as the
/// authenticated user) and `POST /chat/bot-messages` (as a configured bot). Checks
/// the post against `caller`, answers a retry (same `client_message_id`) with the
/// original, and stores a new message under its conversation's write lock.
pub(crate) async fn write_message(state: &AppState, caller: &UserId, body: PostMessage) -> Result<Response, ApiError> {
    let new = validate(state.format, caller, body)?;
    if let Some(queue) = &state.queue {
        return write_behind(state, queue, new).await;
    }
    let store = state.writable()?;
    // A retry is answered before anything is counted, so it never bumps the
    // conversation's counter a second time.
    if let Some(id) = new.client_message_id.as_deref() {
        if let Some(original) = store.by_client_message_id(&new.sender, id).await.map_err(store_error)? {
            return replay(original, &new);
        }
    }

    let started = Instant::now();
    let outcome = {
        let _serial = state.lock_stream(&new.stream).await?;
        let now = Utc::now().timestamp_millis();
        let message_id = MessageId::new();
        let peer = match &new.target {
            Target::Pair(receiver) => Some(receiver),
            // Membership is checked by the conversation write itself.
            Target::Group => None,
        };
        let counted = Instant::now();
        let accepted = state
            .conversations
            .accept_message(&new.stream, &new.sender, peer, &message_id, &excerpt(&new.content), now)
            .await
            .map_err(conversation_error)?;
        metrics::histogram!("conversation_update_duration_seconds").record(counted.elapsed().as_secs_f64());
        let message = ChatMessage {
            message_id,
            stream_id: new.stream,
            sender_id: new.sender.clone(),
            receiver_id: peer.cloned(),
            recipients: accepted.recipients,
            content: new.content.clone(),
            // Milliseconds: what BSON dates and the change events carry.
            created_at: Utc.timestamp_millis_opt(now).single().unwrap_or_else(Utc::now),
            // The POST's trace travels with the message (relay header, Debezium field).
            state: chatstream::MessageState { trace: servicekit::trace::traceparent(), ..Default::default() },
        };
        let inserting = Instant::now();
        let outcome = store.insert(&message, new.client_message_id.as_deref(), Some(accepted.seq)).await;
        metrics::histogram!("message_insert_duration_seconds").record(inserting.elapsed().as_secs_f64());
        if let (Ok(Inserted::Created), Some(feed)) = (&outcome, &state.feed) {
            // Still under the stream lock: the relay sees a stream in commit order.
            feed.offer(message.clone());
        }
        outcome.map(|done| (done, message))
    };
    metrics::histogram!("message_write_duration_seconds").record(started.elapsed().as_secs_f64());

    match outcome.map_err(store_error)? {
        (Inserted::Created, message) => {
            metrics::counter!("messages_written_total").increment(1);
            Ok((StatusCode::CREATED, Json(message)).into_response())
        }
        (Inserted::Replay(original), _) => replay(*original, &new),
        (Inserted::Unresolved, message) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "write_outcome_unknown",
            format!(
                "the message store stopped answering during the write: message {} may or may not be stored; \
                 look for it in the history before sending it again (or retry with the same client_message_id)",
                message.message_id
            ),
        )),
    }
}

/// The write path in write-behind mode: the same checks, then the message is
/// appended to the queue (durable in Redis) and answered `202` with `status:
/// "queued"`. A group's membership is read from MongoDB under the conversation's
/// write lock (membership changes take it too), so without MongoDB only pair
/// messages are accepted; a retried `client_message_id` is answered from Redis,
/// queued or stored.
async fn write_behind(
    state: &AppState,
    queue: &crate::write_behind::Queue,
    new: NewMessage,
) -> Result<Response, ApiError> {
    use crate::write_behind::{Admitted, QueueError, QueuedMessage};
    let started = Instant::now();
    let outcome = {
        let _serial = state.lock_stream(&new.stream).await?;
        let (receiver, recipients) = match &new.target {
            Target::Pair(receiver) => (Some(receiver.clone()), Vec::new()),
            Target::Group => {
                let group =
                    state.conversations.for_member(&new.stream, &new.sender).await.map_err(conversation_error)?;
                let members = group.members.iter().filter_map(|m| UserId::parse(m).ok());
                (None, members.filter(|m| m != &new.sender).collect())
            }
        };
        let mut attempt = 0;
        loop {
            let message = ChatMessage {
                message_id: MessageId::new(),
                stream_id: new.stream,
                sender_id: new.sender.clone(),
                receiver_id: receiver.clone(),
                recipients: recipients.clone(),
                content: new.content.clone(),
                created_at: Utc.timestamp_millis_opt(Utc::now().timestamp_millis()).single().unwrap_or_else(Utc::now),
                // The POST's trace travels with the message (relay header, Debezium field).
                state: chatstream::MessageState { trace: servicekit::trace::traceparent(), ..Default::default() },
            };
            let trace = message.state.trace.clone();
            let entry = QueuedMessage { message, client_message_id: new.client_message_id.clone(), trace };
            match queue.accept(&entry).await {
                // Another replica took this millisecond of the conversation: a new id
                // in the next one (bounded; clocks apart by more answer 503).
                Err(QueueError::OutOfOrder) if attempt < OUT_OF_ORDER_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                other => break other.map(|admitted| (admitted, entry.message)),
            }
        }
    };
    metrics::histogram!("message_write_duration_seconds").record(started.elapsed().as_secs_f64());
    match outcome {
        Ok((Admitted::Queued, message)) => {
            metrics::counter!("messages_queued_total").increment(1);
            let mut body = serde_json::to_value(&message).map_err(ApiError::internal)?;
            body["status"] = serde_json::Value::from("queued");
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Ok((Admitted::Replay(original), _)) => replay(original.message, &new),
        Err(QueueError::Full(depth)) => {
            metrics::counter!("write_behind_refused_total").increment(1);
            tracing::warn!(depth, "write-behind queue at its high-water mark; refusing new messages");
            Err(ApiError::unavailable("too many messages are waiting to be stored, retry shortly", RETRY_AFTER))
        }
        Err(err) => {
            tracing::warn!(error = %err, "write-behind queue unavailable");
            Err(ApiError::unavailable("the message queue is unavailable, retry later", RETRY_AFTER))
        }
    }
}

/// `GET /chat/messages` query on the public listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicHistoryQuery {
    #[serde(default)]
    stream_id: Option<String>,
    /// The same as `stream_id` (the name groups are known by).
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    peer_id: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    before: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /chat/messages` query on the internal listener. With `user_id` and
/// `peer_id` only that pair's messages are returned (what a socket may replay).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalHistoryQuery {
    stream_id: String,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    peer_id: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    before: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

/// One history page.
#[derive(Debug, Serialize)]
pub struct HistoryPage {
    stream_id: StreamId,
    /// Oldest first.
    messages: Vec<ChatMessage>,
    /// Whether more messages follow in the paging direction (after the last one for
    /// `since`/no cursor, before the first one for `before`).
    has_more: bool,
}

fn cursor(since: Option<&str>, before: Option<&str>) -> Result<Cursor, ApiError> {
    match (since, before) {
        (Some(_), Some(_)) => Err(ApiError::bad_request("since and before cannot be used together")),
        (Some(id), None) => MessageId::parse(id).map(Cursor::Since).map_err(|e| invalid("since", e)),
        (None, Some(id)) => MessageId::parse(id).map(Cursor::Before).map_err(|e| invalid("before", e)),
        (None, None) => Ok(Cursor::Start),
    }
}

fn page_limit(settings: &HistorySettings, limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(settings.default_limit),
        Some(0) => Err(invalid("limit", "must be at least 1")),
        Some(n) => Ok(n.min(settings.max_limit)),
    }
}

/// The stored part of a page from the recent cache, oldest first; `None` when the
/// cache cannot answer it whole (then a repair is started and MongoDB answers).
async fn stored_page(
    state: &AppState,
    stream: &StreamId,
    reader: &Reader,
    cursor: Cursor,
    limit: u32,
) -> Option<Vec<ChatMessage>> {
    use crate::recent_cache::Lookup;
    let cache = state.cache.as_ref()?;
    match cache.read(stream, cursor, limit).await {
        Lookup::Hit(mut messages) => {
            let all = messages.len();
            messages.retain(|m| reader.may_see(m));
            if messages.len() < all {
                // Someone else's messages under the id (a legacy collision): MongoDB
                // pages by this reader's messages.
                return None;
            }
            if matches!(cursor, Cursor::Before(_)) {
                messages.reverse();
            }
            Some(messages)
        }
        Lookup::Miss(Some(version)) => {
            let (cache, store, stream) = (cache.clone(), state.store.clone(), *stream);
            tokio::spawn(async move { cache.repair(&store, &stream, version).await });
            None
        }
        Lookup::Miss(None) => None,
    }
}

async fn read_page(
    state: &AppState,
    stream: StreamId,
    reader: &Reader,
    cursor: Cursor,
    limit: u32,
) -> Result<HistoryPage, ApiError> {
    // Queued messages first: one that is stored between the two reads is then in
    // the second (and deduplicated), never in neither.
    let queued = match &state.queue {
        Some(queue) => match queue.page(&stream, cursor, limit + 1).await {
            Ok(queued) => queued.into_iter().filter(|m| reader.may_see(m)).collect(),
            Err(err) => {
                metrics::counter!("write_behind_history_queue_failures_total").increment(1);
                tracing::warn!(error = %err, "queued messages left out of a history page");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let mut messages = match stored_page(state, &stream, reader, cursor, limit + 1).await {
        Some(cached) => cached,
        None => state.store.history(&stream, reader, cursor, limit + 1).await.map_err(store_error)?,
    };
    if !queued.is_empty() {
        messages.extend(queued);
        messages.sort_by_key(|m| m.message_id);
        messages.dedup_by_key(|m| m.message_id);
        let keep = limit as usize + 1;
        if messages.len() > keep {
            match cursor {
                Cursor::Before(_) => {
                    messages.drain(..messages.len() - keep);
                }
                _ => messages.truncate(keep),
            }
        }
    }
    let has_more = messages.len() > limit as usize;
    if has_more {
        match cursor {
            // The extra one is the oldest of a `before` page, the newest otherwise.
            Cursor::Before(_) => {
                messages.remove(0);
            }
            _ => messages.truncate(limit as usize),
        }
    }
    Ok(HistoryPage { stream_id: stream, messages, has_more })
}

async fn public_history(
    State(state): State<AppState>,
    ReadUser(caller): ReadUser,
    ApiQuery(query): ApiQuery<PublicHistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let given = match (query.stream_id.as_deref(), query.conversation_id.as_deref()) {
        (Some(_), Some(_)) => return Err(invalid("conversation_id", "give stream_id or conversation_id, not both")),
        (raw, None) | (None, raw) => {
            raw.map(|s| StreamId::parse(s).map_err(|e| invalid("stream_id", e))).transpose()?
        }
    };
    let cursor = cursor(query.since.as_deref(), query.before.as_deref())?;
    let limit = page_limit(&state.history, query.limit)?;
    let (stream, reader) = match (query.peer_id.as_deref(), given) {
        // The stream is recomputed from the caller and the peer, never taken on trust.
        (Some(peer), given) => {
            let peer = UserId::parse(peer).map_err(|e| invalid("peer_id", e))?;
            if peer == caller {
                return Err(invalid("peer_id", "must differ from the authenticated user"));
            }
            let stream = match given {
                // A pair id in the legacy format is accepted for reading old data.
                Some(given) if given.is_pair_of(&caller, &peer) => given,
                Some(_) => return Err(invalid("stream_id", "is not the conversation of you and peer_id")),
                None => StreamId::for_pair_as(state.format, &caller, &peer),
            };
            (stream, Reader::Pair(caller, peer))
        }
        // Only the stream id: the caller sees the messages of it they sent or
        // received. A stranger's read and an empty conversation answer alike, so the
        // endpoint tells nobody who talks to whom.
        // A group: its current members read all of it.
        (None, Some(stream)) if stream.kind() == ConversationKind::Group => {
            state.conversations.for_member(&stream, &caller).await.map_err(conversation_error)?;
            (stream, Reader::Service)
        }
        (None, Some(stream)) => (stream, Reader::Participant(caller)),
        (None, None) => return Err(invalid("stream_id", "stream_id or peer_id is required")),
    };
    read_page(&state, stream, &reader, cursor, limit).await.map(Json)
}

/// `GET /chat/messages/changes` query (internal): what changed after a moment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    stream_id: String,
    /// Messages up to this id (the ones the client had already seen)...
    up_to: String,
    /// ...that changed (edit, deletion, reaction) after this many epoch milliseconds.
    after_ms: i64,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    peer_id: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

/// `{stream_id, messages}`: the current state of each changed message, oldest first.
async fn internal_changes(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<ChangesQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let stream = StreamId::parse(&query.stream_id).map_err(|e| invalid("stream_id", e))?;
    let up_to = MessageId::parse(&query.up_to).map_err(|e| invalid("up_to", e))?;
    let limit = page_limit(&state.history, query.limit)?;
    let mut messages =
        state.store.changed_since(&stream, query.after_ms, &up_to, limit + 1).await.map_err(store_error)?;
    if let (Some(user), Some(peer)) = (query.user_id.as_deref(), query.peer_id.as_deref()) {
        let user = UserId::parse(user).map_err(|e| invalid("user_id", e))?;
        let peer = UserId::parse(peer).map_err(|e| invalid("peer_id", e))?;
        messages.retain(|m| m.involves(&user) && m.involves(&peer));
    }
    let has_more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    Ok(Json(HistoryPage { stream_id: stream, messages, has_more }))
}

async fn internal_history(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<InternalHistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let stream = StreamId::parse(&query.stream_id).map_err(|e| invalid("stream_id", e))?;
    let cursor = cursor(query.since.as_deref(), query.before.as_deref())?;
    let limit = page_limit(&state.history, query.limit)?;
    let reader = match (query.user_id.as_deref(), query.peer_id.as_deref()) {
        (None, None) => Reader::Service,
        (Some(user), Some(peer)) => Reader::Pair(
            UserId::parse(user).map_err(|e| invalid("user_id", e))?,
            UserId::parse(peer).map_err(|e| invalid("peer_id", e))?,
        ),
        _ => return Err(invalid("peer_id", "user_id and peer_id go together")),
    };
    read_page(&state, stream, &reader, cursor, limit).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    fn body(sender: &str, receiver: &str, content: &str) -> PostMessage {
        PostMessage {
            content: content.to_owned(),
            sender_id: sender.to_owned(),
            receiver_id: Some(receiver.to_owned()),
            conversation_id: None,
            stream_id: None,
            client_message_id: None,
        }
    }

    fn group_body(sender: &str, conversation: &str) -> PostMessage {
        PostMessage { receiver_id: None, conversation_id: Some(conversation.to_owned()), ..body(sender, "x", "hi") }
    }

    #[test]
    fn a_good_post_is_accepted_and_trimmed() {
        let mut b = body("alice", "bob", "  hi  ");
        b.stream_id = Some(StreamId::for_pair(&user("alice"), &user("bob")).to_string());
        b.client_message_id = Some("web:1.2_3-x".into());
        let new = validate(StreamIdFormat::V2, &user("alice"), b).expect("valid");
        assert_eq!(new.content.as_str(), "hi");
        assert_eq!(new.client_message_id.as_deref(), Some("web:1.2_3-x"));
    }

    #[test]
    fn bad_posts_are_refused_with_the_right_status() {
        let alice = user("alice");
        let status = |b: PostMessage| validate(StreamIdFormat::V2, &alice, b).map(|_| ()).map_err(|e| e.status).err();
        assert_eq!(status(body("mallory", "bob", "x")), Some(StatusCode::FORBIDDEN));
        assert_eq!(status(body("alice", "alice", "x")), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(body("alice", "b o b", "x")), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(body("alice", "bob", " \n ")), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(body("alice", "bob", &"x".repeat(4001))), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(body("alice", "bob", "bell\u{7}")), Some(StatusCode::BAD_REQUEST));
        let mut wrong_stream = body("alice", "bob", "x");
        wrong_stream.stream_id = Some(StreamId::for_pair(&alice, &user("carol")).to_string());
        assert_eq!(status(wrong_stream), Some(StatusCode::BAD_REQUEST));
        // A legacy id of the right pair is not the id of the configured format.
        let mut legacy = body("alice", "bob", "x");
        legacy.stream_id = Some(StreamId::for_pair_as(StreamIdFormat::Legacy, &alice, &user("bob")).to_string());
        assert_eq!(status(legacy), Some(StatusCode::BAD_REQUEST));
        // Groups: a group id, and never both targets or none.
        let group = StreamId::new_group();
        let ok = validate(StreamIdFormat::V2, &alice, group_body("alice", group.as_str())).expect("valid");
        assert_eq!((ok.target, ok.stream), (Target::Group, group));
        let pair_as_group = StreamId::for_pair(&alice, &user("bob"));
        assert_eq!(status(group_body("alice", pair_as_group.as_str())), Some(StatusCode::BAD_REQUEST));
        let both = PostMessage { conversation_id: Some(group.to_string()), ..body("alice", "bob", "x") };
        assert_eq!(status(both), Some(StatusCode::BAD_REQUEST));
        let neither = PostMessage { receiver_id: None, ..body("alice", "bob", "x") };
        assert_eq!(status(neither), Some(StatusCode::UNPROCESSABLE_ENTITY));
        for bad in ["", "has space", "slash/", &"k".repeat(129)] {
            let mut b = body("alice", "bob", "x");
            b.client_message_id = Some(bad.to_owned());
            assert_eq!(status(b), Some(StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }

    #[test]
    fn the_legacy_format_is_used_only_when_configured() {
        let (alice, bob) = (user("alice"), user("bob"));
        let legacy = validate(StreamIdFormat::Legacy, &alice, body("alice", "bob", "x")).expect("valid");
        assert_eq!(legacy.stream.as_str(), "a83ab2505ace9a87");
        let v2 = validate(StreamIdFormat::V2, &alice, body("alice", "bob", "x")).expect("valid");
        assert_eq!(v2.stream, StreamId::for_pair(&alice, &bob));
        assert_eq!(v2.stream.as_str().len(), 32);
    }

    #[test]
    fn cursors_and_limits() {
        let id = MessageId::new().to_string();
        assert!(matches!(cursor(Some(&id), None), Ok(Cursor::Since(_))));
        assert!(matches!(cursor(None, Some(&id)), Ok(Cursor::Before(_))));
        assert!(cursor(Some(&id), Some(&id)).is_err());
        assert!(cursor(Some("nope"), None).is_err());
        let settings = HistorySettings::default();
        assert_eq!(page_limit(&settings, None).ok(), Some(50));
        assert_eq!(page_limit(&settings, Some(500)).ok(), Some(200));
        assert!(page_limit(&settings, Some(0)).is_err());
    }
}
