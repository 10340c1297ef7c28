//! The chaos soak: messages at a steady rate over many conversations while every
//! service is SIGKILLed and restarted and Redis, the broker and MongoDB are paused,
//! with clients that behave like the SDK; then the books are balanced.
//!
//! Why this module exists: each failure test breaks one thing once. Nothing else
//! proves that over a long run where everything fails repeatedly no accepted message
//! is lost or stored twice. It is a library module so the same code runs as the
//! load generator's `--chaos` mode (release binaries, 10 minutes, figures in
//! docs/benchmarks.md) and as a 60-second test (debug binaries, tests/tests/fleet/chaos_soak.rs).
//!
//! The clients do what a careful SDK does:
//! - every socket reconnects with `since` (the newest message id it has) after any
//!   close, with jittered backoff; on close **4000** (resync) it pages
//!   `GET /chat/messages?since=` until `has_more` is false, then reconnects;
//! - it keeps messages by `message_id`, so a replayed or redelivered frame is shown
//!   once (a repeat on one unbroken connection is still counted: the server promises
//!   none);
//! - posts carry a `client_message_id` and are retried with it on any failure, except
//!   in every `idless_every`-th conversation, whose clients send none: they retry only
//!   answers that promise nothing was stored (`503`, `429`), and after an answer that
//!   never came (connection reset, timeout) or `503 write_outcome_unknown` they look
//!   the message up in the history before sending it again.
//!
//! Faults are applied one at a time (the next starts after the previous one has
//! recovered), at random moments from a seeded generator: a kill restarts the service
//! after a random 0.2-2 s; a pause is SIGSTOP, `pause`, SIGCONT. Recovery is timed by
//! a probe conversation: from the fault's start until a message posted after it ended
//! reached the probe's socket.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use testkit::SmtpSink;
use tokio_tungstenite::tungstenite::Message;

use crate::{percentile, token, Pipeline, Service, Stack};

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long messages are posted at least (posting goes on until the last fault
    /// has recovered).
    pub duration: Duration,
    /// Messages per second, over all conversations.
    pub rate: u64,
    /// Pair conversations (two users, two sockets each).
    pub conversations: usize,
    /// How many times each service is killed and each server paused.
    pub rounds: usize,
    /// How long a server stays paused.
    pub pause: Duration,
    /// Which of `redis-server`, `tansu` and `nx-27017` are paused.
    pub paused_servers: Vec<&'static str>,
    /// Every n-th conversation's clients post without a `client_message_id` (0: none).
    pub idless_every: usize,
    /// Seeds the fault schedule (printed, so a run can be repeated).
    pub seed: u64,
    /// How long, after posting stopped, accepted messages may take to reach everyone.
    pub drain: Duration,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            rate: 170,
            conversations: 120,
            rounds: 3,
            pause: Duration::from_secs(5),
            paused_servers: SERVERS.to_vec(),
            idless_every: 4,
            seed: 0x5eed,
            drain: Duration::from_secs(120),
        }
    }
}

/// One applied fault.
#[derive(Debug, Clone)]
pub struct Fault {
    /// `SIGKILL <service>` or `SIGSTOP <server>`.
    pub what: String,
    /// When it started, from the start of posting.
    pub at: Duration,
    /// How long the process was down or paused.
    pub down: Duration,
    /// From the start of the fault until a message posted after it reached a socket
    /// (`None`: not within a minute).
    pub recovered_after: Option<Duration>,
}

