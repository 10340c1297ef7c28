//! The relay lease: at most one outbox relay publishes at a time across all
//! chatpersistence replicas sharing a MongoDB.
//!
//! Why this module exists: two relays scanning the same outbox would publish every
//! message twice and interleave each other's batches, breaking per-stream order. The
//! lease is one document in `relay_leases`, `{_id: <topic>, holder: <instance id>,
//! expires_at: <ms since the epoch>}`, taken or renewed with one conditional upsert
//! (`holder == me OR expires_at < now`). The holder renews every TTL/3; a replica
//! that cannot renew stops publishing at once, and a dead holder is replaced by the
//! next replica whose attempt comes after `expires_at`, i.e. within about TTL + TTL/3.
//!
//! `expires_at` is a number of milliseconds rather than a BSON date: the local
//! MongoDB stand-in (nx-27017) stores dates written by `$set` as strings, which would
//! not compare as dates. Replicas' clocks must agree to well within the TTL; a
//! skewed clock can only cause a short overlap (duplicates, which consumers drop),
//! never a gap.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mongodb::bson::{doc, Document};
use mongodb::options::ReturnDocument;
use servicekit::Shutdown;
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// Whether this replica may publish, and until when without another renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub until: Option<Instant>,
}

impl Leadership {
    const NONE: Self = Self { until: None };

    pub fn is_leader(&self) -> bool {
        self.until.is_some_and(|until| Instant::now() < until)
    }
}

/// The relay's read side of the lease.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    rx: watch::Receiver<Leadership>,
}

impl LeaseHandle {
    /// Holding the lease right now (checked before every scan and publish).
    pub fn is_leader(&self) -> bool {
        self.rx.borrow().is_leader()
    }

    /// Resolves when leadership changes (gained, renewed or lost).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The lease task is gone (shutdown): never resolve again.
            std::future::pending::<()>().await;
        }
    }
}

/// The acquire-or-renew filter of lease `name` for `holder` at `now`: this lease's
/// document, and it is ours or expired.
///
/// The `_id` condition and the `$or` are written as one `$and` on purpose. To MongoDB
/// `{_id: n, $or: [a, b]}` is the same query, but the local stand-in (nx-27017 on
/// neosqlite 1.17) translates that form into SQL without parentheses,
/// `_id = n AND a OR b`, so the upsert matched *any* expired lease document (or any
/// one this holder held) and one replica's `chat.changes` task renewed the
/// `conversation-events` document, or the reverse. With two replicas (six lease
/// tasks, three documents) the relay's lease could stay with nobody for minutes.
fn lease_filter(name: &str, holder: &str, now: i64) -> Document {
    doc! {
        "$and": [
            { "_id": { "$eq": name } },
            { "$or": [ { "holder": { "$eq": holder } }, { "expires_at": { "$lt": now } } ] },
        ],
    }
}

/// Whether the document the acquire-or-renew returned says `holder` holds lease
/// `name`. A document of another lease means the server matched the wrong one: an
/// error, never leadership.
fn held_by(lease: &Document, name: &str, holder: &str) -> Result<bool, StoreError> {
    match lease.get_str("_id") {
        Ok(id) if id == name => Ok(lease.get_str("holder").is_ok_and(|h| h == holder)),
        other => Err(StoreError::Other(format!(
            "the lease update of {name:?} returned the document {:?}: the server matched another lease",
            other.unwrap_or("(no string _id)")
        ))),
    }
}

/// The lease task: acquires, renews and finally releases the lease.
pub struct Lease {
    store: Store,
    name: String,
    holder: String,
    ttl: Duration,
    tx: watch::Sender<Leadership>,
    /// An extra unlabelled gauge set to 1 while held (`relay_is_leader` for the relay's).
    leader_gauge: Option<&'static str>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Lease {
    /// A lease named `name` (the topic the relay publishes to) held for `ttl`.
    pub fn new(store: Store, name: &str, ttl: Duration) -> (Self, LeaseHandle) {
        let (tx, rx) = watch::channel(Leadership::NONE);
        let holder = uuid::Uuid::now_v7().to_string();
        (Self { store, name: name.to_owned(), holder, ttl, tx, leader_gauge: None }, LeaseHandle { rx })
    }

    /// Also reports this lease as the unlabelled gauge `name` (1 while held). Every
    /// lease is reported as `capture_lease_held{lease}`; only the outbox relay's is
    /// `relay_is_leader`, so that gauge no longer flips with the other leases.
    pub fn reported_as(mut self, name: &'static str) -> Self {
        self.leader_gauge = Some(name);
        self
    }

