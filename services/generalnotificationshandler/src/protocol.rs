//! The notification socket protocol: the JSON frames the server sends and accepts,
//! and the event ids that keep a retried forward from being shown twice.
//!
//! Why this module exists: `docs/notifications.md` is a contract with every frontend;
//! keeping every frame's shape and every event id rule in one module keeps the code
//! and the document comparable line by line.

use axum::extract::ws::Utf8Bytes;
use chatstream::domain::DomainDocument;
use chatstream::{ChatMessage, ConversationEvent};
use serde::{Deserialize, Serialize};
use wsfanout::{EventId, Frame, Inbound};

/// The kind of a notification (the `kind` of its frame and the metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Chat,
    Purchase,
    PaymentReminder,
    Shipping,
    /// A membership change, title change or read marker (its own frame type).
    Conversation,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Purchase => "purchase",
            Kind::PaymentReminder => "payment_reminder",
            Kind::Shipping => "shipping",
            Kind::Conversation => "conversation",
        }
    }

    pub fn of(document: &DomainDocument) -> Self {
        match document {
            DomainDocument::Purchase(_) => Kind::Purchase,
            DomainDocument::PaymentReminder(_) => Kind::PaymentReminder,
            DomainDocument::Shipping(_) => Kind::Shipping,
        }
    }
}

/// Every frame the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame<'a, T: Serialize> {
    Notification { kind: Kind, id: &'a str, data: &'a T },
}

fn to_text<T: Serialize>(frame: &ServerFrame<'_, T>) -> Utf8Bytes {
    // Serializing these plain structs cannot fail; an empty frame would be noticed by
    // any client test.
    Utf8Bytes::from(serde_json::to_string(frame).unwrap_or_default())
}

/// The event id of a chat notification: `chat:{message_id}`.
pub fn chat_event_id(message: &ChatMessage) -> String {
    format!("chat:{}", message.message_id)
}

/// The event id of a domain notification: `{kind}:{document id}:{status}:{ms}`, where
/// `ms` is the document's `updated_at` (purchases, shipments) or `due_date` (payment
/// reminders) in milliseconds since the epoch. A retried forward carries the same
/// document and gets the same id; a new status, or a new update with the same status
/// (a shipment scanned again in transit), gets a new one.
pub fn domain_event_id(document: &DomainDocument) -> String {
    let ms = match document {
        DomainDocument::Purchase(p) => p.updated_at.timestamp_millis(),
        DomainDocument::PaymentReminder(p) => p.due_date.timestamp_millis(),
        DomainDocument::Shipping(s) => s.updated_at.timestamp_millis(),
    };
    format!("{}:{}:{}:{ms}", Kind::of(document).as_str(), document.id(), document.status())
}

/// The frame of one notification, serialized once for every socket of the user.
pub fn notification<T: Serialize>(kind: Kind, id: String, data: &T) -> Frame {
    let text = to_text(&ServerFrame::Notification { kind, id: &id, data });
    Frame::event(EventId::from(id), text)
}

/// The frame of a conversation event: `{"type":"conversation_event","event":{…}}`, the
/// event as `chatstream::ConversationEvent` serializes it, deduplicated per socket by
/// `conversation:{event_id}` (one event reaches a user once, however often retried).
pub fn conversation_event(event: &ConversationEvent) -> Frame {
    #[derive(Serialize)]
    struct ConversationFrame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        event: &'a ConversationEvent,
    }
    // Serializing this plain struct cannot fail.
    let text = serde_json::to_string(&ConversationFrame { kind: "conversation_event", event }).unwrap_or_default();
    Frame::event(EventId::from(format!("conversation:{}", event.event_id)), Utf8Bytes::from(text))
}

/// Answers one client frame: `{"type":"ping"}` gets `{"type":"pong"}`, anything else
/// an `error` frame (the socket stays open).
pub fn answer_client(frame: Inbound<'_>) -> Option<Utf8Bytes> {
    Some(wsfanout::answer_ping(frame, "this socket only receives notifications"))
}

#[cfg(test)]
mod tests {
    use chatstream::domain::DomainKind;
    use chatstream::{MessageContent, MessageId, StreamId, UserId};
    use serde_json::{json, Value};

