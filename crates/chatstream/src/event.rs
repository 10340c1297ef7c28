//! Change events: what capture puts on `chat.changes` and what consumers read.
//!
//! Why this module exists: two producers write this topic, Debezium in production
//! and the built-in outbox relay elsewhere, and every consumer must read both the
//! same way. The wire format is Debezium's MongoDB connector after the
//! `ExtractNewDocumentState` transform with `add.fields=op,source.ts_ms` and
//! `delete.tombstone.handling.mode=rewrite`: the document's own fields, plus `__op`
//! (`c`, `u`, `d`, `r`), `__source_ts_ms` and `__deleted`. The relay emits exactly
//! that; [`ChangeEvent::parse`] also accepts the raw Debezium envelope
//! (`{"op", "after", "source", ...}`, optionally wrapped in `{"schema", "payload"}`
//! by the JSON converter), with `after` either a JSON object or an extended-JSON string.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

use crate::{ChatMessage, MessageId, StreamId};

/// What happened to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    /// An insert, or a snapshot read (`r`) of an existing document.
    Create,
    Update,
    Delete,
}

impl ChangeOp {
    pub fn code(self) -> &'static str {
        match self {
            ChangeOp::Create => "c",
            ChangeOp::Update => "u",
            ChangeOp::Delete => "d",
        }
    }

    fn parse(code: &str) -> Result<Self, EventError> {
        match code {
            "c" | "r" => Ok(ChangeOp::Create),
            "u" => Ok(ChangeOp::Update),
            "d" => Ok(ChangeOp::Delete),
            other => Err(EventError::Malformed(format!("unknown operation {other:?}"))),
        }
    }
}

/// Why a record could not be turned into a [`ChangeEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Not JSON, or not a chat message document: retrying cannot help.
    #[error("malformed change event: {0}")]
    Malformed(String),
    /// A hard delete that carries only the document id: there is no stream to route it to.
    #[error("change event cannot be routed: {0}")]
    Unroutable(String),
}

/// One change to a chat message document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub op: ChangeOp,
    pub message: ChatMessage,
    /// When the database made the change (milliseconds since the epoch; 0 if unknown).
    pub source_ts_ms: i64,
}

impl ChangeEvent {
    pub fn new(op: ChangeOp, message: ChatMessage, source_ts_ms: i64) -> Self {
        Self { op, message, source_ts_ms }
    }

    pub fn message_id(&self) -> MessageId {
        self.message.message_id
    }

    pub fn stream_id(&self) -> StreamId {
        self.message.stream_id
    }

    /// The id under which this event is deduplicated: the message id for a create,
    /// the message id with operation and change time for later changes (an edit must
    /// not be dropped as a duplicate of the original insert).
    pub fn dedup_id(&self) -> String {
        match (self.op, self.message.state.version) {
            (ChangeOp::Create, _) => self.message.message_id.to_string(),
            // Each edit or deletion has its own version: a republished change is a
            // duplicate, the next change is not.
            (_, version) if version > 0 => format!("{}.v{version}", self.message.message_id),
            (op, _) => format!("{}.{}{}", self.message.message_id, op.code(), self.source_ts_ms),
        }
    }

    /// The Kafka record key: the stream id, so one conversation stays in one partition.
    pub fn key(&self) -> String {
        self.message.stream_id.to_string()
    }

