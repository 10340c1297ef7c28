//! Liveness (`/healthz`), readiness (`/readyz`) and `/metrics`.
//!
//! Liveness only says the process can answer: restarting a pod because Redis is down
//! would not bring Redis back. Readiness asks every dependency the service cannot
//! work without, each under a timeout, and answers 503 while shutting down so that a
//! load balancer stops sending traffic before the listener closes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::{join_all, BoxFuture};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::Shutdown;

/// One dependency that must answer for the service to be ready.
pub trait ReadinessCheck: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

struct FnCheck<F> {
    name: String,
    f: F,
}

impl<F> ReadinessCheck for FnCheck<F>
where
    F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        (self.f)()
    }
}

/// The set of readiness checks of a service.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<Arc<dyn ReadinessCheck>>,
    timeout: Option<Duration>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn check(mut self, check: impl ReadinessCheck) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// A check from a closure that returns a future.
    pub fn check_fn<F>(self, name: &str, f: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        self.check(FnCheck { name: name.to_owned(), f })
    }

    /// How long one check may take before it counts as failed (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs every check concurrently: `Ok` names the passing checks, `Err` lists
    /// each failing one with its reason.
    pub async fn run(&self) -> Result<Vec<String>, Vec<(String, String)>> {
        let timeout = self.timeout.unwrap_or(Duration::from_secs(2));
        let results = join_all(self.checks.iter().map(|check| async move {
            let outcome = match tokio::time::timeout(timeout, check.check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            (check.name().to_owned(), outcome)
        }))
        .await;
        let failed: Vec<(String, String)> =
            results.iter().filter_map(|(name, r)| r.as_ref().err().map(|e| (name.clone(), e.clone()))).collect();
        if failed.is_empty() {
            Ok(results.into_iter().map(|(name, _)| name).collect())
        } else {
            Err(failed)
        }
    }
}

#[derive(Clone)]
struct OpsState {
    readiness: Readiness,
    metrics: PrometheusHandle,
    shutdown: Shutdown,
}

/// The operational routes every service serves on each of its listeners.
pub fn ops_router(readiness: Readiness, metrics: PrometheusHandle, shutdown: Shutdown) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState { readiness, metrics, shutdown })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<OpsState>) -> Response {
    if state.shutdown.is_triggered() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "shutting_down" }))).into_response();
    }
    match state.readiness.run().await {
        Ok(passed) => (StatusCode::OK, Json(json!({ "status": "ready", "checks": passed }))).into_response(),
        Err(failed) => {
            let failed: serde_json::Map<String, serde_json::Value> =
                failed.into_iter().map(|(name, reason)| (name, json!(reason))).collect();
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "failed": failed }))).into_response()
        }
    }
}

async fn render_metrics(State(state): State<OpsState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
