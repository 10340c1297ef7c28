//! Logging: readable lines for people, JSON lines for log pipelines; every line
//! inside an entry span (a request, a Kafka record, a relay publish) names its
//! `trace_id` (see [`crate::trace`]).

use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::trace::{self, TraceSettings};

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

/// Installs the global subscriber without trace export. Calling it again (tests)
/// is harmless.
pub fn init(settings: &LogSettings) {
    let _ = install(settings, None);
}

/// Installs the global subscriber with the OpenTelemetry layer for `service`, and
/// returns the tracer provider to shut down at exit (flushing the export).
pub fn init_traced(
    settings: &LogSettings,
    traces: &TraceSettings,
    service: &'static str,
) -> Result<SdkTracerProvider, trace::TraceError> {
    let provider = trace::provider(traces, service)?;
    install(settings, Some((&provider, service)));
    Ok(provider)
}

fn install(settings: &LogSettings, traced: Option<(&SdkTracerProvider, &'static str)>) -> bool {
    // The entry spans are always enabled, whatever the level: they carry the trace
    // context from hop to hop even when their lines are not printed.
    let entry_spans = format!("{}=info", trace::TARGET);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(entry_spans.parse().unwrap_or_default());
    let otel = traced.map(|(provider, service)| trace::layer(provider, service));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match settings.format {
        // The span list names the entry span's `trace_id` (and `request_id`).
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(true).with_writer(std::io::stderr)).try_init(),
    };
    result.is_ok()
}