    use super::*;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("JSON")
    }

    fn shipment(status: &str, updated_at: &str) -> DomainDocument {
        let value = json!({"shipment_id": "s-1", "user_id": "alice", "status": status, "carrier": "DHL",
            "updated_at": updated_at});
        DomainDocument::from_value(DomainKind::Shipping, value).expect("valid shipment")
    }

    #[test]
    fn a_chat_notification_frame_carries_kind_id_and_the_message() {
        let alice = UserId::parse("alice").expect("valid");
        let bob = UserId::parse("bob").expect("valid");
        let message = ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&alice, &bob),
            sender_id: bob,
            receiver_id: Some(alice),
            recipients: Vec::new(),
            content: MessageContent::parse("hi").expect("valid"),
            created_at: "2025-01-01T12:00:00Z".parse().expect("time"),
            state: Default::default(),
        };
        let frame = notification(Kind::Chat, chat_event_id(&message), &message);
        let id = format!("chat:{}", message.message_id);
        assert_eq!(frame.event_id().map(EventId::as_str), Some(id.as_str()));
        let value = parse(frame.text());
        assert_eq!(value["type"], "notification");
        assert_eq!(value["kind"], "chat");
        assert_eq!(value["id"], id.as_str());
        assert_eq!(value["data"], serde_json::to_value(&message).expect("serialize"));
    }

    #[test]
    fn domain_event_ids_separate_statuses_and_updates_but_not_retries() {
        let first = shipment("in_transit", "2025-01-01T12:00:00Z");
        let retry = shipment("in_transit", "2025-01-01T12:00:00Z");
        let rescanned = shipment("in_transit", "2025-01-01T13:00:00Z");
        let delivered = shipment("delivered", "2025-01-01T12:00:00Z");
        assert_eq!(domain_event_id(&first), "shipping:s-1:in_transit:1735732800000");
        assert_eq!(domain_event_id(&first), domain_event_id(&retry));
        assert_ne!(domain_event_id(&first), domain_event_id(&rescanned));
        assert_ne!(domain_event_id(&first), domain_event_id(&delivered));
        let frame = notification(Kind::of(&first), domain_event_id(&first), &first);
        let value = parse(frame.text());
        assert_eq!(value["kind"], "shipping");
        assert_eq!(value["data"]["shipment_id"], "s-1");
    }

    #[test]
    fn a_conversation_event_frame_carries_the_event() {
        let user = |raw: &str| UserId::parse(raw).expect("valid");
        let event = ConversationEvent {
            event_id: MessageId::new().to_string(),
            kind: chatstream::ConversationEventKind::MemberJoined,
            conversation_id: StreamId::new_group(),
            user_id: user("dave"),
            actor_id: user("alice"),
            members: vec![user("alice"), user("dave")],
            title: Some("team".into()),
            up_to: None,
            reason: None,
            message_id: None,
            emoji: None,
            at: "2025-01-01T12:00:00Z".parse().expect("time"),
        };
        let frame = conversation_event(&event);
        let id = format!("conversation:{}", event.event_id);
        assert_eq!(frame.event_id().map(EventId::as_str), Some(id.as_str()));
        let value = parse(frame.text());
        assert_eq!(value["type"], "conversation_event");
        assert_eq!(value["event"], serde_json::to_value(&event).expect("serialize"));
        assert_eq!(value["event"]["type"], "member_joined");
    }

    #[test]
    fn client_pings_get_pongs_and_anything_else_an_error_frame() {
        let pong = answer_client(Inbound::Text(r#"{"type":"ping"}"#)).expect("reply");
        assert_eq!(parse(pong.as_str()), json!({"type": "pong"}));
        for bad in [r#"{"type":"subscribe"}"#, "not json"] {
            let reply = answer_client(Inbound::Text(bad)).expect("reply");
            assert_eq!(parse(reply.as_str())["error"]["code"], "unsupported_frame", "{bad}");
        }
        let reply = answer_client(Inbound::Binary(b"\x00")).expect("reply");
        assert_eq!(parse(reply.as_str())["type"], "error");
    }
}
