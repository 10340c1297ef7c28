//! Domain events end to end on the local stack's own tools: a newcomer runs
//! `deploy/local/create-event.sh`, the outbox relay captures the document, the change
//! handler's domain pipeline forwards it, and the user's notification socket shows it.

use std::time::Duration;

use chatfleet_tests::{token, Service, Stack};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn next_notification(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    within: Duration,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                if frame["type"] == "notification" {
                    return Some(frame);
                }
            }
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

fn create_event(stack: &Stack, kind: &str, user: &str, status: &str) {
    let script = testkit::workspace_root().join("deploy/local/create-event.sh");
    let output = std::process::Command::new(&script)
        .args([kind, user, status])
        .env("MONGODB_URI", stack.mongo.uri())
        .output()
        .expect("create-event.sh runs");
    assert!(
        output.status.success(),
        "create-event.sh failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn documents_created_by_hand_become_notifications() {
    let stack = Stack::start();
    let mut env = stack.env();
    env.push(("CAPTURE_MODE".into(), "outbox".into()));
    let persistence = Service::start("chatpersistence", &env);
    let notifications = Service::start("generalnotificationshandler", &env);
    let mut handler_env = env.clone();
    handler_env.push(("NOTIFICATIONS_URL".into(), notifications.internal_url("")));
    handler_env.push(("CHAT_WEBSOCKET_URL".into(), "http://127.0.0.1:9".into()));
    handler_env.push(("KAFKA_GROUP_ID".into(), testkit::unique("chat")));
    let _handler = Service::start("chatpersistencechangehandler", &handler_env);

    let url = notifications.ws_url(&format!("/notifications/subscribe?user_id=dave&access_token={}", token("dave")));
    let (mut dave, _) = chatfleet_tests::ws_connect(url).await.expect("dave subscribes");
    let url = notifications.ws_url(&format!("/notifications/subscribe?user_id=erin&access_token={}", token("erin")));
    let (mut erin, _) = chatfleet_tests::ws_connect(url).await.expect("erin subscribes");

    for (kind, status, expected_kind) in [
        ("purchase", "paid", "purchase"),
        ("payment", "overdue", "payment_reminder"),
        ("shipment", "in_transit", "shipping"),
    ] {
        create_event(&stack, kind, "dave", status);
        // The first one waits for the consumer group to join and the relay's lease.
        let frame = next_notification(&mut dave, Duration::from_secs(45))
            .await
            .unwrap_or_else(|| panic!("dave got no {kind} notification; relay log:\n{}", persistence.log_tail(20)));
        assert_eq!(frame["kind"], expected_kind, "{frame}");
        assert_eq!(frame["data"]["user_id"], "dave");
        assert_eq!(frame["data"]["status"], status);
    }
    assert!(
        next_notification(&mut erin, Duration::from_secs(1)).await.is_none(),
        "erin is not notified of dave's events"
    );
    assert!(next_notification(&mut dave, Duration::from_secs(2)).await.is_none(), "each document notifies once");
}
