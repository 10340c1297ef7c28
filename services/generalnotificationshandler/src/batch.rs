//! `POST /notifications/batch` (internal): many users' notifications in one request.
//!
//! Why this module exists: one internal `POST` per frame made the HTTP request, not the
//! broadcast, the cost of a notification (a group message to 1,000 members was 1,000
//! requests). A batch carries up to `NOTIFICATIONS_BATCH_MAX_ITEMS` items, each one
//! user's notification of one kind, and every item is checked and delivered exactly as
//! the single endpoint of its kind would (same frame, same event id, so the per-socket
//! memory of event ids drops a retried item as it drops a retried single call). A body
//! that many items share (a group message) is sent once in `shared` and referenced by
//! index; it is parsed and its frame serialized once for all of them.
//!
//! The answer is per item, in the request's order: `ok` / `no_connections` are done,
//! `partial` / `failed` mean "retry this item", `invalid` will never succeed. For a user
//! without a socket here the pod reads presence (one `MGET` for all of them) and says
//! whether the user is offline (`no_connections`), holds sockets on another pod
//! (`elsewhere`, with that pod's instance id in `owner`, so the caller can send the item
//! where the proxy routes that user) or whether that is unknown (`unknown`: Redis did
//! not answer; the caller sends the item through the per-user route instead).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chatauth::ServiceCaller;
use chatstream::domain::{DomainDocument, DomainKind};
use chatstream::UserId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use servicekit::{ApiError, ApiJson};
use wsfanout::{Frame, Outcome};

use crate::app::AppState;
use crate::notify::{check_chat, check_conversation, ChatBody, ConversationBody, METRIC_NOTIFICATIONS};
use crate::protocol::{self, Kind};

/// Counter, `outcome` (`accepted`, `refused`): batch requests by result.
pub const METRIC_BATCHES: &str = "notification_batches_total";

/// `POST /notifications/batch` body.
#[derive(Debug, Deserialize)]
pub struct BatchBody {
    /// Bodies several items share, referenced by index from an item's `shared`.
    #[serde(default)]
    shared: Vec<Value>,
    items: Vec<ItemIn>,
}

/// One notification: a user, a kind and the body the single endpoint of that kind
/// takes (`{"message"}` for chat, `{"event"}` for conversation, the document for the
/// domain kinds), inline in `body` or as an index into `shared`.
#[derive(Debug, Deserialize)]
struct ItemIn {
    user_id: String,
    kind: Kind,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    shared: Option<usize>,
}

/// A per-item refusal, as the single endpoint would have answered it.
#[derive(Debug, Serialize)]
struct ItemError {
    code: &'static str,
    message: String,
}

/// What one item achieved.
#[derive(Debug, Serialize)]
pub struct ItemResult {
    user_id: String,
    kind: Kind,
    /// The status the single endpoint would have answered.
    status: u16,
    /// `ok`, `no_connections`, `elsewhere`, `unknown`, `partial`, `failed`, `invalid`.
    outcome: &'static str,
    connections: usize,
    delivered: usize,
    failed: usize,
    /// For `elsewhere`: the instance id holding the user's presence key.
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ItemError>,
}

/// The answer: one result per item, in the request's order.
#[derive(Debug, Serialize)]
pub struct BatchAnswer {
    results: Vec<ItemResult>,
}

/// A checked body: what every item referring to it shares.
enum Parsed {
    Chat(Box<ChatBody>, Frame),
    Conversation(Box<ConversationBody>, Frame),
    Domain(UserId, Frame),
}

fn domain_kind(kind: Kind) -> Option<DomainKind> {
    match kind {
        Kind::Purchase => Some(DomainKind::Purchase),
        Kind::PaymentReminder => Some(DomainKind::PaymentReminder),
        Kind::Shipping => Some(DomainKind::Shipping),
        Kind::Chat | Kind::Conversation => None,
    }
}