    fn report(&self, held: bool) {
        let value = if held { 1.0 } else { 0.0 };
        metrics::gauge!("capture_lease_held", "lease" => self.name.clone()).set(value);
        if let Some(gauge) = self.leader_gauge {
            metrics::gauge!(gauge).set(value);
        }
    }

    /// This replica's holder id (logged, and visible in `relay_leases`).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// One acquire-or-renew attempt; `true` when this replica holds the lease.
    async fn try_acquire(&self) -> Result<bool, StoreError> {
        let now = now_ms();
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let filter = lease_filter(&self.name, &self.holder, now);
        let update = doc! { "$set": { "holder": &self.holder, "expires_at": now + ttl_ms } };
        let op =
            self.store.leases().find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After);
        match self.store.run(op).await {
            Ok(Some(lease)) => held_by(&lease, &self.name, &self.holder),
            // Another live holder: MongoDB refuses the upsert as a duplicate _id
            // (nx-27017 answers with no document instead).
            Ok(None) | Err(StoreError::Duplicate(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the lease up so another replica can take over at once.
    async fn release(&self) {
        let filter = doc! { "_id": { "$eq": &self.name }, "holder": { "$eq": &self.holder } };
        let update = doc! { "$set": { "expires_at": 0_i64 } };
        match self.store.run(self.store.leases().update_one(filter, update)).await {
            Ok(_) => tracing::info!(lease = %self.name, holder = %self.holder, "relay lease released"),
            Err(err) => tracing::warn!(lease = %self.name, error = %err, "could not release the relay lease"),
        }
    }

    /// Acquires and renews every TTL/3 until shutdown, then releases.
    pub async fn run(self, shutdown: Shutdown) {
        let renew_every = (self.ttl / 3).max(Duration::from_millis(100));
        // Leadership is trusted locally for a little less than the TTL, so this
        // replica stops before a successor may start even with some clock skew.
        let trusted_for = self.ttl - self.ttl / 5;
        let mut leader = false;
        let mut stop = std::pin::pin!(shutdown.wait());
        loop {
            let attempt = Instant::now();
            let outcome = self.try_acquire().await;
            let now_leader = match outcome {
                Ok(held) => held,
                Err(ref err) => {
                    tracing::warn!(lease = %self.name, error = %err, "relay lease renewal failed; not publishing");
                    false
                }
            };
            let state = if now_leader { Leadership { until: Some(attempt + trusted_for) } } else { Leadership::NONE };
            self.tx.send_replace(state);
            if now_leader != leader {
                if now_leader {
                    tracing::info!(lease = %self.name, holder = %self.holder, "relay became leader");
                } else {
                    tracing::warn!(lease = %self.name, holder = %self.holder, "relay lost leadership");
                }
                leader = now_leader;
            }
            self.report(leader);

            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep_until((attempt + renew_every).into()) => {}
            }
        }
        self.tx.send_replace(Leadership::NONE);
        self.report(false);
        if leader {
            self.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_expires_locally() {
        assert!(!Leadership::NONE.is_leader());
        assert!(Leadership { until: Some(Instant::now() + Duration::from_secs(1)) }.is_leader());
        assert!(!Leadership { until: Instant::now().checked_sub(Duration::from_millis(1)) }.is_leader());
    }

    #[test]
    fn the_filter_is_one_and_of_the_lease_id_and_the_or() {
        let filter = lease_filter("chat.changes", "me", 42);
        // A single top-level `$and`: the stand-in mis-parenthesises `_id` beside `$or`.
        assert_eq!(filter.keys().collect::<Vec<_>>(), vec!["$and"], "{filter}");
        let and = filter.get_array("$and").expect("an array");
        assert_eq!(and[0].as_document(), Some(&doc! { "_id": { "$eq": "chat.changes" } }));
        let or = doc! { "$or": [ { "holder": { "$eq": "me" } }, { "expires_at": { "$lt": 42_i64 } } ] };
        assert_eq!(and[1].as_document(), Some(&or));
    }

    #[test]
    fn only_this_leases_document_held_by_this_holder_is_leadership() {
        let ours = doc! { "_id": "chat.changes", "holder": "me", "expires_at": 1_i64 };
        assert_eq!(held_by(&ours, "chat.changes", "me"), Ok(true));
        assert_eq!(held_by(&ours, "chat.changes", "someone else"), Ok(false));
        let other = doc! { "_id": "conversation-events", "holder": "me", "expires_at": 1_i64 };
        assert!(matches!(held_by(&other, "chat.changes", "me"), Err(StoreError::Other(_))), "another lease's document");
    }
}
