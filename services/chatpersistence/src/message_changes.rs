//! Changes to a sent message: edit, delete, react.
//!
//! Why this module exists: a message is written once, but its sender may correct it
//! (within `EDIT_WINDOW`), its sender or the group's owner may delete it, and
//! participants react to it. Each change is a write to the stored message, captured
//! and delivered like the message itself (edits and deletions as change events of
//! the message, reactions as conversation events), so every socket sees it live and
//! a reconnecting client sees it in its replay. The rules:
//! - Someone who cannot see a message gets `404`, the same as for a message that
//!   does not exist. Only the sender edits; the sender or a group's owner deletes.
//! - A deletion leaves a tombstone: the content is removed, `deleted_at` is set, the
//!   reactions go. An edit racing a deletion ends deleted (edits only match a message
//!   that is not deleted). Repeating an edit or a deletion changes nothing.
//! - One reaction of each emoji per user (`$addToSet`); the allowed set is
//!   [`ALLOWED_EMOJI`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, put};
use axum::{Json, Router};
use chatauth::AuthUser;
use chatstream::{ChatMessage, ConversationKind, MessageContent, MessageId, UserId};
use chrono::Utc;
use serde::Deserialize;
use servicekit::{ApiError, ApiJson};

use crate::api::{conversation_error, store_error, AppState};
use crate::conversations::ConversationDoc;
use crate::store::MessageChange;

/// The reactions a client may use (a bounded set, so counts stay meaningful and no
/// one stores arbitrary text through them).
pub const ALLOWED_EMOJI: &[&str] = &["👍", "👎", "❤️", "😂", "😮", "😢", "🙏", "🎉", "🔥", "👀", "✅"];

pub fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/chat/messages/{id}", patch(edit).delete(delete))
        .route("/chat/messages/{id}/reactions/{emoji}", put(react).delete(unreact))
}

fn not_found() -> ApiError {
    ApiError::not_found("no such message")
}

/// The message and its conversation, if `caller` may see it (`404` otherwise, the
/// same answer as for a message that does not exist).
async fn visible(
    state: &AppState,
    caller: &UserId,
    raw_id: &str,
) -> Result<(ChatMessage, Option<ConversationDoc>), ApiError> {
    let id = MessageId::parse(raw_id).map_err(|_| not_found())?;
    let message = state.store().message(&id).await.map_err(store_error)?.ok_or_else(not_found)?;
    let conversation = match message.stream_id.kind() {
        ConversationKind::Group => match state.conversations.for_member(&message.stream_id, caller).await {
            Ok(conversation) => Some(conversation),
            Err(crate::conversations::ConversationError::NotAMember) => return Err(not_found()),
            Err(err) => return Err(conversation_error(err)),
        },
        _ if !message.involves(caller) => return Err(not_found()),
        // A pair's conversation document (absent only for a legacy id two pairs share).
        _ => state.conversations.get(&message.stream_id).await.map_err(store_error)?.filter(|c| c.has_member(caller)),
    };
    Ok((message, conversation))
}

fn deleted() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "message_deleted", "the message was deleted")
}

/// Applies `change` under the conversation's write lock and hands the result to
/// the relay; `None` when the message was deleted meanwhile.
async fn apply(
    state: &AppState,
    message: &ChatMessage,
    change: MessageChange,
) -> Result<Option<ChatMessage>, ApiError> {
    let _serial = state.lock_stream(&message.stream_id).await?;
    state.uncache(&message.stream_id, true).await?;
    let now = Utc::now().timestamp_millis();
    let deleted_at = matches!(change, MessageChange::Delete).then_some(now);
    let changed = state.store().change(&message.message_id, change, now).await.map_err(store_error);
    state.uncache(&message.stream_id, false).await?;
    if !changed? {
        return Ok(None);
    }
    let changed = state.store().message(&message.message_id).await.map_err(store_error)?.ok_or_else(not_found)?;
    // The inbox's last message follows; a failure here leaves only a stale
    // excerpt (the next message replaces it), never a lost change.
    if let Err(err) = state.conversations.revise_last_message(&changed, deleted_at).await {
        tracing::warn!(error = %err, "could not revise the conversation's last message");
    }
    state.offer(&changed);
    Ok(Some(changed))
}

/// `PATCH /chat/messages/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    content: String,
}

async fn edit(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Edit>,
) -> Result<Response, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let content = MessageContent::parse(&body.content).map_err(|e| ApiError::bad_request(format!("content: {e}")))?;
    let (message, _) = visible(&state, &caller, &id).await?;
    if message.sender_id != caller {
        return Err(ApiError::forbidden("only the sender may edit a message"));
    }
    if message.state.deleted_at.is_some() {
        return Err(deleted());
    }
    let age = Utc::now().signed_duration_since(message.created_at).to_std().unwrap_or_default();
    if age > state.edit_window() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "edit_window_passed",
            format!("messages can be edited for {} after sending", humantime::format_duration(state.edit_window())),
        ));
    }
    if message.content == content {
        // A retried edit: nothing changes twice.
        return Ok(Json(message).into_response());
    }
    match apply(&state, &message, MessageChange::Edit(content)).await? {
        Some(changed) => {
            metrics::counter!("message_edits_total").increment(1);
            Ok(Json(changed).into_response())
        }
        None => Err(deleted()),
    }
}

async fn delete(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let (message, conversation) = visible(&state, &caller, &id).await?;
    let owner =
        conversation.as_ref().is_some_and(|c| c.kind == "group" && c.owner_id.as_deref() == Some(caller.as_str()));
    if message.sender_id != caller && !owner {
        return Err(ApiError::forbidden("only the sender or the group's owner may delete a message"));
    }
    if message.state.deleted_at.is_none() && apply(&state, &message, MessageChange::Delete).await?.is_some() {
        metrics::counter!("message_deletions_total").increment(1);
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn reaction(
    state: AppState,
    caller: UserId,
    id: String,
    emoji: String,
    add: bool,
) -> Result<StatusCode, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    if !ALLOWED_EMOJI.contains(&emoji.as_str()) {
        return Err(ApiError::bad_request(format!("emoji must be one of {}", ALLOWED_EMOJI.join(" "))));
    }
    let (message, conversation) = visible(&state, &caller, &id).await?;
    if message.state.deleted_at.is_some() {
        return Err(deleted());
    }
    let _serial = state.lock_stream(&message.stream_id).await?;
    state.uncache(&message.stream_id, true).await?;
    let now = Utc::now().timestamp_millis();
    let changed = state.store().react(&message.message_id, &caller, &emoji, add, now).await.map_err(store_error);
    state.uncache(&message.stream_id, false).await?;
    let changed = changed?;
    if changed {
        if let Some(conversation) = conversation {
            state
                .conversations
                .reaction_event(&conversation, &caller, message.message_id, &emoji, add)
                .await
                .map_err(conversation_error)?;
        }
        metrics::counter!("message_reactions_total", "change" => if add { "added" } else { "removed" }).increment(1);
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn react(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path((id, emoji)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    reaction(state, caller, id, emoji, true).await
}

async fn unreact(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path((id, emoji)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    reaction(state, caller, id, emoji, false).await
}
