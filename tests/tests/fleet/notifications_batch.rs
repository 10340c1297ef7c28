//! `POST /notifications/batch`, black-box: the real generalnotificationshandler against
//! a real Redis with real WebSocket clients, and the change handler's use of it for a
//! group message (chatpersistence, the outbox relay, the broker, the change handler and
//! the notification pod, all real).
//!
//! What it shows: a batch delivers each item to each online user's sockets exactly
//! once and reports per item who was offline, who is on another pod (from presence)
//! and which items were refused; a replayed batch shows nothing twice; the bounds
//! (items, bytes) are refused with a clear `413`; the public port does not serve the
//! route and the internal one wants the service token; and a group message to many
//! members arrives once on every member's notification socket in ceil(N / batch)
//! requests, also with two pods behind the real nginx or Envoy, where the members the
//! first batch's pod does not hold are re-sent to the other one.

use std::time::{Duration, Instant};

use chatfleet_tests::ws::{expect_quiet, http, next_json, Ws};
use chatfleet_tests::{cpu_seconds, token, Pipeline, Service, Stack, JWT_SECRET, SERVICE_TOKEN};
use chatstream::{MessageId, StreamId};
use serde_json::{json, Value};
use testkit::Redis;

use crate::multipod_support::{notify_path, Event, Fleet as ProxyFleet, ProxyKind, Socket};

const QUIET: Duration = Duration::from_millis(400);

