//! Building librdkafka client configurations and routing librdkafka's own log lines.
//!
//! Why this module exists: consumers, producers and admin clients must all see the
//! same brokers and the same `RDKAFKA_*` overrides, and librdkafka's logs belong in
//! the service's structured log (tracing) rather than the `log` crate.

use std::collections::BTreeMap;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::Statistics;

use crate::KafkaSettings;

/// A configuration with `bootstrap.servers` and the effective properties, then
/// `extra` on top.
pub(crate) fn client_config(settings: &KafkaSettings, extra: &[(&str, String)]) -> ClientConfig {
    client_config_from(&settings.brokers, &settings.effective_properties(), extra)
}

pub(crate) fn client_config_from(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    extra: &[(&str, String)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    for (key, value) in extra {
        config.set(*key, value);
    }
    if let Some(level) = log_level() {
        config.set_log_level(level);
    }
    config
}

fn log_level() -> Option<RDKafkaLogLevel> {
    if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        Some(RDKafkaLogLevel::Debug)
    } else {
        None
    }
}

/// Forwards a librdkafka log line to tracing. Warnings about properties that only
/// apply to the other client type are expected (one property map serves both) and
/// demoted to debug.
pub(crate) fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    let expected = message.contains("property and will be ignored by this");
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning if !expected => {
            tracing::warn!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        _ => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

pub(crate) fn forward_error(error: KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", %error, "{reason}");
}

/// The context of producers and admin clients: logs through tracing, ignores stats.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn stats(&self, _statistics: Statistics) {}

    fn stats_raw(&self, _statistics: &[u8]) {}

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for TracingContext {}