/// Parses a body of `kind` and builds its frame (once per body, whatever the users).
fn parse(kind: Kind, body: Value) -> Result<Parsed, ApiError> {
    let shape = |err: serde_json::Error| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", format!("{} body: {err}", kind.as_str()))
    };
    match (kind, domain_kind(kind)) {
        (Kind::Chat, _) => {
            let body: ChatBody = serde_json::from_value(body).map_err(shape)?;
            let frame = protocol::notification(Kind::Chat, protocol::chat_event_id(&body.message), &body.message);
            Ok(Parsed::Chat(Box::new(body), frame))
        }
        (Kind::Conversation, _) => {
            let body: ConversationBody = serde_json::from_value(body).map_err(shape)?;
            let frame = protocol::conversation_event(&body.event);
            Ok(Parsed::Conversation(Box::new(body), frame))
        }
        (_, Some(domain)) => {
            let document = DomainDocument::from_value(domain, body).map_err(|err| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    format!("{} document: {err}", domain.name()),
                )
            })?;
            let frame = protocol::notification(kind, protocol::domain_event_id(&document), &document);
            Ok(Parsed::Domain(document.user_id().clone(), frame))
        }
        (_, None) => Err(ApiError::bad_request("unknown kind")),
    }
}

/// The frame `user` gets from `parsed`, after the single endpoint's checks.
fn frame_for(user: &UserId, parsed: &Parsed) -> Result<Frame, ApiError> {
    match parsed {
        Parsed::Chat(body, frame) => check_chat(user, &body.message).map(|()| frame.clone()),
        Parsed::Conversation(body, frame) => check_conversation(user, &body.event).map(|()| frame.clone()),
        Parsed::Domain(owner, frame) if owner == user => Ok(frame.clone()),
        Parsed::Domain(..) => Err(ApiError::bad_request("the document's user_id does not match the item's user_id")),
    }
}

/// The user and frame of one item, after the checks of its kind's single endpoint;
/// a shared body is parsed once per kind (`parsed`).
fn item_frame(
    user_id: &str,
    kind: Kind,
    body: Option<Value>,
    index: Option<usize>,
    shared: &[Value],
    parsed: &mut HashMap<(usize, Kind), Result<Parsed, ApiError>>,
) -> Result<(UserId, Frame), ApiError> {
    let user = UserId::parse(user_id).map_err(|err| ApiError::bad_request(format!("user_id: {err}")))?;
    let frame = match (body, index) {
        (Some(body), None) => parse(kind, body).and_then(|parsed| frame_for(&user, &parsed)),
        (None, Some(index)) => {
            let parsed = parsed.entry((index, kind)).or_insert_with(|| {
                shared
                    .get(index)
                    .cloned()
                    .ok_or_else(|| ApiError::bad_request(format!("shared: no body at index {index}")))
                    .and_then(|value| parse(kind, value))
            });
            match parsed {
                Ok(parsed) => frame_for(&user, parsed),
                Err(err) => Err(err.clone()),
            }
        }
        _ => Err(ApiError::bad_request("an item needs exactly one of body and shared")),
    }?;
    Ok((user, frame))
}

/// For the items whose user has no socket here (`absent`: result index and user), one
/// `MGET` of their presence keys tells offline (`no_connections` stays) from on another
/// pod (`elsewhere`, with its instance id); without Redis it is `unknown`.
async fn place_absent(state: &AppState, results: &mut [ItemResult], absent: &[(usize, UserId)]) {
    if absent.is_empty() {
        return;
    }
    let users: Vec<&UserId> = absent.iter().map(|(_, user)| user).collect();
    match state.presence.owners(&users).await {
        Ok(owners) => {
            for ((index, _), owner) in absent.iter().zip(owners) {
                // Offline, or the key is this pod's own (its last socket just closed).
                let Some(owner) = owner.filter(|owner| owner != state.presence.instance()) else { continue };
                if let Some(result) = results.get_mut(*index) {
                    result.outcome = "elsewhere";
                    result.owner = Some(owner);
                }
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, users = absent.len(), "presence unknown for users without a socket here");
            for (index, _) in absent {
                if let Some(result) = results.get_mut(*index) {
                    result.outcome = "unknown";
                }
            }
        }
    }
}

fn refused(status: StatusCode, code: &'static str, message: String) -> ApiError {
    metrics::counter!(METRIC_BATCHES, "outcome" => "refused").increment(1);
    tracing::debug!(%message, "notification batch refused");
    ApiError::new(status, code, message)
}