    /// The flattened (ExtractNewDocumentState) JSON value the relay publishes.
    pub fn to_flattened(&self) -> Value {
        let mut doc = Map::new();
        let m = &self.message;
        doc.insert("_id".into(), Value::String(m.message_id.to_string()));
        doc.insert("message_id".into(), Value::String(m.message_id.to_string()));
        doc.insert("stream_id".into(), Value::String(m.stream_id.to_string()));
        doc.insert("sender_id".into(), Value::String(m.sender_id.to_string()));
        if let Some(receiver) = &m.receiver_id {
            doc.insert("receiver_id".into(), Value::String(receiver.to_string()));
        }
        if !m.recipients.is_empty() {
            // As the document stores them (see `stored_recipients`).
            doc.insert("recipients".into(), Value::String(crate::stored_recipients::join(&m.recipients)));
        }
        doc.insert("content".into(), Value::String(m.content.as_str().to_owned()));
        doc.insert("created_at".into(), Value::from(m.created_at.timestamp_millis()));
        if let Some(at) = m.state.edited_at {
            doc.insert("edited_at".into(), Value::from(at.timestamp_millis()));
        }
        if let Some(at) = m.state.deleted_at {
            doc.insert("deleted_at".into(), Value::from(at.timestamp_millis()));
        }
        if m.state.version > 0 {
            doc.insert("version".into(), Value::from(m.state.version));
        }
        if !m.state.reactions.is_empty() {
            let counts: Map<String, Value> =
                m.state.reactions.iter().map(|(emoji, n)| (emoji.clone(), Value::from(*n))).collect();
            doc.insert("reactions".into(), Value::Object(counts));
        }
        if let Some(trace) = &m.state.trace {
            doc.insert("trace".into(), Value::String(trace.clone()));
        }
        doc.insert("__op".into(), Value::String(self.op.code().into()));
        doc.insert("__source_ts_ms".into(), Value::from(self.source_ts_ms));
        doc.insert("__deleted".into(), Value::String((self.op == ChangeOp::Delete).to_string()));
        Value::Object(doc)
    }

    /// Reads a record value in either the flattened or the raw Debezium form.
    pub fn parse(payload: &[u8]) -> Result<Self, EventError> {
        Self::from_record(ChangeRecord::parse(payload)?)
    }

    pub(crate) fn from_record(change: ChangeRecord) -> Result<Self, EventError> {
        let message = document_to_message(change.document, change.op)?;
        Ok(Self { op: change.op, message, source_ts_ms: change.source_ts_ms })
    }
}

/// A change record of any captured collection: the operation, when it happened, and
/// the document's own fields (capture metadata removed).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub op: ChangeOp,
    pub source_ts_ms: i64,
    pub document: Map<String, Value>,
}

impl ChangeRecord {
    /// Unwraps a record value in the flattened or the raw Debezium form.
    pub fn parse(payload: &[u8]) -> Result<Self, EventError> {
        let value: Value =
            serde_json::from_slice(payload).map_err(|err| EventError::Malformed(format!("not JSON: {err}")))?;
        let mut value = match value {
            Value::Object(map) => map,
            _ => return Err(EventError::Malformed("expected a JSON object".into())),
        };
        // The JSON converter with schemas enabled wraps everything in schema/payload.
        if value.contains_key("schema") && value.contains_key("payload") {
            value = match value.remove("payload") {
                Some(Value::Object(inner)) => inner,
                _ => return Err(EventError::Malformed("payload is not an object".into())),
            };
        }
        if value.contains_key("after") || (value.contains_key("op") && value.contains_key("source")) {
            Self::from_envelope(value)
        } else {
            Self::from_flattened(value)
        }
    }

    fn from_flattened(mut doc: Map<String, Value>) -> Result<Self, EventError> {
        let deleted = matches!(doc.get("__deleted"), Some(Value::Bool(true)))
            || matches!(doc.get("__deleted"), Some(Value::String(s)) if s == "true");
        let op = match doc.get("__op").and_then(Value::as_str) {
            Some(code) => ChangeOp::parse(code)?,
            None if deleted => ChangeOp::Delete,
            None => ChangeOp::Create,
        };
        let source_ts_ms = doc.get("__source_ts_ms").and_then(Value::as_i64).unwrap_or(0);
        doc.retain(|k, _| !k.starts_with("__"));
        Ok(Self { op, source_ts_ms, document: doc })
    }

    fn from_envelope(mut envelope: Map<String, Value>) -> Result<Self, EventError> {
        let op = ChangeOp::parse(envelope.get("op").and_then(Value::as_str).unwrap_or("c"))?;
        let source_ts_ms = envelope
            .get("source")
            .and_then(|s| s.get("ts_ms"))
            .and_then(Value::as_i64)
            .or_else(|| envelope.get("ts_ms").and_then(Value::as_i64))
            .unwrap_or(0);
        let document = match (envelope.remove("after"), envelope.remove("before")) {
            (Some(after), _) if !after.is_null() => document(after)?,
            (_, Some(before)) if !before.is_null() => document(before)?,
            _ => return Err(EventError::Unroutable("the event carries no document".into())),
        };
        Ok(Self { op, source_ts_ms, document })
    }

