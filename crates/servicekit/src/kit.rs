//! Start-up and run loop shared by every service: load settings, set up logging and
//! metrics, listen for signals, serve the public and internal listeners, and on
//! shutdown drain HTTP and background workers within a bounded time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{self, ConfigError, EnvMap};
use crate::edge::EdgePolicy;
use crate::health::{ops_router, Readiness};
use crate::telemetry::{self, LogSettings};
use crate::trace::TraceSettings;
use crate::Shutdown;

/// Listener settings shared by every service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    /// `HTTP_HOST`: address both listeners bind to.
    pub host: String,
    /// `HTTP_PORT`: the public listener (what the edge proxy routes to).
    pub port: u16,
    /// `INTERNAL_HTTP_PORT`: the internal listener (service-to-service endpoints).
    pub internal_port: u16,
    /// `HTTP_BODY_LIMIT`: largest request body accepted, in bytes.
    pub body_limit: usize,
    /// `SHUTDOWN_TIMEOUT`: how long draining may take after SIGTERM before the
    /// process exits anyway. Keep it below the pod's termination grace period.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// `HTTP_REQUEST_TIMEOUT`: a request not answered within it gets `503`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `HTTP_MAX_CONCURRENT_REQUESTS`: requests in flight per listener; more are
    /// refused with `503` + `Retry-After` (`0`: no limit).
    pub max_concurrent_requests: usize,
    /// `HTTP_HEADER_READ_TIMEOUT`: a connection that has not sent a complete
    /// request head within it (fresh, or idle between keep-alive requests) is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// `ALLOWED_ORIGINS`: comma-separated browser origins allowed to call the public
    /// API (CORS) and to open sockets (`Origin` check). Empty: any origin.
    pub allowed_origins: String,
    /// `CLIENT_IP_HEADER`: header the edge proxy writes the client address into
    /// (`x-forwarded-for` behind the shipped Envoy and nginx). Empty: the TCP peer.
    pub client_ip_header: String,
    /// `LISTEN_ADDRESSES_FILE`: once both listeners are bound, their addresses are
    /// written here (`public=…` and `internal=…` lines, replaced atomically). With
    /// `HTTP_PORT=0` / `INTERNAL_HTTP_PORT=0` the system picks free ports, and a
    /// supervisor (or a test) reads them back instead of guessing a free port.
    pub addresses_file: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            port: 8080,
            internal_port: 9090,
            body_limit: 64 * 1024,
            shutdown_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 2048,
            header_read_timeout: Duration::from_secs(10),
            allowed_origins: String::new(),
            client_ip_header: String::new(),
            addresses_file: String::new(),
        }
    }
}

impl HttpSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("HTTP_HOST", "host"),
        ("HTTP_PORT", "port"),
        ("INTERNAL_HTTP_PORT", "internal_port"),
        ("HTTP_BODY_LIMIT", "body_limit"),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout"),
        ("HTTP_REQUEST_TIMEOUT", "request_timeout"),
        ("HTTP_MAX_CONCURRENT_REQUESTS", "max_concurrent_requests"),
        ("HTTP_HEADER_READ_TIMEOUT", "header_read_timeout"),
        ("ALLOWED_ORIGINS", "allowed_origins"),
        ("CLIENT_IP_HEADER", "client_ip_header"),
        ("LISTEN_ADDRESSES_FILE", "addresses_file"),
    ];

    /// The edge policy these settings describe.
    pub fn edge_policy(&self) -> Result<EdgePolicy, String> {
        if self.request_timeout.is_zero() || self.header_read_timeout.is_zero() {
            return Err("HTTP_REQUEST_TIMEOUT and HTTP_HEADER_READ_TIMEOUT must be greater than zero".into());
        }
        EdgePolicy::new(&self.allowed_origins, &self.client_ip_header)
    }
}

/// The settings every service has.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BaseSettings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub otel: TraceSettings,
}

impl BaseSettings {
    pub fn env_map() -> EnvMap {
        EnvMap::new()
            .section("http", HttpSettings::ENV)
            .section("log", LogSettings::ENV)
            .section("otel", TraceSettings::ENV)
    }
}

/// The routers a service serves: a public one, and optionally an internal one that
/// gets its own port so no public proxy can reach it by accident.
pub struct Routes {
    public: Router,
    internal: Option<Router>,
}

impl Routes {
    pub fn new(public: Router) -> Self {
        Self { public, internal: None }
    }

    pub fn internal(mut self, internal: Router) -> Self {
        self.internal = Some(internal);
        self
    }
}

