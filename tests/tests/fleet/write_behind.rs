//! Write-behind mode (`WRITE_MODE=write_behind`), black-box: real chatpersistence
//! binaries, a real Redis with its append-only file on as the queue, nx-27017, the
//! broker, the change handler and the socket pod.
//!
//! Why these tests exist: a `202` is a promise that the message will be stored and
//! delivered. They break everything that could break that promise while clients
//! keep posting (chatpersistence killed mid-batch and while MongoDB is down,
//! MongoDB stopped under load, the queue's Redis killed and restarted, two
//! replicas accepting and writing the same conversations while one dies) and then
//! check every acknowledged message: in MongoDB exactly once with the right
//! sequence number, delivered exactly once on the open sockets, in order per
//! conversation. The API test pins the contract: 202 + status, `queued` → `stored`,
//! idempotent retries in both states, the high-water mark, queued messages in history.
//!
//! The MongoDB outage lasts `WB_TEST_OUTAGE_SECONDS` (default 10 s in the suite to
//! keep its wall time modest; the 30 s: `WB_TEST_OUTAGE_SECONDS=30`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatfleet_tests::client::{ChatSocket, Seen};
use chatfleet_tests::{token, ChatFleet, Service, Stack};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use testkit::Redis;

const CONVERSATIONS: usize = 4;

fn wb_env(queue: &Redis) -> Vec<(String, String)> {
    [
        ("WRITE_MODE", "write_behind".to_owned()),
        ("WRITE_BEHIND_REDIS_URL", queue.url()),
        ("WRITE_BEHIND_LEASE_TTL", "1s".to_owned()),
        ("WRITE_BEHIND_MAX_BACKOFF", "500ms".to_owned()),
        ("RELAY_LEASE_TTL", "1s".to_owned()),
        ("MONGODB_TIMEOUT", "1s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn pair(i: usize) -> (String, String) {
    (format!("wb-sender-{i}"), format!("wb-receiver-{i}"))
}

fn stream_of(a: &str, b: &str) -> String {
    chatfleet_tests::client::stream_id(a, b)
}

/// One POST; a refused or timed-out request is status 0.
async fn try_post(http: &reqwest::Client, url: &str, from: &str, to: &str, content: &str, cmid: &str) -> (u16, Value) {
    let body = json!({"sender_id": from, "receiver_id": to, "content": content, "client_message_id": cmid});
    let request =
        http.post(format!("{url}/chat/messages")).bearer_auth(token(from)).json(&body).timeout(Duration::from_secs(5));
    chatfleet_tests::client::send_json(request).await
}

/// Clients posting to every conversation, one message at a time each, retrying a
/// message with the same `client_message_id` until it is acknowledged (202, or 200
/// for a retry of one that was). `acked[i]`: conversation i's acknowledged ids in
/// the order they were posted.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
    statuses: Arc<Mutex<HashMap<u16, u64>>>,
}

impl Load {
    fn start(urls: Vec<String>, tag: &str, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        for i in 0..CONVERSATIONS {
            let (stop, statuses, urls, tag) = (stop.clone(), statuses.clone(), urls.clone(), tag.to_owned());
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let (from, to) = pair(i);
                let mut acked = Vec::new();
                let mut n = 0_usize;
                let mut target = i;
                while !stop.load(Ordering::Relaxed) {
                    let cmid = format!("{tag}-{i}-{n}");
                    let content = format!("message {n} of conversation {i}");
                    // Bounded: a message that cannot be acknowledged in 60 s fails the test.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let url = &urls[target % urls.len()];
                        let (status, body) = try_post(&http, url, &from, &to, &content, &cmid).await;
                        *statuses.lock().expect("statuses").entry(status).or_default() += 1;
                        if status == 202 || status == 200 {
                            let id = body["message_id"].as_str().expect("message_id").to_owned();
                            if acked.last() != Some(&id) {
                                acked.push(id);
                            }
                            break;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "message {cmid} not acknowledged within 60 s: {status} {body}"
                        );
                        // Another replica, if there is one.
                        target += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    target += 1;
                    n += 1;
                    tokio::time::sleep(pause).await;
                }
                acked
            }));
        }
        Self { stop, tasks, statuses }
    }

    async fn finish(self) -> (Vec<Vec<String>>, HashMap<u16, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for task in self.tasks {
            acked.push(task.await.expect("load task"));
        }
        let statuses = self.statuses.lock().expect("statuses").clone();
        (acked, statuses)
    }
}

