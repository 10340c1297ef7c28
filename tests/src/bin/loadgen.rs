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
//! cargo run --release -p chatfleet-tests --bin loadgen -- --group-members 1000 --rate 50 --duration 30
//! cargo run --release -p chatfleet-tests --bin loadgen -- --chaos --duration 600 --rate 170 --conversations 120
//! ```
//!
//! Besides end-to-end latency it prints each stage's time from the services' own
//! histograms, so a slow run says which hop is slow.
//!
//! `--group-members N` measures group fan-out instead of pairs: one group of N members,
//! one chat socket per member (each with the member's own token), messages posted at
//! `--rate` by `--senders` members in turn, and for every message the time from the
//! start of its POST until the *last* of the N sockets had it (see [`group`]).
//!
//! `--sockets N` measures socket scale instead: N idle sockets on one socket pod, RSS
//! per socket, connect rate, and delivery with all of them open (see [`sockets`]).

use chatfleet_tests::percentile;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatfleet_tests::{client, token, ChatFleet, Service};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// `--sockets N`: the socket-scale mode (its own options; see the module).
#[path = "loadgen/sockets.rs"]
mod sockets;
#[path = "loadgen/write_modes.rs"]
mod write_modes;

struct Options {
    pairs: usize,
    rate: u64,
    duration: u64,
    sweep: Vec<u64>,
    drain: u64,
    /// The group mode: members of the one group (0: the pair benchmark).
    group_members: usize,
    /// The group mode: how many members take turns posting.
    senders: usize,
}

