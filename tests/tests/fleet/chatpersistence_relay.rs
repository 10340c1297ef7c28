//! The outbox relay (`CAPTURE_MODE=outbox`), black-box: real chatpersistence
//! binaries, a real broker and MongoDB wire server; the test reads `chat.changes`
//! with its own consumer.
//!
//! Why these tests exist: the relay is what makes "written once to MongoDB" turn
//! into "delivered" without Debezium. They show the record format is Debezium's
//! flattened one keyed by stream id, that one conversation stays in order, and that
//! nothing acknowledged to a client is lost when the broker stalls, the relay is
//! killed mid-batch, or the replica holding the lease dies.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack};
use chatstream::{ChangeEvent, ChangeOp};
use mongodb::bson::doc;
use rdkafka::consumer::StreamConsumer;
use rdkafka::Message;
use serde_json::{json, Value};

const TOPIC: &str = "chat.changes";

fn env(stack: &Stack, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = stack.env();
    env.push(("CAPTURE_MODE".into(), "outbox".into()));
    // The relay tests post bursts from one sender; the rate limit has its own tests.
    env.push(("RATE_LIMIT_POST_PER_SECOND".into(), "0".into()));
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env
}

fn stream_of(a: &str, b: &str) -> String {
    let a = chatstream::UserId::parse(a).expect("valid");
    let b = chatstream::UserId::parse(b).expect("valid");
    chatstream::StreamId::for_pair(&a, &b).to_string()
}

async fn wait_ready(service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(response) = reqwest::get(service.url("/readyz")).await {
            if response.status().as_u16() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never became ready:\n{}", service.name, service.log_tail(30));
}

/// Posts and returns `(status, body)`; a refused connection is status 0.
async fn try_post(http: &reqwest::Client, service_url: &str, from: &str, to: &str, content: &str) -> (u16, Value) {
    let request = http
        .post(format!("{service_url}/chat/messages"))
        .bearer_auth(token(from))
        .json(&json!({"sender_id": from, "receiver_id": to, "content": content}))
        .timeout(Duration::from_secs(10));
    chatfleet_tests::client::send_json(request).await
}

async fn post_ok(service: &Service, from: &str, to: &str, content: &str) -> Value {
    let started = Instant::now();
    let (status, body) = try_post(&reqwest::Client::new(), &service.url(""), from, to, content).await;
    assert_eq!(status, 201, "POST answered {status}: {body}");
    assert!(started.elapsed() < Duration::from_secs(2), "POST took {:?}", started.elapsed());
    body
}

fn id_of(body: &Value) -> String {
    body["message_id"].as_str().expect("message_id").to_owned()
}

/// The relay's Prometheus gauges and counters, by name (unlabelled ones only).
async fn metrics(service: &Service) -> HashMap<String, f64> {
    let Ok(response) = reqwest::get(service.url("/metrics")).await else {
        return HashMap::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, value)| value.trim().parse().ok().map(|v| (name.to_owned(), v)))
        .collect()
}

async fn metric(service: &Service, name: &str) -> f64 {
    metrics(service).await.get(name).copied().unwrap_or(0.0)
}

async fn pending(stack: &Stack) -> u64 {
    let client = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client");
    client
        .database("chat")
        .collection::<mongodb::bson::Document>("messages")
        .count_documents(doc! { "outbox_pending": true })
        .await
        .expect("count")
}

/// One record read from the topic.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    partition: i32,
    value: Value,
    event: ChangeEvent,
}

/// The test's own reader of `chat.changes`, from the beginning.
struct Changes {
    consumer: StreamConsumer,
    seen: Vec<Seen>,
}

impl Changes {
    fn new(stack: &Stack) -> Self {
        let consumer = chatfleet_tests::topic_reader(&stack.broker.bootstrap(), TOPIC);
        Self { consumer, seen: Vec::new() }
    }

