//! generalnotificationshandler: user-scoped notification sockets (chat, purchase,
//! payment reminder, shipping), grouped by user id, and presence in Redis.
//!
//! Clients subscribe on the public port (`GET /notifications/subscribe?user_id=…`) and
//! may ask whether someone is online (`GET /presence`); the change handler and the
//! domain pipelines post notifications to the internal port
//! (`POST /notifications/{chat,purchase,payment-reminder,shipping}?user_id=…`, or many
//! users' at once with `POST /notifications/batch`), which an L7 proxy routes to the
//! pod holding the user's sockets by hashing on `user_id`.
//! The socket plumbing is the shared `wsfanout` crate. `main` only wires.

mod app;
mod batch;
mod notify;
mod online;
mod presence;
mod protocol;
mod settings;
mod subscribe;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::run("generalnotificationshandler", &settings::Settings::env_map(), app::launch).await
}
