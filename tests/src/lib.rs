//! Shared helpers for the fleet's black-box tests.
//!
//! Why this crate exists: the acceptance tests run the real service binaries
//! (`target/<profile>/<name>`, built by `cargo build --workspace --bins` before the
//! tests run) against real servers started by `testkit`, and talk to them only over
//! HTTP and WebSocket, the way a frontend or an operator would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::{scratch, workspace_root, Broker, Mongo, Redis, ServerProcess};

pub mod chaos;

/// The development secrets every test fleet shares.
pub const JWT_SECRET: &str = "chatfleet-test-secret-0123456789";
pub const SERVICE_TOKEN: &str = "chatfleet-test-service-token-0123456789";

/// The five binaries of the fleet.
pub const SERVICES: [&str; 5] = [
    "chatpersistence",
    "chatpersistencechangehandler",
    "chatwebsocketshandler",
    "generalnotificationshandler",
    "emailhandler",
];

/// The WebSocket settings of every socket the harness opens (tests, load generator,
/// chaos soak). tungstenite's default read buffer is 128 KiB and is zeroed before
/// every read, one `memset` of 128 KiB per frame received: in the 1,000-socket group
/// benchmark that was half of the load generator's CPU (0.35 of this machine's two
/// cores) taken from the services it measures. 4 KiB reads take any frame (larger
/// ones arrive over several reads).
pub fn ws_client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

/// Opens a client WebSocket with [`ws_client_config`].
pub async fn ws_connect<R>(
    request: R,
) -> Result<(ws::Ws, tokio_tungstenite::tungstenite::handshake::client::Response), tokio_tungstenite::tungstenite::Error>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    tokio_tungstenite::connect_async_with_config(request, Some(ws_client_config()), false).await
}

/// A user token signed with [`JWT_SECRET`], valid for an hour.
pub fn token(user: &str) -> String {
    let user = chatstream::UserId::parse(user).expect("test user ids are valid");
    chatauth::mint_hs256(JWT_SECRET, &user, Duration::from_secs(3600), None, None)
}

