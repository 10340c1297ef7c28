//! What a server answers to the frames clients send on a mostly receive-only socket.
//!
//! Why this module exists: both socket services mostly push; the one thing every
//! client may send is an application-level keep-alive (`{"type":"ping"}`, for clients
//! that cannot see protocol pings). A service may accept a few more (the chat socket
//! takes ephemeral `typing` frames) and hands the rest here. Everything unsupported
//! gets an `error` frame in the HTTP API's error shape and the socket stays open. The
//! rule is the same for both, so it is here once.

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::driver::Inbound;

/// Frames a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Ping,
}

/// `{"type":"ping"}` gets `{"type":"pong"}`; any other text gets an `unsupported_frame`
/// error whose message ends with `hint` (what the client should do instead); binary
/// frames are not supported. Meant for [`crate::Driver::on_client`].
pub fn answer_ping(frame: Inbound<'_>, hint: &str) -> Utf8Bytes {
    let problem = match frame {
        Inbound::Text(text) => match serde_json::from_str::<ClientFrame>(text) {
            Ok(ClientFrame::Ping) => return Utf8Bytes::from(json!({"type": "pong"}).to_string()),
            Err(_) => format!("only {{\"type\":\"ping\"}} frames are accepted; {hint}"),
        },
        Inbound::Binary(_) => "binary frames are not supported".to_owned(),
    };
    unsupported_frame(&problem)
}

/// The `error` frame (code `unsupported_frame`) answering a client frame the server
/// does not accept, with `message` saying why; the socket stays open.
pub fn unsupported_frame(message: &str) -> Utf8Bytes {
    let error = json!({"type": "error", "error": {"code": "unsupported_frame", "message": message}});
    Utf8Bytes::from(error.to_string())
}
