//! Domain events other parts of the product write: purchases, payment reminders and
//! shipments. chatfleet turns their changes into notifications and emails.
//!
//! Why this module exists: the documents are written to MongoDB by other services,
//! captured exactly like chat messages (Debezium, or the outbox relay locally) onto
//! one topic per collection keyed by `user_id`, and read by the notification pipeline
//! and the email handler. Both must agree on the minimal shape, so it is defined here
//! once, with the same parse-don't-validate rules as the chat ids.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::event::{ChangeOp, ChangeRecord, EventError};
use crate::UserId;

/// The three kinds of domain event, with their collection, topic and endpoint names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainKind {
    Purchase,
    PaymentReminder,
    Shipping,
}

impl DomainKind {
    pub const ALL: [DomainKind; 3] = [DomainKind::Purchase, DomainKind::PaymentReminder, DomainKind::Shipping];

    /// The MongoDB collection the documents live in.
    pub fn collection(self) -> &'static str {
        match self {
            DomainKind::Purchase => "purchases",
            DomainKind::PaymentReminder => "payments",
            DomainKind::Shipping => "shipments",
        }
    }

    /// The Kafka topic their changes are captured to (keyed by `user_id`).
    pub fn topic(self) -> &'static str {
        match self {
            DomainKind::Purchase => "purchases.changes",
            DomainKind::PaymentReminder => "payments.changes",
            DomainKind::Shipping => "shipments.changes",
        }
    }

    /// The notification endpoint path (`POST …?user_id=`).
    pub fn endpoint(self) -> &'static str {
        match self {
            DomainKind::Purchase => "/notifications/purchase",
            DomainKind::PaymentReminder => "/notifications/payment-reminder",
            DomainKind::Shipping => "/notifications/shipping",
        }
    }

    /// The `kind` of notification frames.
    pub fn name(self) -> &'static str {
        match self {
            DomainKind::Purchase => "purchase",
            DomainKind::PaymentReminder => "payment_reminder",
            DomainKind::Shipping => "shipping",
        }
    }

    pub fn from_topic(topic: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.topic() == topic)
    }

    pub fn from_collection(collection: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.collection() == collection)
    }
}

/// A three-letter ISO 4217 code, upper case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Currency(String);

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(raw))
        } else {
            Err(serde::de::Error::custom(format!("currency must be three upper-case letters, got {raw:?}")))
        }
    }
}

impl Currency {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A document id: 1 to 128 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct DocumentId(String);

impl<'de> Deserialize<'de> for DocumentId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        let ok = (1..=128).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if ok {
            Ok(Self(raw))
        } else {
            Err(serde::de::Error::custom("id must be 1 to 128 characters of letters, digits and _ . : -"))
        }
    }
}

impl DocumentId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Milliseconds since the epoch or an RFC 3339 string (Debezium writes the former).
fn flexible_time<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Number(n) => n
            .as_i64()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .ok_or_else(|| serde::de::Error::custom("timestamp out of range")),
        Value::String(s) => DateTime::parse_from_rfc3339(&s)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|_| serde::de::Error::custom(format!("not an RFC 3339 timestamp: {s:?}"))),
        other => Err(serde::de::Error::custom(format!("not a timestamp: {other}"))),
    }
}

fn flexible_time_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "flexible_time")] DateTime<Utc>);
    Ok(Option::<Wrap>::deserialize(deserializer)?.map(|w| w.0))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurchaseStatus {
    Created,
    Paid,
    Cancelled,
    Refunded,
    Completed,
}

/// `purchases`: an order a user placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub purchase_id: DocumentId,
    pub user_id: UserId,
    pub status: PurchaseStatus,
    /// The total in minor units (cents).
    pub amount_minor: i64,
    pub currency: Currency,
    #[serde(deserialize_with = "flexible_time")]
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Pending,
    Overdue,
    Paid,
    Failed,
}

/// `payments`: an amount a user owes, with its due date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentReminder {
    pub payment_id: DocumentId,
    pub user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase_id: Option<DocumentId>,
    pub status: PaymentStatus,
    pub amount_minor: i64,
    pub currency: Currency,
    #[serde(deserialize_with = "flexible_time")]
    pub due_date: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentStatus {
    LabelCreated,
    Shipped,
    InTransit,
    OutForDelivery,
    Delivered,
    Exception,
}

/// `shipments`: a parcel on its way to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentUpdate {
    pub shipment_id: DocumentId,
    pub user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchase_id: Option<DocumentId>,
    pub status: ShipmentStatus,
    pub carrier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    #[serde(default, deserialize_with = "flexible_time_opt", skip_serializing_if = "Option::is_none")]
    pub estimated_delivery: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "flexible_time")]
    pub updated_at: DateTime<Utc>,
}

/// One domain document, typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DomainDocument {
    Purchase(Purchase),
    PaymentReminder(PaymentReminder),
    Shipping(ShipmentUpdate),
}

impl DomainDocument {
    /// Reads a document of `kind` from JSON (a notification body, a captured document).
    pub fn from_value(kind: DomainKind, value: Value) -> Result<Self, String> {
        let parsed = match kind {
            DomainKind::Purchase => serde_json::from_value(value).map(DomainDocument::Purchase),
            DomainKind::PaymentReminder => serde_json::from_value(value).map(DomainDocument::PaymentReminder),
            DomainKind::Shipping => serde_json::from_value(value).map(DomainDocument::Shipping),
        };
        parsed.map_err(|err| err.to_string())
    }

