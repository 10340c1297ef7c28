//! Throughput of generalnotificationshandler: notifications fanned out per second to
//! 1,000 connected users, end to end (internal `POST` → frame read by the client).
//!
//! Not a timed test: it only asserts that every notification arrived exactly once, and
//! prints the figure. It is `#[ignore]`d; run it by hand, with the service built in
//! release mode (the clients and the load generator run in this process, on the same
//! machine, so the figure is a floor for the service, not a ceiling):
//!
//! ```sh
//! cargo build --release -p generalnotificationshandler
//! CHATFLEET_TEST_PROFILE=release cargo nextest run --release -p chatfleet-tests \
//!     --test fleet --run-ignored only --no-capture notifications_throughput::
//! ```
//!
//! Knobs (environment): `BENCH_USERS` (1000), `BENCH_SOCKETS_PER_USER` (1),
//! `BENCH_PER_USER` (notifications per user, 20), `BENCH_CONCURRENCY` (in-flight
//! `POST`s, 64).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, JWT_SECRET, SERVICE_TOKEN};
use futures::{stream, StreamExt};
use serde_json::{json, Value};
use testkit::Redis;
use tokio_tungstenite::tungstenite::Message;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn purchase(user: &str, n: usize) -> Value {
    json!({"purchase_id": format!("p-{user}-{n}"), "user_id": user, "status": "paid", "amount_minor": 1999,
        "currency": "EUR", "updated_at": "2025-01-01T12:00:00Z"})
}

/// Posts every `(user, body)` with `concurrency` in flight; returns the latencies.
async fn post_all(service: &Service, bodies: Vec<(String, Value)>, concurrency: usize) -> Vec<Duration> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let base = service.internal_url("/notifications/purchase");
    stream::iter(bodies)
        .map(|(user, body)| {
            let request = http.post(format!("{base}?user_id={user}")).bearer_auth(SERVICE_TOKEN).json(&body);
            async move {
                let started = Instant::now();
                let response = request.send().await.expect("notification answered");
                let status = response.status().as_u16();
                let report: Value = response.json().await.unwrap_or(Value::Null);
                assert_eq!(status, 200, "{report}");
                assert_eq!(report["failed"], 0, "{report}");
                started.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

async fn wait_for(counter: &AtomicUsize, target: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while counter.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "only {} of {target} frames arrived", counter.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by hand in release mode (see the module docs)"]
async fn notifications_per_second_to_a_thousand_connected_users() {
    let users = knob("BENCH_USERS", 1000);
    let sockets_per_user = knob("BENCH_SOCKETS_PER_USER", 1);
    let per_user = knob("BENCH_PER_USER", 20);
    let concurrency = knob("BENCH_CONCURRENCY", 64);

    let redis = Redis::start();
    let env: Vec<(String, String)> = [
        ("JWT_SECRET", JWT_SECRET.to_owned()),
        ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
        ("REDIS_URL", redis.url()),
        ("LOG_LEVEL", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let service = Service::start("generalnotificationshandler", &env);

    // Connect every socket; each reader only counts the frames it gets.
    let received = Arc::new(AtomicUsize::new(0));
    let names: Vec<String> = (0..users).map(|i| format!("user-{i:04}")).collect();
    let connected = Instant::now();
    let per_socket: Vec<Arc<AtomicUsize>> = stream::iter(names.iter().flat_map(|u| vec![u.clone(); sockets_per_user]))
        .map(|user| {
            let url = service.ws_url(&format!("/notifications/subscribe?user_id={user}&access_token={}", token(&user)));
            let received = received.clone();
            async move {
                let (mut ws, _) = chatfleet_tests::ws_connect(url).await.expect("subscribe");
                let mine = Arc::new(AtomicUsize::new(0));
                let count = mine.clone();
                tokio::spawn(async move {
                    while let Some(Ok(message)) = ws.next().await {
                        if let Message::Text(_) = message {
                            count.fetch_add(1, Ordering::Relaxed);
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                mine
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let sockets = per_socket.len();
    eprintln!("{sockets} sockets for {users} users connected in {:?}", connected.elapsed());

    // Warm-up: one notification per user (connections in the pool, code paths hot).
    let warm: Vec<(String, Value)> = names.iter().map(|u| (u.clone(), purchase(u, 0))).collect();
    post_all(&service, warm, concurrency).await;
    wait_for(&received, sockets, Duration::from_secs(60)).await;

    // The measurement: per_user notifications for every user, interleaved.
    let bodies: Vec<(String, Value)> =
        (1..=per_user).flat_map(|n| names.iter().map(move |u| (u.clone(), purchase(u, n)))).collect();
    let notifications = bodies.len();
    let frames = notifications * sockets_per_user;
    let started = Instant::now();
    let mut latencies = post_all(&service, bodies, concurrency).await;
    let posted = started.elapsed();
    wait_for(&received, sockets + frames, Duration::from_secs(120)).await;
    let delivered = started.elapsed();

    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let rate = notifications as f64 / delivered.as_secs_f64();
    eprintln!(
        "THROUGHPUT: {notifications} notifications to {users} users ({sockets_per_user} socket(s) each, \
         {frames} frames) in {delivered:.2?} (all POSTs answered after {posted:.2?}): \
         {rate:.0} notifications/s, {:.0} frames/s; POST latency p50 {:?}, p99 {:?}, max {:?} \
         ({concurrency} in flight)",
        frames as f64 / delivered.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or_default(),
    );

    // Exactly once each, nothing lost, nothing doubled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.load(Ordering::Relaxed), sockets + frames);
    for (i, count) in per_socket.iter().enumerate() {
        assert_eq!(count.load(Ordering::Relaxed), per_user + 1, "socket {i}");
    }
}
