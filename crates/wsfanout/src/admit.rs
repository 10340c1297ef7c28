//! The edge of a subscribe endpoint: turning an upgrade request into a registered
//! connection, or into the JSON error every chatfleet endpoint answers with.
//!
//! Why this module exists: both socket services refuse a plain GET the same way
//! (426) and a full pod the same way (503 with `Retry-After`), and register the
//! connection before the upgrade completes so live frames queue from that moment.

use std::hash::Hash;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::WebSocketUpgrade;
use axum::http::StatusCode;
use servicekit::ApiError;

use crate::{Hub, RegisterError, Registration};

/// How long a client refused by a full pod is asked to wait.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Registers a connection for `key` and returns the upgrade to complete with it.
pub fn admit<K>(
    hub: &Hub<K>,
    key: K,
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
    let registration = hub.register(key).map_err(|err| match err {
        RegisterError::Full { .. } => ApiError::unavailable(err.to_string(), FULL_RETRY_AFTER),
    })?;
    Ok((hub.settings().configure(upgrade), registration))
}
