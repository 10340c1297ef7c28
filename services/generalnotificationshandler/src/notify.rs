//! The internal notification endpoints: chat (from the change handler), conversation
//! events (membership, title, read markers: the user's inbox changed) and the three
//! domain kinds (purchase, payment reminder, shipping), each broadcast to every local
//! socket of one user.
//!
//! Why this module exists: the status codes here drive the callers' retries, exactly as
//! chat forwarding does: `200` means every local socket of the user has the
//! notification queued (or the user has none here), `206` some do, `500` none does.
//! Every body is typed and checked before anything is sent, so a refused call reaches
//! no one.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Json;
use chatauth::ServiceCaller;
use chatstream::domain::{DomainDocument, DomainKind};
use chatstream::{ChatMessage, ConversationEvent, ConversationEventKind, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use servicekit::{ApiError, ApiJson, ApiQuery};
use wsfanout::{Frame, Outcome};

use crate::app::{AppState, UserQuery};
use crate::protocol::{self, Kind};

/// Counter, `kind` and `outcome` (`ok`, `no_connections`, `partial`, `failed`, `invalid`).
pub const METRIC_NOTIFICATIONS: &str = "notifications_total";

/// `POST /notifications/chat` body, as the change handler sends it (other fields are
/// ignored, so the caller may add some).
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub(crate) message: ChatMessage,
}

/// What a notification achieved on this pod.
#[derive(Debug, Serialize)]
pub struct NotifyReport {
    user_id: UserId,
    kind: Kind,
    connections: usize,
    delivered: usize,
    failed: usize,
}

pub(crate) fn invalid(kind: Kind, err: ApiError) -> ApiError {
    metrics::counter!(METRIC_NOTIFICATIONS, "kind" => kind.as_str(), "outcome" => "invalid").increment(1);
    tracing::debug!(kind = kind.as_str(), error = %err, "notification refused");
    err
}

pub(crate) fn check_chat(user: &UserId, message: &ChatMessage) -> Result<(), ApiError> {
    if !message.addressees().any(|addressee| addressee == user) {
        return Err(ApiError::bad_request(
            "the message is not addressed to the user_id query parameter (its receiver_id, or for a group one of \
             its recipients)",
        ));
    }
    message.check_consistent().map_err(|err| ApiError::bad_request(format!("message: {err}")))?;
    Ok(())
}

/// `POST /notifications/conversation` body, as the change handler sends it.
#[derive(Debug, Deserialize)]
pub struct ConversationBody {
    pub(crate) event: ConversationEvent,
}

/// A conversation event goes only to the users it concerns (the members after the
/// change and its subject); a read marker only to the reader (their other devices).
pub(crate) fn check_conversation(user: &UserId, event: &ConversationEvent) -> Result<(), ApiError> {
    let concerned = match event.kind {
        ConversationEventKind::Read => &event.user_id == user,
        _ => event.audience().contains(user),
    };
    if !concerned {
        return Err(ApiError::bad_request("the event does not concern the user_id query parameter"));
    }
    Ok(())
}

pub(crate) fn parse_domain(kind: DomainKind, user: &UserId, body: Value) -> Result<DomainDocument, ApiError> {
    let document = DomainDocument::from_value(kind, body).map_err(|err| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", format!("{} document: {err}", kind.name()))
    })?;
    if document.user_id() != user {
        return Err(ApiError::bad_request("the document's user_id does not match the user_id query parameter"));
    }
    Ok(document)
}

