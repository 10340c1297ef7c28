//! The chat pipeline benchmark: P user pairs subscribed, posting at a fixed rate for
//! D seconds, against a private stack started from the release binaries.
//!
//! Why this program exists: speed targets are met in benchmarks, never in timed unit
//! tests. It measures what a user feels (POST latency, POST→WebSocket delivery
//! latency), proves nothing was lost or duplicated under load, and reports the CPU and
//! peak memory of every process, so the figures in docs/benchmarks.md can be
//! reproduced with one command:
//!
//! ```text
//! deploy/local/install.sh --sqlite-broker          # once: the SQLite-backed broker build
//! cargo build --release --workspace --bins
//! cargo run --release -p chatfleet-tests --bin loadgen -- --pairs 100 --rate 500 --duration 60
//! cargo run --release -p chatfleet-tests --bin loadgen -- --pairs 100 --sweep 500,750,1000,1250,1500 --duration 15
//! ```
//!
//! Besides end-to-end latency it prints each stage's time from the services' own
//! histograms, so a slow run says which hop is slow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatfleet_tests::{client, token, ChatFleet, Service};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

struct Options {
    pairs: usize,
    rate: u64,
    duration: u64,
    sweep: Vec<u64>,
    drain: u64,
}

fn options() -> Options {
    let mut o = Options { pairs: 100, rate: 500, duration: 60, sweep: Vec::new(), drain: 10 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--pairs" => o.pairs = value.parse().unwrap_or(o.pairs),
            "--rate" => o.rate = value.parse().unwrap_or(o.rate),
            "--duration" => o.duration = value.parse().unwrap_or(o.duration),
            "--drain" => o.drain = value.parse().unwrap_or(o.drain),
            "--sweep" => o.sweep = value.split(',').filter_map(|r| r.trim().parse().ok()).collect(),
            other => {
                eprintln!(
                    "unknown option {other}; options: --pairs N --rate R --duration S --sweep R1,R2,.. --drain S"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    o
}

/// One delivered frame: which post, which side, how long after the post started.
struct Delivery {
    seq: u64,
    side: u8,
    latency: Duration,
}

struct RunResult {
    rate: u64,
    accepted: u64,
    rejected: u64,
    post: Vec<Duration>,
    delivery: Vec<Duration>,
    delivered_unique: u64,
    duplicates: u64,
    expected: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((ticks as f64 / 100.0, hwm))
}

async fn run_at(fleet: &ChatFleet, pairs: &[(String, String)], rate: u64, seconds: u64, drain: u64) -> RunResult {
    let anchor = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Delivery>(1 << 16);
    // Subscribe both participants of every pair.
    let mut readers = Vec::new();
    for (a, b) in pairs {
        for (side, (me, peer)) in [(0u8, (a, b)), (1u8, (b, a))] {
            let stream = client::stream_id(me, peer);
            let url = fleet.sockets.ws_url(&format!(
                "/chat/subscribe?stream_id={stream}&sender_id={me}&receiver_id={peer}&access_token={}",
                token(me)
            ));
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("subscribe");
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                while let Some(Ok(frame)) = ws.next().await {
                    let Message::Text(text) = frame else { continue };
                    let now = anchor.elapsed();
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
                    let content = value["message"]["content"].as_str().unwrap_or_default();
                    let mut parts = content.split_whitespace().skip(1);
                    let (Some(seq), Some(sent)) = (parts.next(), parts.next()) else { continue };
                    let (Ok(seq), Ok(sent)) = (seq.parse::<u64>(), sent.parse::<u64>()) else { continue };
                    let latency = now.saturating_sub(Duration::from_nanos(sent));
                    if tx.send(Delivery { seq, side, latency }).await.is_err() {
                        return;
                    }
                }
            }));
        }
    }
    drop(tx);

    let http = reqwest::Client::builder().pool_max_idle_per_host(512).build().expect("client");
    let url = fleet.persistence.url("/chat/messages");
    let tokens: Vec<String> = pairs.iter().map(|(a, _)| token(a)).collect();
    let accepted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let (post_tx, mut post_rx) = mpsc::unbounded_channel::<Duration>();
    let total = rate * seconds;
    let start = tokio::time::Instant::now();
    let mut posts = Vec::with_capacity(total as usize);
    for seq in 0..total {
        let due = start + Duration::from_nanos(seq * 1_000_000_000 / rate.max(1));
        tokio::time::sleep_until(due).await;
        let pair = (seq as usize) % pairs.len();
        let (from, to) = &pairs[pair];
        let body = json!({"sender_id": from, "receiver_id": to, "content": format!("bench {seq} {}", anchor.elapsed().as_nanos())});
        let request = http.post(&url).bearer_auth(&tokens[pair]).json(&body).timeout(Duration::from_secs(10));
        let (accepted, rejected, post_tx) = (accepted.clone(), rejected.clone(), post_tx.clone());
        posts.push(tokio::spawn(async move {
            let started = Instant::now();
            match request.send().await {
                Ok(r) if r.status().as_u16() == 201 => {
                    let _ = post_tx.send(started.elapsed());
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for post in posts {
        let _ = post.await;
    }
    drop(post_tx);
    let mut post_latencies = Vec::new();
    while let Some(d) = post_rx.recv().await {
        post_latencies.push(d);
    }

    // Collect deliveries until everything arrived or the drain time passed.
    let expected = accepted.load(Ordering::Relaxed) * 2;
    let mut seen: HashMap<(u64, u8), u32> = HashMap::new();
    let mut delivery = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(drain);
    while (seen.len() as u64) < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(d)) => {
                let count = seen.entry((d.seq, d.side)).or_insert(0);
                *count += 1;
                if *count == 1 {
                    delivery.push(d.latency);
                }
            }
            _ => break,
        }
    }
    // A short quiet period catches late duplicates.
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        *seen.entry((d.seq, d.side)).or_insert(0) += 1;
    }
    for reader in readers {
        reader.abort();
    }
    let duplicates = seen.values().map(|c| u64::from(c.saturating_sub(1))).sum();
    post_latencies.sort();
    delivery.sort();
    RunResult {
        rate,
        accepted: accepted.load(Ordering::Relaxed),
        rejected: rejected.load(Ordering::Relaxed),
        post: post_latencies,
        delivered_unique: seen.len() as u64,
        duplicates,
        expected,
        delivery,
    }
}

/// One histogram as Prometheus renders it: sum, count and cumulative buckets.
#[derive(Default, Clone)]
struct Histogram {
    sum: f64,
    count: f64,
    buckets: Vec<(f64, f64)>,
}

impl Histogram {
    fn minus(&self, before: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let earlier = before.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                (*le, n - earlier)
            })
            .collect();
        Histogram { sum: self.sum - before.sum, count: self.count - before.count, buckets }
    }

    /// The quantile, interpolated linearly inside its bucket (seconds).
    fn quantile(&self, q: f64) -> f64 {
        let target = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for (le, cumulative) in &self.buckets {
            if *cumulative >= target && *cumulative > below {
                if le.is_infinite() {
                    return lower;
                }
                return lower + (le - lower) * (target - below) / (cumulative - below);
            }
            (lower, below) = (*le, *cumulative);
        }
        lower
    }
}

