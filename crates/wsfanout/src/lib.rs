//! WebSocket fan-out: the socket plumbing every chatfleet socket service shares.
//!
//! Why this crate exists: `chatwebsocketshandler` groups sockets by stream id and
//! `generalnotificationshandler` groups them by user id, but everything else about
//! their sockets is the same and must behave the same: a bounded outbound queue per
//! connection, closing a client that cannot keep up instead of slowing everyone,
//! heartbeats, the 200/206/500 delivery report that drives the change handler's
//! retries, not sending a retried event twice, replaying history before going live
//! with no gap and no duplicate at the seam, and sending `1001` to every socket on
//! shutdown. Written twice, those rules would drift; here they are written once,
//! generic over the grouping key.
//!
//! The pieces:
//! - [`Hub`]: the connections of one service, grouped by key. [`Hub::register`]
//!   admits a connection (or refuses it when `WS_MAX_CONNECTIONS` is reached),
//!   [`Hub::broadcast`] offers one pre-serialized frame to every connection of a key
//!   and reports what happened, [`Hub::close_key`] closes a key's connections.
//! - [`Driver`]: runs one upgraded axum `WebSocket` for a [`Registration`]: replay
//!   first, then the live queue, pings, the pong deadline, client frames, and the
//!   close handshake.
//! - [`OwnershipCheck`]: closes the sockets of keys the proxy's ring now sends to
//!   another pod (after a scale-out), so their clients reconnect to the owner.
//! - [`WsSettings`]: the documented `WS_*` settings.
//! - [`close_code`]: the close codes and what a client must do on each.
//!
//! The usual shape of a socket endpoint:
//!
//! ```ignore
//! let registration = hub.register(key)?;               // before the upgrade: live frames queue up
//! Ok(hub.settings().configure(upgrade).on_upgrade(move |socket| async move {
//!     let replay = fetch_history().await;               // anything persisted before now
//!     Driver::new(socket, registration, shutdown).replay(replay).run().await;
//! }))
//! ```

mod admit;
mod client_frames;
mod driver;
mod hub;
mod ownership;
mod settings;

pub use admit::{admit, Admission};
pub use client_frames::{answer_ping, unsupported_frame};
pub use driver::{Driver, Ended, Inbound};
pub use hub::{Close, ConnectionId, DeliveryReport, EventId, Frame, Hub, Outcome, Peer, RegisterError, Registration};
pub use ownership::{OwnerAnswer, OwnershipCheck, PodIdentity, Round};
pub use settings::WsSettings;

/// WebSocket close codes used by the fleet's socket services, and what a client does on each.
pub mod close_code {
    /// Normal closure (the client asked to close).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (deploy, scale-in). Reconnect (with `since`) after a short random delay.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A client frame was larger than `WS_MAX_MESSAGE_SIZE`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server cannot guarantee this socket saw every event: fetch history since the
    /// last event seen, then reconnect (with `since`).
    pub const RESYNC: u16 = 4000;
    /// The client did not read fast enough and its outbound queue filled up: it missed
    /// events. Same recovery as [`RESYNC`].
    pub const SLOW_CONSUMER: u16 = 4001;
    /// No frame (not even a pong) arrived within `WS_PONG_TIMEOUT`. Same recovery as [`RESYNC`].
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The token the socket was opened with expired (its `exp`): get a fresh token
    /// and reconnect with `since` (the last event seen); nothing is lost meanwhile.
    /// Reason `token expired`, after a `{"type":"token_expired"}` frame.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The user is no longer a member of the conversation (they left or were removed):
    /// do **not** reconnect to it; refresh the conversation list. Sent after the
    /// `member_left` frame that says so, with every frame queued before it.
    pub const REMOVED: u16 = 4004;
}