fn start_pod(redis: &Redis, extra: &[(&str, &str)]) -> Service {
    let mut env: Vec<(String, String)> = vec![
        ("JWT_SECRET".into(), JWT_SECRET.into()),
        ("INTERNAL_SERVICE_TOKEN".into(), SERVICE_TOKEN.into()),
        ("REDIS_URL".into(), redis.url()),
        ("LOG_LEVEL".into(), "info,generalnotificationshandler=debug".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Service::start("generalnotificationshandler", &env)
}

async fn connect(service: &Service, me: &str) -> Ws {
    let path = format!("/notifications/subscribe?user_id={me}&access_token={}", token(me));
    match chatfleet_tests::ws_connect(service.ws_url(&path)).await {
        Ok((ws, _)) => ws,
        Err(err) => panic!("{me} could not subscribe: {err}; log:\n{}", service.log_tail(30)),
    }
}

/// `POST {url}` with `auth` (a bearer token, or none) and `body` sent as it is.
async fn post_raw(url: String, auth: Option<&str>, body: String) -> (u16, Value) {
    let mut request = http().post(url).header("content-type", "application/json").body(body);
    if let Some(auth) = auth {
        request = request.bearer_auth(auth);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn batch(service: &Service, body: &Value) -> (u16, Value) {
    post_raw(service.internal_url("/notifications/batch"), Some(SERVICE_TOKEN), body.to_string()).await
}

fn purchase(user: &str, id: &str) -> Value {
    json!({"purchase_id": id, "user_id": user, "status": "paid", "amount_minor": 1999, "currency": "EUR",
        "updated_at": "2026-01-01T00:00:00Z"})
}

/// A stored group message from `sender` to `recipients`.
fn group_message(sender: &str, recipients: &[&str]) -> Value {
    json!({"message_id": MessageId::new().to_string(), "stream_id": StreamId::new_group().to_string(),
        "sender_id": sender, "recipients": recipients, "content": "hello all",
        "created_at": "2026-01-01T12:00:00Z"})
}

/// The next frame is the notification of `kind` whose data is `data`.
async fn expect_frame(ws: &mut Ws, who: &str, kind: &str, data: &Value) {
    let frame = next_json(ws).await;
    assert_eq!(frame["type"], "notification", "{who}: {frame}");
    assert_eq!(frame["kind"], kind, "{who}: {frame}");
    assert_eq!(frame["data"], *data, "{who}: {frame}");
}

/// An inline Redis command (`testkit::probe`): the raw reply.
fn redis_cmd(redis: &Redis, command: &str) -> String {
    testkit::probe(redis.port(), format!("{command}\r\n").as_bytes()).unwrap_or_default()
}

/// Waits until the pod has written `user`'s presence key (the batch reads it for
/// users it has no socket for; here it only matters that it is there).
async fn presence_written(redis: &Redis, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_cmd(redis, &format!("EXISTS presence:{user}")).trim() != ":1" {
        assert!(Instant::now() < deadline, "presence:{user} never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One batch, many users and kinds: each online user's sockets get their items once;
/// an offline user, a user on another pod and refused items are reported per item;
/// replaying the batch answers the same and shows nothing twice.
#[tokio::test]
async fn a_batch_delivers_once_per_user_reports_each_item_and_a_replay_shows_nothing_twice() {
    let redis = Redis::start();
    let pod = start_pod(&redis, &[]);
    let mut alice = [connect(&pod, "alice").await, connect(&pod, "alice").await];
    let mut bob = connect(&pod, "bob").await;
    presence_written(&redis, "alice").await;
    presence_written(&redis, "bob").await;
    // dave's sockets are on another pod: his presence key holds that pod's instance id.
    assert!(redis_cmd(&redis, "SET presence:dave notifications-2/0123 PX 60000").starts_with("+OK"));

    let message = group_message("zoe", &["alice", "bob", "carol", "dave"]);
    let alice_purchase = purchase("alice", "p-1");
    let body = json!({
        "shared": [{"message": message}],
        "items": [
            {"user_id": "alice", "kind": "chat", "shared": 0},
            {"user_id": "bob", "kind": "chat", "shared": 0},
            {"user_id": "carol", "kind": "chat", "shared": 0},
            {"user_id": "dave", "kind": "chat", "shared": 0},
            {"user_id": "alice", "kind": "purchase", "body": alice_purchase},
            // Refused item by item, as the single endpoints refuse them:
            {"user_id": "erin", "kind": "chat", "shared": 0},
            {"user_id": "bob", "kind": "purchase", "body": purchase("alice", "p-2")},
            {"user_id": "bob", "kind": "shipping", "body": {"shipment_id": "s-1"}},
            {"user_id": "bob", "kind": "chat", "shared": 7},
            {"user_id": "not a user", "kind": "purchase", "body": purchase("alice", "p-3")},
        ]
    });
    let (status, answer) = batch(&pod, &body).await;
    assert_eq!(status, 200, "{answer}; log:\n{}", pod.log_tail(20));
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 10, "one result per item: {answer}");
    let outcome = |i: usize| results[i]["outcome"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        (outcome(0).as_str(), results[0]["connections"].as_u64(), results[0]["delivered"].as_u64()),
        ("ok", Some(2), Some(2)),
        "alice: {}",
        results[0]
    );
    assert_eq!(outcome(1), "ok", "bob: {}", results[1]);
    assert_eq!((outcome(2).as_str(), results[2]["status"].as_u64()), ("no_connections", Some(200)), "carol is offline");
    assert_eq!(outcome(3), "elsewhere", "dave: {}", results[3]);
    assert_eq!(results[3]["owner"], "notifications-2/0123");
    assert_eq!(outcome(4), "ok");
    for (i, status) in [(5, 400), (6, 400), (7, 422), (8, 400), (9, 400)] {
        assert_eq!(outcome(i), "invalid", "item {i}: {}", results[i]);
        assert_eq!(results[i]["status"], status, "item {i}: {}", results[i]);
        assert!(results[i]["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", results[i]);
    }

    for (n, ws) in alice.iter_mut().enumerate() {
        expect_frame(ws, &format!("alice #{n}"), "chat", &message).await;
        expect_frame(ws, &format!("alice #{n}"), "purchase", &alice_purchase).await;
        expect_quiet(ws, QUIET).await;
    }
    expect_frame(&mut bob, "bob", "chat", &message).await;
    expect_quiet(&mut bob, QUIET).await;

    // The same batch again (a retry): every item counts as delivered, no frame is shown.
    let (status, again) = batch(&pod, &body).await;
    assert_eq!(status, 200);
    assert_eq!(again["results"][0]["outcome"], "ok");
    assert_eq!(again["results"][0]["delivered"], 2);
    for ws in alice.iter_mut() {
        expect_quiet(ws, QUIET).await;
    }
    expect_quiet(&mut bob, QUIET).await;
    assert!(pod.counter("notification_batches_total", &[("outcome", "accepted")]).await >= 2.0);
}

/// The bounds and the doors: too many items and too large a body are `413`, a body
/// that is not a batch `400`/`422`; without the service token `401`, with a user's
/// token `403`; the public port does not have the route.
#[tokio::test]
async fn oversized_unauthenticated_and_public_batches_are_refused() {
    let redis = Redis::start();
    let pod = start_pod(&redis, &[("NOTIFICATIONS_BATCH_MAX_ITEMS", "3"), ("NOTIFICATIONS_BATCH_MAX_BYTES", "4096")]);
    let mut alice = connect(&pod, "alice").await;
    let item = |n: usize| json!({"user_id": "alice", "kind": "purchase", "body": purchase("alice", &format!("p-{n}"))});

    let four = json!({"items": [item(1), item(2), item(3), item(4)]});
    let (status, body) = batch(&pod, &four).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("batch_too_large")), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("NOTIFICATIONS_BATCH_MAX_ITEMS")), "{body}");

    let mut big = purchase("alice", "p-big");
    big["note"] = json!("x".repeat(5000));
    let (status, body) = batch(&pod, &json!({"items": [{"user_id": "alice", "kind": "purchase", "body": big}]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("payload_too_large")), "{body}");

    let url = pod.internal_url("/notifications/batch");
    let (status, body) = post_raw(url.clone(), Some(SERVICE_TOKEN), "{\"items\": [".into()).await;
    assert_eq!(status, 400, "not JSON: {body}");
    let (status, body) = post_raw(url.clone(), Some(SERVICE_TOKEN), "{\"users\": []}".into()).await;
    assert_eq!(status, 422, "not a batch: {body}");
    let (status, body) = post_raw(url.clone(), Some(SERVICE_TOKEN), "{\"items\": []}".into()).await;
    assert_eq!(status, 400, "no items: {body}");
    let (status, _) = post_raw(url.clone(), Some(SERVICE_TOKEN), json!({"items": [item(9)]}).to_string()).await;
    assert_eq!(status, 200, "a batch within the bounds");

    let three = json!({"items": [item(1), item(2), item(3)]}).to_string();
    let (status, body) = post_raw(url.clone(), None, three.clone()).await;
    assert_eq!(status, 401, "no token: {body}");
    let (status, body) = post_raw(url, Some(&token("alice")), three.clone()).await;
    assert_eq!(status, 403, "a user's token: {body}");
    let (status, _) = post_raw(pod.url("/notifications/batch"), Some(SERVICE_TOKEN), three.clone()).await;
    assert_eq!(status, 404, "the public port has no batch route");

    // Only the one batch within the bounds reached alice.
    let frame = next_json(&mut alice).await;
    assert_eq!(frame["data"]["purchase_id"], "p-9", "{frame}");
    expect_quiet(&mut alice, QUIET).await;
}

/// The pipeline (chatpersistence, the pods, the change handler) with
/// `NOTIFICATIONS_BATCH_SIZE` = `batch`.
fn pipeline(stack: &Stack, batch: &str) -> Pipeline {
    pipeline_with(stack, batch, &[])
}

/// [`pipeline`] with `extra` in every service's environment.
fn pipeline_with(stack: &Stack, batch: &str, extra: &[(&str, &str)]) -> Pipeline {
    let mut base = stack.pipeline_env();
    base.push(("KAFKA_GROUP_ID".into(), testkit::unique("notify-batch")));
    base.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Pipeline::start(&base, &[("NOTIFICATIONS_BATCH_SIZE".into(), batch.into())])
}

/// A group owned by `owner` with `members`, the first `online` of them on a
/// notification socket, once the creation's events have reached those sockets (one
/// member_joined per member, the owner included, to every member).
async fn group_with_sockets(fleet: &Pipeline, members: &[String], online: usize) -> (String, Vec<(String, Ws)>) {
    // The sockets first, so the creation's events reach them whatever the timing.
    let mut sockets = Vec::new();
    for member in &members[..online] {
        sockets.push((member.clone(), connect(&fleet.notifications, member).await));
    }
    let create = json!({"title": "batch", "members": members});
    let (status, body) = chatfleet_tests::client::send_json(
        http().post(fleet.persistence.url("/chat/conversations")).bearer_auth(token("owner")).json(&create),
    )
    .await;
    assert_eq!(status, 201, "create group: {body}");
    let group = body["conversation_id"].as_str().expect("conversation_id").to_owned();
    for (member, ws) in sockets.iter_mut() {
        let mut joined = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while joined.len() < members.len() + 1 {
            assert!(Instant::now() < deadline, "{member}: {} of {} member_joined", joined.len(), members.len() + 1);
            let frame = tokio::time::timeout(Duration::from_secs(60), next_json(ws)).await.expect("a frame");
            if frame["type"] == "conversation_event" && frame["event"]["conversation_id"] == group.as_str() {
                assert!(joined.insert(frame["event"]["user_id"].to_string()), "{member}: a repeat: {frame}");
            }
        }
    }
    (group, sockets)
}

/// The owner posts to the group; the message id.
async fn post_to_group(fleet: &Pipeline, group: &str, content: &str) -> String {
    let post = json!({"sender_id": "owner", "conversation_id": group, "content": content});
    let (status, body) = chatfleet_tests::client::send_json(
        http().post(fleet.persistence.url("/chat/messages")).bearer_auth(token("owner")).json(&post),
    )
    .await;
    assert!(status == 201 || status == 202, "post: {body}");
    body["message_id"].as_str().expect("message_id").to_owned()
}

/// Every socket's next frame is message `id`'s chat notification, and nothing follows.
async fn notified_once(sockets: &mut [(String, Ws)], id: &str) {
    for (member, ws) in sockets.iter_mut() {
        let frame = next_json(ws).await;
        assert_eq!(
            (frame["type"].as_str(), frame["kind"].as_str()),
            (Some("notification"), Some("chat")),
            "{member}: {frame}"
        );
        assert_eq!(frame["data"]["message_id"], id, "{member}: {frame}");
        assert_eq!(frame["id"], format!("chat:{id}"), "{member}");
    }
    for (_, ws) in sockets.iter_mut() {
        expect_quiet(ws, QUIET).await;
    }
}

/// Through the whole pipeline: a group of 25 (the sender and 24 members, one of them
/// offline). One message reaches the 23 online members' notification sockets once
/// each, in ceil(24 / 10) = 3 batch requests instead of 24 `POST`s.
#[tokio::test]
async fn a_group_message_reaches_every_member_once_in_ceil_n_over_batch_requests() {
    let stack = Stack::start();
    let fleet = pipeline(&stack, "10");
    let members: Vec<String> = (0..24).map(|i| format!("member{i:02}")).collect();
    // Every member but the last has a notification socket.
    let (group, mut sockets) = group_with_sockets(&fleet, &members, 23).await;
    let batches_before = fleet.notifications.counter("notification_batches_total", &[("outcome", "accepted")]).await;
    let singles_before = fleet.notifications.counter("notifications_total", &[("kind", "chat")]).await;

    let id = post_to_group(&fleet, &group, "to everyone").await;
    notified_once(&mut sockets, &id).await;
    let batches = fleet.notifications.counter("notification_batches_total", &[("outcome", "accepted")]).await;
    assert_eq!(batches - batches_before, 3.0, "24 members, 10 per batch; handler log:\n{}", fleet.handler.log_tail(20));
    // Every member counted once by the pod: 23 delivered, the offline one no_connections.
    let notified = fleet.notifications.counter("notifications_total", &[("kind", "chat")]).await;
    assert_eq!(notified - singles_before, 24.0);
    let offline =
        fleet.notifications.counter("notifications_total", &[("kind", "chat"), ("outcome", "no_connections")]).await;
    assert_eq!(offline, 1.0, "member23 has no socket");
}

/// A batch that gets no answer (the pod frozen with SIGSTOP) is retried; when the pod
/// thaws it may process both the first attempt and the retries, and each member's
/// socket still shows the message once.
#[tokio::test]
async fn a_retried_batch_shows_each_member_the_message_once() {
    let stack = Stack::start();
    let fleet = pipeline(&stack, "500");
    let members: Vec<String> = (0..12).map(|i| format!("frozen{i:02}")).collect();
    let (group, mut sockets) = group_with_sockets(&fleet, &members, members.len()).await;
    let timeouts =
        || fleet.handler.counter("forward_requests_total", &[("target", "chat_notification"), ("outcome", "timeout")]);
    let before = timeouts().await;
    fleet.notifications.signal("STOP");
    let id = post_to_group(&fleet, &group, "while the pod is frozen").await;
    // FORWARD_TIMEOUT is 1 s in the pipeline tests: at least one batch times out.
    let deadline = Instant::now() + Duration::from_secs(20);
    while timeouts().await <= before {
        if Instant::now() > deadline {
            fleet.notifications.signal("CONT");
            panic!("no batch timed out; handler log:\n{}", fleet.handler.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.notifications.signal("CONT");
    notified_once(&mut sockets, &id).await;
}

/// A pod that refuses the change handler's batches (here: `413`, a smaller
/// `NOTIFICATIONS_BATCH_MAX_ITEMS`; an older pod without the route answers `404` and
/// takes the same path) gets every member's notification one by one instead, once.
#[tokio::test]
async fn a_refused_batch_falls_back_to_one_request_per_member() {
    let stack = Stack::start();
    let fleet = pipeline_with(&stack, "10", &[("NOTIFICATIONS_BATCH_MAX_ITEMS", "3")]);
    let members: Vec<String> = (0..8).map(|i| format!("older{i:02}")).collect();
    let (group, mut sockets) = group_with_sockets(&fleet, &members, members.len()).await;
    let singles_before = fleet.handler.counter("notification_batch_singles_total", &[]).await;
    let id = post_to_group(&fleet, &group, "to a pod that takes three at a time").await;
    notified_once(&mut sockets, &id).await;
    let singles = fleet.handler.counter("notification_batch_singles_total", &[]).await - singles_before;
    assert_eq!(singles, 8.0, "every member one by one after the 413");
    let refused = fleet.notifications.counter("notification_batches_total", &[("outcome", "refused")]).await;
    assert!(refused >= 1.0, "the pod refused the batch");
}

/// Two notification pods behind the real proxy (nginx or Envoy), the change handler
/// reaching them only through it: a group message to 20 members whose sockets the
/// proxy spread over both pods reaches every member's notification socket once. The
/// first batch lands on one pod; the members it holds no socket for are answered
/// `elsewhere` (from presence) and re-sent routed to the other pod, so nothing goes
/// one by one.
async fn a_group_message_reaches_members_on_both_pods_through_the_proxy(kind: ProxyKind) {
    let mut fleet = ProxyFleet::start(kind, 1, 2);
    fleet.warm_up().await;
    let client = reqwest::Client::new();
    let members: Vec<String> = (0..20).map(|i| format!("spread{i:02}")).collect();
    let mut sockets = Vec::new();
    for member in &members {
        let socket = Socket::connect(&fleet.proxy.public_ws(&notify_path(member))).await.expect("subscribe");
        sockets.push((member.clone(), socket));
    }
    let per_pod = ProxyFleet::connections(&mut fleet.notify, "notifications");
    assert!(per_pod.iter().all(|n| *n > 0.0), "the proxy spreads 20 users over both pods: {per_pod:?}");
    // Every pod has written its users' presence (the batch reads it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while members.iter().any(|m| !redis_cmd(&fleet.stack.redis, &format!("EXISTS presence:{m}")).starts_with(":1")) {
        assert!(Instant::now() < deadline, "presence never written for every member");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = client
        .post(fleet.proxy.public_http("/chat/conversations"))
        .bearer_auth(token("spread-owner"))
        .json(&json!({"title": "spread", "members": members}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("create a group through the proxy");
    assert_eq!(response.status().as_u16(), 201, "create the group");
    let created: Value = response.json().await.expect("json");
    let group = created["conversation_id"].as_str().expect("conversation_id").to_owned();
    // The creation's events (one member_joined per member and the owner, to each
    // member) are batched too: count only the message's batches, after them.
    for (member, socket) in sockets.iter_mut() {
        let mut joined = std::collections::HashSet::new();
        while joined.len() < members.len() + 1 {
            match socket.next(Duration::from_secs(30)).await {
                Event::Frame(frame) if frame["event"]["conversation_id"] == group.as_str() => {
                    assert!(joined.insert(frame["event"]["user_id"].to_string()), "{member}: a repeat: {frame}");
                }
                Event::Frame(_) => {}
                other => panic!("{member}: {} member_joined, then {other:?}", joined.len()),
            }
        }
    }
    let rerouted_before = fleet.handler.counter("notification_batch_rerouted_total", &[]).await;

    let response = client
        .post(fleet.proxy.public_http("/chat/messages"))
        .bearer_auth(token("spread-owner"))
        .json(&json!({"sender_id": "spread-owner", "conversation_id": group, "content": "to both pods"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("post to the group");
    assert_eq!(response.status().as_u16(), 201, "post to the group");
    let posted: Value = response.json().await.expect("json");
    let id = posted["message_id"].as_str().expect("message_id").to_owned();
    for (member, socket) in sockets.iter_mut() {
        let mut got = 0;
        let until = Instant::now() + Duration::from_secs(15);
        // Membership events come first; count the message's notification until quiet.
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let wait = if got > 0 { QUIET.min(left) } else { left };
            match socket.next(wait).await {
                Event::Frame(frame)
                    if frame["type"] == "notification" && frame["data"]["message_id"] == id.as_str() =>
                {
                    got += 1
                }
                Event::Frame(_) => {}
                Event::Closed => panic!("{member}: socket closed"),
                Event::Nothing => break,
            }
        }
        assert_eq!(got, 1, "{member} got the notification {got} times; handler log:\n{}", fleet.handler.log_tail(20));
    }
    let rerouted = fleet.handler.counter("notification_batch_rerouted_total", &[]).await - rerouted_before;
    assert!(rerouted > 0.0 && rerouted < 20.0, "the other pod's members were re-sent to it: {rerouted}");
    let singles = fleet.handler.counter("notification_batch_singles_total", &[]).await;
    assert_eq!(singles, 0.0, "none went one by one (the ring is stable)");
}

#[tokio::test]
async fn a_group_message_reaches_members_on_both_pods_through_nginx() {
    a_group_message_reaches_members_on_both_pods_through_the_proxy(ProxyKind::Nginx).await;
}

#[tokio::test]
async fn a_group_message_reaches_members_on_both_pods_through_envoy() {
    a_group_message_reaches_members_on_both_pods_through_the_proxy(ProxyKind::Envoy).await;
}

/// The change handler's requests for chat notifications so far (single or batch).
async fn notification_requests(handler: &Service) -> f64 {
    handler.counter("forward_requests_total", &[("target", "chat_notification")]).await
}

/// One run of the measurement below: a group of `members` (plus its owner), every
/// member with a notification socket, `messages` group messages from the owner; the
/// change handler and the notification pod's CPU per notification, and the requests
/// the handler made for them.
async fn group_notification_run(batch: &str, members: usize, messages: usize) {
    let stack = Stack::start();
    let mut base = stack.pipeline_env();
    base.push(("KAFKA_GROUP_ID".into(), testkit::unique("notify-cost")));
    base.push(("LOG_LEVEL".into(), "warn".into()));
    let fleet = Pipeline::start(&base, &[("NOTIFICATIONS_BATCH_SIZE".into(), batch.into())]);
    let names: Vec<String> = (0..members).map(|i| format!("cost{i:04}")).collect();
    let (status, body) = chatfleet_tests::client::send_json(
        http()
            .post(fleet.persistence.url("/chat/conversations"))
            .bearer_auth(token("cost-owner"))
            .json(&json!({"title": "cost", "members": names})),
    )
    .await;
    assert_eq!(status, 201, "create group: {body}");
    let group = body["conversation_id"].as_str().expect("conversation_id").to_owned();
    // Let the creation's member_joined events pass (to users without sockets yet).
    let mut last = -1.0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let forwarded = fleet.handler.counter("changes_forwarded_total", &[]).await;
        if forwarded == last && forwarded > 0.0 {
            break;
        }
        last = forwarded;
    }
    let chat_frames = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut readers = Vec::new();
    for name in &names {
        let mut ws = connect(&fleet.notifications, name).await;
        let chat_frames = chat_frames.clone();
        readers.push(tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(Ok(message)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                    if text.as_str().contains("\"kind\":\"chat\"") {
                        chat_frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (handler_pid, pod_pid) = (fleet.handler.pid().expect("pid"), fleet.notifications.pid().expect("pid"));
    let requests_before = notification_requests(&fleet.handler).await;
    let (handler_before, pod_before) = (cpu_seconds(handler_pid), cpu_seconds(pod_pid));
    let started = Instant::now();
    for i in 0..messages {
        let post = json!({"sender_id": "cost-owner", "conversation_id": group, "content": format!("cost {i}")});
        let (status, body) = chatfleet_tests::client::send_json(
            http().post(fleet.persistence.url("/chat/messages")).bearer_auth(token("cost-owner")).json(&post),
        )
        .await;
        assert!(status == 201 || status == 202, "post: {body}");
    }
    let expected = (members * messages) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while chat_frames.load(std::sync::atomic::Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let (handler_cpu, pod_cpu) = (cpu_seconds(handler_pid) - handler_before, cpu_seconds(pod_pid) - pod_before);
    tokio::time::sleep(QUIET).await;
    let got = chat_frames.load(std::sync::atomic::Ordering::Relaxed);
    let made = notification_requests(&fleet.handler).await - requests_before;
    for reader in readers {
        reader.abort();
    }
    println!(
        "| {batch} | {members} × {messages} = {expected} | {made:.0} | {:.2} s | {:.0} | {:.0} | {} / {} |",
        took.as_secs_f64(),
        handler_cpu * 1e6 / expected as f64,
        pod_cpu * 1e6 / expected as f64,
        expected.saturating_sub(got),
        got.saturating_sub(expected),
    );
    assert_eq!(got, expected, "every member notified once per message");
}

/// A measurement, ignored by default: what a group's notifications cost the change
/// handler and the notification pod, one `POST` per member against batches. Run the
/// release binaries with
/// `CHATFLEET_TEST_PROFILE=release CARGO_TARGET_DIR=/work/target-release cargo test
/// --release -p chatfleet-tests --test fleet -- --ignored --nocapture
/// notifications_batch::what_a_groups_notifications_cost`.
#[tokio::test]
#[ignore = "a measurement (docs/benchmarks.md); run it on its own"]
async fn what_a_groups_notifications_cost() {
    println!("| NOTIFICATIONS_BATCH_SIZE | notifications | handler requests | until all arrived | handler CPU µs / notification | pod CPU µs / notification | missing / extra |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for batch in ["0", "500"] {
        group_notification_run(batch, 200, 50).await;
    }
}