/// The stages of one message, each read from the histogram a service keeps anyway.
const STAGES: &[(&str, &str, &str, &str)] = &[
    ("chatpersistence", "message_write_duration_seconds", "", "MongoDB insert (group commit included)"),
    ("chatpersistence", "relay_publish_duration_seconds", "", "relay: produce until the broker acknowledged"),
    ("chatpersistencechangehandler", "kafka_record_age_seconds", "", "produced → received by the change handler"),
    ("chatpersistencechangehandler", "kafka_handle_duration_seconds", "", "change handler: claim, forward, done"),
    ("chatpersistencechangehandler", "forward_duration_seconds", "websocket", "forward to the socket pod (HTTP)"),
];

/// Every histogram of a service, summed over label sets that contain `filter`.
async fn scrape(service: &Service, metric: &str, filter: &str) -> Histogram {
    let text = match reqwest::get(service.url("/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => return Histogram::default(),
    };
    let mut h = Histogram::default();
    for line in text.lines().filter(|l| l.starts_with(metric) && l.contains(filter)) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let name = name_labels.split('{').next().unwrap_or_default();
        if name == format!("{metric}_sum") {
            h.sum += value;
        } else if name == format!("{metric}_count") {
            h.count += value;
        } else if name == format!("{metric}_bucket") {
            let le = name_labels.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            match h.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, c)) => *c += value,
                None => h.buckets.push((le, value)),
            }
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    h
}

