//! generalnotificationshandler, black-box: the real binary on free ports against a
//! real Redis, real WebSocket clients (tokio-tungstenite), the internal endpoints
//! called the way the change handler and the domain pipelines call them, and the
//! presence keys read with raw Redis commands.

use std::time::{Duration, Instant};

use chatfleet_tests::ws::{
    close_code_after_frames, expect_quiet, http, next_json, terminate_expecting_1001, upgrade_status, Ws,
};
use chatfleet_tests::{bad_tokens, token, Service, JWT_SECRET, SERVICE_TOKEN};
use chatstream::{MessageId, StreamId, UserId};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use testkit::Redis;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const SERVICE: &str = "generalnotificationshandler";
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

fn env(redis: &Redis, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("JWT_SECRET", JWT_SECRET.to_owned()),
        ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
        ("LOG_LEVEL", "info,generalnotificationshandler=debug".to_owned()),
        ("REDIS_URL", redis.url()),
        ("SHUTDOWN_TIMEOUT", "10s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    env
}

fn start(redis: &Redis, extra: &[(&str, &str)]) -> Service {
    Service::start(SERVICE, &env(redis, extra))
}

fn user(raw: &str) -> UserId {
    UserId::parse(raw).expect("valid user id")
}

fn subscribe_path(me: &str) -> String {
    format!("/notifications/subscribe?user_id={me}&access_token={}", token(me))
}

async fn connect(service: &Service, me: &str) -> Ws {
    match chatfleet_tests::ws_connect(service.ws_url(&subscribe_path(me))).await {
        Ok((ws, _)) => ws,
        Err(err) => panic!("{me} could not subscribe: {err}; log:\n{}", service.log_tail(30)),
    }
}

/// The next frame must be the notification of `kind` carrying exactly `data`.
async fn expect_notification(ws: &mut Ws, kind: &str, data: &Value) -> Value {
    let frame = next_json(ws).await;
    assert_eq!(frame["type"], "notification", "{frame}");
    assert_eq!(frame["kind"], kind, "{frame}");
    assert_eq!(frame["data"], *data, "the posted document, unchanged: {frame}");
    assert!(frame["id"].as_str().is_some_and(|id| id.starts_with(&format!("{kind}:"))), "{frame}");
    frame
}

/// The endpoint path of each kind.
fn endpoint(kind: &str) -> &'static str {
    match kind {
        "chat" => "/notifications/chat",
        "purchase" => "/notifications/purchase",
        "payment_reminder" => "/notifications/payment-reminder",
        "shipping" => "/notifications/shipping",
        other => panic!("unknown kind {other}"),
    }
}

