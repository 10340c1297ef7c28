//! The conversation endpoints: create a group, change its members and title, list
//! the caller's conversations (the inbox), move a read marker; and the internal
//! member list the socket pods ask before opening a group socket.
//!
//! Why this module exists: who may do what to a conversation is decided here, from
//! the stored conversation and the caller's token, never from an id the client
//! sent. A stranger and an unknown conversation get the same `403 not_a_member`,
//! so the endpoints reveal nothing about conversations one is not part of.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chatauth::{AuthUser, ServiceCaller};
use chatstream::{MessageId, StreamId, UserId};
use serde::{Deserialize, Serialize};
use servicekit::{ApiError, ApiJson, ApiQuery};

use crate::api::{conversation_error, AppState};
use crate::conversations::{ConversationDoc, InboxCursor, LastMessage};
use crate::read_limit::ReadUser;

/// The longest group title, in characters.
const MAX_TITLE_CHARS: usize = 100;
/// Inbox page sizes.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 200;

pub fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/chat/conversations", get(list).post(create))
        .route("/chat/conversations/{id}", get(show).patch(rename))
        .route("/chat/conversations/{id}/members", post(add_member))
        .route("/chat/conversations/{id}/members/{user_id}", delete(remove_member))
        .route("/chat/conversations/{id}/read", post(read))
        .route("/presence", get(presence_of))
}

pub fn internal_routes() -> Router<AppState> {
    Router::new().route("/chat/conversations/{id}/members", get(internal_members))
}

fn invalid(field: &str, err: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{field}: {err}"))
}

/// `GET /presence?user_id=…`.
#[derive(Debug, Deserialize)]
struct PresenceQuery {
    user_id: Option<String>,
}

/// The answer: is the user online (a notification socket open on any pod).
#[derive(Debug, Serialize)]
struct PresenceView {
    user_id: UserId,
    online: bool,
}

/// Public presence look-up, private by rule: the caller may ask about themselves
/// and about people they share a conversation with (a pair that exchanged a
/// message, or a group both are current members of). Anyone else gets `403
/// not_a_contact`, whether online or not, so presence tells a stranger nothing.
async fn presence_of(
    State(state): State<AppState>,
    ReadUser(caller): ReadUser,
    ApiQuery(query): ApiQuery<PresenceQuery>,
) -> Result<Json<PresenceView>, ApiError> {
    let raw = query.user_id.ok_or_else(|| ApiError::bad_request("user_id: required"))?;
    let user = UserId::parse(&raw).map_err(|e| invalid("user_id", e))?;
    let shared = state
        .conversations
        .share_a_conversation(state.format(), &caller, &user)
        .await
        .map_err(crate::api::store_error)?;
    if !shared {
        metrics::counter!("presence_lookups_refused_total").increment(1);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_a_contact",
            "presence is shown only for people you share a conversation with",
        ));
    }
    let Some(presence) = &state.presence else {
        return Err(ApiError::unavailable("presence is not configured", std::time::Duration::from_secs(30)));
    };
    let online = presence.is_online(user.as_str()).await;
    Ok(Json(PresenceView { user_id: user, online }))
}

/// The most members whose presence one answer looks up.
const MAX_PRESENCE_LOOKUPS: usize = 2000;

/// Which of the members of `conversations` are online (nobody without presence).
async fn online<'a>(state: &AppState, conversations: impl IntoIterator<Item = &'a ConversationDoc>) -> HashSet<String> {
    let Some(presence) = &state.presence else { return HashSet::new() };
    let mut users: Vec<&str> = conversations.into_iter().flat_map(|c| c.members.iter().map(String::as_str)).collect();
    users.sort_unstable();
    users.dedup();
    users.truncate(MAX_PRESENCE_LOOKUPS);
    presence.online_of(users).await
}

fn conversation_id(raw: &str) -> Result<StreamId, ApiError> {
    StreamId::parse(raw).map_err(|e| invalid("conversation_id", e))
}

fn title(raw: &str) -> Result<String, ApiError> {
    let trimmed = raw.trim();
    let chars = trimmed.chars().count();
    if chars == 0 || chars > MAX_TITLE_CHARS || trimmed.chars().any(char::is_control) {
        return Err(invalid("title", format!("must be 1 to {MAX_TITLE_CHARS} characters without control characters")));
    }
    Ok(trimmed.to_owned())
}