/// Tokens for `user` that every endpoint must refuse with 401, each with a label:
/// expired, signed with another secret, and not a JWT at all.
pub fn bad_tokens(user: &str) -> [(&'static str, String); 3] {
    let id = chatstream::UserId::parse(user).expect("test user ids are valid");
    let forged = chatauth::mint_hs256("some-other-secret-0123456789abcdef", &id, Duration::from_secs(3600), None, None);
    [
        ("expired", chatauth::mint_hs256_expiring_at(JWT_SECRET, user, 1_000_000)),
        ("forged", forged),
        ("garbage", "garbage".to_owned()),
    ]
}

/// Where cargo put the service binaries.
pub fn binary(name: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let profile = std::env::var("CHATFLEET_TEST_PROFILE").unwrap_or_else(|_| "debug".to_owned());
    let path = target.join(profile).join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// The real servers a fleet needs, each private to one test.
pub struct Stack {
    pub redis: Redis,
    pub broker: Broker,
    pub mongo: Mongo,
    pub topic_prefix: String,
}

impl Stack {
    /// Starts Redis, the broker and MongoDB, and creates the chat topics
    /// (`chat.changes` with `KAFKA_TOPIC_PARTITIONS` partitions, default 6, as the relay would).
    pub fn start() -> Self {
        let redis = Redis::start();
        let broker = Broker::start();
        let mongo = Mongo::start();
        let partitions = std::env::var("KAFKA_TOPIC_PARTITIONS").ok().and_then(|p| p.parse().ok()).unwrap_or(6);
        for (topic, partitions) in [("chat.changes", partitions), ("chat.changes.dlq", 1)] {
            broker.create_topic(topic, partitions);
        }
        Self { redis, broker, mongo, topic_prefix: String::new() }
    }

    /// [`Stack::env`] plus what the pipeline tests share: outbox capture and short
    /// retry intervals and forward timeouts, so failures show within seconds.
    pub fn pipeline_env(&self) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in [
            ("CAPTURE_MODE", "outbox"),
            ("MESSAGE_RETRY_INITIAL_INTERVAL", "50ms"),
            ("MESSAGE_RETRY_MAX_INTERVAL", "1s"),
            ("FORWARD_TIMEOUT", "1s"),
            // These tests post bursts from few senders; the limits have their own tests.
            ("RATE_LIMIT_POST_PER_SECOND", "2000"),
            ("RATE_LIMIT_POST_BURST", "4000"),
        ] {
            env.push((k.to_owned(), v.to_owned()));
        }
        env
    }

    /// The environment every service gets to find these servers.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("REDIS_URL", self.redis.url()),
            ("KAFKA_BROKERS", self.broker.bootstrap()),
            ("MONGODB_URI", self.mongo.uri()),
            ("JWT_SECRET", JWT_SECRET.to_owned()),
            ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
            ("LOG_LEVEL", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// One running service binary with its own public and internal ports.
pub struct Service {
    pub name: String,
    pub public_port: u16,
    pub internal_port: u16,
    addresses: PathBuf,
    process: ServerProcess,
}

impl Service {
    /// Starts `name` with `env` and waits until `/healthz` answers. The service binds
    /// port 0 for both listeners and publishes what it got (`LISTEN_ADDRESSES_FILE`),
    /// so no test races another for a port it picked beforehand.
    pub fn start(name: &str, env: &[(String, String)]) -> Self {
        let dir = scratch(name);
        let addresses = dir.join(format!("{name}.addresses"));
        let mut envs = env.to_vec();
        envs.push(("HTTP_HOST".into(), "127.0.0.1".into()));
        envs.push(("HTTP_PORT".into(), "0".into()));
        envs.push(("INTERNAL_HTTP_PORT".into(), "0".into()));
        envs.push(("LISTEN_ADDRESSES_FILE".into(), addresses.display().to_string()));
        let process = ServerProcess::start_with_env(name, &binary(name), &[], &envs, &dir.join(format!("{name}.log")));
        let mut service = Self { name: name.to_owned(), public_port: 0, internal_port: 0, addresses, process };
        service.read_ports();
        // A restart binds the same ports again: peers and proxies were told them.
        service.process.set_env("HTTP_PORT", &service.public_port.to_string());
        service.process.set_env("INTERNAL_HTTP_PORT", &service.internal_port.to_string());
        service.wait_healthy();
        service
    }

    /// Waits for the service to publish its bound addresses, and takes the ports.
    fn read_ports(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&self.addresses) {
                let port = |which: &str| {
                    text.lines()
                        .find_map(|line| line.strip_prefix(which))
                        .and_then(|addr| addr.rsplit(':').next())
                        .and_then(|port| port.parse().ok())
                        .unwrap_or(0)
                };
                self.public_port = port("public=");
                self.internal_port = port("internal=");
                return;
            }
            if !self.process.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not publish its addresses; log:\n{}", self.name, self.process.log_tail(40));
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_status(self.public_port, "/healthz") == Some(200) {
                return;
            }
            if !self.process.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not become healthy; log:\n{}", self.name, self.process.log_tail(40));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.public_port)
    }

    pub fn internal_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.internal_port)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.public_port)
    }

    /// SIGTERM and wait for a clean exit; `None` if it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.terminate(timeout)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the same binary again on the same ports and waits until healthy.
    pub fn restart(&mut self) {
        self.process.restart();
        self.wait_healthy();
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// A blocking `GET` returning only the status code (for readiness polling).
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// chatpersistence, chatwebsocketshandler, generalnotificationshandler and
/// chatpersistencechangehandler wired together the way the local stack wires them
/// (each started from `base`; the change handler also gets `handler_extra`).
pub struct Pipeline {
    pub persistence: Service,
    pub sockets: Service,
    pub notifications: Service,
    pub handler: Service,
}

impl Pipeline {
    pub fn start(base: &[(String, String)], handler_extra: &[(String, String)]) -> Self {
        let persistence = Service::start("chatpersistence", base);
        let mut socket_env = base.to_vec();
        socket_env.push(("CHATPERSISTENCE_INTERNAL_URL".into(), persistence.internal_url("")));
        let sockets = Service::start("chatwebsocketshandler", &socket_env);
        let notifications = Service::start("generalnotificationshandler", base);
        let mut handler_env = base.to_vec();
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), sockets.internal_url("")));
        handler_env.push(("NOTIFICATIONS_URL".into(), notifications.internal_url("")));
        handler_env.extend_from_slice(handler_extra);
        let handler = Service::start("chatpersistencechangehandler", &handler_env);
        Self { persistence, sockets, notifications, handler }
    }
}