/// Every message id each receiver's socket is sent, in arrival order.
struct Listeners {
    stop: Arc<AtomicBool>,
    seen: Vec<Arc<Mutex<Vec<String>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Listeners {
    async fn open(sockets: &Service) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut seen = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..CONVERSATIONS {
            let (from, to) = pair(i);
            let mut socket = ChatSocket::connect(sockets, &to, &from, None).await;
            let ids = Arc::new(Mutex::new(Vec::new()));
            let (stop, ids_task) = (stop.clone(), ids.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match socket.next(Duration::from_millis(200)).await {
                        Seen::Frame(frame) if frame["type"] == "message" => {
                            let id = frame["message"]["message_id"].as_str().unwrap_or_default().to_owned();
                            ids_task.lock().expect("seen").push(id);
                        }
                        Seen::Closed(code) => panic!("socket {i} closed ({code:?}): nothing here should close it"),
                        _ => {}
                    }
                }
                socket.close().await;
            }));
            seen.push(ids);
        }
        Self { stop, seen, tasks }
    }

    fn snapshot(&self) -> Vec<Vec<String>> {
        self.seen.iter().map(|s| s.lock().expect("seen").clone()).collect()
    }

    async fn close(self) -> Vec<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("listener");
        }
        self.seen.iter().map(|s| s.lock().expect("seen").clone()).collect()
    }
}

/// Conversation `i`'s stored messages as `(message_id, seq)`, in id order.
async fn stored(stack: &Stack, i: usize) -> Vec<(String, i64)> {
    let client = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client");
    let (from, to) = pair(i);
    let messages = client.database("chat").collection::<Document>("messages");
    let find = messages.find(doc! { "stream_id": { "$eq": stream_of(&from, &to) } }).sort(doc! { "message_id": 1 });
    let Ok(cursor) = find.await else { return Vec::new() };
    let docs: Vec<Document> = futures::TryStreamExt::try_collect(cursor).await.unwrap_or_default();
    docs.iter()
        .map(|d| {
            let seq = d.get_i64("seq").or_else(|_| d.get_i32("seq").map(i64::from)).unwrap_or(-1);
            (d.get_str("message_id").unwrap_or_default().to_owned(), seq)
        })
        .collect()
}

/// Waits until MongoDB holds every acknowledged message, then checks it holds each
/// exactly once, nothing else, numbered 1..n in acceptance order.
async fn assert_stored_exactly_once(stack: &Stack, acked: &[Vec<String>], within: Duration) {
    let deadline = Instant::now() + within;
    for (i, want) in acked.iter().enumerate() {
        let mut have = stored(stack, i).await;
        while have.len() < want.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            have = stored(stack, i).await;
        }
        let ids: Vec<String> = have.iter().map(|(id, _)| id.clone()).collect();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "conversation {i}: a message stored twice");
        let missing: Vec<&String> = want.iter().filter(|id| !unique.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "conversation {i}: {} acknowledged messages not stored: {missing:?}",
            missing.len()
        );
        assert_eq!(&ids, want, "conversation {i}: stored messages differ from the acknowledged ones (extra or order)");
        let seqs: Vec<i64> = have.iter().map(|(_, seq)| *seq).collect();
        let expected: Vec<i64> = (1..=want.len() as i64).collect();
        assert_eq!(seqs, expected, "conversation {i}: sequence numbers not 1..n in acceptance order");
    }
}

