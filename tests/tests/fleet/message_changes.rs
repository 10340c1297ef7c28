//! Edits, deletions and reactions, black-box: the rules (who, when, how often) and
//! the delivery through capture to the open sockets.

use std::time::Duration;

use chatfleet_tests::client::{self, ChatSocket, Seen};
use chatfleet_tests::{token, ChatFleet};
use reqwest::Method;
use serde_json::{json, Value};

const ALICE: &str = "alice";
const BOB: &str = "bob";
const MALLORY: &str = "mallory";

async fn call(fleet: &ChatFleet, method: Method, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, fleet.persistence.url(path)).bearer_auth(token(user));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("chatpersistence answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn send(fleet: &ChatFleet, from: &str, to: &str, content: &str) -> String {
    let (status, body) = client::post(&fleet.persistence, from, to, content, None).await;
    assert_eq!(status, 201, "{body}");
    body["message_id"].as_str().expect("message_id").to_owned()
}

async fn stored(fleet: &ChatFleet, user: &str, peer: &str, id: &str) -> Value {
    client::history(&fleet.persistence, user, peer)
        .await
        .into_iter()
        .find(|m| m["message_id"] == id)
        .expect("the message is in history")
}

/// The next frame of `type_` within a few seconds (other frames are skipped).
async fn frame_of(socket: &mut ChatSocket, type_: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match socket.next(left).await {
            Seen::Frame(frame) if frame["type"] == type_ => return frame,
            Seen::Frame(_) => {}
            other => panic!("expected a {type_} frame, got {other:?}"),
        }
    }
}

fn start() -> ChatFleet {
    ChatFleet::start(&[("EDIT_WINDOW", "3s")])
}

#[tokio::test]
async fn only_the_sender_edits_within_the_window_and_everyone_sees_it_live() {
    let fleet = start();
    fleet.warm_up().await;
    let mut bobs = ChatSocket::connect(&fleet.sockets, BOB, ALICE, None).await;
    let id = send(&fleet, ALICE, BOB, "helo").await;
    assert_eq!(frame_of(&mut bobs, "message").await["message"]["content"], "helo");

    // Strangers get 404 (like a message that does not exist); the receiver 403.
    let path = format!("/chat/messages/{id}");
    let (status, body) = call(&fleet, Method::PATCH, &path, MALLORY, Some(json!({"content": "pwned"}))).await;
    assert_eq!((status, body["error"]["code"].clone()), (404, json!("not_found")), "{body}");
    let (status, _) = call(&fleet, Method::PATCH, &path, BOB, Some(json!({"content": "mine now"}))).await;
    assert_eq!(status, 403);
    let (status, _) = call(&fleet, Method::PATCH, &path, ALICE, Some(json!({"content": " "}))).await;
    assert_eq!(status, 400, "content rules as on POST");

    let (status, edited) = call(&fleet, Method::PATCH, &path, ALICE, Some(json!({"content": "hello"}))).await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!((edited["content"].clone(), edited["version"].clone()), (json!("hello"), json!(1)));
    assert!(edited["edited_at"].is_string(), "{edited}");
    // Live, through capture.
    let frame = frame_of(&mut bobs, "message_updated").await;
    assert_eq!(frame["message"]["content"], "hello");
    // A retried edit changes nothing twice.
    let (status, again) = call(&fleet, Method::PATCH, &path, ALICE, Some(json!({"content": "hello"}))).await;
    assert_eq!((status, again["version"].clone()), (200, json!(1)));
    // History shows the edit.
    let in_history = stored(&fleet, BOB, ALICE, &id).await;
    assert_eq!((in_history["content"].clone(), in_history["version"].clone()), (json!("hello"), json!(1)));
    assert!(in_history["edited_at"].is_string());

    // After the window (3 s here) no more edits.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (status, body) = call(&fleet, Method::PATCH, &path, ALICE, Some(json!({"content": "too late"}))).await;
    assert_eq!((status, body["error"]["code"].clone()), (403, json!("edit_window_passed")), "{body}");
    assert_eq!(stored(&fleet, ALICE, BOB, &id).await["content"], "hello");
}

