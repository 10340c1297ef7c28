//! The internal endpoints the change handler calls: forward a message event or a
//! conversation event (membership, title, read marker) to a stream's sockets, and
//! close a stream's sockets after delivery gave up (failover).
//!
//! Why this module exists: the status codes here drive the change handler's
//! retries: `200` commits the event, `206` and `500` make it retry. They must mean
//! exactly "every socket of this stream on this pod has the event queued", "some
//! do", "none does", with zero sockets counting as done.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chatauth::ServiceCaller;
use chatstream::{ChatMessage, ConversationEvent, ConversationEventKind, ConversationKind, StreamId};
use serde::{Deserialize, Serialize};
use servicekit::{ApiError, ApiJson, ApiQuery};
use wsfanout::{DeliveryReport, Outcome, OwnerAnswer};

use crate::app::AppState;
use crate::protocol::{self, resync_reason, EventKind};

/// The longest `event_id` a caller may give.
const MAX_EVENT_ID: usize = 200;

/// `?stream_id=…` (in the query so an L7 proxy can hash on it, as on subscribe).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    stream_id: Option<String>,
}

fn stream_of(query: &StreamQuery) -> Result<StreamId, ApiError> {
    let raw = query.stream_id.as_deref().ok_or_else(|| ApiError::bad_request("stream_id is required"))?;
    StreamId::parse(raw).map_err(|err| ApiError::bad_request(format!("stream_id: {err}")))
}

/// `POST /chat/forward-to-websocket` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardBody {
    #[serde(rename = "type")]
    kind: EventKind,
    message: ChatMessage,
    /// Optional: the change handler's dedup id, used for edits and deletes (a new
    /// message is always deduplicated by its message id).
    #[serde(default)]
    event_id: Option<String>,
}

/// What a forward achieved on this pod.
#[derive(Debug, Serialize)]
pub struct ForwardReport {
    stream_id: StreamId,
    connections: usize,
    delivered: usize,
    failed: usize,
}

