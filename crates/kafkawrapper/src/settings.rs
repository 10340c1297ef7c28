//! Settings for Kafka clients and for message retries.
//!
//! Why this module exists: every consumer and producer in chatfleet is configured the
//! same way, from the same documented environment variables, so operators learn one
//! set of names. The sections follow the servicekit pattern: `Default` holds the
//! documented defaults, `ENV` maps the flat variable names to fields, and
//! `servicekit::config::load` merges file and environment on top.
//!
//! Any librdkafka property can additionally be set from the environment as
//! `RDKAFKA_<NAME>` (`RDKAFKA_FETCH_WAIT_MAX_MS=10` sets `fetch.wait.max.ms=10`); see
//! [`properties_from_env`]. Those overrides win over everything else.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::retry::RetrySettings;

/// The prefix of environment variables that set librdkafka properties directly.
pub const RDKAFKA_ENV_PREFIX: &str = "RDKAFKA_";

/// librdkafka properties the code sets by default. They are tuned for the local
/// single-node broker (tansu) used in development and tests; see `docs/kafkawrapper.md`
/// for what to change against a real Kafka cluster.
pub const LOCAL_BROKER_DEFAULTS: &[(&str, &str)] = &[
    // tansu holds a fetch until `fetch.wait.max.ms` expires even when data is there;
    // librdkafka's 500 ms default adds half a second to every delivery.
    ("fetch.wait.max.ms", "10"),
    // A new group starts at the beginning of the topic: a CDC consumer must not skip
    // changes that were written before it first joined.
    ("auto.offset.reset", "earliest"),
    // Consumer lag for the `kafka_consumer_lag` gauge comes from librdkafka statistics.
    ("statistics.interval.ms", "5000"),
];

/// Connection, group and flow-control settings shared by consumers and producers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaSettings {
    /// `KAFKA_BROKERS`: `bootstrap.servers`, comma-separated `host:port` list.
    pub brokers: String,
    /// `KAFKA_GROUP_ID`: the consumer group. Required for consumers.
    pub group_id: String,
    /// `KAFKA_TOPICS`: topics to consume, comma-separated in the environment.
    #[serde(deserialize_with = "string_or_list")]
    pub topics: Vec<String>,
    /// `KAFKA_DEAD_LETTER_TOPIC`: where messages that cannot be handled go. Unset (or
    /// empty) means they are logged, counted and skipped.
    pub dead_letter_topic: Option<String>,
    /// `KAFKA_MAX_IN_FLIGHT`: messages fetched but not yet handled, in total over the
    /// partitions this member owns (each partition gets an equal share, at least 1).
    /// A partition whose share is full is paused until it drains.
    pub max_in_flight: usize,
    /// `KAFKA_COMMIT_INTERVAL`: how often handled offsets are committed. Revocation and
    /// shutdown always commit synchronously whatever the interval.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// `KAFKA_DRAIN_TIMEOUT`: how long revocation and shutdown wait for the message
    /// currently in a handler before giving the partition up without it (it is then
    /// redelivered). Keep it below servicekit's `SHUTDOWN_TIMEOUT`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// `KAFKA_DELIVERY_TIMEOUT`: how long a produce may take, retries included, before
    /// it fails (`message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// `KAFKA_PRODUCER_IDEMPOTENCE`: `enable.idempotence` for producers (with
    /// `acks=all`): retries cannot duplicate or reorder messages.
    pub idempotence: bool,
    /// `KAFKA_SESSION_TIMEOUT`: `session.timeout.ms`, how long a member that stopped
    /// heartbeating (killed, frozen, cut off) keeps its partitions before the group
    /// moves them. Kafka brokers refuse less than `group.min.session.timeout.ms`
    /// (6 s by default), so 6 s is the shortest value that works everywhere.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// `KAFKA_HEARTBEAT_INTERVAL`: `heartbeat.interval.ms`. At most a third of the
    /// session timeout (a member may miss two heartbeats without losing its
    /// partitions); a start-up error when it is not below the session timeout.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// `KAFKA_GROUP_INSTANCE_ID`: static group membership (KIP-345,
    /// `group.instance.id`). Empty (the default): dynamic membership. Set it to a name
    /// that is unique among the group's live members and survives a restart of the
    /// same member (the pod name): a member that comes back within the session
    /// timeout gets its partitions again without a rebalance. A static member does not
    /// leave the group when it shuts down, so a member that is gone for good (scaled
    /// down, renamed by a rollout) keeps its partitions until its session times out.
    pub group_instance_id: String,
    /// librdkafka properties. Defaults: [`LOCAL_BROKER_DEFAULTS`]. `RDKAFKA_*`
    /// environment variables override these (see [`properties_from_env`]).
    #[serde(deserialize_with = "flat_properties")]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            group_id: String::new(),
            topics: Vec::new(),
            dead_letter_topic: None,
            max_in_flight: 1000,
            commit_interval: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            idempotence: true,
            session_timeout: Duration::from_secs(6),
            heartbeat_interval: Duration::from_secs(1),
            group_instance_id: String::new(),
            properties: LOCAL_BROKER_DEFAULTS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }
}

