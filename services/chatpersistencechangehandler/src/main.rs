//! chatpersistencechangehandler: consumes `chat.changes` and forwards each change to
//! the WebSocket pod holding the stream and to the notification service.
//!
//! This file only wires: settings → event store, forwarder, handler → consumer group.

mod forward;
mod handler;
mod settings;

use axum::Router;
use eventstore::RedisEventStore;
use kafkawrapper::ConsumerGroup;
use servicekit::{Launch, Readiness, Routes};

use crate::forward::Forwarder;
use crate::handler::ChatChangeHandler;
use crate::settings::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::run("chatpersistencechangehandler", &Settings::env_map(), |ctx, settings: Settings| async move {
        let topics: Vec<(&str, i32)> = settings
            .kafka
            .topics
            .iter()
            .map(String::as_str)
            .chain(settings.kafka.dead_letter_topic())
            .map(|topic| (topic, 1))
            .collect();
        // Topics normally exist already (created by the operator or the relay); this
        // only covers a fresh local broker, which does not auto-create them.
        if let Err(err) = kafkawrapper::ensure_topics(&settings.kafka.brokers, &topics).await {
            tracing::warn!(error = %err, "could not ensure topics exist");
        }
        let store = RedisEventStore::new(settings.eventstore.clone()).map_err(|e| e.to_string())?;
        let forwarder = Forwarder::new(settings.forward.timeout, settings.forward.service_token.clone())?;
        let handler = ChatChangeHandler::new(
            store,
            forwarder,
            &settings.forward.chat_websocket_url,
            &settings.forward.notifications_url,
            settings.forward.failover_timeout,
        );
        let consumer = ConsumerGroup::new(settings.kafka.clone(), settings.retry.clone(), handler)
            .map_err(|e| e.to_string())?;
        let shutdown = ctx.shutdown.token();
        let readiness = Readiness::new().tcp("kafka", &settings.kafka.brokers);
        Ok::<_, String>(
            Launch::new(Routes::new(Router::new()))
                .readiness(readiness)
                .worker("chat.changes consumer", async move { consumer.run(shutdown).await.map_err(|e| e.to_string()) }),
        )
    })
    .await
}
