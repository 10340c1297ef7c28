//! The hostile-client matrix (issue 9), black-box: every public surface of the chat
//! fleet (`POST /chat/messages`, `GET /chat/messages`, `GET /chat/subscribe`,
//! `GET /notifications/subscribe`, `GET /presence`) attacked one way per case.
//!
//! Why this file exists: each defence (token checks, participant checks, limits,
//! the Origin allow-list, the split of public and internal listeners) has its own
//! unit tests, but only the real binaries wired together show that an attack is
//! refused *and* has no side effect. Every case therefore runs against one real
//! fleet (chatpersistence with the outbox relay, the change handler, the chat socket
//! pod and the notification pod, with `JWT_ISSUER`, `JWT_AUDIENCE`,
//! `ALLOWED_ORIGINS` and small limits set), with a fresh victim whose chat and
//! notification sockets are open while the attack runs, and checks:
//!
//! - the answer: the documented status (or close code) and, on HTTP, the JSON error
//!   `{"error":{"code","message"}}` (with `Retry-After` on 429/503);
//! - nothing written: the MongoDB message count is unchanged (or grew by exactly
//!   what the case legitimately wrote);
//! - nothing delivered: the victim's sockets see nothing but the canary message
//!   posted by the victim's real peer after the attack (which also proves the
//!   sockets are still open and the pipeline still serves);
//! - and, after the whole matrix, a brand-new pair of users still posts and receives.
//!
//! The user ids are chosen so that every attacker pair collides with its victim pair
//! in the legacy stream id format (`("a07a","bc07")` and `("a07ab","c07")` both hash
//! `"a07abc07"`): the collision cases use exactly that.
//!
//! Per-address limits: every client here runs on 127.0.0.1, so the socket services
//! run with `CLIENT_IP_HEADER=x-forwarded-for` (as behind the shipped Envoy/nginx) and
//! each case's sockets carry their own address; the per-address caps can then be
//! small without one case throttling the next.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatfleet_tests::ws::Ws;
use chatfleet_tests::{Service, Stack, JWT_SECRET, SERVICE_TOKEN};
use chatstream::{StreamId, StreamIdFormat, UserId};
use futures::{SinkExt, StreamExt};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

const ISSUER: &str = "https://issuer.chatfleet.test";
const AUDIENCE: &str = "chatfleet-api";
const ALLOWED_ORIGIN: &str = "https://app.chatfleet.test";
const EVIL_ORIGIN: &str = "https://evil.example.com";
/// `WS_MAX_MESSAGE_SIZE` of the socket services under test.
const MAX_FRAME: usize = 4096;
/// `HTTP_BODY_LIMIT` of chatpersistence under test.
const BODY_LIMIT: usize = 8192;
/// `HTTP_HEADER_READ_TIMEOUT` of every service under test.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the victim's sockets must stay quiet after the canary arrived.
const QUIET: Duration = Duration::from_millis(150);
/// How long a message may take through the pipeline before a case fails.
const DELIVERY: Duration = Duration::from_secs(10);

/// What a case legitimately wrote (messages), or why it failed.
type Outcome = Result<u64, String>;
type CaseFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + 'a>>;
type CaseFn = dyn for<'a> Fn(&'a Ctx, &'a Fx) -> CaseFuture<'a>;

struct Case {
    name: String,
    run: Box<CaseFn>,
}

fn case<F>(name: impl Into<String>, run: F) -> Case
where
    F: for<'a> Fn(&'a Ctx, &'a Fx) -> CaseFuture<'a> + 'static,
{
    Case { name: name.into(), run: Box::new(run) }
}

macro_rules! cases {
    ($list:ident, $( $name:literal => $func:ident ),+ $(,)?) => {
        $( $list.push(case($name, |c, f| Box::pin($func(c, f)))); )+
    };
}

// ---------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn uid(user: &str) -> UserId {
    UserId::parse(user).expect("test user ids are valid")
}

/// A token the fleet accepts: HS256, right issuer and audience, an hour long.
fn token(user: &str) -> String {
    chatauth::mint_hs256(JWT_SECRET, &uid(user), Duration::from_secs(3600), Some(ISSUER), Some(AUDIENCE))
}

/// The ways a token can be wrong; each must get `401 unauthorized` everywhere.
#[derive(Debug, Clone, Copy)]
enum Bad {
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    NoIssuer,
    NoAudience,
    Forged,
    AlgNone,
    AlgHs512,
    AlgRs256Confusion,
    Garbage,
    InvalidSubject,
    NoExpiry,
    Empty,
}

fn claims(user: &str) -> Value {
    let now = now();
    json!({ "sub": user, "iat": now, "exp": now + 3600, "iss": ISSUER, "aud": AUDIENCE })
}

fn bad_token(kind: Bad, user: &str) -> String {
    let secret = JWT_SECRET.as_bytes();
    let with = |key: &str, value: Value| {
        let mut c = claims(user);
        c[key] = value;
        c
    };
    match kind {
        Bad::Expired => jwt::sign("HS256", secret, &with("exp", json!(now() - 3600))),
        Bad::NotYetValid => jwt::sign("HS256", secret, &with("nbf", json!(now() + 3600))),
        Bad::WrongIssuer => jwt::sign("HS256", secret, &with("iss", json!("https://evil.example.com"))),
        Bad::WrongAudience => jwt::sign("HS256", secret, &with("aud", json!("some-other-api"))),
        Bad::NoIssuer => chatauth::mint_hs256(JWT_SECRET, &uid(user), Duration::from_secs(3600), None, Some(AUDIENCE)),
        Bad::NoAudience => chatauth::mint_hs256(JWT_SECRET, &uid(user), Duration::from_secs(3600), Some(ISSUER), None),
        Bad::Forged => chatauth::mint_hs256(
            "an-attackers-own-secret-0123456789abcdef",
            &uid(user),
            Duration::from_secs(3600),
            Some(ISSUER),
            Some(AUDIENCE),
        ),
        Bad::AlgNone => jwt::sign("none", secret, &claims(user)),
        Bad::AlgHs512 => jwt::sign("HS512", secret, &claims(user)),
        Bad::AlgRs256Confusion => jwt::sign("RS256", secret, &claims(user)),
        Bad::Garbage => "not.a.jwt".to_owned(),
        Bad::InvalidSubject => jwt::sign("HS256", secret, &with("sub", json!("a b/../c"))),
        Bad::NoExpiry => {
            let mut c = claims(user);
            if let Some(object) = c.as_object_mut() {
                object.remove("exp");
            }
            jwt::sign("HS256", secret, &c)
        }
        Bad::Empty => String::new(),
    }
}

/// Hand-made JWTs, for the claims and headers `chatauth::mint_*` deliberately cannot
/// produce (`nbf`, `alg: none`, other algorithms). HMAC-SHA256 is implemented here
/// (the test crate has no crypto dependency); the control case at start-up proves
/// the fleet accepts a token signed this way with the right claims.
mod jwt {
    use serde_json::{json, Value};

    pub fn sign(alg: &str, secret: &[u8], claims: &Value) -> String {
        let header = json!({ "alg": alg, "typ": "JWT" });
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let signature = if alg == "none" { String::new() } else { b64(&hmac_sha256(secret, input.as_bytes())) };
        format!("{input}.{signature}")
    }

