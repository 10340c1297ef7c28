//! The change handler's settings: the shared Kafka, retry and event-store sections,
//! where the targets live, and the pipelines (docs/pipelines.md).
//!
//! Every shared field has a documented environment variable. Without `[[pipelines]]` in
//! the `CHATFLEET_CONFIG` file the handler runs the default (strategy 1) built from
//! these variables exactly as before pipelines existed; with them, each pipeline takes
//! what it does not set itself from the shared sections (see `pipeline.rs`).

use std::time::Duration;

use eventstore::EventStoreSettings;
use kafkawrapper::{KafkaSettings, RetrySettings};
use serde::{Deserialize, Serialize};
use servicekit::EnvMap;

use crate::pipeline::PipelineSettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub retry: RetrySettings,
    pub eventstore: EventStoreSettings,
    pub forward: ForwardSettings,
    /// `BOTS` and the AI adapter (`AI_*`): the `bot` target (`crate::bot`).
    pub bots: crate::bot::BotSettings,
    /// `KAFKA_TOPIC_PARTITIONS`: partitions of a consumed topic the handler has to create
    /// at start because it is missing (a fresh local broker does not auto-create them).
    /// Existing topics are left alone; dead-letter topics get one partition.
    pub topic_partitions: i32,
    /// `PIPELINES_ENABLED`: comma-separated names of the pipelines this process runs;
    /// empty runs all of them. Lets one strategy file be deployed as several
    /// independently scaled consumers.
    pub pipelines_enabled: String,
    /// The `[[pipelines]]` of the configuration file; empty means the default.
    pub pipelines: Vec<PipelineSettings>,
}