/// What a soak run found.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub conversations: usize,
    pub posting_seconds: f64,
    /// Distinct messages the clients meant to send.
    pub attempted: u64,
    /// Messages a client holds a `201`/`200` for (or found in the history after an
    /// answer that never came).
    pub accepted: u64,
    /// Of those, sent without a `client_message_id`.
    pub accepted_idless: u64,
    /// Idless posts whose answer never came and that were found stored by a lookup.
    pub found_by_lookup: u64,
    /// POST attempts that got no answer or an unknown-outcome answer.
    pub ambiguous_answers: u64,
    /// POST answers that were retried (`503`, `429`, 5xx, transport errors).
    pub retried_posts: u64,
    /// Messages still unanswered when the run ended (clients gave up).
    pub unresolved_posts: u64,
    /// Posts refused with a 4xx other than 408/429 (none should be).
    pub refused_posts: u64,
    /// Accepted messages stored exactly once in MongoDB.
    pub stored_once: u64,
    /// Messages stored more than once (by content: each message's text is unique).
    pub stored_twice: u64,
    /// Accepted messages MongoDB does not hold.
    pub accepted_not_stored: u64,
    /// Messages stored that no client was told were accepted.
    pub stored_not_accepted: u64,
    /// Accepted messages both participants' clients hold at the end.
    pub delivered_to_all: u64,
    /// Accepted messages missing at one participant or both.
    pub lost: u64,
    /// A message frame repeated on one connection that never broke.
    pub duplicate_frames_uninterrupted: u64,
    /// Socket (re)connections after the first, and `4000` resyncs handled.
    pub reconnects: u64,
    pub resyncs: u64,
    /// Messages that first reached a participant by history (replay or resync page)
    /// rather than by a live frame is not distinguished; this counts those received
    /// by a resync page.
    pub via_history_pages: u64,
    /// Live deliveries away from every fault window and their p50/p99.
    pub calm_deliveries: usize,
    pub calm_p50: Duration,
    pub calm_p99: Duration,
    /// Every delivery's p99, faults included.
    pub all_p99: Duration,
    /// How long messages waited in their author's outbox (scheduled → first POST): a
    /// client posts one message at a time, so a POST retried through a fault holds the
    /// author's later messages. Part of every delivery latency above.
    pub outbox_wait_p50: Duration,
    pub outbox_wait_p99: Duration,
    /// Delivery measured from the first POST instead of the schedule (the outbox wait
    /// taken out), away from every fault window (the POST after the window), p50/p99.
    pub posted_calm_deliveries: usize,
    pub posted_calm_p50: Duration,
    pub posted_calm_p99: Duration,
    pub faults: Vec<Fault>,
    /// Services found dead at the end (they must all be running).
    pub dead_at_end: Vec<String>,
}

impl ChaosReport {
    /// The report as Markdown (docs/benchmarks.md).
    pub fn markdown(&self) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        let mut out = String::new();
        out.push_str(&format!(
            "| figure | value |\n| --- | --- |\n\
             | seed | {} |\n| conversations | {} |\n| posting time | {:.0} s |\n\
             | messages attempted | {} |\n| accepted | {} ({:.1} msg/s) |\n\
             | accepted without client_message_id | {} |\n| found by a history lookup after a lost answer | {} |\n\
             | answers lost or of unknown outcome | {} |\n| retried POST answers | {} |\n\
             | unresolved / refused posts at the end | {} / {} |\n| stored exactly once | {} |\n| **stored twice** | **{}** |\n\
             | accepted but not stored | {} |\n| stored but never acknowledged | {} |\n\
             | delivered to both participants | {} |\n| **lost** | **{}** |\n\
             | duplicate frames on an uninterrupted socket | {} |\n| socket reconnects / resyncs | {} / {} |\n\
             | delivery p50 / p99 outside fault windows | {} / {} ms ({} deliveries) |\n\
             | delivery p99, all | {} ms |\n\
             | client outbox wait p50 / p99 (scheduled → first POST) | {} / {} ms |\n\
             | delivery p50 / p99 from the first POST, outside fault windows | {} / {} ms ({} deliveries) |\n\
             | services dead at the end | {} |\n",
            self.seed,
            self.conversations,
            self.posting_seconds,
            self.attempted,
            self.accepted,
            self.accepted as f64 / self.posting_seconds.max(1.0),
            self.accepted_idless,
            self.found_by_lookup,
            self.ambiguous_answers,
            self.retried_posts,
            self.unresolved_posts,
            self.refused_posts,
            self.stored_once,
            self.stored_twice,
            self.accepted_not_stored,
            self.stored_not_accepted,
            self.delivered_to_all,
            self.lost,
            self.duplicate_frames_uninterrupted,
            self.reconnects,
            self.resyncs,
            ms(self.calm_p50),
            ms(self.calm_p99),
            self.calm_deliveries,
            ms(self.all_p99),
            ms(self.outbox_wait_p50),
            ms(self.outbox_wait_p99),
            ms(self.posted_calm_p50),
            ms(self.posted_calm_p99),
            self.posted_calm_deliveries,
            if self.dead_at_end.is_empty() { "none".to_owned() } else { self.dead_at_end.join(", ") },
        ));
        out.push_str("\n| # | fault | at s | down s | recovered after s |\n| --- | --- | --- | --- | --- |\n");
        for (i, f) in self.faults.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {} |\n",
                i + 1,
                f.what,
                f.at.as_secs_f64(),
                f.down.as_secs_f64(),
                f.recovered_after.map_or("not within 60 s".to_owned(), |d| format!("{:.1}", d.as_secs_f64())),
            ));
        }
        out
    }
}

/// A small seeded generator (xorshift64*): the schedule must be repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to.saturating_sub(from).max(1)))
    }
}

