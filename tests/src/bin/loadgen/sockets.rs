//! The socket-scale mode of the load generator: N idle sockets on one socket pod, what
//! they cost in memory, how fast they open, and how fast a message still arrives with
//! all of them open.
//!
//! Why this module exists: "little memory per socket" is only true when measured on
//! the running binary, with the sockets really open. This mode opens N authenticated
//! sockets against one `chatwebsocketshandler` (pair streams, one user per socket) or
//! one `generalnotificationshandler` (one user per socket), reads the pod's RSS before
//! and after (`/proc/<pid>/status`), reports RSS per socket, the connect rate and the
//! pod's CPU per connect, then sends probe messages to one stream (or user) among the
//! N and reports their delivery latency.
//!
//! One process may hold only as many sockets as its open-files limit allows (20,000
//! hard on some machines), so the sockets are opened by worker processes (this same
//! binary, `--socket-worker`), each holding at most `--per-worker` of them; the probe
//! sockets are this process's own.
//!
//! ```text
//! loadgen --sockets 19500 --socket-service chat --rate 20 --duration 10
//! loadgen --sockets 19500 --socket-service notifications --rate 20 --duration 10
//! loadgen --sockets 1000 --socket-service notifications --fanout-per-user 20 --concurrency 64
//! loadgen --sockets 1000 --socket-service notifications --fanout-per-user 20 --concurrency 64 --notify-batch 1
//! ```
//!
//! `--fanout-per-user K` measures notification fan-out instead: one socket per user held
//! by this process, K purchase notifications per user through the internal endpoint
//! with `--concurrency` in flight, every frame counted, and the frames per second from
//! the first `POST` until the last frame arrived. The notifications go `--notify-batch N`
//! (default 100) to a `POST /notifications/batch`, so the run measures the pod rather
//! than the load generator's HTTP requests; `--notify-batch 1` posts each one to its
//! single endpoint (the measurement before the batch endpoint existed).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatfleet_tests::{client, cpu_seconds, percentile, token, ChatFleet, Service, JWT_SECRET, SERVICE_TOKEN};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Which socket service is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Notifications,
}

impl Kind {
    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "chat" | "chatwebsocketshandler" => Some(Kind::Chat),
            "notifications" | "generalnotificationshandler" => Some(Kind::Notifications),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Notifications => "notifications",
        }
    }

    fn service(self) -> &'static str {
        match self {
            Kind::Chat => "chatwebsocketshandler",
            Kind::Notifications => "generalnotificationshandler",
        }
    }
}

struct Options {
    sockets: usize,
    kind: Kind,
    rate: u64,
    duration: u64,
    per_worker: usize,
    concurrency: usize,
    settle: u64,
    fanout_per_user: usize,
    /// Notifications per internal `POST` in the fan-out (`/notifications/batch`); 1 posts
    /// each to its single endpoint.
    notify_batch: usize,
}

/// The path of the upgrade of socket `i` (its user is `u{i}`; chat sockets pair
/// `u{2k}` with `u{2k+1}`).
fn socket_path(kind: Kind, i: usize) -> String {
    match kind {
        Kind::Chat => {
            let (me, peer) = if i.is_multiple_of(2) { (i, i + 1) } else { (i, i - 1) };
            let (me, peer) = (format!("u{me}"), format!("u{peer}"));
            let stream = client::stream_id(&me, &peer);
            format!("/chat/subscribe?stream_id={stream}&sender_id={me}&receiver_id={peer}&access_token={}", token(&me))
        }
        Kind::Notifications => {
            let me = format!("u{i}");
            format!("/notifications/subscribe?user_id={me}&access_token={}", token(&me))
        }
    }
}