#[tokio::test]
async fn a_deletion_leaves_a_tombstone_once_and_wins_over_edits() {
    let fleet = start();
    fleet.warm_up().await;
    let mut bobs = ChatSocket::connect(&fleet.sockets, BOB, ALICE, None).await;
    let id = send(&fleet, ALICE, BOB, "oops, secret").await;
    frame_of(&mut bobs, "message").await;
    let path = format!("/chat/messages/{id}");
    let (status, _) = call(&fleet, Method::DELETE, &path, BOB, None).await;
    assert_eq!(status, 403, "in a pair only the sender deletes");
    let (status, _) = call(&fleet, Method::DELETE, &path, MALLORY, None).await;
    assert_eq!(status, 404);
    let (status, _) = call(&fleet, Method::PUT, &format!("{path}/reactions/👍"), BOB, None).await;
    assert_eq!(status, 204);

    let (status, _) = call(&fleet, Method::DELETE, &path, ALICE, None).await;
    assert_eq!(status, 204);
    let frame = frame_of(&mut bobs, "message_deleted").await;
    assert_eq!(frame["message"]["content"], "", "the content is gone from the frame: {frame}");
    let tombstone = stored(&fleet, BOB, ALICE, &id).await;
    assert_eq!(tombstone["content"], "", "{tombstone}");
    assert!(tombstone["deleted_at"].is_string() && tombstone.get("reactions").is_none(), "{tombstone}");
    let version = tombstone["version"].clone();
    // Idempotent; an edit after the deletion is refused; reactions too.
    let (status, _) = call(&fleet, Method::DELETE, &path, ALICE, None).await;
    assert_eq!(status, 204);
    assert_eq!(stored(&fleet, BOB, ALICE, &id).await["version"], version, "deleted once");
    let (status, body) = call(&fleet, Method::PATCH, &path, ALICE, Some(json!({"content": "back"}))).await;
    assert_eq!((status, body["error"]["code"].clone()), (409, json!("message_deleted")));
    let (status, _) = call(&fleet, Method::PUT, &format!("{path}/reactions/🎉"), BOB, None).await;
    assert_eq!(status, 409);
    // Nothing more reaches the socket about it.
    assert!(matches!(bobs.next(Duration::from_millis(800)).await, Seen::Nothing));
}

#[tokio::test]
async fn reactions_count_once_per_user_and_reach_the_sockets() {
    let fleet = start();
    fleet.warm_up().await;
    let mut alices = ChatSocket::connect(&fleet.sockets, ALICE, BOB, None).await;
    let id = send(&fleet, ALICE, BOB, "ship it?").await;
    frame_of(&mut alices, "message").await;
    let path = format!("/chat/messages/{id}/reactions");
    for _ in 0..3 {
        let (status, _) = call(&fleet, Method::PUT, &format!("{path}/👍"), BOB, None).await;
        assert_eq!(status, 204);
    }
    let frame = frame_of(&mut alices, "reaction_added").await;
    assert_eq!((frame["user_id"].clone(), frame["emoji"].clone()), (json!(BOB), json!("👍")), "{frame}");
    assert_eq!(frame["message_id"], json!(id));
    match alices.next(Duration::from_millis(600)).await {
        Seen::Nothing => {}
        other => panic!("three PUTs, one frame; then {other:?}"),
    }
    let (status, _) = call(&fleet, Method::PUT, &format!("{path}/👍"), ALICE, None).await;
    assert_eq!(status, 204);
    assert_eq!(stored(&fleet, ALICE, BOB, &id).await["reactions"], json!({"👍": 2}));
    let (status, _) = call(&fleet, Method::DELETE, &format!("{path}/👍"), BOB, None).await;
    assert_eq!(status, 204);
    assert_eq!(stored(&fleet, ALICE, BOB, &id).await["reactions"], json!({"👍": 1}));
    // Outside the allowed set, or from a stranger.
    let (status, body) = call(&fleet, Method::PUT, &format!("{path}/%F0%9F%A6%84"), BOB, None).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = call(&fleet, Method::PUT, &format!("{path}/👍"), MALLORY, None).await;
    assert_eq!(status, 404);
    assert_eq!(stored(&fleet, ALICE, BOB, &id).await["reactions"], json!({"👍": 1}));
}

