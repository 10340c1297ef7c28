//! The service's settings and their documented environment variables
//! (`docs/notifications.md` lists each one).

use std::time::Duration;

use chatauth::AuthSettings;
use serde::{Deserialize, Serialize};
use servicekit::EnvMap;
use wsfanout::WsSettings;

/// Presence: where the `presence:{user_id}` keys live and how fresh they are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceSettings {
    /// `REDIS_URL`: the Redis holding the presence keys.
    pub redis_url: String,
    /// `REDIS_TIMEOUT`: bound on one Redis round trip, connecting included.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// `PRESENCE_TTL`: lifetime of a presence key; a pod that dies stops refreshing and
    /// its users read as offline at most this long afterwards.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// `PRESENCE_REFRESH`: how often every locally connected user's key is set again.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// `PRESENCE_KEY_PREFIX`: keys are `{prefix}:{user_id}`.
    pub key_prefix: String,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            redis_timeout: Duration::from_millis(500),
            ttl: Duration::from_secs(30),
            refresh: Duration::from_secs(10),
            key_prefix: "presence".to_owned(),
        }
    }
}

impl PresenceSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("REDIS_URL", "redis_url"),
        ("REDIS_TIMEOUT", "redis_timeout"),
        ("PRESENCE_TTL", "ttl"),
        ("PRESENCE_REFRESH", "refresh"),
        ("PRESENCE_KEY_PREFIX", "key_prefix"),
    ];

    pub fn validate(&self) -> Result<(), String> {
        if self.redis_timeout.is_zero() {
            return Err("REDIS_TIMEOUT must be greater than zero".into());
        }
        if self.refresh.is_zero() {
            return Err("PRESENCE_REFRESH must be greater than zero".into());
        }
        if self.ttl <= self.refresh {
            return Err("PRESENCE_TTL must be longer than PRESENCE_REFRESH (keys would lapse between refreshes)".into());
        }
        if self.ttl < Duration::from_millis(1) {
            return Err("PRESENCE_TTL must be at least 1ms".into());
        }
        let prefix = self.key_prefix.trim_end_matches(':');
        let prefix_ok = !prefix.is_empty() && prefix.len() <= 64 && prefix.bytes().all(|b| b.is_ascii_graphic());
        if !prefix_ok {
            return Err("PRESENCE_KEY_PREFIX must be 1 to 64 printable ASCII characters without spaces".into());
        }
        Ok(())
    }
}

/// The bounds of `POST /notifications/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchSettings {
    /// `NOTIFICATIONS_BATCH_MAX_ITEMS`: items one batch may hold (more: `413`).
    pub max_items: usize,
    /// `NOTIFICATIONS_BATCH_MAX_BYTES`: the largest batch body (more: `413`); the
    /// batch route's own limit in place of `HTTP_BODY_LIMIT`.
    pub max_bytes: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self { max_items: 1000, max_bytes: 1024 * 1024 }
    }
}

impl BatchSettings {
    pub const ENV: &'static [(&'static str, &'static str)] =
        &[("NOTIFICATIONS_BATCH_MAX_ITEMS", "max_items"), ("NOTIFICATIONS_BATCH_MAX_BYTES", "max_bytes")];

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=100_000).contains(&self.max_items) {
            return Err("NOTIFICATIONS_BATCH_MAX_ITEMS must be between 1 and 100000".into());
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_bytes) {
            return Err("NOTIFICATIONS_BATCH_MAX_BYTES must be between 1024 and 67108864".into());
        }
        Ok(())
    }
}

/// Everything generalnotificationshandler reads besides the base settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub auth: AuthSettings,
    pub ws: WsSettings,
    pub presence: PresenceSettings,
    pub batch: BatchSettings,
}

impl Settings {
    pub fn env_map() -> EnvMap {
        EnvMap::new()
            .section("auth", AuthSettings::ENV)
            .section("ws", WsSettings::ENV)
            .section("presence", PresenceSettings::ENV)
            .section("batch", BatchSettings::ENV)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.ws.validate()?;
        self.batch.validate()?;
        self.presence.validate()
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, String> {
        servicekit::config::load_from(&Settings::env_map(), servicekit::config::lookup(vars)).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let settings = load(&[]).expect("defaults load");
        assert_eq!(settings.ws, WsSettings::default());
        assert_eq!(settings.presence, PresenceSettings::default());
        assert_eq!(settings.presence.ttl, Duration::from_secs(30));
        assert_eq!(settings.presence.refresh, Duration::from_secs(10));
        assert_eq!(settings.presence.key_prefix, "presence");
        assert_eq!(settings.presence.redis_timeout, Duration::from_millis(500));
        assert_eq!(settings.batch, BatchSettings { max_items: 1000, max_bytes: 1024 * 1024 });
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn documented_variables_are_read() {
        let settings = load(&[
            ("REDIS_URL", "redis://cache:6380/2"),
            ("REDIS_TIMEOUT", "2s"),
            ("PRESENCE_TTL", "1500ms"),
            ("PRESENCE_REFRESH", "300ms"),
            ("PRESENCE_KEY_PREFIX", "online"),
            ("WS_OUTBOUND_QUEUE", "4"),
            ("NOTIFICATIONS_BATCH_MAX_ITEMS", "50"),
            ("NOTIFICATIONS_BATCH_MAX_BYTES", "200000"),
        ])
        .expect("loads");
        assert_eq!(settings.presence.redis_url, "redis://cache:6380/2");
        assert_eq!(settings.presence.redis_timeout, Duration::from_secs(2));
        assert_eq!(settings.presence.ttl, Duration::from_millis(1500));
        assert_eq!(settings.presence.refresh, Duration::from_millis(300));
        assert_eq!(settings.presence.key_prefix, "online");
        assert_eq!(settings.ws.outbound_queue, 4);
        assert_eq!(settings.batch, BatchSettings { max_items: 50, max_bytes: 200_000 });
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn impossible_values_are_refused_by_name() {
        let err = load(&[("PRESENCE_TTL", "soon")]).expect_err("not a duration");
        assert!(err.contains("PRESENCE_TTL"), "{err}");
        let lapsing = load(&[("PRESENCE_TTL", "5s"), ("PRESENCE_REFRESH", "10s")]).expect("loads");
        assert!(lapsing.validate().unwrap_err().contains("PRESENCE_TTL"));
        let spaced = load(&[("PRESENCE_KEY_PREFIX", "a b")]).expect("loads");
        assert!(spaced.validate().unwrap_err().contains("PRESENCE_KEY_PREFIX"));
    }
}