    /// The document with extended-JSON wrappers (`{"$oid": …}`, `{"$date": …}`)
    /// replaced by plain values (dates as RFC 3339), for typed deserialization.
    pub fn plain_document(&self) -> Result<Map<String, Value>, EventError> {
        self.document
            .iter()
            .map(|(k, v)| {
                let plain = match v {
                    Value::Object(map) if map.contains_key("$date") => Value::String(timestamp(v)?.to_rfc3339()),
                    other => unwrap_string(other),
                };
                Ok((k.clone(), plain))
            })
            .collect()
    }
}

/// A document given as an object or as an extended-JSON string.
fn document(value: Value) -> Result<Map<String, Value>, EventError> {
    match value {
        Value::Object(map) => Ok(map),
        Value::String(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(EventError::Malformed("document string is not a JSON object".into())),
        },
        _ => Err(EventError::Malformed("document is neither an object nor a string".into())),
    }
}

fn document_to_message(mut doc: Map<String, Value>, op: ChangeOp) -> Result<ChatMessage, EventError> {
    let id = doc.get("message_id").or_else(|| doc.get("_id")).map(plain_string);
    let Some(id) = id else {
        return Err(EventError::Malformed("document has no message_id".into()));
    };
    if op == ChangeOp::Delete && !doc.contains_key("stream_id") {
        return Err(EventError::Unroutable(format!("delete of {id} carries no stream_id")));
    }
    let created_at = doc.get("created_at").map(timestamp).transpose()?.unwrap_or_else(Utc::now);
    doc.insert("message_id".into(), Value::String(id));
    doc.insert("created_at".into(), Value::String(created_at.to_rfc3339()));
    let mut fields: Map<String, Value> =
        ["message_id", "stream_id", "sender_id", "receiver_id", "content", "created_at"]
            .iter()
            .filter_map(|k| doc.get(*k).map(|v| ((*k).to_owned(), unwrap_string(v))))
            .collect();
    match doc.get("recipients") {
        Some(Value::String(joined)) => {
            let ids = crate::stored_recipients::split(joined).map(|id| Value::String(id.to_owned())).collect();
            fields.insert("recipients".into(), Value::Array(ids));
        }
        Some(Value::Array(recipients)) => {
            fields.insert("recipients".into(), Value::Array(recipients.iter().map(unwrap_string).collect()));
        }
        _ => {}
    }
    for name in ["edited_at", "deleted_at"] {
        if let Some(value) = doc.get(name).filter(|v| !v.is_null()) {
            fields.insert(name.into(), Value::String(timestamp(value)?.to_rfc3339()));
        }
    }
    if let Some(version) = doc.get("version").and_then(Value::as_u64) {
        fields.insert("version".into(), Value::from(version));
    }
    if let Some(trace) = doc.get("trace").filter(|v| v.is_string()) {
        fields.insert("trace".into(), trace.clone());
    }
    if let Some(Value::Object(reactions)) = doc.get("reactions") {
        fields.insert("reactions".into(), Value::Object(reaction_counts(reactions)));
    }
    let message: ChatMessage =
        serde_json::from_value(Value::Object(fields)).map_err(|err| EventError::Malformed(err.to_string()))?;
    message.check_consistent().map_err(EventError::Malformed)?;
    Ok(message)
}

/// Reactions as counts by emoji. The relay publishes counts; Debezium publishes the
/// stored document, where each key is the hex of the emoji and each value the list of
/// users who reacted.
fn reaction_counts(reactions: &Map<String, Value>) -> Map<String, Value> {
    reactions
        .iter()
        .filter_map(|(key, value)| match value {
            Value::Number(n) => Some((key.clone(), Value::from(n.as_u64().unwrap_or(0)))),
            Value::Array(users) if !users.is_empty() => {
                let emoji = hex::decode(key).ok().and_then(|bytes| String::from_utf8(bytes).ok())?;
                Some((emoji, Value::from(users.len() as u64)))
            }
            _ => None,
        })
        .collect()
}

