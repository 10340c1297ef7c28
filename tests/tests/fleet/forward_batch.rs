//! `POST /chat/forward-batch`, black-box: the socket pod's internal route for several
//! message events in one request (each answered as its own forward would be), and the
//! change handler using it when forwards queue up (`CHAT_WEBSOCKET_FORWARD_BATCH`),
//! with every message still delivered once and in order per stream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chatfleet_tests::client::{self, ChatSocket};
use chatfleet_tests::ws::{expect_quiet, http, next_json, Ws};
use chatfleet_tests::{token, ChatFleet, Service, SERVICE_TOKEN};
use serde_json::{json, Value};

use crate::chatwebsockets_handler::{chat_message, start, stream};

/// One batch event as the change handler sends it.
fn event(kind: &str, message: &Value) -> Value {
    json!({"stream_id": message["stream_id"], "type": kind, "message": message})
}

async fn connect(service: &Service, me: &str, peer: &str) -> Ws {
    crate::chatwebsockets_handler::connect(service, me, peer, None).await
}

async fn post_batch(url: String, bearer: Option<&str>, body: String) -> (u16, Value) {
    let mut request = http().post(url).header("content-type", "application/json").body(body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn statuses(answer: &Value) -> Vec<u64> {
    answer["results"].as_array().expect("results").iter().map(|r| r["status"].as_u64().expect("status")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivers_each_event_in_order_and_answers_per_event() {
    let service = start(&[("LOG_LEVEL", "info,servicekit::trace=debug")]);
    let mut alice = connect(&service, "alice", "bob").await;
    let mut bob = connect(&service, "bob", "alice").await;
    let mut carol = connect(&service, "carol", "dave").await;

    let m1 = chat_message("alice", "bob", "first");
    let m2 = chat_message("carol", "dave", "to carol");
    let m3 = chat_message("bob", "alice", "second");
    let mut edited = m1.clone();
    edited["content"] = json!("first (edited)");
    let mut wrong_stream = event("message", &chat_message("alice", "bob", "never shown"));
    wrong_stream["stream_id"] = json!(stream("alice", "carol").to_string());
    let nobody = chat_message("erin", "frank", "no socket here");
    // An event carries its own record's trace (the request's headers cannot carry several).
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut traced = event("message", &m2);
    traced["traceparent"] = json!(format!("00-{trace_id}-b7ad6b7169203331-01"));
    let events = json!({"events": [
        event("message", &m1),
        traced,
        wrong_stream,
        {"stream_id": m1["stream_id"], "type": "shout", "message": m1},
        {"stream_id": "not a stream", "type": "message", "message": m1},
        event("message", &m3),
        {"stream_id": edited["stream_id"], "type": "message_updated", "message": edited, "event_id": "e-1"},
        event("message", &nobody),
    ]});
    let url = service.internal_url("/chat/forward-batch");
    let (status, answer) = post_batch(url.clone(), Some(SERVICE_TOKEN), events.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(statuses(&answer), [200, 200, 400, 400, 400, 200, 200, 200], "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!((results[0]["connections"].as_u64(), results[0]["delivered"].as_u64()), (Some(2), Some(2)));
    assert_eq!(results[1]["delivered"], 1);
    assert_eq!(results[7]["connections"], 0, "no socket of that stream here: done");
    assert!(results[2]["error"].as_str().expect("a reason").contains("stream_id"), "{answer}");

    // Each socket gets its stream's events, in the batch's order, once.
    for ws in [&mut alice, &mut bob] {
        for (kind, message) in [("message", &m1), ("message", &m3), ("message_updated", &edited)] {
            let frame = next_json(ws).await;
            assert_eq!((frame["type"].as_str(), &frame["message"]["message_id"]), (Some(kind), &message["message_id"]));
        }
    }
    assert_eq!(next_json(&mut carol).await["message"]["message_id"], m2["message_id"]);
    assert!(service.log_tail(2_000).contains(trace_id), "the event's trace is continued in the pod's log");

    // The same batch again (the change handler got no answer): done, nothing shown twice.
    let (status, answer) = post_batch(url, Some(SERVICE_TOKEN), events.to_string()).await;
    assert_eq!((status, statuses(&answer)), (200, vec![200, 200, 400, 400, 400, 200, 200, 200]));
    for ws in [&mut alice, &mut bob, &mut carol] {
        expect_quiet(ws, Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_route_is_internal_and_needs_the_service_token() {
    let service = start(&[]);
    let mut alice = connect(&service, "alice", "bob").await;
    let body = json!({"events": [event("message", &chat_message("alice", "bob", "must not arrive"))]}).to_string();
    let path = "/chat/forward-batch";
    assert_eq!(post_batch(service.url(path), Some(SERVICE_TOKEN), body.clone()).await.0, 404, "public port");
    assert_eq!(post_batch(service.internal_url(path), None, body.clone()).await.0, 401, "no token");
    assert_eq!(post_batch(service.internal_url(path), Some("not-the-token"), body.clone()).await.0, 403);
    assert_eq!(post_batch(service.internal_url(path), Some(&token("alice")), body).await.0, 403, "a user token");

    let too_many: Vec<Value> =
        (0..1001).map(|i| event("message", &chat_message("alice", "bob", &format!("{i}")))).collect();
    let refused = [
        ("{not json".to_owned(), 400),
        (json!({"events": []}).to_string(), 400),
        (json!({"events": too_many}).to_string(), 413),
        (json!({"events": [], "extra": 1}).to_string(), 422),
        (json!({"event": []}).to_string(), 422),
    ];
    for (body, expected) in refused {
        let (status, answer) = post_batch(service.internal_url(path), Some(SERVICE_TOKEN), body.clone()).await;
        assert_eq!(status, expected, "{}: {answer}", &body[..body.len().min(60)]);
    }
    let thousand_and_one_small: Vec<Value> = (0..1001).map(|_| json!({})).collect();
    let (status, answer) = post_batch(
        service.internal_url(path),
        Some(SERVICE_TOKEN),
        json!({"events": thousand_and_one_small}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "more than 1,000 events: {answer}");
    expect_quiet(&mut alice, Duration::from_millis(300)).await;
}

/// The number of requests and events of the change handler's batches so far.
async fn batches(handler: &Service) -> (f64, f64) {
    let text = http().get(handler.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let value = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("forward_batch_events_count"), value("forward_batch_events_sum"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_that_queue_up_share_a_request_and_arrive_once_in_order() {
    let fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let pairs: Vec<(String, String)> = (0..12).map(|i| (format!("bs{i}"), format!("br{i}"))).collect();
    let mut sockets = Vec::new();
    for (sender, receiver) in &pairs {
        sockets.push(ChatSocket::connect(&fleet.sockets, receiver, sender, None).await);
    }
    // Every pair posts concurrently, each its messages in order: records of several
    // partitions reach the change handler together.
    let rounds = 15;
    let posted = futures::future::join_all(pairs.iter().map(|(sender, receiver)| async {
        let mut ids = Vec::new();
        for round in 0..rounds {
            loop {
                let (status, body) =
                    client::post(&fleet.persistence, sender, receiver, &format!("m{round}"), None).await;
                if status == 503 || status == 429 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                assert_eq!(status, 201, "{body}");
                ids.push(body["message_id"].as_str().expect("id").to_owned());
                break;
            }
        }
        ids
    }))
    .await;
    let expected: HashMap<usize, Vec<String>> = posted.into_iter().enumerate().collect();
    for (index, socket) in sockets.iter_mut().enumerate() {
        let mut seen = Vec::new();
        for _ in 0..10 {
            let (more, _) = socket.collect_messages(Duration::from_millis(500)).await;
            seen.extend(more);
            if seen.len() >= rounds {
                break;
            }
        }
        let (more, _) = socket.collect_messages(Duration::from_millis(300)).await;
        seen.extend(more);
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len(), "pair {index}: a duplicate: {seen:?}");
        assert_eq!(seen, expected[&index], "pair {index}: every message, once, in order");
    }
    let (requests, events) = batches(&fleet.handlers[0]).await;
    assert!(requests >= 1.0, "no forwards shared a request ({requests} batches, {events} events)");
    assert!(events >= 2.0 * requests, "a batch holds at least two events: {requests} / {events}");
}
