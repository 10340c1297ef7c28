//! Every answer to `POST /chat/messages` is definite, even when MongoDB stops
//! answering in the middle of a write.
//!
//! Why this file exists: the chaos soak's clients that retry without a
//! `client_message_id` stored messages twice. A write batch that timed out answered
//! `503` although its insert was already in MongoDB's receive buffer: the paused
//! server committed it when it resumed, and the client's retry (correct after a
//! `503`, which promises nothing was stored) wrote a second copy. chatpersistence now
//! resolves such an insert by message id before answering (`MONGODB_INSERT_RESOLVE_TIMEOUT`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack};
use mongodb::bson::{doc, Document};

const SENDERS: usize = 8;
/// Inserts whose outcome was unknown, by how they were resolved.
const UNKNOWN: &str = "message_write_outcome_unknown_total";

/// SIGSTOP / SIGCONT to the MongoDB stand-in, as a stalled disk or a GC pause would.
fn signal_mongo(stack: &Stack, signal: &str) {
    let pid = stack.mongo.pid().expect("nx-27017 runs");
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
}

/// Posts without a `client_message_id` the way an SDK does: a `503` or `429`
/// (nothing stored) is retried; returns the final status and how many `503`s came first.
async fn post_retrying(http: &reqwest::Client, url: &str, from: &str, to: &str, content: &str) -> (u16, u32) {
    let body = serde_json::json!({ "sender_id": from, "receiver_id": to, "content": content });
    let mut unavailable = 0;
    for _ in 0..600 {
        let sent = http.post(url).bearer_auth(token(from)).json(&body).timeout(Duration::from_secs(60)).send().await;
        let status = sent.map(|r| r.status().as_u16()).expect("chatpersistence answers (it is never killed here)");
        if status == 503 || status == 429 {
            unavailable += u32::from(status == 503);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        return (status, unavailable);
    }
    panic!("{content}: 503/429 for a minute");
}

/// Posts flow from several senders while MongoDB is paused and resumed over and
/// over, until inserts were caught mid-write (the service counts them). Every
/// client retries its `503`s without an id; afterwards every message is stored
/// exactly once. Before the fix, each insert caught mid-write was stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_answer_was_lost_is_resolved_and_stored_exactly_once() {
    let stack = Stack::start();
    let mut env = stack.pipeline_env();
    // Short operation bound: a pause of a second outlives the write.
    env.push(("MONGODB_TIMEOUT".into(), "300ms".into()));
    let persistence = Service::start("chatpersistence", &env);
    let url = persistence.url("/chat/messages");
    let http = reqwest::Client::new();
    // The indexes exist and the path is warm.
    let deadline = Instant::now() + Duration::from_secs(30);
    while post_retrying(&http, &url, "warm-a", "warm-b", "warm-up").await.0 != 201 {
        assert!(Instant::now() < deadline, "chatpersistence never accepted a post");
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for s in 0..SENDERS {
        let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut retried = 0;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let content = format!("definite s{s} n{n}");
                let (status, unavailable) = post_retrying(&http, &url, &format!("sender{s}"), "reader", &content).await;
                assert_eq!(status, 201, "{content}");
                retried += unavailable;
                sent.push(content);
                n += 1;
            }
            (sent, retried)
        }));
    }

    let mut cycles = 0;
    while persistence.counter(UNKNOWN, &[]).await < 3.0 {
        assert!(cycles < 40, "no insert was caught mid-write in {cycles} pauses: the test proves nothing");
        cycles += 1;
        tokio::time::sleep(Duration::from_millis(150 + 37 * (cycles % 7))).await;
        signal_mongo(&stack, "STOP");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        signal_mongo(&stack, "CONT");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = Vec::new();
    for c in clients {
        let (contents, _) = c.await.expect("client task");
        sent.extend(contents);
    }
    let unknown = persistence.counter(UNKNOWN, &[]).await;
    assert!(sent.len() > SENDERS, "too few posts to say anything: {}", sent.len());

    let mongo = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client");
    let messages = mongo.database("chat").collection::<Document>("messages");
    let mut copies: HashMap<String, u32> = HashMap::new();
    let mut cursor = messages.find(doc! { "receiver_id": "reader" }).await.expect("find");
    while cursor.advance().await.expect("cursor") {
        let content = cursor.deserialize_current().expect("doc").get_str("content").unwrap_or_default().to_owned();
        *copies.entry(content).or_default() += 1;
    }
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = sent.iter().filter(|c| !copies.contains_key(*c)).collect();
    assert!(twice.is_empty(), "stored more than once ({unknown} inserts of unknown outcome): {twice:?}");
    assert!(missing.is_empty(), "answered 201 but not stored: {missing:?}");
    assert_eq!(copies.len(), sent.len(), "stored messages nobody was told about");
}
