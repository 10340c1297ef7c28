//! chatpersistence when MongoDB is slow or paused, black-box: the real binary, broker
//! and MongoDB wire server (nx-27017, single-threaded like the local stack's).
//!
//! Why this file exists: the chaos soak found that after MongoDB pauses under load
//! chatpersistence did not come back: the relay's lease went to nobody (every lease
//! task took whichever lease document had expired, see `chatpersistence_relay`), and
//! with a backlog in the outbox the relay counted every pending document once per
//! poll interval, a full collection scan on the stand-in, so MongoDB spent its time
//! counting, the relay's scans and lease renewals timed out behind the counts and
//! the backlog never drained. One test per finding.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack};
use chatstream::{MessageId, StreamId, UserId};
use mongodb::bson::{doc, DateTime, Document};
use rdkafka::Message;
use serde_json::{json, Value};

fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

/// The message ids read from `chat.changes` so far, by a background reader.
#[derive(Clone, Default)]
struct Published(Arc<Mutex<HashSet<String>>>);

impl Published {
    fn start(stack: &Stack) -> Self {
        let published = Self::default();
        let seen = published.0.clone();
        let consumer = chatfleet_tests::topic_reader(&stack.broker.bootstrap(), "chat.changes");
        tokio::spawn(async move {
            while let Ok(record) = consumer.recv().await {
                let value: Value = serde_json::from_slice(record.payload().unwrap_or_default()).unwrap_or(Value::Null);
                if let Some(id) = value["message_id"].as_str() {
                    seen.lock().expect("lock").insert(id.to_owned());
                }
            }
        });
        published
    }

    fn missing(&self, ids: &[String]) -> usize {
        let seen = self.0.lock().expect("lock");
        ids.iter().filter(|id| !seen.contains(*id)).count()
    }

