//! The service's settings and their documented environment variables
//! (`docs/chatwebsocketshandler.md` lists each one).

use std::time::Duration;

use chatauth::AuthSettings;
use chatstream::IdSettings;
use serde::{Deserialize, Serialize};
use servicekit::EnvMap;
use wsfanout::WsSettings;

pub use crate::live::LiveSettings;

/// Where and how the replay of `since` reads chatpersistence's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistorySettings {
    /// `CHATPERSISTENCE_INTERNAL_URL`: chatpersistence's internal listener.
    pub chatpersistence_internal_url: String,
    /// `HISTORY_REPLAY_LIMIT`: most messages replayed to one socket; a client further
    /// behind is closed with 4000 (resync) and must page the history itself.
    pub replay_limit: usize,
    /// `HISTORY_PAGE_SIZE`: messages asked for per history request.
    pub page_size: usize,
    /// `HISTORY_TIMEOUT`: timeout of one history request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            chatpersistence_internal_url: "http://127.0.0.1:9090".to_owned(),
            replay_limit: 1000,
            page_size: 200,
            timeout: Duration::from_secs(5),
        }
    }
}

impl HistorySettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("CHATPERSISTENCE_INTERNAL_URL", "chatpersistence_internal_url"),
        ("HISTORY_REPLAY_LIMIT", "replay_limit"),
        ("HISTORY_PAGE_SIZE", "page_size"),
        ("HISTORY_TIMEOUT", "timeout"),
    ];

    pub fn validate(&self) -> Result<(), String> {
        if !(self.chatpersistence_internal_url.starts_with("http://")
            || self.chatpersistence_internal_url.starts_with("https://"))
        {
            return Err("CHATPERSISTENCE_INTERNAL_URL must be an http:// or https:// URL".into());
        }
        if self.page_size == 0 {
            return Err("HISTORY_PAGE_SIZE must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return Err("HISTORY_TIMEOUT must be greater than zero".into());
        }
        Ok(())
    }
}

/// Everything chatwebsocketshandler reads besides the base settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub auth: AuthSettings,
    pub ws: WsSettings,
    pub history: HistorySettings,
    pub ids: IdSettings,
    pub live: LiveSettings,
}

impl Settings {
    pub fn env_map() -> EnvMap {
        EnvMap::new()
            .section("auth", AuthSettings::ENV)
            .section("ws", WsSettings::ENV)
            .section("history", HistorySettings::ENV)
            .section("ids", IdSettings::ENV)
            .section("live", LiveSettings::ENV)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.ws.validate()?;
        self.live.validate()?;
        self.history.validate()
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
        assert_eq!(settings.history, HistorySettings::default());
        assert_eq!(settings.history.replay_limit, 1000);
        assert_eq!(settings.ws.outbound_queue, 256);
        assert_eq!(settings.ws.ping_interval, Duration::from_secs(20));
        assert_eq!(settings.ws.pong_timeout, Duration::from_secs(60));
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn documented_variables_are_read() {
        let settings = load(&[
            ("WS_OUTBOUND_QUEUE", "8"),
            ("WS_PING_INTERVAL", "250ms"),
            ("WS_PONG_TIMEOUT", "1s"),
            ("WS_MAX_CONNECTIONS", "10"),
            ("WS_MAX_MESSAGE_SIZE", "1024"),
            ("CHATPERSISTENCE_INTERNAL_URL", "http://history:9090"),
            ("HISTORY_REPLAY_LIMIT", "5"),
            ("HISTORY_PAGE_SIZE", "2"),
            ("HISTORY_TIMEOUT", "2s"),
            ("TYPING_TIMEOUT", "3s"),
            ("TYPING_MIN_INTERVAL", "1s"),
            ("PRESENCE_GRACE", "0s"),
        ])
        .expect("loads");
        assert_eq!(settings.ws.outbound_queue, 8);
        assert_eq!(settings.ws.ping_interval, Duration::from_millis(250));
        assert_eq!(settings.ws.pong_timeout, Duration::from_secs(1));
        assert_eq!(settings.ws.max_connections, 10);
        assert_eq!(settings.ws.max_message_size, 1024);
        assert_eq!(settings.history.chatpersistence_internal_url, "http://history:9090");
        assert_eq!(settings.history.replay_limit, 5);
        assert_eq!(settings.history.page_size, 2);
        assert_eq!(settings.history.timeout, Duration::from_secs(2));
        assert_eq!(settings.live.typing_timeout, Duration::from_secs(3));
        assert_eq!(settings.live.typing_min_interval, Duration::from_secs(1));
        assert_eq!(settings.live.presence_grace, Duration::ZERO);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err = load(&[("WS_PING_INTERVAL", "often")]).expect_err("not a duration");
        assert!(err.contains("WS_PING_INTERVAL"), "{err}");
        let settings = load(&[("CHATPERSISTENCE_INTERNAL_URL", "history:9090")]).expect("loads");
        assert!(settings.validate().is_err());
    }
}