/// The client side keeps its buffers small too: the load generator holds as many
/// sockets as the pod.
fn client_config() -> WebSocketConfig {
    chatfleet_tests::ws_client_config().write_buffer_size(0)
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Result<Socket, String> {
    let mut last = String::new();
    for attempt in 0..10 {
        match tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true).await {
            Ok((ws, _)) => return Ok(ws),
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    Err(last)
}

/// RSS and peak RSS of a process, KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Open files of a process (its sockets among them).
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// `Some(exit code)` when the arguments ask for this mode (or a worker of it).
pub fn dispatch() -> Option<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--socket-worker") {
        return Some(worker(&args[1..]));
    }
    if !args.iter().any(|a| a == "--sockets") {
        return None;
    }
    let mut o = Options {
        sockets: 20_000,
        kind: Kind::Chat,
        rate: 20,
        duration: 10,
        per_worker: 10_000,
        concurrency: 64,
        settle: 5,
        fanout_per_user: 0,
        notify_batch: 100,
    };
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let number = |default: u64| value.parse().unwrap_or(default);
        match args[i].as_str() {
            "--sockets" => o.sockets = number(o.sockets as u64) as usize,
            "--socket-service" => match Kind::parse(&value) {
                Some(kind) => o.kind = kind,
                None => return Some(usage(&format!("unknown socket service {value}"))),
            },
            "--rate" => o.rate = number(o.rate).max(1),
            "--duration" => o.duration = number(o.duration),
            "--per-worker" => o.per_worker = number(o.per_worker as u64).max(1) as usize,
            "--concurrency" => o.concurrency = number(o.concurrency as u64).max(1) as usize,
            "--settle" => o.settle = number(o.settle),
            "--fanout-per-user" => o.fanout_per_user = number(0) as usize,
            "--notify-batch" => o.notify_batch = number(o.notify_batch as u64).max(1) as usize,
            other => return Some(usage(&format!("unknown option {other}"))),
        }
        i += 2;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if o.fanout_per_user > 0 {
        return Some(runtime.block_on(fanout(o)));
    }
    Some(runtime.block_on(run(o)))
}

fn usage(problem: &str) -> i32 {
    eprintln!(
        "{problem}; options: --sockets N --socket-service chat|notifications --rate R --duration S \
         --per-worker N --concurrency N --settle S | --fanout-per-user K [--notify-batch N]"
    );
    2
}

/// A worker: opens sockets `from..from+count` of `kind` on `base`, says `opened <n>
/// <seconds>` on stdout, keeps them open (reading and dropping frames, answering
/// pings) until its stdin closes, then says `frames <n>`.
fn worker(args: &[String]) -> i32 {
    let [kind, base, from, count, concurrency] = args else {
        eprintln!("--socket-worker KIND BASE_URL FROM COUNT CONCURRENCY");
        return 2;
    };
    let (Some(kind), Ok(from), Ok(count), Ok(concurrency)) =
        (Kind::parse(kind), from.parse::<usize>(), count.parse::<usize>(), concurrency.parse::<usize>())
    else {
        eprintln!("--socket-worker: bad arguments");
        return 2;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let frames = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let opened: Vec<Result<Socket, String>> = futures::stream::iter(from..from + count)
            .map(|i| {
                let url = format!("{base}{}", socket_path(kind, i));
                async move { open(&url).await.map_err(|e| format!("socket {i}: {e}")) }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let took = started.elapsed().as_secs_f64();
        let mut readers = Vec::with_capacity(count);
        let mut failed = 0;
        for socket in opened {
            match socket {
                Ok(mut ws) => {
                    let frames = frames.clone();
                    readers.push(tokio::spawn(async move {
                        while let Some(Ok(message)) = ws.next().await {
                            if let Message::Text(_) = message {
                                frames.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }));
                }
                Err(err) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("worker: {err}");
                    }
                }
            }
        }
        println!("opened {} {took:.3} {failed}", readers.len());
        let _ = std::io::stdout().flush();
        // Held open until the parent closes our stdin (or dies).
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                line.clear();
            }
        })
        .await;
        println!("frames {}", frames.load(Ordering::Relaxed));
        let _ = std::io::stdout().flush();
        for reader in readers {
            reader.abort();
        }
    });
    0
}

/// What the stack started for the measured service holds on to.
enum Target {
    Chat(Box<ChatFleet>),
    Notifications { _redis: Box<testkit::Redis>, service: Box<Service> },
}

