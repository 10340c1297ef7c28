//! `--write-modes`: direct and write-behind side by side, in one run, at increasing
//! rates.
//!
//! Why this mode exists: write-behind trades a `201` after MongoDB for a `202` after
//! Redis; whether that is worth it is a question of figures measured on the same
//! machine in the same run: the rate each mode accepts and its POST p99, the rate
//! messages reach MongoDB (stored rate), the POST → socket delivery p99, and what
//! MongoDB itself can bulk-insert (the raw rate, the ceiling of any stored rate).
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-release cargo build --release -p chatpersistence \
//!     -p chatwebsocketshandler -p chatpersistencechangehandler
//! CARGO_TARGET_DIR=/work/target-release cargo run --release -p chatfleet-tests --bin loadgen -- \
//!     --write-modes --rates 1000,2000,5000 --duration 10 --conversations 100
//! ```
//!
//! Per mode a private stack (the write-behind one with its queue in a Redis with
//! `appendfsync always`), `--conversations` pairs with the receiver subscribed, and
//! per rate an open-loop schedule of posts (a POST starts on time whether or not the
//! previous ones answered, at most `MAX_IN_FLIGHT` at once), then a drain until
//! every accepted message was stored and delivered (or `--drain` seconds).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatfleet_tests::client::{ChatSocket, Seen};
use chatfleet_tests::{percentile, token, ChatFleet};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

/// Most POSTs in flight at once (beyond it a scheduled POST is counted as not sent).
const MAX_IN_FLIGHT: u64 = 2048;
/// Documents per raw `insert_many` (the writer's batch size).
const RAW_BATCH: usize = 1000;
/// Documents the raw bulk-insert measurement writes.
const RAW_DOCS: usize = 30_000;

struct Options {
    rates: Vec<u64>,
    duration: u64,
    conversations: usize,
    drain: u64,
    appendfsync: String,
}

/// Runs the mode when `--write-modes` is given; the exit code.
pub fn dispatch() -> Option<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--write-modes") {
        return None;
    }
    let mut o = Options {
        rates: vec![1000, 2000, 5000],
        duration: 10,
        conversations: 100,
        drain: 90,
        appendfsync: "always".to_owned(),
    };
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--write-modes" => {
                i += 1;
                continue;
            }
            "--rates" => o.rates = value.split(',').filter_map(|r| r.trim().parse().ok()).collect(),
            "--duration" => o.duration = value.parse().unwrap_or(o.duration),
            "--conversations" => o.conversations = value.parse().unwrap_or(o.conversations),
            "--drain" => o.drain = value.parse().unwrap_or(o.drain),
            "--appendfsync" => o.appendfsync = value,
            other => {
                eprintln!(
                    "unknown argument {other}\nusage: loadgen --write-modes [--rates 1000,2000,5000] [--duration S] \
                     [--conversations N] [--drain S] [--appendfsync always|everysec]"
                );
                return Some(2);
            }
        }
        i += 2;
    }
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    // The pair benchmark's broker profile when its SQLite broker is built (never
    // start that 11-20 min build from here); otherwise the stack's broker, with the
    // servers' data on tmpfs all the same.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(std::path::Path::new("."));
    let scratch = if std::env::var_os("TANSU_BIN").is_some() || root.join(".local/tansu/bin/tansu").is_file() {
        super::broker_profile()
    } else {
        eprintln!("note: no SQLite broker build; the Kafka hop is tansu's memory engine (docs/benchmarks.md)");
        let dir = std::path::Path::new("/dev/shm").join(format!("chatfleet-write-modes-{}", std::process::id()));
        let usable = std::env::var_os("TESTKIT_SCRATCH_DIR").is_none() && std::fs::create_dir_all(&dir).is_ok();
        usable.then(|| {
            std::env::set_var("TESTKIT_SCRATCH_DIR", &dir);
            dir
        })
    };
    let code = run(o);
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    Some(code)
}

