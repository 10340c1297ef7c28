//! Logging: readable lines for people, JSON lines for log pipelines.

use serde::{Deserialize, Serialize};
use tracing_subscriber::{fmt, EnvFilter};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `LOG_FORMAT` (`text` or `json`) and `LOG_LEVEL` (an `EnvFilter` directive such as
/// `info` or `info,kafkawrapper=debug`; `RUST_LOG` wins when set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".to_owned() }
    }
}

impl LogSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[("LOG_FORMAT", "format"), ("LOG_LEVEL", "level")];
}

/// Installs the global subscriber. Calling it again (tests) is harmless.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_target(true).try_init(),
    };
}