impl Target {
    fn sockets(&self) -> &Service {
        match self {
            Target::Chat(fleet) => &fleet.sockets,
            Target::Notifications { service, .. } => service,
        }
    }
}

/// The settings the measured pod gets besides its defaults: room for N sockets, and
/// no per-address limits (every socket comes from 127.0.0.1).
fn service_env(sockets: usize) -> Vec<(&'static str, String)> {
    vec![
        ("LOG_LEVEL", "warn".to_owned()),
        ("WS_MAX_CONNECTIONS", (sockets + 100).to_string()),
        ("WS_MAX_CONNECTIONS_PER_IP", "0".to_owned()),
        ("WS_CONNECT_RATE_PER_IP", "0".to_owned()),
    ]
}

async fn start(kind: Kind, sockets: usize) -> Target {
    let env = service_env(sockets);
    match kind {
        Kind::Chat => {
            let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let fleet = ChatFleet::start(&extra);
            fleet.warm_up().await;
            Target::Chat(Box::new(fleet))
        }
        Kind::Notifications => {
            let redis = testkit::Redis::start();
            let mut all: Vec<(String, String)> = vec![
                ("JWT_SECRET".into(), JWT_SECRET.into()),
                ("INTERNAL_SERVICE_TOKEN".into(), SERVICE_TOKEN.into()),
                ("REDIS_URL".into(), redis.url()),
            ];
            all.extend(env.into_iter().map(|(k, v)| (k.to_owned(), v)));
            let service = Service::start("generalnotificationshandler", &all);
            Target::Notifications { _redis: Box::new(redis), service: Box::new(service) }
        }
    }
}

/// A running worker process and what it said.
struct Worker {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn spawn_worker(kind: Kind, base: &str, from: usize, count: usize, concurrency: usize) -> Worker {
    let exe = std::env::current_exe().expect("the load generator's own path");
    let mut child = Command::new(exe)
        .args(["--socket-worker", kind.name(), base, &from.to_string(), &count.to_string(), &concurrency.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("a socket worker");
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Worker { child, lines }
}

/// The probe: `rate` messages a second for `seconds` to one stream (or user) among the
/// N, each stamped with its send time, and the latency of every arrival.
async fn probe(target: &Target, kind: Kind, rate: u64, seconds: u64) -> (Vec<Duration>, u64, u64) {
    let anchor = Instant::now();
    let sockets = target.sockets();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Duration)>();
    let paths: Vec<String> = match kind {
        Kind::Chat => {
            let (a, b) = ("probe-a", "probe-b");
            let stream = client::stream_id(a, b);
            [(a, b), (b, a)]
                .iter()
                .map(|(me, peer)| {
                    format!(
                        "/chat/subscribe?stream_id={stream}&sender_id={me}&receiver_id={peer}&access_token={}",
                        token(me)
                    )
                })
                .collect()
        }
        Kind::Notifications => {
            vec![format!("/notifications/subscribe?user_id=probe-a&access_token={}", token("probe-a"))]
        }
    };
    let mut readers = Vec::new();
    for path in paths {
        let mut ws = open(&sockets.ws_url(&path)).await.expect("the probe socket");
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else { continue };
                let now = anchor.elapsed();
                // `probe <seq> <nanos>` in a message's content or a purchase's id.
                let Some(at) = text.as_str().find("probe_") else { continue };
                let mut parts = text.as_str()[at + 6..].split(|c: char| !c.is_ascii_digit());
                let (Some(Ok(seq)), Some(Ok(sent))) =
                    (parts.next().map(str::parse::<u64>), parts.next().map(str::parse::<u64>))
                else {
                    continue;
                };
                let _ = tx.send((seq, now.saturating_sub(Duration::from_nanos(sent))));
            }
        }));
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let total = rate * seconds;
    let mut accepted = 0;
    let start = tokio::time::Instant::now();
    for seq in 0..total {
        tokio::time::sleep_until(start + Duration::from_nanos(seq * 1_000_000_000 / rate)).await;
        let stamp = format!("probe_{seq}_{}", anchor.elapsed().as_nanos());
        let request = match (kind, target) {
            (Kind::Chat, Target::Chat(fleet)) => http
                .post(fleet.persistence.url("/chat/messages"))
                .bearer_auth(token("probe-a"))
                .json(&json!({"sender_id": "probe-a", "receiver_id": "probe-b", "content": stamp})),
            _ => http
                .post(sockets.internal_url("/notifications/purchase?user_id=probe-a"))
                .bearer_auth(SERVICE_TOKEN)
                .json(&json!({"purchase_id": stamp, "user_id": "probe-a", "status": "paid", "amount_minor": 1,
                    "currency": "EUR", "updated_at": "2026-01-01T00:00:00Z"})),
        };
        if let Ok(response) = request.timeout(Duration::from_secs(5)).send().await {
            if response.status().is_success() {
                accepted += 1;
            }
        }
    }
    let expected = accepted * readers.len() as u64;
    let mut latencies = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (seen.len() as u64) < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((seq, latency))) => {
                // Chat: two sockets get each message; told apart by arrival order.
                let copy = (0..).find(|c| !seen.contains(&(seq, *c))).unwrap_or(0);
                if kind == Kind::Notifications && copy > 0 {
                    duplicates += 1;
                    continue;
                }
                seen.insert((seq, copy));
                latencies.push(latency);
            }
            _ => break,
        }
    }
    for reader in readers {
        reader.abort();
    }
    latencies.sort();
    (latencies, expected, duplicates)
}

