//! One user flooding reads does not starve the others, black-box: a real
//! chatpersistence (MongoDB, Redis, the broker) with a small read limit
//! (`RATE_LIMIT_READ_PER_SECOND=2`, `RATE_LIMIT_READ_BURST=5`).
//!
//! Why this file exists: the read bucket is what keeps one client looping on
//! `GET /presence` or the inbox from taking MongoDB and Redis away from everyone.
//! The bucket's unit tests show it refuses; only the running service shows that it
//! is keyed on the token's user (another user, even one asking about the flooder,
//! is served meanwhile), that its refusal is the documented one (`429
//! rate_limited` + `Retry-After`, counted in `rate_limited_total{limit="read"}`),
//! that every public `GET` shares it, that it does not touch the flooder's writes,
//! and that service-token and ops routes are not limited.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatfleet_tests::{token, Service, Stack, SERVICE_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

const FLOODER: &str = "rl-flooder";
const OTHER: &str = "rl-other";
const BYSTANDER: &str = "rl-bystander";
const RATE: u64 = 2;
const BURST: u64 = 5;
const FLOOD_FOR: Duration = Duration::from_secs(2);
const FLOOD_LOOPS: usize = 4;

struct Fixture {
    _stack: Stack,
    persistence: Service,
    http: reqwest::Client,
}

/// One answer: status, `Retry-After` in seconds, JSON body (`Null` when none).
type Answer = (u16, Option<u64>, Value);

