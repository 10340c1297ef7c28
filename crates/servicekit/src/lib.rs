//! The service kit: everything a chatfleet service does the same way as every other.
//!
//! Why this crate exists: five binaries need configuration loading, logging, health
//! and readiness probes, Prometheus metrics, graceful shutdown and a JSON error
//! format at the HTTP edge. Written five times they would drift apart; written here
//! once, a service's `main.rs` only wires its own parts together.
//!
//! Every service starts the same way — settings → telemetry (logs, trace export,
//! metrics) → build the app → serve with shutdown — so a reader who knows one knows
//! all five:
//!
//! ```ignore
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     servicekit::run("chatpersistence", &Settings::env_map(), build).await
//! }
//!
//! async fn build(ctx: Context, settings: Settings) -> Result<Launch, String> {
//!     // connect, wire, spawn nothing: hand back routes, readiness and workers
//!     Ok(Launch::new(Routes::new(public).internal(internal)).readiness(ready).worker("relay", relay.run(ctx.shutdown)))
//! }
//! ```

mod alloc;
pub mod config;
pub mod edge;
pub mod health;
pub mod http;
pub mod kit;
pub mod limits;
pub mod metrics;
pub mod ratelimit;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod trace;

pub use config::{ConfigError, EnvMap};
pub use edge::{AllowedOrigin, ClientIp, EdgePolicy};
pub use health::{Readiness, ReadinessCheck};
pub use http::{ApiError, ApiJson, ApiQuery};
pub use kit::{run, BaseSettings, Context, Kit, Launch, Routes};
pub use shutdown::Shutdown;
