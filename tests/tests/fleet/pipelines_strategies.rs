//! The change handler's pipelines end to end: the three notification strategies of
//! seed 001 as configuration, and the purchase / payment / shipment pipeline.
//!
//! Real binaries (chatpersistence with its outbox relay, chatwebsocketshandler,
//! generalnotificationshandler, chatpersistencechangehandler) against real Redis,
//! broker and MongoDB wire server. Chat records come from posts through
//! chatpersistence; domain records are produced to the domain topics in the captured
//! (flattened) format, as Debezium or the relay would write them.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chatfleet_tests::client::{self, ChatSocket, Seen};
use chatfleet_tests::{token, Pipeline, Service, Stack};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const A: &str = "alice";
const B: &str = "bob";
const C: &str = "carol";

/// The chat fleet plus the notification service, the change handler running the
/// given strategy file (or the default when `None`).
struct Fleet {
    stack: Stack,
    persistence: Service,
    sockets: Service,
    notifications: Service,
    handler: Service,
}

impl Fleet {
    fn start(config: Option<PathBuf>, extra: &[(&str, &str)]) -> Self {
        let stack = Stack::start();
        let mut base = stack.pipeline_env();
        base.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let config: Vec<(String, String)> =
            config.map(|path| ("CHATFLEET_CONFIG".into(), path.to_string_lossy().into_owned())).into_iter().collect();
        let Pipeline { persistence, sockets, notifications, handler } = Pipeline::start(&base, &config);
        Self { stack, persistence, sockets, notifications, handler }
    }

    /// Waits until a chat message travels to the chat socket and to the receiver's
    /// notification socket (every consumer group involved has joined).
    async fn warm_up(&self) {
        let (a, b) = ("warmup-a", "warmup-b");
        let mut chat = ChatSocket::connect(&self.sockets, b, a, None).await;
        let mut notes = NotifySocket::connect(&self.notifications, b).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut posted = Vec::new();
        loop {
            let (status, body) = client::post(&self.persistence, a, b, "warm-up", None).await;
            if status == 201 {
                posted.push(body["message_id"].as_str().unwrap_or_default().to_owned());
                let (seen, _) = chat.collect_messages(Duration::from_secs(5)).await;
                if seen.iter().any(|id| posted.contains(id)) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chat delivery did not warm up within 60 s");
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "chat notifications did not warm up within 60 s");
            if let Some(frame) = notes.next_notification(left).await {
                if frame["kind"] == "chat" {
                    break;
                }
            }
        }
        chat.close().await;
        notes.close().await;
    }

    /// The handler's counter `name` summed over the series whose labels include all of `labels`.
    async fn handler_counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.handler.counter(name, labels).await
    }
}

/// A user's notification socket.
struct NotifySocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl NotifySocket {
    async fn connect(notifications: &Service, user: &str) -> Self {
        let path = format!("/notifications/subscribe?user_id={user}&access_token={}", token(user));
        let (ws, _) =
            chatfleet_tests::ws_connect(notifications.ws_url(&path)).await.expect("notification subscribe upgrades");
        Self { ws }
    }

    /// The next `notification` frame within `timeout`.
    async fn next_notification(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) | Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    if frame["type"] == "notification" {
                        return Some(frame);
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => panic!("notification socket closed: {frame:?}"),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Every notification frame within `window`.
    async fn collect(&mut self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return frames;
            }
            match self.next_notification(left).await {
                Some(frame) => frames.push(frame),
                None => return frames,
            }
        }
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn strategy_file(name: &str) -> PathBuf {
    testkit::workspace_root().join("deploy/strategies").join(name)
}

/// A copy of a shipped strategy file with one text replaced (to shorten a window).
fn strategy_with(name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(strategy_file(name)).expect("strategy file");
    assert!(text.contains(from), "{name} no longer contains {from:?}");
    let path = testkit::scratch("strategy").join(name);
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write strategy copy");
    path
}

async fn post_ok(fleet: &Fleet, from: &str, to: &str, content: &str) -> String {
    let (status, body) = client::post(&fleet.persistence, from, to, content, None).await;
    assert_eq!(status, 201, "POST answered {status}: {body}");
    body["message_id"].as_str().expect("message_id").to_owned()
}

/// The next `message` frame's id within `timeout`.
async fn next_message(socket: &mut ChatSocket, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match socket.next(left).await {
            Seen::Frame(frame) if frame["type"] == "message" => {
                return frame["message"]["message_id"].as_str().map(str::to_owned)
            }
            Seen::Frame(_) => continue,
            Seen::Closed(_) | Seen::Nothing => return None,
        }
    }
}