impl Fixture {
    async fn start() -> Self {
        let stack = Stack::start();
        let mut env = stack.env();
        for (k, v) in [("CAPTURE_MODE", "outbox"), ("RATE_LIMIT_READ_PER_SECOND", "2"), ("RATE_LIMIT_READ_BURST", "5")]
        {
            env.push((k.to_owned(), v.to_owned()));
        }
        let persistence = Service::start("chatpersistence", &env);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client");
        let fixture = Self { _stack: stack, persistence, http };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = fixture.http.get(fixture.persistence.url("/readyz")).send().await;
            if ready.is_ok_and(|r| r.status().as_u16() == 200) {
                return fixture;
            }
            assert!(Instant::now() < deadline, "never ready:\n{}", fixture.persistence.log_tail(30));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(&self, method: Method, path: &str, bearer: &str, body: Option<Value>) -> Answer {
        answer(&self.http, method, self.persistence.url(path), bearer, body).await
    }

    async fn get(&self, path: &str, user: &str) -> Answer {
        self.call(Method::GET, path, &token(user), None).await
    }

    /// A write that must succeed (a `503` while the store starts is retried).
    async fn write(&self, path: &str, user: &str, body: Value) -> Value {
        for _ in 0..50 {
            let (status, _, answer) = self.call(Method::POST, path, &token(user), Some(body.clone())).await;
            match status {
                201 => return answer,
                503 => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => panic!("POST {path} as {user}: {status} {answer}"),
            }
        }
        panic!("POST {path} as {user} kept answering 503");
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = self.http.get(self.persistence.url("/metrics")).send().await.expect("metrics");
        let text = text.text().await.unwrap_or_default();
        text.lines().find_map(|line| line.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }
}

async fn answer(http: &reqwest::Client, method: Method, url: String, bearer: &str, body: Option<Value>) -> Answer {
    let mut request = http.request(method, url).bearer_auth(bearer);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("chatpersistence answers");
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    (status, retry_after, response.json().await.unwrap_or(Value::Null))
}

/// The documented refusal: `429`, `Retry-After` of at least a second, the JSON error.
fn is_read_limited((status, retry_after, body): &Answer) -> bool {
    *status == 429
        && retry_after.is_some_and(|s| s >= 1)
        && body["error"]["code"] == "rate_limited"
        && body["error"]["message"].as_str().is_some_and(|m| m.contains("reads"))
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    limited: AtomicU64,
    /// Anything else (a 429 without `Retry-After` or the JSON error included).
    odd: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_flood_is_refused_for_the_flooder_only() {
    let f = Fixture::start().await;
    // A pair conversation with a message, and a group: something to read.
    let message =
        f.write("/chat/messages", FLOODER, json!({"sender_id": FLOODER, "receiver_id": OTHER, "content": "hi"})).await;
    let message_id = message["message_id"].as_str().expect("message_id").to_owned();
    let stream = message["stream_id"].as_str().expect("stream_id").to_owned();
    let group = f.write("/chat/conversations", FLOODER, json!({"title": "readers", "members": [OTHER]})).await;
    let group = group["conversation_id"].as_str().expect("conversation_id").to_owned();

    // The flood: one token, several loops, as fast as the server answers.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let flood_url = f.persistence.url(&format!("/presence?user_id={OTHER}"));
    let loops: Vec<_> = (0..FLOOD_LOOPS)
        .map(|_| {
            let (http, url, stop, tally) = (f.http.clone(), flood_url.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let bearer = token(FLOODER);
                while !stop.load(Ordering::Relaxed) {
                    let got = answer(&http, Method::GET, url.clone(), &bearer, None).await;
                    if got.0 == 200 && got.2 == json!({"user_id": OTHER, "online": false}) {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    } else if is_read_limited(&got) {
                        tally.limited.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.odd.lock().expect("lock").push(format!("{got:?}"));
                    }
                }
            })
        })
        .collect();

    // Meanwhile the other user asks the same route, about the flooder, at its own
    // sustainable pace; a bystander reads its inbox; the flooder still posts.
    let started = Instant::now();
    let mut other_answers = Vec::new();
    let mut flooder_posts = Vec::new();
    let mut bystander_answers = Vec::new();
    while started.elapsed() < FLOOD_FOR {
        tokio::time::sleep(Duration::from_millis(500)).await;
        other_answers.push(f.get(&format!("/presence?user_id={FLOODER}"), OTHER).await);
        bystander_answers.push(f.get("/chat/conversations", BYSTANDER).await.0);
        let post = json!({"sender_id": FLOODER, "receiver_id": OTHER, "content": "still writing"});
        flooder_posts.push(f.call(Method::POST, "/chat/messages", &token(FLOODER), Some(post)).await.0);
    }
    stop.store(true, Ordering::Relaxed);
    for task in loops {
        task.await.expect("flood loop");
    }
    let elapsed = started.elapsed();
    let (ok, limited) = (tally.ok.load(Ordering::Relaxed), tally.limited.load(Ordering::Relaxed));
    let odd = tally.odd.lock().expect("lock").clone();
    println!(
        "read flood: {} requests in {elapsed:?}: {ok} answered, {limited} refused with 429; other user: {:?}",
        ok + limited + odd.len() as u64,
        other_answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );

    assert!(odd.is_empty(), "odd answers to the flooder: {:?}", &odd[..odd.len().min(5)]);
    // The burst was served, then no more than the sustained rate (with a token of slack).
    let allowed = BURST + RATE * (elapsed.as_secs() + 1) + 1;
    assert!((BURST..=allowed).contains(&ok), "{ok} flood reads answered; the bucket allows {BURST} to {allowed}");
    assert!(limited > 10 * ok, "the flood was not limited: {ok} answered, {limited} refused");
    for got in &other_answers {
        assert_eq!(got.0, 200, "the other user was refused during the flood: {got:?}");
        assert_eq!(got.2, json!({"user_id": FLOODER, "online": false}));
    }
    assert!(bystander_answers.iter().all(|s| *s == 200), "the bystander's inbox: {bystander_answers:?}");
    assert!(flooder_posts.iter().all(|s| *s == 201), "the flooder's own posts (another bucket): {flooder_posts:?}");

    // Every public GET takes from the same bucket: with it empty, each route refuses
    // (a token refilled in between lets one through, the next is refused).
    let routes = [
        format!("/chat/messages?peer_id={OTHER}"),
        format!("/chat/messages?stream_id={stream}"),
        format!("/chat/messages/{message_id}"),
        "/chat/conversations".to_owned(),
        format!("/chat/conversations/{group}"),
        format!("/presence?user_id={OTHER}"),
    ];
    let mut last_refusal = None;
    for route in &routes {
        let first = f.get(route, FLOODER).await;
        let refused = if is_read_limited(&first) { first.clone() } else { f.get(route, FLOODER).await };
        assert!(is_read_limited(&refused), "GET {route} is not read-limited: {first:?} then {refused:?}");
        last_refusal = Some(refused);
    }
    // Authentication comes first: a bad token is a 401, whoever it claims to be.
    let (status, _, body) = f.call(Method::GET, "/chat/conversations", "garbage", None).await;
    assert_eq!(status, 401, "{body}");
    // Service-token routes and the ops routes are not limited.
    let internal = f.persistence.internal_url(&format!("/chat/messages?stream_id={stream}"));
    for _ in 0..3 * BURST {
        let (status, _, body) = answer(&f.http, Method::GET, internal.clone(), SERVICE_TOKEN, None).await;
        assert_eq!(status, 200, "internal history: {body}");
        for ops in ["/healthz", "/metrics"] {
            let got = f.http.get(f.persistence.url(ops)).send().await.expect("ops answers");
            assert_eq!(got.status().as_u16(), 200, "{ops}");
        }
    }
    // Counted, as the read limit (the post limit refused nothing).
    let counted = f.metric("rate_limited_total{limit=\"read\"}").await;
    assert!(counted >= (limited + routes.len() as u64) as f64, "rate_limited_total{{limit=\"read\"}} = {counted}");
    assert_eq!(f.metric("rate_limited_total{limit=\"post_message\"}").await, 0.0);

    // Waiting as told, the flooder reads again; the other user reads every route.
    let wait = last_refusal.and_then(|r| r.1).expect("Retry-After");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, body) = f.get(&format!("/presence?user_id={OTHER}"), FLOODER).await;
    assert_eq!(status, 200, "after Retry-After: {body}");
    tokio::time::sleep(Duration::from_secs(BURST / RATE + 1)).await;
    for route in [
        format!("/chat/messages?peer_id={FLOODER}"),
        format!("/chat/messages/{message_id}"),
        "/chat/conversations".to_owned(),
        format!("/chat/conversations/{group}"),
        format!("/presence?user_id={FLOODER}"),
    ] {
        let (status, _, body) = f.get(&route, OTHER).await;
        assert_eq!(status, 200, "GET {route} as the other user: {body}");
    }
}