    pub fn b64(data: &[u8]) -> String {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub fn sha256(data: &[u8]) -> [u8; 32] {
        let mut h: [u32; 8] =
            [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
        let mut message = data.to_vec();
        message.push(0x80);
        while message.len() % 64 != 56 {
            message.push(0);
        }
        message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
        for block in message.chunks(64) {
            let mut w = [0u32; 64];
            for (i, word) in block.chunks(4).enumerate() {
                w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
            for i in 0..64 {
                let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
                let ch = (e & f) ^ (!e & g);
                let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
                let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
                let maj = (a & b) ^ (a & c) ^ (b & c);
                let t2 = s0.wrapping_add(maj);
                hh = g;
                g = f;
                f = e;
                e = d.wrapping_add(t1);
                d = c;
                c = b;
                b = a;
                a = t1.wrapping_add(t2);
            }
            for (state, value) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
                *state = state.wrapping_add(value);
            }
        }
        let mut out = [0u8; 32];
        for (i, word) in h.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&sha256(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).chain(message.iter().copied()).collect();
        let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).chain(sha256(&inner)).collect();
        sha256(&outer)
    }
}

// ---------------------------------------------------------------------------------
// The fleet and one case's fixture
// ---------------------------------------------------------------------------------

struct Ctx {
    /// Kept alive for the services (Redis, broker, MongoDB).
    _stack: Stack,
    persistence: Service,
    sockets: Service,
    notifications: Service,
    handler: Service,
    http: reqwest::Client,
    messages: mongodb::Collection<Document>,
}

impl Ctx {
    async fn start() -> Self {
        let stack = Stack::start();
        let mut env = stack.pipeline_env();
        for (k, v) in [
            ("KAFKA_GROUP_ID", testkit::unique("security-matrix")),
            ("JWT_ISSUER", ISSUER.to_owned()),
            ("JWT_AUDIENCE", AUDIENCE.to_owned()),
            ("ALLOWED_ORIGINS", format!("{ALLOWED_ORIGIN}, http://localhost:3000")),
            ("CLIENT_IP_HEADER", "x-forwarded-for".to_owned()),
            ("HTTP_BODY_LIMIT", BODY_LIMIT.to_string()),
            ("HTTP_HEADER_READ_TIMEOUT", format!("{}s", HEADER_TIMEOUT.as_secs())),
            ("RATE_LIMIT_POST_PER_SECOND", "5".to_owned()),
            ("RATE_LIMIT_POST_BURST", "10".to_owned()),
            ("WS_MAX_MESSAGE_SIZE", MAX_FRAME.to_string()),
            ("WS_MAX_CONNECTIONS_PER_USER", "3".to_owned()),
            ("WS_MAX_CONNECTIONS_PER_IP", "4".to_owned()),
            ("WS_CONNECT_RATE_PER_USER", "3".to_owned()),
            ("WS_CONNECT_RATE_PER_IP", "5".to_owned()),
        ] {
            env.push((k.to_owned(), v));
        }
        let persistence = Service::start("chatpersistence", &env);
        let mut socket_env = env.clone();
        socket_env.push(("CHATPERSISTENCE_INTERNAL_URL".into(), persistence.internal_url("")));
        let sockets = Service::start("chatwebsocketshandler", &socket_env);
        let notifications = Service::start("generalnotificationshandler", &env);
        let mut handler_env = env;
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), sockets.internal_url("")));
        handler_env.push(("NOTIFICATIONS_URL".into(), notifications.internal_url("")));
        handler_env.push(("PIPELINES_ENABLED".into(), "chat".into()));
        let handler = Service::start("chatpersistencechangehandler", &handler_env);
        // No pooled connections: the services close idle ones after HEADER_TIMEOUT.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let mongo = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client");
        let messages = mongo.database("chat").collection("messages");
        Self { _stack: stack, persistence, sockets, notifications, handler, http, messages }
    }

    async fn count(&self) -> u64 {
        self.messages.count_documents(doc! {}).await.expect("count")
    }

    async fn count_from(&self, sender: &str) -> u64 {
        self.messages.count_documents(doc! { "sender_id": sender }).await.expect("count")
    }

    /// `POST /chat/messages` with a good token of `from`.
    async fn post(&self, from: &str, to: &str, content: &str, cmid: Option<&str>) -> Reply {
        let mut body = json!({ "sender_id": from, "receiver_id": to, "content": content });
        if let Some(cmid) = cmid {
            body["client_message_id"] = json!(cmid);
        }
        send(self.http.post(self.persistence.url("/chat/messages")).bearer_auth(token(from)).json(&body)).await
    }

    fn chat_path(&self, stream: &str, sender: &str, receiver: &str) -> String {
        format!("/chat/subscribe?stream_id={stream}&sender_id={sender}&receiver_id={receiver}")
    }

    /// A chat socket of `user` with `peer`, token in the query, from `ip`.
    async fn chat_socket(&self, user: &str, peer: &str, ip: &str) -> Result<Ws, Reply> {
        let path = format!("{}&access_token={}", self.chat_path(&sid(user, peer), user, peer), token(user));
        upgrade(&self.sockets.ws_url(&path), &[("x-forwarded-for", ip.to_owned())]).await
    }

    async fn note_socket(&self, user: &str, ip: &str) -> Result<Ws, Reply> {
        let path = format!("/notifications/subscribe?user_id={user}&access_token={}", token(user));
        upgrade(&self.notifications.ws_url(&path), &[("x-forwarded-for", ip.to_owned())]).await
    }

    /// Waits until a message posted now travels the whole pipeline to both socket
    /// kinds (consumer group joined, relay holding its lease).
    async fn warm_up(&self) {
        let (a, b) = ("warmup-a", "warmup-b");
        let mut chat = self.chat_socket(b, a, "10.255.0.1").await.expect("warm-up chat socket");
        let mut note = self.note_socket(b, "10.255.0.1").await.expect("warm-up notification socket");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self.post(a, b, "warm-up", None).await;
            if reply.status == 201 {
                let id = reply.body["message_id"].as_str().unwrap_or_default().to_owned();
                let seen = wait_for(&mut chat, |f| is_message(f, &id), Duration::from_secs(5), false).await;
                if seen.is_ok() && wait_for(&mut note, |f| is_note(f, &id), Duration::from_secs(5), false).await.is_ok()
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the pipeline did not warm up within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        [&self.persistence, &self.sockets, &self.notifications, &self.handler]
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.name, s.log_tail(15)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn sid(a: &str, b: &str) -> String {
    StreamId::for_pair(&uid(a), &uid(b)).to_string()
}

fn legacy_sid(a: &str, b: &str) -> String {
    StreamId::for_pair_as(StreamIdFormat::Legacy, &uid(a), &uid(b)).to_string()
}

/// One case's users and the victim's open sockets. Victim `a` talks with `b`;
/// attacker `m` has a peer `x`. `(a, b)` and `(m, x)` collide in the legacy format.
struct Fx {
    n: usize,
    a: String,
    b: String,
    m: String,
    x: String,
    /// The address the attacker's sockets come from (`X-Forwarded-For`).
    ip: String,
    /// A message `b` sent `a` before the attack (what history attacks try to read).
    seed_id: String,
    chat: Ws,
    note: Ws,
}

impl Fx {
    async fn new(c: &Ctx, n: usize) -> Result<Self, String> {
        let (a, b, m, x) = (format!("a{n:03}a"), format!("bc{n:03}"), format!("a{n:03}ab"), format!("c{n:03}"));
        let victim_ip = format!("10.1.{}.{}", n / 200, n % 200 + 1);
        let ip = format!("10.2.{}.{}", n / 200, n % 200 + 1);
        let mut chat = c.chat_socket(&a, &b, &victim_ip).await.map_err(|r| format!("victim chat socket: {r:?}"))?;
        let mut note = c.note_socket(&a, &victim_ip).await.map_err(|r| format!("victim notification socket: {r:?}"))?;
        let seed = c.post(&b, &a, "a secret for a only", Some(&format!("seed-{n}"))).await;
        if seed.status != 201 {
            return Err(format!("seed post: {seed:?}"));
        }
        let seed_id = seed.body["message_id"].as_str().unwrap_or_default().to_owned();
        wait_for(&mut chat, |f| is_message(f, &seed_id), DELIVERY, true).await.map_err(|e| format!("seed: {e}"))?;
        wait_for(&mut note, |f| is_note(f, &seed_id), DELIVERY, true).await.map_err(|e| format!("seed: {e}"))?;
        Ok(Self { n, a, b, m, x, ip, seed_id, chat, note })
    }

    /// After the attack: the victim's peer posts a canary; the victim's sockets must
    /// show exactly it (nothing the attack may have caused), then stay quiet.
    async fn canary(&mut self, c: &Ctx) -> Result<(), String> {
        let reply = c.post(&self.b, &self.a, "canary", Some(&format!("canary-{}", self.n))).await;
        if reply.status != 201 {
            return Err(format!("the victim's peer can no longer post: {reply:?}"));
        }
        let id = reply.body["message_id"].as_str().unwrap_or_default().to_owned();
        wait_for(&mut self.chat, |f| is_message(f, &id), DELIVERY, true).await.map_err(|e| format!("chat: {e}"))?;
        wait_for(&mut self.note, |f| is_note(f, &id), DELIVERY, true).await.map_err(|e| format!("notes: {e}"))?;
        quiet(&mut self.chat, QUIET).await.map_err(|e| format!("chat: {e}"))?;
        quiet(&mut self.note, QUIET).await.map_err(|e| format!("notes: {e}"))
    }
}

fn is_message(frame: &Value, id: &str) -> bool {
    frame["type"] == "message" && frame["message"]["message_id"] == id
}

fn is_note(frame: &Value, id: &str) -> bool {
    frame["type"] == "notification" && frame["id"] == format!("chat:{id}").as_str()
}

/// Reads frames until `want` matches; with `strict`, any other frame is a leak.
async fn wait_for(ws: &mut Ws, want: impl Fn(&Value) -> bool, within: Duration, strict: bool) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(format!("the expected frame did not arrive within {within:?}")),
            Ok(None) | Ok(Some(Err(_))) => return Err("the socket broke".into()),
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                if want(&frame) {
                    return Ok(());
                }
                if strict {
                    return Err(format!("LEAK: an unexpected frame reached the victim: {frame}"));
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => return Err(format!("the socket was closed: {frame:?}")),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Nothing but pings for `within`.
async fn quiet(ws: &mut Ws, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Ok(()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => return Err(format!("LEAK: expected silence, got {other:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------
// Requests and answers
// ---------------------------------------------------------------------------------

/// An HTTP answer (or a refused upgrade), reduced to what the checks need.
#[derive(Debug, Default)]
struct Reply {
    status: u16,
    retry_after: Option<String>,
    allow_origin: Option<String>,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    match request.send().await {
        Ok(response) => {
            let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let (retry_after, allow_origin) = (header("retry-after"), header("access-control-allow-origin"));
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Reply { status, retry_after, allow_origin, body }
        }
        // Status 0: the connection ended without an answer.
        Err(err) => Reply { body: Value::String(err.to_string()), ..Reply::default() },
    }
}

/// Opens a socket, or returns the HTTP refusal.
async fn upgrade(url: &str, headers: &[(&str, String)]) -> Result<Ws, Reply> {
    let mut request = url.into_client_request().expect("valid url");
    for (name, value) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
        request.headers_mut().insert(name, value.parse().expect("header value"));
    }
    match chatfleet_tests::ws_connect(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = response.body().as_deref().unwrap_or_default();
            Err(Reply {
                status: response.status().as_u16(),
                retry_after: header("retry-after"),
                allow_origin: header("access-control-allow-origin"),
                body: serde_json::from_slice(body).unwrap_or(Value::String(String::from_utf8_lossy(body).into())),
            })
        }
        Err(other) => Err(Reply { body: Value::String(other.to_string()), ..Reply::default() }),
    }
}

/// The documented refusal: `status`, `{"error":{"code","message"}}` with `code`,
/// and `Retry-After` on 429 and 503.
fn refused(reply: &Reply, status: u16, code: &str) -> Result<(), String> {
    if reply.status != status {
        return Err(format!("expected {status} {code}, got {reply:?}"));
    }
    let error = &reply.body["error"];
    if error["code"] != code || error["message"].as_str().is_none_or(str::is_empty) {
        return Err(format!("expected the JSON error {code:?}, got {}", reply.body));
    }
    if matches!(status, 429 | 503) && reply.retry_after.as_deref().and_then(|v| v.parse::<u64>().ok()).is_none() {
        return Err(format!("{status} without a Retry-After: {reply:?}"));
    }
    Ok(())
}

/// A refused upgrade: no socket, the documented refusal.
async fn refused_upgrade(attempt: Result<Ws, Reply>, status: u16, code: &str) -> Result<(), String> {
    match attempt {
        Ok(mut ws) => {
            let _ = ws.close(None).await;
            Err(format!("HOLE: the upgrade was accepted; expected {status} {code}"))
        }
        Err(reply) => refused(&reply, status, code),
    }
}

// ---------------------------------------------------------------------------------
// Token cases: every surface, acting as the victim
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Surface {
    Post,
    History,
    ChatSubscribe,
    NotificationSubscribe,
    Presence,
}

const SURFACES: [Surface; 5] =
    [Surface::Post, Surface::History, Surface::ChatSubscribe, Surface::NotificationSubscribe, Surface::Presence];

/// Where the credential goes.
#[derive(Debug, Clone)]
enum Auth {
    Bearer(String),
    Query(String),
    QueryAndBearer(String),
    Header(&'static str, String),
    Nothing,
}

/// One request to `surface` as the victim `a` would make it (posting to, reading
/// and subscribing to the conversation with `b`), with `auth` as the credential.
async fn attempt(c: &Ctx, f: &Fx, surface: Surface, auth: Auth) -> Reply {
    let (a, b) = (&f.a, &f.b);
    let path = match surface {
        Surface::Post => "/chat/messages".to_owned(),
        Surface::History => format!("/chat/messages?peer_id={b}"),
        Surface::ChatSubscribe => c.chat_path(&sid(a, b), a, b),
        Surface::NotificationSubscribe => format!("/notifications/subscribe?user_id={a}"),
        Surface::Presence => format!("/presence?user_id={b}"),
    };
    let path = match &auth {
        Auth::Query(t) | Auth::QueryAndBearer(t) => {
            format!("{path}{}access_token={t}", if path.contains('?') { '&' } else { '?' })
        }
        _ => path,
    };
    let mut headers: Vec<(&str, String)> = vec![("x-forwarded-for", f.ip.clone())];
    match &auth {
        Auth::Bearer(t) | Auth::QueryAndBearer(t) => headers.push(("authorization", format!("Bearer {t}"))),
        Auth::Header(name, value) => headers.push((*name, value.clone())),
        Auth::Query(_) | Auth::Nothing => {}
    }
    let with_headers = |mut request: reqwest::RequestBuilder| {
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        request
    };
    match surface {
        Surface::Post => {
            let body = json!({ "sender_id": a, "receiver_id": b, "content": "written by someone else" });
            send(with_headers(c.http.post(c.persistence.url(&path))).json(&body)).await
        }
        Surface::History => send(with_headers(c.http.get(c.persistence.url(&path)))).await,
        Surface::Presence => send(with_headers(c.http.get(c.persistence.url(&path)))).await,
        Surface::ChatSubscribe => match upgrade(&c.sockets.ws_url(&path), &headers).await {
            Ok(mut ws) => {
                let _ = ws.close(None).await;
                Reply { status: 101, ..Reply::default() }
            }
            Err(reply) => reply,
        },
        Surface::NotificationSubscribe => match upgrade(&c.notifications.ws_url(&path), &headers).await {
            Ok(mut ws) => {
                let _ = ws.close(None).await;
                Reply { status: 101, ..Reply::default() }
            }
            Err(reply) => reply,
        },
    }
}

async fn unauthorized(c: &Ctx, f: &Fx, surface: Surface, auth: Auth) -> Outcome {
    let reply = attempt(c, f, surface, auth).await;
    refused(&reply, 401, "unauthorized").map(|()| 0)
}

// ---------------------------------------------------------------------------------
// POST /chat/messages
// ---------------------------------------------------------------------------------

async fn post_as_someone_else(c: &Ctx, f: &Fx) -> Outcome {
    // The attacker's valid token, the victim as sender.
    let body = json!({ "sender_id": f.a, "receiver_id": f.b, "content": "I am a, honest" });
    let reply = send(c.http.post(c.persistence.url("/chat/messages")).bearer_auth(token(&f.m)).json(&body)).await;
    refused(&reply, 403, "forbidden").map(|()| 0)
}

async fn post_to_a_foreign_stream_id(c: &Ctx, f: &Fx) -> Outcome {
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "hi", "stream_id": sid(&f.a, &f.b) });
    let reply = send(c.http.post(c.persistence.url("/chat/messages")).bearer_auth(token(&f.m)).json(&body)).await;
    refused(&reply, 400, "invalid_request").map(|()| 0)
}

async fn post_with_a_colliding_legacy_id(c: &Ctx, f: &Fx) -> Outcome {
    let colliding = legacy_sid(&f.m, &f.x);
    if colliding != legacy_sid(&f.a, &f.b) || sid(&f.m, &f.x) == sid(&f.a, &f.b) {
        return Err("the fixture's pairs should collide in legacy and not in v2".into());
    }
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "hi", "stream_id": colliding });
    let reply = send(c.http.post(c.persistence.url("/chat/messages")).bearer_auth(token(&f.m)).json(&body)).await;
    refused(&reply, 400, "invalid_request").map(|()| 0)
}

async fn post_with_server_fields(c: &Ctx, f: &Fx) -> Outcome {
    // A message id (the victim's), a date and a stream the server owns.
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "hi", "message_id": f.seed_id,
        "created_at": "2000-01-01T00:00:00Z" });
    let reply = send(c.http.post(c.persistence.url("/chat/messages")).bearer_auth(token(&f.m)).json(&body)).await;
    refused(&reply, 422, "invalid_body").map(|()| 0)
}