/// `POST /notifications/batch` with `{"shared": [body, …], "items": [{"user_id", "kind",
/// "body" | "shared"}, …]}`. `200` with a result per item once the batch itself is
/// well-formed; `413` above `NOTIFICATIONS_BATCH_MAX_ITEMS` items or
/// `NOTIFICATIONS_BATCH_MAX_BYTES`; `400`/`422`/`415` for a body that is not a batch.
pub async fn batch(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    body: Result<ApiJson<BatchBody>, ApiError>,
) -> Result<Json<BatchAnswer>, ApiError> {
    let ApiJson(body) = body.map_err(|err| refused(err.status, err.code, err.message))?;
    let max = state.batch.max_items;
    if body.items.len() > max {
        return Err(refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{} items; a batch holds at most {max} (NOTIFICATIONS_BATCH_MAX_ITEMS)", body.items.len()),
        ));
    }
    if body.items.is_empty() {
        return Err(refused(StatusCode::BAD_REQUEST, "invalid_request", "a batch needs at least one item".into()));
    }
    metrics::counter!(METRIC_BATCHES, "outcome" => "accepted").increment(1);
    let shared = body.shared;
    let mut parsed_shared: HashMap<(usize, Kind), Result<Parsed, ApiError>> = HashMap::new();
    let mut counts: HashMap<(Kind, &'static str), u64> = HashMap::new();
    let mut results = Vec::with_capacity(body.items.len());
    // Items whose user has no socket here: (result index, user).
    let mut absent: Vec<(usize, UserId)> = Vec::new();
    for item in body.items {
        let ItemIn { user_id, kind, body, shared: index } = item;
        let mut result = ItemResult {
            user_id,
            kind,
            status: 200,
            outcome: "ok",
            connections: 0,
            delivered: 0,
            failed: 0,
            owner: None,
            error: None,
        };
        let frame = item_frame(&result.user_id, kind, body, index, &shared, &mut parsed_shared);
        match frame {
            Err(err) => {
                result.status = err.status.as_u16();
                result.outcome = "invalid";
                result.error = Some(ItemError { code: err.code, message: err.message });
            }
            Ok((user, frame)) => {
                let report = state.hub.broadcast(&user, frame);
                result.connections = report.connections;
                result.delivered = report.delivered;
                result.failed = report.failed;
                let outcome = report.outcome();
                result.outcome = outcome.as_str();
                result.status = match outcome {
                    Outcome::Ok | Outcome::NoConnections => 200,
                    Outcome::Partial => 206,
                    Outcome::Failed => 500,
                };
                if outcome == Outcome::NoConnections {
                    absent.push((results.len(), user));
                }
            }
        }
        results.push(result);
    }
    drop(shared);
    drop(parsed_shared);
    place_absent(&state, &mut results, &absent).await;
    let mut not_delivered = 0;
    for result in &results {
        *counts.entry((result.kind, result.outcome)).or_default() += 1;
        if matches!(result.outcome, "partial" | "failed") {
            not_delivered += 1;
        }
    }
    for ((kind, outcome), n) in counts {
        metrics::counter!(METRIC_NOTIFICATIONS, "kind" => kind.as_str(), "outcome" => outcome).increment(n);
    }
    if not_delivered > 0 {
        tracing::warn!(items = results.len(), not_delivered, "batch: some notifications not delivered to every socket");
    }
    Ok(Json(BatchAnswer { results }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    #[test]
    fn a_shared_domain_body_reaches_only_its_own_user() {
        let document = json!({"purchase_id": "p-1", "user_id": "alice", "status": "paid", "amount_minor": 100,
            "currency": "EUR", "updated_at": "2026-01-01T00:00:00Z"});
        let parsed = parse(Kind::Purchase, document).expect("valid");
        let frame = frame_for(&user("alice"), &parsed).expect("alice's");
        assert_eq!(frame.event_id().map(|id| id.as_str()), Some("purchase:p-1:paid:1767225600000"));
        assert_eq!(frame_for(&user("bob"), &parsed).err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn a_body_of_the_wrong_shape_is_refused_by_kind() {
        let err = parse(Kind::Chat, json!({"nope": 1})).err().expect("refused");
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.message.starts_with("chat body"), "{}", err.message);
        let err = parse(Kind::Shipping, json!({"shipment_id": "s"})).err().expect("refused");
        assert_eq!(err.code, "invalid_body");
    }
}