    pub fn kind(&self) -> DomainKind {
        match self {
            DomainDocument::Purchase(_) => DomainKind::Purchase,
            DomainDocument::PaymentReminder(_) => DomainKind::PaymentReminder,
            DomainDocument::Shipping(_) => DomainKind::Shipping,
        }
    }

    pub fn user_id(&self) -> &UserId {
        match self {
            DomainDocument::Purchase(p) => &p.user_id,
            DomainDocument::PaymentReminder(p) => &p.user_id,
            DomainDocument::Shipping(s) => &s.user_id,
        }
    }

    /// The document's own id (purchase, payment or shipment id).
    pub fn id(&self) -> &str {
        match self {
            DomainDocument::Purchase(p) => p.purchase_id.as_str(),
            DomainDocument::PaymentReminder(p) => p.payment_id.as_str(),
            DomainDocument::Shipping(s) => s.shipment_id.as_str(),
        }
    }

    /// The status as its wire name (`paid`, `in_transit`, ...).
    pub fn status(&self) -> String {
        let value = match self {
            DomainDocument::Purchase(p) => serde_json::to_value(p.status),
            DomainDocument::PaymentReminder(p) => serde_json::to_value(p.status),
            DomainDocument::Shipping(s) => serde_json::to_value(s.status),
        };
        value.ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

/// A captured change of a domain document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    pub op: ChangeOp,
    pub document: DomainDocument,
    pub source_ts_ms: i64,
}

impl DomainEvent {
    /// Reads a record from `kind`'s topic (flattened or raw Debezium form).
    pub fn parse(kind: DomainKind, payload: &[u8]) -> Result<Self, EventError> {
        let record = ChangeRecord::parse(payload)?;
        let document = DomainDocument::from_value(kind, Value::Object(record.plain_document()?))
            .map_err(|err| EventError::Malformed(format!("{} document: {err}", kind.name())))?;
        Ok(Self { op: record.op, document, source_ts_ms: record.source_ts_ms })
    }

    /// The id this change is deduplicated under: one notification per document,
    /// status and change.
    pub fn dedup_id(&self) -> String {
        format!("{}.{}.{}", self.document.id(), self.document.status(), self.source_ts_ms)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_captured_shipment_parses_from_the_flattened_form() {
        let record = json!({
            "_id": "s-1", "shipment_id": "s-1", "user_id": "alice", "status": "in_transit",
            "carrier": "DHL", "tracking_number": "JD0001", "updated_at": 1_760_000_000_000_i64,
            "outbox_pending": true, "__op": "u", "__source_ts_ms": 7, "__deleted": "false"
        });
        let event = DomainEvent::parse(DomainKind::Shipping, record.to_string().as_bytes()).expect("parses");
        assert_eq!(event.op, ChangeOp::Update);
        assert_eq!(event.document.user_id().as_str(), "alice");
        assert_eq!(event.document.status(), "in_transit");
        assert_eq!(event.dedup_id(), "s-1.in_transit.7");
    }

    #[test]
    fn a_purchase_in_a_raw_envelope_with_extended_json_dates_parses() {
        let after = json!({
            "_id": {"$oid": "65f0"}, "purchase_id": "p-9", "user_id": "bob", "status": "paid",
            "amount_minor": 1999, "currency": "EUR", "updated_at": {"$date": 1_760_000_000_000_i64}
        })
        .to_string();
        let record = json!({"op": "c", "after": after, "source": {"ts_ms": 3}});
        let event = DomainEvent::parse(DomainKind::Purchase, record.to_string().as_bytes()).expect("parses");
        assert_eq!(event.document.kind(), DomainKind::Purchase);
        assert_eq!(event.document.id(), "p-9");
    }

    #[test]
    fn bad_domain_documents_are_refused() {
        let bad_currency = json!({"payment_id": "x", "user_id": "a", "status": "pending", "amount_minor": 1,
            "currency": "eur", "due_date": "2026-12-01T00:00:00Z"});
        assert!(DomainDocument::from_value(DomainKind::PaymentReminder, bad_currency).is_err());
        let bad_status = json!({"purchase_id": "x", "user_id": "a", "status": "lost", "amount_minor": 1,
            "currency": "EUR", "updated_at": "2026-12-01T00:00:00Z"});
        assert!(DomainDocument::from_value(DomainKind::Purchase, bad_status).is_err());
        let bad_user = json!({"purchase_id": "x", "user_id": "a b", "status": "paid", "amount_minor": 1,
            "currency": "EUR", "updated_at": "2026-12-01T00:00:00Z"});
        assert!(DomainDocument::from_value(DomainKind::Purchase, bad_user).is_err());
        assert!(DomainEvent::parse(DomainKind::Purchase, b"{}").is_err());
    }

    #[test]
    fn kinds_map_to_collections_topics_and_endpoints() {
        for kind in DomainKind::ALL {
            assert_eq!(DomainKind::from_topic(kind.topic()), Some(kind));
            assert_eq!(DomainKind::from_collection(kind.collection()), Some(kind));
            assert!(kind.endpoint().starts_with("/notifications/"));
        }
    }
}