/// How many forwards of the `chat` pipeline the socket pod answered with 200.
async fn socket_calls(fleet: &Fleet) -> f64 {
    fleet
        .handler_counter(
            "forward_requests_total",
            &[("pipeline", "chat"), ("target", "chat_websocket"), ("outcome", "200")],
        )
        .await
}

/// The change handler's chat notification calls that got no answer (timed out or refused).
async fn notification_failures(fleet: &Fleet) -> f64 {
    let mut failed = 0.0;
    for outcome in ["timeout", "error"] {
        failed += fleet
            .handler_counter("forward_requests_total", &[("target", "chat_notification"), ("outcome", outcome)])
            .await;
    }
    failed
}

/// The message ids of the chat notifications among `frames` (a chat notification's
/// `data` is the message).
fn chat_ids(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["kind"] == "chat")
        .map(|f| f["data"]["message_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Strategy 1 (the default, no file): one consumer calls the chat sockets and the
/// notification service concurrently, and both must succeed before the change is
/// done. With the notification service hanging, the change is retried — only the
/// notification: the socket pod took the frame on the first attempt and is not called
/// again — and the notification arrives once the service is back.
#[tokio::test]
async fn strategy_1_forwards_to_sockets_and_notifications_and_commits_only_when_both_succeed() {
    let fleet = Fleet::start(None, &[("MESSAGE_RETRY_MAX_RETRIES", "30"), ("MESSAGE_RETRY_MAX_INTERVAL", "300ms")]);
    fleet.warm_up().await;
    let mut chat = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let mut notes = NotifySocket::connect(&fleet.notifications, B).await;
    let mut alices_notes = NotifySocket::connect(&fleet.notifications, A).await;

    let first = post_ok(&fleet, A, B, "hello bob").await;
    assert_eq!(next_message(&mut chat, Duration::from_secs(2)).await, Some(first.clone()), "chat socket");
    let note = notes.next_notification(Duration::from_secs(2)).await.expect("bob is notified");
    assert_eq!(note["kind"], "chat");
    assert_eq!(note["data"]["message_id"], Value::from(first.clone()));
    assert_eq!(note["data"]["content"], "hello bob");
    assert!(alices_notes.collect(Duration::from_millis(300)).await.is_empty(), "the sender is not notified");

    // The notification service hangs: the socket still gets the message (the calls
    // are concurrent), but the change is not done, so it is retried: the failed
    // notification only, not the forward the socket pod already took.
    let before = socket_calls(&fleet).await;
    let failures_before = notification_failures(&fleet).await;
    fleet.notifications.signal("STOP");
    let during = post_ok(&fleet, A, B, "while notifications hang").await;
    assert_eq!(next_message(&mut chat, Duration::from_secs(2)).await, Some(during.clone()), "chat socket");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let socket_forwards = socket_calls(&fleet).await - before;
    let notify_attempts = notification_failures(&fleet).await - failures_before;
    fleet.notifications.signal("CONT");
    assert_eq!(socket_forwards, 1.0, "the socket pod took the message once and is not called again on retries");
    assert!(notify_attempts >= 2.0, "the notification is retried while it fails (failed attempts: {notify_attempts})");

    let frames = notes.collect(Duration::from_secs(6)).await;
    assert_eq!(chat_ids(&frames), vec![during.clone()], "the notification arrives once the service is back");
    let (extra, _) = chat.collect_messages(Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "the retries are never shown twice on the chat socket: {extra:?}");
    // Done now: a later message flows straight through.
    let after = post_ok(&fleet, A, B, "after").await;
    assert_eq!(next_message(&mut chat, Duration::from_secs(2)).await, Some(after.clone()));
    let note = notes.next_notification(Duration::from_secs(2)).await.expect("notified");
    assert_eq!(note["data"]["message_id"], Value::from(after));
}

/// Strategy 2: notifications in their own group, deduplicated per conversation and
/// recipient. Five messages in a row → one notification; after the window → another;
/// another conversation within the window notifies on its own.
#[tokio::test]
async fn strategy_2_notifies_once_per_conversation_and_window() {
    // The shipped file, with the notification window shortened from 6 h to 3 s.
    let config = strategy_with(
        "strategy-2-notification-group.toml",
        "key_prefix = \"chat-notify\"\nttl = \"6h\"",
        "key_prefix = \"chat-notify\"\nttl = \"3s\"",
    );
    let fleet = Fleet::start(Some(config), &[]);
    fleet.warm_up().await;
    let mut chat = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let mut notes = NotifySocket::connect(&fleet.notifications, B).await;

    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(post_ok(&fleet, A, B, &format!("message {i}")).await);
    }
    let (seen, _) = chat.collect_messages(Duration::from_secs(2)).await;
    assert_eq!(seen, ids, "the chat socket gets every message, in order");
    let frames = notes.collect(Duration::from_millis(2500).saturating_sub(started.elapsed())).await;
    assert_eq!(chat_ids(&frames), vec![ids[0].clone()], "one notification for the five messages");

    // Another conversation has its own window.
    let from_carol = post_ok(&fleet, C, B, "hi from carol").await;
    let note = notes.next_notification(Duration::from_secs(2)).await.expect("carol's message notifies");
    assert_eq!(note["data"]["message_id"], Value::from(from_carol));

    // After alice's window has passed, her next message notifies again.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed())).await;
    let later = post_ok(&fleet, A, B, "after the window").await;
    let frames = notes.collect(Duration::from_secs(3)).await;
    assert_eq!(chat_ids(&frames), vec![later], "a new window, a new notification");
}

/// Strategy 3: fully segregated groups. With the notification service hanging, chat
/// sockets still get every message promptly (a later message of the same conversation
/// does not wait behind the notification retries), and the notifications arrive when
/// the service is back.
#[tokio::test]
async fn strategy_3_keeps_chat_prompt_while_notifications_are_down() {
    let fleet = Fleet::start(Some(strategy_file("strategy-3-segregated.toml")), &[]);
    fleet.warm_up().await;
    let mut chat_ab = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let mut chat_cb = ChatSocket::connect(&fleet.sockets, B, C, None).await;
    let mut notes = NotifySocket::connect(&fleet.notifications, B).await;

    fleet.notifications.signal("STOP");
    let paused = Instant::now();
    let mut from_alice = Vec::new();
    for i in 0..3 {
        let sent = Instant::now();
        let id = post_ok(&fleet, A, B, &format!("while notifications are down {i}")).await;
        let got = next_message(&mut chat_ab, Duration::from_secs(1)).await;
        assert_eq!(got.as_deref(), Some(id.as_str()), "message {i} reaches the chat socket within 1 s");
        assert!(sent.elapsed() < Duration::from_secs(1), "message {i} took {:?}", sent.elapsed());
        from_alice.push(id);
    }
    let sent = Instant::now();
    let from_carol = post_ok(&fleet, C, B, "carol, while notifications are down").await;
    assert_eq!(next_message(&mut chat_cb, Duration::from_secs(1)).await, Some(from_carol.clone()));
    assert!(sent.elapsed() < Duration::from_secs(1));

    tokio::time::sleep(Duration::from_secs(2).saturating_sub(paused.elapsed())).await;
    fleet.notifications.signal("CONT");
    let frames = notes.collect(Duration::from_secs(8)).await;
    let got: HashSet<String> = chat_ids(&frames).into_iter().collect();
    let expected: HashSet<String> = [from_alice[0].clone(), from_carol].into_iter().collect();
    assert_eq!(got, expected, "one notification per conversation arrives once the service is back");
}

/// The default domain pipeline: a purchase, a payment reminder and shipping updates
/// reach the right user's notification sockets as typed notifications, and no one else's.
#[tokio::test]
async fn domain_records_notify_the_right_user_with_the_right_kind() {
    let fleet = Fleet::start(None, &[]);
    let (dave, erin, frank) = ("dave", "erin", "frank");
    let mut dave_notes = NotifySocket::connect(&fleet.notifications, dave).await;
    let mut dave_second_tab = NotifySocket::connect(&fleet.notifications, dave).await;
    let mut erin_notes = NotifySocket::connect(&fleet.notifications, erin).await;
    let mut frank_notes = NotifySocket::connect(&fleet.notifications, frank).await;

    let producer =
        kafkawrapper::Producer::new(&kafkawrapper::KafkaSettings::for_brokers(fleet.stack.broker.bootstrap()))
            .expect("producer");
    let produce = |topic: &'static str, user: &'static str, op: &'static str, ts: i64, mut doc: Value| {
        let producer = &producer;
        async move {
            doc["__op"] = json!(op);
            doc["__source_ts_ms"] = json!(ts);
            doc["__deleted"] = json!("false");
            producer
                .send(topic, user.as_bytes(), doc.to_string().as_bytes(), &[])
                .await
                .unwrap_or_else(|err| panic!("produce to {topic}: {err}"));
        }
    };

    let now = 1_780_000_000_000_i64;
    produce(
        "purchases.changes",
        dave,
        "c",
        now,
        json!({"_id": "pur-1", "purchase_id": "pur-1", "user_id": dave, "status": "paid",
               "amount_minor": 4599, "currency": "EUR", "updated_at": now}),
    )
    .await;
    produce(
        "payments.changes",
        erin,
        "c",
        now,
        json!({"_id": "pay-1", "payment_id": "pay-1", "user_id": erin, "status": "overdue",
               "amount_minor": 1250, "currency": "USD", "due_date": now - 86_400_000}),
    )
    .await;
    produce(
        "shipments.changes",
        dave,
        "c",
        now,
        json!({"_id": "shp-1", "shipment_id": "shp-1", "user_id": dave, "purchase_id": "pur-1",
               "status": "shipped", "carrier": "DHL", "tracking_number": "JD014600", "updated_at": now}),
    )
    .await;
    // A status change of the same shipment is a new notification.
    produce(
        "shipments.changes",
        dave,
        "u",
        now + 1000,
        json!({"_id": "shp-1", "shipment_id": "shp-1", "user_id": dave, "purchase_id": "pur-1",
               "status": "delivered", "carrier": "DHL", "tracking_number": "JD014600", "updated_at": now + 1000}),
    )
    .await;

    // The group joins from the beginning of the topics, so nothing produced before is missed.
    let mut daves = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while daves.len() < 3 && Instant::now() < deadline {
        if let Some(frame) = dave_notes.next_notification(Duration::from_secs(1)).await {
            daves.push(frame);
        }
    }
    let summary: Vec<(String, String)> = daves
        .iter()
        .map(|f| {
            // A shipment carries its purchase_id too: name each frame by its own document id.
            let id_field = if f["kind"] == "purchase" { "purchase_id" } else { "shipment_id" };
            let id = f["data"][id_field].as_str().unwrap_or_default();
            (
                f["kind"].as_str().unwrap_or_default().to_owned(),
                format!("{id}:{}", f["data"]["status"].as_str().unwrap_or("")),
            )
        })
        .collect();
    let expected = vec![
        ("purchase".to_owned(), "pur-1:paid".to_owned()),
        ("shipping".to_owned(), "shp-1:shipped".to_owned()),
        ("shipping".to_owned(), "shp-1:delivered".to_owned()),
    ];
    let mut sorted = summary.clone();
    sorted.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(sorted, expected_sorted, "dave's notifications: {daves:?}");
    let shipping: Vec<&(String, String)> = summary.iter().filter(|(k, _)| k == "shipping").collect();
    assert_eq!(shipping, vec![&expected[1], &expected[2]], "one shipment's updates arrive in order");
    for frame in &daves {
        assert_eq!(frame["data"]["user_id"], dave);
    }
    let purchase = daves.iter().find(|f| f["kind"] == "purchase").expect("purchase frame");
    assert_eq!(purchase["data"]["amount_minor"], 4599);
    assert_eq!(purchase["data"]["currency"], "EUR");

    let extra = dave_notes.collect(Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "each change notifies once: {extra:?}");

    let second_tab = dave_second_tab.collect(Duration::from_secs(2)).await;
    assert_eq!(second_tab.len(), 3, "every open connection of the user gets them: {second_tab:?}");

    let erins = erin_notes.collect(Duration::from_secs(3)).await;
    assert_eq!(erins.len(), 1, "erin: {erins:?}");
    assert_eq!(erins[0]["kind"], "payment_reminder");
    assert_eq!(erins[0]["data"]["payment_id"], "pay-1");
    assert_eq!(erins[0]["data"]["status"], "overdue");
    assert_eq!(erins[0]["data"]["currency"], "USD");
    assert_eq!(erins[0]["data"]["user_id"], erin);

    assert!(frank_notes.collect(Duration::from_millis(500)).await.is_empty(), "no one else is notified");
}
