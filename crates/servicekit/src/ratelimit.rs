//! Token buckets per key (a user id, a client address) for abuse limits.
//!
//! Why this module exists: every write endpoint and every socket endpoint must stop
//! one caller from starving the others, and they must all do it the same way: a
//! bucket of `burst` tokens per key, refilled at `per_second`, one token per
//! request; an empty bucket answers `429` with the wait until the next token. The
//! map of buckets is bounded: when it reaches its cap, buckets that have refilled
//! completely (idle callers) are dropped, and if none has, the oldest are, so a
//! flood of fresh keys costs memory only up to the cap and never an unbounded map.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ApiError;

/// A rate: `per_second` sustained, up to `burst` at once. `per_second == 0` turns
/// the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self { per_second, burst: burst.max(1.0) }
    }

    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by `K`, at most `max_keys` of them.
pub struct KeyedLimiter<K> {
    name: &'static str,
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    /// A limiter named `name` (the `limit` label of `rate_limited_total`).
    pub fn new(name: &'static str, rate: Rate, max_keys: usize) -> Self {
        Self { name, rate, max_keys: max_keys.max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// [`KeyedLimiter::check`] answered as the API's `429`.
    pub fn admit(&self, key: &K, what: &str) -> Result<(), ApiError> {
        self.check(key).map_err(|wait| {
            metrics::counter!("rate_limited_total", "limit" => self.name).increment(1);
            // Whole seconds for Retry-After, never 0.
            let retry_after = Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64);
            ApiError::too_many_requests(format!("too many {what}; retry later"), retry_after)
        })
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            self.evict(&mut buckets, now);
        }
        let rate = self.rate;
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: rate.burst, updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(rate.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate.per_second))
        }
    }

    /// Drops the buckets that are full again (their callers went quiet); if every
    /// caller is active, the half that was updated longest ago.
    fn evict(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let rate = self.rate;
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate.per_second < rate.burst
        });
        if buckets.len() >= self.max_keys {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.updated).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            buckets.retain(|_, b| b.updated > cutoff);
        }
        metrics::counter!("rate_limiter_evictions_total", "limit" => self.name).increment(1);
    }

    /// Buckets currently held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts per key with a cap (open sockets per user or per address): a slot is
/// held while its guard lives.
pub struct KeyedCounter<K: Eq + Hash + Clone> {
    limit: usize,
    counts: std::sync::Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Clone> Clone for KeyedCounter<K> {
    fn clone(&self) -> Self {
        Self { limit: self.limit, counts: self.counts.clone() }
    }
}

/// One held slot of a [`KeyedCounter`]; dropping it frees the slot.
pub struct Slot<K: Eq + Hash + Clone> {
    key: K,
    counts: std::sync::Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedCounter<K> {
    /// At most `limit` slots per key; `0` means no limit.
    pub fn new(limit: usize) -> Self {
        Self { limit, counts: Default::default() }
    }

    /// A slot for `key`, or `None` when the key holds `limit` already.
    pub fn acquire(&self, key: &K) -> Option<Slot<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        if self.limit != 0 && *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot { key: key.clone(), counts: self.counts.clone() })
    }

    /// Slots currently held by `key`.
    pub fn held(&self, key: &K) -> usize {
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limiter = KeyedLimiter::new("t", Rate::new(2.0, 3.0), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at(&"alice", t0).is_ok());
        }
        let wait = limiter.check_at(&"alice", t0).expect_err("burst spent");
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO, "{wait:?}");
        // Another key is not affected.
        assert!(limiter.check_at(&"bob", t0).is_ok());
        // Half a second later one token is back.
        assert!(limiter.check_at(&"alice", t0 + Duration::from_millis(500)).is_ok());
        assert!(limiter.check_at(&"alice", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_zero_rate_is_off() {
        let limiter = KeyedLimiter::new("t", Rate::new(0.0, 0.0), 1);
        for _ in 0..1000 {
            assert!(limiter.check(&"x").is_ok());
        }
        assert!(limiter.is_empty());
    }

    #[test]
    fn the_map_stays_bounded_under_a_flood_of_keys() {
        let limiter = KeyedLimiter::new("t", Rate::new(1.0, 5.0), 64);
        let t0 = Instant::now();
        for i in 0..10_000 {
            let _ = limiter.check_at(&i, t0);
            assert!(limiter.len() <= 64);
        }
        // A fresh key still gets its burst.
        assert!(limiter.check_at(&-1, t0).is_ok());
    }

    #[test]
    fn admit_answers_429_with_retry_after() {
        let limiter = KeyedLimiter::new("t", Rate::new(0.5, 1.0), 10);
        assert!(limiter.admit(&"a", "messages").is_ok());
        let err = limiter.admit(&"a", "messages").expect_err("limited");
        assert_eq!(err.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.retry_after, Some(Duration::from_secs(2)));
    }

    #[test]
    fn counter_slots_are_capped_and_freed_on_drop() {
        let counter = KeyedCounter::new(2);
        let a = counter.acquire(&"u").expect("first");
        let _b = counter.acquire(&"u").expect("second");
        assert!(counter.acquire(&"u").is_none());
        assert!(counter.acquire(&"v").is_some());
        drop(a);
        assert_eq!(counter.held(&"u"), 1);
        assert!(counter.acquire(&"u").is_some());
        let unlimited = KeyedCounter::new(0);
        let slots: Vec<_> = (0..100).filter_map(|_| unlimited.acquire(&"u")).collect();
        assert_eq!(slots.len(), 100);
    }
}
