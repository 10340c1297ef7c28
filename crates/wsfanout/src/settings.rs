//! The `WS_*` settings, shared by every socket service so they are documented once.

use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use serde::{Deserialize, Serialize};

/// The read buffer a socket starts with, bytes (see [`WsSettings::configure`]).
pub const READ_BUFFER_SIZE: usize = 1024;
/// Frames are buffered up to this many bytes before a write (a flush writes them all).
pub const WRITE_BUFFER_SIZE: usize = 8 * 1024;

/// Socket settings (see `docs/chatwebsocketshandler.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WsSettings {
    /// `WS_OUTBOUND_QUEUE`: frames that may wait for one connection. When it is full the
    /// client cannot keep up and is closed with 4001 (slow consumer).
    pub outbound_queue: usize,
    /// `WS_PING_INTERVAL`: how often the server pings each socket.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// `WS_PONG_TIMEOUT`: a socket from which no frame at all (pong or anything else)
    /// arrived for this long is closed (4002) and dropped.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// `WS_MAX_CONNECTIONS`: sockets one process accepts; further upgrades are refused
    /// with 503. `0` means no limit.
    pub max_connections: usize,
    /// `WS_MAX_CONNECTIONS_PER_USER`: sockets one user may hold open on one pod;
    /// further upgrades get 429. `0` means no limit.
    pub max_connections_per_user: usize,
    /// `WS_MAX_CONNECTIONS_PER_IP`: sockets one client address may hold open on one
    /// pod (see `CLIENT_IP_HEADER`); further upgrades get 429. `0` means no limit.
    pub max_connections_per_ip: usize,
    /// `WS_CONNECT_RATE_PER_USER`: upgrade attempts per second one user may make
    /// (bursts of twice that); more get 429. `0` means no limit.
    pub connect_rate_per_user: u32,
    /// `WS_CONNECT_RATE_PER_IP`: upgrade attempts per second one client address may
    /// make (bursts of twice that); more get 429. `0` means no limit.
    pub connect_rate_per_ip: u32,
    /// `WS_MAX_MESSAGE_SIZE`: largest frame a client may send, in bytes (larger: close 1009).
    pub max_message_size: usize,
    /// `WS_RECENT_EVENTS`: how many recently queued event ids each connection
    /// remembers, so that a retried forward of the same event is not sent twice.
    pub recent_events: usize,
    /// `WS_CLOSE_TIMEOUT`: how long the server tries to deliver a close frame (and
    /// waits for the client's reply) before dropping the TCP connection.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// `WS_OWNERSHIP_CHECK_URL`: the proxy's internal listener (e.g. `http://envoy:9101`).
    /// When set, the pod periodically asks it, through the route forwards take, which
    /// pod answers for each of its keys, and closes the sockets of keys that moved to
    /// another pod (scale-out). Empty: off.
    pub ownership_check_url: String,
    /// `WS_OWNERSHIP_CHECK_INTERVAL`: how often every key is checked; the longest a
    /// moved socket misses live events after a scale-out.
    #[serde(with = "humantime_serde")]
    pub ownership_check_interval: Duration,
    /// `WS_OWNERSHIP_CHECK_CONCURRENCY`: ownership questions in flight at once.
    pub ownership_check_concurrency: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            outbound_queue: 256,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            max_connections: 20_000,
            max_connections_per_user: 32,
            max_connections_per_ip: 2_000,
            connect_rate_per_user: 10,
            connect_rate_per_ip: 200,
            max_message_size: 16 * 1024,
            recent_events: 256,
            close_timeout: Duration::from_secs(5),
            ownership_check_url: String::new(),
            ownership_check_interval: Duration::from_secs(30),
            ownership_check_concurrency: 8,
        }
    }
}

impl WsSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("WS_OUTBOUND_QUEUE", "outbound_queue"),
        ("WS_PING_INTERVAL", "ping_interval"),
        ("WS_PONG_TIMEOUT", "pong_timeout"),
        ("WS_MAX_CONNECTIONS", "max_connections"),
        ("WS_MAX_CONNECTIONS_PER_USER", "max_connections_per_user"),
        ("WS_MAX_CONNECTIONS_PER_IP", "max_connections_per_ip"),
        ("WS_CONNECT_RATE_PER_USER", "connect_rate_per_user"),
        ("WS_CONNECT_RATE_PER_IP", "connect_rate_per_ip"),
        ("WS_MAX_MESSAGE_SIZE", "max_message_size"),
        ("WS_RECENT_EVENTS", "recent_events"),
        ("WS_CLOSE_TIMEOUT", "close_timeout"),
        ("WS_OWNERSHIP_CHECK_URL", "ownership_check_url"),
        ("WS_OWNERSHIP_CHECK_INTERVAL", "ownership_check_interval"),
        ("WS_OWNERSHIP_CHECK_CONCURRENCY", "ownership_check_concurrency"),
    ];

    /// Rejects values that cannot work, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        if self.outbound_queue == 0 {
            return Err("WS_OUTBOUND_QUEUE must be at least 1".into());
        }
        if self.ping_interval.is_zero() {
            return Err("WS_PING_INTERVAL must be greater than zero".into());
        }
        if self.pong_timeout <= self.ping_interval {
            return Err("WS_PONG_TIMEOUT must be longer than WS_PING_INTERVAL".into());
        }
        if self.max_message_size == 0 {
            return Err("WS_MAX_MESSAGE_SIZE must be at least 1".into());
        }
        if !self.ownership_check_url.trim().is_empty() {
            if self.ownership_check_interval.is_zero() {
                return Err("WS_OWNERSHIP_CHECK_INTERVAL must be greater than zero".into());
            }
            if self.ownership_check_concurrency == 0 {
                return Err("WS_OWNERSHIP_CHECK_CONCURRENCY must be at least 1".into());
            }
            if !self.ownership_check_url.starts_with("http://") && !self.ownership_check_url.starts_with("https://") {
                return Err("WS_OWNERSHIP_CHECK_URL must be an http:// or https:// URL".into());
            }
        }
        Ok(())
    }

    /// Applies the client frame limits and the per-socket buffer sizes to an upgrade.
    ///
    /// tungstenite's defaults are a 128 KiB read buffer, allocated *and zero-filled*
    /// on the first read of every socket, and a 128 KiB write buffer target: 141 KiB
    /// of RSS per idle socket (measured, docs/benchmarks.md). Clients send small
    /// frames (pongs, typing, pings), so the read buffer starts small and grows for a
    /// larger frame (up to `WS_MAX_MESSAGE_SIZE`) only while one is being read. The
    /// write buffer only needs to coalesce the frames the driver writes in one go.
    pub fn configure(&self, upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
        upgrade
            .max_message_size(self.max_message_size)
            .max_frame_size(self.max_message_size)
            .read_buffer_size(READ_BUFFER_SIZE)
            .write_buffer_size(WRITE_BUFFER_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(WsSettings::default().validate(), Ok(()));
    }

    #[test]
    fn impossible_values_are_rejected_by_name() {
        let zero_queue = WsSettings { outbound_queue: 0, ..WsSettings::default() };
        assert!(zero_queue.validate().unwrap_err().contains("WS_OUTBOUND_QUEUE"));
        let short_timeout = WsSettings { pong_timeout: Duration::from_secs(20), ..WsSettings::default() };
        assert!(short_timeout.validate().unwrap_err().contains("WS_PONG_TIMEOUT"));
    }
}