/// One conversation as the caller sees it.
#[derive(Debug, Serialize)]
pub struct ConversationView {
    conversation_id: String,
    /// `direct` or `group`.
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    /// The other participant of a direct conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner_id: Option<String>,
    members: Vec<String>,
    /// The members with a notification socket open right now (empty without presence).
    online: Vec<String>,
    last_message: Option<LastMessage>,
    unread_count: i64,
    /// Epoch milliseconds of the last activity.
    updated_at: i64,
}

impl ConversationView {
    fn of(conversation: ConversationDoc, caller: &UserId, online: &HashSet<String>) -> Self {
        let online = conversation.members.iter().filter(|m| online.contains(m.as_str())).cloned().collect();
        let unread_count = conversation.unread(caller);
        let peer_id = (conversation.kind == "direct")
            .then(|| conversation.members.iter().find(|m| m.as_str() != caller.as_str()).cloned())
            .flatten();
        Self {
            conversation_id: conversation.id,
            kind: conversation.kind,
            title: conversation.title,
            peer_id,
            owner_id: conversation.owner_id,
            members: conversation.members,
            online,
            last_message: conversation.last_message,
            unread_count,
            updated_at: conversation.updated_at,
        }
    }
}

/// `POST /chat/conversations` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    title: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiJson(body): ApiJson<CreateGroup>,
) -> Result<Response, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let title = title(&body.title)?;
    let mut members = vec![caller.clone()];
    for raw in &body.members {
        let member = UserId::parse(raw).map_err(|e| invalid("members", e))?;
        if !members.contains(&member) {
            members.push(member);
        }
    }
    if members.len() > state.max_members {
        return Err(invalid("members", format!("a group has at most {} members", state.max_members)));
    }
    let created = state.conversations.create_group(&caller, &title, &members).await.map_err(conversation_error)?;
    metrics::counter!("conversations_created_total").increment(1);
    let online = online(&state, [&created]).await;
    Ok((StatusCode::CREATED, Json(ConversationView::of(created, &caller, &online))).into_response())
}

async fn show(
    State(state): State<AppState>,
    ReadUser(caller): ReadUser,
    Path(id): Path<String>,
) -> Result<Json<ConversationView>, ApiError> {
    let id = conversation_id(&id)?;
    let conversation = state.conversations.for_member(&id, &caller).await.map_err(conversation_error)?;
    let online = online(&state, [&conversation]).await;
    Ok(Json(ConversationView::of(conversation, &caller, &online)))
}

/// `PATCH /chat/conversations/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    title: String,
}

async fn rename(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Rename>,
) -> Result<Json<ConversationView>, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let id = conversation_id(&id)?;
    let title = title(&body.title)?;
    let updated = state.conversations.rename(&id, &caller, &title).await.map_err(conversation_error)?;
    Ok(Json(ConversationView::of(updated, &caller, &HashSet::new())))
}

/// `POST /chat/conversations/{id}/members` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    user_id: String,
}

async fn add_member(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AddMember>,
) -> Result<Json<ConversationView>, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let id = conversation_id(&id)?;
    let user = UserId::parse(&body.user_id).map_err(|e| invalid("user_id", e))?;
    // Under the conversation's write lock, like posting: a message is accepted
    // either before or after a membership change, never across it.
    let _serial = state.lock_stream(&id).await?;
    let updated =
        state.conversations.add_member(&id, &caller, &user, state.max_members).await.map_err(conversation_error)?;
    Ok(Json(ConversationView::of(updated, &caller, &HashSet::new())))
}

