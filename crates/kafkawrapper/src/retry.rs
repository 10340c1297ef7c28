//! The fleet's one retry policy: an exponential, capped, jittered backoff described
//! by [`RetrySettings`] (`MESSAGE_RETRY_*`), used by the consumer for messages, by
//! the outbox relay while the broker or MongoDB is down, by the change handler for
//! model calls and failover closes, and by the email handler at start-up.
//!
//! Why this module exists: retries used to be written four ways (this crate on the
//! `backoff` crate, three hand-written doubling loops elsewhere), each with its own
//! cap, no jitter and its own tests of its own arithmetic. Now every retry is a
//! [`RetrySettings`] value, and the waiting and counting is done by the `backon`
//! crate. `backon` replaces `backoff`, which the design named: `backoff` 0.4 is
//! unmaintained (RUSTSEC-2025-0012) and pulls the unmaintained `instant`
//! (RUSTSEC-2024-0384); `backon` is maintained and needs only `fastrand`. Its own
//! jitter adds `[0, delay)`, not the documented `± randomization_factor`, so
//! [`Backoff`] adds that on top of `backon`'s un-jittered exponential schedule.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};

pub use backon::Retryable;

/// A retry schedule: exponential from `initial_interval` by `multiplier`, capped at
/// `max_interval`, each wait randomized by `± randomization_factor`, at most
/// `max_retries` waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrySettings {
    /// `MESSAGE_RETRY_MAX_RETRIES`: retries after the first attempt; a message is
    /// tried at most `max_retries + 1` times. 0 disables retries.
    pub max_retries: u32,
    /// `MESSAGE_RETRY_INITIAL_INTERVAL`: the wait before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// `MESSAGE_RETRY_MAX_INTERVAL`: the cap on the (unrandomized) wait.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// `MESSAGE_RETRY_MULTIPLIER`: each wait is the previous one times this.
    pub multiplier: f64,
    /// `MESSAGE_RETRY_RANDOMIZATION_FACTOR`: jitter; each wait is drawn uniformly
    /// from `interval * (1 ± factor)`, so pods retrying the same failing dependency
    /// spread out. 0 gives the exact schedule.
    pub randomization_factor: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: 5,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(30),
            multiplier: 2.0,
            randomization_factor: 0.1,
        }
    }
}

impl RetrySettings {
    /// The documented environment variables, as `(VARIABLE, field)`.
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("MESSAGE_RETRY_MAX_RETRIES", "max_retries"),
        ("MESSAGE_RETRY_INITIAL_INTERVAL", "initial_interval"),
        ("MESSAGE_RETRY_MAX_INTERVAL", "max_interval"),
        ("MESSAGE_RETRY_MULTIPLIER", "multiplier"),
        ("MESSAGE_RETRY_RANDOMIZATION_FACTOR", "randomization_factor"),
    ];

    /// A doubling schedule with the default jitter, for retries inside a service
    /// (not of messages) whose bounds are fixed in code or by a setting of their own.
    pub fn doubling(initial_interval: Duration, max_interval: Duration, max_retries: u32) -> Self {
        Self { max_retries, initial_interval, max_interval, ..Self::default() }
    }

    /// The waits before each retry: `max_retries` of them, then `None` (give up).
    pub fn backoff(&self) -> Backoff {
        self.build(Some(self.max_retries))
    }

    /// The same schedule without a count limit: it stays at the cap. For loops that
    /// never give up on a dependency (the relay, dead-letter publishing), whose bound
    /// is shutdown or the partition being given up.
    pub fn unbounded(&self) -> Backoff {
        self.build(None)
    }

    /// The unrandomized waits before each retry (`max_retries` entries), for logs and
    /// documentation.
    pub fn schedule(&self) -> Vec<Duration> {
        RetrySettings { randomization_factor: 0.0, ..self.clone() }.backoff().collect()
    }

    /// The unrandomized wait before retry `n` (1-based), for a retry whose attempt
    /// count is stored elsewhere (a pending digest); past the schedule, the cap.
    pub fn wait_before(&self, n: u64) -> Duration {
        let skip = usize::try_from(n.saturating_sub(1)).unwrap_or(usize::MAX);
        RetrySettings { randomization_factor: 0.0, ..self.clone() }.unbounded().nth(skip).unwrap_or(self.max_interval)
    }

    fn build(&self, max_times: Option<u32>) -> Backoff {
        let multiplier = if self.multiplier.is_finite() && self.multiplier >= 1.0 { self.multiplier } else { 1.0 };
        let jitter =
            if self.randomization_factor.is_finite() { self.randomization_factor.clamp(0.0, 1.0) } else { 0.0 };
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.initial_interval.min(self.max_interval))
            .with_max_delay(self.max_interval)
            .with_factor(multiplier as f32);
        let builder = match max_times {
            Some(n) => builder.with_max_times(n as usize),
            None => builder.without_max_times(),
        };
        Backoff { inner: builder.build(), jitter, rng: fastrand::Rng::new() }
    }
}