impl KafkaSettings {
    /// The documented environment variables, as `(VARIABLE, field)`.
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("KAFKA_BROKERS", "brokers"),
        ("KAFKA_GROUP_ID", "group_id"),
        ("KAFKA_TOPICS", "topics"),
        ("KAFKA_DEAD_LETTER_TOPIC", "dead_letter_topic"),
        ("KAFKA_MAX_IN_FLIGHT", "max_in_flight"),
        ("KAFKA_COMMIT_INTERVAL", "commit_interval"),
        ("KAFKA_DRAIN_TIMEOUT", "drain_timeout"),
        ("KAFKA_DELIVERY_TIMEOUT", "delivery_timeout"),
        ("KAFKA_PRODUCER_IDEMPOTENCE", "idempotence"),
        ("KAFKA_SESSION_TIMEOUT", "session_timeout"),
        ("KAFKA_HEARTBEAT_INTERVAL", "heartbeat_interval"),
        ("KAFKA_GROUP_INSTANCE_ID", "group_instance_id"),
    ];

    /// Settings for the given brokers with every other value at its default.
    pub fn for_brokers(brokers: impl Into<String>) -> Self {
        Self { brokers: brokers.into(), ..Self::default() }
    }

    /// The dead-letter topic, if one is configured (an empty name counts as none).
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref().map(str::trim).filter(|t| !t.is_empty())
    }

    /// The static membership id, if one is configured (blank counts as none).
    pub fn group_instance_id(&self) -> Option<&str> {
        Some(self.group_instance_id.trim()).filter(|id| !id.is_empty())
    }

    /// The consumer-group properties from the typed settings: session timeout,
    /// heartbeat interval and (when set) `group.instance.id`. `RDKAFKA_*` variables
    /// still win over them. Refuses a heartbeat interval that is not below the session
    /// timeout, a session timeout under 1 s, and an instance id longer than 249 bytes.
    pub fn group_membership_properties(&self) -> Result<Vec<(&'static str, String)>, String> {
        let session = self.session_timeout.as_millis();
        let heartbeat = self.heartbeat_interval.as_millis();
        if session < 1000 {
            return Err(format!("KAFKA_SESSION_TIMEOUT must be at least 1s, not {:?}", self.session_timeout));
        }
        if heartbeat == 0 || heartbeat >= session {
            return Err(format!(
                "KAFKA_HEARTBEAT_INTERVAL ({:?}) must be above zero and below KAFKA_SESSION_TIMEOUT ({:?}); a third of it or less",
                self.heartbeat_interval, self.session_timeout
            ));
        }
        let mut properties =
            vec![("session.timeout.ms", session.to_string()), ("heartbeat.interval.ms", heartbeat.to_string())];
        if let Some(id) = self.group_instance_id() {
            if id.len() > 249 || id.chars().any(char::is_control) {
                return Err("KAFKA_GROUP_INSTANCE_ID must be at most 249 bytes without control characters".to_owned());
            }
            properties.push(("group.instance.id", id.to_owned()));
        }
        Ok(properties)
    }

    /// Applies overrides on top of [`KafkaSettings::properties`] (later wins).
    pub fn merge_properties<I, K, V>(&mut self, overrides: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        for (key, value) in overrides {
            self.properties.insert(key.into(), value.into());
        }
    }

    /// The librdkafka properties clients are built with: [`KafkaSettings::properties`]
    /// with the `RDKAFKA_*` variables of the process environment on top.
    pub fn effective_properties(&self) -> BTreeMap<String, String> {
        let mut properties = self.properties.clone();
        properties.extend(properties_from_env());
        properties
    }
}