#[tokio::main(flavor = "multi_thread")]
async fn run(o: Options) -> i32 {
    println!("# chatfleet loadgen: write modes ({} conversations, {} s per rate)", o.conversations, o.duration);
    let mut rows = Vec::new();
    for mode in ["direct", "write_behind"] {
        let queue = (mode == "write_behind").then(|| testkit::Redis::start_persistent(&o.appendfsync));
        let mut env: Vec<(String, String)> = vec![
            ("LOG_LEVEL".into(), "warn".into()),
            ("RATE_LIMIT_POST_PER_SECOND".into(), "0".into()),
            ("WRITE_MODE".into(), mode.into()),
        ];
        if let Some(queue) = &queue {
            env.push(("WRITE_BEHIND_REDIS_URL".into(), queue.url()));
        }
        let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        eprintln!("{mode}: starting a private stack …");
        let fleet = ChatFleet::start(&extra);
        fleet.warm_up().await;
        let raw = raw_insert_rate(&fleet).await;
        eprintln!("{mode}: raw bulk-insert rate {raw:.0} docs/s");
        let listeners = Listeners::open(&fleet, o.conversations).await;
        for &rate in &o.rates {
            let row = step(&fleet, &listeners, &o, mode, rate, raw).await;
            row.print_progress();
            rows.push(row);
        }
    }
    println!();
    println!("| mode | offered msg/s | accepted msg/s | refused | POST p50 / p99 ms | stored msg/s | stored / raw | delivery p50 / p99 ms | not delivered at drain end | duplicates | raw bulk insert docs/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} | {} | {} / {} | {:.0} | {:.0} % | {} / {} | {} | {} | {:.0} |",
            row.mode,
            row.rate,
            row.accepted_rate,
            row.refused,
            ms(row.post_p50),
            ms(row.post_p99),
            row.stored_rate,
            100.0 * row.stored_rate / row.raw.max(1.0),
            ms(row.delivery_p50),
            ms(row.delivery_p99),
            row.lost,
            row.duplicates,
            row.raw,
        );
    }
    0
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// What MongoDB itself takes: `RAW_DOCS` message-shaped documents in unordered
/// `insert_many` batches of `RAW_BATCH`, journaled, into a scratch collection.
async fn raw_insert_rate(fleet: &ChatFleet) -> f64 {
    let Ok(client) = mongodb::Client::with_uri_str(fleet.stack.mongo.uri()).await else { return 0.0 };
    let concern =
        mongodb::options::WriteConcern::builder().w(mongodb::options::Acknowledgment::Majority).journal(true).build();
    let collection = client.database("chat").collection::<Document>("raw_insert_benchmark");
    let started = Instant::now();
    let mut written = 0;
    while written < RAW_DOCS {
        let docs: Vec<Document> = (0..RAW_BATCH)
            .map(|i| {
                let id = chatstream::MessageId::new().to_string();
                doc! {
                    "_id": &id, "message_id": &id, "stream_id": format!("{:032x}", i % 100),
                    "sender_id": "raw-sender", "receiver_id": "raw-receiver",
                    "content": "a benchmark message of ordinary length, about sixty bytes",
                    "created_at": mongodb::bson::DateTime::now(), "outbox_pending": true, "seq": i as i64,
                }
            })
            .collect();
        if collection.insert_many(docs).ordered(false).write_concern(concern.clone()).await.is_err() {
            return 0.0;
        }
        written += RAW_BATCH;
    }
    let rate = written as f64 / started.elapsed().as_secs_f64();
    let _ = collection.drop().await;
    rate
}

/// The receivers' sockets: when each message id arrived.
struct Listeners {
    arrivals: Arc<Mutex<HashMap<String, (Instant, u32)>>>,
}

impl Listeners {
    async fn open(fleet: &ChatFleet, conversations: usize) -> Self {
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        for i in 0..conversations {
            let (sender, receiver) = pair(i);
            let mut socket = ChatSocket::connect(&fleet.sockets, &receiver, &sender, None).await;
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                loop {
                    match socket.next(Duration::from_secs(3600)).await {
                        Seen::Frame(frame) if frame["type"] == "message" => {
                            let id = frame["message"]["message_id"].as_str().unwrap_or_default().to_owned();
                            let mut map = arrivals.lock().unwrap_or_else(|p| p.into_inner());
                            map.entry(id).and_modify(|(_, n)| *n += 1).or_insert((Instant::now(), 1));
                        }
                        Seen::Closed(_) => return,
                        _ => {}
                    }
                }
            });
        }
        Self { arrivals }
    }
}

fn pair(i: usize) -> (String, String) {
    (format!("wm-sender-{i}"), format!("wm-receiver-{i}"))
}

