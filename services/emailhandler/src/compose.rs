//! What the templates see: a chat digest or a domain event turned into a plain,
//! fully defined context (every field present, dates and amounts already formatted).
//!
//! Why this module exists: templates are edited by people who do not read Rust, and
//! undefined variables are errors (see `templates.rs`), so each kind of email gets
//! one documented context shape (`docs/email.md`), built here and nowhere else.

use std::collections::HashMap;

use chatstream::domain::{DomainDocument, DomainEvent};
use chatstream::ChangeOp;
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::digest::Digest;
use crate::users::Recipient;

#[derive(Debug, Serialize)]
struct RecipientView<'a> {
    user_id: &'a str,
    display_name: &'a str,
    email: String,
    locale: Option<&'a str>,
}

fn recipient_view(recipient: &Recipient) -> RecipientView<'_> {
    RecipientView {
        user_id: &recipient.user_id,
        display_name: &recipient.display_name,
        email: recipient.address.to_string(),
        locale: recipient.locale.as_deref(),
    }
}

#[derive(Debug, Serialize)]
struct MessageView<'a> {
    message_id: &'a str,
    content: &'a str,
    sent_at: String,
}

#[derive(Debug, Serialize)]
struct SenderView<'a> {
    user_id: &'a str,
    display_name: &'a str,
    count: usize,
    messages: Vec<MessageView<'a>>,
}

/// `2026-05-01 12:03 UTC`.
pub fn format_time(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms).single().map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default()
}

fn format_date(date: &DateTime<Utc>) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// `1999` minor units of `EUR` → `19.99 EUR` (currencies without minor units, and
/// those with three decimals, are formatted accordingly).
pub fn format_amount(minor: i64, currency: &str) -> String {
    let decimals: u32 = match currency {
        "JPY" | "KRW" | "VND" | "CLP" | "ISK" | "UGX" | "XAF" | "XOF" | "PYG" | "RWF" => 0,
        "BHD" | "KWD" | "OMR" | "JOD" | "TND" | "IQD" | "LYD" => 3,
        _ => 2,
    };
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    if decimals == 0 {
        return format!("{sign}{abs} {currency}");
    }
    let unit = 10u64.pow(decimals);
    format!("{sign}{}.{:0width$} {currency}", abs / unit, abs % unit, width = decimals as usize)
}

/// `in_transit` → `in transit`.
fn label(status: &str) -> String {
    status.replace('_', " ")
}

/// The context of a chat digest: who wrote, how many, and each message, grouped by
/// sender (in the order the senders first wrote), oldest message first.
pub fn digest_context(recipient: &Recipient, digest: &Digest) -> Value {
    let mut items: Vec<&crate::digest::DigestItem> = digest.items.iter().collect();
    items.sort_by_key(|i| (i.created_at, i.message_id.clone()));
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, SenderView<'_>> = HashMap::new();
    for item in items {
        let group = groups.entry(item.sender_id.as_str()).or_insert_with(|| {
            order.push(item.sender_id.as_str());
            SenderView { user_id: &item.sender_id, display_name: &item.sender_name, count: 0, messages: Vec::new() }
        });
        group.count += 1;
        group.messages.push(MessageView {
            message_id: &item.message_id,
            content: &item.content,
            sent_at: format_time(item.created_at),
        });
    }
    let senders: Vec<SenderView<'_>> = order.iter().filter_map(|s| groups.remove(s)).collect();
    let listed = digest.items.len();
    json!({
        "recipient": recipient_view(recipient),
        "total": listed as i64 + digest.overflow,
        "listed": listed,
        "omitted": digest.overflow,
        "sender_count": senders.len(),
        "senders": senders,
    })
}

/// The context of a purchase, payment or shipment change.
pub fn domain_context(recipient: &Recipient, event: &DomainEvent) -> Value {
    let change = if event.op == ChangeOp::Create { "created" } else { "updated" };
    let status = event.document.status();
    let status_label = label(&status);
    let mut context = json!({ "recipient": recipient_view(recipient), "change": change });
    let (key, view) = match &event.document {
        DomainDocument::Purchase(p) => (
            "purchase",
            json!({
                "purchase_id": p.purchase_id.as_str(),
                "status": status,
                "status_label": status_label,
                "amount": format_amount(p.amount_minor, p.currency.as_str()),
                "updated_at": format_date(&p.updated_at),
            }),
        ),
        DomainDocument::PaymentReminder(p) => (
            "payment",
            json!({
                "payment_id": p.payment_id.as_str(),
                "purchase_id": p.purchase_id.as_ref().map(|id| id.as_str()),
                "status": status,
                "status_label": status_label,
                "amount": format_amount(p.amount_minor, p.currency.as_str()),
                "due_date": format_date(&p.due_date),
            }),
        ),
        DomainDocument::Shipping(s) => (
            "shipment",
            json!({
                "shipment_id": s.shipment_id.as_str(),
                "purchase_id": s.purchase_id.as_ref().map(|id| id.as_str()),
                "status": status,
                "status_label": status_label,
                "carrier": s.carrier,
                "tracking_number": s.tracking_number,
                "estimated_delivery": s.estimated_delivery.as_ref().map(format_date),
                "updated_at": format_date(&s.updated_at),
            }),
        ),
    };
    context[key] = view;
    context
}