/// librdkafka properties from `RDKAFKA_*` variables of the process environment.
pub fn properties_from_env() -> BTreeMap<String, String> {
    properties_from_vars(std::env::vars())
}

/// librdkafka properties from `(name, value)` pairs: `RDKAFKA_FETCH_WAIT_MAX_MS=10`
/// becomes `fetch.wait.max.ms=10`. The name after the prefix is lowercased and each
/// `_` becomes `.`; a doubled `__` stands for a literal `_`. Other names are ignored.
pub fn properties_from_vars<I, K, V>(vars: I) -> BTreeMap<String, String>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: Into<String>,
{
    vars.into_iter()
        .filter_map(|(name, value)| {
            let rest = name.as_ref().strip_prefix(RDKAFKA_ENV_PREFIX)?;
            if rest.is_empty() {
                return None;
            }
            let key =
                rest.to_ascii_lowercase().split("__").map(|part| part.replace('_', ".")).collect::<Vec<_>>().join("_");
            Some((key, value.into()))
        })
        .collect()
}

/// Accepts a list or a comma-separated string (what an environment variable gives).
fn string_or_list<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => text.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(items) => items,
    };
    Ok(items.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
}

/// Accepts a map of property names to scalar values, where nested maps are joined
/// with dots. Configuration loaders treat dots in keys as paths, so
/// `fetch.wait.max.ms = 10` arrives as `{fetch: {wait: {max: {ms: 10}}}}`.
fn flat_properties<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Bool(bool),
        Int(i64),
        Float(f64),
        Nested(BTreeMap<String, Value>),
    }
    fn flatten(prefix: &str, map: BTreeMap<String, Value>, out: &mut BTreeMap<String, String>) {
        for (key, value) in map {
            let key = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
            match value {
                Value::Text(text) => {
                    out.insert(key, text);
                }
                Value::Bool(flag) => {
                    out.insert(key, flag.to_string());
                }
                Value::Int(number) => {
                    out.insert(key, number.to_string());
                }
                Value::Float(number) => {
                    out.insert(key, number.to_string());
                }
                Value::Nested(inner) => flatten(&key, inner, out),
            }
        }
    }
    let map = BTreeMap::<String, Value>::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    flatten("", map, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use servicekit::config::lookup;
    use servicekit::EnvMap;

    use super::*;

    #[test]
    fn rdkafka_variables_become_properties() {
        let props = properties_from_vars([
            ("RDKAFKA_FETCH_WAIT_MAX_MS", "10"),
            ("RDKAFKA_SESSION_TIMEOUT_MS", "6000"),
            ("RDKAFKA_SOME__ODD_NAME", "x"),
            ("KAFKA_BROKERS", "ignored"),
            ("RDKAFKA_", "ignored"),
            ("PATH", "/bin"),
        ]);
        let expected: BTreeMap<String, String> =
            [("fetch.wait.max.ms", "10"), ("session.timeout.ms", "6000"), ("some_odd.name", "x")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        assert_eq!(props, expected);
    }

    #[test]
    fn merge_overrides_defaults() {
        let mut settings = KafkaSettings::default();
        assert_eq!(settings.properties.get("fetch.wait.max.ms").map(String::as_str), Some("10"));
        settings.merge_properties(properties_from_vars([("RDKAFKA_FETCH_WAIT_MAX_MS", "500")]));
        assert_eq!(settings.properties.get("fetch.wait.max.ms").map(String::as_str), Some("500"));
        assert_eq!(settings.properties.get("auto.offset.reset").map(String::as_str), Some("earliest"));
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct ServiceSettings {
        kafka: KafkaSettings,
        retry: RetrySettings,
    }

    fn env_map() -> EnvMap {
        EnvMap::new().section("kafka", KafkaSettings::ENV).section("retry", RetrySettings::ENV)
    }

    #[test]
    fn defaults_survive_the_config_loader() {
        let loaded: ServiceSettings = servicekit::config::load_from(&env_map(), lookup(&[])).expect("defaults load");
        assert_eq!(loaded.kafka, KafkaSettings::default());
        assert_eq!(loaded.retry, RetrySettings::default());
        assert_eq!(loaded.kafka.properties.get("fetch.wait.max.ms").map(String::as_str), Some("10"));
    }

    #[test]
    fn documented_variables_set_every_field() {
        let loaded: ServiceSettings = servicekit::config::load_from(
            &env_map(),
            lookup(&[
                ("KAFKA_BROKERS", "k1:9092,k2:9092"),
                ("KAFKA_GROUP_ID", "chat-cdc"),
                ("KAFKA_TOPICS", "chat.messages, notifications ,"),
                ("KAFKA_DEAD_LETTER_TOPIC", "chat.dlt"),
                ("KAFKA_MAX_IN_FLIGHT", "64"),
                ("KAFKA_COMMIT_INTERVAL", "250ms"),
                ("KAFKA_DRAIN_TIMEOUT", "3s"),
                ("KAFKA_DELIVERY_TIMEOUT", "5s"),
                ("KAFKA_PRODUCER_IDEMPOTENCE", "false"),
                ("KAFKA_SESSION_TIMEOUT", "10s"),
                ("KAFKA_HEARTBEAT_INTERVAL", "3s"),
                ("KAFKA_GROUP_INSTANCE_ID", "chatpersistencechangehandler-0"),
                ("MESSAGE_RETRY_MAX_RETRIES", "9"),
                ("MESSAGE_RETRY_INITIAL_INTERVAL", "10ms"),
                ("MESSAGE_RETRY_MAX_INTERVAL", "2s"),
                ("MESSAGE_RETRY_MULTIPLIER", "1.5"),
                ("MESSAGE_RETRY_RANDOMIZATION_FACTOR", "0"),
            ]),
        )
        .expect("overrides load");
        let kafka = loaded.kafka;
        assert_eq!(kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(kafka.group_id, "chat-cdc");
        assert_eq!(kafka.topics, vec!["chat.messages".to_owned(), "notifications".to_owned()]);
        assert_eq!(kafka.dead_letter_topic(), Some("chat.dlt"));
        assert_eq!(kafka.max_in_flight, 64);
        assert_eq!(kafka.commit_interval, Duration::from_millis(250));
        assert_eq!(kafka.drain_timeout, Duration::from_secs(3));
        assert_eq!(kafka.delivery_timeout, Duration::from_secs(5));
        assert!(!kafka.idempotence);
        assert_eq!(kafka.session_timeout, Duration::from_secs(10));
        assert_eq!(kafka.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(kafka.group_instance_id(), Some("chatpersistencechangehandler-0"));
        let retry = loaded.retry;
        assert_eq!(retry.max_retries, 9);
        assert_eq!(retry.initial_interval, Duration::from_millis(10));
        assert_eq!(retry.max_interval, Duration::from_secs(2));
        assert_eq!(retry.multiplier, 1.5);
        assert_eq!(retry.randomization_factor, 0.0);
    }

    #[test]
    fn every_field_has_a_documented_variable() {
        let json = serde_json::to_value(KafkaSettings::default()).expect("serializes");
        let fields: Vec<&String> = json.as_object().expect("object").keys().filter(|k| *k != "properties").collect();
        for field in fields {
            assert!(KafkaSettings::ENV.iter().any(|(_, f)| f == field), "no variable for kafka field {field}");
        }
        let json = serde_json::to_value(RetrySettings::default()).expect("serializes");
        for field in json.as_object().expect("object").keys() {
            assert!(RetrySettings::ENV.iter().any(|(_, f)| f == field), "no variable for retry field {field}");
        }
        let names: Vec<&str> = KafkaSettings::ENV.iter().chain(RetrySettings::ENV).map(|(n, _)| *n).collect();
        for name in [
            "KAFKA_BROKERS",
            "KAFKA_GROUP_ID",
            "KAFKA_TOPICS",
            "KAFKA_DEAD_LETTER_TOPIC",
            "KAFKA_MAX_IN_FLIGHT",
            "KAFKA_COMMIT_INTERVAL",
            "MESSAGE_RETRY_MAX_RETRIES",
            "MESSAGE_RETRY_INITIAL_INTERVAL",
            "MESSAGE_RETRY_MAX_INTERVAL",
            "MESSAGE_RETRY_MULTIPLIER",
        ] {
            assert!(names.contains(&name), "{name} missing");
        }
    }

    #[test]
    fn membership_properties_follow_the_settings_and_refuse_a_slow_heartbeat() {
        let defaults = KafkaSettings::default();
        assert_eq!(defaults.group_instance_id(), None);
        assert_eq!(
            defaults.group_membership_properties().expect("defaults are valid"),
            vec![("session.timeout.ms", "6000".to_owned()), ("heartbeat.interval.ms", "1000".to_owned())]
        );
        let static_member = KafkaSettings { group_instance_id: " pod-7 ".to_owned(), ..KafkaSettings::default() };
        assert!(static_member
            .group_membership_properties()
            .expect("valid")
            .contains(&("group.instance.id", "pod-7".to_owned())));
        let blank = KafkaSettings { group_instance_id: "  ".to_owned(), ..KafkaSettings::default() };
        assert_eq!(blank.group_membership_properties().expect("valid").len(), 2);
        for (session, heartbeat) in [(6, 6), (6, 7), (6, 0)] {
            let bad = KafkaSettings {
                session_timeout: Duration::from_secs(session),
                heartbeat_interval: Duration::from_secs(heartbeat),
                ..KafkaSettings::default()
            };
            assert!(bad.group_membership_properties().is_err(), "{session}s / {heartbeat}s accepted");
        }
        let tiny = KafkaSettings {
            session_timeout: Duration::from_millis(500),
            heartbeat_interval: Duration::from_millis(100),
            ..KafkaSettings::default()
        };
        assert!(tiny.group_membership_properties().is_err());
        let long_id = KafkaSettings { group_instance_id: "x".repeat(250), ..KafkaSettings::default() };
        assert!(long_id.group_membership_properties().is_err());
        let control = KafkaSettings { group_instance_id: "a\nb".to_owned(), ..KafkaSettings::default() };
        assert!(control.group_membership_properties().is_err());
    }

    #[test]
    fn an_empty_dead_letter_topic_means_none() {
        let settings = KafkaSettings { dead_letter_topic: Some("  ".to_owned()), ..KafkaSettings::default() };
        assert_eq!(settings.dead_letter_topic(), None);
    }

    #[test]
    fn a_file_can_set_dotted_properties() {
        let dir = std::env::temp_dir().join(format!("kafkawrapper-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("settings.toml");
        std::fs::write(&path, "[kafka]\ntopics = [\"a\", \"b\"]\n[kafka.properties]\n\"fetch.wait.max.ms\" = 500\n")
            .expect("write");
        let path = path.to_string_lossy().into_owned();
        let loaded: ServiceSettings =
            servicekit::config::load_from(&env_map(), lookup(&[(servicekit::config::CONFIG_FILE_VAR, path.as_str())]))
                .expect("file loads");
        assert_eq!(loaded.kafka.topics, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(loaded.kafka.properties.get("fetch.wait.max.ms").map(String::as_str), Some("500"));
        assert_eq!(loaded.kafka.properties.get("auto.offset.reset").map(String::as_str), Some("earliest"));
        assert_eq!(loaded.kafka.session_timeout, Duration::from_secs(6));
    }
}