/// `POST {endpoint}?user_id={user}` with the service token, as the callers do it.
async fn notify(service: &Service, kind: &str, user: &str, body: &Value) -> (u16, Value) {
    let url = service.internal_url(&format!("{}?user_id={user}", endpoint(kind)));
    let response = http().post(url).bearer_auth(SERVICE_TOKEN).json(body).send().await.expect("notification answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn counts(body: &Value) -> (usize, usize, usize) {
    let n = |k: &str| body[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {body}")) as usize;
    (n("connections"), n("delivered"), n("failed"))
}

/// A stored chat message from `sender` to `receiver`.
fn chat_message(sender: &str, receiver: &str, content: &str) -> Value {
    json!({
        "message_id": MessageId::new().to_string(),
        "stream_id": StreamId::for_pair(&user(sender), &user(receiver)).to_string(),
        "sender_id": sender,
        "receiver_id": receiver,
        "content": content,
        "created_at": "2025-01-01T12:00:00Z",
    })
}

/// The body and the frame `data` of one notification of `kind` for `user`.
fn document(kind: &str, user: &str, id: &str, status: &str) -> (Value, Value) {
    match kind {
        "chat" => {
            let message = chat_message("zoe", user, &format!("news about {id}"));
            (json!({ "message": message }), message)
        }
        "purchase" => {
            let doc = json!({"purchase_id": id, "user_id": user, "status": status, "amount_minor": 1999,
                "currency": "EUR", "updated_at": "2025-01-01T12:00:00Z"});
            (doc.clone(), doc)
        }
        "payment_reminder" => {
            let doc = json!({"payment_id": id, "user_id": user, "purchase_id": "p-1", "status": status,
                "amount_minor": 4500, "currency": "USD", "due_date": "2025-02-01T00:00:00Z"});
            (doc.clone(), doc)
        }
        "shipping" => {
            let doc = json!({"shipment_id": id, "user_id": user, "purchase_id": "p-1", "status": status,
                "carrier": "DHL", "tracking_number": "JD0001", "estimated_delivery": "2025-01-03T00:00:00Z",
                "updated_at": "2025-01-01T12:00:00Z"});
            (doc.clone(), doc)
        }
        other => panic!("unknown kind {other}"),
    }
}

const KINDS: [(&str, &str); 4] =
    [("chat", ""), ("purchase", "paid"), ("payment_reminder", "overdue"), ("shipping", "in_transit")];

async fn metric(service: &Service, line_prefix: &str) -> Option<f64> {
    let text = http().get(service.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find(|line| line.starts_with(line_prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A raw Redis command (inline protocol) and its raw reply.
fn redis_cmd(redis: &Redis, command: &str) -> String {
    testkit::probe(redis.port(), format!("{command}\r\n").as_bytes()).unwrap_or_default()
}

/// The value of a key (`None` when it does not exist).
fn redis_get(redis: &Redis, key: &str) -> Option<String> {
    let reply = redis_cmd(redis, &format!("GET {key}"));
    assert!(reply.starts_with('$'), "unexpected reply to GET {key}: {reply:?}");
    if reply.starts_with("$-1") {
        None
    } else {
        Some(reply.lines().nth(1).unwrap_or_default().to_owned())
    }
}

/// Polls `check` until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `GET /presence?user_id=…` on the public port as `asker` (users have no presence
/// route here: chatpersistence answers them), or on the internal port with the
/// service token when `asker` is `None`.
async fn presence(service: &Service, asker: Option<&str>, who: &str) -> (u16, Value) {
    let path = format!("/presence?user_id={who}");
    let request = match asker {
        Some(asker) => http().get(service.url(&path)).bearer_auth(token(asker)),
        None => http().get(service.internal_url(&path)).bearer_auth(SERVICE_TOKEN),
    };
    let response = request.send().await.expect("presence answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A client that completes the handshake with a tiny receive buffer and then never reads.
async fn non_reading_client(service: &Service, me: &str) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let tcp = socket.connect(([127, 0, 0, 1], service.public_port).into()).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(service.ws_url(&subscribe_path(me)), tcp).await.expect("handshake");
    ws
}

/// Reads a socket in the background, reporting each notification's `id`.
fn collect_ids(mut ws: Ws) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                if let Some(id) = value["id"].as_str() {
                    if tx.send(id.to_owned()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

// ---------------------------------------------------------------------------
// delivery
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_reaches_every_socket_of_its_user_and_no_one_else() {
    let redis = Redis::start();
    let service = start(&redis, &[]);
    let mut alice_tab = connect(&service, "alice").await;
    let mut alice_phone = connect(&service, "alice").await;
    let mut bob = connect(&service, "bob").await;

    for (kind, status) in KINDS {
        let (body, data) = document(kind, "alice", &format!("{kind}-1"), status);
        let (status, report) = notify(&service, kind, "alice", &body).await;
        assert_eq!(status, 200, "{kind}: {report}");
        assert_eq!(
            report,
            json!({"user_id": "alice", "kind": kind, "connections": 2, "delivered": 2, "failed": 0}),
            "{kind}"
        );
        let first = expect_notification(&mut alice_tab, kind, &data).await;
        let second = expect_notification(&mut alice_phone, kind, &data).await;
        assert_eq!(first, second, "one frame for every socket");
        assert_eq!(first.as_object().map(|o| o.len()), Some(4), "type, kind, id, data: {first}");
    }
    expect_quiet(&mut bob, Duration::from_millis(300)).await;

    // Bob's notification is bob's alone.
    let (body, data) = document("shipping", "bob", "s-bob", "delivered");
    let (status, report) = notify(&service, "shipping", "bob", &body).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0)), "{report}");
    expect_notification(&mut bob, "shipping", &data).await;

    // A user with no socket on this pod: nothing to do, and that is success.
    let (body, _) = document("purchase", "carol", "p-carol", "created");
    let (status, report) = notify(&service, "purchase", "carol", &body).await;
    assert_eq!((status, counts(&report)), (200, (0, 0, 0)), "{report}");

    // Unknown query parameters are ignored.
    let (body, data) = document("purchase", "alice", "p-2", "refunded");
    let url = service.internal_url("/notifications/purchase?user_id=alice&trace=abc&shard=7");
    let response = http().post(url).bearer_auth(SERVICE_TOKEN).json(&body).send().await.expect("answered");
    assert_eq!(response.status().as_u16(), 200);
    for ws in [&mut alice_tab, &mut alice_phone] {
        expect_notification(ws, "purchase", &data).await;
    }
    expect_quiet(&mut alice_tab, Duration::from_millis(200)).await;
    expect_quiet(&mut bob, Duration::from_millis(200)).await;

    // Application-level pings are answered; anything else gets an error frame and the
    // socket stays open.
    bob.send(Message::text(r#"{"type":"ping"}"#)).await.expect("send");
    assert_eq!(next_json(&mut bob).await, json!({"type": "pong"}));
    bob.send(Message::text(r#"{"type":"subscribe","kind":"chat"}"#)).await.expect("send");
    let error = next_json(&mut bob).await;
    assert_eq!((error["type"].as_str(), error["error"]["code"].as_str()), (Some("error"), Some("unsupported_frame")));

    assert_eq!(metric(&service, "notifications_total{kind=\"purchase\",outcome=\"ok\"}").await, Some(2.0));
    assert_eq!(metric(&service, "notifications_total{kind=\"purchase\",outcome=\"no_connections\"}").await, Some(1.0));
    assert_eq!(metric(&service, "ws_connections{hub=\"notifications\"}").await, Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_notification_is_shown_once() {
    let redis = Redis::start();
    let service = start(&redis, &[]);
    let mut tab = connect(&service, "alice").await;
    let mut phone = connect(&service, "alice").await;

    for (kind, status) in KINDS {
        let (body, data) = document(kind, "alice", &format!("{kind}-r"), status);
        for attempt in 0..3 {
            let (status, report) = notify(&service, kind, "alice", &body).await;
            assert_eq!((status, counts(&report)), (200, (2, 2, 0)), "{kind} attempt {attempt}: {report}");
        }
        for ws in [&mut tab, &mut phone] {
            expect_notification(ws, kind, &data).await;
        }
    }
    expect_quiet(&mut tab, Duration::from_millis(300)).await;

    // The same document in a new status, or updated again in the same status, is new.
    let (delivered, delivered_data) = document("shipping", "alice", "shipping-r", "delivered");
    let (mut rescanned, _) = document("shipping", "alice", "shipping-r", "in_transit");
    rescanned["updated_at"] = json!("2025-01-01T18:00:00Z");
    for body in [&delivered, &rescanned] {
        let (status, report) = notify(&service, "shipping", "alice", body).await;
        assert_eq!((status, counts(&report)), (200, (2, 2, 0)), "{report}");
    }
    for ws in [&mut tab, &mut phone] {
        expect_notification(ws, "shipping", &delivered_data).await;
        expect_notification(ws, "shipping", &rescanned).await;
        expect_quiet(ws, Duration::from_millis(200)).await;
    }

    // A socket opened after the first attempt gets the retry: it never had it.
    let (body, data) = document("purchase", "alice", "p-late", "paid");
    assert_eq!(notify(&service, "purchase", "alice", &body).await.0, 200);
    let mut laptop = connect(&service, "alice").await;
    let (status, report) = notify(&service, "purchase", "alice", &body).await;
    assert_eq!((status, counts(&report)), (200, (3, 3, 0)), "{report}");
    expect_notification(&mut laptop, "purchase", &data).await;
    expect_notification(&mut phone, "purchase", &data).await;
    expect_quiet(&mut phone, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_cannot_keep_up_makes_it_206_and_none_left_makes_it_500() {
    let redis = Redis::start();
    let service = start(&redis, &[("WS_OUTBOUND_QUEUE", "4"), ("WS_CLOSE_TIMEOUT", "15s")]);
    let mut healthy = collect_ids(connect(&service, "alice").await);
    let mut slow = non_reading_client(&service, "alice").await;

    let big = "x".repeat(4000);
    let mut sent = Vec::new();
    let mut partial = None;
    let mut last_body = Value::Null;
    for _ in 0..5000 {
        let message = chat_message("bob", "alice", &big);
        last_body = json!({ "message": message });
        let (status, report) = notify(&service, "chat", "alice", &last_body).await;
        sent.push(format!("chat:{}", message["message_id"].as_str().expect("id")));
        match status {
            200 => assert_eq!(counts(&report), (2, 2, 0), "{report}"),
            206 => {
                partial = Some(report);
                break;
            }
            other => panic!("unexpected {other}: {report}"),
        }
    }
    let partial = partial.expect("the non-reading client's queue never filled");
    eprintln!("the non-reading client fell behind after {} notifications", sent.len());
    assert_eq!(counts(&partial), (2, 1, 1), "{partial}");
    assert_eq!(partial["kind"], "chat");

    // The retry reaches everyone left (the slow socket is out): counted as delivered
    // for the socket that has it, and not sent to it again.
    let (status, report) = notify(&service, "chat", "alice", &last_body).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0)), "{report}");
    let after = chat_message("bob", "alice", "after the slow one left");
    let (status, report) = notify(&service, "chat", "alice", &json!({ "message": after })).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0)), "{report}");
    sent.push(format!("chat:{}", after["message_id"].as_str().expect("id")));

    let code = close_code_after_frames(&mut slow, Duration::from_secs(20)).await;
    assert_eq!(code, Some(4001), "slow consumer");
    let mut received = Vec::new();
    while received.len() < sent.len() {
        match tokio::time::timeout(WAIT, healthy.recv()).await {
            Ok(Some(id)) => received.push(id),
            _ => panic!("healthy socket stalled after {} of {} frames", received.len(), sent.len()),
        }
    }
    assert_eq!(received, sent, "every notification once, in order");
    assert!(tokio::time::timeout(Duration::from_millis(300), healthy.recv()).await.is_err(), "no duplicate");

    // A user whose only socket cannot take it: 500.
    let _stuck = non_reading_client(&service, "dave").await;
    let mut failed = None;
    for _ in 0..5000 {
        let body = json!({ "message": chat_message("bob", "dave", &big) });
        let (status, report) = notify(&service, "chat", "dave", &body).await;
        match status {
            200 => assert_eq!(counts(&report), (1, 1, 0), "{report}"),
            500 => {
                failed = Some(report);
                break;
            }
            other => panic!("unexpected {other}: {report}"),
        }
    }
    let failed = failed.expect("the non-reading client's queue never filled");
    assert_eq!(counts(&failed), (1, 0, 1), "{failed}");
    assert_eq!(metric(&service, "notifications_total{kind=\"chat\",outcome=\"failed\"}").await, Some(1.0));
    assert_eq!(metric(&service, "notifications_total{kind=\"chat\",outcome=\"partial\"}").await, Some(1.0));
}

// ---------------------------------------------------------------------------
// refusals
// ---------------------------------------------------------------------------

/// `POST` with a raw body and optional token, returning status and body.
async fn raw_post(url: String, token: Option<&str>, content_type: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = http().post(url).body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// One refusal case: why, query, token, content type, body, expected status and error code.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, &'a str, u16, &'a str);

/// The error body every refusal carries: `{"error": {"code", "message"}}`.
fn error_code(body: &Value) -> String {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error message for people: {body}");
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {body}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_internal_endpoint_is_refused_with_a_clear_4xx() {
    let redis = Redis::start();
    let service = start(&redis, &[]);
    let mut alice = connect(&service, "alice").await;
    let json = Some("application/json");
    let service_token = Some(SERVICE_TOKEN);

    for (kind, status) in KINDS {
        let path = endpoint(kind);
        let url = |query: &str| service.internal_url(&format!("{path}{query}"));
        let (good, _) = document(kind, "alice", "doc-1", status);
        let good_text = good.to_string();

        let wrong = Some("not-the-service-token-0123456789");
        let shape = json!({"hello": "world"}).to_string();
        let cases: Vec<Case> = vec![
            ("malformed JSON", "?user_id=alice", service_token, json, "{\"user_id\":", 400, "invalid_request"),
            ("not JSON at all", "?user_id=alice", service_token, json, "hello", 400, "invalid_request"),
            ("wrong shape", "?user_id=alice", service_token, json, &shape, 422, "invalid_body"),
            ("an array", "?user_id=alice", service_token, json, "[]", 422, "invalid_body"),
            ("user_id mismatch", "?user_id=bob", service_token, json, &good_text, 400, "invalid_request"),
            ("missing user_id", "", service_token, json, &good_text, 400, "invalid_request"),
            ("malformed user_id", "?user_id=a%20b", service_token, json, &good_text, 400, "invalid_request"),
            ("no content type", "?user_id=alice", service_token, None, &good_text, 415, "unsupported_media_type"),
            ("no token", "?user_id=alice", None, json, &good_text, 401, "unauthorized"),
            ("wrong token", "?user_id=alice", wrong, json, &good_text, 403, "forbidden"),
        ];
        for (why, query, token, content_type, body, expected, code) in cases {
            let (status, body) = raw_post(url(query), token, content_type, body).await;
            assert_eq!(status, expected, "{kind}, {why}: {body}");
            assert_eq!(error_code(&body), code, "{kind}, {why}");
        }

        // A user token is not the service token.
        let (status, body) = raw_post(url("?user_id=alice"), Some(&token("alice")), json, &good_text).await;
        assert_eq!((status, error_code(&body).as_str()), (403, "forbidden"), "{kind}, user token");

        // The internal endpoints do not exist on the public port.
        let (status, body) =
            raw_post(service.url(&format!("{path}?user_id=alice")), service_token, json, &good_text).await;
        assert_eq!((status, error_code(&body).as_str()), (404, "not_found"), "{kind} on the public port");
    }

    // Field-level checks of the documents.
    let cases: Vec<(&str, &str, Value, u16)> = vec![
        ("purchase", "bad currency", json!({"currency": "euro"}), 422),
        ("payment_reminder", "lower-case currency", json!({"currency": "usd"}), 422),
        ("purchase", "unknown status", json!({"status": "lost"}), 422),
        ("shipping", "bad date", json!({"updated_at": "yesterday"}), 422),
        ("shipping", "bad document id", json!({"shipment_id": "s 1"}), 422),
        ("payment_reminder", "amount as text", json!({"amount_minor": "45"}), 422),
        ("chat", "empty content", json!({"message": {"content": "   "}}), 422),
        ("chat", "bad message id", json!({"message": {"message_id": "42"}}), 422),
    ];
    for (kind, why, patch, expected) in cases {
        let (mut body, _) =
            document(kind, "alice", "doc-2", KINDS.iter().find(|(k, _)| *k == kind).map_or("", |k| k.1));
        merge(&mut body, &patch);
        let (status, response) = notify(&service, kind, "alice", &body).await;
        assert_eq!(status, expected, "{kind}, {why}: {response}");
        let message = response["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{kind}, {why}: {response}");
        assert_eq!(error_code(&response), "invalid_body");
    }

    // Chat: the receiver must be the user, and the stream the pair's.
    let to_bob = chat_message("zoe", "bob", "for bob");
    let (status, body) = notify(&service, "chat", "alice", &json!({ "message": to_bob })).await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_request"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("receiver_id"), "{body}");
    let mut forged = chat_message("zoe", "alice", "forged stream");
    forged["stream_id"] = json!(StreamId::for_pair(&user("zoe"), &user("bob")).to_string());
    let (status, body) = notify(&service, "chat", "alice", &json!({ "message": forged })).await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_request"), "{body}");

    // A refused notification reaches no one.
    expect_quiet(&mut alice, Duration::from_millis(300)).await;
    assert!(
        metric(&service, "notifications_total{kind=\"shipping\",outcome=\"invalid\"}").await >= Some(5.0),
        "refusals are counted"
    );
}

/// Overwrites `target`'s fields with `patch`'s, recursively.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(existing) if value.is_object() => merge(existing, value),
                    _ => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_needs_a_valid_token_for_ones_own_user_id() {
    let redis = Redis::start();
    let service = start(&redis, &[]);
    let base = |query: &str| service.ws_url(&format!("/notifications/subscribe?{query}"));

    assert_eq!(upgrade_status(&base("user_id=alice"), &[]).await, 401, "no token");
    for (what, bad) in bad_tokens("alice") {
        assert_eq!(upgrade_status(&base(&format!("user_id=alice&access_token={bad}")), &[]).await, 401, "{what}");
    }

    let alice = token("alice");
    assert_eq!(upgrade_status(&base(&format!("user_id=bob&access_token={alice}")), &[]).await, 403, "bob's");
    assert_eq!(upgrade_status(&base(&format!("access_token={alice}")), &[]).await, 400, "no user_id");
    assert_eq!(upgrade_status(&base(&format!("user_id=al%20ice&access_token={alice}")), &[]).await, 400, "bad id");

    // The header works as well as the query parameter.
    let bearer = format!("Bearer {alice}");
    assert_eq!(upgrade_status(&base("user_id=alice"), &[("Authorization", &bearer)]).await, 101, "header token");
    assert_eq!(upgrade_status(&base(&format!("user_id=alice&access_token={alice}")), &[]).await, 101);

    // A plain GET gets a JSON 426, not a socket.
    let response =
        http().get(service.url("/notifications/subscribe?user_id=alice")).bearer_auth(&alice).send().await.expect("ok");
    assert_eq!(response.status().as_u16(), 426);
    let body: Value = response.json().await.expect("JSON error");
    assert_eq!(error_code(&body), "upgrade_required");

    // A refused subscription leaves nothing behind.
    let (status, report) = notify(&service, "purchase", "bob", &document("purchase", "bob", "p", "paid").0).await;
    assert_eq!((status, counts(&report)), (200, (0, 0, 0)), "{report}");
}

// ---------------------------------------------------------------------------
// presence
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_users_sockets() {
    let redis = Redis::start();
    let service = start(&redis, &[("PRESENCE_TTL", "2s"), ("PRESENCE_REFRESH", "300ms")]);
    assert_eq!(redis_get(&redis, "presence:alice"), None);
    assert_eq!(presence(&service, None, "alice").await, (200, json!({"user_id": "alice", "online": false})));

    let tab = connect(&service, "alice").await;
    let phone = connect(&service, "alice").await;
    assert!(eventually(WAIT, || redis_get(&redis, "presence:alice").is_some()).await, "key set on connect");
    let value = redis_get(&redis, "presence:alice").expect("set");
    assert!(!value.is_empty(), "the value names this pod");
    let ttl: i64 = redis_cmd(&redis, "PTTL presence:alice").trim().trim_start_matches(':').parse().expect("PTTL");
    assert!((1..=2000).contains(&ttl), "a short TTL, not forever: {ttl} ms");

    // Kept alive well past the TTL while she is connected.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(redis_get(&redis, "presence:alice").as_deref(), Some(value.as_str()), "refreshed");
    assert_eq!(redis_cmd(&redis, "EXISTS presence:alice").trim(), ":1", "the contract other services use");
    assert_eq!(presence(&service, None, "alice").await, (200, json!({"user_id": "alice", "online": true})));
    // Not on the public port: a user asking about anyone would be a presence oracle.
    assert_eq!(presence(&service, Some("bob"), "alice").await.0, 404);
    assert_eq!(presence(&service, None, "bob").await, (200, json!({"user_id": "bob", "online": false})));

    // One socket closing is not going offline; the last one is.
    drop(tab);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(redis_get(&redis, "presence:alice").is_some(), "still on her phone");
    let mut phone = phone;
    phone.close(None).await.expect("close");
    let closed = Instant::now();
    assert!(eventually(WAIT, || redis_get(&redis, "presence:alice").is_none()).await, "key deleted");
    assert!(closed.elapsed() < Duration::from_secs(1), "deleted at once, not by expiry: {:?}", closed.elapsed());
    assert_eq!(presence(&service, None, "alice").await, (200, json!({"user_id": "alice", "online": false})));

    // Presence look-ups need the service token and a valid user id.
    let response = http().get(service.internal_url("/presence?user_id=alice")).send().await.expect("answered");
    assert_eq!(response.status().as_u16(), 401);
    let response =
        http().get(service.internal_url("/presence?user_id=alice")).bearer_auth(token("bob")).send().await.expect("ok");
    assert_eq!(response.status().as_u16(), 403, "a user token is not the service token");
    let (status, body) = presence(&service, None, "a%20b").await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_request"));
    let response =
        http().get(service.internal_url("/presence")).bearer_auth(SERVICE_TOKEN).send().await.expect("answered");
    assert_eq!(response.status().as_u16(), 400, "user_id is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deletes_only_its_own_presence_key_and_a_dead_pods_key_expires() {
    let redis = Redis::start();
    // Long refresh: the keys change only when sockets open and close.
    let settings = [("PRESENCE_TTL", "60s"), ("PRESENCE_REFRESH", "30s")];
    let pod_a = start(&redis, &settings);
    let pod_b = start(&redis, &settings);

    // During a rebalance alice has a socket on each pod; the later SET wins.
    let on_a = connect(&pod_a, "alice").await;
    assert!(eventually(WAIT, || redis_get(&redis, "presence:alice").is_some()).await);
    let value_a = redis_get(&redis, "presence:alice").expect("set by A");
    let mut on_b = connect(&pod_b, "alice").await;
    assert!(eventually(WAIT, || redis_get(&redis, "presence:alice").is_some_and(|v| v != value_a)).await, "B's SET");
    let value_b = redis_get(&redis, "presence:alice").expect("set by B");

    // Her socket on A closes: A must not delete B's key.
    drop(on_a);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(redis_get(&redis, "presence:alice"), Some(value_b), "still online through pod B");
    on_b.close(None).await.expect("close");
    assert!(eventually(WAIT, || redis_get(&redis, "presence:alice").is_none()).await, "B deletes its own key");
    drop((pod_a, pod_b));

    // A pod that dies without cleaning up: its keys lapse after PRESENCE_TTL.
    let mut doomed = start(&redis, &[("PRESENCE_TTL", "1500ms"), ("PRESENCE_REFRESH", "300ms")]);
    let _dave = connect(&doomed, "dave").await;
    assert!(eventually(WAIT, || redis_get(&redis, "presence:dave").is_some()).await);
    doomed.kill();
    let killed = Instant::now();
    assert!(eventually(WAIT, || redis_get(&redis, "presence:dave").is_none()).await, "expired");
    assert!(killed.elapsed() <= Duration::from_millis(2500), "within the TTL: {:?}", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_sockets_and_notifications_keep_working() {
    let mut redis = Redis::start();
    let service = start(
        &redis,
        &[
            ("PRESENCE_TTL", "2s"),
            ("PRESENCE_REFRESH", "200ms"),
            ("REDIS_TIMEOUT", "200ms"),
            ("PRESENCE_KEY_PREFIX", "online"),
        ],
    );
    let mut alice = connect(&service, "alice").await;
    assert!(eventually(WAIT, || redis_get(&redis, "online:alice").is_some()).await, "custom prefix");
    assert_eq!(metric(&service, "presence_redis_up ").await, Some(1.0));

    redis.stop();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Notifications to a socket opened before the outage.
    let (body, data) = document("payment_reminder", "alice", "pay-1", "overdue");
    let (status, report) = notify(&service, "payment_reminder", "alice", &body).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0)), "{report}");
    expect_notification(&mut alice, "payment_reminder", &data).await;
    // A socket opened during the outage.
    let mut bob = connect(&service, "bob").await;
    let (body, data) = document("chat", "bob", "c", "");
    let (status, report) = notify(&service, "chat", "bob", &body).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0)), "{report}");
    expect_notification(&mut bob, "chat", &data).await;

    // Presence cannot answer, and says so; the pod stays ready and says why in metrics.
    let (status, body) = presence(&service, None, "alice").await;
    assert_eq!((status, error_code(&body).as_str()), (503, "unavailable"), "{body}");
    assert_eq!(chatfleet_tests::http_status(service.public_port, "/readyz"), Some(200));
    assert!(metric(&service, "presence_refresh_failures_total ").await >= Some(2.0));
    assert_eq!(metric(&service, "presence_redis_up ").await, Some(0.0));
    let log = service.log_tail(400);
    assert_eq!(log.matches("Redis unavailable").count(), 1, "logged once:\n{log}");

    // Redis comes back empty: the refresh puts every connected user back.
    redis.restart();
    assert!(eventually(WAIT, || redis_get(&redis, "online:alice").is_some()).await, "alice back");
    assert!(redis_get(&redis, "online:bob").is_some(), "bob, who connected during the outage");
    assert_eq!(presence(&service, None, "bob").await, (200, json!({"user_id": "bob", "online": true})));
    assert!(service.log_tail(400).contains("Redis answers again"));
    assert_eq!(metric(&service, "presence_redis_up ").await, Some(1.0));
}

// ---------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1001_removes_presence_and_exits_cleanly() {
    let redis = Redis::start();
    let service = start(&redis, &[]);
    let sockets =
        vec![connect(&service, "alice").await, connect(&service, "alice").await, connect(&service, "bob").await];
    assert!(
        eventually(WAIT, || redis_get(&redis, "presence:alice").is_some()
            && redis_get(&redis, "presence:bob").is_some())
        .await
    );
    terminate_expecting_1001(service, sockets).await;
    assert_eq!(redis_get(&redis, "presence:alice"), None, "the pod cleaned up its presence keys");
    assert_eq!(redis_get(&redis, "presence:bob"), None);
}