/// Where and how changes are forwarded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ForwardSettings {
    /// `CHAT_WEBSOCKET_URL`: base URL of chatwebsocketshandler's internal listener (in
    /// production the proxy's internal listener, which hashes on `stream_id`).
    pub chat_websocket_url: String,
    /// `NOTIFICATIONS_URL`: base URL of generalnotificationshandler's internal
    /// listener; empty turns the notification targets off (and, in the default
    /// configuration, the `domain` pipeline).
    pub notifications_url: String,
    /// `FORWARD_TIMEOUT`: how long one forward may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `FAILOVER_TIMEOUT`: how long the failover may keep trying to close a stream's
    /// sockets after its retries are exhausted.
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// `INTERNAL_SERVICE_TOKEN`: presented to the internal endpoints. Required, at least
    /// 32 bytes: the handler refuses to start without it (`forward::ServiceToken`).
    pub service_token: String,
    /// `NOTIFICATIONS_BATCH_SIZE`: a change's per-user notifications (a group message's
    /// members) go this many per `POST /notifications/batch`; 0 or 1 sends each on its
    /// own (`crate::notify_batch`). At most the pods' `NOTIFICATIONS_BATCH_MAX_ITEMS`.
    pub notifications_batch: usize,
    /// `CHAT_WEBSOCKET_FORWARD_BATCH`: message forwards that queue up while one request
    /// to the socket pod is in flight go together, this many per
    /// `POST /chat/forward-batch` at most; 0 or 1 sends each on its own
    /// (`crate::forward_batch`). Through a proxy (which cannot route a batch) the first
    /// batch is refused and every forward goes on its own from then on.
    pub chat_websocket_batch: usize,
    /// `CHAT_WEBSOCKET_FORWARD_LINGER`: how long the first forward of a batch may wait for
    /// the forwards of records other partitions are handling right now (none on the way:
    /// no wait; 0: only forwards that queued meanwhile go along).
    #[serde(with = "humantime_serde")]
    pub chat_websocket_linger: Duration,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        Self {
            chat_websocket_url: "http://127.0.0.1:9090".to_owned(),
            notifications_url: String::new(),
            timeout: Duration::from_secs(2),
            failover_timeout: Duration::from_secs(30),
            service_token: String::new(),
            notifications_batch: 500,
            chat_websocket_batch: 64,
            chat_websocket_linger: Duration::from_millis(2),
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
        ("NOTIFICATIONS_BATCH_SIZE", "notifications_batch"),
        ("CHAT_WEBSOCKET_FORWARD_BATCH", "chat_websocket_batch"),
        ("CHAT_WEBSOCKET_FORWARD_LINGER", "chat_websocket_linger"),
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
            bots: crate::bot::BotSettings::default(),
            topic_partitions: 6,
            pipelines_enabled: String::new(),
            pipelines: Vec::new(),
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
            .section("bots", crate::bot::BotSettings::ENV)
            .var("KAFKA_TOPIC_PARTITIONS", "topic_partitions")
            .var("PIPELINES_ENABLED", "pipelines_enabled")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pipeline::{resolve, DedupBy, OnExhausted, Target};

    fn load(vars: &[(&str, &str)]) -> Result<Settings, String> {
        servicekit::config::load_from(&Settings::env_map(), servicekit::config::lookup(vars)).map_err(|e| e.to_string())
    }

    fn strategy(file: &str) -> String {
        format!("{}/../../deploy/strategies/{file}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn without_a_file_the_flat_variables_build_the_default() {
        let settings = load(&[
            ("KAFKA_GROUP_ID", "g1"),
            ("KAFKA_TOPICS", "chat.changes"),
            ("DEDUPLICATION_TTL", "7m"),
            ("MESSAGE_RETRY_MAX_RETRIES", "9"),
            ("NOTIFICATIONS_URL", "http://n:1"),
        ])
        .expect("loads");
        let pipelines = resolve(&settings).expect("valid");
        assert_eq!(pipelines[0].kafka.group_id, "g1");
        assert_eq!(pipelines[0].store.ttl, Duration::from_secs(420));
        assert_eq!(pipelines[0].retry.max_retries, 9);
        assert_eq!(pipelines[1].retry.max_retries, 9, "the domain pipeline shares the retry budget");
        assert_eq!(pipelines[1].store.ttl, crate::pipeline::DEFAULT_DOMAIN_TTL, "but keeps its own window");
    }

    #[test]
    fn strategy_1_file_matches_the_default() {
        let from_file =
            load(&[("CHATFLEET_CONFIG", &strategy("strategy-1-concurrent.toml")), ("NOTIFICATIONS_URL", "http://n:1")])
                .expect("loads");
        let from_file = resolve(&from_file).expect("valid");
        let default = resolve(&load(&[("NOTIFICATIONS_URL", "http://n:1")]).expect("loads")).expect("valid");
        assert_eq!(from_file.len(), default.len());
        for (f, d) in from_file.iter().zip(&default) {
            assert_eq!(f.name, d.name);
            assert_eq!(f.kafka, d.kafka);
            assert_eq!(f.store, d.store);
            assert_eq!(f.retry, d.retry);
            assert_eq!(f.targets, d.targets);
            assert_eq!(f.dedup_by, d.dedup_by);
            assert_eq!(f.on_exhausted, d.on_exhausted);
            assert_eq!(f.actions(), d.actions());
        }
        assert_eq!(
            from_file[0].on_exhausted_per_target.get(&Target::ChatNotification),
            Some(&OnExhausted::DeadLetter),
            "the file spells the per-target actions out"
        );
    }

    #[test]
    fn strategy_2_file_splits_notifications_into_their_own_group() {
        let settings = load(&[
            ("CHATFLEET_CONFIG", &strategy("strategy-2-notification-group.toml")),
            ("NOTIFICATIONS_URL", "http://n:1"),
            ("MESSAGE_RETRY_INITIAL_INTERVAL", "50ms"),
        ])
        .expect("loads");
        let pipelines = resolve(&settings).expect("valid");
        let chat = &pipelines[0];
        assert_eq!(chat.targets, vec![Target::ChatWebsocket]);
        assert_eq!(chat.store.ttl, Duration::from_secs(300));
        let notify = &pipelines[1];
        assert_eq!(notify.kafka.group_id, "chat-notifications");
        assert_eq!(notify.kafka.topics, vec!["chat.changes".to_owned()]);
        assert_eq!(notify.targets, vec![Target::ChatNotification]);
        assert_eq!(notify.dedup_by, DedupBy::Stream);
        assert_eq!(notify.store.ttl, Duration::from_secs(6 * 3600));
        assert_eq!(notify.retry.max_retries, 3);
        assert_eq!(notify.retry.initial_interval, Duration::from_millis(50), "unset fields come from the env");
        assert_eq!(notify.on_exhausted, OnExhausted::LogAndSkip);
        assert_eq!(notify.kafka.dead_letter_topic(), None);
    }

    #[test]
    fn strategy_3_file_segregates_every_consumer() {
        let settings =
            load(&[("CHATFLEET_CONFIG", &strategy("strategy-3-segregated.toml")), ("NOTIFICATIONS_URL", "http://n:1")])
                .expect("loads");
        let pipelines = resolve(&settings).expect("valid");
        let summary: Vec<(&str, u64, u32, OnExhausted)> = pipelines
            .iter()
            .map(|p| (p.name.as_str(), p.store.ttl.as_secs(), p.retry.max_retries, p.on_exhausted))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("chat", 300, 5, OnExhausted::Failover),
                ("chat-notifications", 6 * 3600, 3, OnExhausted::LogAndSkip),
                ("domain", 6 * 3600, 3, OnExhausted::DeadLetter),
            ]
        );
    }

    #[test]
    fn a_typo_in_a_pipeline_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("changehandler-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("typo.toml");
        std::fs::write(
            &path,
            "[[pipelines]]\nname = \"x\"\ntopics = [\"chat.changes\"]\ngroup_id = \"g\"\n\
             targets = [\"chat_sockets\"]\non_exhausted = \"failover\"\n",
        )
        .expect("write");
        let err = load(&[("CHATFLEET_CONFIG", &path.to_string_lossy())]).expect_err("unknown target");
        assert!(err.to_string().contains("chat_sockets"), "{err}");
        std::fs::write(
            &path,
            "[[pipelines]]\nname = \"x\"\ntopics = [\"chat.changes\"]\ngroup_id = \"g\"\n\
             targets = [\"chat_websocket\"]\non_exhausted = \"failover\"\nttl = \"5m\"\n",
        )
        .expect("write");
        let err = load(&[("CHATFLEET_CONFIG", &path.to_string_lossy())]).expect_err("unknown field");
        assert!(err.to_string().contains("ttl"), "{err}");
        std::fs::write(
            &path,
            "[[pipelines]]\nname = \"x\"\ntopics = [\"chat.changes\"]\ngroup_id = \"g\"\n\
             targets = [\"chat_websocket\"]\non_exhausted = \"failover\"\n\
             [pipelines.on_exhausted_per_target]\nchat_sockets = \"failover\"\n",
        )
        .expect("write");
        let err = load(&[("CHATFLEET_CONFIG", &path.to_string_lossy())]).expect_err("unknown per-target key");
        assert!(err.to_string().contains("chat_sockets"), "{err}");
    }
}