/// A context of each kind with every field filled in, for template validation at
/// start and for tests.
pub fn sample_context(kind: &str) -> Value {
    let recipient = json!({"user_id": "sam", "display_name": "Sam Sample", "email": "sam@example.com", "locale": null});
    match kind {
        "chat_digest" => json!({
            "recipient": recipient,
            "total": 3, "listed": 3, "omitted": 0, "sender_count": 2,
            "senders": [
                {"user_id": "alice", "display_name": "Alice", "count": 2, "messages": [
                    {"message_id": "m1", "content": "hi", "sent_at": "2026-05-01 12:00 UTC"},
                    {"message_id": "m2", "content": "are you there?", "sent_at": "2026-05-01 12:01 UTC"}]},
                {"user_id": "bob", "display_name": "Bob", "count": 1, "messages": [
                    {"message_id": "m3", "content": "lunch?", "sent_at": "2026-05-01 12:02 UTC"}]}
            ]
        }),
        "purchase" => json!({"recipient": recipient, "change": "created", "purchase": {
            "purchase_id": "p-1", "status": "paid", "status_label": "paid", "amount": "19.99 EUR",
            "updated_at": "2026-05-01"}}),
        "payment_reminder" => json!({"recipient": recipient, "change": "created", "payment": {
            "payment_id": "pay-1", "purchase_id": "p-1", "status": "pending", "status_label": "pending",
            "amount": "19.99 EUR", "due_date": "2026-06-01"}}),
        _ => json!({"recipient": recipient, "change": "updated", "shipment": {
            "shipment_id": "s-1", "purchase_id": "p-1", "status": "in_transit", "status_label": "in transit",
            "carrier": "DHL", "tracking_number": "JD0001", "estimated_delivery": "2026-05-03",
            "updated_at": "2026-05-01"}}),
    }
}

#[cfg(test)]
mod tests {
    use chatstream::domain::DomainKind;

    use super::*;
    use crate::digest::DigestItem;

    fn recipient() -> Recipient {
        Recipient {
            user_id: "bob".into(),
            display_name: "Bob".into(),
            address: "bob@example.com".parse().expect("address"),
            locale: None,
        }
    }

    #[test]
    fn amounts_are_formatted_by_currency() {
        assert_eq!(format_amount(1999, "EUR"), "19.99 EUR");
        assert_eq!(format_amount(5, "USD"), "0.05 USD");
        assert_eq!(format_amount(-250, "GBP"), "-2.50 GBP");
        assert_eq!(format_amount(1999, "JPY"), "1999 JPY");
        assert_eq!(format_amount(1999, "KWD"), "1.999 KWD");
    }

    #[test]
    fn digests_group_by_sender_in_order() {
        let item = |id: &str, sender: &str, at: i64| DigestItem {
            message_id: id.into(),
            stream_id: "s".into(),
            sender_id: sender.into(),
            sender_name: sender.to_uppercase(),
            receiver_id: "bob".into(),
            content: format!("text {id}"),
            created_at: at,
            enqueued_at: at,
        };
        let digest = Digest {
            recipient: "bob".into(),
            version: 1,
            items: vec![item("m3", "alice", 3), item("m1", "alice", 1), item("m2", "carol", 2)],
            overflow: 2,
            due_at: 0,
            next_attempt_at: 0,
            attempts: 0,
            lease_until: 0,
            lease_holder: String::new(),
            last_error: String::new(),
        };
        let context = digest_context(&recipient(), &digest);
        assert_eq!(context["total"], 5);
        assert_eq!(context["omitted"], 2);
        assert_eq!(context["sender_count"], 2);
        assert_eq!(context["senders"][0]["display_name"], "ALICE");
        assert_eq!(context["senders"][0]["count"], 2);
        assert_eq!(context["senders"][0]["messages"][0]["message_id"], "m1");
        assert_eq!(context["senders"][1]["user_id"], "carol");
    }

    #[test]
    fn domain_contexts_have_every_field() {
        let record = json!({"payment_id": "pay-9", "user_id": "bob", "status": "overdue", "amount_minor": 4200,
            "currency": "EUR", "due_date": "2026-06-01T00:00:00Z", "__op": "u", "__source_ts_ms": 1});
        let event = DomainEvent::parse(DomainKind::PaymentReminder, record.to_string().as_bytes()).expect("parses");
        let context = domain_context(&recipient(), &event);
        assert_eq!(context["change"], "updated");
        assert_eq!(context["payment"]["amount"], "42.00 EUR");
        assert_eq!(context["payment"]["due_date"], "2026-06-01");
        assert_eq!(context["payment"]["purchase_id"], Value::Null, "present, empty");
    }
}
