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

    /// A check that passes while `endpoint` accepts TCP connections. `endpoint` may be
    /// `host:port`, a URL (`redis://host:port/0`, `mongodb://user@host:port/?x=y`) or a
    /// comma-separated list of either (any one reachable passes).
    pub fn tcp(self, name: &str, endpoint: &str) -> Self {
        let targets: Vec<String> = endpoint.split(',').filter_map(host_port).collect();
        self.check_fn(name, move || {
            let targets = targets.clone();
            Box::pin(async move {
                for target in &targets {
                    if tokio::net::TcpStream::connect(target.as_str()).await.is_ok() {
                        return Ok(());
                    }
                }
                Err(format!("cannot connect to {}", targets.join(", ")))
            })
        })
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

/// `host:port` out of `host:port` or `scheme://[user@]host:port[/path][?query]`.
fn host_port(endpoint: &str) -> Option<String> {
    let endpoint = endpoint.trim();
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let authority = rest.split(['/', '?']).next()?;
    (!authority.is_empty()).then(|| authority.to_owned())
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_taken_from_urls_and_plain_addresses() {
        assert_eq!(host_port("redis://127.0.0.1:6379/0").as_deref(), Some("127.0.0.1:6379"));
        assert_eq!(host_port("mongodb://u:p@db:27017/?directConnection=true").as_deref(), Some("db:27017"));
        assert_eq!(host_port(" kafka:9092").as_deref(), Some("kafka:9092"));
        assert_eq!(host_port(""), None);
    }

    #[tokio::test]
    async fn tcp_checks_pass_and_fail_for_real() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("addr").to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let ready = Readiness::new().tcp("up", &format!("tcp://{open}"));
        assert!(ready.run().await.is_ok());
        let not_ready = Readiness::new().tcp("up", &open).tcp("down", &closed);
        let failed = not_ready.run().await.expect_err("one target is closed");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, "down");
    }
}