async fn post_oversize_body(c: &Ctx, f: &Fx) -> Outcome {
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "x".repeat(BODY_LIMIT * 16) });
    let reply = send(c.http.post(c.persistence.url("/chat/messages")).bearer_auth(token(&f.m)).json(&body)).await;
    refused(&reply, 413, "payload_too_large").map(|()| 0)
}

async fn post_oversize_content(c: &Ctx, f: &Fx) -> Outcome {
    let reply = c.post(&f.m, &f.x, &"y".repeat(4001), None).await;
    refused(&reply, 400, "invalid_request").map(|()| 0)
}

async fn post_control_characters(c: &Ctx, f: &Fx) -> Outcome {
    let reply = c.post(&f.m, &f.x, "clear\u{1b}[2J\u{0}screen", None).await;
    refused(&reply, 400, "invalid_request").map(|()| 0)
}

async fn post_wrong_content_type(c: &Ctx, f: &Fx) -> Outcome {
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "hi" }).to_string();
    let request = c
        .http
        .post(c.persistence.url("/chat/messages"))
        .bearer_auth(token(&f.m))
        .header("content-type", "text/plain")
        .body(body);
    refused(&send(request).await, 415, "unsupported_media_type").map(|()| 0)
}

async fn post_malformed_json(c: &Ctx, f: &Fx) -> Outcome {
    let request = c
        .http
        .post(c.persistence.url("/chat/messages"))
        .bearer_auth(token(&f.m))
        .header("content-type", "application/json")
        .body(format!("{{\"sender_id\":\"{}\",\"receiver_id\":", f.m));
    refused(&send(request).await, 400, "invalid_request").map(|()| 0)
}

