//! The inbox benchmark: one user with 10,000 conversations, and the latency of
//! `GET /chat/conversations` (the first page, then every page of a full walk),
//! against a private stack started from the release binaries.
//!
//! Why this program exists: the inbox must stay fast however many conversations a
//! user has (target on this machine: first page p99 ≤ 20 ms at 10,000), and speed
//! targets are met in benchmarks, never in timed unit tests. One command reproduces
//! the figures in docs/benchmarks.md:
//!
//! ```text
//! cargo build --release -p chatpersistence
//! cargo run --release -p chatfleet-tests --bin inbox_bench
//! cargo run --release -p chatfleet-tests --bin inbox_bench -- --conversations 10000 --requests 500 --kind group
//! ```
//!
//! Setup creates the conversations concurrently: `--kind pair` (default) has
//! `--conversations` different peers each send the user a first message (a pair
//! conversation exists from its first message); `--kind group` has the user create
//! that many two-member groups. Measurement starts once capture has drained, with
//! requests one at a time over a kept-alive connection (latency, not throughput).

use chatfleet_tests::percentile;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack};
use futures::StreamExt;
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

const USER: &str = "inbox-owner";

struct Options {
    conversations: usize,
    requests: usize,
    limit: usize,
    concurrency: usize,
    kind: String,
}