async fn scrape_stages(fleet: &ChatFleet) -> Vec<Histogram> {
    let mut out = Vec::new();
    for (service, metric, filter, _) in STAGES {
        let service = if *service == "chatpersistence" { &fleet.persistence } else { &fleet.handlers[0] };
        out.push(scrape(service, metric, filter).await);
    }
    out
}

fn report_stages(before: &[Histogram], after: &[Histogram]) {
    println!("\n| stage (from the services' /metrics) | mean ms | ~p50 ms | ~p99 ms |");
    println!("| --- | --- | --- | --- |");
    for ((_, _, _, what), (b, a)) in STAGES.iter().zip(before.iter().zip(after)) {
        let h = a.minus(b);
        if h.count > 0.0 {
            println!(
                "| {what} | {:.1} | {:.1} | {:.1} |",
                h.sum / h.count * 1000.0,
                h.quantile(0.5) * 1000.0,
                h.quantile(0.99) * 1000.0
            );
        }
    }
}

fn report(r: &RunResult, seconds: u64) {
    println!("\n## {} msg/s for {} s", r.rate, seconds);
    println!("| measure | p50 ms | p95 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, v) in [("POST", &r.post), ("POST→WebSocket delivery", &r.delivery)] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 95.0)),
            ms(percentile(v, 99.0)),
            ms(v.last().copied().unwrap_or_default())
        );
    }
    println!(
        "\naccepted {} · rejected {} · deliveries expected {} (2 sockets per message) · delivered {} · lost {} · duplicates {}",
        r.accepted,
        r.rejected,
        r.expected,
        r.delivered_unique,
        r.expected.saturating_sub(r.delivered_unique),
        r.duplicates
    );
}

/// The settings that decide how the local stand-in broker behaves, reported with every run.
const PROFILE_SETTINGS: &[&str] =
    &["TANSU_BIN", "TANSU_STORAGE", "KAFKA_TOPIC_PARTITIONS", "RDKAFKA_FETCH_WAIT_MAX_MS", "TESTKIT_SCRATCH_DIR"];