async fn post_to_oneself(c: &Ctx, f: &Fx) -> Outcome {
    refused(&c.post(&f.m, &f.m, "me, myself", None).await, 400, "invalid_request").map(|()| 0)
}

async fn post_to_a_path_like_receiver(c: &Ctx, f: &Fx) -> Outcome {
    refused(&c.post(&f.m, "../../admin", "hi", None).await, 400, "invalid_request").map(|()| 0)
}

async fn post_reusing_the_victims_client_message_id(c: &Ctx, f: &Fx) -> Outcome {
    // The victim's peer used `seed-{n}`; the key is per sender, so the attacker gets a
    // new message of their own, never the victim's stored one.
    let reply = c.post(&f.m, &f.x, "mine", Some(&format!("seed-{}", f.n))).await;
    if reply.status != 201 {
        return Err(format!("expected 201 for the attacker's own message, got {reply:?}"));
    }
    let body = &reply.body;
    if body["message_id"] == f.seed_id.as_str() || body["sender_id"] != f.m.as_str() || body["content"] != "mine" {
        return Err(format!("LEAK: the answer is not the attacker's own message: {body}"));
    }
    Ok(1)
}

async fn post_reusing_own_client_message_id_for_other_content(c: &Ctx, f: &Fx) -> Outcome {
    let first = c.post(&f.m, &f.x, "one", Some("k-1")).await;
    if first.status != 201 {
        return Err(format!("first post: {first:?}"));
    }
    let second = c.post(&f.m, &f.x, "two", Some("k-1")).await;
    refused(&second, 409, "client_message_id_reused").map(|()| 1)
}

async fn post_flood(c: &Ctx, f: &Fx) -> Outcome {
    let replies = futures::future::join_all((0..30).map(|i| async move {
        let content = format!("flood {i}");
        c.post(&f.m, &f.x, &content, None).await
    }))
    .await;
    let created = replies.iter().filter(|r| r.status == 201).count() as u64;
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    if let Some(other) = replies.iter().find(|r| r.status != 201 && r.status != 429) {
        return Err(format!("unexpected answer in a flood: {other:?}"));
    }
    if limited.is_empty() || created > 12 {
        return Err(format!("expected the bucket (burst 10) to refuse most: {created} created"));
    }
    for reply in limited {
        refused(reply, 429, "rate_limited")?;
    }
    let stored = c.count_from(&f.m).await;
    if stored != created {
        return Err(format!("{created} posts were accepted but {stored} are stored"));
    }
    Ok(created)
}

async fn post_flood_of_impersonations(c: &Ctx, f: &Fx) -> Outcome {
    let body = json!({ "sender_id": f.a, "receiver_id": f.b, "content": "I am a" });
    let replies = futures::future::join_all(
        (0..30).map(|_| send(c.http.post(c.persistence.url("/chat/messages")).bearer_auth(token(&f.m)).json(&body))),
    )
    .await;
    let mut limited = 0;
    for reply in &replies {
        match reply.status {
            403 => refused(reply, 403, "forbidden")?,
            429 => {
                refused(reply, 429, "rate_limited")?;
                limited += 1;
            }
            _ => return Err(format!("unexpected answer: {reply:?}")),
        }
    }
    if limited == 0 {
        return Err("thirty refused posts in a burst never hit the rate limit".into());
    }
    Ok(0)
}

async fn post_cors_preflight_from_a_foreign_origin(c: &Ctx, _f: &Fx) -> Outcome {
    let preflight = |origin: &'static str| {
        send(
            c.http
                .request(reqwest::Method::OPTIONS, c.persistence.url("/chat/messages"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "authorization,content-type"),
        )
    };
    let evil = preflight(EVIL_ORIGIN).await;
    if evil.allow_origin.is_some() {
        return Err(format!("HOLE: the preflight of a foreign origin was allowed: {evil:?}"));
    }
    refused(&evil, 403, "origin_not_allowed")?;
    let good = preflight(ALLOWED_ORIGIN).await;
    if good.allow_origin.as_deref() != Some(ALLOWED_ORIGIN) {
        return Err(format!("the allowed origin's preflight was not allowed: {good:?}"));
    }
    Ok(0)
}

async fn post_cross_origin_simple_request(c: &Ctx, f: &Fx) -> Outcome {
    // What a foreign page can send without a preflight: no Authorization, text/plain.
    let body = json!({ "sender_id": f.a, "receiver_id": f.b, "content": "csrf" }).to_string();
    let reply = send(
        c.http
            .post(c.persistence.url("/chat/messages"))
            .header("origin", EVIL_ORIGIN)
            .header("content-type", "text/plain")
            .body(body),
    )
    .await;
    refused(&reply, 403, "origin_not_allowed")?;
    if reply.allow_origin.is_some() {
        return Err(format!("a foreign origin may read the answer: {reply:?}"));
    }
    Ok(0)
}

async fn post_with_a_token_from_a_foreign_origin(c: &Ctx, f: &Fx) -> Outcome {
    // Even with a valid token (a page that somehow holds one), a foreign origin is refused.
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "from evil" });
    let reply = send(
        c.http
            .post(c.persistence.url("/chat/messages"))
            .header("origin", EVIL_ORIGIN)
            .bearer_auth(token(&f.m))
            .json(&body),
    )
    .await;
    refused(&reply, 403, "origin_not_allowed")?;
    Ok(0)
}

// ---------------------------------------------------------------------------------
// GET /chat/messages
// ---------------------------------------------------------------------------------

async fn history(c: &Ctx, user: &str, query: &str) -> Reply {
    send(c.http.get(c.persistence.url(&format!("/chat/messages?{query}"))).bearer_auth(token(user))).await
}

/// 200 with no message of the victims' conversation.
fn empty_page(reply: &Reply, f: &Fx) -> Result<(), String> {
    if reply.status != 200 {
        return Err(format!("expected 200 with an empty page, got {reply:?}"));
    }
    let messages = reply.body["messages"].as_array().cloned().unwrap_or_default();
    if messages.iter().any(|m| m["sender_id"] == f.a.as_str() || m["sender_id"] == f.b.as_str()) {
        return Err(format!("LEAK: the victims' messages were returned: {}", reply.body));
    }
    if !messages.is_empty() || reply.body["has_more"] != false {
        return Err(format!("expected an empty page: {}", reply.body));
    }
    Ok(())
}

async fn history_of_a_foreign_stream_by_id(c: &Ctx, f: &Fx) -> Outcome {
    // The victim sees the seed ...
    let own = history(c, &f.a, &format!("stream_id={}", sid(&f.a, &f.b))).await;
    if own.body["messages"].as_array().map(Vec::len) != Some(1) {
        return Err(format!("the victim should see the seed: {own:?}"));
    }
    // ... a stranger gets the page of an empty conversation.
    empty_page(&history(c, &f.m, &format!("stream_id={}", sid(&f.a, &f.b))).await, f).map(|()| 0)
}

async fn history_of_a_foreign_stream_with_own_peer(c: &Ctx, f: &Fx) -> Outcome {
    let reply = history(c, &f.m, &format!("stream_id={}&peer_id={}", sid(&f.a, &f.b), f.b)).await;
    refused(&reply, 400, "invalid_request").map(|()| 0)
}

async fn history_with_oneself_as_peer(c: &Ctx, f: &Fx) -> Outcome {
    refused(&history(c, &f.m, &format!("peer_id={}", f.m)).await, 400, "invalid_request").map(|()| 0)
}

async fn history_of_a_legacy_id_by_stream_alone(c: &Ctx, f: &Fx) -> Outcome {
    let reply = history(c, &f.m, &format!("stream_id={}", legacy_sid(&f.a, &f.b))).await;
    if reply.status == 400 {
        return refused(&reply, 400, "invalid_request").map(|()| 0);
    }
    empty_page(&reply, f).map(|()| 0)
}

