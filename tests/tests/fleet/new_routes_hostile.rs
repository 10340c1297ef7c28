//! Every route this wave added, tried as the people who must not get through: no
//! token, an expired or forged one, a token in the query string, a stranger, a
//! member who was removed, and a client that floods the writes. Each answer is the
//! documented refusal, and nothing changes for the people the route belongs to.

use std::time::Duration;

use chatfleet_tests::{bad_tokens, token, ChatFleet, SERVICE_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

async fn call(
    fleet: &ChatFleet,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, fleet.persistence.url(path));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.timeout(Duration::from_secs(10)).send().await.expect("chatpersistence answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A group of owner + member + leaver, a message by member in it, and a pair
/// message; returns (group id, group message id, pair message id).
async fn setup(fleet: &ChatFleet) -> (String, String, String) {
    let (status, group) = call(
        fleet,
        Method::POST,
        "/chat/conversations",
        Some(&token("h-owner")),
        Some(json!({"title": "hostile", "members": ["h-member", "h-leaver"]})),
    )
    .await;
    assert_eq!(status, 201, "{group}");
    let group = group["conversation_id"].as_str().expect("id").to_owned();
    let (status, message) = call(
        fleet,
        Method::POST,
        "/chat/messages",
        Some(&token("h-member")),
        Some(json!({"sender_id": "h-member", "conversation_id": group, "content": "in the group"})),
    )
    .await;
    assert_eq!(status, 201, "{message}");
    let in_group = message["message_id"].as_str().expect("id").to_owned();
    let (status, message) = call(
        fleet,
        Method::POST,
        "/chat/messages",
        Some(&token("h-member")),
        Some(json!({"sender_id": "h-member", "receiver_id": "h-owner", "content": "private"})),
    )
    .await;
    assert_eq!(status, 201, "{message}");
    let in_pair = message["message_id"].as_str().expect("id").to_owned();
    // The leaver is removed by the owner: from now on a former member.
    let (status, _) = call(
        fleet,
        Method::DELETE,
        &format!("/chat/conversations/{group}/members/h-leaver"),
        Some(&token("h-owner")),
        None,
    )
    .await;
    assert_eq!(status, 204);
    (group, in_group, in_pair)
}

/// Every public route added this wave, with a body where it needs one.
fn routes(group: &str, in_group: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, "/chat/conversations".into(), None),
        (Method::POST, "/chat/conversations".into(), Some(json!({"title": "x", "members": []}))),
        (Method::GET, format!("/chat/conversations/{group}"), None),
        (Method::PATCH, format!("/chat/conversations/{group}"), Some(json!({"title": "taken over"}))),
        (Method::POST, format!("/chat/conversations/{group}/members"), Some(json!({"user_id": "h-intruder"}))),
        (Method::DELETE, format!("/chat/conversations/{group}/members/h-member"), None),
        (Method::POST, format!("/chat/conversations/{group}/read"), Some(json!({"up_to": in_group}))),
        (Method::GET, format!("/chat/messages?conversation_id={group}"), None),
        (Method::PATCH, format!("/chat/messages/{in_group}"), Some(json!({"content": "rewritten"}))),
        (Method::DELETE, format!("/chat/messages/{in_group}"), None),
        (Method::PUT, format!("/chat/messages/{in_group}/reactions/%F0%9F%91%8D"), None),
        (Method::DELETE, format!("/chat/messages/{in_group}/reactions/%F0%9F%91%8D"), None),
    ]
}

/// What the owner sees of the group is unchanged: title, members, the message.
async fn group_is_intact(fleet: &ChatFleet, group: &str, in_group: &str) {
    let (status, view) =
        call(fleet, Method::GET, &format!("/chat/conversations/{group}"), Some(&token("h-owner")), None).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["title"], "hostile", "{view}");
    assert_eq!(view["members"], json!(["h-owner", "h-member"]), "{view}");
    let (_, page) =
        call(fleet, Method::GET, &format!("/chat/messages?conversation_id={group}"), Some(&token("h-owner")), None)
            .await;
    let message = page["messages"].as_array().and_then(|m| m.iter().find(|m| m["message_id"] == in_group)).cloned();
    let message = message.expect("the message is still there");
    assert_eq!(message["content"], "in the group", "{message}");
    assert!(message.get("reactions").is_none() && message.get("edited_at").is_none(), "{message}");
}

