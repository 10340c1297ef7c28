//! chatpersistencechangehandler gives up per target: failover (closing the stream's
//! chat sockets with 4000 resync) is only for the chat socket target; a notification
//! service that keeps failing is dead-lettered and counted, and never closes anyone's
//! chat sockets. And the handler does not start without a usable service token.
//!
//! Real binaries (chatpersistence with its outbox relay, chatwebsocketshandler,
//! chatpersistencechangehandler in its default configuration, strategy 1) against real
//! Redis, broker and MongoDB wire server. The notification service is a stand-in that
//! answers every call with a chosen status, so its failure is certain and repeatable.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use chatfleet_tests::client::{self, ChatSocket, Seen};
use chatfleet_tests::{Service, Stack};

const A: &str = "alice";
const B: &str = "bob";

/// A notification service that answers every request with `status` and counts them.
struct BrokenNotifications {
    url: String,
    status: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
}

impl BrokenNotifications {
    async fn start(status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stand-in");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let status = Arc::new(AtomicU16::new(status));
        let calls = Arc::new(AtomicUsize::new(0));
        let (answer, count) = (status.clone(), calls.clone());
        let app = Router::new().fallback(move || {
            let (answer, count) = (answer.clone(), count.clone());
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                let status = StatusCode::from_u16(answer.load(Ordering::SeqCst)).unwrap_or(StatusCode::BAD_GATEWAY);
                (status, r#"{"error":{"code":"broken","message":"stand-in"}}"#)
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, status, calls }
    }

    fn answer_with(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// chatpersistence, the socket pod and the change handler in its default configuration
/// (strategy 1: one pipeline calling the sockets and the notifications concurrently),
/// with a small retry budget so give-ups happen within a second.
struct Fleet {
    _stack: Stack,
    persistence: Service,
    sockets: Service,
    handler: Service,
}

impl Fleet {
    fn start(notifications_url: &str) -> Self {
        let stack = Stack::start();
        let mut base = stack.pipeline_env();
        for (k, v) in
            [("MESSAGE_RETRY_MAX_RETRIES", "2"), ("MESSAGE_RETRY_MAX_INTERVAL", "200ms"), ("FORWARD_TIMEOUT", "500ms")]
        {
            base.push((k.to_owned(), v.to_owned()));
        }
        let persistence = Service::start("chatpersistence", &base);
        let mut socket_env = base.clone();
        socket_env.push(("CHATPERSISTENCE_INTERNAL_URL".into(), persistence.internal_url("")));
        let sockets = Service::start("chatwebsocketshandler", &socket_env);
        let mut handler_env = base;
        handler_env.push(("KAFKA_GROUP_ID".into(), testkit::unique("chat-ws")));
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), sockets.internal_url("")));
        handler_env.push(("NOTIFICATIONS_URL".into(), notifications_url.to_owned()));
        let handler = Service::start("chatpersistencechangehandler", &handler_env);
        Self { _stack: stack, persistence, sockets, handler }
    }

    /// Waits until a posted message reaches a chat socket (the group has joined).
    async fn warm_up(&self) {
        let (a, b) = ("warmup-a", "warmup-b");
        let mut socket = ChatSocket::connect(&self.sockets, b, a, None).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut posted = Vec::new();
        loop {
            let (status, body) = client::post(&self.persistence, a, b, "warm-up", None).await;
            if status == 201 {
                posted.push(body["message_id"].as_str().unwrap_or_default().to_owned());
                let (seen, _) = socket.collect_messages(Duration::from_secs(5)).await;
                if seen.iter().any(|id| posted.contains(id)) {
                    socket.close().await;
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the pipeline did not warm up within 60 s");
        }
    }

    async fn post(&self, from: &str, to: &str, content: &str) -> String {
        let (status, body) = client::post(&self.persistence, from, to, content, None).await;
        assert_eq!(status, 201, "POST answered {status}: {body}");
        body["message_id"].as_str().expect("message_id").to_owned()
    }

    /// The handler's counter `name` summed over the series whose labels include all of `labels`.
    async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.handler.counter(name, labels).await
    }

    /// Waits up to `within` until `counter(name, labels) >= at_least`; returns the last value.
    async fn counter_reaches(&self, name: &str, labels: &[(&str, &str)], at_least: f64, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let value = self.counter(name, labels).await;
            if value >= at_least || Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The next `message` frame's id within `timeout`; panics if the socket closes.
async fn next_message(socket: &mut ChatSocket, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match socket.next(left).await {
            Seen::Frame(frame) if frame["type"] == "message" => {
                return frame["message"]["message_id"].as_str().map(str::to_owned)
            }
            Seen::Frame(_) => continue,
            Seen::Closed(code) => panic!("the chat socket was closed ({code:?}) although only notifications failed"),
            Seen::Nothing => return None,
        }
    }
}

/// Strategy 1 with a notification service that always fails — first with `500`
/// (retried until the budget runs out), then with `401` (given up on at once): the
/// chat socket gets every message, stays open and keeps receiving; each notification
/// give-up is counted under its target and logged; nothing fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_notification_target_never_closes_the_chat_sockets() {
    let notifications = BrokenNotifications::start(500).await;
    let fleet = Fleet::start(&notifications.url);
    fleet.warm_up().await;
    let mut bob = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let mut alice = ChatSocket::connect(&fleet.sockets, A, B, None).await;
    let given_up = [("pipeline", "chat"), ("target", "chat_notification"), ("action", "dead_letter")];

    for (status, kind) in [(500, "retryable-exhausted"), (401, "permanent")] {
        notifications.answer_with(status);
        let before = fleet.counter("changes_given_up_total", &given_up).await;
        let calls_before = notifications.calls();
        let mut sent = Vec::new();
        for i in 0..3 {
            let id = fleet.post(A, B, &format!("notifications answer {status}: {i}")).await;
            assert_eq!(next_message(&mut bob, Duration::from_secs(3)).await, Some(id.clone()), "bob, {status} #{i}");
            assert_eq!(
                next_message(&mut alice, Duration::from_secs(3)).await,
                Some(id.clone()),
                "alice, {status} #{i}"
            );
            sent.push(id);
        }
        let counted =
            fleet.counter_reaches("changes_given_up_total", &given_up, before + 3.0, Duration::from_secs(15)).await;
        assert!(counted >= before + 3.0, "{status}: every notification give-up is counted ({before} → {counted})");
        let with_kind = [given_up[0], given_up[1], given_up[2], ("kind", kind)];
        assert!(fleet.counter("changes_given_up_total", &with_kind).await >= 3.0, "{status}: counted as {kind}");
        assert!(notifications.calls() > calls_before, "{status}: the notification service was called");

        // The retries re-send to the socket pod; the open sockets never show a repeat,
        // and they are still open.
        for (who, socket) in [("bob", &mut bob), ("alice", &mut alice)] {
            let (extra, closed) = socket.collect_messages(Duration::from_millis(700)).await;
            assert_eq!(closed, None, "{who}'s socket stays open while notifications answer {status}");
            assert!(extra.is_empty(), "{who} saw repeats: {extra:?}");
        }
    }

    assert_eq!(fleet.counter("failovers_total", &[]).await, 0.0, "nothing failed over");
    assert_eq!(
        fleet.counter("changes_given_up_total", &[("target", "chat_websocket")]).await,
        0.0,
        "the socket target never gave up"
    );
    let log = fleet.handler.log_tail(400);
    assert!(
        log.contains("giving up on this change for this target") && log.contains("chat_notification"),
        "the give-up is logged with its target:\n{log}"
    );
    assert!(!log.contains("closing the stream's sockets"), "no failover was logged:\n{log}");

    // A later message still flows straight to the same, still open sockets.
    let later = fleet.post(A, B, "still flowing").await;
    assert_eq!(next_message(&mut bob, Duration::from_secs(3)).await, Some(later));
}

/// Both targets exhausted on one change (the socket pod hangs, the notification
/// service answers `500`): the chat target still fails over — the stream's socket is
/// closed with 4000 (resync) — and the notification target is dead-lettered on its
/// own; the change is committed and later messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_chat_target_still_fails_over_with_resync() {
    let notifications = BrokenNotifications::start(500).await;
    let fleet = Fleet::start(&notifications.url);
    fleet.warm_up().await;
    let mut bob = ChatSocket::connect(&fleet.sockets, B, A, None).await;

    fleet.sockets.signal("STOP");
    let lost_in_realtime = fleet.post(A, B, "sent while the pod hangs").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.sockets.signal("CONT");

    let mut closed_with = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        match bob.next(Duration::from_secs(1)).await {
            Seen::Closed(code) => {
                closed_with = code;
                break;
            }
            Seen::Frame(_) | Seen::Nothing => continue,
        }
    }
    assert_eq!(closed_with, Some(4000), "the stream's socket is closed with the resync code");
    let closed = fleet
        .counter_reaches("failovers_total", &[("pipeline", "chat"), ("outcome", "closed")], 1.0, Duration::from_secs(5))
        .await;
    assert!(closed >= 1.0, "the failover is counted");
    let chat_given_up = [("target", "chat_websocket"), ("action", "failover")];
    assert!(fleet.counter("changes_given_up_total", &chat_given_up).await >= 1.0);
    let note_given_up = [("target", "chat_notification"), ("action", "dead_letter")];
    assert!(fleet.counter("changes_given_up_total", &note_given_up).await >= 1.0);