struct Row {
    mode: &'static str,
    rate: u64,
    accepted_rate: f64,
    refused: u64,
    post_p50: Duration,
    post_p99: Duration,
    stored_rate: f64,
    delivery_p50: Duration,
    delivery_p99: Duration,
    lost: usize,
    duplicates: usize,
    raw: f64,
}

impl Row {
    fn print_progress(&self) {
        eprintln!(
            "{} @ {}/s: accepted {:.0}/s, POST p99 {} ms, stored {:.0}/s, delivery p99 {} ms, not delivered {}, dup {}",
            self.mode,
            self.rate,
            self.accepted_rate,
            ms(self.post_p99),
            self.stored_rate,
            ms(self.delivery_p99),
            self.lost,
            self.duplicates
        );
    }
}

/// Messages chatpersistence has written to MongoDB so far (its own counter: a count
/// query would load the database it measures).
async fn stored_count(fleet: &ChatFleet) -> u64 {
    let Ok(response) = reqwest::get(fleet.persistence.url("/metrics")).await else { return 0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| {
            ["messages_written_total", "write_behind_stored_total"]
                .iter()
                .any(|name| line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{")))
        })
        .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

async fn step(fleet: &ChatFleet, listeners: &Listeners, o: &Options, mode: &'static str, rate: u64, raw: f64) -> Row {
    let http = reqwest::Client::builder().pool_max_idle_per_host(4096).build().expect("http client");
    let url = fleet.persistence.url("/chat/messages");
    let stored_before = stored_count(fleet).await;
    let results: Arc<Mutex<Vec<(String, Instant, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let total = rate * o.duration;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (http, url, results, refused, in_flight) =
            (http.clone(), url.clone(), results.clone(), refused.clone(), in_flight.clone());
        let (sender, receiver) = pair(n as usize % o.conversations);
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let body = json!({"sender_id": sender, "receiver_id": receiver, "content": format!("benchmark {n}")});
            let sent =
                http.post(&url).bearer_auth(token(&sender)).json(&body).timeout(Duration::from_secs(30)).send().await;
            let latency = begun.elapsed();
            match sent {
                Ok(response) if response.status().as_u16() == 201 || response.status().as_u16() == 202 => {
                    let value: Value = response.json().await.unwrap_or(Value::Null);
                    if let Some(id) = value["message_id"].as_str() {
                        results.lock().unwrap_or_else(|p| p.into_inner()).push((id.to_owned(), begun, latency));
                    }
                }
                _ => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let posting = started.elapsed();
    let accepted: Vec<(String, Instant, Duration)> = results.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Stored: until MongoDB holds every accepted message (direct: already).
    let want = stored_before + accepted.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(o.drain);
    let mut stored_at = Instant::now();
    while Instant::now() < deadline {
        if stored_count(fleet).await >= want {
            stored_at = Instant::now();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored_now = stored_count(fleet).await.saturating_sub(stored_before);
    let stored_rate = stored_now as f64 / stored_at.duration_since(started).as_secs_f64().max(posting.as_secs_f64());
    // Delivered: until every accepted message reached its socket.
    while Instant::now() < deadline {
        let arrived = {
            let map = listeners.arrivals.lock().unwrap_or_else(|p| p.into_inner());
            accepted.iter().filter(|(id, _, _)| map.contains_key(id)).count()
        };
        if arrived == accepted.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let map = listeners.arrivals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut post: Vec<Duration> = accepted.iter().map(|(_, _, latency)| *latency).collect();
    post.sort();
    let mut delivery: Vec<Duration> = accepted
        .iter()
        .filter_map(|(id, begun, _)| map.get(id).map(|(at, _)| at.saturating_duration_since(*begun)))
        .collect();
    delivery.sort();
    let lost = accepted.iter().filter(|(id, _, _)| !map.contains_key(id)).count();
    let duplicates = accepted.iter().filter_map(|(id, _, _)| map.get(id)).filter(|(_, n)| *n > 1).count();
    Row {
        mode,
        rate,
        accepted_rate: accepted.len() as f64 / posting.as_secs_f64(),
        refused: refused.load(Ordering::Relaxed),
        post_p50: percentile(&post, 50.0),
        post_p99: percentile(&post, 99.0),
        stored_rate,
        delivery_p50: percentile(&delivery, 50.0),
        delivery_p99: percentile(&delivery, 99.0),
        lost,
        duplicates,
        raw,
    }
}
