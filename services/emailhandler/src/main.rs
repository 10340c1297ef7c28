//! emailhandler: turns chat and domain events into emails, in its own consumer group.
//!
//! At this stage it starts, reports health and metrics, and shuts down cleanly; the
//! consumer, templates and SMTP delivery arrive with the notifications issue.

use axum::Router;
use serde::{Deserialize, Serialize};
use servicekit::{EnvMap, Launch, Readiness, Routes};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Settings {
    /// `KAFKA_BROKERS`: bootstrap servers.
    kafka_brokers: String,
    /// `MONGODB_URI`: the users collection lives here.
    mongodb_uri: String,
    /// `SMTP_HOST` / `SMTP_PORT`: the mail relay.
    smtp_host: String,
    smtp_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kafka_brokers: "127.0.0.1:9092".to_owned(),
            mongodb_uri: "mongodb://127.0.0.1:27017".to_owned(),
            smtp_host: "127.0.0.1".to_owned(),
            smtp_port: 2525,
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let env = EnvMap::new()
        .var("KAFKA_BROKERS", "kafka_brokers")
        .var("MONGODB_URI", "mongodb_uri")
        .var("SMTP_HOST", "smtp_host")
        .var("SMTP_PORT", "smtp_port");
    servicekit::run("emailhandler", &env, |_, settings: Settings| async move {
        let readiness = Readiness::new()
            .tcp("kafka", &settings.kafka_brokers)
            .tcp("mongodb", &settings.mongodb_uri)
            .tcp("smtp", &format!("{}:{}", settings.smtp_host, settings.smtp_port));
        Ok::<_, String>(Launch::new(Routes::new(Router::new())).readiness(readiness))
    })
    .await
}