#[tokio::test]
async fn the_new_routes_refuse_bad_credentials_strangers_and_former_members() {
    let fleet = ChatFleet::start(&[]);
    let (group, in_group, in_pair) = setup(&fleet).await;

    for (method, path, body) in routes(&group, &in_group) {
        // No token, bad tokens, and a valid token in the query string: 401.
        let (status, answer) = call(&fleet, method.clone(), &path, None, body.clone()).await;
        assert_eq!(
            (status, answer["error"]["code"].clone()),
            (401, json!("unauthorized")),
            "{method} {path}: {answer}"
        );
        for (kind, bad) in bad_tokens("h-owner") {
            let (status, answer) = call(&fleet, method.clone(), &path, Some(&bad), body.clone()).await;
            assert_eq!(status, 401, "{kind} token on {method} {path}: {answer}");
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let in_query = format!("{path}{sep}access_token={}", token("h-owner"));
        let (status, answer) = call(&fleet, method.clone(), &in_query, None, body.clone()).await;
        assert_eq!(status, 401, "query token on {method} {path}: {answer}");
        // The service token is no user token.
        let (status, _) = call(&fleet, method.clone(), &path, Some(SERVICE_TOKEN), body.clone()).await;
        assert_eq!(status, 401, "service token on {method} {path}");
    }

    // A stranger and the removed member: the group's routes answer 403 not_a_member,
    // a message's routes 404 (the same as a message that does not exist).
    for who in ["h-stranger", "h-leaver"] {
        for (method, path, body) in routes(&group, &in_group) {
            if path == "/chat/conversations" {
                continue; // their own inbox and their own new group: allowed
            }
            let (status, answer) = call(&fleet, method.clone(), &path, Some(&token(who)), body.clone()).await;
            let expected = if path.starts_with("/chat/messages/") { (404, "not_found") } else { (403, "not_a_member") };
            assert_eq!(
                (status, answer["error"]["code"].as_str().unwrap_or_default()),
                expected,
                "{who}: {method} {path}: {answer}"
            );
        }
        // Nor does the group show in their inbox.
        let (_, list) = call(&fleet, Method::GET, "/chat/conversations", Some(&token(who)), None).await;
        assert!(!list.to_string().contains(&group), "{who}'s inbox lists the group: {list}");
    }
    // Someone else's pair message: a stranger gets 404 on edit, delete, react.
    for (method, path) in [
        (Method::PATCH, format!("/chat/messages/{in_pair}")),
        (Method::DELETE, format!("/chat/messages/{in_pair}")),
        (Method::PUT, format!("/chat/messages/{in_pair}/reactions/%F0%9F%91%8D")),
    ] {
        let body = (method == Method::PATCH).then(|| json!({"content": "x"}));
        let (status, _) = call(&fleet, method.clone(), &path, Some(&token("h-stranger")), body).await;
        assert_eq!(status, 404, "{method} {path}");
    }
    group_is_intact(&fleet, &group, &in_group).await;

    // The internal routes are not on the public port.
    for path in [
        format!("/chat/conversations/{group}/members"),
        format!("/chat/messages/changes?stream_id={group}&up_to={in_group}&after_ms=0"),
    ] {
        let (status, answer) = call(&fleet, Method::GET, &path, Some(SERVICE_TOKEN), None).await;
        assert!(status == 404 || status == 405 || status == 401, "GET {path} on the public port: {status} {answer}");
        assert!(answer.get("members").is_none() && answer.get("messages").is_none(), "{answer}");
    }
    let (status, _) = call(
        &fleet,
        Method::POST,
        "/chat/bot-messages",
        Some(SERVICE_TOKEN),
        Some(json!({"sender_id": "h-owner", "receiver_id": "h-member", "content": "x"})),
    )
    .await;
    assert!(status == 404 || status == 405, "bot messages on the public port: {status}");
}

#[tokio::test]
async fn a_client_flooding_conversation_writes_is_limited_and_others_are_not() {
    let fleet = ChatFleet::start(&[("RATE_LIMIT_POST_PER_SECOND", "5"), ("RATE_LIMIT_POST_BURST", "10")]);
    let flooder = token("h-flooder");
    let mut created = 0;
    let mut limited = 0;
    for i in 0..40 {
        let body = json!({"title": format!("spam {i}"), "members": ["h-victim"]});
        let (status, answer) = call(&fleet, Method::POST, "/chat/conversations", Some(&flooder), Some(body)).await;
        match status {
            201 => created += 1,
            429 => {
                assert_eq!(answer["error"]["code"], "rate_limited", "{answer}");
                limited += 1;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!(limited > 0 && created <= 15, "created {created}, limited {limited}");
    // The victim's inbox holds exactly the groups that were created, nothing more.
    let (status, list) =
        call(&fleet, Method::GET, "/chat/conversations?limit=200", Some(&token("h-victim")), None).await;
    assert_eq!(status, 200);
    assert_eq!(list["conversations"].as_array().map(Vec::len), Some(created), "{list}");
    // Someone else writes at once.
    let body = json!({"title": "fine", "members": []});
    let (status, _) = call(&fleet, Method::POST, "/chat/conversations", Some(&token("h-bystander")), Some(body)).await;
    assert_eq!(status, 201);
}
