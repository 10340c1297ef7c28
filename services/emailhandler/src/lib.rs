//! emailhandler: turns chat messages (batched into digests) and purchase, payment and
//! shipping changes into emails, in its own Kafka consumer group.
//!
//! Why this crate exists: email is the slowest, least reliable and most annoying
//! channel, so it gets its own consumer (a stuck SMTP relay must not hold up chat
//! sockets or notifications), its own long deduplication window (24 h: a replayed
//! backlog must not mail anyone twice), its own retry budget (10) and a dead-letter
//! topic (`email.dlq`). Chat messages are not mailed one by one: a recipient who is
//! offline gets one digest per `EMAIL_DIGEST_WINDOW`, kept in MongoDB until the SMTP
//! relay has accepted it. See `docs/email.md`.
//!
//! The parts: [`handler`] (the Kafka handler), [`flusher`] (sends due digests),
//! [`digest`] (pending digests in MongoDB), [`users`] (recipients), the `presence` crate
//! (online check in Redis), [`templates`] + [`compose`] (rendering), [`mailer`]
//! (SMTP). [`build`] wires them for `main`.

pub mod compose;
pub mod digest;
pub mod flusher;
pub mod handler;
pub mod mailer;
pub mod metrics;
pub mod settings;
pub mod store;
pub mod templates;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use chatstream::domain::DomainKind;
use eventstore::RedisEventStore;
use kafkawrapper::{ConsumerGroup, Producer, RetrySettings, Retryable};
use servicekit::{Context, Launch, Readiness, Routes};
use tokio_util::sync::CancellationToken;

use crate::digest::DigestStore;
use crate::flusher::{FlushSettings, Flusher};
use crate::handler::EmailHandler;
use crate::mailer::Mailer;
use crate::settings::{Settings, CHAT_TOPIC};
use crate::templates::Templates;
use crate::users::UserDirectory;
use presence::Presence;

/// How many times topic creation is tried at start (about two and a half minutes)
/// before the worker gives up and the service exits.
const ENSURE_TOPIC_ATTEMPTS: u32 = 35;

/// What the consumer and the flusher share.
pub struct Shared {
    pub store: RedisEventStore,
    pub users: UserDirectory,
    pub presence: Presence,
    pub digests: DigestStore,
    pub templates: Templates,
    pub mailer: Mailer,
}

/// The topic digest dead letters name as their origin: the first consumed topic that
/// is not a domain topic.
fn chat_topic(settings: &Settings) -> String {
    settings
        .kafka
        .topics
        .iter()
        .find(|t| DomainKind::from_topic(t).is_none())
        .cloned()
        .unwrap_or_else(|| CHAT_TOPIC.to_owned())
}

/// Creates the consumed topics and the dead-letter topic if they are missing (the
/// local broker does not auto-create), retrying while the broker is unreachable.
async fn ensure_topics(settings: &Settings, shutdown: &CancellationToken) -> Result<(), String> {
    let partitions = settings.email.topic_partitions.max(1);
    let topics: Vec<(&str, i32)> = settings
        .kafka
        .topics
        .iter()
        .map(String::as_str)
        .chain(settings.kafka.dead_letter_topic())
        .map(|topic| (topic, partitions))
        .collect();
    // The fleet's retry policy: 200 ms doubling to 5 s, 34 retries (about two and a
    // half minutes), then the worker gives up and the service exits.
    let policy = RetrySettings::doubling(Duration::from_millis(200), Duration::from_secs(5), ENSURE_TOPIC_ATTEMPTS - 1);
    let ensure = (|| kafkawrapper::ensure_topics(&settings.kafka.brokers, &topics))
        .retry(&policy)
        .notify(|err, wait| tracing::warn!(error = %err, retry_in = ?wait, "could not ensure the topics exist"));
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        result = ensure => result.map_err(|err| {
            format!("could not create the topics after {ENSURE_TOPIC_ATTEMPTS} attempts: {err}")
        }),
    }
}

/// Builds the service from its settings: validates templates and settings, wires the
/// consumer and the flusher, and says what readiness means (Kafka and MongoDB
/// reachable; SMTP is not a readiness condition: its outages are what retries and
/// pending digests absorb, and an unready pod would not receive less work anyway).
pub async fn build(ctx: Context, settings: Settings) -> Result<Launch, String> {
    settings.validate()?;
    let templates_dir = settings.email.resolve_templates_dir()?;
    let templates = Templates::new(&templates_dir)?;
    templates.validate().map_err(|err| format!("email templates in {}: {err}", templates_dir.display()))?;
    tracing::info!(dir = %templates_dir.display(), "email templates loaded");

    let (_client, database) = store::connect(&settings.mongo).await?;
    let users = UserDirectory::new(database.collection(&settings.mongo.users_collection), settings.mongo.timeout);
    let digests = DigestStore::new(
        database.collection(&settings.mongo.digests_collection),
        settings.mongo.timeout,
        settings.email.digest_window,
        settings.email.digest_max_items,
    );
    let store = RedisEventStore::new(settings.eventstore.clone()).map_err(|e| e.to_string())?;
    let presence = Presence::new(
        &settings.eventstore.redis_url,
        &settings.email.presence_key_prefix,
        settings.eventstore.timeout,
        crate::metrics::PRESENCE_FAILURES,
    )?;
    let mailer = Mailer::new(&settings.smtp)?;
    let shared = Arc::new(Shared { store, users, presence, digests, templates, mailer });

    let producer = match settings.kafka.dead_letter_topic() {
        Some(_) => Some(Producer::new(&settings.kafka).map_err(|e| e.to_string())?),
        None => None,
    };
    let flusher = Flusher::new(
        shared.clone(),
        FlushSettings {
            poll_interval: settings.email.digest_poll_interval,
            batch: settings.email.digest_batch,
            concurrency: settings.email.digest_concurrency,
            lease: settings.email.digest_lease,
            retry: settings.retry.clone(),
            dead_letter_topic: settings.kafka.dead_letter_topic().map(str::to_owned),
            chat_topic: chat_topic(&settings),
        },
        producer,
    );
    let consumer =
        ConsumerGroup::new(settings.kafka.clone(), settings.retry.clone(), EmailHandler::new(shared.clone()))
            .map_err(|e| e.to_string())?;

    let index_shared = shared.clone();
    let consumer_shutdown = ctx.shutdown.token();
    let consumer_settings = settings.clone();
    let consume = async move {
        // Indexes help but are not required: created in the background.
        tokio::spawn(async move {
            index_shared.users.ensure_index().await;
            index_shared.digests.ensure_indexes().await;
        });
        ensure_topics(&consumer_settings, &consumer_shutdown).await?;
        consumer.run(consumer_shutdown).await.map_err(|e| e.to_string())
    };
    let flusher_shutdown = ctx.shutdown.token();

    let ping_database = database.clone();
    let mongo_timeout = settings.mongo.timeout;
    let readiness = Readiness::new().tcp("kafka", &settings.kafka.brokers).check_fn("mongodb", move || {
        let database = ping_database.clone();
        Box::pin(async move { store::ping(&database, mongo_timeout).await })
    });
    Ok(Launch::new(Routes::new(Router::new()))
        .readiness(readiness)
        .worker("email consumer", consume)
        .worker("digest flusher", flusher.run(flusher_shutdown)))
}