    /// Reads until every id in `want` was seen (at least once) or `timeout` passed;
    /// returns the ids still missing.
    async fn until_all(&mut self, want: &[String], timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let have: HashSet<String> = self.seen.iter().map(|s| s.event.message_id().to_string()).collect();
            let missing: Vec<String> = want.iter().filter(|id| !have.contains(*id)).cloned().collect();
            if missing.is_empty() {
                return missing;
            }
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => return missing,
                Ok(Err(err)) => panic!("consumer error: {err}"),
                Ok(Ok(record)) => {
                    let key = record.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    let payload = record.payload().unwrap_or_default();
                    let value: Value = serde_json::from_slice(payload).expect("record value is JSON");
                    let event = ChangeEvent::parse(payload).expect("record value is a change event");
                    self.seen.push(Seen { key, partition: record.partition(), value, event });
                }
            }
        }
    }

    /// Message ids in the order first seen on the topic, for one stream.
    fn first_seen_order(&self, stream: &str) -> Vec<String> {
        let mut order = Vec::new();
        let mut known = HashSet::new();
        for seen in self.seen.iter().filter(|s| s.key == stream) {
            let id = seen.event.message_id().to_string();
            if known.insert(id.clone()) {
                order.push(id);
            }
        }
        order
    }
}

#[tokio::test]
async fn a_post_is_published_flattened_and_keyed_by_its_stream() {
    let stack = Stack::start();
    let service = Service::start("chatpersistence", &env(&stack, &[]));
    wait_ready(&service).await;
    let mut changes = Changes::new(&stack);

    let body = post_ok(&service, "alice", "bob", "hello <b>bob</b>").await;
    let id = id_of(&body);
    let missing = changes.until_all(std::slice::from_ref(&id), Duration::from_secs(20)).await;
    assert!(missing.is_empty(), "never published; log:\n{}", service.log_tail(30));

    let seen = changes.seen.iter().find(|s| s.event.message_id().to_string() == id).expect("seen").clone();
    assert_eq!(seen.key, stream_of("alice", "bob"), "keyed by stream_id");
    assert_eq!(seen.event.op, ChangeOp::Create);
    let posted: chatstream::ChatMessage = serde_json::from_value(body.clone()).expect("POST body is a message");
    assert_eq!(seen.event.message, posted, "the event carries the stored message");
    // Debezium's ExtractNewDocumentState shape, field by field.
    let v = &seen.value;
    assert_eq!(v["_id"], json!(id));
    assert_eq!(v["message_id"], json!(id));
    assert_eq!(v["stream_id"], body["stream_id"]);
    assert_eq!(v["content"], json!("hello <b>bob</b>"));
    assert_eq!(v["created_at"], json!(posted.created_at.timestamp_millis()), "dates are epoch milliseconds");
    assert_eq!(v["__op"], json!("c"));
    assert_eq!(v["__deleted"], json!("false"));
    assert!(v["__source_ts_ms"].as_i64().is_some_and(|ts| ts > 0), "{v}");
    assert!(v.get("outbox_pending").is_none(), "the marker is not part of the event: {v}");

    // The marker is cleared once the broker acknowledged.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pending(&stack).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending(&stack).await, 0, "outbox marker cleared after the publish");
    assert!(metric(&service, "relay_published_total").await >= 1.0);
    assert_eq!(metric(&service, "relay_is_leader").await, 1.0);
}

#[tokio::test]
async fn one_conversation_is_published_in_order() {
    let stack = Stack::start();
    let service = Service::start("chatpersistence", &env(&stack, &[]));
    wait_ready(&service).await;
    let mut changes = Changes::new(&stack);

    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut all = Vec::new();
    for i in 0..60 {
        let (from, to) = match i % 3 {
            0 => ("alice", "bob"),
            1 => ("bob", "alice"),
            _ => ("carol", "dave"),
        };
        let id = id_of(&post_ok(&service, from, to, &format!("message {i}")).await);
        expected.entry(stream_of(from, to)).or_default().push(id.clone());
        all.push(id);
    }
    let missing = changes.until_all(&all, Duration::from_secs(30)).await;
    assert!(missing.is_empty(), "{} messages never published", missing.len());
    for (stream, ids) in &expected {
        assert_eq!(&changes.first_seen_order(stream), ids, "stream {stream} in posting order");
        let partitions: HashSet<i32> = changes.seen.iter().filter(|s| &s.key == stream).map(|s| s.partition).collect();
        assert_eq!(partitions.len(), 1, "one conversation, one partition: {partitions:?}");
    }
}