/// Waits until every socket saw every acknowledged message of its conversation,
/// then checks each exactly once and in order.
async fn assert_delivered_exactly_once(listeners: Listeners, acked: &[Vec<String>], within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let seen = listeners.snapshot();
        if seen.iter().zip(acked).all(|(seen, want)| seen.len() >= want.len()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A moment more, so a late duplicate would show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = listeners.close().await;
    for (i, (seen, want)) in seen.iter().zip(acked).enumerate() {
        assert_eq!(
            seen,
            want,
            "conversation {i}: the socket saw {} frames for {} acknowledged messages",
            seen.len(),
            want.len()
        );
    }
}

fn outage() -> Duration {
    let seconds = std::env::var("WB_TEST_OUTAGE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    Duration::from_secs(seconds)
}

/// chatpersistence SIGKILLed mid-batch, MongoDB stopped under load, chatpersistence
/// SIGKILLed while MongoDB is down, the queue's Redis SIGKILLed and restarted from
/// its AOF while messages wait in it: every acknowledged message is stored once
/// and delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_survive_kills_and_outages() {
    let mut queue = Redis::start_persistent("always");
    let env = wb_env(&queue);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut fleet = ChatFleet::start(&extra);
    fleet.warm_up().await;
    let listeners = Listeners::open(&fleet.sockets).await;
    let load = Load::start(vec![fleet.persistence.url("")], "kills", Duration::from_millis(20));

    // Batches are being written all the time at this rate: the kill lands mid-batch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.persistence.kill();
    fleet.persistence.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outage_started = Instant::now();
    fleet.stack.mongo.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.persistence.kill();
    fleet.persistence.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queued_before_restart = queue_depth(&queue);
    assert!(queued_before_restart > 0, "messages accepted while MongoDB is down wait in the queue");
    queue.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.restart();
    assert!(
        queue_depth(&queue) >= queued_before_restart,
        "the queue came back from its AOF with what it had ({queued_before_restart})"
    );
    tokio::time::sleep(outage().saturating_sub(outage_started.elapsed())).await;
    fleet.stack.mongo.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (acked, statuses) = load.finish().await;
    let total: usize = acked.iter().map(Vec::len).sum();
    eprintln!("acknowledged {total} messages; statuses {statuses:?}");
    assert!(total > 200, "the load ran ({total} acknowledged)");
    assert!(statuses.get(&202).copied().unwrap_or(0) > 100, "posts kept being accepted during the MongoDB outage");
    assert_stored_exactly_once(&fleet.stack, &acked, Duration::from_secs(90)).await;
    assert_delivered_exactly_once(listeners, &acked, Duration::from_secs(60)).await;
    assert_eq!(queue_depth(&queue), 0, "the queue drained");
}

/// Two replicas accept and write the same conversations; each is SIGKILLed in turn
/// while the other takes over its shards and claims its pending entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_race_and_take_over() {
    let queue = Redis::start_persistent("always");
    let env = wb_env(&queue);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut fleet = ChatFleet::start(&extra);
    let mut second_env = fleet.stack.pipeline_env();
    second_env.extend(env.iter().cloned());
    let mut second = Service::start("chatpersistence", &second_env);
    fleet.warm_up().await;
    let listeners = Listeners::open(&fleet.sockets).await;
    let load = Load::start(vec![fleet.persistence.url(""), second.url("")], "race", Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.persistence.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.persistence.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    second.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, statuses) = load.finish().await;
    let total: usize = acked.iter().map(Vec::len).sum();
    eprintln!("acknowledged {total} messages; statuses {statuses:?}");
    // Enough to cover both kills (about 10 per second per writer while both live;
    // fewer on a machine busy with other builds).
    assert!(total > 100, "the load ran ({total} acknowledged)");
    assert_stored_exactly_once(&fleet.stack, &acked, Duration::from_secs(60)).await;
    assert_delivered_exactly_once(listeners, &acked, Duration::from_secs(60)).await;
}

/// `GET /chat/messages/{id}` as `user`: status code and body.
async fn status_of(service: &Service, user: &str, id: &str) -> (u16, Value) {
    let request = reqwest::Client::new().get(service.url(&format!("/chat/messages/{id}"))).bearer_auth(token(user));
    chatfleet_tests::client::send_json(request).await
}

/// A RESP command to the queue's Redis (the test holds the writers off by taking
/// their shard leases).
fn redis_command(queue: &Redis, args: &[&str]) -> String {
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    testkit::probe(queue.port(), command.as_bytes()).unwrap_or_default()
}

