//! The edge of a subscribe endpoint: turning an upgrade request into a registered
//! connection, or into the JSON error every chatfleet endpoint answers with.
//!
//! Why this module exists: both socket services refuse a plain GET the same way
//! (426), a full pod the same way (503 with `Retry-After`) and an abusive client the
//! same way (429 with `Retry-After`: too many attempts per second, or too many open
//! sockets, per user and per client address), and register the connection before
//! the upgrade completes so live frames queue from that moment.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::WebSocketUpgrade;
use axum::http::StatusCode;
use servicekit::ratelimit::{KeyedCounter, KeyedLimiter, Rate};
use servicekit::ApiError;

use crate::{Hub, RegisterError, Registration, WsSettings};

/// How long a client refused by a full pod is asked to wait.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a client over its socket cap is asked to wait.
const CAP_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The most users and addresses whose attempt rate is tracked at once.
const MAX_TRACKED: usize = 100_000;

/// Who is asking for a socket.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// The authenticated user.
    pub user: &'a str,
    /// The client's address (`servicekit::ClientIp`).
    pub ip: IpAddr,
    /// What [`Hub::broadcast_to`] filters on for this socket.
    pub audience: &'a str,
}

/// The per-user and per-address limits of one hub.
pub(crate) struct Limits {
    name: &'static str,
    per_user: KeyedCounter<String>,
    per_ip: KeyedCounter<IpAddr>,
    user_rate: KeyedLimiter<String>,
    ip_rate: KeyedLimiter<IpAddr>,
}

fn rate(per_second: u32) -> Rate {
    Rate::new(f64::from(per_second), f64::from(per_second) * 2.0)
}

impl Limits {
    pub(crate) fn new(name: &'static str, settings: &WsSettings) -> Self {
        Self {
            name,
            per_user: KeyedCounter::new(settings.max_connections_per_user),
            per_ip: KeyedCounter::new(settings.max_connections_per_ip),
            user_rate: KeyedLimiter::new("ws_connect_user", rate(settings.connect_rate_per_user), MAX_TRACKED),
            ip_rate: KeyedLimiter::new("ws_connect_ip", rate(settings.connect_rate_per_ip), MAX_TRACKED),
        }
    }

    fn capped(&self, what: &'static str) -> ApiError {
        metrics::counter!("ws_refused_total", "hub" => self.name, "reason" => what).increment(1);
        ApiError::too_many_requests(format!("too many open sockets for this {what}"), CAP_RETRY_AFTER)
    }
}

/// Registers a connection for `key` on behalf of `who` and returns the upgrade to
/// complete with it.
pub fn admit<K>(
    hub: &Hub<K>,
    key: K,
    who: Admission<'_>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<(WebSocketUpgrade, Registration<K>), ApiError>
where
    K: Eq + Hash + Clone + std::fmt::Debug + Send + 'static,
{
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("this endpoint only opens WebSockets ({rejection})"),
        )
    })?;
    let limits = hub.admission();
    let user = who.user.to_owned();
    limits.ip_rate.admit(&who.ip, "connection attempts from this address")?;
    limits.user_rate.admit(&user, "connection attempts")?;
    let user_slot = limits.per_user.acquire(&user).ok_or_else(|| limits.capped("user"))?;
    let ip_slot = limits.per_ip.acquire(&who.ip).ok_or_else(|| limits.capped("address"))?;
    let mut registration = hub.register_for(key, who.audience, who.user).map_err(|err| match err {
        RegisterError::Full { .. } => {
            metrics::counter!("ws_refused_total", "hub" => limits.name, "reason" => "pod_full").increment(1);
            ApiError::unavailable(err.to_string(), FULL_RETRY_AFTER)
        }
    })?;
    registration.hold(Box::new(user_slot));
    registration.hold(Box::new(ip_slot));
    Ok((hub.settings().configure(upgrade), registration))
}