impl BackoffBuilder for &RetrySettings {
    type Backoff = Backoff;

    fn build(self) -> Backoff {
        self.backoff()
    }
}

/// The waits of one retry sequence (an iterator: `None` means give up). Start a new
/// one (or call [`RetrySettings::backoff`] again) to reset it.
#[derive(Debug)]
pub struct Backoff {
    inner: backon::ExponentialBackoff,
    jitter: f64,
    rng: fastrand::Rng,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.inner.next()?;
        // `backon` computes in f32; whole microseconds keep schedules readable.
        let micros = (wait.as_secs_f64() * 1e6 * (1.0 + self.jitter * (2.0 * self.rng.f64() - 1.0))).round();
        Some(Duration::from_micros(micros.max(0.0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(waits: impl IntoIterator<Item = Duration>) -> Vec<u128> {
        waits.into_iter().map(|d| d.as_millis()).collect()
    }

    #[test]
    fn the_settings_shape_the_schedule() {
        let retry = RetrySettings {
            max_retries: 7,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(1000),
            multiplier: 2.0,
            randomization_factor: 0.0,
        };
        assert_eq!(ms(retry.schedule()), vec![100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(ms(retry.backoff()), ms(retry.schedule()), "no jitter: the exact schedule, then give up");
        assert_eq!(ms(retry.unbounded().take(10)).len(), 10, "unbounded never gives up");
        assert_eq!(retry.wait_before(2), Duration::from_millis(200));
        assert_eq!(retry.wait_before(50), Duration::from_millis(1000));

        let other = RetrySettings { multiplier: 3.0, initial_interval: Duration::from_millis(10), ..retry.clone() };
        assert_eq!(ms(other.schedule()), vec![10, 30, 90, 270, 810, 1000, 1000]);
    }

    #[test]
    fn default_schedule_matches_the_documentation() {
        assert_eq!(ms(RetrySettings::default().schedule()), vec![100, 200, 400, 800, 1600]);
    }

    #[test]
    fn randomized_waits_stay_within_the_factor() {
        let retry = RetrySettings {
            max_retries: 3,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(10),
            multiplier: 2.0,
            randomization_factor: 0.5,
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let waits: Vec<f64> = retry.backoff().map(|d| d.as_secs_f64() * 1000.0).collect();
            assert_eq!(waits.len(), 3);
            for (wait, base) in waits.iter().zip([100.0f64, 200.0, 400.0]) {
                assert!(*wait >= base * 0.5 - 1.0 && *wait <= base * 1.5 + 1.0, "{wait} not within 50% of {base}");
            }
            seen.insert(waits[0] as u64);
        }
        assert!(seen.len() > 1, "jitter must vary the waits");
    }

    #[test]
    fn nonsense_retry_values_are_made_safe() {
        let retry = RetrySettings {
            max_retries: 2,
            initial_interval: Duration::from_secs(60),
            max_interval: Duration::from_secs(1),
            multiplier: 0.5,
            randomization_factor: f64::NAN,
        };
        assert_eq!(retry.schedule(), vec![Duration::from_secs(1), Duration::from_secs(1)]);
    }

    #[tokio::test]
    async fn retryable_stops_after_max_retries_and_on_a_final_error() {
        let policy = RetrySettings::doubling(Duration::from_millis(1), Duration::from_millis(4), 3);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let result: Result<(), &str> = (|| async {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err("down")
        })
        .retry(&policy)
        .await;
        assert_eq!(result, Err("down"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 4, "first attempt + 3 retries");

        calls.store(0, std::sync::atomic::Ordering::Relaxed);
        let result: Result<(), &str> = (|| async {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err("final")
        })
        .retry(&policy)
        .when(|e| *e != "final")
        .await;
        assert_eq!(result, Err("final"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