/// A running service's shared parts.
pub struct Kit {
    pub name: &'static str,
    pub base: BaseSettings,
    pub shutdown: Shutdown,
    pub metrics: PrometheusHandle,
    workers: JoinSet<()>,
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Kit {
    /// Loads the base settings and the service's own settings `T` (same sources),
    /// installs logging, metrics and signal handling.
    pub fn init<T>(name: &'static str, env: &EnvMap) -> Result<(Self, T), ConfigError>
    where
        T: Serialize + DeserializeOwned + Default,
    {
        let base: BaseSettings = config::load(&BaseSettings::env_map())?;
        let settings: T = config::load(env)?;
        let traces = match telemetry::init_traced(&base.log, &base.otel, name) {
            Ok(provider) => Some(provider),
            Err(err) => {
                // Export is an aid, not a duty: the service runs, logging trace ids.
                telemetry::init(&base.log);
                tracing::error!(error = %err, "traces will not be exported");
                None
            }
        };
        let metrics = crate::metrics::install();
        let shutdown = Shutdown::on_signals();
        tracing::info!(
            service = name,
            version = env!("CARGO_PKG_VERSION"),
            otlp_export = base.otel.exports(),
            "starting"
        );
        match crate::limits::raise_open_files_limit() {
            Some((soft, hard)) => tracing::info!(soft, hard, "open files limit"),
            None => tracing::warn!("the open files limit cannot be read"),
        }
        Ok((Self { name, base, shutdown, metrics, workers: JoinSet::new(), traces }, settings))
    }

    /// Runs a background worker (a Kafka consumer, a relay, ...). It should watch
    /// `kit.shutdown` and return once it has drained. A worker that returns early
    /// shuts the service down, since a service missing a worker is broken.
    pub fn spawn<F>(&mut self, what: &'static str, worker: F)
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        self.workers.spawn(async move {
            match worker.await {
                Ok(()) if shutdown.is_triggered() => tracing::info!(worker = what, "worker stopped"),
                Ok(()) => {
                    tracing::error!(worker = what, "worker stopped unexpectedly; shutting down");
                    shutdown.trigger();
                }
                Err(error) => {
                    tracing::error!(worker = what, %error, "worker failed; shutting down");
                    shutdown.trigger();
                }
            }
        });
    }

    /// Serves until shutdown, then drains within `SHUTDOWN_TIMEOUT`.
    pub async fn serve(mut self, routes: Routes, readiness: Readiness) -> std::io::Result<()> {
        let http = self.base.http.clone();
        let ops = ops_router(readiness, self.metrics.clone(), self.shutdown.clone());

        let policy =
            Arc::new(http.edge_policy().map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?);
        let mut servers = JoinSet::new();
        // Both listeners are bound before either serves, so their addresses (ports
        // the system chose, with port 0) can be published at once.
        let public_listener = bind("public", bind_addr(&http.host, http.port)?).await?;
        let internal_listener = match routes.internal {
            Some(_) => Some(bind("internal", bind_addr(&http.host, http.internal_port)?).await?),
            None => None,
        };
        if !http.addresses_file.is_empty() {
            write_addresses(&http.addresses_file, &public_listener, internal_listener.as_ref())?;
        }
        // CORS only where browsers call: the public API.
        let public =
            routes.public.layer(policy.cors()).layer(axum::middleware::from_fn(crate::edge::refuse_foreign_origin));
        let public = finish(public, ops.clone(), &http, &policy);
        servers.spawn(crate::serve::serve(public_listener, public, http.header_read_timeout, self.shutdown.clone()));
        if let (Some(internal), Some(listener)) = (routes.internal, internal_listener) {
            let internal = finish(internal, ops, &http, &policy);
            servers.spawn(crate::serve::serve(listener, internal, http.header_read_timeout, self.shutdown.clone()));
        }

        // Either a signal, a failed listener or a failed worker ends the run.
        let mut outcome = Ok(());
        tokio::select! {
            _ = self.shutdown.wait() => {}
            Some(result) = servers.join_next() => {
                outcome = flatten(result);
                self.shutdown.trigger();
            }
        }

        let drain = async {
            while let Some(result) = servers.join_next().await {
                if let Err(err) = flatten(result) {
                    tracing::error!(error = %err, "listener failed while draining");
                }
            }
            while self.workers.join_next().await.is_some() {}
        };
        if tokio::time::timeout(http.shutdown_timeout, drain).await.is_err() {
            tracing::warn!(timeout = ?http.shutdown_timeout, "drain timed out; exiting anyway");
        }
        tracing::info!(service = self.name, "stopped");
        if let Some(provider) = self.traces.take() {
            let flush = tokio::task::spawn_blocking(move || crate::trace::shutdown(provider));
            let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
        }
        outcome
    }
}

fn flatten(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    result.map_err(std::io::Error::other).and_then(|r| r)
}

fn bind_addr(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    format!("{host}:{port}")
        .parse()
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}:{port}: {err}")))
}

/// The layers every listener has. The service's routes get the request timeout and
/// the concurrency limit; the probes and metrics do not, so an overloaded pod still
/// answers its probes.
fn finish(router: Router, ops: Router, http: &HttpSettings, policy: &Arc<EdgePolicy>) -> Router {
    let timeout = http.request_timeout;
    let mut router = router
        .layer(axum::middleware::from_fn(move |request, next| crate::edge::request_timeout(timeout, request, next)));
    if http.max_concurrent_requests > 0 {
        let permits = Arc::new(Semaphore::new(http.max_concurrent_requests));
        router = router.layer(axum::middleware::from_fn(move |request, next| {
            crate::edge::concurrency_limit(permits.clone(), request, next)
        }));
    }
    let policy = policy.clone();
    router
        .merge(ops)
        .fallback(crate::http::not_found)
        .layer(DefaultBodyLimit::max(http.body_limit))
        .layer(axum::middleware::from_fn(crate::http::record_metrics))
        .layer(axum::middleware::from_fn(move |request, next| crate::edge::with_policy(policy.clone(), request, next)))
        // The request's entry span (trace context in, `x-request-id` out).
        .layer(axum::middleware::from_fn(crate::trace::middleware))
}

async fn bind(which: &'static str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr} ({which}): {err}")))?;
    tracing::info!(listener = which, addr = %listener.local_addr()?, "listening");
    Ok(listener)
}

/// Writes the bound addresses to `path` (through a temporary file and a rename,
/// so a reader never sees half of it).
fn write_addresses(path: &str, public: &TcpListener, internal: Option<&TcpListener>) -> std::io::Result<()> {
    let mut text = format!("public={}\n", public.local_addr()?);
    if let Some(internal) = internal {
        text.push_str(&format!("internal={}\n", internal.local_addr()?));
    }
    let partial = format!("{path}.partial");
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|err| std::io::Error::new(err.kind(), format!("LISTEN_ADDRESSES_FILE {path}: {err}")))
}

