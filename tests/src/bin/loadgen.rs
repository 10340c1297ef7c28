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
//! cargo build --release --workspace --bins
//! cargo run --release -p chatfleet-tests --bin loadgen -- --pairs 100 --rate 500 --duration 60
//! cargo run --release -p chatfleet-tests --bin loadgen -- --pairs 100 --sweep 500,1000,1500,2000 --duration 15
//! ```

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

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = options();
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
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
    let before: Vec<Option<(f64, u64)>> = processes.iter().map(|(_, pid)| proc_usage(*pid)).collect();
    let wall = Instant::now();

    println!("# chatfleet loadgen: {} pairs ({} sockets)", o.pairs, o.pairs * 2);
    let rates = if o.sweep.is_empty() { vec![o.rate] } else { o.sweep.clone() };
    let mut sweep_rows = Vec::new();
    for rate in rates {
        let result = run_at(&fleet, &pairs, rate, o.duration, o.drain).await;
        report(&result, o.duration);
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
    if sweep_rows.len() > 1 {
        println!("\n## Sweep");
        println!("| rate msg/s | delivery p99 ms | lost | duplicates |");
        println!("| --- | --- | --- | --- |");
        for (rate, p99, lost, dup) in sweep_rows {
            println!("| {rate} | {} | {lost} | {dup} |", ms(p99));
        }
    }
}
