//! The chat pipeline end to end, under failure: chatpersistence → outbox relay →
//! chat.changes → chatpersistencechangehandler → chatwebsocketshandler → sockets.
//! Real binaries, real Redis, broker and MongoDB wire server; nothing mocked.

use std::collections::HashSet;
use std::time::Duration;

use chatfleet_tests::client::{self, ChatSocket, Seen};
use chatfleet_tests::ChatFleet;
use serde_json::Value;

const A: &str = "alice";
const B: &str = "bob";

async fn mongo_count(fleet: &ChatFleet, filter: mongodb::bson::Document) -> u64 {
    let client = mongodb::Client::with_uri_str(fleet.stack.mongo.uri()).await.expect("mongo client");
    client
        .database("chat")
        .collection::<mongodb::bson::Document>("messages")
        .count_documents(filter)
        .await
        .expect("count")
}

/// Posts like a frontend does: a `503` (nothing stored, e.g. a restarting pod) or a
/// `429` (over the sender's rate) is retried after a pause; anything else but `201`
/// fails the test.
async fn post_ok(fleet: &ChatFleet, from: &str, to: &str, content: &str) -> String {
    for _ in 0..100 {
        let (status, body) = client::post(&fleet.persistence, from, to, content, None).await;
        if status == 503 || status == 429 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(status, 201, "POST answered {status}: {body}");
        return body["message_id"].as_str().expect("message_id").to_owned();
    }
    panic!("POST kept answering 503 for 10 s");
}

fn assert_exactly_once(seen: &[String], expected: &[String], who: &str) {
    let set: HashSet<&String> = seen.iter().collect();
    assert_eq!(set.len(), seen.len(), "{who} saw a duplicate: {seen:?}");
    for id in expected {
        assert!(set.contains(id), "{who} never saw {id}; saw {seen:?}");
    }
}

/// 1. A and B subscribed; A posts; each gets exactly one frame within 1 s; MongoDB
/// holds exactly one document; history returns it.
#[tokio::test]
async fn a_message_reaches_both_participants_once() {
    let fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let mut a = ChatSocket::connect(&fleet.sockets, A, B, None).await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;

    let id = post_ok(&fleet, A, B, "hello bob").await;
    for (who, socket) in [("alice", &mut a), ("bob", &mut b)] {
        match socket.next(Duration::from_secs(1)).await {
            Seen::Frame(frame) => {
                assert_eq!(frame["type"], "message", "{who}: {frame}");
                assert_eq!(frame["message"]["message_id"], Value::from(id.clone()));
                assert_eq!(frame["message"]["content"], "hello bob");
            }
            other => panic!("{who} got no frame within 1 s: {other:?}"),
        }
        let (more, _) = socket.collect_messages(Duration::from_millis(500)).await;
        assert!(more.is_empty(), "{who} got extra frames: {more:?}");
    }
    assert_eq!(mongo_count(&fleet, mongodb::bson::doc! {"stream_id": client::stream_id(A, B)}).await, 1);
    let history = client::history(&fleet.persistence, B, A).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["message_id"], Value::from(id));
}

/// 2. A retried POST with the same client_message_id → one document, one frame.
#[tokio::test]
async fn a_retried_post_is_written_and_delivered_once() {
    let fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let (s1, first) = client::post(&fleet.persistence, A, B, "only once", Some("client-1")).await;
    let (s2, second) = client::post(&fleet.persistence, A, B, "only once", Some("client-1")).await;
    assert_eq!(s1, 201);
    assert!(s2 == 200 || s2 == 201, "retry answered {s2}");
    assert_eq!(first["message_id"], second["message_id"], "the retry returns the original");
    let (seen, _) = b.collect_messages(Duration::from_secs(2)).await;
    assert_eq!(seen.len(), 1, "exactly one frame: {seen:?}");
    assert_eq!(mongo_count(&fleet, mongodb::bson::doc! {"stream_id": client::stream_id(A, B)}).await, 1);
}

/// 3. Redis stopped → messages still delivered (the event store fails open); all
/// healthy again when Redis returns.
#[tokio::test]
async fn delivery_continues_while_redis_is_down() {
    let mut fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    fleet.stack.redis.stop();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(post_ok(&fleet, A, B, &format!("while redis is down {i}")).await);
    }
    let (seen, _) = b.collect_messages(Duration::from_secs(5)).await;
    assert_exactly_once(&seen, &ids, "bob");

    fleet.stack.redis.restart();
    let after = post_ok(&fleet, A, B, "redis is back").await;
    let (seen, _) = b.collect_messages(Duration::from_secs(3)).await;
    assert_eq!(seen, vec![after]);
    for service in [&fleet.persistence, &fleet.sockets, &fleet.handlers[0]] {
        assert!(
            chatfleet_tests::eventually(Duration::from_secs(10), || {
                chatfleet_tests::http_status(service.public_port, "/readyz") == Some(200)
            })
            .await,
            "{} ready again",
            service.name
        );
    }
}

