//! The internal endpoints the change handler calls: forward an event to a stream's
//! sockets, and close a stream's sockets after delivery gave up (failover).
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
use chatstream::{ChatMessage, StreamId};
use serde::{Deserialize, Serialize};
use servicekit::{ApiError, ApiJson, ApiQuery};
use wsfanout::{Outcome, OwnerAnswer};

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
    let frame = protocol::event_frame(body.kind, &body.message, body.event_id.as_deref());
    // Only the sockets of exactly this message's pair, whatever else shares the key.
    let report = state.hub.broadcast_to(&stream, frame, |socket| protocol::may_see(&body.message, socket));
    let status = match report.outcome() {
        Outcome::Ok | Outcome::NoConnections => StatusCode::OK,
        Outcome::Partial => StatusCode::PARTIAL_CONTENT,
        Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status != StatusCode::OK {
        tracing::warn!(%stream, message_id = %body.message.message_id, ?report, "forward not delivered to every socket");
    }
    let body = ForwardReport {
        stream_id: stream,
        connections: report.connections,
        delivered: report.delivered,
        failed: report.failed,
    };
    Ok((status, Json(body)).into_response())
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
