//! generalnotificationshandler: user-scoped notification sockets (chat, purchase,
//! payment reminder, shipping), routed by user_id.
//!
//! At this stage it starts, reports health and metrics, and shuts down cleanly; the
//! notification endpoints and sockets arrive with the notifications issue.

use axum::Router;
use serde::{Deserialize, Serialize};
use servicekit::{EnvMap, Launch, Readiness, Routes};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Settings {
    /// `REDIS_URL`: presence keys live here.
    redis_url: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self { redis_url: "redis://127.0.0.1:6379".to_owned() }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let env = EnvMap::new().var("REDIS_URL", "redis_url");
    servicekit::run("generalnotificationshandler", &env, |_, settings: Settings| async move {
        let readiness = Readiness::new().tcp("redis", &settings.redis_url);
        Ok::<_, String>(Launch::new(Routes::new(Router::new()).internal(Router::new())).readiness(readiness))
    })
    .await
}