/// The chat pipeline: servers plus chatpersistence, chatwebsocketshandler and
/// chatpersistencechangehandler wired together the way the local stack wires them.
pub struct ChatFleet {
    pub stack: Stack,
    pub persistence: Service,
    pub sockets: Service,
    pub handlers: Vec<Service>,
    handler_env: Vec<(String, String)>,
    /// The pair id format the services were started with (`STREAM_ID_FORMAT`).
    pub format: chatstream::StreamIdFormat,
}

impl ChatFleet {
    /// Starts the pipeline; `extra` is added to every service's environment (retry
    /// budgets, timeouts) and can override the defaults below.
    pub fn start(extra: &[(&str, &str)]) -> Self {
        let stack = Stack::start();
        let mut base = stack.pipeline_env();
        base.push(("KAFKA_GROUP_ID".into(), testkit::unique("chat-ws")));
        base.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let persistence = Service::start("chatpersistence", &base);
        let mut socket_env = base.clone();
        socket_env.push(("CHATPERSISTENCE_INTERNAL_URL".into(), persistence.internal_url("")));
        let sockets = Service::start("chatwebsocketshandler", &socket_env);
        let mut handler_env = base;
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), sockets.internal_url("")));
        handler_env.push(("NOTIFICATIONS_URL".into(), String::new()));
        let handlers = vec![Service::start("chatpersistencechangehandler", &handler_env)];
        let format = match extra.iter().find(|(k, _)| *k == "STREAM_ID_FORMAT") {
            Some((_, "legacy")) => chatstream::StreamIdFormat::Legacy,
            _ => chatstream::StreamIdFormat::V2,
        };
        Self { stack, persistence, sockets, handlers, handler_env, format }
    }

    /// Waits until a message posted now travels the whole pipeline (the consumer group
    /// has joined, the relay holds its lease), so tests can time what they measure.
    pub async fn warm_up(&self) {
        let (a, b) = ("warmup-a", "warmup-b");
        let stream = client::stream_id_as(self.format, a, b);
        let mut socket = client::ChatSocket::connect_to(&self.sockets, &stream, b, a, None).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = client::post(&self.persistence, a, b, "warm-up", None).await;
            // 202: accepted in write-behind mode.
            if status == 201 || status == 202 {
                let id = body["message_id"].as_str().unwrap_or_default().to_owned();
                let (seen, _) = socket.collect_messages(Duration::from_secs(5)).await;
                if seen.contains(&id) {
                    socket.close().await;
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the pipeline did not warm up within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Adds another change handler to the same consumer group.
    pub fn add_handler(&mut self) {
        self.handlers.push(Service::start("chatpersistencechangehandler", &self.handler_env));
    }
}

/// A frontend: posts over HTTP, listens over WebSocket.
pub mod client {
    use std::time::Duration;

    use futures::StreamExt;
    use serde_json::{json, Value};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    use crate::{token, Service};

    /// `POST /chat/messages` as `from`; returns status and body.
    pub async fn post(
        persistence: &Service,
        from: &str,
        to: &str,
        content: &str,
        client_message_id: Option<&str>,
    ) -> (u16, Value) {
        let mut body = json!({ "sender_id": from, "receiver_id": to, "content": content });
        if let Some(id) = client_message_id {
            body["client_message_id"] = json!(id);
        }
        let response = reqwest::Client::new()
            .post(persistence.url("/chat/messages"))
            .bearer_auth(token(from))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("chatpersistence answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Sends `request`; returns the status and the JSON body. A refused or timed-out
    /// request is status 0 (what a client sees of a crashed service).
    pub async fn send_json(request: reqwest::RequestBuilder) -> (u16, Value) {
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// The stream's history as `user` sees it.
    pub async fn history(persistence: &Service, user: &str, peer: &str) -> Vec<Value> {
        let stream = stream_id(user, peer);
        let response = reqwest::Client::new()
            .get(persistence.url(&format!("/chat/messages?stream_id={stream}&peer_id={peer}&limit=200")))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("history answers");
        assert_eq!(response.status().as_u16(), 200, "history status");
        let body: Value = response.json().await.expect("history JSON");
        body["messages"].as_array().cloned().unwrap_or_default()
    }

    pub fn stream_id(a: &str, b: &str) -> String {
        stream_id_as(chatstream::StreamIdFormat::V2, a, b)
    }

    /// The pair's stream id in `format`.
    pub fn stream_id_as(format: chatstream::StreamIdFormat, a: &str, b: &str) -> String {
        let a = chatstream::UserId::parse(a).expect("valid");
        let b = chatstream::UserId::parse(b).expect("valid");
        chatstream::StreamId::for_pair_as(format, &a, &b).to_string()
    }

    /// A chat socket held by `user` for the conversation with `peer`.
    pub struct ChatSocket {
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    }

    /// What a socket saw next.
    #[derive(Debug)]
    pub enum Seen {
        Frame(Value),
        Closed(Option<u16>),
        Nothing,
    }

    impl ChatSocket {
        pub async fn connect(sockets: &Service, user: &str, peer: &str, since: Option<&str>) -> Self {
            Self::connect_to(sockets, &stream_id(user, peer), user, peer, since).await
        }

        /// [`ChatSocket::connect`] naming the stream id explicitly (another format).
        pub async fn connect_to(sockets: &Service, stream: &str, user: &str, peer: &str, since: Option<&str>) -> Self {
            let mut path = format!(
                "/chat/subscribe?stream_id={stream}&sender_id={user}&receiver_id={peer}&access_token={}",
                token(user)
            );
            if let Some(since) = since {
                path.push_str(&format!("&since={since}"));
            }
            let (ws, _) = crate::ws_connect(sockets.ws_url(&path)).await.expect("subscribe upgrades");
            Self { ws }
        }

        /// The next data frame or close, within `timeout`.
        pub async fn next(&mut self, timeout: Duration) -> Seen {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, self.ws.next()).await {
                    Err(_) => return Seen::Nothing,
                    Ok(None) => return Seen::Closed(None),
                    Ok(Some(Err(_))) => return Seen::Closed(None),
                    Ok(Some(Ok(Message::Text(text)))) => {
                        return Seen::Frame(serde_json::from_str(text.as_str()).unwrap_or(Value::Null))
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        return Seen::Closed(frame.map(|f| u16::from(f.code)));
                    }
                    Ok(Some(Ok(_))) => continue,
                }
            }
        }

        /// Message ids of every `message` frame within `window`, stopping early at close.
        pub async fn collect_messages(&mut self, window: Duration) -> (Vec<String>, Option<u16>) {
            let deadline = tokio::time::Instant::now() + window;
            let mut ids = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return (ids, None);
                }
                match self.next(left).await {
                    Seen::Frame(frame) if frame["type"] == "message" => {
                        ids.push(frame["message"]["message_id"].as_str().unwrap_or_default().to_owned())
                    }
                    Seen::Frame(_) => {}
                    Seen::Closed(code) => return (ids, code.or(Some(u16::from(CloseCode::Abnormal)))),
                    Seen::Nothing => return (ids, None),
                }
            }
        }

        pub async fn close(mut self) {
            let _ = self.ws.close(None).await;
        }
    }
}

impl ChatFleet {
    /// SIGSTOP the socket pod: it keeps its sockets open and answers nothing.
    pub fn sockets_pause(&self) {
        self.sockets.signal("STOP");
    }

    pub fn sockets_resume(&self) {
        self.sockets.signal("CONT");
    }
}

impl Service {
    /// The process id, while it runs (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }
}

/// WebSocket client helpers shared by the socket services' black-box tests.
pub mod ws {
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use serde_json::Value;
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{self, Message};
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    /// How long a test waits for a frame it expects.
    pub const WAIT: Duration = Duration::from_secs(5);

    pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

    /// The HTTP status an upgrade attempt is refused with (`101` if it was accepted).
    pub async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> u16 {
        let mut request = url.into_client_request().expect("valid url");
        for (name, value) in headers {
            let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            request.headers_mut().insert(name, value.parse().expect("header value"));
        }
        match crate::ws_connect(request).await {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("unexpected upgrade error: {other}"),
        }
    }

    /// What a socket produced next.
    #[derive(Debug)]
    pub enum Got {
        Json(Value),
        Close(Option<u16>),
        End,
    }

    /// What `ws` produced next, within `within` (any WebSocket stream: the usual
    /// client, or one on a raw `TcpStream` with small buffers).
    pub async fn next<S>(ws: &mut S, within: Duration) -> Got
    where
        S: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Err(_) => panic!("nothing arrived within {within:?}"),
                Ok(None) | Ok(Some(Err(_))) => return Got::End,
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Got::Json(serde_json::from_str(text.as_str()).expect("frames are JSON"))
                }
                Ok(Some(Ok(Message::Close(frame)))) => return Got::Close(frame.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Nothing but pings may arrive for `quiet`.
    pub async fn expect_quiet(ws: &mut Ws, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// An HTTP client with a bound on every call, for the internal endpoints.
    pub fn http() -> reqwest::Client {
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
    }

    pub async fn next_json(ws: &mut Ws) -> Value {
        match next(ws, WAIT).await {
            Got::Json(value) => value,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The close code a socket ends with, skipping the frames before it.
    pub async fn close_code_after_frames<S>(ws: &mut S, within: Duration) -> Option<u16>
    where
        S: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let deadline = Instant::now() + within;
        loop {
            match next(ws, deadline.saturating_duration_since(Instant::now())).await {
                Got::Json(_) => continue,
                Got::Close(code) => return code,
                Got::End => panic!("the connection ended without a close frame"),
            }
        }
    }

    /// SIGTERMs `service` while `sockets` are open and checks that it exits 0 within
    /// 5 s and that every socket got close 1001. Returns the stopped service.
    pub async fn terminate_expecting_1001(service: crate::Service, sockets: Vec<Ws>) -> crate::Service {
        let readers: Vec<_> = sockets
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { close_code_after_frames(&mut ws, Duration::from_secs(10)).await }))
            .collect();
        let started = Instant::now();
        let (service, status) = tokio::task::spawn_blocking(move || {
            let mut service = service;
            let status = service.terminate(Duration::from_secs(15));
            (service, status)
        })
        .await
        .expect("join");
        let status = status.unwrap_or_else(|| panic!("did not exit on SIGTERM; log:\n{}", service.log_tail(30)));
        assert!(status.success(), "exit status {status}; log:\n{}", service.log_tail(30));
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        for reader in readers {
            assert_eq!(reader.await.expect("join"), Some(1001));
        }
        service
    }
}

/// A consumer that reads `topic` from the beginning in a group of its own and commits
/// nothing: how tests look at what a service published.
pub fn topic_reader(brokers: &str, topic: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", testkit::unique("topic-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// CPU seconds (user + system) a process has used so far (`/proc/<pid>/stat`; 0 when
/// it cannot be read). Shared by the load generator and the ignored measurements.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, after)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// The `p`-th percentile (nearest rank) of `sorted` durations; zero when empty.
/// Shared by the load generator and the inbox benchmark.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One Markdown row of the benchmarks' latency tables: `| name | p50 | p95 | p99 | max |`
/// in milliseconds, from samples sorted ascending.
pub fn latency_row(name: &str, sorted: &[Duration]) -> String {
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    format!(
        "| {name} | {} | {} | {} | {} |",
        ms(percentile(sorted, 50.0)),
        ms(percentile(sorted, 95.0)),
        ms(percentile(sorted, 99.0)),
        ms(sorted.last().copied().unwrap_or_default())
    )
}

impl Service {
    /// The Prometheus counter `name` summed over the series whose labels include all
    /// of `labels`.
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text =
            reqwest::get(self.url("/metrics")).await.expect("metrics answer").text().await.expect("metrics text");
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .filter(|line| labels.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }
}

/// The change handler's binary with nothing it could connect to: port-0 listeners,
/// a broker and a Redis address where nothing listens, unreachable targets, text
/// logs, output piped. For start-up refusal tests (with [`run_to_exit`]): a
/// configuration error must be reported before any connection.
pub fn unconnected_handler() -> std::process::Command {
    let mut command = std::process::Command::new(binary("chatpersistencechangehandler"));
    command
        .env_remove("INTERNAL_SERVICE_TOKEN")
        .env_remove("CHATFLEET_CONFIG")
        .env("HTTP_HOST", "127.0.0.1")
        .env("HTTP_PORT", "0")
        .env("INTERNAL_HTTP_PORT", "0")
        .env("KAFKA_BROKERS", format!("127.0.0.1:{}", testkit::free_port()))
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", testkit::free_port()))
        .env("CHAT_WEBSOCKET_URL", "http://127.0.0.1:9")
        .env("NOTIFICATIONS_URL", "http://127.0.0.1:9")
        .env("LOG_FORMAT", "text")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// Runs `command` (stdout and stderr piped) until it exits, at most 20 s; returns
/// whether it succeeded and everything it printed. `what` names it in the panic when
/// it keeps running (a service that should have refused to start).
pub fn run_to_exit(mut command: std::process::Command, what: &str) -> (bool, String) {
    use std::io::Read;
    let mut child = command.spawn().expect("start the process");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process kept running: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut output);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut output);
    }
    (status.success(), output)
}