/// 4. chatwebsocketshandler down for a few seconds → retries deliver once it is back;
/// a client that reconnects with `since` sees every message exactly once.
#[tokio::test]
async fn socket_pod_outage_is_bridged_by_retries_and_since() {
    let mut fleet = ChatFleet::start(&[("MESSAGE_RETRY_MAX_RETRIES", "12"), ("MESSAGE_RETRY_MAX_INTERVAL", "1s")]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let before = post_ok(&fleet, A, B, "before the outage").await;
    let (seen, _) = b.collect_messages(Duration::from_secs(2)).await;
    assert_eq!(seen, vec![before.clone()]);

    fleet.sockets.kill();
    let mut during = Vec::new();
    for i in 0..5 {
        during.push(post_ok(&fleet, A, B, &format!("during the outage {i}")).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.sockets.restart();

    let mut b = ChatSocket::connect(&fleet.sockets, B, A, Some(&before)).await;
    let after = post_ok(&fleet, A, B, "after the outage").await;
    let (seen, _) = b.collect_messages(Duration::from_secs(8)).await;
    let mut expected = during.clone();
    expected.push(after);
    assert_exactly_once(&seen, &expected, "bob after reconnect");
    assert!(!seen.contains(&before), "the message before `since` is not replayed");
}

/// 5. chatwebsocketshandler unreachable past the retry budget → failover closes the
/// stream's sockets with the resync code; later messages flow.
#[tokio::test]
async fn exhausted_retries_fail_over_with_resync() {
    let fleet = ChatFleet::start(&[
        ("MESSAGE_RETRY_MAX_RETRIES", "2"),
        ("MESSAGE_RETRY_MAX_INTERVAL", "200ms"),
        ("FORWARD_TIMEOUT", "500ms"),
    ]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    // Paused, the pod keeps its sockets but answers nothing: forwards time out.
    fleet.sockets_pause();
    let lost_in_realtime = post_ok(&fleet, A, B, "sent while the pod hangs").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.sockets_resume();

    let mut closed_with = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        match b.next(Duration::from_secs(1)).await {
            Seen::Closed(code) => {
                closed_with = code;
                break;
            }
            Seen::Frame(_) | Seen::Nothing => continue,
        }
    }
    assert_eq!(closed_with, Some(4000), "the stream's socket is closed with the resync code");

    // The client resyncs from history and reconnects; later messages flow.
    let history = client::history(&fleet.persistence, B, A).await;
    assert!(history.iter().any(|m| m["message_id"].as_str() == Some(lost_in_realtime.as_str())));
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let later = post_ok(&fleet, A, B, "after failover").await;
    let (seen, _) = b.collect_messages(Duration::from_secs(5)).await;
    assert!(seen.contains(&later), "later messages flow: {seen:?}");
}

/// 6. chatpersistencechangehandler killed with SIGKILL mid-stream and restarted →
/// nothing lost, nothing shown twice on an open socket.
#[tokio::test]
async fn change_handler_crash_loses_and_duplicates_nothing() {
    let mut fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(post_ok(&fleet, A, B, &format!("burst {i}")).await);
        if i == 30 {
            fleet.handlers[0].kill();
        }
    }
    fleet.handlers[0].restart();
    let (seen, _) = b.collect_messages(Duration::from_secs(20)).await;
    assert_exactly_once(&seen, &ids, "bob");
    assert_eq!(seen, ids, "one stream is delivered in order");
}

/// 7. Relay killed mid-batch, broker paused (SIGSTOP) for 5 s → nothing lost.
#[tokio::test]
async fn relay_crash_and_broker_pause_lose_nothing() {
    let mut fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(post_ok(&fleet, A, B, &format!("relay {i}")).await);
        if i == 20 {
            fleet.persistence.kill();
            fleet.persistence.restart();
        }
    }
    fleet.stack.broker.pause();
    for i in 0..20 {
        ids.push(post_ok(&fleet, A, B, &format!("broker paused {i}")).await);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.stack.broker.resume();
    let (seen, _) = b.collect_messages(Duration::from_secs(25)).await;
    assert_exactly_once(&seen, &ids, "bob");
}

/// 8. Two change handlers in one group → every message delivered once.
#[tokio::test]
async fn two_handlers_in_one_group_deliver_each_message_once() {
    let mut fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    fleet.add_handler();
    fleet.warm_up().await;
    let pairs: Vec<(String, String)> = (0..8).map(|i| (format!("u{i}"), format!("v{i}"))).collect();
    let mut sockets = Vec::new();
    for (u, v) in &pairs {
        sockets.push(ChatSocket::connect(&fleet.sockets, v, u, None).await);
    }
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); pairs.len()];
    for round in 0..5 {
        for (i, (u, v)) in pairs.iter().enumerate() {
            expected[i].push(post_ok(&fleet, u, v, &format!("round {round}")).await);
        }
    }
    for (i, socket) in sockets.iter_mut().enumerate() {
        let (seen, _) = socket.collect_messages(Duration::from_secs(3)).await;
        assert_eq!(seen, expected[i], "pair {i} sees each message once, in order");
    }
}