    let history = client::history(&fleet.persistence, B, A).await;
    assert!(history.iter().any(|m| m["message_id"].as_str() == Some(lost_in_realtime.as_str())), "history has it");
    let mut bob = ChatSocket::connect(&fleet.sockets, B, A, None).await;
    let later = fleet.post(A, B, "after failover").await;
    let (seen, _) = bob.collect_messages(Duration::from_secs(5)).await;
    assert!(seen.contains(&later), "later messages flow: {seen:?}");
}

/// Runs the handler binary with `token` as `INTERNAL_SERVICE_TOKEN` (nothing else it
/// could connect to); returns exit success and everything it printed.
fn start_with_token(token: Option<&str>) -> (bool, String) {
    let mut command = chatfleet_tests::unconnected_handler();
    if let Some(token) = token {
        command.env("INTERNAL_SERVICE_TOKEN", token);
    }
    chatfleet_tests::run_to_exit(command, &format!("the handler with INTERNAL_SERVICE_TOKEN={token:?}"))
}

/// Without a service token every forward would be a permanent `401`, silently
/// dead-lettered: the handler refuses to start instead, exits non-zero and says why —
/// before it connects to anything.
#[test]
fn a_missing_or_short_service_token_stops_the_start() {
    for (token, expected) in [
        (None, "INTERNAL_SERVICE_TOKEN is not set"),
        (Some(""), "INTERNAL_SERVICE_TOKEN is not set"),
        (Some("too-short-token"), "INTERNAL_SERVICE_TOKEN is 15 bytes long; it must be at least 32 bytes"),
    ] {
        let (ok, output) = start_with_token(token);
        assert!(!ok, "the handler must refuse to start with INTERNAL_SERVICE_TOKEN={token:?}; output:\n{output}");
        assert!(output.contains(expected), "missing {expected:?} for {token:?} in:\n{output}");
        assert!(!output.contains("too-short-token"), "the token itself is never printed:\n{output}");
    }
}