fn validate(stream: StreamId, body: &ForwardBody) -> Result<(), ApiError> {
    let message = &body.message;
    if message.stream_id != stream {
        return Err(ApiError::bad_request("message.stream_id does not match the stream_id query parameter"));
    }
    message.check_consistent().map_err(|err| ApiError::bad_request(format!("message: {err}")))?;
    if let Some(id) = body.event_id.as_deref() {
        if id.is_empty() || id.len() > MAX_EVENT_ID || id.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "event_id must be 1 to {MAX_EVENT_ID} bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// `POST /chat/forward-to-websocket?stream_id=…`: `200` when every local socket of
/// the stream took the event (or there is none), `206` when some did not, `500`
/// when none did. The body reports the counts either way.
pub async fn forward(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<StreamQuery>,
    ApiJson(body): ApiJson<ForwardBody>,
) -> Result<Response, ApiError> {
    let stream = stream_of(&query)?;
    validate(stream, &body)?;
    let report = deliver(&state, stream, &body);
    Ok(answer(stream, &body.message.message_id.to_string(), report))
}

/// Queues a message event's frame to the stream's local sockets that may see it.
fn deliver(state: &AppState, stream: StreamId, body: &ForwardBody) -> DeliveryReport {
    let frame = protocol::event_frame(body.kind, &body.message, body.event_id.as_deref());
    // Only the sockets of exactly this message's pair, whatever else shares the key.
    let viewers = protocol::Viewers::of_message(&body.message);
    state.hub.broadcast_to(&stream, frame, |socket| viewers.admit(socket))
}

/// The forward's answer: `200`, `206` or `500` with the counts.
fn answer(stream: StreamId, what: &str, report: DeliveryReport) -> Response {
    let status = status_of(stream, what, &report);
    let body = ForwardReport {
        stream_id: stream,
        connections: report.connections,
        delivered: report.delivered,
        failed: report.failed,
    };
    (status, Json(body)).into_response()
}

/// `200` (every local socket, or none), `206` (some) or `500` (none took it).
fn status_of(stream: StreamId, what: &str, report: &DeliveryReport) -> StatusCode {
    let status = match report.outcome() {
        Outcome::Ok | Outcome::NoConnections => StatusCode::OK,
        Outcome::Partial => StatusCode::PARTIAL_CONTENT,
        Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status != StatusCode::OK {
        tracing::warn!(%stream, event = what, ?report, "forward not delivered to every socket");
    }
    status
}

/// The most events one `POST /chat/forward-batch` may carry.
pub const MAX_BATCH_EVENTS: usize = 1_000;

/// `POST /chat/forward-batch` body: message events of any streams, in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// Each a `ForwardBody` plus its `stream_id`; read one by one, so one event that
    /// does not parse is refused on its own (`400` in its result), not the batch.
    events: Vec<serde_json::Value>,
}

/// One event of a batch: `POST /chat/forward-to-websocket`'s body with its query's
/// `stream_id` added; split back into the two.
fn split_event(mut raw: serde_json::Value) -> Result<(StreamId, ForwardBody, Option<String>), ApiError> {
    let mut take = |field: &str| {
        raw.as_object_mut().and_then(|event| event.remove(field)).and_then(|v| v.as_str().map(str::to_owned))
    };
    let stream_id = take("stream_id");
    // The event's own trace (its record's), which the request's headers cannot carry
    // for several events at once.
    let traceparent = take("traceparent");
    let stream = stream_of(&StreamQuery { stream_id })?;
    let body = serde_json::from_value(raw).map_err(|err| ApiError::bad_request(format!("event: {err}")))?;
    Ok((stream, body, traceparent))
}

/// One event's result: the status its own forward would have answered, the counts,
/// and for a refused event the reason.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<StreamId>,
    connections: usize,
    delivered: usize,
    failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `{"results": [...]}`, one per event, in the order of the events.
#[derive(Debug, Serialize)]
pub struct BatchAnswer {
    results: Vec<BatchResult>,
}

impl BatchResult {
    fn refused(error: ApiError) -> Self {
        Self {
            status: error.status.as_u16(),
            stream_id: None,
            connections: 0,
            delivered: 0,
            failed: 0,
            error: Some(error.message),
        }
    }
}

/// `POST /chat/forward-batch`: several message events, each delivered exactly as
/// `POST /chat/forward-to-websocket?stream_id=…` would deliver it, in the order given,
/// and answered `200` with one result per event (`200`/`206`/`500`, or `400` for an
/// event refused on its own). The caller must send only events of streams whose
/// sockets are on this pod: the proxies hash each forward on its `stream_id`, and a
/// batch has no single one, so they do not route this path (docs/configuration.md,
/// `CHAT_WEBSOCKET_FORWARD_BATCH`).
pub async fn forward_batch(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiJson(body): ApiJson<BatchBody>,
) -> Result<Json<BatchAnswer>, ApiError> {
    if body.events.is_empty() || body.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::bad_request(format!("events must hold 1 to {MAX_BATCH_EVENTS} events")));
    }
    metrics::histogram!("chat_forward_batch_events").record(body.events.len() as f64);
    let results = body
        .events
        .into_iter()
        .map(|raw| {
            let (stream, body, traceparent) = match split_event(raw) {
                Ok(event) => event,
                Err(err) => return BatchResult::refused(err),
            };
            // Each event continues its own trace, as its single forward would.
            let span = tracing::info_span!(
                target: servicekit::trace::TARGET,
                "forward event",
                stream_id = %stream,
                trace_id = tracing::field::Empty,
            );
            servicekit::trace::adopt(&span, traceparent.as_deref());
            let _entered = span.enter();
            if let Err(err) = validate(stream, &body) {
                return BatchResult::refused(err);
            }
            let report = deliver(&state, stream, &body);
            let status = status_of(stream, &body.message.message_id.to_string(), &report);
            servicekit::trace::item_finished(status.as_u16());
            BatchResult {
                status: status.as_u16(),
                stream_id: Some(stream),
                connections: report.connections,
                delivered: report.delivered,
                failed: report.failed,
                error: None,
            }
        })
        .collect();
    Ok(Json(BatchAnswer { results }))
}