async fn remove_member(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let id = conversation_id(&id)?;
    let user = UserId::parse(&user).map_err(|e| invalid("user_id", e))?;
    let _serial = state.lock_stream(&id).await?;
    state.conversations.remove_member(&id, &caller, &user).await.map_err(conversation_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /chat/conversations/{id}/read` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Read {
    up_to: String,
}

/// What a read marker move answers.
#[derive(Debug, Serialize)]
pub struct ReadState {
    conversation_id: String,
    /// Whether the marker moved (a marker never moves back).
    moved: bool,
    unread_count: i64,
}

async fn read(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Read>,
) -> Result<Json<ReadState>, ApiError> {
    state.post_limiter().admit(&caller, "writes")?;
    let id = conversation_id(&id)?;
    let up_to = MessageId::parse(&body.up_to).map_err(|e| invalid("up_to", e))?;
    let conversation = state.conversations.for_member(&id, &caller).await.map_err(conversation_error)?;
    let seq = state
        .store()
        .message_seq(&id, &up_to)
        .await
        .map_err(crate::api::store_error)?
        .ok_or_else(|| invalid("up_to", "is not a message of this conversation"))?;
    let moved = state.conversations.mark_read(&conversation, &caller, up_to, seq).await.map_err(conversation_error)?;
    let now = state.conversations.for_member(&id, &caller).await.map_err(conversation_error)?;
    Ok(Json(ReadState { conversation_id: id.to_string(), moved, unread_count: now.unread(&caller) }))
}

/// `GET /chat/conversations` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    before: Option<String>,
}

/// One inbox page.
#[derive(Debug, Serialize)]
pub struct ListPage {
    conversations: Vec<ConversationView>,
    /// Pass as `before` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

fn parse_cursor(raw: &str) -> Result<InboxCursor, ApiError> {
    let bad = || invalid("before", "is not a cursor returned by this endpoint");
    let (at, id) = raw.split_once('_').ok_or_else(bad)?;
    let activity_at = at.parse::<i64>().map_err(|_| bad())?;
    let conversation_id = StreamId::parse(id).map_err(|_| bad())?.to_string();
    Ok(InboxCursor { activity_at, conversation_id })
}

async fn list(
    State(state): State<AppState>,
    ReadUser(caller): ReadUser,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<ListPage>, ApiError> {
    let limit = match query.limit {
        Some(0) => return Err(invalid("limit", "must be at least 1")),
        Some(n) => n.min(MAX_PAGE),
        None => DEFAULT_PAGE,
    };
    let before = query.before.as_deref().map(parse_cursor).transpose()?;
    let page = state.conversations.inbox(&caller, before.as_ref(), limit).await.map_err(crate::api::store_error)?;
    let next = if page.has_more {
        page.rows.last().map(|(row, _)| format!("{}_{}", row.activity_at, row.conversation_id))
    } else {
        None
    };
    let online = online(&state, page.rows.iter().map(|(_, conversation)| conversation)).await;
    // In the list, `updated_at` is the activity the list is ordered by (the
    // memberships' batched `activity_at`), so order, cursor and field agree.
    let conversations = page
        .rows
        .into_iter()
        .map(|(row, conversation)| {
            let mut view = ConversationView::of(conversation, &caller, &online);
            view.updated_at = row.activity_at;
            view
        })
        .collect();
    Ok(Json(ListPage { conversations, next }))
}

/// What the socket pods learn before opening a group socket.
#[derive(Debug, Serialize)]
pub struct Members {
    conversation_id: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner_id: Option<String>,
    members: Vec<String>,
}

async fn internal_members(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    Path(id): Path<String>,
) -> Result<Json<Members>, ApiError> {
    let id = conversation_id(&id)?;
    let conversation = state
        .conversations
        .get(&id)
        .await
        .map_err(crate::api::store_error)?
        .ok_or_else(|| ApiError::not_found("no such conversation"))?;
    Ok(Json(Members {
        conversation_id: conversation.id,
        kind: conversation.kind,
        title: conversation.title,
        owner_id: conversation.owner_id,
        members: conversation.members,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_and_cursors_are_checked() {
        assert_eq!(title("  team  ").ok().as_deref(), Some("team"));
        assert!(title("").is_err());
        assert!(title(&"x".repeat(101)).is_err());
        assert!(title("a\u{7}b").is_err());
        let group = StreamId::new_group();
        let cursor = parse_cursor(&format!("1700000000000_{group}")).expect("valid");
        assert_eq!(cursor.activity_at, 1_700_000_000_000);
        assert_eq!(cursor.conversation_id, group.to_string());
        assert!(parse_cursor("nope").is_err());
        assert!(parse_cursor("12_notanid").is_err());
    }
}