/// Offers `frame` to every local socket of `user` and answers with the report.
fn deliver(state: &AppState, user: UserId, kind: Kind, frame: Frame) -> Response {
    let report = state.hub.broadcast(&user, frame);
    let outcome = report.outcome();
    let status = match outcome {
        Outcome::Ok | Outcome::NoConnections => StatusCode::OK,
        Outcome::Partial => StatusCode::PARTIAL_CONTENT,
        Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    metrics::counter!(METRIC_NOTIFICATIONS, "kind" => kind.as_str(), "outcome" => outcome.as_str()).increment(1);
    if status != StatusCode::OK {
        tracing::warn!(%user, kind = kind.as_str(), ?report, "notification not delivered to every socket");
    }
    let body = NotifyReport {
        user_id: user,
        kind,
        connections: report.connections,
        delivered: report.delivered,
        failed: report.failed,
    };
    (status, Json(body)).into_response()
}

/// `POST /notifications/chat?user_id=<receiver>` with `{"message": ChatMessage}`.
pub async fn chat(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<UserQuery>,
    body: Result<ApiJson<ChatBody>, ApiError>,
) -> Result<Response, ApiError> {
    let user = query.user().map_err(|err| invalid(Kind::Chat, err))?;
    let ApiJson(body) = body.map_err(|err| invalid(Kind::Chat, err))?;
    check_chat(&user, &body.message).map_err(|err| invalid(Kind::Chat, err))?;
    let frame = protocol::notification(Kind::Chat, protocol::chat_event_id(&body.message), &body.message);
    Ok(deliver(&state, user, Kind::Chat, frame))
}

/// `POST /notifications/conversation?user_id=<user>` with `{"event": ConversationEvent}`.
pub async fn conversation(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<UserQuery>,
    body: Result<ApiJson<ConversationBody>, ApiError>,
) -> Result<Response, ApiError> {
    let user = query.user().map_err(|err| invalid(Kind::Conversation, err))?;
    let ApiJson(body) = body.map_err(|err| invalid(Kind::Conversation, err))?;
    check_conversation(&user, &body.event).map_err(|err| invalid(Kind::Conversation, err))?;
    let frame = protocol::conversation_event(&body.event);
    Ok(deliver(&state, user, Kind::Conversation, frame))
}

/// `POST /notifications/{purchase,payment-reminder,shipping}?user_id=…` with the document.
async fn domain(
    kind: DomainKind,
    state: AppState,
    query: UserQuery,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Response, ApiError> {
    let label = match kind {
        DomainKind::Purchase => Kind::Purchase,
        DomainKind::PaymentReminder => Kind::PaymentReminder,
        DomainKind::Shipping => Kind::Shipping,
    };
    let user = query.user().map_err(|err| invalid(label, err))?;
    let ApiJson(body) = body.map_err(|err| invalid(label, err))?;
    let document = parse_domain(kind, &user, body).map_err(|err| invalid(label, err))?;
    let frame = protocol::notification(label, protocol::domain_event_id(&document), &document);
    Ok(deliver(&state, user, label, frame))
}

/// The route of one domain kind.
pub fn domain_route(kind: DomainKind) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              _caller: ServiceCaller,
              ApiQuery(query): ApiQuery<UserQuery>,
              body: Result<ApiJson<Value>, ApiError>| domain(kind, state, query, body),
    )
}

#[cfg(test)]
mod tests {
    use chatstream::{MessageContent, MessageId, StreamId};
    use serde_json::json;

    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    #[test]
    fn a_chat_notification_goes_to_the_receiver_only() {
        let (alice, bob) = (user("alice"), user("bob"));
        let message = ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&alice, &bob),
            sender_id: bob.clone(),
            receiver_id: Some(alice.clone()),
            recipients: Vec::new(),
            content: MessageContent::parse("hi").expect("valid"),
            created_at: "2025-01-01T12:00:00Z".parse().expect("time"),
            state: Default::default(),
        };
        assert!(check_chat(&alice, &message).is_ok());
        assert_eq!(check_chat(&bob, &message).err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
        let forged = ChatMessage { stream_id: StreamId::for_pair(&alice, &user("carol")), ..message };
        assert_eq!(check_chat(&alice, &forged).err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn a_conversation_event_goes_to_the_users_it_concerns_and_a_read_to_the_reader_only() {
        let event = ConversationEvent {
            event_id: MessageId::new().to_string(),
            kind: ConversationEventKind::MemberLeft,
            conversation_id: StreamId::new_group(),
            user_id: user("carol"),
            actor_id: user("alice"),
            members: vec![user("alice"), user("bob")],
            title: None,
            up_to: None,
            reason: Some("removed".into()),
            message_id: None,
            emoji: None,
            at: "2025-01-01T12:00:00Z".parse().expect("time"),
        };
        for who in ["alice", "bob", "carol"] {
            assert!(check_conversation(&user(who), &event).is_ok(), "{who}");
        }
        assert_eq!(check_conversation(&user("mallory"), &event).err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
        let read = ConversationEvent { kind: ConversationEventKind::Read, up_to: Some(MessageId::new()), ..event };
        assert!(check_conversation(&user("carol"), &read).is_ok());
        assert_eq!(check_conversation(&user("alice"), &read).err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn domain_documents_are_typed_and_owned_by_the_user() {
        let purchase = json!({"purchase_id": "p-1", "user_id": "alice", "status": "paid", "amount_minor": 1999,
            "currency": "EUR", "updated_at": "2025-01-01T12:00:00Z"});
        let document = parse_domain(DomainKind::Purchase, &user("alice"), purchase.clone()).expect("valid");
        assert_eq!(document.id(), "p-1");
        let status = |kind, who: &str, body: Value| parse_domain(kind, &user(who), body).err().map(|e| e.status);
        assert_eq!(status(DomainKind::Purchase, "bob", purchase.clone()), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(DomainKind::Shipping, "alice", purchase.clone()), Some(StatusCode::UNPROCESSABLE_ENTITY));
        let mut bad_currency = purchase;
        bad_currency["currency"] = json!("euro");
        assert_eq!(status(DomainKind::Purchase, "alice", bad_currency), Some(StatusCode::UNPROCESSABLE_ENTITY));
    }
}
