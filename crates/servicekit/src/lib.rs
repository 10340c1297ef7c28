//! The service kit: everything a chatfleet service does the same way as every other.
//!
//! Why this crate exists: five binaries need configuration loading, logging, health
//! and readiness probes, Prometheus metrics, graceful shutdown and a JSON error
//! format at the HTTP edge. Written five times they would drift apart; written here
//! once, a service's `main.rs` only wires its own parts together.
//!
//! The usual shape of a service:
//!
//! ```ignore
//! let (kit, settings) = Kit::init::<Settings>("chatpersistence", &env_map())?;
//! let state = build_state(&settings).await?;
//! kit.serve(Routes::new(public_router).internal(internal_router), readiness).await
//! ```

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
