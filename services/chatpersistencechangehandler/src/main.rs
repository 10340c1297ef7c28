//! chatpersistencechangehandler: consumes the change topics (chat, purchases,
//! payments, shipments) and forwards each change to the WebSocket pod holding the
//! stream and to the notification service, through configured pipelines.
//!
//! This file only wires: settings → pipelines → one event store, handler and consumer
//! group per pipeline → one worker running them all (docs/pipelines.md).

mod bot;
mod forward;
mod forward_batch;
mod handler;
mod notify_batch;
mod pipeline;
mod runner;
mod settings;

use axum::Router;
use eventstore::RedisEventStore;
use kafkawrapper::ConsumerGroup;
use servicekit::{Context, Launch, Readiness, Routes};

use crate::forward::{Forwarder, ServiceToken};
use crate::handler::{Endpoints, PipelineHandler};
use crate::settings::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::run("chatpersistencechangehandler", &Settings::env_map(), build).await
}

/// Settings → pipelines → one event store, handler and consumer group per pipeline →
/// one worker running them all.
async fn build(ctx: Context, settings: Settings) -> Result<Launch, String> {
    // Every start-up problem at once: the pipelines and the service token.
    let (pipelines, token) = match (pipeline::resolve(&settings), ServiceToken::parse(&settings.forward.service_token))
    {
        (Ok(pipelines), Ok(token)) => (pipelines, token),
        (pipelines, token) => {
            let problems: Vec<String> = [pipelines.err(), token.err()].into_iter().flatten().collect();
            return Err(problems.join("; "));
        }
    };
    // Topics normally exist already (created by the operator, the relay or the
    // connector); this only covers a fresh local broker, which does not auto-create.
    let topics = runner::topics_to_ensure(&pipelines, settings.topic_partitions);
    let topics: Vec<(&str, i32)> = topics.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    if let Err(err) = kafkawrapper::ensure_topics(&settings.kafka.brokers, &topics).await {
        tracing::warn!(error = %err, "could not ensure topics exist");
    }
    let forwarder = Forwarder::new(settings.forward.timeout, token)?;
    let endpoints = Endpoints {
        chat_websocket_url: settings.forward.chat_websocket_url.clone(),
        notifications_url: settings.forward.notifications_url.clone(),
        failover_timeout: settings.forward.failover_timeout,
        notifications_batch: settings.forward.notifications_batch,
        forward_batch: settings.forward.chat_websocket_batch,
        forward_linger: settings.forward.chat_websocket_linger,
    };
    // The bot adapter, when a pipeline has the bot target (its settings were
    // checked with the pipelines).
    let bots = match pipelines.iter().any(|p| p.has(pipeline::Target::Bot)) {
        true => Some(bot::Bots::new(&settings.bots, settings.forward.timeout, forwarder.token())?),
        false => None,
    };
    let mut groups = Vec::new();
    for pipeline in &pipelines {
        let store = RedisEventStore::new(pipeline.store.clone())
            .map_err(|e| format!("pipeline `{}`: event store: {e}", pipeline.name))?;
        let handler = PipelineHandler::new(pipeline, store, &forwarder, &endpoints).with_bots(bots.clone());
        let group = ConsumerGroup::new(pipeline.kafka.clone(), pipeline.retry.clone(), handler)
            .map_err(|e| format!("pipeline `{}`: {e}", pipeline.name))?;
        runner::describe(pipeline);
        groups.push((pipeline.name.clone(), group));
    }
    let shutdown = ctx.shutdown.clone();
    let readiness = Readiness::new().tcp("kafka", &settings.kafka.brokers);
    Ok(Launch::new(Routes::new(Router::new()))
        .readiness(readiness)
        .worker("pipelines", runner::run_all(groups, shutdown)))
}
