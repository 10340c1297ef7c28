//! The change handler's settings: which topic and group, where to forward, how hard
//! to retry. Every field has a documented environment variable (docs/configuration.md).

use std::time::Duration;

use eventstore::EventStoreSettings;
use kafkawrapper::{KafkaSettings, RetrySettings};
use serde::{Deserialize, Serialize};
use servicekit::EnvMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub retry: RetrySettings,
    pub eventstore: EventStoreSettings,
    pub forward: ForwardSettings,
}

/// Where and how changes are forwarded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ForwardSettings {
    /// `CHAT_WEBSOCKET_URL`: base URL of chatwebsocketshandler's internal listener (in
    /// production the proxy's internal listener, which hashes on `stream_id`).
    pub chat_websocket_url: String,
    /// `NOTIFICATIONS_URL`: base URL of generalnotificationshandler's internal
    /// listener; empty turns chat notifications off.
    pub notifications_url: String,
    /// `FORWARD_TIMEOUT`: how long one forward may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `FAILOVER_TIMEOUT`: how long the failover may keep trying to close a stream's
    /// sockets after its retries are exhausted.
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// `INTERNAL_SERVICE_TOKEN`: presented to the internal endpoints.
    pub service_token: String,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        Self {
            chat_websocket_url: "http://127.0.0.1:9090".to_owned(),
            notifications_url: String::new(),
            timeout: Duration::from_secs(2),
            failover_timeout: Duration::from_secs(30),
            service_token: String::new(),
        }
    }
}

impl ForwardSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("CHAT_WEBSOCKET_URL", "chat_websocket_url"),
        ("NOTIFICATIONS_URL", "notifications_url"),
        ("FORWARD_TIMEOUT", "timeout"),
        ("FAILOVER_TIMEOUT", "failover_timeout"),
        ("INTERNAL_SERVICE_TOKEN", "service_token"),
    ];
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kafka: KafkaSettings {
                group_id: "chat-websocket-forwarder".to_owned(),
                topics: vec!["chat.changes".to_owned()],
                dead_letter_topic: Some("chat.changes.dlq".to_owned()),
                ..KafkaSettings::default()
            },
            retry: RetrySettings::default(),
            eventstore: EventStoreSettings {
                key_prefix: "chat-cdc".to_owned(),
                // One forward attempt takes at most FORWARD_TIMEOUT; a crashed
                // consumer's lease must expire soon after so redelivery is quick.
                processing_lease: Duration::from_secs(5),
                ..EventStoreSettings::default()
            },
            forward: ForwardSettings::default(),
        }
    }
}

impl Settings {
    pub fn env_map() -> EnvMap {
        EnvMap::new()
            .section("kafka", KafkaSettings::ENV)
            .section("retry", RetrySettings::ENV)
            .section("eventstore", EventStoreSettings::ENV)
            .section("forward", ForwardSettings::ENV)
    }
}