/// What a service's build step hands back: its routes, readiness checks and
/// background workers.
pub struct Launch {
    routes: Routes,
    readiness: Readiness,
    workers: Vec<(&'static str, futures::future::BoxFuture<'static, Result<(), String>>)>,
}

impl Launch {
    pub fn new(routes: Routes) -> Self {
        Self { routes, readiness: Readiness::new(), workers: Vec::new() }
    }

    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    pub fn worker<F>(mut self, what: &'static str, worker: F) -> Self
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.workers.push((what, Box::pin(worker)));
        self
    }
}

/// What the build step may use: the service name, base settings and shutdown handle.
#[derive(Clone)]
pub struct Context {
    pub name: &'static str,
    pub base: BaseSettings,
    pub shutdown: Shutdown,
}

/// The whole life of a service, for `main`: load settings, build the service's
/// parts, serve until SIGTERM, drain. Returns the process exit code.
pub async fn run<T, F, Fut, E>(name: &'static str, env: &EnvMap, build: F) -> std::process::ExitCode
where
    T: Serialize + DeserializeOwned + Default,
    F: FnOnce(Context, T) -> Fut,
    Fut: Future<Output = Result<Launch, E>>,
    E: std::fmt::Display,
{
    let (mut kit, settings) = match Kit::init::<T>(name, env) {
        Ok(pair) => pair,
        Err(err) => {
            eprintln!("{name}: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let context = Context { name, base: kit.base.clone(), shutdown: kit.shutdown.clone() };
    let launch = match build(context, settings).await {
        Ok(launch) => launch,
        Err(err) => {
            tracing::error!(error = %err, "start-up failed");
            return std::process::ExitCode::FAILURE;
        }
    };
    for (what, worker) in launch.workers {
        kit.spawn(what, worker);
    }
    match kit.serve(launch.routes, launch.readiness).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "service failed");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_addresses_file_names_the_ports_the_system_picked() {
        let public = bind("public", bind_addr("127.0.0.1", 0).expect("addr")).await.expect("bind");
        let internal = bind("internal", bind_addr("127.0.0.1", 0).expect("addr")).await.expect("bind");
        let dir = std::env::temp_dir().join(format!("servicekit-addresses-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("addresses");
        write_addresses(path.to_str().expect("utf-8"), &public, Some(&internal)).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        let expected = format!(
            "public={}\ninternal={}\n",
            public.local_addr().expect("addr"),
            internal.local_addr().expect("addr")
        );
        assert_eq!(text, expected);
        assert_ne!(public.local_addr().expect("addr").port(), 0);
        assert!(!dir.join("addresses.partial").exists(), "the partial file is renamed, not left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