async fn run(o: Options) -> i32 {
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    eprintln!("starting {} and what it needs (release binaries) …", o.kind.service());
    let target = start(o.kind, o.sockets).await;
    let pod = target.sockets();
    let Some(pid) = pod.pid() else {
        eprintln!("the socket pod has no pid");
        return 1;
    };
    // The pod as it idles before any socket: the baseline the sockets are counted from.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before, _) = rss_kib(pid);
    let cpu_before = cpu_seconds(pid);
    let base = format!("ws://127.0.0.1:{}", pod.public_port);

    let workers_needed = o.sockets.div_ceil(o.per_worker);
    eprintln!("opening {} {} sockets with {workers_needed} worker process(es) …", o.sockets, o.kind.name());
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..workers_needed {
        let from = w * o.per_worker;
        let count = o.per_worker.min(o.sockets - from);
        workers.push(spawn_worker(o.kind, &base, from, count, o.concurrency.div_ceil(workers_needed)));
    }
    let (mut opened, mut failed) = (0usize, 0usize);
    for worker in &workers {
        match worker.lines.recv_timeout(Duration::from_secs(600)) {
            Ok(line) => {
                let parts: Vec<&str> = line.split_whitespace().collect();
                opened += parts.get(1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
                failed += parts.get(3).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
            }
            Err(_) => eprintln!("a worker said nothing within 600 s"),
        }
    }
    let open_time = started.elapsed();
    let cpu_open = cpu_seconds(pid) - cpu_before;
    eprintln!("{opened} sockets open ({failed} failed) in {:.2} s; settling {} s …", open_time.as_secs_f64(), o.settle);
    tokio::time::sleep(Duration::from_secs(o.settle)).await;
    let (rss_after, hwm) = rss_kib(pid);
    let files = open_files(pid);
    let cpu_idle_start = cpu_seconds(pid);
    let idle_wall = Instant::now();

    eprintln!("probing: {} msg/s for {} s to one stream among {opened} …", o.rate, o.duration);
    let (latencies, expected, duplicates) = probe(&target, o.kind, o.rate, o.duration).await;
    let probe_cpu = cpu_seconds(pid) - cpu_idle_start;
    let probe_wall = idle_wall.elapsed().as_secs_f64();
    let (rss_probe, _) = rss_kib(pid);

    // Stop the workers: closing their stdin lets them report and exit.
    let mut frames = 0u64;
    for worker in &mut workers {
        drop(worker.child.stdin.take());
    }
    for worker in &mut workers {
        if let Ok(line) = worker.lines.recv_timeout(Duration::from_secs(30)) {
            frames += line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        }
        let _ = worker.child.wait();
    }

    let per_socket = (rss_after.saturating_sub(rss_before)) as f64 / opened.max(1) as f64;
    let rate = opened as f64 / open_time.as_secs_f64();
    println!("# chatfleet loadgen: {opened} idle {} sockets on one {}", o.kind.name(), o.kind.service());
    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| sockets asked / open / failed | {} / {opened} / {failed} |", o.sockets);
    println!("| pod open files with all sockets open | {files} |");
    println!("| pod RSS before the sockets | {:.1} MiB |", rss_before as f64 / 1024.0);
    println!("| pod RSS with all open, after {} s idle | {:.1} MiB |", o.settle, rss_after as f64 / 1024.0);
    println!("| **RSS per socket** | **{per_socket:.1} KiB** |");
    println!("| pod peak RSS (VmHWM) | {:.1} MiB |", hwm as f64 / 1024.0);
    println!("| pod RSS after the probe | {:.1} MiB |", rss_probe as f64 / 1024.0);
    println!(
        "| **connect rate** ({} upgrades in flight, {} worker(s)) | **{rate:.0} sockets/s** ({opened} in {:.2} s) |",
        o.concurrency,
        workers.len(),
        open_time.as_secs_f64()
    );
    println!(
        "| pod CPU while opening | {cpu_open:.2} s ({:.0} µs per socket) |",
        cpu_open * 1e6 / opened.max(1) as f64
    );
    println!(
        "| pod CPU with all open, probing | {probe_cpu:.2} s in {probe_wall:.1} s ({:.3} cores) |",
        probe_cpu / probe_wall.max(0.001)
    );
    println!("| frames the idle sockets got (expected 0) | {frames} |");
    println!();
    println!(
        "| probe: {} msg/s for {} s to one stream among {opened} | p50 ms | p95 ms | p99 ms | max ms |",
        o.rate, o.duration
    );
    println!("| --- | --- | --- | --- | --- |");
    let name = match o.kind {
        Kind::Chat => "POST → chat socket (both participants)",
        Kind::Notifications => "internal POST → notification socket",
    };
    println!("{}", chatfleet_tests::latency_row(name, &latencies));
    println!(
        "\nprobe deliveries expected {expected} · delivered {} · lost {} · duplicates {duplicates}",
        latencies.len(),
        expected.saturating_sub(latencies.len() as u64)
    );
    0
}

/// The notification fan-out: one socket per user (this process's own), K purchase
/// notifications per user, `notify_batch` per internal `POST /notifications/batch` (or
/// one per single-endpoint `POST` when it is 1) with `concurrency` requests in flight,
/// and every frame counted until all arrived. An item a batch answers with anything but
/// `ok` counts as not delivered.
async fn fanout(o: Options) -> i32 {
    if std::env::var_os("CHATFLEET_TEST_PROFILE").is_none() {
        std::env::set_var("CHATFLEET_TEST_PROFILE", "release");
    }
    let target = start(Kind::Notifications, o.sockets).await;
    let pod = target.sockets();
    let pid = pod.pid().unwrap_or(0);
    let received = Arc::new(AtomicU64::new(0));
    let opened: Vec<Result<tokio::task::JoinHandle<()>, String>> = futures::stream::iter(0..o.sockets)
        .map(|i| {
            let url = pod.ws_url(&socket_path(Kind::Notifications, i));
            let received = received.clone();
            async move {
                let mut ws = open(&url).await?;
                Ok(tokio::spawn(async move {
                    while let Some(Ok(message)) = ws.next().await {
                        if let Message::Text(_) = message {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let readers: Vec<_> = opened.into_iter().filter_map(Result::ok).collect();
    let users = readers.len();
    let http = reqwest::Client::builder().pool_max_idle_per_host(o.concurrency).build().expect("client");
    let base = pod.internal_url("/notifications/purchase");
    let batch_url = pod.internal_url("/notifications/batch");
    let per_post = o.notify_batch;
    let purchase = |u: usize, n: usize| {
        json!({"purchase_id": format!("p{u}x{n}"), "user_id": format!("u{u}"), "status": "paid",
            "amount_minor": 1999, "currency": "EUR", "updated_at": "2026-01-01T00:00:00Z"})
    };
    // Each POST: (ok, its latency, notifications it carried that were not delivered).
    let post_all = |round: std::ops::Range<usize>| {
        let bodies: Vec<(usize, usize)> = round.flat_map(|n| (0..users).map(move |u| (u, n))).collect();
        let chunks: Vec<Vec<(usize, usize)>> = bodies.chunks(per_post).map(<[(usize, usize)]>::to_vec).collect();
        let (http, base, batch_url) = (http.clone(), base.clone(), batch_url.clone());
        futures::stream::iter(chunks)
            .map(move |chunk| {
                let request = if per_post == 1 {
                    let (u, n) = chunk[0];
                    http.post(format!("{base}?user_id=u{u}")).json(&purchase(u, n))
                } else {
                    let items: Vec<Value> = chunk
                        .iter()
                        .map(|&(u, n)| json!({"user_id": format!("u{u}"), "kind": "purchase", "body": purchase(u, n)}))
                        .collect();
                    http.post(batch_url.as_str()).json(&json!({ "items": items }))
                };
                let request = request.bearer_auth(SERVICE_TOKEN).timeout(Duration::from_secs(30));
                let carried = chunk.len();
                async move {
                    let started = Instant::now();
                    let answer = request.send().await;
                    let (ok, undelivered) = match answer {
                        Ok(r) if r.status().as_u16() == 200 && per_post == 1 => (true, 0),
                        Ok(r) if r.status().as_u16() == 200 => match r.json::<Value>().await {
                            Ok(body) => {
                                let results = body["results"].as_array().cloned().unwrap_or_default();
                                let done = results.iter().filter(|r| r["outcome"] == "ok").count();
                                (results.len() == carried, carried - done.min(carried))
                            }
                            Err(_) => (false, carried),
                        },
                        _ => (false, carried),
                    };
                    (ok && undelivered == 0, started.elapsed(), undelivered)
                }
            })
            .buffer_unordered(o.concurrency)
            .collect::<Vec<(bool, Duration, usize)>>()
    };
    let wait_for = |target: u64| {
        let received = received.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while received.load(Ordering::Relaxed) < target && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            received.load(Ordering::Relaxed)
        }
    };
    // Warm-up: one notification per user.
    post_all(0..1).await;
    wait_for(users as u64).await;
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let posts = post_all(1..o.fanout_per_user + 1).await;
    let posted = started.elapsed();
    let expected = (users * (o.fanout_per_user + 1)) as u64;
    let got = wait_for(expected).await;
    let took = started.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = received.load(Ordering::Relaxed).saturating_sub(expected);
    for reader in readers {
        reader.abort();
    }
    let failed = posts.iter().filter(|(ok, _, _)| !ok).count();
    let undelivered: usize = posts.iter().map(|(_, _, n)| n).sum();
    let mut latencies: Vec<Duration> = posts.iter().map(|(_, d, _)| *d).collect();
    latencies.sort();
    let frames = (users * o.fanout_per_user) as f64;
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let how = if per_post == 1 {
        "one internal POST per notification".to_owned()
    } else {
        format!("{per_post} per POST /notifications/batch")
    };
    println!("# chatfleet loadgen: notification fan-out to {users} users ({} per user, {how})", o.fanout_per_user);
    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| notifications (one frame each) | {frames:.0} in {:.2} s (all POSTs answered after {:.2} s) |",
        took.as_secs_f64(),
        posted.as_secs_f64()
    );
    println!("| **frames per second** | **{:.0}** |", frames / took.as_secs_f64());
    println!(
        "| POST p50 / p99 / max ms ({} POSTs, {} in flight) | {} / {} / {} |",
        posts.len(),
        o.concurrency,
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!("| pod CPU | {cpu:.2} s ({:.0} µs per frame) |", cpu * 1e6 / frames.max(1.0));
    println!(
        "| refused POSTs / items not delivered / frames missing / frames extra | {failed} / {undelivered} / {} / {extra} |",
        expected.saturating_sub(got)
    );
    0
}
