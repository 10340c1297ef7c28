//! chatwebsocketshandler, black-box: the real binary on free ports, real WebSocket
//! clients (tokio-tungstenite, and a raw TCP one for heartbeats), the internal
//! endpoints called the way the change handler calls them.
//!
//! Replay is tested against a small in-test stand-in for chatpersistence's internal
//! history endpoint (to control timing at the replay seam exactly), and once against
//! the real chatpersistence with MongoDB.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chatfleet_tests::ws::{
    close_code_after_frames, expect_quiet, http, next, next_json, terminate_expecting_1001, upgrade_status, Got, Ws,
};
use chatfleet_tests::{bad_tokens, token, Service, JWT_SECRET, SERVICE_TOKEN};
use chatstream::{MessageId, StreamId, UserId};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

const SERVICE: &str = "chatwebsocketshandler";
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// The environment of a chatwebsocketshandler with no chatpersistence reachable,
/// plus `extra`.
fn env(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("JWT_SECRET", JWT_SECRET),
        ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN),
        ("LOG_LEVEL", "info,chatwebsocketshandler=debug,wsfanout=debug"),
        // A port nothing listens on: replay fails, everything else must work.
        ("CHATPERSISTENCE_INTERNAL_URL", "http://127.0.0.1:9"),
        ("SHUTDOWN_TIMEOUT", "10s"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    env
}

pub(crate) fn start(extra: &[(&str, &str)]) -> Service {
    Service::start(SERVICE, &env(extra))
}

fn user(raw: &str) -> UserId {
    UserId::parse(raw).expect("valid user id")
}

pub(crate) fn stream(a: &str, b: &str) -> StreamId {
    StreamId::for_pair(&user(a), &user(b))
}

/// A stored chat message as chatpersistence returns it.
pub(crate) fn chat_message(sender: &str, receiver: &str, content: &str) -> Value {
    json!({
        "message_id": MessageId::new().to_string(),
        "stream_id": stream(sender, receiver).to_string(),
        "sender_id": sender,
        "receiver_id": receiver,
        "content": content,
        "created_at": "2025-01-01T12:00:00Z",
    })
}

fn id_of(message: &Value) -> String {
    message["message_id"].as_str().expect("message_id").to_owned()
}

fn subscribe_path(me: &str, peer: &str, since: Option<&str>) -> String {
    let mut path = format!(
        "/chat/subscribe?stream_id={}&sender_id={me}&receiver_id={peer}&access_token={}",
        stream(me, peer),
        token(me)
    );
    if let Some(since) = since {
        path.push_str(&format!("&since={since}"));
    }
    path
}

/// Opens `me`'s socket on the stream with `peer`.
pub(crate) async fn connect(service: &Service, me: &str, peer: &str, since: Option<&str>) -> Ws {
    let url = service.ws_url(&subscribe_path(me, peer, since));
    match chatfleet_tests::ws_connect(url).await {
        Ok((ws, _)) => ws,
        Err(err) => panic!("{me} could not subscribe: {err}; log:\n{}", service.log_tail(30)),
    }
}

/// The next frame must be a `message`-like frame of `kind` carrying `message`.
async fn expect_event(ws: &mut Ws, kind: &str, message: &Value) {
    let frame = next_json(ws).await;
    assert_eq!(frame["type"], kind, "{frame}");
    assert_eq!(frame["message"]["message_id"], message["message_id"], "{frame}");
}

