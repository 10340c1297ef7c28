//! Event store settings and their documented environment variables.
//!
//! Why this module exists: every consumer service embeds the same event store section
//! in its settings, and operators configure it with the same variable names everywhere
//! (`REDIS_URL`, `DEDUPLICATION_TTL`, ...). The defaults live here, in code, and
//! [`EventStoreSettings::ENV`] plugs into `servicekit::EnvMap::section`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the event store reaches Redis and how long it remembers events.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventStoreSettings {
    /// `REDIS_URL`: the Redis to keep the markers in.
    pub redis_url: String,
    /// `DEDUPLICATION_TTL`: how long a `done` marker is kept. A redelivery later than
    /// this is processed again. `5m` covers rebalances and crash restarts; use hours for
    /// consumers whose backlog can be replayed long after the fact (notifications, mail).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// `EVENT_STORE_KEY_PREFIX`: keeps event kinds apart (`chat-cdc`, `email-events`).
    pub key_prefix: String,
    /// `EVENT_STORE_PROCESSING_LEASE`: how long a claim keeps other consumers off an
    /// event. It must be longer than handling an event normally takes; if it expires
    /// first another consumer may process the event as well.
    #[serde(with = "humantime_serde")]
    pub processing_lease: Duration,
    /// `REDIS_TIMEOUT`: the most one Redis operation may take, connecting included.
    /// When it passes the store fails open.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for EventStoreSettings {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            ttl: Duration::from_secs(5 * 60),
            key_prefix: "chat-cdc".to_owned(),
            processing_lease: Duration::from_secs(30),
            timeout: Duration::from_millis(500),
        }
    }
}

impl EventStoreSettings {
    /// The documented environment variables, as `(VARIABLE, field)` pairs.
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("REDIS_URL", "redis_url"),
        ("DEDUPLICATION_TTL", "ttl"),
        ("EVENT_STORE_KEY_PREFIX", "key_prefix"),
        ("EVENT_STORE_PROCESSING_LEASE", "processing_lease"),
        ("REDIS_TIMEOUT", "timeout"),
    ];
}

/// Like the derived `Debug`, but a password in the URL is not printed.
impl fmt::Debug for EventStoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStoreSettings")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("ttl", &self.ttl)
            .field("key_prefix", &self.key_prefix)
            .field("processing_lease", &self.processing_lease)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `redis://user:secret@host:6379/0` → `redis://***@host:6379/0`.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    match rest.rsplit_once('@') {
        Some((_, host)) if scheme.is_empty() => format!("***@{host}"),
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = EventStoreSettings::default();
        assert_eq!(s.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(s.ttl, Duration::from_secs(300));
        assert_eq!(s.key_prefix, "chat-cdc");
        assert_eq!(s.processing_lease, Duration::from_secs(30));
        assert_eq!(s.timeout, Duration::from_millis(500));
    }

    #[test]
    fn env_names_map_to_existing_fields() {
        let names: Vec<&str> = EventStoreSettings::ENV.iter().map(|(env, _)| *env).collect();
        assert_eq!(
            names,
            [
                "REDIS_URL",
                "DEDUPLICATION_TTL",
                "EVENT_STORE_KEY_PREFIX",
                "EVENT_STORE_PROCESSING_LEASE",
                "REDIS_TIMEOUT"
            ]
        );
        let serialized = serde_json::to_value(EventStoreSettings::default()).expect("serializes");
        for (env, field) in EventStoreSettings::ENV {
            assert!(serialized.get(field).is_some(), "{env} maps to unknown field {field}");
        }
    }

    #[test]
    fn durations_are_humantime() {
        let s: EventStoreSettings =
            serde_json::from_str(r#"{"ttl":"6h","processing_lease":"45s","timeout":"250ms"}"#).expect("parses");
        assert_eq!(s.ttl, Duration::from_secs(6 * 3600));
        assert_eq!(s.processing_lease, Duration::from_secs(45));
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.key_prefix, "chat-cdc", "missing fields keep their defaults");
    }

    #[test]
    fn debug_hides_the_password() {
        let s = EventStoreSettings { redis_url: "redis://user:s3cret@redis:6379/0".to_owned(), ..Default::default() };
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redis://***@redis:6379/0"), "{shown}");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
