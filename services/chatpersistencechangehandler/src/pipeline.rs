//! Pipelines: which topics go to which endpoints, under which consumer group,
//! deduplication window, retry budget and give-up action.
//!
//! Why this module exists: seed 001 describes three notification strategies (one
//! consumer calling sockets and notifications concurrently; a separate notification
//! group that deduplicates per conversation; fully segregated groups). They differ only
//! in how topics, groups, event-store windows and retry policies are combined, so they
//! are configuration here, not code. This module turns the raw settings (code defaults,
//! the `CHATFLEET_CONFIG` file, environment) into checked [`Pipeline`]s and refuses, at
//! start-up and with a message naming the pipeline, combinations that cannot work.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chatstream::domain::DomainKind;
use eventstore::EventStoreSettings;
use kafkawrapper::{KafkaSettings, RetrySettings};
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

/// Name of the pipeline the default configuration builds from the flat variables.
pub const DEFAULT_CHAT_PIPELINE: &str = "chat";
/// Name, group, event-store prefix and dead-letter topic of the default domain pipeline.
pub const DEFAULT_DOMAIN_PIPELINE: &str = "domain";
pub const DEFAULT_DOMAIN_GROUP: &str = "domain-notifications";
pub const DEFAULT_DOMAIN_PREFIX: &str = "domain-notifications";
pub const DEFAULT_DOMAIN_DEAD_LETTER_TOPIC: &str = "domain-notifications.dlq";
/// How long the default domain pipeline remembers a delivered notification.
pub const DEFAULT_DOMAIN_TTL: Duration = Duration::from_secs(6 * 60 * 60);
/// Name, group, event-store prefix and dead-letter topic of the default bots pipeline
/// (built when `BOTS` is set): its own consumer group, so a slow or failing model never
/// delays the chat sockets (docs/pipelines.md).
pub const DEFAULT_BOT_PIPELINE: &str = "bots";
pub const DEFAULT_BOT_GROUP: &str = "chat-bots";
pub const DEFAULT_BOT_PREFIX: &str = "chat-bots";
pub const DEFAULT_BOT_DEAD_LETTER_TOPIC: &str = "chat-bots.dlq";

/// Where a pipeline sends what it consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Chat changes as frames to the socket pod holding the stream
    /// (`POST /chat/forward-to-websocket?stream_id=`).
    ChatWebsocket,
    /// New chat messages to the receiver's notification sockets
    /// (`POST /notifications/chat?user_id=<receiver>`); edits and deletes are not notified.
    ChatNotification,
    /// Purchases, payment reminders and shipments to the document's user
    /// (`POST /notifications/{purchase,payment-reminder,shipping}?user_id=`).
    DomainNotification,
    /// New messages to a bot, or `/ai` group messages where a bot is a member, answered
    /// by the model and posted back as the bot (`crate::bot`, `POST /chat/bot-messages`).
    Bot,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::ChatWebsocket => "chat_websocket",
            Target::ChatNotification => "chat_notification",
            Target::DomainNotification => "domain_notification",
            Target::Bot => "bot",
        }
    }

    /// Whether the target reads chat change events (rather than domain events).
    pub fn is_chat(self) -> bool {
        !matches!(self, Target::DomainNotification)
    }

    pub fn needs_notifications_url(self) -> bool {
        matches!(self, Target::ChatNotification | Target::DomainNotification)
    }
}

/// What a change is deduplicated under in the event store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupBy {
    /// Each change once (chat: message id, or id + operation + time for edits and
    /// deletes; domain: document id + status + change time).
    #[default]
    Event,
    /// Once per conversation and recipient within the TTL: key `{stream_id}:{receiver_id}`.
    /// An ongoing conversation notifies once per window. Chat notifications only.
    Stream,
}

/// What happens, for one target, to a change whose retries towards that target ran out
/// (the record is then committed; it is also written to the pipeline's dead-letter
/// topic when one is configured). Each target of a pipeline has its own action; see
/// [`Pipeline::action_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Close the stream's chat sockets with the resync close code, so the clients fetch
    /// what they missed from history. Only for the `chat_websocket` target: a failed
    /// notification says nothing about the chat sockets.
    Failover,
    /// Log and count it, and move on (non-critical deliveries).
    LogAndSkip,
    /// Leave it to the dead-letter topic for review and replay. Needs `dead_letter_topic`.
    DeadLetter,
}