/// The five services.
const SERVICES: [&str; 5] = [
    "chatpersistence",
    "chatwebsocketshandler",
    "generalnotificationshandler",
    "chatpersistencechangehandler",
    "emailhandler",
];
/// The servers that can be paused.
pub const SERVERS: [&str; 3] = ["redis-server", "tansu", "nx-27017"];

/// Every part of the fleet, started the way the local stack wires it.
pub struct ChaosFleet {
    pub stack: Stack,
    pub smtp: SmtpSink,
    /// In [`SERVICES`] order.
    pub services: Vec<Service>,
}

impl ChaosFleet {
    /// Starts the servers and the five services; `extra` goes to every service.
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let stack = Stack::start();
        let smtp = SmtpSink::start();
        let topics: Vec<(&str, i32)> =
            ["purchases.changes", "payments.changes", "shipments.changes", "email.dlq"].map(|t| (t, 3)).to_vec();
        kafkawrapper::ensure_topics(&stack.broker.bootstrap(), &topics).await.expect("domain topics");
        let mut base = stack.pipeline_env();
        base.push(("KAFKA_GROUP_ID".into(), testkit::unique("chaos-chat")));
        // Every client comes from 127.0.0.1: a socket pod's restart reconnects them
        // all at once. The per-user limits stay.
        base.push(("WS_CONNECT_RATE_PER_IP".into(), "0".into()));
        base.push(("WS_MAX_CONNECTIONS_PER_IP".into(), "0".into()));
        base.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let Pipeline { persistence, sockets, notifications, handler } = Pipeline::start(&base, &[]);
        let mut email_env = base;
        for (k, v) in [
            ("SMTP_HOST", "127.0.0.1".to_owned()),
            ("SMTP_PORT", smtp.port().to_string()),
            ("SMTP_TIMEOUT", "2s".to_owned()),
            ("EMAIL_DIGEST_WINDOW", "1s".to_owned()),
            ("KAFKA_GROUP_ID", testkit::unique("chaos-email")),
        ] {
            email_env.push((k.to_owned(), v));
        }
        let email = Service::start("emailhandler", &email_env);
        Self { stack, smtp, services: vec![persistence, sockets, notifications, handler, email] }
    }

    pub fn persistence(&self) -> &Service {
        &self.services[0]
    }

    pub fn sockets(&self) -> &Service {
        &self.services[1]
    }

    fn server_pid(&self, name: &str) -> Option<u32> {
        match name {
            "redis-server" => self.stack.redis.pid(),
            "tansu" => self.stack.broker.pid(),
            _ => self.stack.mongo.pid(),
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

/// Where the clients reach the fleet (ports survive restarts).
#[derive(Clone)]
struct Endpoints {
    messages: String,
    sockets_ws: String,
}

/// One participant's client state, as the SDK keeps it.
#[derive(Default)]
struct Participant {
    /// Every message id this client holds.
    known: HashSet<String>,
    /// The newest id held (ids of a conversation grow with time): the `since` cursor.
    newest: Option<String>,
    /// First live sighting of each message: (sent at, received at), from the run's anchor.
    /// With the message's sequence number (to find how long it waited in its author's
    /// outbox).
    live: Vec<(Duration, Duration, u64)>,
    duplicate_frames: u64,
    reconnects: u64,
    resyncs: u64,
    via_pages: u64,
}

impl Participant {
    /// Keeps a message; `true` when it is new to this client.
    fn keep(&mut self, id: &str) -> bool {
        if !self.known.insert(id.to_owned()) {
            return false;
        }
        if self.newest.as_deref().is_none_or(|n| id > n) {
            self.newest = Some(id.to_owned());
        }
        true
    }
}

/// `chaos <conversation> <seq> <sent nanos>`: what every soak message says.
/// A soak message's sequence number (`chaos <conversation> <seq> <nanos>`).
fn seq_of(content: &str) -> Option<u64> {
    content.split_whitespace().nth(2)?.parse().ok()
}

fn sent_at(content: &str) -> Option<Duration> {
    let nanos = content.split_whitespace().nth(3)?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

fn jitter(base: Duration, salt: u64) -> Duration {
    base + Duration::from_millis(salt.wrapping_mul(2_654_435_761) % (base.as_millis() as u64 / 2 + 1))
}

/// Pages the pair's history after the client's newest id until nothing more follows.
async fn catch_up(http: &reqwest::Client, ends: &Endpoints, me: &str, peer: &str, state: &Mutex<Participant>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let since = state.lock().expect("state").newest.clone();
        let mut url = format!("{}?peer_id={peer}&limit=200", ends.messages);
        if let Some(since) = since {
            url.push_str(&format!("&since={since}"));
        }
        let page = match http.get(&url).bearer_auth(token(me)).timeout(Duration::from_secs(30)).send().await {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            _ => None,
        };
        let Some(page) = page else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        {
            let mut s = state.lock().expect("state");
            for m in page["messages"].as_array().into_iter().flatten() {
                if s.keep(m["message_id"].as_str().unwrap_or_default()) {
                    s.via_pages += 1;
                }
            }
        }
        if page["has_more"] != json!(true) {
            return;
        }
    }
}

/// One participant's socket for the whole run, reconnecting like the SDK.
async fn socket_client(
    ends: Endpoints,
    me: String,
    peer: String,
    anchor: Instant,
    state: Arc<Mutex<Participant>>,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::new();
    let stream = crate::client::stream_id(&me, &peer);
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut url = format!(
            "{}/chat/subscribe?stream_id={stream}&sender_id={me}&receiver_id={peer}&access_token={}",
            ends.sockets_ws,
            token(&me)
        );
        if let Some(since) = state.lock().expect("state").newest.clone() {
            url.push_str(&format!("&since={since}"));
        }
        attempts += 1;
        let connected = tokio::time::timeout(Duration::from_secs(10), crate::ws_connect(url)).await;
        let Ok(Ok((mut ws, _))) = connected else {
            tokio::time::sleep(jitter(backoff, attempts)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(100);
        if attempts > 1 {
            state.lock().expect("state").reconnects += 1;
        }
        let mut on_this_connection: HashSet<String> = HashSet::new();
        let mut resync = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                let _ = ws.close(None).await;
                return;
            }
            let frame = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => break,
            };
            match frame {
                Message::Text(text) => {
                    let now = anchor.elapsed();
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    match v["type"].as_str() {
                        Some("message") => {
                            let id = v["message"]["message_id"].as_str().unwrap_or_default().to_owned();
                            let mut s = state.lock().expect("state");
                            if !on_this_connection.insert(id.clone()) {
                                s.duplicate_frames += 1;
                            }
                            if s.keep(&id) {
                                let content = v["message"]["content"].as_str().unwrap_or_default();
                                if let (Some(sent), Some(seq)) = (sent_at(content), seq_of(content)) {
                                    s.live.push((sent, now, seq));
                                }
                            }
                        }
                        Some("resync") => resync = true,
                        _ => {}
                    }
                }
                Message::Close(close) => {
                    resync |= close.is_some_and(|c| u16::from(c.code) == 4000);
                    break;
                }
                Message::Ping(p) => {
                    let _ = ws.send(Message::Pong(p)).await;
                }
                _ => {}
            }
        }
        if resync {
            state.lock().expect("state").resyncs += 1;
            catch_up(&http, &ends, &me, &peer, &state).await;
        } else {
            tokio::time::sleep(jitter(Duration::from_millis(50), attempts)).await;
        }
    }
}

