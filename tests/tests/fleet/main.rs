//! The black-box tests of the whole fleet, as one test binary.
//!
//! Why one binary: every file here starts real servers and the real service
//! binaries, so each needs the whole dependency graph linked in. As separate
//! `tests/*.rs` targets that meant thirty-odd links of a 200 MiB executable, which
//! made the build slow and, on a machine with little disk, failed outright. As
//! modules of one binary they link once; nextest still runs each test in its own
//! process, so isolation is unchanged. Run one file's tests with
//! `cargo test -p chatfleet-tests --test fleet -- <module>::`.

mod multipod_support;

mod bots;
mod changehandler_failover;
mod chaos_soak;
mod chat_pipeline;
mod chatpersistence_api;
mod chatpersistence_relay;
mod chatwebsockets_handler;
mod conversations_api;
mod definite_answers;
mod deploy_compose;
mod deploy_envoy;
mod deploy_helm;
mod deploy_image;
mod deploy_monitoring;
mod deploy_nginx;
mod docs_configuration;
mod domain_capture;
mod email_handler;
mod flood_fairness;
mod forward_batch;
mod groups_delivery;
mod identity_collision;
mod live_interactions;
mod message_changes;
mod mongodb_recovery;
mod multipod_envoy;
mod multipod_nginx;
mod new_routes_hostile;
mod notifications_batch;
mod notifications_handler;
mod notifications_throughput;
mod pipelines_config;
mod pipelines_strategies;
mod read_rate_limit;
mod security_matrix;
mod services_lifecycle;
mod token_expiry;
mod tracing_path;
mod write_behind;
