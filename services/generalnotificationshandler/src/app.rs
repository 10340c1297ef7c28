//! The service assembled: shared state, the public and internal routers, the query
//! every endpoint takes, and the workers that hold shutdown open until every socket
//! got its 1001 and this pod's presence keys are gone.
//!
//! Why this module exists: `main.rs` only wires; this is where the parts meet, and
//! the one place that shows which endpoint listens where.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chatauth::{Authenticator, ServiceCaller};
use chatstream::domain::DomainKind;
use chatstream::UserId;
use serde::Deserialize;
use servicekit::{ApiError, ApiQuery, Context, Launch, Readiness, Routes, Shutdown};
use wsfanout::{close_code, Close, Hub, OwnerAnswer, OwnershipCheck, PodIdentity};

use crate::presence::Presence;
use crate::settings::{BatchSettings, Settings};
use crate::{batch, notify, online, subscribe};

/// The name of the socket hub (the `hub` label of the `ws_*` metrics).
pub const HUB_NAME: &str = "notifications";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub<UserId>,
    pub auth: Authenticator,
    pub presence: Presence,
    pub shutdown: Shutdown,
    /// This process's name in ownership answers (`GET /notifications/owner`).
    pub identity: PodIdentity,
    /// The bounds of `POST /notifications/batch`.
    pub batch: BatchSettings,
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

/// `?user_id=…`, the query of every endpoint (in the query so an L7 proxy can hash on
/// it). Other parameters (`access_token` on subscribe, anything else) are ignored.
#[derive(Debug, Deserialize)]
pub struct UserQuery {
    #[serde(default)]
    user_id: Option<String>,
}

impl UserQuery {
    /// The user id: `400` when missing or malformed.
    pub fn user(&self) -> Result<UserId, ApiError> {
        let raw = self.user_id.as_deref().ok_or_else(|| ApiError::bad_request("user_id is required"))?;
        UserId::parse(raw).map_err(|err| ApiError::bad_request(format!("user_id: {err}")))
    }
}

/// The public listener: the socket endpoint. (Users ask about presence through
/// chatpersistence's `GET /presence`, which knows who shares a conversation.)
pub fn public_router(state: AppState) -> Router {
    Router::new().route("/notifications/subscribe", get(subscribe::subscribe)).with_state(state)
}

/// The internal listener (service token): the notification endpoints and presence
/// look-ups for services.
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/notifications/chat", post(notify::chat))
        .route("/notifications/conversation", post(notify::conversation))
        .route("/notifications/batch", post(batch::batch).layer(DefaultBodyLimit::max(state.batch.max_bytes)))
        .route(DomainKind::Purchase.endpoint(), notify::domain_route(DomainKind::Purchase))
        .route(DomainKind::PaymentReminder.endpoint(), notify::domain_route(DomainKind::PaymentReminder))
        .route(DomainKind::Shipping.endpoint(), notify::domain_route(DomainKind::Shipping))
        .route("/presence", get(online::for_service))
        .route("/notifications/owner", get(owner))
        .with_state(state)
}

/// `GET /notifications/owner?user_id=…` (internal): which pod the proxy's ring sends
/// this user's notifications to. Other pods ask it through the proxy to find users
/// whose sockets moved away from them (see `wsfanout::OwnershipCheck`).
async fn owner(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> Result<Json<OwnerAnswer>, ApiError> {
    let user = query.user()?;
    Ok(Json(OwnerAnswer::of(&state.hub, &state.identity, &user)))
}

/// Builds the service from its settings.
pub async fn launch(context: Context, settings: Settings) -> Result<Launch, String> {
    settings.validate()?;
    let auth = Authenticator::start(&settings.auth).await.map_err(|err| err.to_string())?;
    let hub = Hub::new(HUB_NAME, settings.ws.clone());
    let presence = Presence::new(&settings.presence, Presence::instance_id())?;
    let identity = PodIdentity::generate();
    // Notification sockets have nothing to replay: a plain 1001 makes them reconnect,
    // and the proxy sends the reconnect to the owner.
    let ownership = OwnershipCheck::new(
        hub.clone(),
        identity.clone(),
        "/notifications/owner",
        "user_id",
        auth.service_token(),
        Close::new(close_code::GOING_AWAY, "moved to another pod"),
    );
    let state = AppState {
        hub: hub.clone(),
        auth,
        presence: presence.clone(),
        shutdown: context.shutdown.clone(),
        identity,
        batch: settings.batch.clone(),
    };
    let routes = Routes::new(public_router(state.clone())).internal(internal_router(state));

    // No readiness dependency: presence is best effort, and sockets and notifications
    // work without Redis. Taking every pod out of rotation while Redis is down would
    // turn a presence outage into a notification outage.
    let readiness = Readiness::new();
    let shutdown = context.shutdown;
    // The drain leaves room for the final presence round trip within SHUTDOWN_TIMEOUT.
    let drain_for =
        context.base.http.shutdown_timeout.saturating_sub(settings.presence.redis_timeout + Duration::from_millis(200));
    let drain_hub = hub.clone();
    let drain_shutdown = shutdown.clone();
    let launch = OwnershipCheck::attach(ownership, Launch::new(routes).readiness(readiness), &shutdown);
    Ok(launch
        .worker("socket drain", async move {
            // Every socket closes itself with 1001 when shutdown starts; the process
            // must not exit before those close frames are out.
            drain_shutdown.wait().await;
            let open = drain_hub.connections();
            if !drain_hub.wait_idle(drain_for).await {
                tracing::warn!(open = drain_hub.connections(), "sockets still open at the end of the drain");
            } else if open > 0 {
                tracing::info!(closed = open, "all sockets closed");
            }
            Ok(())
        })
        .worker("presence", presence.run(hub, shutdown, drain_for)))
}