    /// Waits until every id in `ids` was published; how many are still missing.
    async fn until_all(&self, ids: &[String], within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let missing = self.missing(ids);
            if missing == 0 || Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How long until a message posted now is answered 201 (within 2 s) *and* published:
/// the service is back. `None` if not within `within`.
async fn back_after(url: &str, published: &Published, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let mut n = 0;
    while started.elapsed() < within {
        n += 1;
        let body = json!({"sender_id": "probe-a", "receiver_id": "probe-b", "content": format!("probe {n}")});
        let sent = http
            .post(format!("{url}/chat/messages"))
            .bearer_auth(token("probe-a"))
            .json(&body)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(response) = sent {
            if response.status().as_u16() == 201 {
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                let id = answer["message_id"].as_str().unwrap_or_default().to_owned();
                let left = within.saturating_sub(started.elapsed());
                if published.until_all(&[id], left).await == 0 {
                    return Some(started.elapsed());
                }
                return None;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// A client's outbox: posts one message at a time until `stop`, each retried with the
/// same `client_message_id` until answered; pushes every acknowledged id.
async fn poster(url: String, n: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<String>>>, tries: Arc<AtomicU64>) {
    let http = reqwest::Client::new();
    let (from, to) = (format!("pause-{n}-a"), format!("pause-{n}-b"));
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let body = json!({"sender_id": from, "receiver_id": to, "content": format!("m {seq}"),
            "client_message_id": format!("p-{n}-{seq}")});
        let mut backoff = Duration::from_millis(100);
        loop {
            tries.fetch_add(1, Ordering::Relaxed);
            let sent = http
                .post(format!("{url}/chat/messages"))
                .bearer_auth(token(&from))
                .json(&body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if let Ok(response) = sent {
                if matches!(response.status().as_u16(), 200 | 201) {
                    let answer: Value = response.json().await.unwrap_or(Value::Null);
                    if let Some(id) = answer["message_id"].as_str() {
                        acked.lock().expect("lock").push(id.to_owned());
                    }
                    break;
                }
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three pauses of MongoDB longer than the relay's lease under load: after each
/// resume a new message is answered and published within 15 s (every lease expired
/// meanwhile and each lease task must take back its own), and every acknowledged
/// message is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_comes_back_after_each_of_several_mongodb_pauses_under_load() {
    let stack = Stack::start();
    let mut env = stack.pipeline_env();
    env.push(("RATE_LIMIT_POST_PER_SECOND".into(), "0".into()));
    env.push(("RELAY_LEASE_TTL".into(), "3s".into()));
    let service = Service::start("chatpersistence", &env);
    let url = service.url("");
    let published = Published::start(&stack);
    let ready = back_after(&url, &published, Duration::from_secs(30)).await;
    assert!(ready.is_some(), "never delivered a first message:\n{}", service.log_tail(30));

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tries = Arc::new(AtomicU64::new(0));
    let posters: Vec<_> =
        (0..32).map(|n| tokio::spawn(poster(url.clone(), n, stop.clone(), acked.clone(), tries.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = stack.mongo.pid().expect("nx-27017 runs");
    let mut recoveries = Vec::new();
    for _ in 0..3 {
        signal(pid, "STOP");
        tokio::time::sleep(Duration::from_secs(4)).await;
        signal(pid, "CONT");
        let back = back_after(&url, &published, Duration::from_secs(15)).await;
        recoveries.push(back);
        assert!(
            back.is_some(),
            "nothing published 15 s after MongoDB resumed (recoveries {recoveries:?}); log:\n{}",
            service.log_tail(40)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for poster in posters {
        let _ = tokio::time::timeout(Duration::from_secs(15), poster).await;
    }
    let acked: Vec<String> = acked.lock().expect("lock").clone();
    eprintln!("acknowledged {} in {} tries; back after {recoveries:?}", acked.len(), tries.load(Ordering::Relaxed));
    assert!(acked.len() > 200, "the load ran ({} acknowledged)", acked.len());
    let missing = published.until_all(&acked, Duration::from_secs(60)).await;
    assert_eq!(missing, 0, "acknowledged messages never published; log:\n{}", service.log_tail(40));
}

/// How long the backlog test's 8,000 messages may take to drain. Here they drain in
/// about 4 s; with the relay counting the outbox every poll interval they took over 20 s.
const DRAIN_WITHIN: Duration = Duration::from_secs(15);

/// A message document as chatpersistence stores it, marked for the relay.
fn pending_message(n: usize, pending: bool) -> (String, Document) {
    let a = UserId::parse(&format!("backlog-{}", n % 50)).expect("valid");
    let b = UserId::parse("backlog-peer").expect("valid");
    let id = MessageId::new().to_string();
    let mut document = doc! {
        "_id": &id, "message_id": &id, "stream_id": StreamId::for_pair(&a, &b).to_string(),
        "sender_id": a.as_str(), "receiver_id": b.as_str(), "content": format!("backlog {n}"),
        "created_at": DateTime::now(),
    };
    if pending {
        document.insert("outbox_pending", true);
    }
    (id, document)
}

/// An outbox backlog larger than a scan, in a collection of many messages (what a
/// relay finds after an outage): it drains within seconds while posts keep being
/// answered. The relay used to count the pending documents every poll interval while
/// a backlog lasted; on the stand-in each count is a full scan, so MongoDB spent its
/// time counting and the relay's own scans and renewals timed out behind the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_backlog_in_a_large_collection_drains_without_starving_mongodb() {
    let stack = Stack::start();
    let mut env = stack.pipeline_env();
    for (k, v) in [
        ("RATE_LIMIT_POST_PER_SECOND", "0"),
        // Small scans and a short poll interval: any backlog is larger than a scan.
        ("RELAY_BATCH_SIZE", "200"),
        ("RELAY_POLL_INTERVAL", "100ms"),
        ("RELAY_LEASE_TTL", "2s"),
    ] {
        env.push((k.into(), v.into()));
    }
    let mut service = Service::start("chatpersistence", &env);
    let url = service.url("");
    let published = Published::start(&stack);
    // Up once (its indexes created), then down while the backlog is written.
    assert!(back_after(&url, &published, Duration::from_secs(30)).await.is_some(), "{}", service.log_tail(30));
    service.kill();

    // Stored messages, the newest half of them still pending (left by an outage).
    let total: usize = std::env::var("BACKLOG_TOTAL").ok().and_then(|v| v.parse().ok()).unwrap_or(16_000);
    let first_pending = total / 2;
    let client = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client");
    let messages = client.database("chat").collection::<Document>("messages");
    let mut backlog = Vec::new();
    for chunk in 0..total / 1000 {
        let documents: Vec<Document> = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                let (id, document) = pending_message(n, n >= first_pending);
                if n >= first_pending {
                    backlog.push(id);
                }
                document
            })
            .collect();
        messages.insert_many(documents).ordered(false).await.expect("insert the history");
    }

    service.restart();
    let started = Instant::now();
    let missing = published.until_all(&backlog, DRAIN_WITHIN).await;
    let drained = started.elapsed();
    // Posts are answered meanwhile.
    let back = back_after(&url, &published, Duration::from_secs(10)).await;
    eprintln!(
        "backlog of {} drained in {drained:?} ({missing} missing); a new post back after {back:?}",
        backlog.len()
    );
    assert_eq!(missing, 0, "the backlog did not drain within {DRAIN_WITHIN:?}; log:\n{}", service.log_tail(40));
    assert!(back.is_some(), "a post after the backlog was not answered and published; log:\n{}", service.log_tail(40));
}
