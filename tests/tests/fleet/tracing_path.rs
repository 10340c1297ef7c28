//! One message, one trace: a POST carrying a W3C `traceparent` is followed through
//! chatpersistence (insert, relay), the broker, the change handler (forward), the
//! socket service (frame), the notifications service and the email handler. Every
//! service logs the POST's trace id, and the spans exported over OTLP/HTTP reach a
//! small receiver built here on the OpenTelemetry protocol crate (`opentelemetry-proto`)
//! — the same wire format a collector accepts. Real binaries, real servers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use chatfleet_tests::client::{ChatSocket, Seen};
use chatfleet_tests::{token, Service, Stack};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use serde_json::json;
use testkit::SmtpSink;

/// Spans received: service name → trace ids (hex) of its spans.
type Received = Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>;

/// An OTLP/HTTP trace receiver on a port of its own: decodes each export request
/// and records which service sent spans of which trace.
async fn otlp_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut seen = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for resource_spans in request.resource_spans {
                    let service = resource_spans
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                                Some(s.clone())
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in resource_spans.scope_spans.iter().flat_map(|s| s.spans.iter()) {
                        let hex: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                        seen.entry(service.clone()).or_default().insert(hex);
                    }
                }
                (axum::http::StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn one_message_has_one_trace_in_every_service_and_in_the_exported_spans() {
    let (endpoint, received) = otlp_receiver().await;
    let stack = Stack::start();
    let smtp = SmtpSink::start();
    let mut env = stack.pipeline_env();
    for (k, v) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        // The entry spans' per-request and per-record lines are debug lines.
        ("LOG_LEVEL", "info,servicekit::trace=debug,kafkawrapper=debug"),
        ("SMTP_HOST", "127.0.0.1"),
        ("EMAIL_DIGEST_WINDOW", "1s"),
    ] {
        env.retain(|(name, _)| name != k);
        env.push((k.to_owned(), v.to_owned()));
    }
    env.push(("SMTP_PORT".into(), smtp.port().to_string()));
    let with = |extra: &[(&str, String)], group: &str| {
        let mut env = env.clone();
        env.push(("KAFKA_GROUP_ID".into(), testkit::unique(group)));
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    };
    let persistence = Service::start("chatpersistence", &with(&[], "persistence"));
    let sockets = Service::start(
        "chatwebsocketshandler",
        &with(&[("CHATPERSISTENCE_INTERNAL_URL", persistence.internal_url(""))], "sockets"),
    );
    let notifications = Service::start("generalnotificationshandler", &with(&[], "notifications"));
    let email = Service::start("emailhandler", &with(&[], "email"));
    let handler = Service::start(
        "chatpersistencechangehandler",
        &with(
            &[("CHAT_WEBSOCKET_URL", sockets.internal_url("")), ("NOTIFICATIONS_URL", notifications.internal_url(""))],
            "changes",
        ),
    );

    // Bob listens; Alice posts until the pipeline carries a message to him (the
    // consumer groups join, the relay takes its lease), with a trace id of our own.
    let mut bob = ChatSocket::connect(&sockets, "bob", "alice", None).await;
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (trace_id, request_id) = loop {
        let trace_id = format!("{:032x}", uuid_like());
        let request_id = format!("req-{}", &trace_id[..12]);
        let response = http
            .post(persistence.url("/chat/messages"))
            .bearer_auth(token("alice"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .header("x-request-id", &request_id)
            .json(&json!({ "sender_id": "alice", "receiver_id": "bob", "content": "follow me" }))
            .send()
            .await
            .expect("chatpersistence answers");
        assert_eq!(
            response.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
            Some(request_id.as_str()),
            "x-request-id is echoed"
        );
        if response.status().as_u16() == 201 {
            if let Seen::Frame(frame) = bob.next(Duration::from_secs(5)).await {
                assert_eq!(frame["message"]["content"], "follow me");
                assert!(frame["message"].get("trace").is_none(), "no trace context in frames: {frame}");
                break (trace_id, request_id);
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the pipeline did not deliver within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every service logs the POST's trace id: the POST and relay publish
    // (chatpersistence), the record (change handler, email handler), the forwards
    // (socket service, notifications service).
    let services = [&persistence, &handler, &sockets, &notifications, &email];
    let logged = chatfleet_tests::eventually(Duration::from_secs(15), || {
        services.iter().all(|s| s.log_tail(100_000).contains(&trace_id))
    })
    .await;
    let missing: Vec<&str> =
        services.iter().filter(|s| !s.log_tail(100_000).contains(&trace_id)).map(|s| s.name.as_str()).collect();
    assert!(logged, "trace {trace_id} missing from the logs of {missing:?}");
    assert!(persistence.log_tail(100_000).contains(&request_id), "the request id is logged");

    // The same trace, exported by every hop that made spans of it.
    let expected = ["chatpersistence", "chatpersistencechangehandler", "chatwebsocketshandler", "emailhandler"];
    let exported = chatfleet_tests::eventually(Duration::from_secs(15), || {
        let seen = received.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        expected.iter().all(|s| seen.get(*s).is_some_and(|ids| ids.contains(&trace_id)))
    })
    .await;
    let seen = received.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    assert!(exported, "trace {trace_id} not exported by all of {expected:?}: {seen:?}");
    bob.close().await;
}

/// 128 random-enough bits for a fresh trace id per attempt (never all zero).
fn uuid_like() -> u128 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(1);
    (nanos ^ (u128::from(std::process::id()) << 64)).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1
}
