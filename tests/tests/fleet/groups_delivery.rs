//! Group conversations on the delivery side, end to end: chatpersistence (groups,
//! membership, read markers, the outbox relay) → chat.changes →
//! chatpersistencechangehandler → chatwebsocketshandler (group sockets) and
//! generalnotificationshandler (inbox updates). Real binaries and servers; nothing
//! mocked.
//!
//! What it shows: a group of five, every member subscribed, gets every message in
//! order exactly once; a removed member gets `member_left` and close 4004 and nothing
//! after; strangers and unknown groups get the same `403 not_a_member`; read frames
//! reach the other members and the reader's second device; conversation events reach
//! the notification sockets of the users they concern.

use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a test waits for something it expects to arrive.
const WAIT: Duration = Duration::from_secs(10);

/// The delivery fleet: chatpersistence, the chat socket pod, the notification pod
/// and a change handler forwarding to both.
struct Fleet {
    stack: Stack,
    persistence: Service,
    sockets: Service,
    notifications: Service,
    #[allow(dead_code)]
    handler: Service,
}

impl Fleet {
    fn start() -> Self {
        let stack = Stack::start();
        let mut base = stack.pipeline_env();
        base.push(("KAFKA_GROUP_ID".into(), testkit::unique("groups-ws")));
        let persistence = Service::start("chatpersistence", &base);
        let mut socket_env = base.clone();
        socket_env.push(("CHATPERSISTENCE_INTERNAL_URL".into(), persistence.internal_url("")));
        let sockets = Service::start("chatwebsocketshandler", &socket_env);
        let notifications = Service::start("generalnotificationshandler", &base);
        let mut handler_env = base;
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), sockets.internal_url("")));
        handler_env.push(("NOTIFICATIONS_URL".into(), notifications.internal_url("")));
        let handler = Service::start("chatpersistencechangehandler", &handler_env);
        Self { stack, persistence, sockets, notifications, handler }
    }

    /// A public API call as `user`: status and JSON body (`Null` when there is none).
    async fn call(&self, method: reqwest::Method, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
        for _ in 0..100 {
            let mut request = http().request(method.clone(), self.persistence.url(path)).bearer_auth(token(user));
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request.send().await.expect("chatpersistence answers");
            let status = response.status().as_u16();
            // Over the rate or a restarting dependency: nothing was written, try again.
            if status == 429 || status == 503 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let text = response.text().await.unwrap_or_default();
            return (status, serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        panic!("{method} {path} kept answering 429/503 for 10 s");
    }

    async fn create_group(&self, owner: &str, title: &str, members: &[&str]) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/chat/conversations",
                owner,
                Some(json!({"title": title, "members": members})),
            )
            .await;
        assert_eq!(status, 201, "create group: {body}; log:\n{}", self.persistence.log_tail(20));
        body["conversation_id"].as_str().expect("conversation_id").to_owned()
    }

    async fn post(&self, sender: &str, group: &str, content: &str) -> String {
        let body = json!({"sender_id": sender, "conversation_id": group, "content": content});
        let (status, body) = self.call(reqwest::Method::POST, "/chat/messages", sender, Some(body)).await;
        assert_eq!(status, 201, "post to the group: {body}");
        body["message_id"].as_str().expect("message_id").to_owned()
    }

    /// A group socket of `user` (`101`), or the refusal's status and body.
    async fn subscribe(&self, user: &str, group: &str) -> Result<Ws, (u16, Value)> {
        let path = format!("/chat/subscribe?conversation_id={group}&access_token={}", token(user));
        match chatfleet_tests::ws_connect(self.sockets.ws_url(&path)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(response)) => {
                let body = response.body().as_deref().and_then(|b| serde_json::from_slice(b).ok());
                Err((response.status().as_u16(), body.unwrap_or(Value::Null)))
            }
            Err(other) => panic!("subscribe failed: {other}"),
        }
    }

    async fn member_socket(&self, user: &str, group: &str) -> Ws {
        match self.subscribe(user, group).await {
            Ok(ws) => ws,
            Err((status, body)) => panic!("{user} could not subscribe to {group}: {status} {body}"),
        }
    }

    async fn notification_socket(&self, user: &str) -> Ws {
        let path = format!("/notifications/subscribe?user_id={user}&access_token={}", token(user));
        let (ws, _) = chatfleet_tests::ws_connect(self.notifications.ws_url(&path)).await.expect("notification socket");
        ws
    }

    /// Waits until a group message travels the whole pipeline (the consumer group
    /// joined, the relay holds its lease).
    async fn warm_up(&self) {
        let group = self.create_group("warm-a", "warm-up", &["warm-b"]).await;
        let mut socket = self.member_socket("warm-b", &group).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let id = self.post("warm-a", &group, "warm-up").await;
            let (seen, _) = messages(&mut socket, 1, Duration::from_secs(5)).await;
            if seen.contains(&id) {
                return;
            }
            assert!(Instant::now() < deadline, "the pipeline did not warm up within 60 s");
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

/// What a socket produced next.
#[derive(Debug)]
enum Got {
    Frame(Value),
    Close(Option<u16>),
    End,
    Nothing,
}

async fn next(ws: &mut Ws, within: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Got::Nothing,
            Ok(None) | Ok(Some(Err(_))) => return Got::End,
            Ok(Some(Ok(Message::Text(text)))) => {
                return Got::Frame(serde_json::from_str(text.as_str()).unwrap_or(Value::Null))
            }
            Ok(Some(Ok(Message::Close(frame)))) => return Got::Close(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Message ids of the `message` frames until `count` arrived or `within` passed
/// (other frames are skipped); the close code if the socket closed.
async fn messages(ws: &mut Ws, count: usize, within: Duration) -> (Vec<String>, Option<u16>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut ids = Vec::new();
    while ids.len() < count {
        match next(ws, deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            Got::Frame(frame) if frame["type"] == "message" => {
                ids.push(frame["message"]["message_id"].as_str().unwrap_or_default().to_owned())
            }
            Got::Frame(_) => {}
            Got::Close(code) => return (ids, code),
            Got::End => return (ids, Some(1006)),
            Got::Nothing => break,
        }
    }
    (ids, None)
}

/// The first frame of type `kind` matching `accept`, skipping others; panics if none
/// arrives within [`WAIT`] or the socket closes first.
async fn frame_of(ws: &mut Ws, who: &str, kind: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match next(ws, deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            Got::Frame(frame) if frame["type"] == kind && accept(&frame) => return frame,
            Got::Frame(_) => {}
            other => panic!("{who}: no {kind} frame within {WAIT:?}: {other:?}"),
        }
    }
}

/// Nothing but `member_joined` frames (creation events may still be in flight) for `quiet`.
async fn expect_no_messages(ws: &mut Ws, who: &str, quiet: Duration) {
    let (seen, close) = messages(ws, usize::MAX, quiet).await;
    assert!(seen.is_empty() && close.is_none(), "{who} got {seen:?}, close {close:?}");
}

/// 1. A group of five, every member subscribed: every message reaches every member
/// in order, exactly once.
#[tokio::test]
async fn a_group_of_five_gets_every_message_in_order_exactly_once() {
    let fleet = Fleet::start();
    fleet.warm_up().await;
    let members = ["ann", "ben", "cat", "dan", "eve"];
    let group = fleet.create_group("ann", "five", &members[1..]).await;
    let mut sockets = Vec::new();
    for member in members {
        sockets.push((member, fleet.member_socket(member, &group).await));
    }
    let mut sent = Vec::new();
    for i in 0..25 {
        let sender = members[i % members.len()];
        sent.push(fleet.post(sender, &group, &format!("message {i} from {sender}")).await);
    }
    for (member, socket) in &mut sockets {
        let (seen, close) = messages(socket, sent.len(), WAIT).await;
        assert_eq!(close, None, "{member}'s socket closed");
        assert_eq!(seen, sent, "{member} saw the messages out of order, twice or not at all");
        expect_no_messages(socket, member, Duration::from_millis(500)).await;
    }
}

/// 2. A member removed mid-stream gets `member_left`, then close 4004, and nothing
/// after; the others see the removal and keep receiving; the removed member cannot
/// subscribe again; a member added later receives from then on; the notification
/// sockets of everyone concerned get the conversation events.
#[tokio::test]
async fn a_removed_member_gets_member_left_then_4004_and_stops_receiving() {
    let fleet = Fleet::start();
    fleet.warm_up().await;
    let group = fleet.create_group("owner", "team", &["stay", "gone"]).await;
    let mut owner = fleet.member_socket("owner", &group).await;
    let mut stay = fleet.member_socket("stay", &group).await;
    let mut gone = fleet.member_socket("gone", &group).await;
    let mut gone_inbox = fleet.notification_socket("gone").await;
    let mut new_inbox = fleet.notification_socket("newbie").await;

    let first = fleet.post("owner", &group, "before the removal").await;
    for (who, socket) in [("owner", &mut owner), ("stay", &mut stay), ("gone", &mut gone)] {
        assert_eq!(messages(socket, 1, WAIT).await.0, vec![first.clone()], "{who}");
    }

    let (status, body) =
        fleet.call(reqwest::Method::DELETE, &format!("/chat/conversations/{group}/members/gone"), "owner", None).await;
    assert!(status == 200 || status == 204, "remove: {status} {body}");
    let after = fleet.post("stay", &group, "after the removal").await;

    // The removed member: member_left (about them), then 4004, nothing in between.
    let left = loop {
        match next(&mut gone, WAIT).await {
            Got::Frame(frame) if frame["type"] == "member_joined" => continue,
            Got::Frame(frame) => break frame,
            other => panic!("gone: expected member_left, got {other:?}"),
        }
    };
    assert_eq!(left["type"], "member_left", "{left}");
    assert_eq!(left["user_id"], "gone");
    assert_eq!(left["actor_id"], "owner");
    assert_eq!(left["reason"], "removed");
    assert!(!left["members"].as_array().expect("members").contains(&json!("gone")), "{left}");
    match next(&mut gone, WAIT).await {
        Got::Close(code) => assert_eq!(code, Some(4004), "the removed close code"),
        other => panic!("gone: expected close 4004 right after member_left, got {other:?}"),
    }

    for (who, socket) in [("owner", &mut owner), ("stay", &mut stay)] {
        let frame = frame_of(socket, who, "member_left", |_| true).await;
        assert_eq!(frame["user_id"], "gone", "{who}");
        assert_eq!(messages(socket, 1, WAIT).await.0, vec![after.clone()], "{who} keeps receiving");
    }

    // Subscribing again is refused like any stranger's.
    let refused = fleet.subscribe("gone", &group).await.expect_err("refused");
    assert_eq!(refused.0, 403);
    assert_eq!(refused.1["error"]["code"], "not_a_member");

    // Their inbox learns it; a member added later learns it too and receives from then on.
    let event =
        frame_of(&mut gone_inbox, "gone's inbox", "conversation_event", |f| f["event"]["type"] == "member_left").await;
    assert_eq!(event["event"]["conversation_id"], Value::from(group.clone()));
    let (status, body) = fleet
        .call(
            reqwest::Method::POST,
            &format!("/chat/conversations/{group}/members"),
            "owner",
            Some(json!({"user_id": "newbie"})),
        )
        .await;
    assert!(status == 200 || status == 201, "add: {status} {body}");
    let joined =
        frame_of(&mut new_inbox, "newbie's inbox", "conversation_event", |f| f["event"]["type"] == "member_joined")
            .await;
    assert_eq!(joined["event"]["user_id"], "newbie");
    let mut newbie = fleet.member_socket("newbie", &group).await;
    let welcome = fleet.post("owner", &group, "welcome").await;
    assert_eq!(messages(&mut newbie, 1, WAIT).await.0, vec![welcome]);
}

/// 3. A stranger and an unknown group get the same refusal: no oracle for group ids.
#[tokio::test]
async fn a_non_member_and_an_unknown_group_are_refused_alike() {
    let fleet = Fleet::start();
    let group = fleet.create_group("owner", "private", &["friend"]).await;
    let stranger = fleet.subscribe("stranger", &group).await.expect_err("a stranger is refused");
    let unknown_id = chatstream::StreamId::new_group().to_string();
    let unknown = fleet.subscribe("stranger", &unknown_id).await.expect_err("an unknown group is refused");
    assert_eq!(stranger.0, 403);
    assert_eq!(stranger, unknown, "the same status and body");
    assert_eq!(stranger.1["error"]["code"], "not_a_member");
    // A member is let in.
    let mut friend = fleet.member_socket("friend", &group).await;
    let _ = next(&mut friend, Duration::from_millis(100)).await;
}

/// 4. A read marker: the other members' sockets and the reader's other device get a
/// `read` frame; the reader's notification socket gets the event (its badge clears).
#[tokio::test]
async fn read_frames_reach_the_other_members_and_the_readers_second_device() {
    let fleet = Fleet::start();
    fleet.warm_up().await;
    let group = fleet.create_group("reader", "reads", &["writer", "third"]).await;
    let mut phone = fleet.member_socket("reader", &group).await;
    let mut laptop = fleet.member_socket("reader", &group).await;
    let mut writer = fleet.member_socket("writer", &group).await;
    let mut third = fleet.member_socket("third", &group).await;
    let mut inbox = fleet.notification_socket("reader").await;

    let id = fleet.post("writer", &group, "please read me").await;
    assert_eq!(messages(&mut phone, 1, WAIT).await.0, vec![id.clone()]);
    let (status, body) = fleet
        .call(reqwest::Method::POST, &format!("/chat/conversations/{group}/read"), "reader", Some(json!({"up_to": id})))
        .await;
    assert_eq!(status, 200, "read: {body}");

    for (who, socket) in
        [("laptop", &mut laptop), ("writer", &mut writer), ("third", &mut third), ("phone", &mut phone)]
    {
        let frame = frame_of(socket, who, "read", |_| true).await;
        assert_eq!(frame, json!({"type": "read", "conversation_id": group, "user_id": "reader", "up_to": id}), "{who}");
    }
    let event = frame_of(&mut inbox, "reader's inbox", "conversation_event", |f| f["event"]["type"] == "read").await;
    assert_eq!(event["event"]["up_to"], Value::from(id));
    assert_eq!(event["event"]["user_id"], "reader");
}

/// Stores a group the way chatpersistence does (its `conversations` document), so the
/// pods can be driven through their internal endpoints with the real members endpoint.
async fn store_group(fleet: &Fleet, members: &[&str]) -> String {
    let group = chatstream::StreamId::new_group().to_string();
    let client = mongodb::Client::with_uri_str(fleet.stack.mongo.uri()).await.expect("mongo client");
    let document = mongodb::bson::doc! {
        "_id": group.clone(), "kind": "group", "title": "pods", "owner_id": members[0],
        "members": members.to_vec(), "seq": 0_i64, "created_at": 0_i64, "updated_at": 0_i64,
    };
    client.database("chat").collection("conversations").insert_one(document).await.expect("insert group");
    group
}

/// POSTs an internal call with the service token; returns the status.
async fn internal(service: &Service, path: &str, body: &Value) -> u16 {
    http()
        .post(service.internal_url(path))
        .bearer_auth(chatfleet_tests::SERVICE_TOKEN)
        .json(body)
        .send()
        .await
        .expect("internal call")
        .status()
        .as_u16()
}

/// 5. The pods on their own, driven the way the change handler drives them: group
/// sockets admitted by the real members endpoint; a `member_left` forward sends the
/// frame to everyone and then 4004 to the removed member only, and a retry repeats
/// neither; a `read` forward reaches every member socket; a conversation notification
/// reaches the user's notification socket once, and is refused for a user it does
/// not concern.
#[tokio::test]
async fn the_pods_deliver_conversation_events_from_their_internal_endpoints() {
    let fleet = Fleet::start();
    let group = store_group(&fleet, &["ann", "ben", "cat"]).await;
    let mut ann = fleet.member_socket("ann", &group).await;
    let mut ben = fleet.member_socket("ben", &group).await;
    let mut cat = fleet.member_socket("cat", &group).await;
    let refused = fleet.subscribe("zed", &group).await.expect_err("a stranger is refused");
    assert_eq!((refused.0, refused.1["error"]["code"].clone()), (403, json!("not_a_member")));

    let left = json!({"event_id": "0195c1a4-0000-7000-8000-0000000000a1", "type": "member_left",
        "conversation_id": group, "user_id": "cat", "actor_id": "ann", "members": ["ann", "ben"],
        "reason": "removed", "at": "2026-01-01T00:00:00Z"});
    let path = format!("/chat/forward-event?stream_id={group}");
    assert_eq!(internal(&fleet.sockets, &path, &left).await, 200);
    assert_eq!(internal(&fleet.sockets, &path, &left).await, 200, "a retry");
    let frame = frame_of(&mut cat, "cat", "member_left", |_| true).await;
    assert_eq!(
        frame,
        json!({"type": "member_left", "conversation_id": group, "user_id": "cat", "actor_id": "ann",
            "members": ["ann", "ben"], "reason": "removed"})
    );
    match next(&mut cat, WAIT).await {
        Got::Close(code) => assert_eq!(code, Some(4004)),
        other => panic!("cat: expected close 4004, got {other:?}"),
    }
    for (who, socket) in [("ann", &mut ann), ("ben", &mut ben)] {
        assert_eq!(frame_of(socket, who, "member_left", |_| true).await, frame, "{who}");
    }

    let read = json!({"event_id": "0195c1a4-0000-7000-8000-0000000000a2", "type": "read",
        "conversation_id": group, "user_id": "ann", "actor_id": "ann", "members": ["ann", "ben"],
        "up_to": "0195c1a4-0000-7000-8000-000000000001", "at": "2026-01-01T00:00:01Z"});
    assert_eq!(internal(&fleet.sockets, &path, &read).await, 200);
    let mut ann_laptop = fleet.member_socket("ann", &group).await;
    let read2 = json!({"event_id": "0195c1a4-0000-7000-8000-0000000000a3", "up_to": "0195c1a4-0000-7000-8000-000000000002",
        "type": "read", "conversation_id": group, "user_id": "ann", "actor_id": "ann", "members": ["ann", "ben"],
        "at": "2026-01-01T00:00:02Z"});
    assert_eq!(internal(&fleet.sockets, &path, &read2).await, 200);
    for (who, socket) in [("ann", &mut ann), ("ben", &mut ben)] {
        let frame = frame_of(socket, who, "read", |_| true).await;
        assert_eq!(frame["up_to"], "0195c1a4-0000-7000-8000-000000000001", "{who}");
        let frame = frame_of(socket, who, "read", |_| true).await;
        assert_eq!(frame["up_to"], "0195c1a4-0000-7000-8000-000000000002", "{who}");
    }
    let frame = frame_of(&mut ann_laptop, "ann's laptop", "read", |_| true).await;
    assert_eq!(frame["up_to"], "0195c1a4-0000-7000-8000-000000000002");

    let mut inbox = fleet.notification_socket("cat").await;
    let notify = "/notifications/conversation?user_id=cat";
    assert_eq!(internal(&fleet.notifications, notify, &json!({"event": left})).await, 200);
    assert_eq!(internal(&fleet.notifications, notify, &json!({"event": left})).await, 200, "a retry");
    let event = frame_of(&mut inbox, "cat's inbox", "conversation_event", |_| true).await;
    assert_eq!(event["event"]["type"], "member_left");
    assert_eq!(event["event"]["user_id"], "cat");
    match next(&mut inbox, Duration::from_millis(500)).await {
        Got::Nothing => {}
        other => panic!("cat's inbox got the retry too: {other:?}"),
    }
    let stranger = "/notifications/conversation?user_id=zed";
    assert_eq!(internal(&fleet.notifications, stranger, &json!({"event": left})).await, 400);
    let not_the_reader = "/notifications/conversation?user_id=ben";
    assert_eq!(internal(&fleet.notifications, not_the_reader, &json!({"event": read})).await, 400);
}