async fn history_of_a_colliding_legacy_id_with_own_peer(c: &Ctx, f: &Fx) -> Outcome {
    // legacy(m, x) == legacy(a, b): the id is "the attacker's", the data must not be.
    let reply = history(c, &f.m, &format!("stream_id={}&peer_id={}", legacy_sid(&f.m, &f.x), f.x)).await;
    if reply.status == 400 {
        return refused(&reply, 400, "invalid_request").map(|()| 0);
    }
    empty_page(&reply, f).map(|()| 0)
}

async fn history_of_a_group_id(c: &Ctx, f: &Fx) -> Outcome {
    // A group the attacker is not in (or that does not exist): the same answer either way.
    let group = format!("g{}", &sid(&f.a, &f.b));
    refused(&history(c, &f.m, &format!("stream_id={group}")).await, 403, "not_a_member")?;
    refused(&history(c, &f.m, &format!("conversation_id={group}")).await, 403, "not_a_member").map(|()| 0)
}

async fn history_with_internal_parameters(c: &Ctx, f: &Fx) -> Outcome {
    let query = format!("stream_id={}&user_id={}&peer_id={}", sid(&f.a, &f.b), f.a, f.b);
    refused(&history(c, &f.m, &query).await, 400, "invalid_request").map(|()| 0)
}

async fn history_with_the_service_token_on_the_public_port(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.persistence.url(&format!("/chat/messages?stream_id={}", sid(&f.a, &f.b)));
    refused(&send(c.http.get(url).bearer_auth(SERVICE_TOKEN)).await, 401, "unauthorized").map(|()| 0)
}

async fn history_since_a_foreign_message(c: &Ctx, f: &Fx) -> Outcome {
    empty_page(&history(c, &f.m, &format!("peer_id={}&since={}", f.x, f.seed_id)).await, f).map(|()| 0)
}

// ---------------------------------------------------------------------------------
// GET /chat/subscribe
// ---------------------------------------------------------------------------------

async fn subscribe_as(c: &Ctx, f: &Fx, user: &str, query: &str, extra: &[(&str, String)]) -> Result<Ws, Reply> {
    let mut headers = vec![("x-forwarded-for", f.ip.clone()), ("authorization", format!("Bearer {}", token(user)))];
    headers.extend(extra.iter().cloned());
    upgrade(&c.sockets.ws_url(&format!("/chat/subscribe?{query}")), &headers).await
}

fn pair_query(stream: &str, sender: &str, receiver: &str) -> String {
    format!("stream_id={stream}&sender_id={sender}&receiver_id={receiver}")
}

async fn subscribe_to_a_foreign_pair(c: &Ctx, f: &Fx) -> Outcome {
    let attempt = subscribe_as(c, f, &f.m, &pair_query(&sid(&f.a, &f.b), &f.a, &f.b), &[]).await;
    refused_upgrade(attempt, 403, "forbidden").await.map(|()| 0)
}

async fn subscribe_to_a_foreign_stream_id(c: &Ctx, f: &Fx) -> Outcome {
    let attempt = subscribe_as(c, f, &f.m, &pair_query(&sid(&f.a, &f.b), &f.m, &f.b), &[]).await;
    refused_upgrade(attempt, 400, "invalid_request").await.map(|()| 0)
}

async fn subscribe_with_a_colliding_legacy_id(c: &Ctx, f: &Fx) -> Outcome {
    let attempt = subscribe_as(c, f, &f.m, &pair_query(&legacy_sid(&f.m, &f.x), &f.m, &f.x), &[]).await;
    refused_upgrade(attempt, 400, "invalid_request").await.map(|()| 0)
}

async fn subscribe_to_oneself(c: &Ctx, f: &Fx) -> Outcome {
    let attempt = subscribe_as(c, f, &f.m, &pair_query(&sid(&f.m, &f.x), &f.m, &f.m), &[]).await;
    refused_upgrade(attempt, 400, "invalid_request").await.map(|()| 0)
}

async fn subscribe_with_a_malformed_since(c: &Ctx, f: &Fx) -> Outcome {
    let query = format!("{}&since=$gt", pair_query(&sid(&f.m, &f.x), &f.m, &f.x));
    refused_upgrade(subscribe_as(c, f, &f.m, &query, &[]).await, 400, "invalid_request").await.map(|()| 0)
}

async fn subscribe_with_a_plain_get(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.sockets.url(&format!("/chat/subscribe?{}", pair_query(&sid(&f.m, &f.x), &f.m, &f.x)));
    let reply = send(c.http.get(url).bearer_auth(token(&f.m)).header("x-forwarded-for", &f.ip)).await;
    refused(&reply, 426, "upgrade_required").map(|()| 0)
}

async fn origin_refused(c: &Ctx, f: &Fx, origin: &str, chat: bool) -> Outcome {
    let attempt = |origin: String| async move {
        if chat {
            subscribe_as(c, f, &f.m, &pair_query(&sid(&f.m, &f.x), &f.m, &f.x), &[("origin", origin)]).await
        } else {
            let path = format!("/notifications/subscribe?user_id={}", f.m);
            let headers = [
                ("x-forwarded-for", f.ip.clone()),
                ("authorization", format!("Bearer {}", token(&f.m))),
                ("origin", origin),
            ];
            upgrade(&c.notifications.ws_url(&path), &headers).await
        }
    };
    refused_upgrade(attempt(origin.to_owned()).await, 403, "origin_not_allowed").await?;
    // The same request from the allowed origin opens (the check is not a blanket refusal).
    match attempt(ALLOWED_ORIGIN.to_owned()).await {
        Ok(mut ws) => {
            let _ = ws.close(None).await;
            Ok(0)
        }
        Err(reply) => Err(format!("the allowed origin was refused: {reply:?}")),
    }
}

async fn subscribe_from_a_foreign_origin(c: &Ctx, f: &Fx) -> Outcome {
    origin_refused(c, f, EVIL_ORIGIN, true).await
}

async fn subscribe_from_a_null_origin(c: &Ctx, f: &Fx) -> Outcome {
    origin_refused(c, f, "null", true).await
}

async fn subscribe_from_a_lookalike_origin(c: &Ctx, f: &Fx) -> Outcome {
    origin_refused(c, f, &format!("{ALLOWED_ORIGIN}.evil.net"), true).await
}

async fn subscribe_since_a_foreign_message(c: &Ctx, f: &Fx) -> Outcome {
    // Allowed (it is the attacker's own pair), but replays nothing of the victim's.
    let query = format!("{}&since={}", pair_query(&sid(&f.m, &f.x), &f.m, &f.x), f.seed_id);
    let mut ws = subscribe_as(c, f, &f.m, &query, &[]).await.map_err(|r| format!("own pair refused: {r:?}"))?;
    let result = quiet(&mut ws, Duration::from_millis(500)).await;
    let _ = ws.close(None).await;
    result.map(|()| 0)
}

// ---------------------------------------------------------------------------------
// GET /notifications/subscribe and GET /presence
// ---------------------------------------------------------------------------------

async fn notifications_as(c: &Ctx, f: &Fx, user: &str, query: &str) -> Result<Ws, Reply> {
    let headers = [("x-forwarded-for", f.ip.clone()), ("authorization", format!("Bearer {}", token(user)))];
    upgrade(&c.notifications.ws_url(&format!("/notifications/subscribe?{query}")), &headers).await
}

async fn notifications_of_someone_else(c: &Ctx, f: &Fx) -> Outcome {
    let attempt = notifications_as(c, f, &f.m, &format!("user_id={}", f.a)).await;
    refused_upgrade(attempt, 403, "forbidden").await.map(|()| 0)
}

async fn notifications_without_user(c: &Ctx, f: &Fx) -> Outcome {
    refused_upgrade(notifications_as(c, f, &f.m, "").await, 400, "invalid_request").await.map(|()| 0)
}

async fn notifications_of_a_malformed_user(c: &Ctx, f: &Fx) -> Outcome {
    let attempt = notifications_as(c, f, &f.m, "user_id=..%2F..%2Fadmin").await;
    refused_upgrade(attempt, 400, "invalid_request").await.map(|()| 0)
}

async fn notifications_from_a_foreign_origin(c: &Ctx, f: &Fx) -> Outcome {
    origin_refused(c, f, EVIL_ORIGIN, false).await
}

async fn presence(c: &Ctx, f: &Fx, query: &str) -> Reply {
    send(c.http.get(c.persistence.url(&format!("/presence?{query}"))).bearer_auth(token(&f.m))).await
}