fn options() -> Options {
    let mut o =
        Options { pairs: 100, rate: 500, duration: 60, sweep: Vec::new(), drain: 10, group_members: 0, senders: 5 };
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
            "--group-members" => o.group_members = value.parse().unwrap_or(o.group_members),
            "--senders" => o.senders = value.parse().unwrap_or(o.senders),
            other => {
                eprintln!(
                    "unknown option {other}; options: --pairs N --rate R --duration S --sweep R1,R2,.. --drain S \
                     | --group-members N --senders K --rate R --duration S --drain S"
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

/// The whole machine's CPU time from `/proc/stat`, in ticks: all of it, the idle part
/// (with I/O wait), and what the hypervisor gave to other guests (steal).
#[derive(Debug, Clone, Copy, PartialEq)]
struct HostTicks {
    total: u64,
    idle: u64,
    steal: u64,
    cpus: usize,
}

fn host_ticks() -> Option<HostTicks> {
    parse_host_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_host_ticks(stat: &str) -> Option<HostTicks> {
    let mut lines = stat.lines();
    let all = lines.next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = all.split_whitespace().map(|t| t.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time
    // is already counted in user and nice.
    let (idle, steal) = (ticks.get(3)? + ticks.get(4)?, *ticks.get(7)?);
    let total = ticks.iter().take(8).sum();
    let cpus = lines.filter(|l| l.starts_with("cpu")).count();
    Some(HostTicks { total, idle, steal, cpus })
}

/// What a measured window cost: each process's CPU seconds (and peak RSS in KiB),
/// and the host's.
#[derive(Default)]
pub struct Window {
    seconds: f64,
    processes: Vec<(String, f64, u64)>,
    host: Option<HostShare>,
}

/// How the whole machine spent a window.
struct HostShare {
    /// Cores busy on average, of `cpus`.
    busy: f64,
    cpus: usize,
    /// Percent of the machine's time idle (with I/O wait), and given to other guests.
    idle_pct: f64,
    steal_pct: f64,
}

/// Starts measuring a window over `processes`; the closure it returns ends it.
fn measure(processes: &[(String, u32)]) -> impl FnOnce() -> Window + '_ {
    let started = Instant::now();
    let host0 = host_ticks();
    let cpu0: Vec<Option<f64>> = processes.iter().map(|(_, pid)| proc_usage(*pid).map(|u| u.0)).collect();
    move || {
        let seconds = started.elapsed().as_secs_f64();
        let processes = processes
            .iter()
            .zip(cpu0)
            .filter_map(|((name, pid), before)| {
                let (cpu, hwm) = proc_usage(*pid)?;
                Some((name.clone(), cpu - before?, hwm))
            })
            .collect();
        let host = host0.zip(host_ticks()).and_then(|(a, b)| {
            let total = b.total.checked_sub(a.total).filter(|t| *t > 0)? as f64;
            let (idle, steal) = (b.idle.saturating_sub(a.idle) as f64, b.steal.saturating_sub(a.steal) as f64);
            Some(HostShare {
                busy: (total - idle - steal) / total * b.cpus as f64,
                cpus: b.cpus,
                idle_pct: idle / total * 100.0,
                steal_pct: steal / total * 100.0,
            })
        });
        Window { seconds, processes, host }
    }
}

impl Window {
    /// The window's table: each process's CPU (from /proc/<pid>/stat), average cores,
    /// CPU per accepted message (so runs of different rates and lengths compare) and
    /// peak RSS; the sum over the processes named in `fleet`; the whole machine.
    fn report(&self, title: &str, messages: u64, fleet: &[&str]) {
        println!("\n## {title} ({:.0} s)", self.seconds);
        println!("| process | CPU seconds | average cores | CPU µs per message | peak RSS MiB |");
        println!("| --- | --- | --- | --- | --- |");
        let cores = |cpu: f64| cpu / self.seconds.max(1e-9);
        let per_message = |cpu: f64| cpu * 1e6 / messages.max(1) as f64;
        for (name, cpu, hwm) in &self.processes {
            println!(
                "| {name} | {cpu:.1} | {:.2} | {:.0} | {:.1} |",
                cores(*cpu),
                per_message(*cpu),
                *hwm as f64 / 1024.0
            );
        }
        let together: f64 =
            self.processes.iter().filter(|(name, ..)| fleet.contains(&name.as_str())).map(|(_, cpu, _)| cpu).sum();
        println!(
            "| **chatfleet's services together** | {together:.1} | {:.2} | **{:.0}** | |",
            cores(together),
            per_message(together)
        );
        if let Some(HostShare { busy, cpus, idle_pct, steal_pct }) = &self.host {
            println!(
                "\nThe whole machine: {busy:.2} of {cpus} cores busy, {idle_pct:.0} % idle, {steal_pct:.1} % stolen by \
                 the hypervisor (`/proc/stat`)."
            );
        }
    }
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
            let (mut ws, _) = chatfleet_tests::ws_connect(url).await.expect("subscribe");
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
    (
        "chatpersistence",
        "message_write_duration_seconds",
        "",
        "write: waiting for the stream lock, then conversation + insert",
    ),
    ("chatpersistence", "conversation_update_duration_seconds", "", "  of which the conversation's update"),
    ("chatpersistence", "message_insert_duration_seconds", "", "  of which the message's insert"),
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
        println!("{}", chatfleet_tests::latency_row(name, v));
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

fn main() {
    if let Some(code) = sockets::dispatch() {
        std::process::exit(code);
    }
    if let Some(code) = write_modes::dispatch() {
        std::process::exit(code);
    }
    if std::env::args().nth(1).as_deref() == Some("--chaos") {
        std::process::exit(chaos_main());
    }
    pair_and_group_main();
}

/// `--chaos`: the chaos soak (`tests/src/chaos.rs`) on the benchmark's binaries and
/// broker profile.
#[tokio::main(flavor = "multi_thread")]
async fn chaos_main() -> i32 {
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    let scratch = broker_profile();
    let args: Vec<String> = std::env::args().skip(2).collect();
    let code = chatfleet_tests::chaos::cli(&args).await;
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    code
}

#[tokio::main(flavor = "multi_thread")]
async fn pair_and_group_main() {
    let o = options();
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    let scratch = broker_profile();
    eprintln!("starting a private stack and the release binaries …");
    // The group mode raises the limits a single-address load generator would hit;
    // the pair benchmark runs with the services' defaults, as before.
    let group_env = group::service_env(o.group_members);
    let mut extra: Vec<(&str, &str)> = vec![("LOG_LEVEL", "warn")];
    extra.extend(group_env.iter().map(|(k, v)| (*k, v.as_str())));
    let fleet = ChatFleet::start(&extra);
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
    let fleet_names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let fleet_names: Vec<&str> = fleet_names.iter().map(String::as_str).collect();
    let whole_run = measure(&processes);

    if o.group_members > 0 {
        println!("# chatfleet loadgen: one group of {} members ({} sockets)", o.group_members, o.group_members);
    } else {
        println!("# chatfleet loadgen: {} pairs ({} sockets)", o.pairs, o.pairs * 2);
    }
    println!();
    println!("| setting | value |");
    println!("| --- | --- |");
    for name in PROFILE_SETTINGS {
        println!("| `{name}` | `{}` |", std::env::var(name).unwrap_or_else(|_| "(default)".to_owned()));
    }
    for (name, value) in &group_env {
        println!("| `{name}` (services) | `{value}` |");
    }
    let rates = if o.group_members > 0 {
        Vec::new()
    } else if o.sweep.is_empty() {
        vec![o.rate]
    } else {
        o.sweep.clone()
    };
    // Accepted messages over the whole run: the denominator of CPU per message.
    let mut messages = 0u64;
    if o.group_members > 0 {
        let stages_before = scrape_stages(&fleet).await;
        let result = group::run(&fleet, &o, &processes).await;
        messages += result.accepted;
        group::report(&result, o.duration, &fleet_names);
        report_stages(&stages_before, &scrape_stages(&fleet).await);
    }
    let mut sweep_rows = Vec::new();
    for rate in rates {
        let stages_before = scrape_stages(&fleet).await;
        let result = run_at(&fleet, &pairs, rate, o.duration, o.drain).await;
        messages += result.accepted;
        report(&result, o.duration);
        report_stages(&stages_before, &scrape_stages(&fleet).await);
        sweep_rows.push((
            rate,
            percentile(&result.delivery, 99.0),
            result.expected.saturating_sub(result.delivered_unique),
            result.duplicates,
        ));
    }

    whole_run().report("Resources over the run", messages, &fleet_names);
    println!("\n{messages} messages accepted over the run.");
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

/// The group fan-out benchmark: one group of N members, a socket per member, a steady
/// rate of posts, and per message the time until the last of the N sockets had it.
///
/// Why it is timed from the start of the POST: that is what the members feel (the
/// sender's request, the write, capture, Kafka, the change handler, the socket pod's
/// broadcast and the N socket writes). The first socket's time says how much of it is
/// the pipeline; the spread from first to last is the fan-out itself.
mod group {
    use super::*;
    use tokio::sync::watch;

    /// What the services started for the group mode get besides the defaults: a group
    /// as large as asked, and no per-address socket limits (every socket of the load
    /// generator comes from 127.0.0.1; the per-user limits stay, one socket per user).
    pub fn service_env(members: usize) -> Vec<(&'static str, String)> {
        if members == 0 {
            return Vec::new();
        }
        vec![
            ("GROUP_MAX_MEMBERS", members.max(256).to_string()),
            ("WS_MAX_CONNECTIONS_PER_IP", "0".to_owned()),
            ("WS_CONNECT_RATE_PER_IP", "0".to_owned()),
        ]
    }

    /// The id of member `i`.
    fn member(i: usize) -> String {
        format!("gm{i}")
    }

    /// What one socket saw: every bench message (its seq and its latency from the
    /// POST's start), how many other frames, and whether it ended before the run did.
    #[derive(Default)]
    struct SocketLog {
        arrivals: Vec<(u64, Duration)>,
        other_frames: u64,
        ended_early: bool,
    }

    pub struct GroupResult {
        members: usize,
        senders: usize,
        rate: u64,
        open_time: Duration,
        pub accepted: u64,
        /// Refused posts by HTTP status (0: no answer).
        rejected: std::collections::BTreeMap<u16, u64>,
        post: Vec<Duration>,
        /// Per message that reached every socket: until the last socket had it.
        fanout: Vec<Duration>,
        /// Per message: until the first socket had it.
        first: Vec<Duration>,
        /// Per message that reached every socket: last minus first.
        spread: Vec<Duration>,
        /// Per message that reached every socket: from the POST's answer to the last.
        after_post: Vec<Duration>,
        /// Every first delivery of a message to a socket.
        delivery: Vec<Duration>,
        expected: u64,
        delivered: u64,
        duplicates: u64,
        incomplete: u64,
        other_frames: u64,
        ended_early: usize,
        /// CPU while the messages were posted (until the last POST's answer).
        window: Window,
    }

    /// `bench <seq> <nanos since the anchor when the POST started>` out of a message
    /// frame, found from the end without parsing the JSON: the harness reads 50,000
    /// frames a second, and every microsecond it spends is one the services lack.
    fn bench_stamp(text: &str) -> Option<(u64, Duration)> {
        const MARK: &str = "\"content\":\"bench ";
        let at = text.rfind(MARK)? + MARK.len();
        let rest = text.get(at..)?;
        let stamp = rest.get(..rest.find('"')?)?;
        let mut parts = stamp.split(' ');
        let seq = parts.next()?.parse().ok()?;
        let sent = parts.next()?.parse().ok()?;
        Some((seq, Duration::from_nanos(sent)))
    }

    type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    async fn read_socket(
        mut ws: Socket,
        anchor: Instant,
        delivered: Arc<AtomicU64>,
        mut stop: watch::Receiver<bool>,
        expected: usize,
    ) -> SocketLog {
        // Sized for the whole run up front. Grown on demand, the 1,000 logs of a group
        // all reached the same length at the same moment and doubled together: at
        // 2,048 messages that copied 48 MB and faulted in 96 MB in one burst, a
        // 150 ms stall of this harness that showed up as slow messages at 41 s.
        let mut log = SocketLog { arrivals: Vec::with_capacity(expected), ..SocketLog::default() };
        // Made once: a wait registered anew for each frame costs this harness CPU the
        // services under test would otherwise get.
        let mut stopped = std::pin::pin!(stop.changed());
        loop {
            tokio::select! {
                biased;
                _ = stopped.as_mut() => break,
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let now = anchor.elapsed();
                        match bench_stamp(text.as_str()) {
                            Some((seq, sent)) => {
                                log.arrivals.push((seq, now.saturating_sub(sent)));
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                            None => log.other_frames += 1,
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        log.ended_early = true;
                        break;
                    }
                },
            }
        }
        log
    }

    /// Waits until the change handler has handled something more than now and then
    /// nothing new for two seconds (at most a minute).
    async fn settle_events(fleet: &ChatFleet) {
        let handled = || scrape(&fleet.handlers[0], "kafka_handle_duration_seconds", "");
        let start = handled().await.count;
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut last, mut quiet) = (start, 0);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = handled().await.count;
            quiet = if now > start && now == last { quiet + 1 } else { 0 };
            if quiet >= 2 {
                return;
            }
            last = now;
        }
        eprintln!("the group's events did not settle within 60 s; measuring anyway");
    }

    /// Opens member `i`'s socket, retrying refusals for a while (a refusal is
    /// reported, never hidden: the run stops if a socket cannot be opened).
    async fn open(url: String) -> Result<Socket, String> {
        let mut last = String::new();
        for _ in 0..20 {
            match chatfleet_tests::ws_connect(url.as_str()).await {
                Ok((ws, _)) => return Ok(ws),
                Err(err) => last = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last)
    }

    pub async fn run(fleet: &ChatFleet, o: &Options, processes: &[(String, u32)]) -> GroupResult {
        let n = o.group_members.max(2);
        let senders = o.senders.clamp(1, n);
        let (rate, seconds) = (o.rate.max(1), o.duration);
        let members: Vec<String> = (0..n).map(member).collect();
        let tokens: Vec<String> = members.iter().map(|m| token(m)).collect();
        let http = reqwest::Client::builder().pool_max_idle_per_host(512).build().expect("client");

        // The group: member 0 creates it with everyone else.
        let created = http
            .post(fleet.persistence.url("/chat/conversations"))
            .bearer_auth(&tokens[0])
            .json(&json!({"title": "loadgen", "members": &members[1..]}))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("POST /chat/conversations");
        let status = created.status();
        let body: serde_json::Value = created.json().await.unwrap_or_default();
        let Some(conversation) = body["conversation_id"].as_str().map(str::to_owned) else {
            eprintln!("creating the group failed: {status} {body}");
            std::process::exit(1);
        };
        // Creating the group emits one member_joined event per member, each of which
        // goes to every socket open on the group at the time (with the member list):
        // let the change handler work through them before the sockets open, so the run
        // measures a group that exists, not its creation.
        eprintln!("group {conversation} created with {n} members; waiting for its member_joined events …");
        settle_events(fleet).await;
        eprintln!("opening {n} sockets …");

        // One socket per member, with the member's own token, 32 upgrades in flight.
        let anchor = Instant::now();
        let delivered = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let opening = Instant::now();
        // Every message once, plus room for a few repeats (up to 6 MB a socket; a
        // longer run grows its logs as it goes).
        let expected_per_socket = ((rate * seconds) as usize + 64).min(1 << 18);
        let opened: Vec<Result<tokio::task::JoinHandle<SocketLog>, String>> = futures::stream::iter(0..n)
            .map(|i| {
                let url = fleet
                    .sockets
                    .ws_url(&format!("/chat/subscribe?conversation_id={conversation}&access_token={}", tokens[i]));
                let (delivered, stop) = (delivered.clone(), stop_rx.clone());
                async move {
                    let ws = open(url).await.map_err(|e| format!("{}: {e}", member(i)))?;
                    Ok(tokio::spawn(read_socket(ws, anchor, delivered, stop, expected_per_socket)))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let open_time = opening.elapsed();
        let mut readers = Vec::with_capacity(n);
        for socket in opened {
            match socket {
                Ok(reader) => readers.push(reader),
                Err(err) => {
                    eprintln!("a member's socket could not be opened: {err}");
                    std::process::exit(1);
                }
            }
        }
        eprintln!(
            "{n} sockets open in {:.1} s; settling 2 s, then {rate} msg/s for {seconds} s …",
            open_time.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;

        let url = fleet.persistence.url("/chat/messages");
        let total = rate * seconds;
        let (post_tx, mut post_rx) = mpsc::unbounded_channel::<(u64, Result<Duration, u16>)>();
        // The posting window alone (no group creation, no socket opening): what the
        // machine had to spare while the target was measured.
        let window = measure(processes);
        let start = tokio::time::Instant::now();
        let mut posts = Vec::with_capacity(total as usize);
        for seq in 0..total {
            let due = start + Duration::from_nanos(seq * 1_000_000_000 / rate);
            tokio::time::sleep_until(due).await;
            let from = (seq as usize) % senders;
            let body = json!({
                "sender_id": members[from],
                "conversation_id": conversation,
                "content": format!("bench {seq} {}", anchor.elapsed().as_nanos()),
            });
            let request = http.post(&url).bearer_auth(&tokens[from]).json(&body).timeout(Duration::from_secs(10));
            let post_tx = post_tx.clone();
            posts.push(tokio::spawn(async move {
                let started = Instant::now();
                let outcome = match request.send().await {
                    Ok(r) if r.status().as_u16() == 201 => Ok(started.elapsed()),
                    Ok(r) => Err(r.status().as_u16()),
                    Err(_) => Err(0),
                };
                let _ = post_tx.send((seq, outcome));
            }));
        }
        for post in posts {
            let _ = post.await;
        }
        let window = window();
        drop(post_tx);
        let mut accepted_seqs: Vec<Option<Duration>> = vec![None; total as usize];
        let mut post = Vec::new();
        let mut rejected: std::collections::BTreeMap<u16, u64> = std::collections::BTreeMap::new();
        while let Some((seq, outcome)) = post_rx.recv().await {
            match outcome {
                Ok(latency) => {
                    accepted_seqs[seq as usize] = Some(latency);
                    post.push(latency);
                }
                Err(status) => *rejected.entry(status).or_insert(0) += 1,
            }
        }
        let accepted = post.len() as u64;

        // Every accepted message is expected on every member's socket (the sender's
        // too: a group socket gets the messages its user sent).
        let expected = accepted * n as u64;
        let deadline = Instant::now() + Duration::from_secs(o.drain);
        while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A short quiet period catches late duplicates.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stop_tx.send(true);
        let mut logs = Vec::with_capacity(n);
        for reader in readers {
            logs.push(reader.await.unwrap_or_default());
        }

        // Per message: how many sockets, first and last arrival.
        let mut count = vec![0u32; total as usize];
        let mut first = vec![Duration::MAX; total as usize];
        let mut last = vec![Duration::ZERO; total as usize];
        let mut delivery = Vec::with_capacity(expected as usize);
        let (mut duplicates, mut other_frames, mut ended_early) = (0u64, 0u64, 0usize);
        for mut log in logs {
            other_frames += log.other_frames;
            ended_early += usize::from(log.ended_early);
            log.arrivals.sort_by_key(|(seq, _)| *seq);
            let mut previous = None;
            for (seq, latency) in log.arrivals {
                if previous == Some(seq) {
                    duplicates += 1;
                    continue;
                }
                previous = Some(seq);
                let Some(i) = usize::try_from(seq).ok().filter(|i| *i < count.len()) else { continue };
                count[i] += 1;
                first[i] = first[i].min(latency);
                last[i] = last[i].max(latency);
                delivery.push(latency);
            }
        }
        let (mut fanout, mut firsts, mut spread, mut after_post) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut incomplete = 0;
        // `LOADGEN_TIMELINE=<file>`: one line per message (when it was due, its POST,
        // first and last socket, in ms) to see whether slow messages cluster.
        let timeline_path = std::env::var_os("LOADGEN_TIMELINE");
        let mut timeline = timeline_path.as_ref().map(|_| String::from("seq,due_ms,post_ms,first_ms,last_ms\n"));
        for (i, post) in accepted_seqs.iter().enumerate().filter_map(|(i, p)| p.map(|p| (i, p))) {
            if let Some(lines) = timeline.as_mut() {
                let due = i as f64 * 1000.0 / rate as f64;
                let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
                // A message no socket had: empty first and last.
                let (first, last) = if count[i] > 0 { (ms(first[i]), ms(last[i])) } else { Default::default() };
                lines.push_str(&format!("{i},{due:.1},{},{first},{last}\n", ms(post)));
            }
            if count[i] > 0 {
                firsts.push(first[i]);
            }
            if count[i] as usize >= n {
                fanout.push(last[i]);
                spread.push(last[i] - first[i]);
                after_post.push(last[i].saturating_sub(post));
            } else {
                incomplete += 1;
            }
        }
        if let (Some(lines), Some(path)) = (timeline, timeline_path) {
            if let Err(err) = std::fs::write(&path, lines) {
                eprintln!("writing the timeline to {}: {err}", path.to_string_lossy());
            }
        }
        for v in [&mut post, &mut fanout, &mut firsts, &mut spread, &mut after_post, &mut delivery] {
            v.sort();
        }
        GroupResult {
            members: n,
            senders,
            rate,
            open_time,
            accepted,
            rejected,
            post,
            fanout,
            first: firsts,
            spread,
            after_post,
            delivered: delivery.len() as u64,
            delivery,
            expected,
            duplicates,
            incomplete,
            other_frames,
            ended_early,
            window,
        }
    }

    pub fn report(r: &GroupResult, seconds: u64, fleet: &[&str]) {
        println!(
            "\n## one group of {} members, {} msg/s for {} s ({} senders in turn)",
            r.members, r.rate, seconds, r.senders
        );
        println!("| measure | p50 ms | p95 ms | p99 ms | max ms |");
        println!("| --- | --- | --- | --- | --- |");
        let fanout = format!("fan-out: POST start → last of {} sockets (per message)", r.members);
        for (name, v) in [
            ("POST", &r.post),
            (fanout.as_str(), &r.fanout),
            ("POST start → first socket (per message)", &r.first),
            ("spread: first → last socket (per message)", &r.spread),
            ("POST answered → last socket (per message)", &r.after_post),
            ("POST start → a socket (per delivery)", &r.delivery),
        ] {
            println!("{}", chatfleet_tests::latency_row(name, v));
        }
        println!(
            "\nsockets opened in {:.1} s · accepted {} · rejected {:?} (by status) · deliveries expected {} ({} sockets per message) · \
             delivered {} · lost {} · duplicates {} · messages not on every socket {} · other frames {} · \
             sockets that ended early {}",
            r.open_time.as_secs_f64(),
            r.accepted,
            r.rejected,
            r.expected,
            r.members,
            r.delivered,
            r.expected.saturating_sub(r.delivered),
            r.duplicates,
            r.incomplete,
            r.other_frames,
            r.ended_early
        );
        r.window.report("CPU while posting, until the last answer", r.accepted, fleet);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_stamp_is_read_from_a_message_frame() {
            let frame = r#"{"type":"message","message":{"message_id":"m","recipients":["a","b"],"content":"bench 12 3456","created_at":"x"}}"#;
            assert_eq!(bench_stamp(frame), Some((12, Duration::from_nanos(3456))));
            assert_eq!(bench_stamp(r#"{"type":"member_joined","user_id":"a"}"#), None);
        }
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn the_machine_line_of_proc_stat_is_read() {
        let stat =
            "cpu  100 5 20 800 10 0 3 12 0 0\ncpu0 50 2 10 400 5 0 1 6 0 0\ncpu1 50 3 10 400 5 0 2 6 0 0\nintr 1 2\n";
        assert_eq!(parse_host_ticks(stat), Some(HostTicks { total: 950, idle: 810, steal: 12, cpus: 2 }));
        assert_eq!(parse_host_ticks("intr 1 2\n"), None);
    }
}