#[tokio::test]
async fn in_a_group_the_owner_may_delete_any_message_and_members_only_their_own() {
    let fleet = start();
    let (status, group) = call(
        &fleet,
        Method::POST,
        "/chat/conversations",
        "owner1",
        Some(json!({"title": "mods", "members": ["m1", "m2"]})),
    )
    .await;
    assert_eq!(status, 201, "{group}");
    let group = group["conversation_id"].as_str().expect("id").to_owned();
    let post = |from: &'static str| {
        let group = group.clone();
        let fleet = &fleet;
        async move {
            let (status, body) = call(
                fleet,
                Method::POST,
                "/chat/messages",
                from,
                Some(json!({"sender_id": from, "conversation_id": group, "content": format!("from {from}")})),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            body["message_id"].as_str().expect("id").to_owned()
        }
    };
    let by_m1 = post("m1").await;
    let by_m2 = post("m2").await;
    let (status, _) = call(&fleet, Method::DELETE, &format!("/chat/messages/{by_m1}"), "m2", None).await;
    assert_eq!(status, 403, "a member deletes only their own");
    let (status, _) = call(&fleet, Method::DELETE, &format!("/chat/messages/{by_m1}"), "owner1", None).await;
    assert_eq!(status, 204, "the owner moderates");
    let (status, _) = call(&fleet, Method::DELETE, &format!("/chat/messages/{by_m2}"), "m2", None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&fleet, Method::DELETE, &format!("/chat/messages/{by_m2}"), "outsider", None).await;
    assert_eq!(status, 404);
    let (status, page) =
        call(&fleet, Method::GET, &format!("/chat/messages?conversation_id={group}"), "m1", None).await;
    assert_eq!(status, 200);
    let contents: Vec<&str> =
        page["messages"].as_array().expect("messages").iter().map(|m| m["content"].as_str().unwrap_or("?")).collect();
    assert_eq!(contents, ["", ""], "{page}");
}

/// The inbox entry of the conversation with `peer`, as `user`'s list shows it.
async fn inbox_last(fleet: &ChatFleet, user: &str, peer: &str) -> Value {
    let (status, body) = call(fleet, Method::GET, "/chat/conversations", user, None).await;
    assert_eq!(status, 200, "{body}");
    let entry = body["conversations"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["peer_id"] == peer))
        .unwrap_or_else(|| panic!("{user}'s list has the conversation with {peer}: {body}"));
    entry["last_message"].clone()
}

#[tokio::test]
async fn the_inbox_shows_an_edit_and_never_a_deleted_message_s_text() {
    let fleet = start();
    fleet.warm_up().await;
    let first = send(&fleet, ALICE, BOB, "first words").await;
    let last = send(&fleet, ALICE, BOB, "my card number is 1234").await;
    let path = format!("/chat/messages/{last}");
    let (status, _) =
        call(&fleet, Method::PATCH, &path, ALICE, Some(json!({"content": "my card number is ***"}))).await;
    assert_eq!(status, 200);
    let shown = inbox_last(&fleet, BOB, ALICE).await;
    assert_eq!(
        (shown["message_id"].as_str(), shown["excerpt"].as_str()),
        (Some(last.as_str()), Some("my card number is ***"))
    );

    let (status, _) = call(&fleet, Method::DELETE, &path, ALICE, None).await;
    assert_eq!(status, 204);
    for user in [ALICE, BOB] {
        let peer = if user == ALICE { BOB } else { ALICE };
        let shown = inbox_last(&fleet, user, peer).await;
        assert_eq!(shown["excerpt"], "", "{user}'s inbox still shows the deleted text: {shown}");
        assert!(shown["deleted_at"].is_i64(), "{shown}");
    }
    // Deleting an older message leaves the newer last message alone.
    let newest = send(&fleet, BOB, ALICE, "still here").await;
    let (status, _) = call(&fleet, Method::DELETE, &format!("/chat/messages/{first}"), ALICE, None).await;
    assert_eq!(status, 204);
    let shown = inbox_last(&fleet, ALICE, BOB).await;
    assert_eq!((shown["message_id"].as_str(), shown["excerpt"].as_str()), (Some(newest.as_str()), Some("still here")));
}
