//! chatwebsocketshandler: the chat sockets, grouped by stream id.
//!
//! Clients subscribe on the public port (`GET /chat/subscribe`, optionally replaying
//! history after `since`); the change handler forwards each chat event to the pod
//! holding the stream's sockets (`POST /chat/forward-to-websocket`, internal port)
//! and, when delivery keeps failing, closes them with resync (`POST /chat/close-stream`).
//! Groups subscribe with `conversation_id` (members only, asked of chatpersistence);
//! membership, title and read-marker events arrive on `POST /chat/forward-event`, and
//! a removed member's sockets close with 4004. Typing indicators and presence are
//! relayed between a conversation's sockets on this pod, never stored (`live`).
//! The socket plumbing itself is the shared `wsfanout` crate. `main` only wires.

mod app;
mod history;
mod internal;
mod live;
mod protocol;
mod settings;
mod subscribe;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::run("chatwebsocketshandler", &settings::Settings::env_map(), app::launch).await
}
