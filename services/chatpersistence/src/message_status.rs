//! `GET /chat/messages/{id}`: one message and whether it is `queued` (accepted in
//! write-behind mode, not in MongoDB yet) or `stored`.
//!
//! Why this module exists: a `202` promises the message will be stored; the
//! client needs a way to see that promise kept (and a message id to poll with),
//! in either write mode. Who may see it is the same rule as everywhere: its sender
//! and receiver, a group's current members; anyone else gets the same `404` as
//! for a message that does not exist.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use chatstream::{ChatMessage, ConversationKind, MessageId, UserId};
use serde_json::Value;
use servicekit::ApiError;

use crate::api::{conversation_error, store_error, AppState};
use crate::conversations::ConversationError;
use crate::read_limit::ReadUser;

pub fn public_routes() -> Router<AppState> {
    Router::new().route("/chat/messages/{id}", get(status))
}

fn not_found() -> ApiError {
    ApiError::not_found("no such message")
}

async fn may_see(state: &AppState, caller: &UserId, message: &ChatMessage) -> Result<bool, ApiError> {
    if message.sender_id == *caller || message.receiver_id.as_ref() == Some(caller) {
        return Ok(true);
    }
    if message.stream_id.kind() != ConversationKind::Group {
        return Ok(false);
    }
    match state.conversations.for_member(&message.stream_id, caller).await {
        Ok(_) => Ok(true),
        Err(ConversationError::NotAMember) => Ok(false),
        Err(err) => Err(conversation_error(err)),
    }
}

/// `{status: "queued" | "stored", message}`. The queue is asked first: a message
/// leaves it only after MongoDB has it, so one of the two always answers.
async fn status(
    State(state): State<AppState>,
    ReadUser(caller): ReadUser,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = MessageId::parse(&raw).map_err(|_| not_found())?;
    let mut found = None;
    if let Some(queue) = &state.queue {
        match queue.queued(&id).await {
            Ok(Some(message)) => found = Some(("queued", message)),
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "message status: queue unreachable, asking MongoDB"),
        }
    }
    if found.is_none() {
        found = state.store().message(&id).await.map_err(store_error)?.map(|m| ("stored", m));
    }
    let Some((status, message)) = found else { return Err(not_found()) };
    if !may_see(&state, &caller, &message).await? {
        return Err(not_found());
    }
    Ok(Json(serde_json::json!({ "status": status, "message": message })))
}