/// The attacker shares no conversation with the victims: presence says nothing
/// about them, online (they are: their sockets are open) or not.
async fn presence_of_a_stranger(c: &Ctx, f: &Fx) -> Outcome {
    refused(&presence(c, f, &format!("user_id={}", f.a)).await, 403, "not_a_contact")?;
    refused(&presence(c, f, &format!("user_id={}", f.b)).await, 403, "not_a_contact").map(|()| 0)
}

/// The notification pods' presence is internal: the public port has no such route.
async fn presence_on_the_notification_port(c: &Ctx, f: &Fx) -> Outcome {
    let reply = send(c.http.get(c.notifications.url(&format!("/presence?user_id={}", f.a))).bearer_auth(token(&f.m)));
    refused(&reply.await, 404, "not_found").map(|()| 0)
}

async fn presence_without_user(c: &Ctx, f: &Fx) -> Outcome {
    refused(&presence(c, f, "").await, 400, "invalid_request").map(|()| 0)
}

async fn presence_of_a_malformed_user(c: &Ctx, f: &Fx) -> Outcome {
    refused(&presence(c, f, "user_id=%2A").await, 400, "invalid_request").map(|()| 0)
}

// ---------------------------------------------------------------------------------
// Frames on open sockets
// ---------------------------------------------------------------------------------

async fn own_socket(c: &Ctx, f: &Fx, chat: bool) -> Result<Ws, String> {
    let opened = if chat { c.chat_socket(&f.m, &f.x, &f.ip).await } else { c.note_socket(&f.m, &f.ip).await };
    opened.map_err(|r| format!("the attacker's own socket was refused: {r:?}"))
}

