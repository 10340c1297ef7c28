//! Live chat interactions, black-box against the real binaries: typing indicators
//! (relayed by the socket pod, rate-limited, stopping by `stop`, by expiry and by a
//! closed socket), edits and deletions seen live and after a reconnect with `since`,
//! and presence in conversations (only to people who share one; no flap on a quick
//! reconnect).

use std::time::Duration;

use chatfleet_tests::client::{self, stream_id};
use chatfleet_tests::{token, ChatFleet};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(8);

fn start() -> ChatFleet {
    ChatFleet::start(&[("TYPING_TIMEOUT", "1500ms"), ("TYPING_MIN_INTERVAL", "2s"), ("PRESENCE_GRACE", "2s")])
}

async fn call(fleet: &ChatFleet, method: Method, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
    for _ in 0..100 {
        let mut request =
            reqwest::Client::new().request(method.clone(), fleet.persistence.url(path)).bearer_auth(token(user));
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send().await.expect("chatpersistence answers");
        let status = response.status().as_u16();
        if status == 429 || status == 503 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return (status, response.json().await.unwrap_or(Value::Null));
    }
    panic!("{method} {path} kept answering 429/503");
}

async fn send(fleet: &ChatFleet, from: &str, to: &str, content: &str) -> String {
    let (status, body) = client::post(&fleet.persistence, from, to, content, None).await;
    assert_eq!(status, 201, "{body}");
    body["message_id"].as_str().expect("message_id").to_owned()
}

/// A pair socket of `user` with `peer`.
async fn pair(fleet: &ChatFleet, user: &str, peer: &str, since: Option<&str>, presence: bool) -> Ws {
    let mut path = format!(
        "/chat/subscribe?stream_id={}&sender_id={user}&receiver_id={peer}&access_token={}",
        stream_id(user, peer),
        token(user)
    );
    if let Some(since) = since {
        path.push_str(&format!("&since={since}"));
    }
    if presence {
        path.push_str("&presence=true");
    }
    chatfleet_tests::ws_connect(fleet.sockets.ws_url(&path)).await.expect("subscribe upgrades").0
}

/// A group socket of `user`.
async fn group(fleet: &ChatFleet, user: &str, conversation: &str, presence: bool) -> Ws {
    let mut path = format!("/chat/subscribe?conversation_id={conversation}&access_token={}", token(user));
    if presence {
        path.push_str("&presence=true");
    }
    chatfleet_tests::ws_connect(fleet.sockets.ws_url(&path)).await.expect("subscribe upgrades").0
}

async fn typing(ws: &mut Ws, state: &str) {
    let frame = json!({"type": "typing", "state": state}).to_string();
    ws.send(Message::text(frame)).await.expect("sent");
}