#[tokio::test]
async fn a_paused_broker_delays_messages_but_loses_none() {
    let stack = Stack::start();
    let service = Service::start("chatpersistence", &env(&stack, &[]));
    wait_ready(&service).await;
    // The relay is up and has published before the pause.
    let warm = id_of(&post_ok(&service, "alice", "bob", "before the pause").await);
    let mut changes = Changes::new(&stack);
    assert!(changes.until_all(std::slice::from_ref(&warm), Duration::from_secs(20)).await.is_empty());

    stack.broker.pause();
    let paused_at = Instant::now();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(id_of(&post_ok(&service, "alice", "bob", &format!("while paused {i}")).await));
    }
    assert!(paused_at.elapsed() < Duration::from_secs(5), "posting does not wait for the broker");
    assert_eq!(pending(&stack).await, 50, "all 50 wait in the outbox while the broker is stopped");
    let ready = reqwest::get(service.url("/readyz")).await.expect("readyz");
    assert_eq!(ready.status().as_u16(), 200, "readiness does not depend on the broker");
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(paused_at.elapsed())).await;
    stack.broker.resume();

    let missing = changes.until_all(&ids, Duration::from_secs(45)).await;
    assert!(missing.is_empty(), "{} of 50 lost; log:\n{}", missing.len(), service.log_tail(30));
    assert_eq!(changes.first_seen_order(&stream_of("alice", "bob"))[1..], ids[..], "still in order");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(&stack).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending(&stack).await, 0, "every marker cleared after the broker came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_batch_loses_nothing_acknowledged() {
    let stack = Stack::start();
    let mut service = Service::start("chatpersistence", &env(&stack, &[]));
    wait_ready(&service).await;
    let mut changes = Changes::new(&stack);

    // Posters keep writing while the process is killed and restarted.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut posters = Vec::new();
    for p in 0..4 {
        let url = service.url("");
        let acknowledged = acknowledged.clone();
        let stop = stop.clone();
        posters.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (from, to) = (format!("poster{p}"), format!("peer{p}"));
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = try_post(&http, &url, &from, &to, &format!("m{i}")).await;
                if status == 201 {
                    acknowledged.lock().expect("lock").push(id_of(&body));
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = acknowledged.lock().expect("lock").len();
    tokio::task::block_in_place(|| {
        service.kill();
        service.restart();
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for poster in posters {
        poster.await.expect("poster");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(before_kill > 10, "messages were flowing before the kill ({before_kill})");
    assert!(acknowledged.len() > before_kill, "and after the restart");

    let missing = changes.until_all(&acknowledged, Duration::from_secs(30)).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages never published; log:\n{}",
        missing.len(),
        acknowledged.len(),
        service.log_tail(30)
    );
    eprintln!(
        "acknowledged {} ({before_kill} before the kill), {} records on the topic (duplicates are allowed)",
        acknowledged.len(),
        changes.seen.len()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(&stack).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending(&stack).await, 0);
}

async fn leaders(replicas: &[&Service]) -> Vec<f64> {
    let mut out = Vec::new();
    for replica in replicas {
        out.push(metric(replica, "relay_is_leader").await);
    }
    out
}

#[tokio::test]
async fn two_replicas_have_one_leader_and_publish_everything() {
    let stack = Stack::start();
    let env = env(&stack, &[("RELAY_LEASE_TTL", "3s")]);
    let first = Service::start("chatpersistence", &env);
    let second = Service::start("chatpersistence", &env);
    wait_ready(&first).await;
    wait_ready(&second).await;
    let mut changes = Changes::new(&stack);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = leaders(&[&first, &second]).await;
    while now.iter().sum::<f64>() != 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = leaders(&[&first, &second]).await;
    }
    assert_eq!(now.iter().sum::<f64>(), 1.0, "exactly one leader: {now:?}");
    let (leader, follower) = if now[0] == 1.0 { (&first, &second) } else { (&second, &first) };

    // Round one: one conversation written through both replicas. Everything is
    // published; the follower's messages wait for the leader's sweep.
    let mut ids = Vec::new();
    for i in 0..30 {
        let replica = if i % 2 == 0 { leader } else { follower };
        ids.push(id_of(&post_ok(replica, "alice", "bob", &format!("round one {i}")).await));
    }
    let missing = changes.until_all(&ids, Duration::from_secs(30)).await;
    assert!(missing.is_empty(), "{} never published", missing.len());

    // The leader noticed another replica takes writes and publishes in id order.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(leader, "relay_ordered_mode").await != 1.0 && Instant::now() < deadline {
        ids.push(id_of(&post_ok(follower, "alice", "bob", "nudge").await));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(leader, "relay_ordered_mode").await, 1.0, "ordered mode after foreign writes");
    let mut round_two = Vec::new();
    for i in 0..30 {
        let replica = if i % 2 == 0 { leader } else { follower };
        round_two.push(id_of(&post_ok(replica, "bob", "alice", &format!("round two {i}")).await));
    }
    ids.extend(round_two.iter().cloned());
    let missing = changes.until_all(&ids, Duration::from_secs(30)).await;
    assert!(missing.is_empty(), "{} never published", missing.len());
    let order = changes.first_seen_order(&stream_of("alice", "bob"));
    let tail = order[order.len() - round_two.len()..].to_vec();
    assert_eq!(tail, round_two, "in ordered mode one conversation through two replicas stays in order");

    // Still exactly one leader, and only it published.
    assert_eq!(leaders(&[&first, &second]).await.iter().sum::<f64>(), 1.0);
    assert!(metric(leader, "relay_published_total").await >= ids.len() as f64);
    assert_eq!(metric(follower, "relay_published_total").await, 0.0, "the follower never publishes");
    assert_eq!(changes.seen.len(), ids.len(), "no duplicates without failures");
}

#[tokio::test]
async fn a_dead_leader_is_replaced_within_the_lease_ttl() {
    let stack = Stack::start();
    let ttl = Duration::from_secs(3);
    let env = env(&stack, &[("RELAY_LEASE_TTL", "3s")]);
    let mut first = Service::start("chatpersistence", &env);
    wait_ready(&first).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&first, "relay_is_leader").await != 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&first, "relay_is_leader").await, 1.0, "the first replica leads");
    let second = Service::start("chatpersistence", &env);
    wait_ready(&second).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(metric(&second, "relay_is_leader").await, 0.0, "the second one follows");

    let mut changes = Changes::new(&stack);
    let warm = id_of(&post_ok(&second, "alice", "bob", "published by the first replica").await);
    assert!(changes.until_all(std::slice::from_ref(&warm), Duration::from_secs(20)).await.is_empty());

    first.kill();
    let killed_at = Instant::now();
    // Written while nobody leads: they wait in the outbox.
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(id_of(&post_ok(&second, "alice", "bob", &format!("orphan {i}")).await));
    }
    let deadline = killed_at + ttl + Duration::from_secs(4);
    while metric(&second, "relay_is_leader").await != 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed_at.elapsed();
    assert_eq!(metric(&second, "relay_is_leader").await, 1.0, "no takeover within {took:?}");
    assert!(took <= ttl + Duration::from_secs(3), "takeover took {took:?}");

    let missing = changes.until_all(&ids, Duration::from_secs(15)).await;
    assert!(missing.is_empty(), "{} pending messages never published after the takeover", missing.len());
    assert!(second.log_tail(200).contains("relay became leader"), "leadership changes are logged");
}