/// The benchmark's broker profile, applied where the caller set nothing (every
/// variable can be set to measure something else; the report lists what was used):
///
/// - the SQLite-backed tansu build (`.local/tansu/bin/tansu`), built on the first run
///   by `deploy/local/install.sh --sqlite-broker` unless `TANSU_BIN` names a broker. The
///   memory engine of the wheel's build lists every stored batch of a partition on each
///   fetch, so it slows down as a run goes on;
/// - with it, `chat.changes` with 2 partitions and `fetch.wait.max.ms=2`: tansu answers
///   a fetch only after the full wait even when data is there (≈1.5 × the wait per
///   message under load) and runs its storage on one worker, so every partition
///   polled costs (with the memory engine the stack's defaults stay: 6 and 10 ms);
/// - server data on tmpfs (`/dev/shm`), which is removed after the run.
///
/// Returns the scratch folder to remove at the end, if this run chose it.
fn broker_profile() -> Option<std::path::PathBuf> {
    let set_default = |name: &str, value: &str| {
        if std::env::var_os(name).is_none() {
            std::env::set_var(name, value);
        }
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(std::path::Path::new("."));
    let sqlite_build = root.join(".local/tansu/bin/tansu");
    if std::env::var_os("TANSU_BIN").is_none() && !sqlite_build.is_file() {
        // One-time build (11-20 min): without it the figures are the memory engine's.
        eprintln!("building the benchmark's broker once: deploy/local/install.sh --sqlite-broker (11-20 min) …");
        let built = std::process::Command::new("bash")
            .arg(root.join("deploy/local/install.sh"))
            .arg("--sqlite-broker")
            // The report is stdout: the build's log goes to stderr with the other notes.
            .stdout(std::io::stderr())
            .status()
            .is_ok_and(|status| status.success());
        if !built {
            eprintln!("the build failed: measuring with the memory engine instead");
        }
    }
    if std::env::var_os("TANSU_BIN").is_none() && sqlite_build.is_file() {
        std::env::set_var("TANSU_BIN", &sqlite_build);
        set_default("TANSU_STORAGE", "sqlite://tansu.db");
    }
    if std::env::var("TANSU_STORAGE").map_or(true, |s| s.starts_with("memory")) {
        // Short fetch waits make the memory engine list its logs hundreds of times a
        // second: it falls behind within seconds. Keep the stack's defaults instead.
        eprintln!(
            "note: the broker is tansu's memory engine, which slows down as a run goes on; \
             `deploy/local/install.sh --sqlite-broker` builds the SQLite-backed one (docs/benchmarks.md)"
        );
    } else {
        set_default("KAFKA_TOPIC_PARTITIONS", "2");
        set_default("RDKAFKA_FETCH_WAIT_MAX_MS", "2");
    }
    let shm = std::path::Path::new("/dev/shm");
    if std::env::var_os("TESTKIT_SCRATCH_DIR").is_none() && shm.is_dir() {
        let dir = shm.join(format!("chatfleet-loadgen-{}", std::process::id()));
        std::env::set_var("TESTKIT_SCRATCH_DIR", &dir);
        return Some(dir);
    }
    None
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = options();
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    let scratch = broker_profile();
    eprintln!("starting a private stack and the release binaries …");
    let fleet = ChatFleet::start(&[("LOG_LEVEL", "warn")]);
    fleet.warm_up().await;
    let pairs: Vec<(String, String)> = (0..o.pairs).map(|i| (format!("sender{i}"), format!("receiver{i}"))).collect();

    let mut processes: Vec<(String, u32)> = Vec::new();
    let services: [&Service; 3] = [&fleet.persistence, &fleet.sockets, &fleet.handlers[0]];
    for s in services {
        processes.extend(s.pid().map(|p| (s.name.clone(), p)));
    }
    processes.extend(fleet.stack.redis.pid().map(|p| ("redis-server".to_owned(), p)));
    processes.extend(fleet.stack.broker.pid().map(|p| ("tansu".to_owned(), p)));
    processes.extend(fleet.stack.mongo.pid().map(|p| ("nx-27017 (MongoDB wire server)".to_owned(), p)));
    processes.push(("loadgen (this program)".to_owned(), std::process::id()));
    let before: Vec<Option<(f64, u64)>> = processes.iter().map(|(_, pid)| proc_usage(*pid)).collect();
    let wall = Instant::now();

    println!("# chatfleet loadgen: {} pairs ({} sockets)", o.pairs, o.pairs * 2);
    println!();
    println!("| setting | value |");
    println!("| --- | --- |");
    for name in PROFILE_SETTINGS {
        println!("| `{name}` | `{}` |", std::env::var(name).unwrap_or_else(|_| "(default)".to_owned()));
    }
    let rates = if o.sweep.is_empty() { vec![o.rate] } else { o.sweep.clone() };
    let mut sweep_rows = Vec::new();
    for rate in rates {
        let stages_before = scrape_stages(&fleet).await;
        let result = run_at(&fleet, &pairs, rate, o.duration, o.drain).await;
        report(&result, o.duration);
        report_stages(&stages_before, &scrape_stages(&fleet).await);
        sweep_rows.push((
            rate,
            percentile(&result.delivery, 99.0),
            result.expected.saturating_sub(result.delivered_unique),
            result.duplicates,
        ));
    }

    let elapsed = wall.elapsed().as_secs_f64();
    println!("\n## Resources over the run ({elapsed:.0} s wall)");
    println!("| process | CPU seconds | average cores | peak RSS MiB |");
    println!("| --- | --- | --- | --- |");
    for ((name, pid), before) in processes.iter().zip(before) {
        if let (Some((cpu0, _)), Some((cpu1, hwm))) = (before, proc_usage(*pid)) {
            println!("| {name} | {:.1} | {:.2} | {:.1} |", cpu1 - cpu0, (cpu1 - cpu0) / elapsed, hwm as f64 / 1024.0);
        }
    }
    if let Some(dir) = scratch {
        drop(fleet);
        let _ = std::fs::remove_dir_all(dir);
    }
    if sweep_rows.len() > 1 {
        println!("\n## Sweep");
        println!("| rate msg/s | delivery p99 ms | lost | duplicates |");
        println!("| --- | --- | --- | --- |");
        for (rate, p99, lost, dup) in sweep_rows {
            println!("| {rate} | {} | {lost} | {dup} |", ms(p99));
        }
    }
}
