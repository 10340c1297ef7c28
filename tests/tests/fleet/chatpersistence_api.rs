//! chatpersistence's HTTP API, black-box: the real binary against a real MongoDB
//! wire server, checked through HTTP and directly in the database.
//!
//! Why these tests exist: the API is the fleet's only write path. They pin down
//! that a 201 means exactly one durable document, that retries write nothing, that
//! bad input and bad credentials are refused before anything is written, that
//! history pages are ordered and access-checked, and that a MongoDB outage is a
//! quick 503 rather than a hang or a lie.

use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, JWT_SECRET, SERVICE_TOKEN};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use testkit::Mongo;

const ALICE: &str = "alice";
const BOB: &str = "bob";

/// chatpersistence on its own MongoDB; Debezium mode, so no broker is needed.
fn start(mongo: &Mongo) -> Service {
    let env: Vec<(String, String)> = [
        ("MONGODB_URI", mongo.uri()),
        ("JWT_SECRET", JWT_SECRET.to_owned()),
        ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
        ("CAPTURE_MODE", "debezium".to_owned()),
        ("LOG_LEVEL", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Service::start("chatpersistence", &env)
}

/// Waits until the service can write (its indexes exist).
async fn wait_ready(service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(response) = reqwest::get(service.url("/readyz")).await {
            if response.status().as_u16() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chatpersistence never became ready:\n{}", service.log_tail(30));
}

async fn messages(mongo: &Mongo) -> mongodb::Collection<Document> {
    let client = mongodb::Client::with_uri_str(mongo.uri()).await.expect("mongo client");
    client.database("chat").collection("messages")
}

async fn count(mongo: &Mongo) -> u64 {
    messages(mongo).await.count_documents(doc! {}).await.expect("count")
}

fn stream_of(a: &str, b: &str) -> String {
    let a = chatstream::UserId::parse(a).expect("valid");
    let b = chatstream::UserId::parse(b).expect("valid");
    chatstream::StreamId::for_pair(&a, &b).to_string()
}

async fn post(service: &Service, as_user: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = reqwest::Client::new()
        .post(service.url("/chat/messages"))
        .bearer_auth(token(as_user))
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("chatpersistence answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap_or(Value::Null))
}

async fn send(from: &str, to: &str, content: &str, service: &Service) -> Value {
    let (status, _, body) =
        post(service, from, &json!({"sender_id": from, "receiver_id": to, "content": content})).await;
    assert_eq!(status, 201, "POST answered {status}: {body}");
    body
}

async fn history(service: &Service, as_user: &str, query: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(service.url(&format!("/chat/messages?{query}")))
        .bearer_auth(token(as_user))
        .send()
        .await
        .expect("history answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn ids(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .map(|list| list.iter().map(|m| m["message_id"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

fn assert_clear_error(what: &str, status: u16, body: &Value, expected: u16) {
    assert_eq!(status, expected, "{what}: answered {status} {body}");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{what}: error body must be {{error: {{code, message}}}}, got {body}"
    );
}

#[tokio::test]
async fn a_post_is_stored_once_and_read_back() {
    let mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;

    let stream = stream_of(ALICE, BOB);
    let (status, _, body) = post(
        &service,
        ALICE,
        &json!({"sender_id": ALICE, "receiver_id": BOB, "content": "  hello bob\n", "stream_id": stream}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["message_id"].as_str().expect("message_id").to_owned();
    assert!(chatstream::MessageId::parse(&id).is_ok(), "a UUIDv7 message id: {id}");
    assert_eq!(body["stream_id"], json!(stream));
    assert_eq!(body["sender_id"], json!(ALICE));
    assert_eq!(body["receiver_id"], json!(BOB));
    assert_eq!(body["content"], json!("hello bob"), "content is stored trimmed");
    let parsed: chatstream::ChatMessage =
        serde_json::from_value(body.clone()).expect("a ChatMessage with RFC 3339 created_at");

    // Exactly one document, with the documented shape.
    assert_eq!(count(&mongo).await, 1);
    let stored = messages(&mongo).await.find_one(doc! {}).await.expect("find").expect("one document");
    assert_eq!(stored.get_str("_id"), Ok(id.as_str()));
    assert_eq!(stored.get_str("message_id"), Ok(id.as_str()));
    assert_eq!(stored.get_str("stream_id"), Ok(stream.as_str()));
    assert_eq!(stored.get_str("content"), Ok("hello bob"));
    let date = stored.get_datetime("created_at").expect("created_at is a BSON date");
    assert_eq!(date.timestamp_millis(), parsed.created_at.timestamp_millis());
    assert!(!stored.contains_key("outbox_pending"), "no outbox marker in debezium mode: {stored}");
    assert!(!stored.contains_key("client_message_id"), "{stored}");

    // Both participants read it back; so does the internal endpoint.
    for (user, peer) in [(ALICE, BOB), (BOB, ALICE)] {
        let (status, page) = history(&service, user, &format!("stream_id={stream}&peer_id={peer}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(ids(&page), vec![id.clone()]);
        assert_eq!(page["messages"][0], body, "history returns the stored message as POST did");
        assert_eq!(page["has_more"], json!(false));
    }
    let internal = reqwest::Client::new()
        .get(service.internal_url(&format!("/chat/messages?stream_id={stream}")))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .expect("internal answers");
    assert_eq!(internal.status().as_u16(), 200);
    let page: Value = internal.json().await.expect("JSON");
    assert_eq!(ids(&page), vec![id]);
}

#[tokio::test]
async fn history_is_oldest_first_and_pages_both_ways() {
    let mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;
    let stream = stream_of(ALICE, BOB);

    let mut sent = Vec::new();
    for i in 0..7 {
        let (from, to) = if i % 2 == 0 { (ALICE, BOB) } else { (BOB, ALICE) };
        sent.push(
            send(from, to, &format!("message {i}"), &service).await["message_id"].as_str().expect("id").to_owned(),
        );
    }
    // Another conversation must not leak in.
    send(ALICE, "carol", "not yours", &service).await;

    let base = format!("stream_id={stream}&peer_id={BOB}");
    let (status, all) = history(&service, ALICE, &base).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&all), sent, "oldest first, only this stream");

    let (_, first) = history(&service, ALICE, &format!("{base}&limit=3")).await;
    assert_eq!(ids(&first), sent[..3]);
    assert_eq!(first["has_more"], json!(true));
    let (_, second) = history(&service, ALICE, &format!("{base}&limit=3&since={}", sent[2])).await;
    assert_eq!(ids(&second), sent[3..6]);
    let (_, last) = history(&service, ALICE, &format!("{base}&limit=3&since={}", sent[5])).await;
    assert_eq!(ids(&last), sent[6..]);
    assert_eq!(last["has_more"], json!(false));

    let (_, before) = history(&service, ALICE, &format!("{base}&limit=2&before={}", sent[5])).await;
    assert_eq!(ids(&before), sent[3..5], "the page just before the cursor, oldest first");
    assert_eq!(before["has_more"], json!(true));
    let (_, start) = history(&service, ALICE, &format!("{base}&limit=5&before={}", sent[2])).await;
    assert_eq!(ids(&start), sent[..2]);
    assert_eq!(start["has_more"], json!(false));

    let (_, big) = history(&service, BOB, &format!("peer_id={ALICE}&limit=100000")).await;
    assert_eq!(ids(&big), sent, "an oversized limit is cut to the maximum; stream_id is optional");

    for (what, query) in [
        ("since and before together", format!("{base}&since={}&before={}", sent[1], sent[3])),
        ("limit zero", format!("{base}&limit=0")),
        ("limit not a number", format!("{base}&limit=ten")),
        ("cursor not a message id", format!("{base}&since=yesterday")),
        ("unknown parameter", format!("{base}&sinse={}", sent[1])),
        ("neither stream_id nor peer_id", "limit=10".to_owned()),
        ("stream_id not a stream id", "stream_id=nothex".to_owned()),
    ] {
        let (status, body) = history(&service, ALICE, &query).await;
        assert_clear_error(what, status, &body, 400);
    }
}

#[tokio::test]
async fn a_retry_with_the_same_client_message_id_writes_nothing() {
    let mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;

    let body =
        json!({"sender_id": ALICE, "receiver_id": BOB, "content": "only once", "client_message_id": "web-1:a.b_c"});
    let (s1, h1, first) = post(&service, ALICE, &body).await;
    let (s2, h2, second) = post(&service, ALICE, &body).await;
    assert_eq!(s1, 201, "{first}");
    assert!(h1.get("idempotent-replay").is_none());
    assert_eq!(s2, 200, "a replay answers 200: {second}");
    assert_eq!(h2.get("idempotent-replay").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(first, second, "the retry returns the original message");
    assert_eq!(count(&mongo).await, 1);
    let stored = messages(&mongo).await.find_one(doc! {}).await.expect("find").expect("doc");
    assert_eq!(stored.get_str("client_message_id"), Ok("web-1:a.b_c"));

    // The same key for a different message is a client bug, not a retry.
    let mut changed = body.clone();
    changed["content"] = json!("something else");
    let (status, _, error) = post(&service, ALICE, &changed).await;
    assert_clear_error("reused client_message_id", status, &error, 409);

    // Keys are per sender.
    let bobs =
        json!({"sender_id": BOB, "receiver_id": ALICE, "content": "only once", "client_message_id": "web-1:a.b_c"});
    let (status, _, reply) = post(&service, BOB, &bobs).await;
    assert_eq!(status, 201, "{reply}");
    assert_ne!(reply["message_id"], first["message_id"]);
    assert_eq!(count(&mongo).await, 2);
}

#[tokio::test]
async fn bad_input_and_bad_credentials_are_refused_and_write_nothing() {
    let mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;
    let http = reqwest::Client::new();
    let url = service.url("/chat/messages");
    let good = json!({"sender_id": ALICE, "receiver_id": BOB, "content": "x"});
    let with = |patch: Value| {
        let mut body = good.clone();
        if let (Some(target), Some(fields)) = (body.as_object_mut(), patch.as_object()) {
            for (k, v) in fields {
                target.insert(k.clone(), v.clone());
            }
        }
        http.post(&url).bearer_auth(token(ALICE)).json(&body)
    };
    let raw = |bytes: &[u8]| {
        http.post(&url).bearer_auth(token(ALICE)).header("content-type", "application/json").body(bytes.to_vec())
    };
    let alice = chatstream::UserId::parse(ALICE).expect("valid");
    let forged = chatauth::mint_hs256("not-the-secret-0123456789", &alice, Duration::from_secs(60), None, None);
    let expired = chatauth::mint_hs256_expiring_at(JWT_SECRET, ALICE, 1_000);

    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("malformed JSON", raw(b"{\"sender_id\": "), 400),
        ("not an object", raw(b"[1, 2]"), 422),
        (
            "missing field",
            http.post(&url).bearer_auth(token(ALICE)).json(&json!({"sender_id": ALICE, "content": "x"})),
            422,
        ),
        ("extra field", with(json!({"admin": true})), 422),
        ("content of the wrong type", with(json!({"content": 5})), 422),
        ("sender_id of the wrong type", with(json!({"sender_id": ["alice"]})), 422),
        ("stream_id of the wrong type", with(json!({"stream_id": 7})), 422),
        ("mismatched stream_id", with(json!({"stream_id": stream_of(ALICE, "carol")})), 400),
        ("malformed stream_id", with(json!({"stream_id": "not-a-stream"})), 400),
        ("sender is receiver", with(json!({"receiver_id": ALICE})), 400),
        ("invalid receiver id", with(json!({"receiver_id": "bob smith"})), 400),
        ("empty content", with(json!({"content": ""})), 400),
        ("whitespace content", with(json!({"content": " \n\t "})), 400),
        ("4001 characters", with(json!({"content": "x".repeat(4001)})), 400),
        ("control character", with(json!({"content": "ring \u{7} bell"})), 400),
        ("NUL character", with(json!({"content": "a\u{0}b"})), 400),
        ("empty client_message_id", with(json!({"client_message_id": ""})), 400),
        ("client_message_id with a space", with(json!({"client_message_id": "a b"})), 400),
        ("client_message_id of 129 characters", with(json!({"client_message_id": "k".repeat(129)})), 400),
        ("invalid UTF-8", raw(b"{\"sender_id\":\"alice\",\"receiver_id\":\"bob\",\"content\":\"\xff\xfe\"}"), 400),
        ("no content type", http.post(&url).bearer_auth(token(ALICE)).body(good.to_string()), 415),
        ("no token", http.post(&url).json(&good), 401),
        ("not a bearer token", http.post(&url).header("authorization", "Basic YWxpY2U6eA==").json(&good), 401),
        ("forged token", http.post(&url).bearer_auth(forged).json(&good), 401),
        ("expired token", http.post(&url).bearer_auth(expired).json(&good), 401),
        ("the service token as a user", http.post(&url).bearer_auth(SERVICE_TOKEN).json(&good), 401),
        ("someone else's sender_id", http.post(&url).bearer_auth(token("mallory")).json(&good), 403),
    ];
    for (what, request, expected) in cases {
        let response = request.send().await.expect("answers");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_clear_error(what, status, &body, expected);
    }
    // The limits themselves are accepted: 4000 characters (multi-byte too), newline and tab.
    let (status, _, body) = post(
        &service,
        ALICE,
        &json!({"sender_id": ALICE, "receiver_id": BOB, "content": "é".repeat(4000), "client_message_id": "k".repeat(128)}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    send(ALICE, BOB, "line one\n\tline two", &service).await;
    assert_eq!(count(&mongo).await, 2, "only the two valid messages were written");
}

#[tokio::test]
async fn history_and_internal_reads_are_access_checked() {
    let mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;
    send(ALICE, BOB, "private", &service).await;
    let stream = stream_of(ALICE, BOB);
    let http = reqwest::Client::new();

    // Mallory cannot read alice and bob's stream, whatever she claims.
    for query in [format!("stream_id={stream}&peer_id={BOB}"), format!("stream_id={stream}&peer_id={ALICE}")] {
        let (status, body) = history(&service, "mallory", &query).await;
        assert_clear_error("someone else's stream", status, &body, 400);
    }
    // With only her own pair she reads her own (empty) stream, never theirs.
    let (status, page) = history(&service, "mallory", &format!("peer_id={BOB}")).await;
    assert_eq!(status, 200);
    assert!(ids(&page).is_empty(), "{page}");
    // By stream id alone a reader sees the messages they sent or received: a
    // stranger gets exactly what a conversation without messages gives, so the
    // endpoint is no oracle for who talks to whom.
    let (status, stranger) = history(&service, "mallory", &format!("stream_id={stream}")).await;
    assert_eq!(status, 200, "{stranger}");
    assert!(ids(&stranger).is_empty(), "{stranger}");
    let (_, unused) = history(&service, "mallory", &format!("stream_id={}", stream_of("mallory", "trent"))).await;
    assert_eq!(stranger.get("messages"), unused.get("messages"));
    assert_eq!(stranger.get("has_more"), unused.get("has_more"));
    for user in [ALICE, BOB] {
        let (status, page) = history(&service, user, &format!("stream_id={stream}")).await;
        assert_eq!(status, 200, "{user}: {page}");
        assert_eq!(ids(&page).len(), 1, "{user}: {page}");
    }
    let (status, page) = history(&service, "mallory", &format!("stream_id={}", stream_of("mallory", "trent"))).await;
    assert_eq!(status, 200, "a stream without messages is an empty page: {page}");
    assert!(ids(&page).is_empty(), "{page}");

    let no_token = http
        .get(service.url(&format!("/chat/messages?stream_id={stream}&peer_id={BOB}")))
        .send()
        .await
        .expect("answers");
    let status = no_token.status().as_u16();
    assert_clear_error("history without a token", status, &no_token.json().await.unwrap_or(Value::Null), 401);

    // A token in the query string is accepted only on the subscribe routes: refused
    // here, even a valid one (URLs end up in logs and proxies).
    let by_query = http
        .get(service.url(&format!("/chat/messages?stream_id={stream}&peer_id={BOB}&access_token={}", token(ALICE))))
        .send()
        .await
        .expect("answers");
    assert_eq!(by_query.status().as_u16(), 401);

    // The internal read, sent to the public port, is refused: the public listener
    // only knows the participant-checked read, and a service token is no user token.
    let internal_on_public = http
        .get(service.url(&format!("/chat/messages?stream_id={stream}")))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .expect("answers");
    let status = internal_on_public.status().as_u16();
    let body: Value = internal_on_public.json().await.unwrap_or(Value::Null);
    assert_clear_error("internal read on the public port", status, &body, 401);
    assert!(body.get("messages").is_none());

    // The internal listener wants the service token.
    let internal = service.internal_url(&format!("/chat/messages?stream_id={stream}"));
    let cases = [
        ("no token", http.get(&internal), 401),
        ("wrong service token", http.get(&internal).bearer_auth("wrong-service-token-0123456789"), 403),
        ("a user token", http.get(&internal).bearer_auth(token(ALICE)), 403),
        ("no stream_id", http.get(service.internal_url("/chat/messages")).bearer_auth(SERVICE_TOKEN), 400),
        ("unknown path", http.get(service.internal_url("/chat/nothing-here")).bearer_auth(SERVICE_TOKEN), 404),
    ];
    for (what, request, expected) in cases {
        let response = request.send().await.expect("answers");
        let status = response.status().as_u16();
        assert_clear_error(what, status, &response.json().await.unwrap_or(Value::Null), expected);
    }
    // Writes are not possible on the internal listener at all.
    let post_internal = http
        .post(service.internal_url("/chat/messages"))
        .bearer_auth(SERVICE_TOKEN)
        .json(&json!({"sender_id": ALICE, "receiver_id": BOB, "content": "x"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(post_internal.status().as_u16(), 405);
    assert_eq!(count(&mongo).await, 1);
}

#[tokio::test]
async fn a_mongodb_outage_is_a_quick_503_and_writes_resume_after() {
    let mut mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;
    send(ALICE, BOB, "before the outage", &service).await;

    mongo.stop();
    let body = json!({"sender_id": ALICE, "receiver_id": BOB, "content": "during the outage", "client_message_id": "outage-1"});
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(service.url("/chat/messages"))
        .bearer_auth(token(ALICE))
        .json(&body)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .expect("answers");
    let took = started.elapsed();
    assert_eq!(response.status().as_u16(), 503, "MongoDB down must be 503");
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert!(
        retry_after.as_deref().is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)),
        "Retry-After: {retry_after:?}"
    );
    let error: Value = response.json().await.unwrap_or(Value::Null);
    assert_clear_error("MongoDB down", 503, &error, 503);
    assert!(took < Duration::from_millis(3500), "503 must come quickly, took {took:?}");
    let (status, _) = history(&service, ALICE, &format!("peer_id={BOB}")).await;
    assert_eq!(status, 503, "history is unavailable too");
    let ready = reqwest::get(service.url("/readyz")).await.expect("readyz answers");
    assert_eq!(ready.status().as_u16(), 503, "not ready without MongoDB");

    mongo.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut status, mut reply) = (0, Value::Null);
    while Instant::now() < deadline {
        let (s, _, r) = post(&service, ALICE, &body).await;
        (status, reply) = (s, r);
        if status == 201 || status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(status == 201 || status == 200, "writes resume after MongoDB returns; last {status} {reply}");
    let (status, page) = history(&service, ALICE, &format!("peer_id={BOB}")).await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(2), "one message before, one after: {page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_and_concurrent_retries_are_each_written_once() {
    let mongo = Mongo::start();
    let service = start(&mongo);
    wait_ready(&service).await;

    // Many conversations at once: they share insert batches (group commit).
    let mut posts = Vec::new();
    for i in 0..60 {
        let url = service.url("/chat/messages");
        posts.push(tokio::spawn(async move {
            let (from, to) = (format!("sender{}", i % 20), format!("receiver{i}"));
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(token(&from))
                .json(&json!({"sender_id": from, "receiver_id": to, "content": format!("message {i}")}))
                .send()
                .await
                .expect("answers");
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for post in posts {
        let (status, body) = post.await.expect("task");
        assert_eq!(status, 201, "{body}");
        ids.insert(body["message_id"].as_str().expect("id").to_owned());
    }
    assert_eq!(ids.len(), 60, "sixty distinct messages");
    assert_eq!(count(&mongo).await, 60);

    // The same client_message_id sent ten times at once, to different receivers
    // (so the requests do not queue behind one conversation): one document.
    let mut retries = Vec::new();
    for i in 0..10 {
        let url = service.url("/chat/messages");
        retries.push(tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(token(ALICE))
                .json(&json!({"sender_id": ALICE, "receiver_id": format!("friend{i}"), "content": "same key", "client_message_id": "burst-1"}))
                .send()
                .await
                .expect("answers");
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut statuses = Vec::new();
    for retry in retries {
        statuses.push(retry.await.expect("task").0);
    }
    statuses.sort_unstable();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "exactly one written: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201 || *s == 409), "the others are refused as reused keys: {statuses:?}");
    assert_eq!(count(&mongo).await, 61);
}