/// Regression test of the lease bug behind the flaky
/// `write_behind::two_writers_race_and_take_over`: the acquire-or-renew upsert
/// `{_id: <lease>, $or: [holder == me, expires_at < now]}` matched *any* expired lease
/// document on the MongoDB stand-in (its SQL came out as `_id = ? AND a OR b`), so
/// the relay's task took another lease's document and published although a live
/// holder had `chat.changes`, and the leases' documents moved between tasks until
/// the relay's one was held by nobody. Here: expired documents of other leases, a
/// live foreign holder of `chat.changes`. The replica must leave every other
/// lease's document alone, not lead (nor publish) while the foreign lease lives,
/// and take over once it lapses.
#[tokio::test]
async fn a_lease_task_only_ever_takes_its_own_lease_document() {
    let stack = Stack::start();
    let client = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client");
    let leases = client.database("chat").collection::<mongodb::bson::Document>("relay_leases");
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    for i in 0..4 {
        let stale = doc! { "_id": format!("stale-{i}"), "holder": format!("gone-{i}"), "expires_at": 1_i64 };
        leases.insert_one(stale).await.expect("insert a stale lease");
    }
    let foreign = doc! { "_id": TOPIC, "holder": "the-test", "expires_at": now_ms() + 60_000 };
    leases.insert_one(foreign).await.expect("insert the foreign lease");

    let service = Service::start("chatpersistence", &env(&stack, &[("RELAY_LEASE_TTL", "1s")]));
    wait_ready(&service).await;
    let body = post_ok(&service, "alice", "bob", "waits for the lease").await;
    let id = id_of(&body);
    // Six renewal rounds of each of the three lease tasks.
    tokio::time::sleep(Duration::from_secs(2)).await;

    for i in 0..4 {
        let stale = leases.find_one(doc! { "_id": format!("stale-{i}") }).await.expect("read").expect("still there");
        assert_eq!(
            stale.get_str("holder"),
            Ok(format!("gone-{i}").as_str()),
            "another lease's document was taken: {stale}"
        );
    }
    let held = leases.find_one(doc! { "_id": TOPIC }).await.expect("read").expect("there");
    assert_eq!(held.get_str("holder"), Ok("the-test"), "the live foreign lease was taken: {held}");
    assert_eq!(metric(&service, "relay_is_leader").await, 0.0, "leads while another holder's lease lives");
    assert_eq!(metric(&service, "relay_published_total").await, 0.0, "published without the lease");
    // The replica's own leases for the other captures: one document each, distinct holders.
    let mut holders = HashSet::new();
    for name in ["conversation-events", "domain-collections"] {
        let own = leases.find_one(doc! { "_id": name }).await.expect("read").expect("created");
        holders.insert(own.get_str("holder").expect("holder").to_owned());
    }
    assert_eq!(holders.len(), 2, "two lease tasks share one holder document");

    // The foreign holder goes away: the replica takes over and publishes.
    leases.update_one(doc! { "_id": TOPIC }, doc! { "$set": { "expires_at": 0_i64 } }).await.expect("expire");
    let mut changes = Changes::new(&stack);
    let missing = changes.until_all(std::slice::from_ref(&id), Duration::from_secs(20)).await;
    assert!(missing.is_empty(), "never published after the lease lapsed; log:\n{}", service.log_tail(30));
    assert_eq!(metric(&service, "relay_is_leader").await, 1.0);
    let held = leases.find_one(doc! { "_id": TOPIC }).await.expect("read").expect("there");
    assert_ne!(held.get_str("holder"), Ok("the-test"), "{held}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Not a pass/fail test: measures POST latency and POST → record-on-topic latency
/// at a fixed rate. `RELAY_PROBE_RATE` (messages/s, default 200) and
/// `RELAY_PROBE_SECONDS` (default 5). Run with
/// `cargo test -p chatfleet-tests --test fleet -- chatpersistence_relay:: --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn relay_latency_probe() {
    let rate: u64 = std::env::var("RELAY_PROBE_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let seconds: u64 = std::env::var("RELAY_PROBE_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let log_level = std::env::var("RELAY_PROBE_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
    let stack = Stack::start();
    // Extra settings for the service: `RELAY_PROBE_ENV="MONGODB_INSERT_BATCH=1,..."`.
    let extra = std::env::var("RELAY_PROBE_ENV").unwrap_or_default();
    let mut vars: Vec<(&str, &str)> = extra.split(',').filter_map(|kv| kv.split_once('=')).collect();
    vars.push(("LOG_LEVEL", &log_level));
    let service = Service::start("chatpersistence", &env(&stack, &vars));
    wait_ready(&service).await;
    let mut changes = Changes::new(&stack);
    // Warm up the consumer (group join) and the relay.
    let warm = id_of(&post_ok(&service, "warm", "up", "warm up").await);
    assert!(changes.until_all(std::slice::from_ref(&warm), Duration::from_secs(20)).await.is_empty());

    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let reader_arrivals = arrivals.clone();
    let reader = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds + 15);
        while let Ok(Ok(record)) = tokio::time::timeout_at(deadline, changes.consumer.recv()).await {
            let at = Instant::now();
            if let Ok(event) = ChangeEvent::parse(record.payload().unwrap_or_default()) {
                reader_arrivals.lock().expect("lock").entry(event.message_id().to_string()).or_insert(at);
            }
        }
    });

    let http = reqwest::Client::new();
    let url = service.url("");
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut tasks = Vec::new();
    for i in 0..total {
        ticker.tick().await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (from, to) = (format!("u{}", i % 100), format!("v{}", i % 100));
            let sent = Instant::now();
            let (status, body) = try_post(&http, &url, &from, &to, &format!("probe {i}")).await;
            (status, body["message_id"].as_str().unwrap_or_default().to_owned(), sent, sent.elapsed())
        }));
    }
    let mut posts = Vec::new();
    for task in tasks {
        posts.push(task.await.expect("post task"));
    }
    let accepted: Vec<_> = posts.iter().filter(|p| p.0 == 201).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while arrivals.lock().expect("lock").len() < accepted.len() + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.abort();
    let arrivals = arrivals.lock().expect("lock").clone();
    let mut post_latency: Vec<Duration> = accepted.iter().map(|p| p.3).collect();
    let mut relay_latency: Vec<Duration> =
        accepted.iter().filter_map(|p| arrivals.get(&p.1).map(|at| at.saturating_duration_since(p.2))).collect();
    post_latency.sort();
    relay_latency.sort();
    let show = |v: &[Duration]| {
        format!(
            "p50 {:?} p95 {:?} p99 {:?} max {:?}",
            percentile(v, 0.5),
            percentile(v, 0.95),
            percentile(v, 0.99),
            v.last().copied().unwrap_or_default()
        )
    };
    eprintln!(
        "rate {rate}/s for {seconds}s: {} posted, {} accepted, {} on the topic",
        posts.len(),
        accepted.len(),
        relay_latency.len()
    );
    eprintln!("POST latency:            {}", show(&post_latency));
    eprintln!("POST → topic (consumer): {}", show(&relay_latency));
    let text = reqwest::get(service.url("/metrics")).await.expect("metrics").text().await.unwrap_or_default();
    for line in text.lines().filter(|l| l.starts_with("relay_") || l.starts_with("message_write_")) {
        eprintln!("  {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_over_at_once() {
    let stack = Stack::start();
    let env = env(&stack, &[("RELAY_LEASE_TTL", "9s")]);
    let mut first = Service::start("chatpersistence", &env);
    wait_ready(&first).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&first, "relay_is_leader").await != 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = Service::start("chatpersistence", &env);
    wait_ready(&second).await;
    let mut changes = Changes::new(&stack);
    let before = id_of(&post_ok(&first, "alice", "bob", "before the handover").await);

    let stopped_at = Instant::now();
    let status = tokio::task::block_in_place(|| first.terminate(Duration::from_secs(15)));
    assert!(status.is_some_and(|s| s.success()), "clean exit on SIGTERM: {status:?}");
    let after = id_of(&post_ok(&second, "alice", "bob", "after the handover").await);
    // Released, not expired: the successor's next attempt (every TTL/3 = 3 s) takes
    // it; waiting for expiry would take at least TTL - TTL/3 = 6 s.
    let deadline = Instant::now() + Duration::from_secs(8);
    while metric(&second, "relay_is_leader").await != 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stopped_at.elapsed();
    assert_eq!(metric(&second, "relay_is_leader").await, 1.0, "no takeover within {took:?}");
    assert!(took < Duration::from_millis(5500), "a released lease is taken before it would expire ({took:?})");
    let missing = changes.until_all(&[before, after], Duration::from_secs(15)).await;
    assert!(missing.is_empty(), "lost across the handover: {missing:?}");
}
