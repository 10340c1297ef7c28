//! chatpersistencechangehandler: consumes `chat.changes` and forwards each change to
//! the WebSocket pod holding the stream and to the notification service.

use axum::Router;
use serde::{Deserialize, Serialize};
use servicekit::{EnvMap, Launch, Readiness, Routes};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Settings {
    kafka_brokers: String,
    redis_url: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self { kafka_brokers: "127.0.0.1:9092".to_owned(), redis_url: "redis://127.0.0.1:6379".to_owned() }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let env = EnvMap::new().var("KAFKA_BROKERS", "kafka_brokers").var("REDIS_URL", "redis_url");
    servicekit::run("chatpersistencechangehandler", &env, |_, settings: Settings| async move {
        let readiness = Readiness::new().tcp("kafka", &settings.kafka_brokers);
        Ok::<_, String>(Launch::new(Routes::new(Router::new())).readiness(readiness))
    })
    .await
}
