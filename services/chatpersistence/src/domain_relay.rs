//! Capture of the domain collections (purchases, payments, shipments) where Debezium
//! is not deployed.
//!
//! Why this module exists: in production Debezium captures those collections (see
//! `debezium/*-connector.json`); the local stack, CI and small installs have no
//! Debezium, yet the notification and email pipelines must see the same events. The
//! services that write those documents set `outbox_pending: true` in the same write
//! (and `outbox_op: "u"` on updates); this relay publishes every marked document to
//! its topic (`purchases.changes`, …) keyed by `user_id`, in the flattened Debezium
//! format, and clears the marker only after the broker acknowledged the record.
//!
//! It runs under its own lease, so one replica captures at a time. Unlike chat
//! messages nothing here is inserted by this process, so it polls
//! (`RELAY_POLL_INTERVAL`). At least once: a crash between publish and clear publishes
//! the document again, and consumers deduplicate by document, status and change time.
//! The clear is conditional on the status it published, so a newer status written in
//! between keeps its marker and is published too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatstream::domain::DomainKind;
use futures::TryStreamExt;
use kafkawrapper::Producer;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{Map, Value};
use servicekit::Shutdown;

use crate::lease::LeaseHandle;
use crate::store::Store;

pub struct DomainRelay {
    store: Store,
    producer: Producer,
    brokers: String,
    lease: LeaseHandle,
    poll: Duration,
    batch: i64,
    partitions: i32,
}

impl DomainRelay {
    pub fn new(
        store: Store,
        producer: Producer,
        brokers: String,
        lease: LeaseHandle,
        poll: Duration,
        batch: u32,
        partitions: i32,
    ) -> Self {
        Self { store, producer, brokers, lease, poll, batch: i64::from(batch.max(1)), partitions }
    }

    pub async fn run(self, shutdown: Shutdown) -> Result<(), String> {
        let topics: Vec<(&str, i32)> = DomainKind::ALL.iter().map(|k| (k.topic(), self.partitions)).collect();
        // The local broker does not auto-create topics; retried by the loop below.
        let mut topics_ready = false;
        let mut failures = crate::event_relay::failure_backoff(self.poll);
        while !shutdown.is_triggered() {
            if !topics_ready {
                match kafkawrapper::ensure_topics(&self.brokers, &topics).await {
                    Ok(()) => topics_ready = true,
                    Err(err) => tracing::warn!(error = %err, "domain topics not ready yet"),
                }
            }
            let mut wait = self.poll;
            if topics_ready && self.lease.is_leader() {
                let mut failed = false;
                for kind in DomainKind::ALL {
                    if let Err(err) = self.cycle(kind).await {
                        metrics::counter!("domain_relay_failures_total", "kind" => kind.name()).increment(1);
                        tracing::warn!(kind = kind.name(), error = %err, "domain capture round failed; retrying");
                        failed = true;
                    }
                }
                wait = if failed {
                    failures.next().unwrap_or(crate::event_relay::FAILURE_MAX_BACKOFF)
                } else {
                    failures = crate::event_relay::failure_backoff(self.poll);
                    self.poll
                };
            }
            tokio::select! {
                _ = shutdown.wait() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(())
    }

    /// Publishes one batch of marked documents of `kind` and clears their markers.
    async fn cycle(&self, kind: DomainKind) -> Result<(), String> {
        let collection = self.store.collection(kind.collection());
        let find = async {
            collection
                .find(doc! { "outbox_pending": { "$exists": true } })
                .sort(doc! { "_id": 1 })
                .limit(self.batch)
                .await?
                .try_collect::<Vec<Document>>()
                .await
        };
        let documents = self.store.run(find).await.map_err(|e| e.to_string())?;
        for document in documents {
            let Some(id) = document.get("_id").cloned() else { continue };
            let status = document.get("status").cloned();
            let (key, value) = flatten(&document);
            let payload = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
            self.producer.send(kind.topic(), key.as_bytes(), &payload, &[]).await.map_err(|e| e.to_string())?;
            metrics::counter!("domain_relay_published_total", "kind" => kind.name()).increment(1);
            let mut filter = doc! { "_id": { "$eq": id } };
            if let Some(status) = status {
                filter.insert("status", doc! { "$eq": status });
            }
            let clear = collection.update_one(filter, doc! { "$unset": { "outbox_pending": "", "outbox_op": "" } });
            self.store.run(clear).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The record key (`user_id`, or the document id when it has none, so the consumer
/// can dead-letter it) and the flattened value: the document's fields with dates as
/// epoch milliseconds (as Debezium writes them), plus `__op`, `__source_ts_ms` and
/// `__deleted`.
fn flatten(document: &Document) -> (String, Value) {
    let mut out = Map::new();
    for (name, value) in document {
        if name == "outbox_pending" || name == "outbox_op" {
            continue;
        }
        let plain = match value {
            Bson::DateTime(at) => Value::from(at.timestamp_millis()),
            Bson::ObjectId(oid) => Value::String(oid.to_hex()),
            other => other.clone().into_relaxed_extjson(),
        };
        out.insert(name.clone(), plain);
    }
    let op = match document.get_str("outbox_op") {
        Ok("u") => "u",
        _ => "c",
    };
    out.insert("__op".into(), Value::String(op.into()));
    out.insert("__source_ts_ms".into(), Value::from(now_ms()));
    out.insert("__deleted".into(), Value::String("false".into()));
    let key = match (document.get_str("user_id"), document.get("_id")) {
        (Ok(user), _) => user.to_owned(),
        (Err(_), Some(Bson::String(id))) => id.clone(),
        (Err(_), Some(other)) => other.to_string(),
        (Err(_), None) => String::new(),
    };
    (key, Value::Object(out))
}

#[cfg(test)]
mod tests {
    use chatstream::domain::DomainEvent;
    use mongodb::bson::DateTime;

    use super::*;

    #[test]
    fn a_marked_shipment_flattens_to_what_consumers_parse() {
        let document = doc! {
            "_id": "shp-1", "shipment_id": "shp-1", "user_id": "dave", "status": "shipped",
            "carrier": "DHL", "updated_at": DateTime::from_millis(1_760_000_000_000),
            "outbox_pending": true, "outbox_op": "u",
        };
        let (key, value) = flatten(&document);
        assert_eq!(key, "dave");
        assert_eq!(value["__op"], "u");
        assert!(value.get("outbox_pending").is_none());
        assert_eq!(value["updated_at"], 1_760_000_000_000_i64);
        let bytes = serde_json::to_vec(&value).expect("serialize");
        let event = DomainEvent::parse(DomainKind::Shipping, &bytes).expect("consumers read it");
        assert_eq!(event.document.user_id().as_str(), "dave");
    }
}
