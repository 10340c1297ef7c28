//! `POST /chat/bot-messages` (internal listener, service token): a bot's reply.
//!
//! Why this module exists: a bot (a user id in `BOTS`) has no JWT; its answers are
//! computed by the change handler's bot target, which posts them here. The reply goes
//! through exactly the same write path as `POST /chat/messages`
//! (`api::write_message`: validation, group membership under the conversation's
//! write lock, the conversation counter, idempotency by `client_message_id`, the
//! outbox), so it is captured and delivered like any message and a retried reply
//! writes nothing twice. This module only adds the one rule of its own: the sender
//! must be a configured bot, so the service token cannot be used to post as a person.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use chatauth::ServiceCaller;
use chatstream::UserId;
use servicekit::{ApiError, ApiJson};

use crate::api::{write_message, AppState, PostMessage};

/// Parses `BOTS` (comma-separated user ids; empty: no bots); the error names the variable.
pub fn parse_bots(raw: &str) -> Result<Vec<UserId>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(|id| UserId::parse(id).map_err(|e| format!("BOTS: `{id}` is not a valid user id: {e}")))
        .collect()
}

/// The bot routes of the internal listener.
pub fn internal_routes() -> Router<AppState> {
    Router::new().route("/chat/bot-messages", post(post_bot_message))
}

/// The body is `POST /chat/messages`'s (`sender_id`: the bot; `receiver_id` or
/// `conversation_id`; `content`; `client_message_id`, by convention
/// `bot-reply:<message id answered>`). No per-user rate limit: the change handler
/// posts at most one reply per user message, and the user's post was limited.
async fn post_bot_message(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiJson(body): ApiJson<PostMessage>,
) -> Result<Response, ApiError> {
    let sender = UserId::parse(&body.sender_id).map_err(|e| ApiError::bad_request(format!("sender_id: {e}")))?;
    if !state.bots.contains(&sender) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_a_bot", "sender_id is not a configured bot (BOTS)"));
    }
    metrics::counter!("bot_messages_total").increment(1);
    write_message(&state, &sender, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bots_parse_from_a_comma_separated_list() {
        assert!(parse_bots("").expect("empty").is_empty());
        let bots = parse_bots(" assistant , helper,").expect("valid");
        assert_eq!(bots.iter().map(UserId::as_str).collect::<Vec<_>>(), ["assistant", "helper"]);
        let err = parse_bots("ok,not valid").expect_err("space");
        assert!(err.contains("BOTS: `not valid`"), "{err}");
    }
}
