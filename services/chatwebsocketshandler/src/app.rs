//! The service assembled: shared state, the public and internal routers, and the
//! worker that holds shutdown open until every socket got its 1001.
//!
//! Why this module exists: `main.rs` only wires; this is where the parts meet, and
//! the one place that shows which endpoint listens where.

use std::time::Duration;

use axum::extract::FromRef;
use axum::routing::{get, post};
use axum::Router;
use chatauth::Authenticator;
use chatstream::{StreamId, StreamIdFormat};
use servicekit::{Context, Launch, Readiness, Routes, Shutdown};
use wsfanout::{Hub, OwnershipCheck, PodIdentity};

use crate::history::HistoryClient;
use crate::live::Live;
use crate::protocol::{resync, resync_reason};
use crate::settings::Settings;
use crate::{internal, subscribe};

/// The name of the socket hub (the `hub` label of the `ws_*` metrics).
pub const HUB_NAME: &str = "chat";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub<StreamId>,
    pub auth: Authenticator,
    pub history: HistoryClient,
    pub shutdown: Shutdown,
    /// This process's name in ownership answers (`GET /chat/forward-to-websocket`).
    pub identity: PodIdentity,
    /// The pair id format subscriptions must use (`STREAM_ID_FORMAT`).
    pub format: StreamIdFormat,
    /// Typing indicators and presence of this pod's sockets.
    pub live: Live,
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

/// The public listener: the socket endpoint only.
pub fn public_router(state: AppState) -> Router {
    Router::new().route("/chat/subscribe", get(subscribe::subscribe)).with_state(state)
}

/// The internal listener (service token): what the change handler calls.
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route("/chat/forward-to-websocket", post(internal::forward).get(internal::owner))
        .route("/chat/forward-event", post(internal::forward_event))
        .route("/chat/forward-batch", post(internal::forward_batch))
        .route("/chat/close-stream", post(internal::close_stream))
        .with_state(state)
}

/// Builds the service from its settings.
pub async fn launch(context: Context, settings: Settings) -> Result<Launch, String> {
    settings.validate()?;
    let auth = Authenticator::start(&settings.auth).await.map_err(|err| err.to_string())?;
    let history = HistoryClient::new(&settings.history, auth.service_token())?;
    let hub = Hub::new(HUB_NAME, settings.ws.clone());
    let identity = PodIdentity::generate();
    // Asked through the route forwards take, so the answer is the pod forwards reach.
    let ownership = OwnershipCheck::new(
        hub.clone(),
        identity.clone(),
        "/chat/forward-to-websocket",
        "stream_id",
        auth.service_token(),
        resync(resync_reason::STREAM_MOVED),
    );
    let live = Live::new(hub.clone(), settings.live.clone());
    let state = AppState {
        live: live.clone(),
        hub: hub.clone(),
        auth,
        history,
        shutdown: context.shutdown.clone(),
        identity,
        format: settings.ids.stream_id_format,
    };

    let routes = Routes::new(public_router(state.clone())).internal(internal_router(state));
    // No readiness dependency: sockets and forwarding work without chatpersistence
    // (only a replay needs it, and that fails into a resync close). Taking the pod out
    // of rotation when chatpersistence is down would break live delivery for everyone.
    let readiness = Readiness::new();
    let shutdown = context.shutdown;
    let drain_for = context.base.http.shutdown_timeout;
    let launch = OwnershipCheck::attach(ownership, Launch::new(routes).readiness(readiness), &shutdown);
    let timers = shutdown.clone();
    let launch = launch.worker("typing and presence timers", async move {
        live.run(timers).await;
        Ok(())
    });
    Ok(launch.worker("socket drain", async move {
        // Every socket closes itself with 1001 when shutdown starts; the process must
        // not exit before those close frames are out.
        shutdown.wait().await;
        let open = hub.connections();
        if !hub.wait_idle(drain_for.saturating_sub(Duration::from_millis(100))).await {
            tracing::warn!(open = hub.connections(), "sockets still open at the end of the drain");
        } else if open > 0 {
            tracing::info!(closed = open, "all sockets closed");
        }
        Ok(())
    }))
}
