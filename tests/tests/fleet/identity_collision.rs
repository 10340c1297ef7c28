//! The reproduction, made into a test: under the seed's legacy stream id
//! format `("u4a888c", "zz4a888c")` and `("u4a888cz", "z4a888c")` hash to the same
//! id. Nothing of one pair's conversation may reach the other pair through the
//! sockets, the `since` replay or history; and under the default format the
//! stranger cannot even name the victims' conversation.

use std::time::Duration;

use chatfleet_tests::client::{self, ChatSocket, Seen};
use chatfleet_tests::{token, ChatFleet};
use chatstream::{StreamId, StreamIdFormat, UserId};
use serde_json::Value;

const VICTIM: &str = "u4a888c";
const VICTIM_PEER: &str = "zz4a888c";
const STRANGER: &str = "u4a888cz";
const STRANGER_PEER: &str = "z4a888c";

fn legacy(a: &str, b: &str) -> String {
    let (a, b) = (UserId::parse(a).expect("valid"), UserId::parse(b).expect("valid"));
    StreamId::for_pair_as(StreamIdFormat::Legacy, &a, &b).to_string()
}

async fn history(fleet: &ChatFleet, user: &str, query: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(fleet.persistence.url(&format!("/chat/messages?{query}")))
        .bearer_auth(token(user))
        .send()
        .await
        .expect("history answers");
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn get(fleet: &ChatFleet, user: &str, path: &str) -> (u16, Value) {
    let response =
        reqwest::Client::new().get(fleet.persistence.url(path)).bearer_auth(token(user)).send().await.expect("answers");
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn contents(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .map(|list| list.iter().map(|m| m["content"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

async fn post(fleet: &ChatFleet, from: &str, to: &str, content: &str) -> Value {
    let (status, body) = client::post(&fleet.persistence, from, to, content, None).await;
    assert_eq!(status, 201, "{from} → {to}: {body}");
    body
}

/// Every message frame's content seen within `window`.
async fn seen(socket: &mut ChatSocket, window: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match socket.next(left).await {
            Seen::Frame(frame) if frame["type"] == "message" => {
                out.push(frame["message"]["content"].as_str().unwrap_or_default().to_owned())
            }
            Seen::Frame(_) => {}
            Seen::Closed(code) => panic!("socket closed ({code:?}) while collecting"),
            Seen::Nothing => return out,
        }
    }
}

#[tokio::test]
async fn a_colliding_legacy_pair_sees_nothing_of_the_other_conversation() {
    let stream = legacy(VICTIM, VICTIM_PEER);
    assert_eq!(stream, legacy(STRANGER, STRANGER_PEER), "the seed's format collides for these pairs");

    let fleet = ChatFleet::start(&[("STREAM_ID_FORMAT", "legacy")]);
    fleet.warm_up().await;

    // Both pairs are legitimate conversations, on the same key of the same pod.
    let mut victim_socket = ChatSocket::connect_to(&fleet.sockets, &stream, VICTIM_PEER, VICTIM, None).await;
    let mut stranger_socket = ChatSocket::connect_to(&fleet.sockets, &stream, STRANGER, STRANGER_PEER, None).await;
    let first = post(&fleet, STRANGER, STRANGER_PEER, "stranger's own first").await;
    assert_eq!(first["stream_id"], serde_json::json!(stream));
    assert_eq!(seen(&mut stranger_socket, Duration::from_secs(3)).await, ["stranger's own first"]);

    // The victims talk: only the victim's socket gets it, live.
    let secret = post(&fleet, VICTIM, VICTIM_PEER, "the secret").await;
    assert_eq!(secret["stream_id"], serde_json::json!(stream));
    // (The stranger's first message, sent before, never reached it either.)
    assert_eq!(seen(&mut victim_socket, Duration::from_secs(3)).await, ["the secret"]);
    assert!(seen(&mut stranger_socket, Duration::from_secs(2)).await.is_empty(), "live frame leaked");

    // The stranger's next message reaches only the stranger's pair.
    post(&fleet, STRANGER_PEER, STRANGER, "stranger's reply").await;
    assert_eq!(seen(&mut stranger_socket, Duration::from_secs(3)).await, ["stranger's reply"]);
    assert!(seen(&mut victim_socket, Duration::from_secs(2)).await.is_empty(), "the other way round");

    // Replay with `since`: a reconnecting stranger gets its own missed messages only.
    stranger_socket.close().await;
    let since = first["message_id"].as_str().expect("message_id").to_owned();
    let mut replayed = ChatSocket::connect_to(&fleet.sockets, &stream, STRANGER, STRANGER_PEER, Some(&since)).await;
    assert_eq!(seen(&mut replayed, Duration::from_secs(3)).await, ["stranger's reply"], "replay leaked");

    // History by the shared stream id alone, and with each peer.
    for (user, query) in [
        (STRANGER, format!("stream_id={stream}")),
        (STRANGER, format!("stream_id={stream}&peer_id={STRANGER_PEER}")),
        (STRANGER_PEER, format!("stream_id={stream}")),
        (STRANGER, format!("peer_id={STRANGER_PEER}")),
    ] {
        let (status, page) = history(&fleet, user, &query).await;
        assert_eq!(status, 200, "{user} {query}: {page}");
        let got = contents(&page);
        assert!(!got.contains(&"the secret".to_owned()), "{user} {query} leaked: {page}");
        assert_eq!(got, ["stranger's own first", "stranger's reply"], "{user} {query}");
    }
    // Naming the victim as peer with the shared id is refused: it is not that pair's id.
    let (status, page) = history(&fleet, STRANGER, &format!("stream_id={stream}&peer_id={VICTIM_PEER}")).await;
    assert_eq!(status, 400, "{page}");
    // The victims still read their conversation whole.
    let (status, page) = history(&fleet, VICTIM_PEER, &format!("stream_id={stream}")).await;
    assert_eq!(status, 200);
    assert_eq!(contents(&page), ["the secret"]);
    // The inbox: the stranger's list never shows the victims' conversation or its
    // last message, whatever the shared id.
    for user in [STRANGER, STRANGER_PEER] {
        let (status, list) = get(&fleet, user, "/chat/conversations").await;
        assert_eq!(status, 200, "{list}");
        assert!(!list.to_string().contains("the secret"), "{user}'s inbox leaked: {list}");
        assert!(!list.to_string().contains(VICTIM_PEER), "{user}'s inbox names the victims: {list}");
    }
    let (_, victims_list) = get(&fleet, VICTIM_PEER, "/chat/conversations").await;
    assert!(!victims_list.to_string().contains("stranger's"), "the victims' inbox leaked: {victims_list}");
    // And the stranger cannot post into it: the id given must be the pair's own.
    let (status, body) = reqwest::Client::new()
        .post(fleet.persistence.url("/chat/messages"))
        .bearer_auth(token(STRANGER))
        .json(&serde_json::json!({"sender_id": STRANGER, "receiver_id": VICTIM_PEER, "content": "x", "stream_id": stream}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("answers");
    assert_eq!(status, 400, "{:?}", body.text().await);
    assert!(seen(&mut victim_socket, Duration::from_secs(1)).await.is_empty());
}

#[tokio::test]
async fn under_the_default_format_the_stranger_cannot_name_the_victims_conversation() {
    let fleet = ChatFleet::start(&[]);
    let victims = client::stream_id(VICTIM, VICTIM_PEER);
    assert_ne!(victims, client::stream_id(STRANGER, STRANGER_PEER));
    assert_eq!(victims.len(), 32);
    // The reproduction: the stranger subscribes naming their own pair and the
    // victims' stream id (legacy or v2): refused before any upgrade.
    for stream in [victims.clone(), legacy(VICTIM, VICTIM_PEER)] {
        let url = fleet.sockets.url(&format!(
            "/chat/subscribe?stream_id={stream}&sender_id={STRANGER}&receiver_id={STRANGER_PEER}&access_token={}",
            token(STRANGER)
        ));
        let response = reqwest::Client::new().get(url).send().await.expect("answers");
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = response.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "invalid_request");
    }
    // A legacy id is not accepted for posting while the service uses v2.
    let (status, body) = reqwest::Client::new()
        .post(fleet.persistence.url("/chat/messages"))
        .bearer_auth(token(VICTIM))
        .json(&serde_json::json!({"sender_id": VICTIM, "receiver_id": VICTIM_PEER, "content": "x",
            "stream_id": legacy(VICTIM, VICTIM_PEER)}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("answers");
    assert_eq!(status, 400, "{:?}", body.text().await);
}