impl OnExhausted {
    pub fn name(self) -> &'static str {
        match self {
            OnExhausted::Failover => "failover",
            OnExhausted::LogAndSkip => "log_and_skip",
            OnExhausted::DeadLetter => "dead_letter",
        }
    }
}

/// A pipeline's event-store window; unset fields come from the shared `[eventstore]`
/// section (`EVENT_STORE_KEY_PREFIX`, `DEDUPLICATION_TTL`, `EVENT_STORE_PROCESSING_LEASE`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub processing_lease: Option<Duration>,
}

/// A pipeline's retry schedule; unset fields come from the shared `[retry]` section
/// (`MESSAGE_RETRY_*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub initial_interval: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub randomization_factor: Option<f64>,
}

impl RetryOverride {
    fn over(&self, shared: &RetrySettings) -> RetrySettings {
        RetrySettings {
            max_retries: self.max_retries.unwrap_or(shared.max_retries),
            initial_interval: self.initial_interval.unwrap_or(shared.initial_interval),
            max_interval: self.max_interval.unwrap_or(shared.max_interval),
            multiplier: self.multiplier.unwrap_or(shared.multiplier),
            randomization_factor: self.randomization_factor.unwrap_or(shared.randomization_factor),
        }
    }
}

/// One `[[pipelines]]` table of the configuration file, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Names the pipeline in logs and in the `pipeline` label of its metrics.
    pub name: String,
    /// Topics to consume: chat change topics or the domain topics
    /// (`purchases.changes`, `payments.changes`, `shipments.changes`).
    pub topics: Vec<String>,
    /// The consumer group; unique per pipeline.
    pub group_id: String,
    /// Where records the pipeline gives up on are written (with the reason in headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    pub targets: Vec<Target>,
    #[serde(default)]
    pub event_store: StoreOverride,
    #[serde(default)]
    pub dedup_by: DedupBy,
    #[serde(default)]
    pub retry: RetryOverride,
    /// The action for every target without an entry in `on_exhausted_per_target`
    /// (`failover` applies to `chat_websocket` only; see [`Pipeline::action_for`]).
    pub on_exhausted: OnExhausted,
    /// Per-target actions (`[pipelines.on_exhausted_per_target]`, e.g.
    /// `chat_notification = "log_and_skip"`); `failover` only for `chat_websocket`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on_exhausted_per_target: BTreeMap<Target, OnExhausted>,
}

/// A checked pipeline with every setting resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The shared connection settings with this pipeline's group, topics and dead letters.
    pub kafka: KafkaSettings,
    pub retry: RetrySettings,
    pub store: EventStoreSettings,
    pub targets: Vec<Target>,
    pub dedup_by: DedupBy,
    /// The pipeline-wide action, as written (targets without their own entry follow it).
    pub on_exhausted: OnExhausted,
    /// The per-target actions as written; [`Pipeline::action_for`] resolves them.
    pub on_exhausted_per_target: BTreeMap<Target, OnExhausted>,
}

impl Pipeline {
    pub fn has(&self, target: Target) -> bool {
        self.targets.contains(&target)
    }

    /// What happens when the retries towards `target` run out: its entry in
    /// `on_exhausted_per_target` if it has one, otherwise `on_exhausted` — except that
    /// `failover` (closing the stream's chat sockets) belongs to `chat_websocket` alone:
    /// other targets of a `failover` pipeline fall back to [`Pipeline::record_action`]
    /// (`dead_letter` with a dead-letter topic, else `log_and_skip`). So strategy 1's
    /// single pipeline fails over when the sockets could not be reached, and only
    /// dead-letters when the notification service could not.
    pub fn action_for(&self, target: Target) -> OnExhausted {
        match self.on_exhausted_per_target.get(&target) {
            Some(action) => *action,
            None if self.on_exhausted == OnExhausted::Failover && target != Target::ChatWebsocket => {
                self.record_action()
            }
            None => self.on_exhausted,
        }
    }

    /// What happens to a record given up on that reached no target (malformed,
    /// unroutable): it goes to the dead-letter topic if there is one, else it is
    /// logged and skipped.
    pub fn record_action(&self) -> OnExhausted {
        if self.kafka.dead_letter_topic().is_some() {
            OnExhausted::DeadLetter
        } else {
            OnExhausted::LogAndSkip
        }
    }

    /// Every target with its resolved action, in the order of `targets`.
    pub fn actions(&self) -> Vec<(Target, OnExhausted)> {
        self.targets.iter().map(|t| (*t, self.action_for(*t))).collect()
    }
}