/// The frames of `types` that arrive within `window` (others are skipped).
async fn frames_of(ws: &mut Ws, types: &[&str], window: Duration) -> Vec<Value> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) | Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return out,
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).expect("frames are JSON");
                if types.iter().any(|t| frame["type"] == *t) {
                    out.push(frame);
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// The next frame of `type_` (others skipped), within [`WAIT`].
async fn next_of(ws: &mut Ws, type_: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("no {type_} frame within {WAIT:?}"),
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).expect("frames are JSON");
                if frame["type"] == type_ {
                    return frame;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => panic!("closed ({frame:?}) while waiting for {type_}"),
            Ok(None) | Ok(Some(Err(_))) => panic!("socket ended while waiting for {type_}"),
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[tokio::test]
async fn typing_reaches_the_peer_not_the_sender_is_rate_limited_and_stops() {
    let fleet = start();
    let (alice, bob) = ("typ-alice", "typ-bob");
    let mut phone = pair(&fleet, alice, bob, None, false).await;
    let mut laptop = pair(&fleet, alice, bob, None, false).await;
    let mut bobs = pair(&fleet, bob, alice, None, false).await;
    // Someone else talking to bob: another conversation, sees none of it.
    let mut other = pair(&fleet, "typ-mallory", bob, None, false).await;

    // A start reaches bob, once however often it is repeated within 2 s.
    typing(&mut phone, "start").await;
    let start = next_of(&mut bobs, "typing").await;
    assert_eq!(
        start,
        json!({"type": "typing", "stream_id": stream_id(alice, bob), "user_id": alice, "state": "start"})
    );
    typing(&mut phone, "start").await;
    typing(&mut phone, "start").await;
    // An explicit stop.
    typing(&mut phone, "stop").await;
    let seen = frames_of(&mut bobs, &["typing"], Duration::from_millis(700)).await;
    assert_eq!(seen.iter().map(|f| f["state"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["stop"], "{seen:?}");

    // Within 2 s of the last forwarded start, a new start is dropped altogether.
    typing(&mut phone, "start").await;
    assert!(frames_of(&mut bobs, &["typing"], Duration::from_millis(500)).await.is_empty());

    // After the interval: a start, and a stop by itself after TYPING_TIMEOUT.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    typing(&mut phone, "start").await;
    let at = Instant::now();
    assert_eq!(next_of(&mut bobs, "typing").await["state"], "start");
    assert_eq!(next_of(&mut bobs, "typing").await["state"], "stop");
    let took = at.elapsed();
    assert!(took >= Duration::from_millis(1_200) && took < Duration::from_millis(3_500), "expired after {took:?}");

    // A socket that closes while typing stops its typing.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    typing(&mut laptop, "start").await;
    assert_eq!(next_of(&mut bobs, "typing").await["state"], "start");
    laptop.close(None).await.expect("closes");
    let stop = next_of(&mut bobs, "typing").await;
    assert_eq!((&stop["state"], &stop["user_id"]), (&json!("stop"), &json!(alice)));

    // Bob typing reaches alice's phone; none of alice's typing ever reached her own sockets.
    typing(&mut bobs, "start").await;
    let seen = frames_of(&mut phone, &["typing"], Duration::from_millis(700)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((&seen[0]["user_id"], &seen[0]["state"]), (&json!(bob), &json!("start")));
    assert!(frames_of(&mut other, &["typing"], Duration::from_millis(200)).await.is_empty(), "another conversation");

    // A malformed typing frame gets an error and the socket stays open.
    phone.send(Message::text(r#"{"type":"typing","state":"maybe"}"#)).await.expect("sent");
    let error = next_of(&mut phone, "error").await;
    assert_eq!(error["error"]["code"], "unsupported_frame");
    phone.send(Message::text(r#"{"type":"ping"}"#)).await.expect("sent");
    next_of(&mut phone, "pong").await;
}

#[tokio::test]
async fn edits_and_deletes_are_seen_live_and_after_a_reconnect_with_since() {
    let fleet = start();
    fleet.warm_up().await;
    let (alice, bob) = ("edit-alice", "edit-bob");
    let mut alices = pair(&fleet, alice, bob, None, false).await;
    let m0 = send(&fleet, alice, bob, "zero").await;
    let m1 = send(&fleet, alice, bob, "one").await;
    let m2 = send(&fleet, alice, bob, "two").await;

    // Bob reads up to m2 (replayed after m0), then goes away.
    let mut bobs = pair(&fleet, bob, alice, Some(&m0), false).await;
    let replayed = [next_of(&mut bobs, "message").await, next_of(&mut bobs, "message").await];
    assert_eq!(replayed.map(|f| f["message"]["message_id"].clone()), [json!(m1), json!(m2)]);
    bobs.close(None).await.expect("closes");
    for _ in 0..3 {
        next_of(&mut alices, "message").await;
    }

    // While he is away: m1 edited, m2 deleted, m3 posted. Alice's socket sees it live.
    let (status, body) =
        call(&fleet, Method::PATCH, &format!("/chat/messages/{m1}"), alice, Some(json!({"content": "one!"}))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&fleet, Method::DELETE, &format!("/chat/messages/{m2}"), alice, None).await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let updated = next_of(&mut alices, "message_updated").await;
    assert_eq!((&updated["message"]["message_id"], &updated["message"]["content"]), (&json!(m1), &json!("one!")));
    let deleted = next_of(&mut alices, "message_deleted").await;
    assert_eq!((&deleted["message"]["message_id"], &deleted["message"]["content"]), (&json!(m2), &json!("")));
    let m3 = send(&fleet, alice, bob, "three").await;
    next_of(&mut alices, "message").await;

    // Bob reconnects with his old since: m3, then the current state of m1 and m2.
    let mut bobs = pair(&fleet, bob, alice, Some(&m2), false).await;
    let frames =
        frames_of(&mut bobs, &["message", "message_updated", "message_deleted"], Duration::from_millis(2_500)).await;
    let summary: Vec<(String, String, String)> = frames
        .iter()
        .map(|f| {
            let m = &f["message"];
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (text(&f["type"]), text(&m["message_id"]), text(&m["content"]))
        })
        .collect();
    let row = |t: &str, id: &str, c: &str| (t.to_owned(), id.to_owned(), c.to_owned());
    assert_eq!(
        summary,
        [row("message", &m3, "three"), row("message_updated", &m1, "one!"), row("message_deleted", &m2, "")],
        "exactly once each, the new message first"
    );
    assert!(frames[1]["message"]["edited_at"].is_string(), "{}", frames[1]);
    assert!(frames[2]["message"]["deleted_at"].is_string(), "{}", frames[2]);

    // A reconnect without the changes in between (since = m3) replays nothing of them.
    bobs.close(None).await.expect("closes");
    let mut bobs = pair(&fleet, bob, alice, Some(&m3), false).await;
    let frames =
        frames_of(&mut bobs, &["message", "message_updated", "message_deleted"], Duration::from_millis(1_000)).await;
    assert!(frames.is_empty(), "{frames:?}");
}

#[tokio::test]
async fn presence_reaches_only_people_who_share_the_conversation_and_does_not_flap() {
    let fleet = start();
    let (alice, bob, carol) = ("pres-alice", "pres-bob", "pres-carol");
    let (status, body) = call(
        &fleet,
        Method::POST,
        "/chat/conversations",
        alice,
        Some(json!({"title": "presence", "members": [bob, carol]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let conversation = body["conversation_id"].as_str().expect("conversation_id").to_owned();

    // A stranger, on a conversation of their own, listening for presence.
    let mut stranger = pair(&fleet, "pres-dave", "pres-erin", None, true).await;

    let mut bobs = group(&fleet, bob, &conversation, true).await;
    let mut alices = group(&fleet, alice, &conversation, true).await;
    // Alice is told bob is here; bob is told alice came.
    let here = next_of(&mut alices, "presence").await;
    assert_eq!(here, json!({"type": "presence", "conversation_id": conversation, "user_id": bob, "online": true}));
    let came = next_of(&mut bobs, "presence").await;
    assert_eq!((&came["user_id"], &came["online"]), (&json!(alice), &json!(true)));

    // Carol's socket without presence=true still counts as online, gets no presence
    // frames, and sees group typing.
    let mut carols = group(&fleet, carol, &conversation, false).await;
    let came = next_of(&mut bobs, "presence").await;
    assert_eq!((&came["user_id"], &came["online"]), (&json!(carol), &json!(true)));
    typing(&mut alices, "start").await;
    let typed = next_of(&mut carols, "typing").await;
    assert_eq!(typed["conversation_id"], json!(conversation));
    assert_eq!(next_of(&mut bobs, "typing").await["user_id"], json!(alice));

    // Alice reconnects within the grace: no offline/online flap (her typing stops).
    alices.close(None).await.expect("closes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut alices = group(&fleet, alice, &conversation, true).await;
    let quiet = frames_of(&mut bobs, &["presence"], Duration::from_millis(3_000)).await;
    assert!(quiet.is_empty(), "no flap: {quiet:?}");

    // Carol leaves for good: offline after the grace, to bob and alice.
    let gone = Instant::now();
    carols.close(None).await.expect("closes");
    let off = next_of(&mut bobs, "presence").await;
    assert_eq!((&off["user_id"], &off["online"]), (&json!(carol), &json!(false)));
    assert!(gone.elapsed() >= Duration::from_millis(1_500), "after the grace: {:?}", gone.elapsed());
    let seen = frames_of(&mut alices, &["presence"], Duration::from_millis(500)).await;
    assert!(seen.iter().any(|f| f["user_id"] == carol && f["online"] == false), "{seen:?}");
    assert!(seen.iter().all(|f| f["user_id"] != alice), "never about herself: {seen:?}");

    // The stranger saw nothing of any of it.
    let nothing = frames_of(&mut stranger, &["presence", "typing"], Duration::from_millis(300)).await;
    assert!(nothing.is_empty(), "{nothing:?}");
}

/// `GET /presence` (chatpersistence, the public look-up) with a real notification
/// pod keeping the presence keys: a user learns whether the people they share a
/// conversation with are online; a stranger gets the same `403 not_a_contact`
/// whether the victim is online or not, and a removed member loses the answer.
#[tokio::test]
async fn presence_look_ups_answer_only_about_people_who_share_a_conversation() {
    let fleet = start();
    let notifications = chatfleet_tests::Service::start("generalnotificationshandler", &fleet.stack.env());
    let (alice, bob, carol, mallory) = ("look-alice", "look-bob", "look-carol", "look-mallory");
    let ask = |asker: &'static str, about: &'static str| {
        let fleet = &fleet;
        async move { call(fleet, Method::GET, &format!("/presence?user_id={about}"), asker, None).await }
    };

    // Bob opens a notification socket: he is online.
    let path = format!("/notifications/subscribe?user_id={bob}&access_token={}", token(bob));
    let (socket, _) = chatfleet_tests::ws_connect(notifications.ws_url(&path)).await.expect("bob subscribes");
    let deadline = Instant::now() + WAIT;
    // Alice and bob exchanged a message: she may ask.
    send(&fleet, alice, bob, "hi bob").await;
    loop {
        let (status, body) = ask(alice, bob).await;
        assert_eq!(status, 200, "{body}");
        if body == json!({"user_id": bob, "online": true}) {
            break;
        }
        assert!(Instant::now() < deadline, "bob never showed online: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anyone may ask about themselves; carol (no conversation with bob yet) may not.
    assert_eq!(ask(carol, carol).await, (200, json!({"user_id": carol, "online": false})));
    let (status, body) = ask(carol, bob).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("not_a_contact")), "{body}");

    // A group makes carol and bob share a conversation; mallory stays a stranger.
    let members = json!({"title": "lookups", "members": [bob, carol, mallory]});
    let (status, body) = call(&fleet, Method::POST, "/chat/conversations", alice, Some(members)).await;
    assert_eq!(status, 201, "{body}");
    let conversation = body["conversation_id"].as_str().expect("conversation_id").to_owned();
    assert_eq!(ask(carol, bob).await, (200, json!({"user_id": bob, "online": true})));
    assert_eq!(ask(mallory, bob).await.0, 200, "a member, for now");

    // Removed from the group, mallory gets the stranger's answer again: the same one
    // while bob is online and after he went offline.
    let path = format!("/chat/conversations/{conversation}/members/{mallory}");
    let (status, body) = call(&fleet, Method::DELETE, &path, alice, None).await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let online_answer = ask(mallory, bob).await;
    assert_eq!((online_answer.0, online_answer.1["error"]["code"].as_str()), (403, Some("not_a_contact")));
    drop(socket);
    let deadline = Instant::now() + WAIT;
    while ask(alice, bob).await.1["online"] != json!(false) {
        assert!(Instant::now() < deadline, "bob never went offline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let offline_answer = ask(mallory, bob).await;
    assert_eq!(online_answer, offline_answer, "no oracle: the stranger's answer does not change");

    // Bad requests.
    let (status, body) = ask(alice, "a%20b").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}");
    let response = reqwest::Client::new().get(fleet.persistence.url("/presence?user_id=x")).send().await.expect("ok");
    assert_eq!(response.status().as_u16(), 401);
}