fn validate_event(stream: StreamId, event: &ConversationEvent) -> Result<(), ApiError> {
    if event.conversation_id != stream {
        return Err(ApiError::bad_request("conversation_id does not match the stream_id query parameter"));
    }
    let id = &event.event_id;
    if id.is_empty() || id.len() > MAX_EVENT_ID || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "event_id must be 1 to {MAX_EVENT_ID} bytes without control characters"
        )));
    }
    if event.kind == ConversationEventKind::Read && event.up_to.is_none() {
        return Err(ApiError::bad_request("a read event needs up_to"));
    }
    if event.kind.is_reaction() && (event.message_id.is_none() || event.emoji.is_none()) {
        return Err(ApiError::bad_request("a reaction event needs message_id and emoji"));
    }
    let per_message = event.kind == ConversationEventKind::Read || event.kind.is_reaction();
    if event.conversation_id.kind() != ConversationKind::Group && !per_message {
        return Err(ApiError::bad_request("only groups have membership and title changes"));
    }
    Ok(())
}

/// `POST /chat/forward-event?stream_id=…` with a `ConversationEvent`: its frame to
/// the conversation's sockets that may see it (`protocol::may_see_event`). For
/// `member_left` the subject's sockets get the frame as their last, after everything
/// queued before it, and are closed with 4004 (removed); from then on nothing of the
/// conversation reaches them. Same `200`/`206`/`500` answers as a message forward; a
/// retry neither repeats the frame nor the close.
pub async fn forward_event(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<StreamQuery>,
    ApiJson(event): ApiJson<ConversationEvent>,
) -> Result<Response, ApiError> {
    let stream = stream_of(&query)?;
    validate_event(stream, &event)?;
    let frame = protocol::conversation_frame(&event);
    let viewers = protocol::Viewers::of_event(&event);
    let report = if event.kind == ConversationEventKind::MemberLeft {
        let subject = event.user_id.as_str();
        let stayed =
            state.hub.broadcast_to(&stream, frame.clone(), |socket| socket != subject && viewers.admit(socket));
        let left = state.hub.send_last(&stream, frame, protocol::removed(), |socket| socket == subject);
        if left.connections > 0 {
            metrics::counter!("chat_removed_closes_total").increment(left.connections as u64);
        }
        DeliveryReport {
            connections: stayed.connections + left.connections,
            delivered: stayed.delivered + left.delivered,
            failed: stayed.failed + left.failed,
        }
    } else {
        state.hub.broadcast_to(&stream, frame, |socket| viewers.admit(socket))
    };
    Ok(answer(stream, &event.event_id, report))
}

/// `GET /chat/forward-to-websocket?stream_id=…`: which pod a forward for this stream
/// reaches. Other pods ask it through the proxy to find streams that moved away from
/// them (see `wsfanout::OwnershipCheck`).
pub async fn owner(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Json<OwnerAnswer>, ApiError> {
    let stream = stream_of(&query)?;
    Ok(Json(OwnerAnswer::of(&state.hub, &state.identity, &stream)))
}

/// What `close-stream` did.
#[derive(Debug, Serialize)]
pub struct CloseReport {
    stream_id: StreamId,
    closed: usize,
}

/// `POST /chat/close-stream?stream_id=…`: every local socket of the stream gets a
/// `resync` frame and close 4000 (the client fetches history and reconnects).
pub async fn close_stream(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Json<CloseReport>, ApiError> {
    let stream = stream_of(&query)?;
    let closed = state.hub.close_key(&stream, protocol::resync(resync_reason::STREAM_CLOSED));
    metrics::counter!("chat_stream_closes_total").increment(1);
    Ok(Json(CloseReport { stream_id: stream, closed }))
}
