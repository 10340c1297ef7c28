//! Whether the event store can currently reach Redis, and the metrics that say so.
//!
//! Why this module exists: failing open keeps consumers running through a Redis outage,
//! but silently — every event is processed without deduplication. Operators must see
//! that, without a log line per event drowning everything else. So the store logs one
//! warning when an outage starts and one line when it ends, keeps an `eventstore_up`
//! gauge, and counts every operation that failed open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::EventStoreError;

/// Gauge, `prefix` label: 1 while Redis answers, 0 during an outage.
pub const METRIC_UP: &str = "eventstore_up";
/// Counter, `prefix` and `operation` labels: operations that failed open.
pub const METRIC_UNAVAILABLE: &str = "eventstore_unavailable_total";
/// Counter, `prefix` and `outcome` labels (`acquired`, `already_done`, `in_progress`,
/// `unavailable`): claims by outcome.
pub const METRIC_CLAIMS: &str = "eventstore_claims_total";
/// Counter, `prefix` label: events marked done after their lease had expired (another
/// consumer may have processed them too; the lease is too short for the handler).
pub const METRIC_LEASE_LOST: &str = "eventstore_lease_lost_total";

/// Registers the metric descriptions (idempotent, cheap).
pub(crate) fn describe() {
    metrics::describe_gauge!(METRIC_UP, "1 while the event store reaches Redis, 0 during an outage");
    metrics::describe_counter!(
        METRIC_UNAVAILABLE,
        "Event store operations that failed open (processed without deduplication)"
    );
    metrics::describe_counter!(METRIC_CLAIMS, "Event claims by outcome");
    metrics::describe_counter!(METRIC_LEASE_LOST, "Events marked done after their processing lease had expired");
}

#[derive(Debug, Default)]
struct Outage {
    /// `None` before the first answer or failure.
    up: Option<bool>,
    since: Option<Instant>,
    failed_open: u64,
}

/// The health of one store (shared by its clones).
#[derive(Debug)]
pub(crate) struct Health {
    prefix: String,
    up: AtomicBool,
    outage: Mutex<Outage>,
}

impl Health {
    pub(crate) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), up: AtomicBool::new(false), outage: Mutex::new(Outage::default()) }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the last operation reached Redis (false before the first one).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outage> {
        // The state is a few plain fields: a panic elsewhere cannot leave it broken.
        self.outage.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Redis answered.
    pub(crate) fn success(&self) {
        if self.up.load(Ordering::Relaxed) {
            return;
        }
        let mut outage = self.lock();
        if outage.up == Some(true) {
            return;
        }
        let was_down = outage.up == Some(false);
        outage.up = Some(true);
        self.up.store(true, Ordering::Relaxed);
        metrics::gauge!(METRIC_UP, "prefix" => self.prefix.clone()).set(1.0);
        if was_down {
            let lasted = outage.since.map(|since| since.elapsed()).unwrap_or_default();
            tracing::info!(
                prefix = %self.prefix,
                outage_secs = lasted.as_secs_f64(),
                failed_open = outage.failed_open,
                "event store available again, deduplication resumed"
            );
        }
        outage.since = None;
        outage.failed_open = 0;
    }

    /// Redis did not answer (or answered with an error). `operation` is counted as
    /// failed open when `failed_open` is set.
    pub(crate) fn failure(&self, operation: &'static str, error: &EventStoreError, failed_open: bool) {
        if failed_open {
            metrics::counter!(METRIC_UNAVAILABLE, "prefix" => self.prefix.clone(), "operation" => operation)
                .increment(1);
        }
        let mut outage = self.lock();
        if failed_open {
            outage.failed_open += 1;
        }
        if outage.up == Some(false) {
            tracing::debug!(prefix = %self.prefix, operation, %error, "event store still unavailable");
            return;
        }
        outage.up = Some(false);
        outage.since = Some(Instant::now());
        self.up.store(false, Ordering::Relaxed);
        metrics::gauge!(METRIC_UP, "prefix" => self.prefix.clone()).set(0.0);
        tracing::warn!(
            prefix = %self.prefix,
            operation,
            %error,
            "event store unavailable, processing without deduplication"
        );
    }
}