/// Frames until close; returns the close code (`None`: ended without a close frame).
async fn close_code(ws: &mut Ws, within: Duration) -> Result<Option<u16>, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(format!("the socket was not closed within {within:?}")),
            Ok(None) | Ok(Some(Err(_))) => return Ok(None),
            Ok(Some(Ok(Message::Close(frame)))) => return Ok(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn oversize_frame(c: &Ctx, f: &Fx, chat: bool) -> Outcome {
    let mut ws = own_socket(c, f, chat).await?;
    let _ = ws.send(Message::text("z".repeat(MAX_FRAME * 4))).await;
    match close_code(&mut ws, Duration::from_secs(5)).await? {
        Some(1009) => Ok(0),
        other => Err(format!("expected close 1009 after an oversize frame, got {other:?}")),
    }
}

async fn chat_oversize_frame(c: &Ctx, f: &Fx) -> Outcome {
    oversize_frame(c, f, true).await
}

async fn notification_oversize_frame(c: &Ctx, f: &Fx) -> Outcome {
    oversize_frame(c, f, false).await
}

async fn frame_flood(c: &Ctx, f: &Fx, chat: bool) -> Outcome {
    let mut ws = own_socket(c, f, chat).await?;
    // Two thousand frames the server does not accept, without reading the answers.
    for i in 0..2000 {
        if ws.feed(Message::text(format!("{{\"type\":\"message\",\"n\":{i}}}"))).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    // Every answer is an `unsupported_frame` error; the only acceptable close is 4001.
    let mut errors = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), ws.next()).await {
            Err(_) => break,
            Ok(None) | Ok(Some(Err(_))) => return Err("the connection ended without a close code".into()),
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                if frame["type"] != "error" || frame["error"]["code"] != "unsupported_frame" {
                    return Err(format!("unexpected frame to a flooding client: {frame}"));
                }
                errors += 1;
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                return if code == Some(4001) { Ok(0) } else { Err(format!("closed with {code:?}, not 4001")) };
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
    let _ = ws.close(None).await;
    if errors == 0 {
        return Err("no answer at all to the flood".into());
    }
    Ok(0)
}

async fn chat_frame_flood(c: &Ctx, f: &Fx) -> Outcome {
    frame_flood(c, f, true).await
}

async fn notification_frame_flood(c: &Ctx, f: &Fx) -> Outcome {
    frame_flood(c, f, false).await
}

async fn token_expiry(c: &Ctx, f: &Fx, chat: bool) -> Outcome {
    let mut short = claims(&f.m);
    short["exp"] = json!(now() + 2);
    let short = jwt::sign("HS256", JWT_SECRET.as_bytes(), &short);
    let headers = [("x-forwarded-for", f.ip.clone()), ("authorization", format!("Bearer {short}"))];
    let url = if chat {
        c.sockets.ws_url(&format!("/chat/subscribe?{}", pair_query(&sid(&f.m, &f.x), &f.m, &f.x)))
    } else {
        c.notifications.ws_url(&format!("/notifications/subscribe?user_id={}", f.m))
    };
    let mut ws = upgrade(&url, &headers).await.map_err(|r| format!("refused: {r:?}"))?;
    wait_for(&mut ws, |frame| frame["type"] == "token_expired", Duration::from_secs(6), true).await?;
    match close_code(&mut ws, Duration::from_secs(2)).await? {
        Some(4003) => Ok(0),
        other => Err(format!("expected close 4003 at the token's expiry, got {other:?}")),
    }
}

async fn chat_socket_outliving_its_token(c: &Ctx, f: &Fx) -> Outcome {
    token_expiry(c, f, true).await
}

async fn notification_socket_outliving_its_token(c: &Ctx, f: &Fx) -> Outcome {
    token_expiry(c, f, false).await
}

// ---------------------------------------------------------------------------------
// Socket floods: caps and connect rates
// ---------------------------------------------------------------------------------

/// Opens sockets one after the other (kept open) and returns the refusals.
async fn open_many(attempts: Vec<(String, Vec<(&'static str, String)>)>) -> (Vec<Ws>, Vec<Reply>) {
    let mut open = Vec::new();
    let mut refusals = Vec::new();
    for (url, headers) in attempts {
        match upgrade(&url, &headers).await {
            Ok(ws) => open.push(ws),
            Err(reply) => refusals.push(reply),
        }
    }
    (open, refusals)
}

async fn close_all(sockets: Vec<Ws>) {
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
}

/// `want_open` sockets opened, then only `429 rate_limited` refusals, one of whose
/// messages contains `why`.
async fn expect_limited(result: (Vec<Ws>, Vec<Reply>), want_open: usize, why: &str) -> Outcome {
    let (open, refusals) = result;
    let opened = open.len();
    close_all(open).await;
    if opened != want_open {
        return Err(format!("{opened} sockets opened, expected {want_open}; refusals: {refusals:?}"));
    }
    for reply in &refusals {
        refused(reply, 429, "rate_limited")?;
    }
    if !refusals.iter().any(|r| r.body["error"]["message"].as_str().is_some_and(|m| m.contains(why))) {
        return Err(format!("no refusal for {why:?}: {refusals:?}"));
    }
    Ok(0)
}

fn chat_attempt(c: &Ctx, user: &str, peer: &str, xff: String) -> (String, Vec<(&'static str, String)>) {
    let url = c.sockets.ws_url(&c.chat_path(&sid(user, peer), user, peer));
    (url, vec![("x-forwarded-for", xff), ("authorization", format!("Bearer {}", token(user)))])
}

async fn chat_sockets_per_user(c: &Ctx, f: &Fx) -> Outcome {
    // WS_MAX_CONNECTIONS_PER_USER=3: the fourth is refused.
    let attempts = (0..4).map(|_| chat_attempt(c, &f.m, &f.x, f.ip.clone())).collect();
    expect_limited(open_many(attempts).await, 3, "open sockets for this user").await
}

async fn notification_sockets_per_user(c: &Ctx, f: &Fx) -> Outcome {
    let attempts = (0..4)
        .map(|_| {
            let url = c.notifications.ws_url(&format!("/notifications/subscribe?user_id={}", f.m));
            (url, vec![("x-forwarded-for", f.ip.clone()), ("authorization", format!("Bearer {}", token(&f.m)))])
        })
        .collect();
    expect_limited(open_many(attempts).await, 3, "open sockets for this user").await
}

async fn chat_connect_rate_per_user(c: &Ctx, f: &Fx) -> Outcome {
    // WS_CONNECT_RATE_PER_USER=3 (burst 6): 3 open, 3 refused by the cap (still
    // counted as attempts), then refused as too many attempts.
    let attempts = (0..9).map(|i| chat_attempt(c, &f.m, &f.x, format!("10.3.{}.{i}", f.n % 250))).collect();
    expect_limited(open_many(attempts).await, 3, "too many connection attempts;").await
}

async fn chat_sockets_per_address(c: &Ctx, f: &Fx) -> Outcome {
    // WS_MAX_CONNECTIONS_PER_IP=4, five different users from one address.
    let attempts = (0..5).map(|i| chat_attempt(c, &format!("{}-{i}", f.m), &f.x, f.ip.clone())).collect();
    expect_limited(open_many(attempts).await, 4, "open sockets for this address").await
}

async fn chat_connect_rate_per_address(c: &Ctx, f: &Fx) -> Outcome {
    // WS_CONNECT_RATE_PER_IP=5 (burst 10): four open, then the cap, then the rate.
    let attempts = (0..14).map(|i| chat_attempt(c, &format!("{}-{i}", f.m), &f.x, f.ip.clone())).collect();
    expect_limited(open_many(attempts).await, 4, "connection attempts from this address").await
}

async fn chat_sockets_per_address_with_spoofed_forwarded_for(c: &Ctx, f: &Fx) -> Outcome {
    // The client prepends a new address each time; only the rightmost (the proxy's) counts.
    let attempts =
        (0..5).map(|i| chat_attempt(c, &format!("{}-{i}", f.m), &f.x, format!("203.0.113.{i}, {}", f.ip))).collect();
    expect_limited(open_many(attempts).await, 4, "open sockets for this address").await
}

async fn notification_connect_rate_per_address(c: &Ctx, f: &Fx) -> Outcome {
    let attempts = (0..14)
        .map(|i| {
            let user = format!("{}-{i}", f.m);
            let url = c.notifications.ws_url(&format!("/notifications/subscribe?user_id={user}"));
            (url, vec![("x-forwarded-for", f.ip.clone()), ("authorization", format!("Bearer {}", token(&user)))])
        })
        .collect();
    expect_limited(open_many(attempts).await, 4, "connection attempts from this address").await
}

// ---------------------------------------------------------------------------------
// Internal endpoints on the public ports (and without the service token)
// ---------------------------------------------------------------------------------

fn forged_forward(f: &Fx) -> Value {
    json!({ "type": "message", "message": {
        "message_id": "0192f1a4-7b3c-7d2e-8f10-1a2b3c4d5e6f", "stream_id": sid(&f.a, &f.b),
        "sender_id": f.b, "receiver_id": f.a, "content": "forged", "created_at": "2025-01-01T12:00:00Z" } })
}

async fn not_found(request: reqwest::RequestBuilder) -> Outcome {
    refused(&send(request).await, 404, "not_found").map(|()| 0)
}

async fn public_forward_to_websocket(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.sockets.url(&format!("/chat/forward-to-websocket?stream_id={}", sid(&f.a, &f.b)));
    not_found(c.http.post(url).bearer_auth(SERVICE_TOKEN).json(&forged_forward(f))).await
}

async fn public_close_stream(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.sockets.url(&format!("/chat/close-stream?stream_id={}", sid(&f.a, &f.b)));
    not_found(c.http.post(url).bearer_auth(SERVICE_TOKEN)).await
}

async fn public_stream_owner(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.sockets.url(&format!("/chat/forward-to-websocket?stream_id={}", sid(&f.a, &f.b)));
    not_found(c.http.get(url).bearer_auth(token(&f.m))).await
}

async fn public_chat_notification(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.notifications.url(&format!("/notifications/chat?user_id={}", f.a));
    let body = json!({ "message": forged_forward(f)["message"] });
    not_found(c.http.post(url).bearer_auth(SERVICE_TOKEN).json(&body)).await
}

async fn public_purchase_notification(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.notifications.url(&format!("/notifications/purchase?user_id={}", f.a));
    not_found(c.http.post(url).bearer_auth(SERVICE_TOKEN).json(&json!({ "status": "refunded" }))).await
}

async fn public_notification_owner(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.notifications.url(&format!("/notifications/owner?user_id={}", f.a));
    not_found(c.http.get(url).bearer_auth(SERVICE_TOKEN)).await
}

async fn internal_forward_with_a_user_token(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.sockets.internal_url(&format!("/chat/forward-to-websocket?stream_id={}", sid(&f.a, &f.b)));
    let reply = send(c.http.post(url).bearer_auth(token(&f.m)).json(&forged_forward(f))).await;
    refused(&reply, 403, "forbidden").map(|()| 0)
}

async fn internal_history_with_a_user_token(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.persistence.internal_url(&format!("/chat/messages?stream_id={}", sid(&f.a, &f.b)));
    refused(&send(c.http.get(url).bearer_auth(token(&f.m))).await, 403, "forbidden").map(|()| 0)
}

async fn internal_notification_with_a_user_token(c: &Ctx, f: &Fx) -> Outcome {
    let url = c.notifications.internal_url(&format!("/notifications/chat?user_id={}", f.a));
    let body = json!({ "message": forged_forward(f)["message"] });
    refused(&send(c.http.post(url).bearer_auth(token(&f.m)).json(&body)).await, 403, "forbidden").map(|()| 0)
}

// ---------------------------------------------------------------------------------
// Transport: slow and oversized request heads
// ---------------------------------------------------------------------------------

/// A client that starts a request head and never finishes it is disconnected
/// within about `HTTP_HEADER_READ_TIMEOUT`.
async fn slow_head(port: u16) -> Outcome {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    stream.write_all(b"GET /chat/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(HEADER_TIMEOUT * 3, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "HANG: a half-sent request head still holds the connection after {:?}",
                    HEADER_TIMEOUT * 3
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue, // a 408 before the close is fine
        }
    }
    let took = started.elapsed();
    if took < HEADER_TIMEOUT - Duration::from_millis(300) {
        return Err(format!("closed after {took:?}, before HTTP_HEADER_READ_TIMEOUT"));
    }
    Ok(0)
}

async fn slow_head_on_chatpersistence(c: &Ctx, _f: &Fx) -> Outcome {
    slow_head(c.persistence.public_port).await
}

async fn slow_head_on_chat_sockets(c: &Ctx, _f: &Fx) -> Outcome {
    slow_head(c.sockets.public_port).await
}

async fn slow_head_on_notifications(c: &Ctx, _f: &Fx) -> Outcome {
    slow_head(c.notifications.public_port).await
}

async fn huge_request_head(c: &Ctx, f: &Fx) -> Outcome {
    let huge = format!("Bearer {}", "A".repeat(1 << 20));
    let body = json!({ "sender_id": f.m, "receiver_id": f.x, "content": "hi" });
    let reply = send(c.http.post(c.persistence.url("/chat/messages")).header("authorization", huge).json(&body)).await;
    // hyper refuses an oversized head itself (431, no JSON) or drops the connection.
    match reply.status {
        0 | 400..=499 => Ok(0),
        _ => Err(format!("expected a 4xx or a dropped connection, got {reply:?}")),
    }
}

// ---------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------

fn matrix() -> Vec<Case> {
    let mut list = Vec::new();
    // Bad tokens on every public surface, claiming to be the victim.
    for bad in [Bad::Expired, Bad::NotYetValid, Bad::WrongIssuer, Bad::WrongAudience, Bad::Forged, Bad::AlgNone] {
        for surface in SURFACES {
            list.push(case(format!("{bad:?} token on {surface:?}"), move |c, f| {
                Box::pin(async move { unauthorized(c, f, surface, Auth::Bearer(bad_token(bad, &f.a))).await })
            }));
        }
    }
    for (bad, surface) in [
        (Bad::NoIssuer, Surface::Post),
        (Bad::NoAudience, Surface::History),
        (Bad::AlgHs512, Surface::Post),
        (Bad::AlgRs256Confusion, Surface::ChatSubscribe),
        (Bad::Garbage, Surface::NotificationSubscribe),
        (Bad::InvalidSubject, Surface::Presence),
        (Bad::NoExpiry, Surface::Post),
        (Bad::Empty, Surface::History),
        (Bad::Expired, Surface::ChatSubscribe),
    ] {
        let query = matches!(surface, Surface::ChatSubscribe);
        let name = format!("{bad:?} token on {surface:?}{}", if query { " (in access_token)" } else { "" });
        list.push(case(name, move |c, f| {
            Box::pin(async move {
                let token = bad_token(bad, &f.a);
                unauthorized(c, f, surface, if query { Auth::Query(token) } else { Auth::Bearer(token) }).await
            })
        }));
    }
    for surface in SURFACES {
        list.push(case(format!("no token on {surface:?}"), move |c, f| {
            Box::pin(async move { unauthorized(c, f, surface, Auth::Nothing).await })
        }));
    }
    // A valid token in the wrong place.
    type Place = fn(String) -> Auth;
    let places: [(&str, Surface, Place); 7] = [
        ("access_token query on Post", Surface::Post, Auth::Query),
        ("access_token query on History", Surface::History, Auth::Query),
        ("access_token query on Presence", Surface::Presence, Auth::Query),
        ("access_token query next to a valid header on Post", Surface::Post, Auth::QueryAndBearer),
        ("token in a cookie on Post", Surface::Post, |t| Auth::Header("cookie", format!("access_token={t}"))),
        ("token with the Basic scheme on History", Surface::History, |t| {
            Auth::Header("authorization", format!("Basic {t}"))
        }),
        ("token in X-Access-Token on Presence", Surface::Presence, |t| Auth::Header("x-access-token", t)),
    ];
    for (name, surface, place) in places {
        list.push(case(name, move |c, f| {
            Box::pin(async move { unauthorized(c, f, surface, place(token(&f.a))).await })
        }));
    }
    cases!(list,
        "POST as someone else (sender_id is the victim)" => post_as_someone_else,
        "POST naming the victims' stream_id" => post_to_a_foreign_stream_id,
        "POST with a legacy stream_id colliding with the victims'" => post_with_a_colliding_legacy_id,
        "POST with server-owned fields (message_id, created_at)" => post_with_server_fields,
        "POST with an oversize body" => post_oversize_body,
        "POST with 4001 characters of content" => post_oversize_content,
        "POST with control characters" => post_control_characters,
        "POST with text/plain" => post_wrong_content_type,
        "POST with malformed JSON" => post_malformed_json,
        "POST to oneself" => post_to_oneself,
        "POST to a path-like receiver id" => post_to_a_path_like_receiver,
        "POST reusing the victim's client_message_id" => post_reusing_the_victims_client_message_id,
        "POST reusing an own client_message_id for other content" => post_reusing_own_client_message_id_for_other_content,
        "POST flood (30 at once)" => post_flood,
        "POST flood of impersonations" => post_flood_of_impersonations,
        "CORS preflight from a foreign origin" => post_cors_preflight_from_a_foreign_origin,
        "cross-origin simple POST (no preflight, no token)" => post_cross_origin_simple_request,
        "POST with a valid token from a foreign origin" => post_with_a_token_from_a_foreign_origin,
        "history of a foreign stream by stream_id" => history_of_a_foreign_stream_by_id,
        "history of a foreign stream_id with the victim as peer" => history_of_a_foreign_stream_with_own_peer,
        "history with oneself as peer" => history_with_oneself_as_peer,
        "history of the victims' legacy id alone" => history_of_a_legacy_id_by_stream_alone,
        "history of a colliding legacy id with own peer" => history_of_a_colliding_legacy_id_with_own_peer,
        "history of a group id" => history_of_a_group_id,
        "history with the internal user_id parameter" => history_with_internal_parameters,
        "history with the service token on the public port" => history_with_the_service_token_on_the_public_port,
        "history since the victim's message id" => history_since_a_foreign_message,
        "chat subscribe to the victims' pair" => subscribe_to_a_foreign_pair,
        "chat subscribe with the victims' stream_id" => subscribe_to_a_foreign_stream_id,
        "chat subscribe with a colliding legacy id" => subscribe_with_a_colliding_legacy_id,
        "chat subscribe to oneself" => subscribe_to_oneself,
        "chat subscribe with a malformed since" => subscribe_with_a_malformed_since,
        "chat subscribe with a plain GET" => subscribe_with_a_plain_get,
        "chat subscribe from a foreign Origin" => subscribe_from_a_foreign_origin,
        "chat subscribe from Origin null" => subscribe_from_a_null_origin,
        "chat subscribe from a look-alike Origin" => subscribe_from_a_lookalike_origin,
        "chat subscribe since the victim's message id" => subscribe_since_a_foreign_message,
        "notifications of someone else" => notifications_of_someone_else,
        "notifications without user_id" => notifications_without_user,
        "notifications of a malformed user_id" => notifications_of_a_malformed_user,
        "notifications from a foreign Origin" => notifications_from_a_foreign_origin,
        "presence without user_id" => presence_without_user,
        "presence of a malformed user_id" => presence_of_a_malformed_user,
        "presence of a stranger" => presence_of_a_stranger,
        "presence on the notification pod's public port" => presence_on_the_notification_port,
        "chat socket: oversize frame" => chat_oversize_frame,
        "notification socket: oversize frame" => notification_oversize_frame,
        "chat socket: frame flood" => chat_frame_flood,
        "notification socket: frame flood" => notification_frame_flood,
        "chat socket outliving its token" => chat_socket_outliving_its_token,
        "notification socket outliving its token" => notification_socket_outliving_its_token,
        "chat sockets: per-user cap" => chat_sockets_per_user,
        "notification sockets: per-user cap" => notification_sockets_per_user,
        "chat sockets: per-user connect rate" => chat_connect_rate_per_user,
        "chat sockets: per-address cap" => chat_sockets_per_address,
        "chat sockets: per-address connect rate" => chat_connect_rate_per_address,
        "chat sockets: per-address cap with a spoofed X-Forwarded-For" => chat_sockets_per_address_with_spoofed_forwarded_for,
        "notification sockets: per-address connect rate" => notification_connect_rate_per_address,
        "internal forward on the public socket port" => public_forward_to_websocket,
        "internal close-stream on the public socket port" => public_close_stream,
        "internal owner query on the public socket port" => public_stream_owner,
        "internal chat notification on the public port" => public_chat_notification,
        "internal purchase notification on the public port" => public_purchase_notification,
        "internal notification owner on the public port" => public_notification_owner,
        "internal forward with a user token" => internal_forward_with_a_user_token,
        "internal history with a user token" => internal_history_with_a_user_token,
        "internal chat notification with a user token" => internal_notification_with_a_user_token,
        "slow request head on chatpersistence" => slow_head_on_chatpersistence,
        "slow request head on the chat socket pod" => slow_head_on_chat_sockets,
        "slow request head on the notification pod" => slow_head_on_notifications,
        "1 MiB request head" => huge_request_head,
    );
    list
}

/// Runs one case with its checks; the error names what went wrong.
async fn run_case(c: &Ctx, n: usize, case: &Case) -> Result<(), String> {
    let mut f = Fx::new(c, n).await.map_err(|e| format!("fixture: {e}"))?;
    let before = c.count().await;
    let wrote = match tokio::time::timeout(Duration::from_secs(30), (case.run)(c, &f)).await {
        Err(_) => return Err("HANG: the case did not finish within 30 s".into()),
        Ok(result) => result?,
    };
    let after = c.count().await;
    if after != before + wrote {
        return Err(format!("WRITE: {} message(s) written, expected {wrote}", after - before));
    }
    f.canary(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_without_side_effects() {
    let started = Instant::now();
    let c = Ctx::start().await;
    c.warm_up().await;
    // Control: a token signed by this file's own HMAC is accepted (so the refusals
    // below are about the claims and headers, not a broken signature).
    let control = jwt::sign("HS256", JWT_SECRET.as_bytes(), &claims("control-user"));
    let reply = send(c.http.get(c.persistence.url("/chat/messages?peer_id=someone")).bearer_auth(&control)).await;
    assert_eq!(reply.status, 200, "a hand-signed valid token must be accepted: {reply:?}");

    // SECURITY_MATRIX_ONLY=<substring> runs only the matching cases (for debugging one).
    let only = std::env::var("SECURITY_MATRIX_ONLY").ok().filter(|o| !o.is_empty());
    let all = matrix();
    let hostile = all.len();
    let cases: Vec<Case> =
        all.into_iter().filter(|c| only.as_ref().is_none_or(|o| c.name.contains(o.as_str()))).collect();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let case_started = Instant::now();
        let result = run_case(&c, i + 1, case).await;
        let verdict = match &result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("FAILED: {e}"),
        };
        println!("[{:3}] {:<70} {:>5} ms  {verdict}", i + 1, case.name, case_started.elapsed().as_millis());
        if let Err(e) = result {
            failures.push(format!("[{}] {}: {e}", i + 1, case.name));
        }
    }

    // After everything: a brand-new pair posts and receives.
    let (u, v) = ("after-all-u", "after-all-v");
    let mut ws = c.chat_socket(v, u, "10.254.0.1").await.expect("a normal user subscribes after the matrix");
    let reply = c.post(u, v, "still here", None).await;
    assert_eq!(reply.status, 201, "a normal user posts after the matrix: {reply:?}");
    let id = reply.body["message_id"].as_str().unwrap_or_default().to_owned();
    wait_for(&mut ws, |f| is_message(f, &id), DELIVERY, true).await.expect("a normal user receives after the matrix");

    println!("{} of {hostile} hostile cases run in {:?}", cases.len(), started.elapsed());
    assert!(hostile >= 60, "the matrix has {hostile} cases");
    assert!(
        failures.is_empty(),
        "{} of {hostile} cases failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        c.logs()
    );
}

#[test]
fn the_hand_made_hmac_is_sha256_hmac() {
    // RFC 4231 test case 2.
    let mac = jwt::hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    assert_eq!(jwt::b64(b"ab?"), "YWI_");
}