/// 9. Bad input at the edge is refused, writes nothing and delivers nothing.
#[tokio::test]
async fn bad_input_writes_and_delivers_nothing() {
    let fleet = ChatFleet::start(&[]);
    fleet.warm_up().await;
    let mut b = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let http = reqwest::Client::new();
    let url = fleet.persistence.url("/chat/messages");
    let good = serde_json::json!({"sender_id": A, "receiver_id": B, "content": "x"});
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        (
            "malformed JSON",
            http.post(&url).bearer_auth(chatfleet_tests::token(A)).header("content-type", "application/json").body("{"),
        ),
        (
            "missing field",
            http.post(&url)
                .bearer_auth(chatfleet_tests::token(A))
                .json(&serde_json::json!({"sender_id": A, "content": "x"})),
        ),
        (
            "extra field",
            http.post(&url)
                .bearer_auth(chatfleet_tests::token(A))
                .json(&serde_json::json!({"sender_id": A, "receiver_id": B, "content": "x", "admin": true})),
        ),
        (
            "mismatched stream",
            http.post(&url).bearer_auth(chatfleet_tests::token(A)).json(
                &serde_json::json!({"sender_id": A, "receiver_id": B, "content": "x", "stream_id": "0000000000000000"}),
            ),
        ),
        (
            "empty content",
            http.post(&url)
                .bearer_auth(chatfleet_tests::token(A))
                .json(&serde_json::json!({"sender_id": A, "receiver_id": B, "content": "   "})),
        ),
        (
            "oversize content",
            http.post(&url)
                .bearer_auth(chatfleet_tests::token(A))
                .json(&serde_json::json!({"sender_id": A, "receiver_id": B, "content": "x".repeat(4001)})),
        ),
        (
            "invalid UTF-8",
            http.post(&url)
                .bearer_auth(chatfleet_tests::token(A))
                .header("content-type", "application/json")
                .body(b"{\"sender_id\":\"alice\",\"receiver_id\":\"bob\",\"content\":\"\xff\xfe\"}".to_vec()),
        ),
        ("no token", http.post(&url).json(&good)),
        (
            "forged token",
            http.post(&url)
                .bearer_auth(chatauth::mint_hs256(
                    "not-the-secret-0123456789",
                    &chatstream::UserId::parse(A).expect("valid"),
                    Duration::from_secs(60),
                    None,
                    None,
                ))
                .json(&good),
        ),
        (
            "expired token",
            http.post(&url)
                .bearer_auth(chatauth::mint_hs256_expiring_at(chatfleet_tests::JWT_SECRET, A, 1_000))
                .json(&good),
        ),
        ("someone else's name", http.post(&url).bearer_auth(chatfleet_tests::token("mallory")).json(&good)),
        (
            "internal endpoint on the public port",
            http.post(fleet.sockets.url(&format!("/chat/forward-to-websocket?stream_id={}", client::stream_id(A, B))))
                .json(&good),
        ),
    ];
    for (what, request) in cases {
        let response = request.send().await.expect("answers");
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{what}: answered {status}");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{what}: clear error body {body}"
        );
    }
    // Subscribing to someone else's conversation is refused before the upgrade.
    let path = format!(
        "/chat/subscribe?stream_id={}&sender_id={A}&receiver_id={B}&access_token={}",
        client::stream_id(A, B),
        chatfleet_tests::token("mallory")
    );
    assert!(chatfleet_tests::ws_connect(fleet.sockets.ws_url(&path)).await.is_err(), "mallory cannot subscribe");

    assert_eq!(
        mongo_count(&fleet, mongodb::bson::doc! {"stream_id": client::stream_id(A, B)}).await,
        0,
        "nothing written"
    );
    let (seen, _) = b.collect_messages(Duration::from_secs(2)).await;
    assert!(seen.is_empty(), "nothing delivered: {seen:?}");
}
