//! One trace per message across every hop: W3C trace context in and out, the trace
//! id on every log line, OTLP export when configured.
//!
//! Why this module exists: a message crosses five processes (POST → insert → relay →
//! broker → change handler → forward → socket frame) and an operator paged for "a
//! message arrived late" must be able to follow that one message. Every entry point
//! (an HTTP request at the edge, a Kafka record, a relay publish) opens an *entry
//! span* here, with the target [`TARGET`] and a `trace_id` field: it continues the
//! caller's `traceparent` (an HTTP header, a Kafka record header, or the `trace` field
//! stored with a message) or starts a new trace. Log lines inside it carry its
//! `trace_id`; outgoing HTTP calls and Kafka records carry [`traceparent`]. Spans are
//! `tracing` spans, turned into OpenTelemetry spans by `tracing-opentelemetry`, and
//! exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; without it the trace ids still flow
//! and are logged, nothing is sent anywhere.

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every entry span. The log filter always enables it (whatever
/// `LOG_LEVEL` says), so the trace context is never lost to a quieter log level.
pub const TARGET: &str = "chatfleet::trace";
/// The W3C trace context header (and the Kafka record header of the same name).
pub const TRACEPARENT: &str = "traceparent";
/// The request id header: echoed when the caller sent a sane one, else generated.
pub const REQUEST_ID: &str = "x-request-id";

/// `OTEL_*`: where spans are exported. Empty endpoints: no export (the default).
/// The exporter also honours the standard `OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_TRACES_*`, `OTEL_BSP_*` and
/// `OTEL_RESOURCE_ATTRIBUTES` variables, read by the OpenTelemetry SDK itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceSettings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: OTLP/HTTP base URL (`/v1/traces` is appended).
    pub endpoint: String,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: full URL for traces; wins over the base.
    pub traces_endpoint: String,
    /// `OTEL_SERVICE_NAME`: the exported `service.name`; empty: the binary's name.
    pub service_name: String,
}

impl TraceSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "traces_endpoint"),
        ("OTEL_SERVICE_NAME", "service_name"),
    ];

    /// Whether spans are exported.
    pub fn exports(&self) -> bool {
        !self.endpoint.trim().is_empty() || !self.traces_endpoint.trim().is_empty()
    }
}

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TraceError(String);

/// The tracer provider: always present (it gives spans their ids), exporting only
/// when configured. Call [`shutdown`] before the process exits to flush.
pub fn provider(settings: &TraceSettings, service: &str) -> Result<SdkTracerProvider, TraceError> {
    let name = if settings.service_name.is_empty() { service.to_owned() } else { settings.service_name.clone() };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if settings.exports() {
        use opentelemetry_otlp::WithExportConfig;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        if !settings.traces_endpoint.trim().is_empty() {
            exporter = exporter.with_endpoint(settings.traces_endpoint.trim());
        } else {
            exporter = exporter.with_endpoint(format!("{}/v1/traces", settings.endpoint.trim().trim_end_matches('/')));
        }
        let exporter = exporter.build().map_err(|err| TraceError(err.to_string()))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        builder = builder.with_span_processor(processor);
    }
    Ok(builder.build())
}

/// The `tracing` layer turning spans into OpenTelemetry spans.
pub fn layer<S>(provider: &SdkTracerProvider, service: &'static str) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(service)).with_tracked_inactivity(false)
}

/// Flushes and stops the exporter (blocking: call it off the async workers).
pub fn shutdown(provider: SdkTracerProvider) {
    if let Err(err) = provider.shutdown() {
        eprintln!("trace exporter shutdown: {err}");
    }
}

/// Makes `span` (an entry span with a `trace_id` field) continue the trace of
/// `traceparent`, or start a new one when it is absent or invalid; records the trace
/// id in the span and returns it.
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) -> String {
    let carrier: HashMap<String, String> =
        traceparent.map(|value| (TRACEPARENT.to_owned(), value.to_owned())).into_iter().collect();
    continue_trace(span, TraceContextPropagator::new().extract(&carrier))
}

fn continue_trace(span: &tracing::Span, parent: opentelemetry::Context) -> String {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let trace_id = span.context().span().span_context().trace_id().to_string();
    span.record("trace_id", trace_id.as_str());
    trace_id
}

/// The current span's trace context as a `traceparent` value (for a Kafka header, a
/// stored message, an HTTP call); `None` outside any traced span.
pub fn traceparent() -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Headers for an outgoing HTTP call: the current `traceparent`, if any
/// (`request.headers(servicekit::trace::outgoing())`).
pub fn outgoing() -> HeaderMap {
    let mut headers = HeaderMap::new();
    TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut HeaderInjector(&mut headers));
    headers
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// A request id worth echoing: 1–128 visible ASCII characters. Anything else (a log
/// injection attempt, a megabyte of header) is replaced by a generated one.
fn sane_request_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    (!text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_graphic())).then_some(text)
}

/// Logs, at the level and under the target of a request's own "request finished", that
/// one item of a request finished in the current span: an event of a batch, which
/// continues its own trace (`adopt`) rather than the request's.
pub fn item_finished(status: u16) {
    tracing::debug!(status, "batch item finished");
}

/// Edge middleware: the request's entry span (continuing the caller's
/// `traceparent`, else a new trace), `x-request-id` echoed (or generated from the
/// span id), and one debug line per request with status and duration.
pub async fn middleware(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        method = %request.method(),
        // The path only: query strings can carry tokens.
        path = %request.uri().path(),
        trace_id = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    let trace_id = continue_trace(&span, TraceContextPropagator::new().extract(&HeaderExtractor(request.headers())));
    let request_id = match request.headers().get(REQUEST_ID).and_then(sane_request_id) {
        Some(id) => id.to_owned(),
        None => format!("{trace_id}-{}", span.context().span().span_context().span_id()),
    };
    span.record("request_id", request_id.as_str());
    let started = Instant::now();
    async move {
        let mut response = next.run(request).await;
        tracing::debug!(status = response.status().as_u16(), elapsed = ?started.elapsed(), "request finished");
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        response
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_echoed_only_when_sane() {
        assert_eq!(sane_request_id(&HeaderValue::from_static("abc-123")), Some("abc-123"));
        assert_eq!(sane_request_id(&HeaderValue::from_static("has space")), None);
        assert_eq!(sane_request_id(&HeaderValue::from_static("")), None);
        let long = "x".repeat(129);
        assert_eq!(sane_request_id(&HeaderValue::from_str(&long).expect("valid")), None);
    }

    #[test]
    fn without_a_subscriber_nothing_is_propagated() {
        assert_eq!(traceparent(), None);
        assert!(outgoing().is_empty());
    }
}