/// `POST /chat/forward-to-websocket` as the change handler does it.
async fn forward(service: &Service, kind: &str, message: &Value) -> (u16, Value) {
    let url = service.internal_url(&format!(
        "/chat/forward-to-websocket?stream_id={}",
        message["stream_id"].as_str().expect("stream_id")
    ));
    let response = http()
        .post(url)
        .bearer_auth(SERVICE_TOKEN)
        .json(&json!({ "type": kind, "message": message }))
        .send()
        .await
        .expect("forward answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn report(connections: usize, delivered: usize, failed: usize) -> (usize, usize, usize) {
    (connections, delivered, failed)
}

fn counts(body: &Value) -> (usize, usize, usize) {
    let n = |k: &str| body[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {body}")) as usize;
    (n("connections"), n("delivered"), n("failed"))
}

async fn metric(service: &Service, line_prefix: &str) -> Option<f64> {
    let text = http().get(service.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find(|line| line.starts_with(line_prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A client that completes the handshake with a tiny receive buffer and then never reads.
async fn non_reading_client(service: &Service, me: &str, peer: &str) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let tcp = socket.connect(([127, 0, 0, 1], service.public_port).into()).await.expect("connect");
    let (ws, _) =
        tokio_tungstenite::client_async(service.ws_url(&subscribe_path(me, peer, None)), tcp).await.expect("handshake");
    ws
}

/// Reads a socket in the background, reporting each `message` frame's id.
fn collect_ids(mut ws: Ws) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                if let Some(id) = value["message"]["message_id"].as_str() {
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
async fn both_participants_get_each_forwarded_event_exactly_once() {
    let service = start(&[]);
    let mut alice = connect(&service, "alice", "bob", None).await;
    let mut bob = connect(&service, "bob", "alice", None).await;

    let m1 = chat_message("alice", "bob", "hello bob");
    let (status, body) = forward(&service, "message", &m1).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(counts(&body), report(2, 2, 0));
    assert_eq!(body["stream_id"], m1["stream_id"]);
    for ws in [&mut alice, &mut bob] {
        let frame = next_json(ws).await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["message"], m1, "the stored message, unchanged");
    }

    // A retried forward (the change handler got no answer the first time).
    let (status, body) = forward(&service, "message", &m1).await;
    assert_eq!((status, counts(&body)), (200, report(2, 2, 0)), "a retry counts as delivered");
    let m2 = chat_message("bob", "alice", "hi alice");
    assert_eq!(forward(&service, "message", &m2).await.0, 200);
    for ws in [&mut alice, &mut bob] {
        expect_event(ws, "message", &m2).await; // not m1 again
    }

    // Edits and deletes are their own frame types.
    let mut edited = m2.clone();
    edited["content"] = json!("hi alice (edited)");
    assert_eq!(forward(&service, "message_updated", &edited).await.0, 200);
    assert_eq!(forward(&service, "message_deleted", &edited).await.0, 200);
    for ws in [&mut alice, &mut bob] {
        let frame = next_json(ws).await;
        assert_eq!(frame["type"], "message_updated");
        assert_eq!(frame["message"]["content"], "hi alice (edited)");
        expect_event(ws, "message_deleted", &edited).await;
    }

    // A stream with no socket on this pod: nothing to do, and that is success.
    let elsewhere = chat_message("carol", "dave", "nobody listens here");
    let (status, body) = forward(&service, "message", &elsewhere).await;
    assert_eq!((status, counts(&body)), (200, report(0, 0, 0)), "{body}");
    expect_quiet(&mut alice, Duration::from_millis(300)).await;

    // Application-level pings are answered; other client frames get an error frame
    // and the socket stays open.
    alice.send(Message::text(r#"{"type":"ping"}"#)).await.expect("send");
    assert_eq!(next_json(&mut alice).await, json!({"type": "pong"}));
    alice.send(Message::text(r#"{"type":"message","content":"hi"}"#)).await.expect("send");
    let error = next_json(&mut alice).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "unsupported_frame");
    let m3 = chat_message("alice", "bob", "still here");
    assert_eq!(forward(&service, "message", &m3).await.0, 200);
    expect_event(&mut alice, "message", &m3).await;
    expect_event(&mut bob, "message", &m3).await;
    expect_quiet(&mut bob, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_gets_4001_its_peer_keeps_receiving_and_the_forward_is_206() {
    let service = start(&[("WS_OUTBOUND_QUEUE", "4"), ("WS_CLOSE_TIMEOUT", "15s")]);
    let mut healthy = collect_ids(connect(&service, "alice", "bob", None).await);
    let mut slow = non_reading_client(&service, "bob", "alice").await;

    let big = "x".repeat(4000);
    let mut sent = Vec::new();
    let mut partial = None;
    for _ in 0..5000 {
        let message = chat_message("alice", "bob", &big);
        let (status, body) = forward(&service, "message", &message).await;
        sent.push(id_of(&message));
        match status {
            200 => assert_eq!(counts(&body), report(2, 2, 0), "{body}"),
            206 => {
                partial = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let partial = partial.expect("the non-reading client's queue never filled");
    eprintln!("the non-reading client fell behind after {} forwards", sent.len());
    assert_eq!(counts(&partial), report(2, 1, 1), "{partial}");

    // The retry (and what follows) reaches everyone left: the slow socket is out.
    let retry_id = sent.last().cloned().expect("sent something");
    let next_message = chat_message("alice", "bob", "after the slow one left");
    let (status, body) = forward(&service, "message", &next_message).await;
    assert_eq!((status, counts(&body)), (200, report(1, 1, 0)), "{body}");
    sent.push(id_of(&next_message));

    // The slow client, once it reads, finds the close code for "you missed events".
    let code = close_code_after_frames(&mut slow, Duration::from_secs(20)).await;
    assert_eq!(code, Some(4001));

    // The healthy peer got everything, in order, exactly once.
    let mut received = Vec::new();
    while received.len() < sent.len() {
        match tokio::time::timeout(WAIT, healthy.recv()).await {
            Ok(Some(id)) => received.push(id),
            _ => panic!("healthy peer stalled after {} of {} frames", received.len(), sent.len()),
        }
    }
    assert_eq!(received, sent, "healthy peer frames (retried id {retry_id})");
    assert!(
        metric(&service, "ws_slow_consumer_closes_total{hub=\"chat\"}").await >= Some(1.0),
        "slow consumer close counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_no_socket_accepted_is_500() {
    let service = start(&[("WS_OUTBOUND_QUEUE", "2")]);
    let _slow = non_reading_client(&service, "bob", "alice").await;

    let big = "y".repeat(4000);
    let mut failed = None;
    for _ in 0..5000 {
        let (status, body) = forward(&service, "message", &chat_message("alice", "bob", &big)).await;
        match status {
            200 => assert_eq!(counts(&body), report(1, 1, 0), "{body}"),
            500 => {
                failed = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let failed = failed.expect("the non-reading client's queue never filled");
    assert_eq!(counts(&failed), report(1, 0, 1), "{failed}");
    let (status, body) = forward(&service, "message", &chat_message("alice", "bob", "later")).await;
    assert_eq!((status, counts(&body)), (200, report(0, 0, 0)), "the closed socket is gone: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stream_sends_resync_then_4000_to_that_stream_only() {
    let service = start(&[]);
    let mut alice = connect(&service, "alice", "bob", None).await;
    let mut bob = connect(&service, "bob", "alice", None).await;
    let mut carol = connect(&service, "carol", "alice", None).await;

    let target = stream("alice", "bob");
    let response = http()
        .post(service.internal_url(&format!("/chat/close-stream?stream_id={target}")))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .expect("close-stream answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body, json!({"stream_id": target.to_string(), "closed": 2}));

    for ws in [&mut alice, &mut bob] {
        assert_eq!(next_json(ws).await, json!({"type": "resync", "reason": "stream_closed"}));
        match next(ws, WAIT).await {
            Got::Close(code) => assert_eq!(code, Some(4000)),
            other => panic!("expected close 4000, got {other:?}"),
        }
    }

    // Other streams are untouched; the closed one has no sockets left.
    let to_carol = chat_message("alice", "carol", "you are still connected");
    let (status, body) = forward(&service, "message", &to_carol).await;
    assert_eq!((status, counts(&body)), (200, report(1, 1, 0)), "{body}");
    expect_event(&mut carol, "message", &to_carol).await;
    let (status, body) = forward(&service, "message", &chat_message("alice", "bob", "x")).await;
    assert_eq!((status, counts(&body)), (200, report(0, 0, 0)), "{body}");
}

// ---------------------------------------------------------------------------
// refusals
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_and_bad_internal_calls_are_refused() {
    let service = start(&[]);
    let ab = stream("alice", "bob");
    let base =
        |extra: &str| service.ws_url(&format!("/chat/subscribe?stream_id={ab}&sender_id=alice&receiver_id=bob{extra}"));

    // Tokens.
    assert_eq!(upgrade_status(&base(""), &[]).await, 401, "no token");
    for (what, bad) in bad_tokens("alice") {
        assert_eq!(upgrade_status(&base(&format!("&access_token={bad}")), &[]).await, 401, "{what}");
    }
    let bearer = format!("Bearer {}", token("alice"));
    assert_eq!(upgrade_status(&base(""), &[("Authorization", &bearer)]).await, 101, "header token works");
    assert_eq!(upgrade_status(&base(&format!("&access_token={}", token("bob"))), &[]).await, 101);

    // Someone else's conversation.
    let mallory = format!("&access_token={}", token("mallory"));
    assert_eq!(upgrade_status(&base(&mallory), &[]).await, 403, "not a participant");

    // Stream ids are recomputed, never trusted.
    let alice_token = token("alice");
    let ac = stream("alice", "carol");
    let cases = [
        (format!("/chat/subscribe?stream_id={ac}&sender_id=alice&receiver_id=bob"), "stream of another pair"),
        ("/chat/subscribe?stream_id=zzzz&sender_id=alice&receiver_id=bob".to_owned(), "malformed stream id"),
        (format!("/chat/subscribe?stream_id={ab}&sender_id=alice"), "missing receiver"),
        (format!("/chat/subscribe?stream_id={ab}&sender_id=alice&receiver_id=b%20b"), "bad user id"),
        (format!("/chat/subscribe?stream_id={ab}&sender_id=alice&receiver_id=bob&since=42"), "bad since"),
    ];
    for (path, why) in cases {
        let url = service.ws_url(&format!("{path}&access_token={alice_token}"));
        assert_eq!(upgrade_status(&url, &[]).await, 400, "{why}");
    }

    // A plain GET is not an upgrade; the socket is not on the internal port.
    let plain = http()
        .get(service.url(&format!("/chat/subscribe?stream_id={ab}&sender_id=alice&receiver_id=bob")))
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("answered");
    assert_eq!(plain.status(), 426);
    let error: Value = plain.json().await.expect("JSON error");
    assert_eq!(error["error"]["code"], "upgrade_required");
    let internal_subscribe = http()
        .get(service.internal_url(&format!("/chat/subscribe?stream_id={ab}&sender_id=alice&receiver_id=bob")))
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("answered");
    assert_eq!(internal_subscribe.status(), 404);

    // Internal endpoints: not on the public port, and only with the service token.
    let mut listener = connect(&service, "alice", "bob", None).await;
    let message = chat_message("alice", "bob", "should never arrive");
    let body = json!({"type": "message", "message": message});
    let forward_path = format!("/chat/forward-to-websocket?stream_id={ab}");
    let post = |url: String, token: Option<String>, body: String| {
        let mut request = http().post(url).header("content-type", "application/json").body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.expect("answered").status().as_u16() }
    };
    let service_token = Some(SERVICE_TOKEN.to_owned());
    assert_eq!(post(service.url(&forward_path), service_token.clone(), body.to_string()).await, 404, "public port");
    assert_eq!(
        post(service.url(&format!("/chat/close-stream?stream_id={ab}")), service_token.clone(), String::new()).await,
        404
    );
    assert_eq!(post(service.internal_url(&forward_path), None, body.to_string()).await, 401, "no token");
    assert_eq!(
        post(service.internal_url(&forward_path), Some("not-the-service-token".into()), body.to_string()).await,
        403,
        "wrong token"
    );
    assert_eq!(
        post(service.internal_url(&forward_path), Some(token("alice")), body.to_string()).await,
        403,
        "a user token is not the service token"
    );
    assert_eq!(
        post(service.internal_url(&format!("/chat/close-stream?stream_id={ab}")), None, String::new()).await,
        401
    );

    // Bad forwards.
    let other_pair = chat_message("alice", "carol", "wrong stream");
    let mut inconsistent = message.clone();
    inconsistent["receiver_id"] = json!("carol");
    let mut empty = message.clone();
    empty["content"] = json!("   ");
    let bad_bodies = [
        ("{not json".to_owned(), 400, "malformed JSON"),
        (json!({"type": "shout", "message": message}).to_string(), 422, "unknown type"),
        (json!({"type": "message"}).to_string(), 422, "missing message"),
        (json!({"type": "message", "message": message, "extra": 1}).to_string(), 422, "extra field"),
        (json!({"type": "message", "message": empty}).to_string(), 422, "empty content"),
        (json!({"type": "message", "message": other_pair}).to_string(), 400, "message of another stream"),
        (json!({"type": "message", "message": inconsistent}).to_string(), 400, "stream id not the pair's"),
    ];
    for (bad, expected, why) in bad_bodies {
        assert_eq!(post(service.internal_url(&forward_path), service_token.clone(), bad).await, expected, "{why}");
    }
    for path in ["/chat/forward-to-websocket", "/chat/forward-to-websocket?stream_id=nope"] {
        assert_eq!(post(service.internal_url(path), service_token.clone(), body.to_string()).await, 400, "{path}");
    }
    expect_quiet(&mut listener, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_refuses_upgrades_with_503() {
    let service = start(&[("WS_MAX_CONNECTIONS", "1")]);
    let mut first = connect(&service, "alice", "bob", None).await;
    let url = service.ws_url(&subscribe_path("bob", "alice", None));
    assert_eq!(upgrade_status(&url, &[]).await, 503);

    // A client-initiated close is answered, and frees the slot.
    let bye = tungstenite::protocol::CloseFrame { code: 1000.into(), reason: "bye".into() };
    first.close(Some(bye)).await.expect("close sent");
    match next(&mut first, WAIT).await {
        Got::Close(code) => assert_eq!(code, Some(1000)),
        other => panic!("expected the close reply, got {other:?}"),
    }
    let deadline = Instant::now() + WAIT;
    while upgrade_status(&url, &[]).await != 101 {
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_client_frame_closes_with_1009() {
    let service = start(&[("WS_MAX_MESSAGE_SIZE", "1024")]);
    let mut alice = connect(&service, "alice", "bob", None).await;
    alice.send(Message::text("z".repeat(4096))).await.expect("send");
    match next(&mut alice, WAIT).await {
        Got::Close(code) => assert_eq!(code, Some(1009)),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------

/// A stand-in for chatpersistence's internal `GET /chat/messages`, same shape:
/// `{"stream_id", "messages" (oldest first), "has_more"}`. The first request can be
/// held until the test releases it.
#[derive(Clone)]
struct History {
    messages: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
    requested: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
}

struct HistoryServer {
    url: String,
    messages: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
    requested: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
}

async fn history_page(
    State(history): State<History>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let expected = format!("Bearer {SERVICE_TOKEN}");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, "service token required").into_response();
    }
    if history.requests.fetch_add(1, Ordering::SeqCst) == 0 {
        let _ = history.requested.send(());
        let mut release = history.release.clone();
        let _ = release.wait_for(|released| *released).await;
    }
    let (Some(stream_id), Some(since), Some(limit)) =
        (query.get("stream_id"), query.get("since"), query.get("limit").and_then(|l| l.parse::<usize>().ok()))
    else {
        return (StatusCode::BAD_REQUEST, "stream_id, since and limit expected").into_response();
    };
    let after: Vec<Value> = history
        .messages
        .lock()
        .expect("lock")
        .iter()
        .filter(|m| m["stream_id"] == stream_id.as_str() && m["message_id"].as_str() > Some(since.as_str()))
        .cloned()
        .collect();
    let has_more = after.len() > limit;
    let page: Vec<Value> = after.into_iter().take(limit).collect();
    Json(json!({"stream_id": stream_id, "messages": page, "has_more": has_more})).into_response()
}

async fn history_server(messages: Vec<Value>, hold_first: bool) -> HistoryServer {
    let (requested_tx, requested) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(!hold_first);
    let messages = Arc::new(Mutex::new(messages));
    let requests = Arc::new(AtomicUsize::new(0));
    let state = History {
        messages: messages.clone(),
        requests: requests.clone(),
        requested: requested_tx,
        release: release_rx,
    };
    let app = Router::new().route("/chat/messages", get(history_page)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    HistoryServer { url, messages, requests, requested, release }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_the_missed_messages_then_goes_live_with_no_gap_and_no_duplicate() {
    let stored: Vec<Value> = (1..=6).map(|i| chat_message("alice", "bob", &format!("m{i}"))).collect();
    let mut history = history_server(stored.clone(), true).await;
    let service = start(&[("CHATPERSISTENCE_INTERNAL_URL", &history.url), ("HISTORY_PAGE_SIZE", "2")]);

    let mut bob = connect(&service, "bob", "alice", None).await;
    let mut alice = connect(&service, "alice", "bob", Some(&id_of(&stored[0]))).await;
    tokio::time::timeout(WAIT, history.requested.recv()).await.expect("history asked").expect("channel open");

    // While the replay is being read: the CDC delivers m5 (already in the history)
    // and a brand-new m7.
    let m7 = chat_message("alice", "bob", "m7");
    history.messages.lock().expect("lock").push(m7.clone());
    let (status, body) = forward(&service, "message", &stored[4]).await;
    assert_eq!((status, counts(&body)), (200, report(2, 2, 0)), "{body}");
    let (status, body) = forward(&service, "message", &m7).await;
    assert_eq!((status, counts(&body)), (200, report(2, 2, 0)), "{body}");
    history.release.send_replace(true);

    // m2..m6 from the history (three pages), then m7 live; m5 once.
    for expected in stored[1..].iter().chain([&m7]) {
        expect_event(&mut alice, "message", expected).await;
    }
    expect_quiet(&mut alice, Duration::from_millis(300)).await;
    assert_eq!(history.requests.load(Ordering::SeqCst), 3, "pages of 2: m2 m3, m4 m5, m6 m7");

    // A late CDC copy of a replayed message is not shown again; new ones are.
    let (status, body) = forward(&service, "message", &stored[5]).await;
    assert_eq!((status, counts(&body)), (200, report(2, 2, 0)), "{body}");
    let m8 = chat_message("bob", "alice", "m8");
    assert_eq!(forward(&service, "message", &m8).await.0, 200);
    expect_event(&mut alice, "message", &m8).await;

    // Bob, live only, saw the live frames as they came.
    for expected in [&stored[4], &m7, &stored[5], &m8] {
        expect_event(&mut bob, "message", expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_cannot_be_served_ends_in_resync() {
    // History unreachable.
    let service = start(&[("CHATPERSISTENCE_INTERNAL_URL", "http://127.0.0.1:9"), ("HISTORY_TIMEOUT", "2s")]);
    let mut alice = connect(&service, "alice", "bob", Some(&MessageId::new().to_string())).await;
    assert_eq!(next_json(&mut alice).await, json!({"type": "resync", "reason": "history_unavailable"}));
    assert!(matches!(next(&mut alice, WAIT).await, Got::Close(Some(4000))));
    drop(service);

    // Further behind than HISTORY_REPLAY_LIMIT.
    let stored: Vec<Value> = (1..=6).map(|i| chat_message("alice", "bob", &format!("m{i}"))).collect();
    let history = history_server(stored.clone(), false).await;
    let service = start(&[("CHATPERSISTENCE_INTERNAL_URL", &history.url), ("HISTORY_REPLAY_LIMIT", "3")]);
    let mut alice = connect(&service, "alice", "bob", Some(&id_of(&stored[0]))).await;
    assert_eq!(next_json(&mut alice).await, json!({"type": "resync", "reason": "too_far_behind"}));
    assert!(matches!(next(&mut alice, WAIT).await, Got::Close(Some(4000))));

    // Exactly at the limit is fine.
    let mut bob = connect(&service, "bob", "alice", Some(&id_of(&stored[2]))).await;
    for expected in &stored[3..] {
        expect_event(&mut bob, "message", expected).await;
    }
}

// ---------------------------------------------------------------------------
// heartbeats and shutdown
// ---------------------------------------------------------------------------

/// Completes a WebSocket handshake over raw TCP and returns the silent socket.
async fn silent_client(service: &Service, me: &str, peer: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", service.public_port)).await.expect("connect");
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        subscribe_path(me, peer, None)
    );
    tcp.write_all(request.as_bytes()).await.expect("handshake sent");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut byte).await.expect("handshake read");
        assert_eq!(n, 1, "connection closed during handshake: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_dropped_and_a_live_one_is_kept() {
    let service = start(&[("WS_PING_INTERVAL", "200ms"), ("WS_PONG_TIMEOUT", "1500ms")]);
    let mut alive = connect(&service, "alice", "bob", None).await;
    let mut silent = silent_client(&service, "bob", "alice").await;
    let opened = Instant::now();
    assert_eq!(metric(&service, "ws_connections{hub=\"chat\"}").await, Some(2.0));

    // The live client answers pings (tungstenite does so while it reads) for 3.5 s.
    expect_quiet(&mut alive, Duration::from_millis(3500)).await;
    assert_eq!(metric(&service, "ws_connections{hub=\"chat\"}").await, Some(1.0), "the silent one is gone");
    assert_eq!(metric(&service, "ws_heartbeat_timeouts_total{hub=\"chat\"}").await, Some(1.0));

    // The silent socket got pings, then a 4002 close, then the server hung up.
    let mut received = Vec::new();
    let read_all = tokio::time::timeout(WAIT, silent.read_to_end(&mut received)).await;
    assert!(read_all.is_ok(), "the server never hung up on the silent client");
    assert!(opened.elapsed() < Duration::from_secs(8));
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 2 <= received.len() {
        let (opcode, len) = (received[at] & 0x0f, usize::from(received[at + 1] & 0x7f));
        frames.push((opcode, received[at + 2..(at + 2 + len).min(received.len())].to_vec()));
        at += 2 + len;
    }
    assert!(frames.iter().any(|(op, _)| *op == 0x9), "pings were sent: {frames:?}");
    let close = frames.iter().find(|(op, _)| *op == 0x8).expect("a close frame");
    assert_eq!(close.1.get(..2), Some(&[0x0f, 0xa2][..]), "close code 4002");

    // The live client is still served.
    let message = chat_message("bob", "alice", "still alive?");
    let (status, body) = forward(&service, "message", &message).await;
    assert_eq!((status, counts(&body)), (200, report(1, 1, 0)), "{body}");
    expect_event(&mut alive, "message", &message).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1001_and_exits_cleanly() {
    let service = start(&[]);
    let sockets = vec![
        connect(&service, "alice", "bob", None).await,
        connect(&service, "bob", "alice", None).await,
        connect(&service, "carol", "dave", None).await,
    ];
    terminate_expecting_1001(service, sockets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_until_a_lagging_client_has_its_1001() {
    let mut service = start(&[("WS_CLOSE_TIMEOUT", "10s")]);
    let mut lagging = non_reading_client(&service, "alice", "bob").await;

    // Forward until the server is stuck writing to the client (frames queue up
    // behind a full TCP window) but its queue is not full yet.
    let big = "w".repeat(4000);
    let mut forwarded = 0.0;
    loop {
        for _ in 0..50 {
            let (status, body) = forward(&service, "message", &chat_message("bob", "alice", &big)).await;
            assert_eq!((status, counts(&body)), (200, report(1, 1, 0)), "{body}");
            forwarded += 1.0;
        }
        let sent = metric(&service, "ws_frames_sent_total{hub=\"chat\"}").await.unwrap_or(0.0);
        if forwarded - sent >= 20.0 {
            break;
        }
        assert!(forwarded < 5000.0, "the client's TCP window never filled");
    }

    let started = Instant::now();
    let terminate = tokio::task::spawn_blocking(move || {
        let status = service.terminate(Duration::from_secs(20));
        (service, status)
    });
    // The client only starts reading a second later; the server must wait for it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let code = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match lagging.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("the connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("close frame within 15 s");
    assert_eq!(code, Some(1001));
    // Reading on sends the close reply, as any client does.
    let _ = tokio::time::timeout(WAIT, async { while lagging.next().await.is_some() {} }).await;
    let (service, status) = terminate.await.expect("join");
    let status = status.unwrap_or_else(|| panic!("did not exit on SIGTERM; log:\n{}", service.log_tail(30)));
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}; log:\n{}", started.elapsed(), service.log_tail(30));
}

// ---------------------------------------------------------------------------
// replay against the real chatpersistence
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_from_the_real_chatpersistence() {
    let stack = chatfleet_tests::Stack::start();
    let persistence = Service::start("chatpersistence", &stack.env());
    let service = start(&[("CHATPERSISTENCE_INTERNAL_URL", &persistence.internal_url(""))]);

    // chatpersistence answers 503 until its indexes exist: retry as a client would
    // (the client_message_id makes the retry safe).
    let mut posted = Vec::new();
    for i in 1..=4 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stored = loop {
            let response = http()
                .post(persistence.url("/chat/messages"))
                .bearer_auth(token("alice"))
                .json(&json!({
                    "content": format!("real m{i}"),
                    "sender_id": "alice",
                    "receiver_id": "bob",
                    "client_message_id": format!("ws-replay-{i}"),
                }))
                .send()
                .await
                .expect("chatpersistence answered");
            let status = response.status().as_u16();
            if status == 503 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(status, 201, "{:?}", response.text().await);
            break response.json::<Value>().await.expect("stored message");
        };
        posted.push(stored);
    }

    let mut bob = connect(&service, "bob", "alice", Some(&id_of(&posted[0]))).await;
    for expected in &posted[1..] {
        let frame = next_json(&mut bob).await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["message"], *expected, "the replayed message is the stored one");
    }
    // The change handler's (late) forward of a replayed message is not shown twice.
    let (status, body) = forward(&service, "message", &posted[3]).await;
    assert_eq!((status, counts(&body)), (200, report(1, 1, 0)), "{body}");
    expect_quiet(&mut bob, Duration::from_millis(300)).await;
}