fn options() -> Options {
    let mut o = Options { conversations: 10_000, requests: 500, limit: 50, concurrency: 32, kind: "pair".into() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--conversations" => o.conversations = value.parse().unwrap_or(o.conversations),
            "--requests" => o.requests = value.parse().unwrap_or(o.requests),
            "--limit" => o.limit = value.parse().unwrap_or(o.limit),
            "--concurrency" => o.concurrency = value.parse().unwrap_or(o.concurrency).max(1),
            "--kind" if value == "pair" || value == "group" => o.kind = value,
            other => {
                eprintln!(
                    "unknown option {other}; options: --conversations N --requests R --limit L --concurrency C \
                     --kind pair|group"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    o
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn summary(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p99 = percentile(&samples, 99.0);
    println!(
        "{label:<32} n={:<5} p50={:>7} ms  p95={:>7} ms  p99={:>7} ms  max={:>7} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 95.0)),
        ms(p99),
        ms(samples.last().copied().unwrap_or_default()),
    );
    p99
}

/// One call, retried on `503` (a busy conversation lock, or indexes still being built).
async fn send(request: impl Fn() -> reqwest::RequestBuilder) -> (u16, Value) {
    for _ in 0..100 {
        match request().send().await {
            Ok(response) if response.status().as_u16() == 503 => {}
            Ok(response) => {
                let status = response.status().as_u16();
                return (status, response.json().await.unwrap_or(Value::Null));
            }
            Err(err) => eprintln!("request failed: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (503, Value::Null)
}

async fn wait_ready(http: &reqwest::Client, service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(response) = http.get(service.url("/readyz")).send().await {
            if response.status().as_u16() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chatpersistence never became ready:\n{}", service.log_tail(30));
}

/// Creates the conversations, `concurrency` at a time; returns how many were created.
async fn populate(o: &Options, http: &reqwest::Client, service: &Service) -> u64 {
    let created = Arc::new(AtomicU64::new(0));
    let url = Arc::new(service.url(if o.kind == "group" { "/chat/conversations" } else { "/chat/messages" }));
    let owner_token = Arc::new(token(USER));
    let group = o.kind == "group";
    let started = Instant::now();
    futures::stream::iter(0..o.conversations)
        .for_each_concurrent(o.concurrency, |i| {
            let (http, url, owner_token, created) = (http.clone(), url.clone(), owner_token.clone(), created.clone());
            async move {
                let peer = format!("peer{i}");
                let (body, bearer) = if group {
                    (json!({"title": format!("group {i}"), "members": [peer]}), owner_token.as_str().to_owned())
                } else {
                    (json!({"sender_id": peer, "receiver_id": USER, "content": format!("hello {i}")}), token(&peer))
                };
                let (status, answer) = send(|| http.post(url.as_str()).bearer_auth(&bearer).json(&body)).await;
                if status == 201 {
                    let n = created.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % 1000 == 0 {
                        eprintln!("  {n} conversations ({:.0} s)", started.elapsed().as_secs_f64());
                    }
                } else {
                    eprintln!("creating conversation {i} answered {status} {answer}");
                }
            }
        })
        .await;
    let n = created.load(Ordering::Relaxed);
    eprintln!(
        "created {n} conversations in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    n
}

/// Waits until capture has published everything (so it does not compete with the
/// measurement).
async fn wait_drained(db: &mongodb::Database) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut pending = 0;
        for name in ["messages", "conversation_events"] {
            pending += db
                .collection::<Document>(name)
                .count_documents(doc! { "outbox_pending": true })
                .await
                .unwrap_or(u64::MAX / 4);
        }
        if pending == 0 {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("capture still has {pending} pending after 180 s; measuring anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn page(http: &reqwest::Client, url: &str, bearer: &str) -> (Duration, Value) {
    let started = Instant::now();
    let response = http.get(url).bearer_auth(bearer).send().await.expect("the inbox answers");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let took = started.elapsed();
    assert_eq!(status, 200, "GET {url} answered {status} {body}");
    (took, body)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = options();
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    let shm = std::path::Path::new("/dev/shm");
    let scratch = if std::env::var_os("TESTKIT_SCRATCH_DIR").is_none() && shm.is_dir() {
        let dir = shm.join(format!("chatfleet-inbox-bench-{}", std::process::id()));
        std::env::set_var("TESTKIT_SCRATCH_DIR", &dir);
        Some(dir)
    } else {
        None
    };
    eprintln!("starting a private stack and the release chatpersistence …");
    let stack = Stack::start();
    let mut env = stack.env();
    // One user reads its inbox as fast as it can: the benchmark, not abuse.
    for (k, v) in [
        ("CAPTURE_MODE", "outbox"),
        ("LOG_LEVEL", "warn"),
        ("RATE_LIMIT_POST_PER_SECOND", "0"),
        ("RATE_LIMIT_READ_PER_SECOND", "0"),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    let service = Service::start("chatpersistence", &env);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    wait_ready(&http, &service).await;
    let db = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client").database("chat");
    eprintln!("creating {} {} conversations for {USER} ({} at a time) …", o.conversations, o.kind, o.concurrency);
    let created = populate(&o, &http, &service).await;
    wait_drained(&db).await;

    let bearer = token(USER);
    let first_url = service.url(&format!("/chat/conversations?limit={}", o.limit));
    // Warm up connections and caches.
    for _ in 0..20 {
        page(&http, &first_url, &bearer).await;
    }
    let mut first = Vec::with_capacity(o.requests);
    let mut rows = 0;
    for _ in 0..o.requests {
        let (took, body) = page(&http, &first_url, &bearer).await;
        rows = body["conversations"].as_array().map_or(0, Vec::len);
        first.push(took);
    }

    // A full walk with the cursor: every page, and a check that it lists each once.
    let mut walk = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut listed = 0usize;
    let mut before: Option<String> = None;
    loop {
        let mut url = first_url.clone();
        if let Some(cursor) = &before {
            url.push_str(&format!("&before={cursor}"));
        }
        let (took, body) = page(&http, &url, &bearer).await;
        walk.push(took);
        for row in body["conversations"].as_array().cloned().unwrap_or_default() {
            listed += 1;
            seen.insert(row["conversation_id"].as_str().unwrap_or_default().to_owned());
        }
        match body["next"].as_str() {
            Some(next) => before = Some(next.to_owned()),
            None => break,
        }
    }

    println!();
    println!(
        "inbox of one user with {created} {} conversations (release chatpersistence, nx-27017), limit {}",
        o.kind, o.limit
    );
    let pages = walk.len();
    let p99 = summary("GET /chat/conversations page 1", first);
    summary("full cursor walk, per page", walk);
    println!(
        "first page rows: {rows}; full walk: {pages} pages, {listed} rows, {} distinct (expected {created})",
        seen.len()
    );
    let verdict = if p99 <= Duration::from_millis(20) { "met" } else { "MISSED" };
    println!("target first page p99 ≤ 20 ms: {verdict} ({} ms)", ms(p99));
    if listed != seen.len() || seen.len() as u64 != created {
        println!("WARNING: the cursor walk did not list every conversation exactly once");
    }

    drop(service);
    drop(stack);
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
}
