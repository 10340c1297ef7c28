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

use mongodb::bson::doc;
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

/// The lease task: acquires, renews and finally releases the lease.
pub struct Lease {
    store: Store,
    name: String,
    holder: String,
    ttl: Duration,
    tx: watch::Sender<Leadership>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Lease {
    /// A lease named `name` (the topic the relay publishes to) held for `ttl`.
    pub fn new(store: Store, name: &str, ttl: Duration) -> (Self, LeaseHandle) {
        let (tx, rx) = watch::channel(Leadership::NONE);
        let holder = uuid::Uuid::now_v7().to_string();
        (Self { store, name: name.to_owned(), holder, ttl, tx }, LeaseHandle { rx })
    }

    /// This replica's holder id (logged, and visible in `relay_leases`).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// One acquire-or-renew attempt; `true` when this replica holds the lease.
    async fn try_acquire(&self) -> Result<bool, StoreError> {
        let now = now_ms();
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let filter = doc! {
            "_id": &self.name,
            "$or": [ { "holder": &self.holder }, { "expires_at": { "$lt": now } } ],
        };
        let update = doc! { "$set": { "holder": &self.holder, "expires_at": now + ttl_ms } };
        let op =
            self.store.leases().find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After);
        match self.store.run(op).await {
            Ok(Some(lease)) => Ok(lease.get_str("holder").is_ok_and(|h| h == self.holder)),
            // Another live holder: MongoDB refuses the upsert as a duplicate _id
            // (nx-27017 answers with no document instead).
            Ok(None) | Err(StoreError::Duplicate(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the lease up so another replica can take over at once.
    async fn release(&self) {
        let filter = doc! { "_id": &self.name, "holder": &self.holder };
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
            metrics::gauge!("relay_is_leader").set(if leader { 1.0 } else { 0.0 });

            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep_until((attempt + renew_every).into()) => {}
            }
        }
        self.tx.send_replace(Leadership::NONE);
        metrics::gauge!("relay_is_leader").set(0.0);
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
}