/// Whether records of `topic` are domain events (otherwise they are chat changes).
pub fn domain_kind(topic: &str) -> Option<DomainKind> {
    DomainKind::from_topic(topic)
}

/// The pipelines this process runs: the file's `[[pipelines]]` if it has any,
/// otherwise the default (strategy 1), narrowed to `PIPELINES_ENABLED` when that is
/// set (so one file can be deployed as several independently scaled consumers). All
/// configured pipelines are checked; the error lists every problem found.
pub fn resolve(settings: &Settings) -> Result<Vec<Pipeline>, String> {
    let raw = if settings.pipelines.is_empty() { default_pipelines(settings) } else { settings.pipelines.clone() };
    let pipelines: Vec<Pipeline> = raw.iter().map(|p| resolve_one(settings, p)).collect();
    let mut problems = validate(settings, &pipelines);
    let enabled: Vec<&str> =
        settings.pipelines_enabled.split(',').map(str::trim).filter(|name| !name.is_empty()).collect();
    for name in &enabled {
        if !pipelines.iter().any(|p| p.name == *name) {
            let known: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
            problems.push(format!(
                "PIPELINES_ENABLED names `{name}`, which is not configured (known: {})",
                known.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        return Err(format!("invalid pipeline configuration: {}", problems.join("; ")));
    }
    Ok(pipelines.into_iter().filter(|p| enabled.is_empty() || enabled.contains(&p.name.as_str())).collect())
}

/// Strategy 1, built from the flat variables exactly as before pipelines existed: one
/// `chat` pipeline (group `KAFKA_GROUP_ID` on `KAFKA_TOPICS`, event store and retries
/// from `EVENT_STORE_*`/`DEDUPLICATION_TTL`/`MESSAGE_RETRY_*`, sockets and — when
/// `NOTIFICATIONS_URL` is set — chat notifications, concurrently, failover on
/// exhaustion); plus, when `NOTIFICATIONS_URL` is set, a `domain` pipeline for the
/// purchase, payment and shipment topics.
pub fn default_pipelines(settings: &Settings) -> Vec<PipelineSettings> {
    let notifications = !settings.forward.notifications_url.trim().is_empty();
    let mut targets = vec![Target::ChatWebsocket];
    if notifications {
        targets.push(Target::ChatNotification);
    }
    let chat = PipelineSettings {
        name: DEFAULT_CHAT_PIPELINE.to_owned(),
        topics: settings.kafka.topics.clone(),
        group_id: settings.kafka.group_id.clone(),
        dead_letter_topic: settings.kafka.dead_letter_topic().map(str::to_owned),
        targets,
        event_store: StoreOverride::default(),
        dedup_by: DedupBy::Event,
        retry: RetryOverride::default(),
        // Failover for the sockets; the notification target falls back to dead_letter
        // (Pipeline::action_for).
        on_exhausted: OnExhausted::Failover,
        on_exhausted_per_target: BTreeMap::new(),
    };
    let mut pipelines = vec![chat];
    if notifications {
        pipelines.push(PipelineSettings {
            name: DEFAULT_DOMAIN_PIPELINE.to_owned(),
            topics: DomainKind::ALL.iter().map(|k| k.topic().to_owned()).collect(),
            group_id: DEFAULT_DOMAIN_GROUP.to_owned(),
            dead_letter_topic: Some(DEFAULT_DOMAIN_DEAD_LETTER_TOPIC.to_owned()),
            targets: vec![Target::DomainNotification],
            event_store: StoreOverride {
                key_prefix: Some(DEFAULT_DOMAIN_PREFIX.to_owned()),
                ttl: Some(DEFAULT_DOMAIN_TTL),
                processing_lease: None,
            },
            dedup_by: DedupBy::Event,
            retry: RetryOverride::default(),
            on_exhausted: OnExhausted::DeadLetter,
            on_exhausted_per_target: BTreeMap::new(),
        });
    }
    if !settings.bots.bots.trim().is_empty() {
        pipelines.push(PipelineSettings {
            name: DEFAULT_BOT_PIPELINE.to_owned(),
            topics: settings.kafka.topics.clone(),
            group_id: DEFAULT_BOT_GROUP.to_owned(),
            dead_letter_topic: Some(DEFAULT_BOT_DEAD_LETTER_TOPIC.to_owned()),
            targets: vec![Target::Bot],
            event_store: StoreOverride { key_prefix: Some(DEFAULT_BOT_PREFIX.to_owned()), ..StoreOverride::default() },
            dedup_by: DedupBy::Event,
            retry: RetryOverride::default(),
            on_exhausted: OnExhausted::DeadLetter,
            on_exhausted_per_target: BTreeMap::new(),
        });
    }
    pipelines
}

fn resolve_one(settings: &Settings, raw: &PipelineSettings) -> Pipeline {
    let shared = &settings.eventstore;
    let store = EventStoreSettings {
        key_prefix: raw.event_store.key_prefix.clone().unwrap_or_else(|| shared.key_prefix.clone()),
        ttl: raw.event_store.ttl.unwrap_or(shared.ttl),
        processing_lease: raw.event_store.processing_lease.unwrap_or(shared.processing_lease),
        ..shared.clone()
    };
    let kafka = KafkaSettings {
        group_id: raw.group_id.trim().to_owned(),
        topics: raw.topics.iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect(),
        dead_letter_topic: raw.dead_letter_topic.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned),
        ..settings.kafka.clone()
    };
    Pipeline {
        name: raw.name.trim().to_owned(),
        kafka,
        retry: raw.retry.over(&settings.retry),
        store,
        targets: raw.targets.clone(),
        dedup_by: raw.dedup_by,
        on_exhausted: raw.on_exhausted,
        on_exhausted_per_target: raw.on_exhausted_per_target.clone(),
    }
}

/// Every problem with the pipelines, each naming its pipeline; empty when they can run.
pub fn validate(settings: &Settings, pipelines: &[Pipeline]) -> Vec<String> {
    let mut problems = Vec::new();
    if pipelines.is_empty() {
        problems.push("no pipeline is configured".to_owned());
    }
    let mut names = HashSet::new();
    let mut groups = HashSet::new();
    let mut prefixes = HashSet::new();
    for p in pipelines {
        let mut problem = |text: String| problems.push(format!("pipeline `{}`: {text}", p.name));
        let name_ok = !p.name.is_empty()
            && p.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            problem("the name must be non-empty lower-case letters, digits, `_` or `-`".to_owned());
        }
        if !names.insert(p.name.as_str()) {
            problem("the name is used by another pipeline".to_owned());
        }
        if p.kafka.group_id.is_empty() {
            problem("group_id must be set".to_owned());
        } else if !groups.insert(p.kafka.group_id.as_str()) {
            problem(format!(
                "group_id `{}` is used by another pipeline; each pipeline needs its own consumer group",
                p.kafka.group_id
            ));
        }
        if p.store.key_prefix.trim().is_empty() {
            problem("event_store.key_prefix must not be empty".to_owned());
        } else if !prefixes.insert(p.store.key_prefix.as_str()) {
            problem(format!(
                "event_store.key_prefix `{}` is used by another pipeline; one would skip the other's events as duplicates",
                p.store.key_prefix
            ));
        }
        if p.store.ttl < Duration::from_millis(1) {
            problem("event_store.ttl must be at least 1ms".to_owned());
        }
        if p.store.processing_lease < Duration::from_millis(1) {
            problem("event_store.processing_lease must be at least 1ms".to_owned());
        }
        if p.kafka.topics.is_empty() {
            problem("topics must name at least one topic".to_owned());
        }
        if p.targets.is_empty() {
            problem(
                "targets is empty; name at least one of chat_websocket, chat_notification, domain_notification, bot"
                    .to_owned(),
            );
        }
        let mut seen = HashSet::new();
        for target in &p.targets {
            if !seen.insert(*target) {
                problem(format!("target {} is listed twice", target.name()));
            }
        }
        for topic in &p.kafka.topics {
            let domain = domain_kind(topic).is_some();
            for target in &p.targets {
                if domain && target.is_chat() {
                    problem(format!(
                        "target {} reads chat changes, but `{topic}` is a domain topic (use domain_notification)",
                        target.name()
                    ));
                }
                if !domain && !target.is_chat() {
                    problem(format!(
                        "target domain_notification reads purchases.changes, payments.changes or shipments.changes, not `{topic}`"
                    ));
                }
            }
            if p.kafka.dead_letter_topic() == Some(topic.as_str()) {
                problem(format!("`{topic}` cannot be both consumed and the dead-letter topic"));
            }
        }
        if p.dedup_by == DedupBy::Stream && p.targets.iter().any(|t| *t != Target::ChatNotification) {
            problem(
                "dedup_by = \"stream\" keeps one notification per conversation and window; it is only for \
                 chat_notification targets (it would drop chat messages and domain events)"
                    .to_owned(),
            );
        }
        match p.on_exhausted {
            OnExhausted::Failover if !p.has(Target::ChatWebsocket) => {
                problem("on_exhausted = \"failover\" closes chat sockets and needs a chat_websocket target".to_owned())
            }
            OnExhausted::DeadLetter if p.kafka.dead_letter_topic().is_none() => {
                problem("on_exhausted = \"dead_letter\" needs a dead_letter_topic".to_owned())
            }
            _ => {}
        }
        for (target, action) in &p.on_exhausted_per_target {
            let key = format!("on_exhausted_per_target.{} = \"{}\"", target.name(), action.name());
            if !p.has(*target) {
                problem(format!("{key}: {} is not one of this pipeline's targets", target.name()));
            }
            match action {
                OnExhausted::Failover if *target != Target::ChatWebsocket => problem(format!(
                    "{key}: failover closes the stream's chat sockets and is only for chat_websocket \
                     (use log_and_skip or dead_letter)"
                )),
                OnExhausted::DeadLetter if p.kafka.dead_letter_topic().is_none() => {
                    problem(format!("{key} needs a dead_letter_topic"))
                }
                _ => {}
            }
        }
        if p.has(Target::ChatWebsocket) && settings.forward.chat_websocket_url.trim().is_empty() {
            problem("target chat_websocket needs CHAT_WEBSOCKET_URL".to_owned());
        }
        if p.targets.iter().any(|t| t.needs_notifications_url()) && settings.forward.notifications_url.trim().is_empty()
        {
            problem("notification targets need NOTIFICATIONS_URL".to_owned());
        }
        if p.has(Target::Bot) {
            for text in settings.bots.problems() {
                problem(text);
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(notifications: &str) -> Settings {
        let mut s = Settings::default();
        s.forward.notifications_url = notifications.to_owned();
        s
    }

    fn pipeline(name: &str, topics: &[&str], group: &str, targets: &[Target]) -> PipelineSettings {
        PipelineSettings {
            name: name.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            group_id: group.to_owned(),
            dead_letter_topic: None,
            targets: targets.to_vec(),
            event_store: StoreOverride { key_prefix: Some(format!("{name}-prefix")), ..StoreOverride::default() },
            dedup_by: DedupBy::Event,
            retry: RetryOverride::default(),
            on_exhausted: OnExhausted::LogAndSkip,
            on_exhausted_per_target: BTreeMap::new(),
        }
    }

    fn error_of(mut s: Settings, pipelines: Vec<PipelineSettings>) -> String {
        s.pipelines = pipelines;
        resolve(&s).expect_err("configuration must be refused")
    }

    #[test]
    fn the_default_is_one_chat_pipeline_exactly_as_before() {
        let pipelines = resolve(&settings("")).expect("default is valid");
        assert_eq!(pipelines.len(), 1);
        let chat = &pipelines[0];
        assert_eq!(chat.name, "chat");
        assert_eq!(chat.kafka.group_id, "chat-websocket-forwarder");
        assert_eq!(chat.kafka.topics, vec!["chat.changes".to_owned()]);
        assert_eq!(chat.kafka.dead_letter_topic(), Some("chat.changes.dlq"));
        assert_eq!(chat.targets, vec![Target::ChatWebsocket]);
        assert_eq!(chat.on_exhausted, OnExhausted::Failover);
        assert_eq!(chat.store, Settings::default().eventstore);
        assert_eq!(chat.retry, RetrySettings::default());
    }

    #[test]
    fn with_notifications_the_default_adds_chat_notifications_and_a_domain_pipeline() {
        let pipelines = resolve(&settings("http://notify:9090")).expect("valid");
        assert_eq!(pipelines.len(), 2);
        assert_eq!(pipelines[0].targets, vec![Target::ChatWebsocket, Target::ChatNotification]);
        let domain = &pipelines[1];
        assert_eq!(domain.name, "domain");
        assert_eq!(domain.kafka.group_id, "domain-notifications");
        assert_eq!(domain.kafka.topics, vec!["purchases.changes", "payments.changes", "shipments.changes"]);
        assert_eq!(domain.targets, vec![Target::DomainNotification]);
        assert_eq!(domain.store.key_prefix, "domain-notifications");
        assert_eq!(domain.store.ttl, DEFAULT_DOMAIN_TTL);
        assert_eq!(domain.on_exhausted, OnExhausted::DeadLetter);
        assert_eq!(domain.kafka.dead_letter_topic(), Some("domain-notifications.dlq"));
    }

    #[test]
    fn bots_get_their_own_pipeline_and_need_the_ai_settings() {
        let mut s = settings("");
        s.bots.bots = "assistant".into();
        let err = resolve(&s).expect_err("no AI_BASE_URL / AI_MODEL");
        assert!(err.contains("pipeline `bots`: the bot target needs AI_BASE_URL"), "{err}");
        assert!(err.contains("needs AI_MODEL"), "{err}");
        s.bots.base_url = "http://127.0.0.1:11434/v1".into();
        s.bots.model = "llama3".into();
        let pipelines = resolve(&s).expect("valid");
        assert_eq!(pipelines[0].targets, vec![Target::ChatWebsocket], "chat never waits for the model");
        let bots = &pipelines[1];
        assert_eq!((bots.name.as_str(), bots.kafka.group_id.as_str()), ("bots", "chat-bots"));
        assert_eq!(bots.targets, vec![Target::Bot]);
        assert_eq!(bots.store.key_prefix, "chat-bots");
        assert_eq!(bots.action_for(Target::Bot), OnExhausted::DeadLetter);
        assert_eq!(bots.kafka.dead_letter_topic(), Some("chat-bots.dlq"));
    }

    #[test]
    fn a_chat_target_on_a_domain_topic_is_refused() {
        let err = error_of(
            settings("http://n"),
            vec![pipeline("bad", &["purchases.changes"], "g", &[Target::ChatNotification])],
        );
        assert!(err.contains("pipeline `bad`"), "{err}");
        assert!(err.contains("chat_notification reads chat changes"), "{err}");
        assert!(err.contains("purchases.changes"), "{err}");
    }

    #[test]
    fn a_domain_target_on_a_chat_topic_is_refused() {
        let err = error_of(
            settings("http://n"),
            vec![pipeline("bad", &["chat.changes"], "g", &[Target::DomainNotification])],
        );
        assert!(err.contains("domain_notification reads purchases.changes"), "{err}");
    }

    #[test]
    fn an_empty_target_list_is_refused() {
        let err = error_of(settings(""), vec![pipeline("empty", &["chat.changes"], "g", &[])]);
        assert!(err.contains("pipeline `empty`: targets is empty"), "{err}");
    }

    #[test]
    fn duplicate_group_ids_are_refused() {
        let err = error_of(
            settings("http://n"),
            vec![
                pipeline("one", &["chat.changes"], "same", &[Target::ChatWebsocket]),
                pipeline("two", &["chat.changes"], "same", &[Target::ChatNotification]),
            ],
        );
        assert!(err.contains("pipeline `two`: group_id `same` is used by another pipeline"), "{err}");
        assert!(!err.contains("pipeline `one`"), "only the second one is wrong: {err}");
    }

    #[test]
    fn shared_event_store_prefixes_and_names_are_refused() {
        let mut a = pipeline("a", &["chat.changes"], "ga", &[Target::ChatWebsocket]);
        let mut b = pipeline("a", &["chat.changes"], "gb", &[Target::ChatNotification]);
        a.event_store.key_prefix = Some("same".into());
        b.event_store.key_prefix = Some("same".into());
        let err = error_of(settings("http://n"), vec![a, b]);
        assert!(err.contains("key_prefix `same` is used by another pipeline"), "{err}");
        assert!(err.contains("the name is used by another pipeline"), "{err}");
    }

    #[test]
    fn actions_need_what_they_act_on() {
        let mut failover = pipeline("f", &["chat.changes"], "gf", &[Target::ChatNotification]);
        failover.on_exhausted = OnExhausted::Failover;
        let mut dead = pipeline("d", &["chat.changes"], "gd", &[Target::ChatWebsocket]);
        dead.on_exhausted = OnExhausted::DeadLetter;
        let err = error_of(settings("http://n"), vec![failover, dead]);
        assert!(err.contains("pipeline `f`: on_exhausted = \"failover\""), "{err}");
        assert!(err.contains("pipeline `d`: on_exhausted = \"dead_letter\" needs a dead_letter_topic"), "{err}");
    }

    #[test]
    fn failover_belongs_to_the_chat_websocket_target_alone() {
        // The default (strategy 1): one pipeline with `on_exhausted = failover` for both
        // chat targets; the notification target falls back to the dead-letter topic.
        let pipelines = resolve(&settings("http://n")).expect("valid");
        let chat = &pipelines[0];
        assert_eq!(
            chat.actions(),
            vec![(Target::ChatWebsocket, OnExhausted::Failover), (Target::ChatNotification, OnExhausted::DeadLetter)]
        );
        assert_eq!(chat.record_action(), OnExhausted::DeadLetter);
        // Without a dead-letter topic the fallback is log_and_skip.
        let mut s = settings("http://n");
        s.kafka.dead_letter_topic = None;
        let chat = resolve(&s).expect("valid").remove(0);
        assert_eq!(chat.action_for(Target::ChatNotification), OnExhausted::LogAndSkip);
        assert_eq!(chat.action_for(Target::ChatWebsocket), OnExhausted::Failover);
        // A pipeline-wide action other than failover applies to every target as written.
        let domain = &pipelines[1];
        assert_eq!(domain.actions(), vec![(Target::DomainNotification, OnExhausted::DeadLetter)]);
    }

    #[test]
    fn per_target_actions_override_the_pipeline_action() {
        let mut p = pipeline("c", &["chat.changes"], "g", &[Target::ChatWebsocket, Target::ChatNotification]);
        p.on_exhausted = OnExhausted::LogAndSkip;
        p.on_exhausted_per_target = BTreeMap::from([(Target::ChatWebsocket, OnExhausted::Failover)]);
        let mut s = settings("http://n");
        s.pipelines = vec![p];
        let resolved = resolve(&s).expect("valid").remove(0);
        assert_eq!(
            resolved.actions(),
            vec![(Target::ChatWebsocket, OnExhausted::Failover), (Target::ChatNotification, OnExhausted::LogAndSkip)]
        );
        assert_eq!(resolved.record_action(), OnExhausted::LogAndSkip);
    }

    #[test]
    fn per_target_actions_are_checked() {
        let mut p = pipeline("c", &["chat.changes"], "g", &[Target::ChatWebsocket, Target::ChatNotification]);
        p.on_exhausted_per_target = BTreeMap::from([
            (Target::ChatNotification, OnExhausted::Failover),
            (Target::ChatWebsocket, OnExhausted::DeadLetter),
            (Target::DomainNotification, OnExhausted::LogAndSkip),
        ]);
        let err = error_of(settings("http://n"), vec![p]);
        for part in [
            "pipeline `c`: on_exhausted_per_target.chat_notification = \"failover\": failover closes the stream's \
             chat sockets and is only for chat_websocket",
            "pipeline `c`: on_exhausted_per_target.chat_websocket = \"dead_letter\" needs a dead_letter_topic",
            "pipeline `c`: on_exhausted_per_target.domain_notification = \"log_and_skip\": domain_notification is \
             not one of this pipeline's targets",
        ] {
            assert!(err.contains(part), "missing {part:?} in {err}");
        }
    }

    #[test]
    fn stream_dedup_is_only_for_chat_notifications() {
        let mut sockets = pipeline("s", &["chat.changes"], "gs", &[Target::ChatWebsocket]);
        sockets.dedup_by = DedupBy::Stream;
        let mut ok = pipeline("n", &["chat.changes"], "gn", &[Target::ChatNotification]);
        ok.dedup_by = DedupBy::Stream;
        let err = error_of(settings("http://n"), vec![sockets, ok]);
        assert!(err.contains("pipeline `s`: dedup_by = \"stream\""), "{err}");
        assert!(!err.contains("pipeline `n`"), "{err}");
    }

    #[test]
    fn notification_targets_need_the_notification_url() {
        let err = error_of(settings(""), vec![pipeline("n", &["chat.changes"], "g", &[Target::ChatNotification])]);
        assert!(err.contains("need NOTIFICATIONS_URL"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = error_of(
            settings("http://n"),
            vec![pipeline("Bad Name", &[], "", &[]), pipeline("ok", &["chat.changes"], "g", &[Target::ChatWebsocket])],
        );
        for part in ["the name must be", "group_id must be set", "topics must name", "targets is empty"] {
            assert!(err.contains(part), "missing {part:?} in {err}");
        }
    }

    #[test]
    fn pipelines_enabled_selects_a_subset_and_refuses_unknown_names() {
        let mut s = settings("http://n");
        s.pipelines_enabled = "domain".into();
        let only = resolve(&s).expect("valid");
        assert_eq!(only.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), vec!["domain"]);
        s.pipelines_enabled = "chat, nope".into();
        let err = resolve(&s).expect_err("unknown name");
        assert!(err.contains("PIPELINES_ENABLED names `nope`"), "{err}");
    }

    #[test]
    fn unset_pipeline_fields_inherit_the_shared_sections() {
        let mut s = settings("http://n");
        s.retry.initial_interval = Duration::from_millis(7);
        s.eventstore.processing_lease = Duration::from_secs(9);
        let mut p = pipeline("n", &["chat.changes"], "g", &[Target::ChatNotification]);
        p.retry.max_retries = Some(3);
        p.event_store.ttl = Some(Duration::from_secs(3));
        s.pipelines = vec![p];
        let resolved = resolve(&s).expect("valid");
        let n = &resolved[0];
        assert_eq!(n.retry.max_retries, 3);
        assert_eq!(n.retry.initial_interval, Duration::from_millis(7));
        assert_eq!(n.store.ttl, Duration::from_secs(3));
        assert_eq!(n.store.processing_lease, Duration::from_secs(9));
        assert_eq!(n.store.key_prefix, "n-prefix");
        assert_eq!(n.kafka.brokers, s.kafka.brokers);
    }

    /// One chat connector captures messages and conversation events (so the oplog
    /// order of a conversation's messages and membership changes is kept) into the
    /// chat topic, keyed by `stream_id` and `conversation_id` respectively.
    #[test]
    fn the_chat_connector_captures_messages_and_conversation_events_into_one_topic() {
        let dir = format!("{}/../../debezium", env!("CARGO_MANIFEST_DIR"));
        let file: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/chat-messages-connector.json")).expect("chat"),
        )
        .expect("chat connector JSON");
        let config = &file["config"];
        let get = |key: &str| config[key].as_str().unwrap_or_default().to_owned();
        let collections = format!("|{}", chatstream::CONVERSATION_EVENTS_COLLECTION);
        assert!(get("collection.include.list").contains(&collections), "{}", get("collection.include.list"));
        assert!(get("transforms.route.regex").contains(&collections));
        assert_eq!(get("transforms.route.replacement"), "${CHAT_CHANGES_TOPIC}");
        assert_eq!(get("transforms.route.predicate"), "isChat");
        assert_eq!(get("transforms.unwrap.predicate"), "isChat");
        assert_eq!(get("transforms.keyByConversation.fields"), "conversation_id");
        assert_eq!(get("transforms.conversationIdKey.field"), "conversation_id");
        assert_eq!(get("transforms.keyByStream.predicate"), "isMessages");
        assert!(get("predicates.isConversationEvents.pattern").ends_with("\\.conversation_events"));
        assert!(get("transforms").ends_with(",route"), "routing renames the topic, so it runs last");
    }

    /// The shipped Debezium connectors capture each domain collection to the topic the
    /// pipeline reads, keyed by `user_id`, with the chat connector's flattening.
    #[test]
    fn the_domain_connectors_route_each_collection_to_its_topic_by_user() {
        let dir = format!("{}/../../debezium", env!("CARGO_MANIFEST_DIR"));
        let chat: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/chat-messages-connector.json")).expect("chat"),
        )
        .expect("chat connector JSON");
        for kind in DomainKind::ALL {
            let path = format!("{dir}/{}-connector.json", kind.collection());
            let file: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("connector file")).expect("JSON");
            let config = &file["config"];
            let get = |key: &str| config[key].as_str().unwrap_or_default().to_owned();
            assert_eq!(file["name"], kind.collection());
            assert_eq!(get("transforms.route.replacement"), kind.topic(), "{path}");
            assert!(get("collection.include.list").ends_with(&format!("\\.{}", kind.collection())), "{path}");
            assert_eq!(get("transforms.keyByUser.fields"), "user_id", "{path}");
            assert_eq!(get("transforms.userIdKey.field"), "user_id", "{path}");
            for same in [
                "transforms.unwrap.type",
                "transforms.unwrap.add.fields",
                "transforms.unwrap.delete.tombstone.handling.mode",
                "capture.mode",
                "snapshot.mode",
                "key.converter",
                "value.converter",
                "value.converter.schemas.enable",
            ] {
                assert_eq!(config[same], chat["config"][same], "{path}: {same}");
            }
        }
    }
}