/// `"x"`, `{"$oid": "x"}` or `{"$uuid": "x"}` → `x`.
fn plain_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(map) => map.values().next().map(plain_string).unwrap_or_default(),
        other => other.to_string(),
    }
}

fn unwrap_string(value: &Value) -> Value {
    match value {
        Value::Object(map) if map.len() == 1 && map.keys().all(|k| k.starts_with('$')) => {
            Value::String(plain_string(value))
        }
        other => other.clone(),
    }
}

/// Millis, `{"$date": millis | iso | {"$numberLong": "millis"}}` or an RFC 3339 string.
pub(crate) fn timestamp(value: &Value) -> Result<DateTime<Utc>, EventError> {
    let bad = || EventError::Malformed(format!("created_at is not a timestamp: {value}"));
    match value {
        Value::Number(n) => n.as_i64().and_then(|ms| Utc.timestamp_millis_opt(ms).single()).ok_or_else(bad),
        Value::String(s) => DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).map_err(|_| bad()),
        Value::Object(map) => match map.get("$date").or_else(|| map.get("$numberLong")) {
            Some(Value::String(s)) if s.chars().all(|c| c.is_ascii_digit() || c == '-') => {
                s.parse::<i64>().ok().and_then(|ms| Utc.timestamp_millis_opt(ms).single()).ok_or_else(bad)
            }
            Some(inner) => timestamp(inner),
            None => Err(bad()),
        },
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{MessageContent, UserId};

    fn sample() -> ChatMessage {
        let alice = UserId::parse("alice").expect("valid");
        let bob = UserId::parse("bob").expect("valid");
        ChatMessage {
            message_id: MessageId::new(),
            stream_id: StreamId::for_pair(&alice, &bob),
            sender_id: alice,
            receiver_id: Some(bob),
            recipients: Vec::new(),
            content: MessageContent::parse("hi <b>there</b>").expect("valid"),
            created_at: Utc.timestamp_millis_opt(1_760_000_000_123).single().expect("valid"),
            state: Default::default(),
        }
    }

    #[test]
    fn the_trace_travels_in_events_but_not_in_api_json() {
        let mut traced = sample();
        traced.state.trace = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let flat = ChangeEvent::new(ChangeOp::Create, traced.clone(), 1).to_flattened();
        assert_eq!(flat["trace"], json!(traced.state.trace));
        let back = ChangeEvent::parse(&serde_json::to_vec(&flat).expect("json")).expect("parses");
        assert_eq!(back.message.state.trace, traced.state.trace);
        let api = serde_json::to_value(&traced).expect("json");
        assert!(api.get("trace").is_none(), "{api}");
    }

    #[test]
    fn edits_deletions_and_reactions_travel_and_dedup_by_version() {
        let at = Utc.timestamp_millis_opt(1_760_000_100_000).single().expect("valid");
        let mut edited = sample();
        edited.content = MessageContent::parse("fixed").expect("valid");
        edited.state.edited_at = Some(at);
        edited.state.version = 1;
        edited.state.reactions.insert("👍".into(), 2);
        let event = ChangeEvent::new(ChangeOp::Update, edited.clone(), 7);
        let back = ChangeEvent::parse(&serde_json::to_vec(&event.to_flattened()).expect("json")).expect("parses");
        assert_eq!(back.message, edited);
        assert_eq!(back.dedup_id(), format!("{}.v1", edited.message_id));
        let mut deleted = edited.clone();
        deleted.content = MessageContent::removed();
        deleted.state.deleted_at = Some(at);
        deleted.state.version = 2;
        let event = ChangeEvent::new(ChangeOp::Update, deleted.clone(), 8);
        let back = ChangeEvent::parse(&serde_json::to_vec(&event.to_flattened()).expect("json")).expect("parses");
        assert_eq!(back.message, deleted);
        assert_ne!(back.dedup_id(), format!("{}.v1", edited.message_id));
        // Debezium publishes the stored document: reactions as hex(emoji) → users.
        let mut stored = event.to_flattened();
        stored["reactions"] = json!({ hex::encode("🎉"): ["alice", "bob", "carol"], hex::encode("👀"): [] });
        let back = ChangeEvent::parse(&serde_json::to_vec(&stored).expect("json")).expect("parses");
        assert_eq!(back.message.state.reactions.get("🎉"), Some(&3));
        assert_eq!(back.message.state.reactions.len(), 1);
        // Content without a deletion mark, or a deletion with content, is refused.
        let mut forged = event.to_flattened();
        forged["content"] = json!("back from the dead");
        assert!(ChangeEvent::parse(&serde_json::to_vec(&forged).expect("json")).is_err());
    }

    #[test]
    fn flattened_round_trip() {
        let event = ChangeEvent::new(ChangeOp::Create, sample(), 1_760_000_000_200);
        let bytes = serde_json::to_vec(&event.to_flattened()).expect("serialize");
        assert_eq!(ChangeEvent::parse(&bytes), Ok(event));
    }

    #[test]
    fn a_group_message_carries_its_recipients_as_stored_and_reads_either_form() {
        let user = |raw: &str| UserId::parse(raw).expect("valid");
        let group = ChatMessage {
            stream_id: StreamId::new_group(),
            receiver_id: None,
            recipients: vec![user("bob"), user("carol")],
            ..sample()
        };
        let event = ChangeEvent::new(ChangeOp::Create, group, 1_760_000_000_200);
        let mut flat = event.to_flattened();
        assert_eq!(flat["recipients"], json!("bob carol"), "one string, as the document stores it");
        assert_eq!(ChangeEvent::parse(&serde_json::to_vec(&flat).expect("json")), Ok(event.clone()));
        flat["recipients"] = json!(["bob", "carol"]);
        assert_eq!(ChangeEvent::parse(&serde_json::to_vec(&flat).expect("json")), Ok(event.clone()));
        flat["recipients"] = json!("bob c/arol");
        assert!(ChangeEvent::parse(&serde_json::to_vec(&flat).expect("json")).is_err(), "ids are still parsed");
    }

    #[test]
    fn raw_debezium_envelope_with_extended_json_string() {
        let m = sample();
        let after = json!({
            "_id": m.message_id.to_string(),
            "message_id": m.message_id.to_string(),
            "stream_id": m.stream_id.to_string(),
            "sender_id": "alice",
            "receiver_id": "bob",
            "content": "hi <b>there</b>",
            "created_at": {"$date": 1_760_000_000_123_i64},
            "outbox_pending": true
        })
        .to_string();
        let record = json!({
            "schema": {"type": "struct"},
            "payload": {"before": null, "after": after, "op": "c", "source": {"ts_ms": 5}, "ts_ms": 6}
        });
        let event = ChangeEvent::parse(record.to_string().as_bytes()).expect("parses");
        assert_eq!(event.op, ChangeOp::Create);
        assert_eq!(event.source_ts_ms, 5);
        assert_eq!(event.message, m);
    }

    #[test]
    fn updates_have_their_own_dedup_id() {
        let create = ChangeEvent::new(ChangeOp::Create, sample(), 1);
        let update = ChangeEvent::new(ChangeOp::Update, create.message.clone(), 2);
        assert_eq!(create.dedup_id(), create.message.message_id.to_string());
        assert_ne!(create.dedup_id(), update.dedup_id());
    }

    #[test]
    fn bad_records_are_malformed_or_unroutable() {
        assert!(matches!(ChangeEvent::parse(b"not json"), Err(EventError::Malformed(_))));
        assert!(matches!(ChangeEvent::parse(b"[1]"), Err(EventError::Malformed(_))));
        let mut doc = ChangeEvent::new(ChangeOp::Create, sample(), 1).to_flattened();
        doc["stream_id"] = json!("0000000000000000");
        assert!(matches!(ChangeEvent::parse(doc.to_string().as_bytes()), Err(EventError::Malformed(_))));
        let hard_delete = json!({"_id": MessageId::new().to_string(), "__op": "d", "__deleted": "true"});
        assert!(matches!(ChangeEvent::parse(hard_delete.to_string().as_bytes()), Err(EventError::Unroutable(_))));
        let no_doc = json!({"op": "d", "before": null, "after": null, "source": {}});
        assert!(matches!(ChangeEvent::parse(no_doc.to_string().as_bytes()), Err(EventError::Unroutable(_))));
    }
}