/// A message a client holds an acknowledgement for.
#[derive(Clone)]
struct Accepted {
    conversation: usize,
    message_id: String,
    idless: bool,
}

#[derive(Default)]
struct PostStats {
    retried: AtomicU64,
    ambiguous: AtomicU64,
    found_by_lookup: AtomicU64,
    unresolved: AtomicU64,
    refused: AtomicU64,
    /// Per sequence number: how long the message waited in its author's outbox
    /// (scheduled → first POST) behind that author's earlier messages and their retries.
    outbox_waits: Mutex<HashMap<u64, Duration>>,
}

/// A UUIDv7 with the given millisecond time and nothing else: a `since` cursor that
/// lists everything created from then on.
fn floor_id(unix_ms: u64) -> String {
    format!("{:08x}-{:04x}-7000-8000-000000000000", unix_ms >> 16, unix_ms & 0xffff)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Looks for `content` in the pair's history from `floor` on; `None`: could not read.
async fn look_up(
    http: &reqwest::Client,
    ends: &Endpoints,
    me: &str,
    peer: &str,
    floor: &str,
    content: &str,
) -> Option<String> {
    let mut since = floor.to_owned();
    for _ in 0..1000 {
        let url = format!("{}?peer_id={peer}&limit=200&since={since}", ends.messages);
        let response = http.get(&url).bearer_auth(token(me)).timeout(Duration::from_secs(30)).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let page: Value = response.json().await.ok()?;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        if let Some(found) = messages.iter().find(|m| m["content"] == json!(content)) {
            return Some(found["message_id"].as_str().unwrap_or_default().to_owned());
        }
        match (page["has_more"] == json!(true), messages.last()) {
            (true, Some(last)) => since = last["message_id"].as_str().unwrap_or_default().to_owned(),
            _ => return Some(String::new()),
        }
    }
    None
}

/// Posts one message the way its client does, until it holds an answer or `give_up`.
#[allow(clippy::too_many_arguments)]
async fn post_one(
    http: reqwest::Client,
    ends: Endpoints,
    from: String,
    to: String,
    content: String,
    client_message_id: Option<String>,
    give_up: Arc<AtomicBool>,
    stats: Arc<PostStats>,
) -> Option<String> {
    let mut body = json!({ "sender_id": from, "receiver_id": to, "content": content });
    if let Some(id) = &client_message_id {
        body["client_message_id"] = json!(id);
    }
    let idless = client_message_id.is_none();
    let floor = floor_id(unix_ms().saturating_sub(60_000));
    let mut backoff = Duration::from_millis(100);
    let mut salt = content.len() as u64;
    loop {
        if give_up.load(Ordering::Relaxed) {
            stats.unresolved.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let sent = http
            .post(&ends.messages)
            .bearer_auth(token(&from))
            .json(&body)
            .timeout(Duration::from_secs(45))
            .send()
            .await;
        let (status, answer, retry_after) = match sent {
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map_or(Duration::ZERO, |s| Duration::from_secs(s.min(5)));
                (Some(status), r.json::<Value>().await.unwrap_or(Value::Null), retry_after)
            }
            Err(_) => (None, Value::Null, Duration::ZERO),
        };
        match status {
            Some(200 | 201) => return answer["message_id"].as_str().map(str::to_owned),
            Some(status) if (400..500).contains(&status) && status != 429 && status != 408 => {
                // The soak's posts are valid: a refusal is a finding, counted and shown.
                stats.refused.fetch_add(1, Ordering::Relaxed);
                eprintln!("chaos: {content}: answered {status} {answer}");
                return None;
            }
            _ => {}
        }
        stats.retried.fetch_add(1, Ordering::Relaxed);
        let unknown = status.is_none() || answer["error"]["code"] == json!("write_outcome_unknown");
        if unknown {
            stats.ambiguous.fetch_add(1, Ordering::Relaxed);
        }
        if idless && unknown {
            // Nothing says whether it was stored: find out before sending it again.
            loop {
                if give_up.load(Ordering::Relaxed) {
                    stats.unresolved.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                tokio::time::sleep(jitter(Duration::from_millis(500), salt)).await;
                salt += 1;
                match look_up(&http, &ends, &from, &to, &floor, &content).await {
                    Some(found) if !found.is_empty() => {
                        stats.found_by_lookup.fetch_add(1, Ordering::Relaxed);
                        return Some(found);
                    }
                    Some(_) => break,
                    None => continue,
                }
            }
        }
        salt += 1;
        // As the server asks (`Retry-After`), and never faster than the backoff.
        tokio::time::sleep(jitter(backoff.max(retry_after), salt)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Posts a probe and waits until the probe's socket has it; `true` if within `within`.
async fn probe_once(
    http: &reqwest::Client,
    ends: &Endpoints,
    n: u64,
    probe: &Mutex<Participant>,
    within: Duration,
) -> bool {
    let body = json!({ "sender_id": "probe-a", "receiver_id": "probe-b", "content": format!("probe {n}"),
                       "client_message_id": format!("probe-{n}") });
    let deadline = Instant::now() + within;
    let mut id = None;
    while Instant::now() < deadline {
        if id.is_none() {
            let sent = http.post(&ends.messages).bearer_auth(token("probe-a")).json(&body).timeout(within).send().await;
            if let Ok(r) = sent {
                if r.status().is_success() {
                    id = r.json::<Value>().await.ok().and_then(|v| v["message_id"].as_str().map(str::to_owned));
                }
            }
        }
        if let Some(id) = &id {
            if probe.lock().expect("probe").known.contains(id) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits until a message posted from now on reaches the probe socket; the time it took.
async fn recovered(
    http: &reqwest::Client,
    ends: &Endpoints,
    probes: &AtomicU64,
    probe: &Mutex<Participant>,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let n = probes.fetch_add(1, Ordering::Relaxed);
        if probe_once(http, ends, n, probe, Duration::from_secs(3)).await {
            return Some(started.elapsed());
        }
    }
    None
}

/// Runs the soak on `fleet` and balances the books.
pub async fn run(mut fleet: ChaosFleet, o: &ChaosOptions) -> ChaosReport {
    let anchor = Instant::now();
    let ends =
        Endpoints { messages: fleet.persistence().url("/chat/messages"), sockets_ws: fleet.sockets().ws_url("") };
    let pairs: Vec<(String, String)> =
        (0..o.conversations).map(|i| (format!("chaos{i}-a"), format!("chaos{i}-b"))).collect();
    let stop_sockets = Arc::new(AtomicBool::new(false));
    let mut participants: Vec<[Arc<Mutex<Participant>>; 2]> = Vec::new();
    let mut socket_tasks = Vec::new();
    for (a, b) in &pairs {
        let sides = [Arc::new(Mutex::new(Participant::default())), Arc::new(Mutex::new(Participant::default()))];
        for (side, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
            socket_tasks.push(tokio::spawn(socket_client(
                ends.clone(),
                me.clone(),
                peer.clone(),
                anchor,
                sides[side].clone(),
                stop_sockets.clone(),
            )));
        }
        participants.push(sides);
    }
    let probe = Arc::new(Mutex::new(Participant::default()));
    socket_tasks.push(tokio::spawn(socket_client(
        ends.clone(),
        "probe-b".into(),
        "probe-a".into(),
        anchor,
        probe.clone(),
        stop_sockets.clone(),
    )));
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("http client");
    let probes = AtomicU64::new(0);
    // Every socket is up and the pipeline delivers before the clock starts.
    assert!(recovered(&http, &ends, &probes, &probe).await.is_some(), "the fleet never delivered a probe");

    // Posting.
    let give_up = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(PostStats::default());
    let started = tokio::time::Instant::now();
    let posting_anchor = anchor.elapsed();
    let total = o.rate * o.duration.as_secs();
    let faults_done = Arc::new(AtomicBool::new(false));
    // Each user posts through an outbox, one message at a time and in order, as a
    // chat client does: a retrying client slows its own queue, never the server.
    let poster = {
        let (http, ends, pairs, give_up, stats) =
            (http.clone(), ends.clone(), pairs.clone(), give_up.clone(), stats.clone());
        let (rate, idless_every) = (o.rate.max(1), o.idless_every);
        let faults_done = faults_done.clone();
        tokio::spawn(async move {
            let mut outboxes = HashMap::new();
            let mut senders = Vec::new();
            for (a, b) in &pairs {
                for (from, to) in [(a, b), (b, a)] {
                    let (tx, mut rx) =
                        tokio::sync::mpsc::unbounded_channel::<(u64, usize, String, Option<String>, Duration)>();
                    let (http, ends, give_up, stats) = (http.clone(), ends.clone(), give_up.clone(), stats.clone());
                    let outbox_of = from.clone();
                    let (from, to) = (from.clone(), to.clone());
                    senders.push(tokio::spawn(async move {
                        let mut answers = Vec::new();
                        while let Some((seq, conversation, content, id, scheduled)) = rx.recv().await {
                            let waited = anchor.elapsed().saturating_sub(scheduled);
                            stats.outbox_waits.lock().expect("waits").insert(seq, waited);
                            let idless = id.is_none();
                            let answer = post_one(
                                http.clone(),
                                ends.clone(),
                                from.clone(),
                                to.clone(),
                                content,
                                id,
                                give_up.clone(),
                                stats.clone(),
                            )
                            .await;
                            answers.push((seq, answer.map(|message_id| Accepted { conversation, message_id, idless })));
                        }
                        answers
                    }));
                    outboxes.insert(outbox_of, tx);
                }
            }
            let mut seq = 0;
            // At least `duration`, and on until the last fault has recovered.
            while seq < total || !faults_done.load(Ordering::Relaxed) {
                tokio::time::sleep_until(started + Duration::from_nanos(seq * 1_000_000_000 / rate)).await;
                let conversation = seq as usize % pairs.len();
                let (a, b) = &pairs[conversation];
                let from = if (seq as usize / pairs.len()).is_multiple_of(2) { a } else { b };
                let idless = idless_every > 0 && conversation % idless_every == idless_every - 1;
                let scheduled = anchor.elapsed();
                let content = format!("chaos {conversation} {seq} {}", scheduled.as_nanos());
                let id = (!idless).then(|| format!("chaos-{seq}"));
                if let Some(outbox) = outboxes.get(from) {
                    let _ = outbox.send((seq, conversation, content, id, scheduled));
                }
                seq += 1;
            }
            (senders, seq, started.elapsed())
        })
    };

    // Faults, one at a time, at seeded random moments within the posting window.
    let mut rng = Rng(o.seed.max(1));
    let mut plan: Vec<String> = Vec::new();
    for _ in 0..o.rounds {
        plan.extend(SERVICES.iter().map(|s| format!("SIGKILL {s}")));
        plan.extend(o.paused_servers.iter().map(|s| format!("SIGSTOP {s}")));
    }
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let window = o.duration.mul_f64(0.85);
    let slot = window / (plan.len().max(1) as u32 + 1);
    let mut faults = Vec::new();
    for (i, what) in plan.iter().enumerate() {
        let due = started + slot * (i as u32 + 1) + rng.millis(0, slot.as_millis() as u64 / 2);
        tokio::time::sleep_until(due).await;
        let at = anchor.elapsed() - posting_anchor;
        let fault_start = Instant::now();
        let name = what.split_whitespace().nth(1).unwrap_or_default().to_owned();
        if what.starts_with("SIGKILL") {
            let index = SERVICES.iter().position(|s| *s == name).expect("a service");
            let mut service = fleet.services.remove(index);
            let down = rng.millis(200, 2000);
            service = tokio::task::spawn_blocking(move || {
                service.kill();
                std::thread::sleep(down);
                service.restart();
                service
            })
            .await
            .expect("restart");
            fleet.services.insert(index, service);
        } else {
            let pid = fleet.server_pid(&name).expect("server runs");
            signal(pid, "STOP");
            tokio::time::sleep(o.pause).await;
            signal(pid, "CONT");
        }
        let down = fault_start.elapsed();
        let recovery = recovered(&http, &ends, &probes, &probe).await;
        faults.push(Fault { what: what.clone(), at, down, recovered_after: recovery.map(|r| r + down) });
        eprintln!(
            "chaos: {what} at {:.1}s, down {:.1}s, recovered after {:?}",
            at.as_secs_f64(),
            down.as_secs_f64(),
            recovery.map(|r| r + down)
        );
        if recovery.is_none() {
            // The fleet did not come back: more faults would only hide why.
            eprintln!("chaos: the fleet did not recover from {what}; no further faults");
            break;
        }
    }

    // Every post gets its answer (or the run gives up on it after the drain).
    faults_done.store(true, Ordering::Relaxed);
    let (senders, accepted_or_not, posting) = poster.await.expect("poster");
    let posting_seconds = posting.as_secs_f64();
    let drain_until = Instant::now() + o.drain;
    {
        let give_up = give_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(drain_until.into()).await;
            give_up.store(true, Ordering::Relaxed);
        });
    }
    let mut accepted: HashMap<u64, Accepted> = HashMap::new();
    for sender in senders {
        for (seq, answer) in sender.await.expect("outbox") {
            if let Some(a) = answer {
                accepted.insert(seq, a);
            }
        }
    }
    // Everything accepted reaches both participants, or the drain ends.
    loop {
        let missing = accepted
            .values()
            .filter(|a| {
                participants[a.conversation].iter().any(|p| !p.lock().expect("state").known.contains(&a.message_id))
            })
            .count();
        if missing == 0 || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A quiet moment for late duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_sockets.store(true, Ordering::Relaxed);
    for t in socket_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    // The books: MongoDB by content (each message's text is unique).
    let mongo = mongodb::Client::with_uri_str(fleet.stack.mongo.uri()).await.expect("mongo client");
    let collection = mongo.database("chat").collection::<mongodb::bson::Document>("messages");
    let mut copies: HashMap<u64, u32> = HashMap::new();
    let mut cursor = collection
        .find(mongodb::bson::doc! {})
        .projection(mongodb::bson::doc! { "content": 1 })
        .await
        .expect("messages readable");
    while cursor.advance().await.expect("cursor") {
        let doc = cursor.deserialize_current().expect("document");
        let content = doc.get_str("content").unwrap_or_default();
        let mut parts = content.split_whitespace();
        if parts.next() != Some("chaos") {
            continue;
        }
        if let Some(seq) = parts.nth(1).and_then(|s| s.parse::<u64>().ok()) {
            *copies.entry(seq).or_default() += 1;
        }
    }

    let mut r = ChaosReport {
        seed: o.seed,
        conversations: o.conversations,
        posting_seconds,
        attempted: accepted_or_not,
        accepted: accepted.len() as u64,
        accepted_idless: accepted.values().filter(|a| a.idless).count() as u64,
        found_by_lookup: stats.found_by_lookup.load(Ordering::Relaxed),
        ambiguous_answers: stats.ambiguous.load(Ordering::Relaxed),
        retried_posts: stats.retried.load(Ordering::Relaxed),
        unresolved_posts: stats.unresolved.load(Ordering::Relaxed),
        refused_posts: stats.refused.load(Ordering::Relaxed),
        faults,
        ..ChaosReport::default()
    };
    r.stored_twice = copies.values().filter(|n| **n > 1).count() as u64;
    r.stored_not_accepted = copies.keys().filter(|seq| !accepted.contains_key(seq)).count() as u64;
    for (seq, a) in &accepted {
        match copies.get(seq) {
            Some(1) => r.stored_once += 1,
            Some(_) => {}
            None => r.accepted_not_stored += 1,
        }
        let everywhere =
            participants[a.conversation].iter().all(|p| p.lock().expect("state").known.contains(&a.message_id));
        if everywhere {
            r.delivered_to_all += 1;
        } else {
            r.lost += 1;
        }
    }
    // Latency away from faults: neither the post nor the delivery within
    // [fault start, recovered].
    let windows: Vec<(Duration, Duration)> = r
        .faults
        .iter()
        .map(|f| {
            let start = posting_anchor + f.at;
            (start, start + f.recovered_after.unwrap_or(Duration::from_secs(60)))
        })
        .collect();
    let mut calm = Vec::new();
    let mut all = Vec::new();
    let mut posted_calm = Vec::new();
    let waits = std::mem::take(&mut *stats.outbox_waits.lock().expect("waits"));
    for p in participants.iter().flatten().chain(std::iter::once(&probe)) {
        let p = p.lock().expect("state");
        r.duplicate_frames_uninterrupted += p.duplicate_frames;
        r.reconnects += p.reconnects;
        r.resyncs += p.resyncs;
        r.via_history_pages += p.via_pages;
        for &(sent, seen, seq) in &p.live {
            let latency = seen.saturating_sub(sent);
            all.push(latency);
            if windows.iter().all(|&(from, to)| seen < from || sent > to) {
                calm.push(latency);
            }
            let posted = sent + waits.get(&seq).copied().unwrap_or_default();
            if windows.iter().all(|&(from, to)| seen < from || posted > to) {
                posted_calm.push(seen.saturating_sub(posted));
            }
        }
    }
    calm.sort();
    all.sort();
    r.calm_deliveries = calm.len();
    r.calm_p50 = percentile(&calm, 50.0);
    r.calm_p99 = percentile(&calm, 99.0);
    r.all_p99 = percentile(&all, 99.0);
    let mut outbox_waits: Vec<Duration> = waits.into_values().collect();
    outbox_waits.sort();
    r.outbox_wait_p50 = percentile(&outbox_waits, 50.0);
    r.outbox_wait_p99 = percentile(&outbox_waits, 99.0);
    posted_calm.sort();
    r.posted_calm_deliveries = posted_calm.len();
    r.posted_calm_p50 = percentile(&posted_calm, 50.0);
    r.posted_calm_p99 = percentile(&posted_calm, 99.0);
    for s in fleet.services.iter_mut() {
        if !s.is_running() {
            r.dead_at_end.push(s.name.clone());
        }
    }
    r
}

/// The load generator's `--chaos` mode: parses its options, starts a fleet from the
/// binaries of `CHATFLEET_TEST_PROFILE`, runs the soak and prints the report.
/// Returns the exit code: `1` when anything was lost or stored twice.
pub async fn cli(args: &[String]) -> i32 {
    let mut o = ChaosOptions::default();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let secs = |v: &str, d: Duration| v.parse().map(Duration::from_secs).unwrap_or(d);
        match args[i].as_str() {
            "--duration" => o.duration = secs(&value, o.duration),
            "--rate" => o.rate = value.parse().unwrap_or(o.rate),
            "--conversations" => o.conversations = value.parse().unwrap_or(o.conversations),
            "--rounds" => o.rounds = value.parse().unwrap_or(o.rounds),
            "--pause" => o.pause = secs(&value, o.pause),
            "--idless-every" => o.idless_every = value.parse().unwrap_or(o.idless_every),
            "--seed" => o.seed = value.parse().unwrap_or(o.seed),
            "--drain" => o.drain = secs(&value, o.drain),
            other => {
                eprintln!(
                    "unknown option {other}; --chaos options: --duration S --rate R --conversations N --rounds K \
                     --pause S --idless-every N --seed X --drain S"
                );
                return 2;
            }
        }
        i += 2;
    }
    eprintln!(
        "chaos: starting a private fleet ({:?} binaries) …",
        std::env::var("CHATFLEET_TEST_PROFILE").unwrap_or_else(|_| "debug".into())
    );
    let fleet = ChaosFleet::start(&[("LOG_LEVEL", "warn")]).await;
    println!(
        "# chatfleet chaos soak: {} conversations, {} msg/s for {} s, each service killed and each server paused \
         {} times\n",
        o.conversations,
        o.rate,
        o.duration.as_secs(),
        o.rounds
    );
    let report = run(fleet, &o).await;
    println!("{}", report.markdown());
    if report.lost > 0 || report.stored_twice > 0 || report.accepted_not_stored > 0 {
        1
    } else {
        0
    }
}