fn queue_depth(queue: &Redis) -> u64 {
    let reply = redis_command(queue, &["GET", "chat:wb:depth"]);
    reply.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

fn hold_writers_off(queue: &Redis, hold: bool) {
    for shard in 0..4 {
        let key = format!("chat:wb:lease:{shard}");
        if hold {
            redis_command(queue, &["SET", &key, "the-test", "PX", "60000"]);
        } else {
            redis_command(queue, &["DEL", &key]);
        }
    }
}

/// A stack, the queue's Redis (append-only file on) and one write-behind
/// chatpersistence with Debezium capture (no relay), plus `extra` settings.
fn start_capture_free(extra: &[(&str, &str)]) -> (Stack, Redis, Service) {
    let stack = Stack::start();
    let queue = Redis::start_persistent("everysec");
    let mut env = stack.env();
    env.extend(wb_env(&queue));
    env.push(("CAPTURE_MODE".into(), "debezium".into()));
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let service = Service::start("chatpersistence", &env);
    (stack, queue, service)
}

/// Waits until message `id` reads `stored` for `user` (at most `within`).
async fn wait_stored(service: &Service, user: &str, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = status_of(service, user, id).await;
        if code == 200 && body["status"] == "stored" {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never stored: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The contract: 202 + `queued`, `stored` once written, idempotent retries in both
/// states (and 409 for a reused id), history with queued messages, the high-water
/// mark's 503 + `Retry-After`, and the numbering once the writers resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_behind_api_contract() {
    let (stack, queue, service) =
        start_capture_free(&[("WRITE_BEHIND_HIGH_WATER", "5"), ("RATE_LIMIT_POST_PER_SECOND", "0")]);
    let http = reqwest::Client::new();
    let url = service.url("");
    let (alice, bob) = ("wb-alice", "wb-bob");

    let (status, first) = try_post(&http, &url, alice, bob, "one", "a-1").await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["status"], "queued");
    let first_id = first["message_id"].as_str().expect("id").to_owned();
    wait_stored(&service, bob, &first_id, Duration::from_secs(20)).await;
    assert_eq!(status_of(&service, "wb-carol", &first_id).await.0, 404, "a stranger sees no message");
    let (code, replay) = try_post(&http, &url, alice, bob, "one", "a-1").await;
    assert_eq!((code, replay["message_id"].as_str()), (200, Some(first_id.as_str())), "retry of a stored message");

    // Writers held off: messages stay queued.
    hold_writers_off(&queue, true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, second) = try_post(&http, &url, alice, bob, "two", "a-2").await;
    assert_eq!(status, 202, "{second}");
    let second_id = second["message_id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = status_of(&service, alice, &second_id).await;
    assert_eq!((code, body["status"].as_str()), (200, Some("queued")), "{body}");
    let (code, replay) = try_post(&http, &url, alice, bob, "two", "a-2").await;
    assert_eq!((code, replay["message_id"].as_str()), (200, Some(second_id.as_str())), "retry of a queued message");
    let (code, _) = try_post(&http, &url, alice, bob, "not two", "a-2").await;
    assert_eq!(code, 409, "a client_message_id reused for another message");
    let history = chatfleet_tests::client::history(&service, bob, alice).await;
    let ids: Vec<&str> = history.iter().filter_map(|m| m["message_id"].as_str()).collect();
    assert_eq!(ids, vec![first_id.as_str(), second_id.as_str()], "history includes the queued message");

    // The high-water mark (5): admission stops with 503 + Retry-After, nothing dropped.
    let mut accepted = vec![first_id.clone(), second_id.clone()];
    let mut refused = None;
    for n in 3..20 {
        let response = http
            .post(format!("{url}/chat/messages"))
            .bearer_auth(token(alice))
            .json(&json!({"sender_id": alice, "receiver_id": bob, "content": format!("n{n}")}))
            .send()
            .await
            .expect("answers");
        match response.status().as_u16() {
            202 => accepted
                .push(response.json::<Value>().await.expect("json")["message_id"].as_str().expect("id").to_owned()),
            503 => {
                refused = response.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_owned());
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted.len(), 6, "five queued (one already stored) before the mark");
    assert!(refused.is_some_and(|r| !r.is_empty()), "503 with Retry-After at the high-water mark");

    hold_writers_off(&queue, false);
    for id in &accepted {
        wait_stored(&service, alice, id, Duration::from_secs(20)).await;
    }
    let client = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo");
    let messages = client.database("chat").collection::<Document>("messages");
    let conversation = client.database("chat").collection::<Document>("conversations");
    let count = messages.count_documents(doc! { "stream_id": { "$eq": stream_of(alice, bob) } }).await.expect("count");
    assert_eq!(count, accepted.len() as u64, "each accepted message stored once");
    let conv =
        conversation.find_one(doc! { "_id": { "$eq": stream_of(alice, bob) } }).await.expect("read").expect("exists");
    let seq = conv.get_i64("seq").or_else(|_| conv.get_i32("seq").map(i64::from)).unwrap_or(-1);
    assert_eq!(seq, accepted.len() as i64, "the conversation counted each message once");
    let (code, after) = try_post(&http, &url, alice, bob, "after", "a-3").await;
    assert_eq!(code, 202, "admission resumes once the queue drained");
    accepted.push(after["message_id"].as_str().expect("id").to_owned());

    // The recent cache: a miss repairs it, the next read is a hit with the same
    // page, a new message is appended, an edit invalidates, losing it loses nothing.
    let page = |messages: Vec<Value>| -> Vec<String> {
        messages.iter().filter_map(|m| m["message_id"].as_str().map(str::to_owned)).collect()
    };
    let hits = || service.counter("recent_cache_reads_total", &[("result", "hit")]);
    let before_hits = hits().await;
    assert_eq!(page(chatfleet_tests::client::history(&service, bob, alice).await), accepted, "first read");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(page(chatfleet_tests::client::history(&service, bob, alice).await), accepted, "cached read");
    assert!(hits().await > before_hits, "the second read came from the cache");
    let edit = http
        .patch(service.url(&format!("/chat/messages/{first_id}")))
        .bearer_auth(token(alice))
        .json(&json!({"content": "one, edited"}))
        .send()
        .await
        .expect("edit answers");
    assert!(edit.status().is_success(), "edit: {}", edit.status());
    let history = chatfleet_tests::client::history(&service, bob, alice).await;
    assert_eq!(history[0]["content"], "one, edited", "an edit is never hidden by the cache");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, last) = try_post(&http, &url, alice, bob, "newest", "a-4").await;
    assert_eq!(code, 202);
    accepted.push(last["message_id"].as_str().expect("id").to_owned());
    assert_eq!(page(chatfleet_tests::client::history(&service, bob, alice).await), accepted, "queued or cached");
    let stream = stream_of(alice, bob);
    redis_command(&queue, &["DEL", &format!("chat:wb:recent:{stream}"), &format!("chat:wb:recent:{stream}:floor")]);
    assert_eq!(
        page(chatfleet_tests::client::history(&service, bob, alice).await),
        accepted,
        "cache lost, nothing lost"
    );
}

/// The inbox in write-behind mode: the writer moves a conversation up for its
/// members (from the stored member list) once it stores the messages, each user's
/// list shows their own conversations in order, and a stranger's shows nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_moves_conversations_up_in_their_members_inboxes() {
    let (_stack, _queue, service) = start_capture_free(&[]);
    let http = reqwest::Client::new();
    let url = service.url("");
    let (alice, bob, carol, stranger) = ("wb-inbox-alice", "wb-inbox-bob", "wb-inbox-carol", "wb-inbox-dave");
    let (with_bob, with_carol) = (stream_of(alice, bob), stream_of(alice, carol));

    // Posts, then waits until the writer stored it (the inbox follows the store).
    let post_stored = |from: &'static str, to: &'static str, cmid: &'static str| {
        let (http, url, service) = (http.clone(), url.clone(), &service);
        async move {
            let (status, body) = try_post(&http, &url, from, to, cmid, cmid).await;
            assert_eq!(status, 202, "{body}");
            let id = body["message_id"].as_str().expect("message_id").to_owned();
            wait_stored(service, from, &id, Duration::from_secs(20)).await;
            // Distinct milliseconds between the steps, so the order is not a tie.
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    };
    let inbox = |user: &'static str| {
        let request = http.get(service.url("/chat/conversations?limit=50")).bearer_auth(token(user));
        async move {
            let (status, body) = chatfleet_tests::client::send_json(request).await;
            assert_eq!(status, 200, "{body}");
            let rows = body["conversations"].as_array().cloned().unwrap_or_default();
            rows.iter().filter_map(|row| row["conversation_id"].as_str().map(str::to_owned)).collect::<Vec<_>>()
        }
    };

    post_stored(alice, bob, "wb-inbox-1").await;
    post_stored(alice, carol, "wb-inbox-2").await;
    assert_eq!(inbox(alice).await, vec![with_carol.clone(), with_bob.clone()], "the newest first");
    // An existing conversation's message moves it up for both members.
    post_stored(bob, alice, "wb-inbox-3").await;
    assert_eq!(inbox(alice).await, vec![with_bob.clone(), with_carol.clone()], "bob's reply moves the pair up");
    assert_eq!(inbox(bob).await, vec![with_bob.clone()]);
    post_stored(carol, alice, "wb-inbox-4").await;
    assert_eq!(inbox(alice).await, vec![with_carol.clone(), with_bob.clone()], "and carol's back");
    assert_eq!(inbox(carol).await, vec![with_carol.clone()]);
    assert!(inbox(stranger).await.is_empty(), "a stranger's inbox shows nobody's conversations");
}
