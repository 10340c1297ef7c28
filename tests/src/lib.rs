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

use testkit::{free_port, scratch, workspace_root, Broker, Mongo, Redis, ServerProcess};

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

/// A user token signed with [`JWT_SECRET`], valid for an hour.
pub fn token(user: &str) -> String {
    let user = chatstream::UserId::parse(user).expect("test user ids are valid");
    chatauth::mint_hs256(JWT_SECRET, &user, Duration::from_secs(3600), None, None)
}

/// Where cargo put the service binaries.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
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
    /// Starts Redis, the broker and MongoDB, and creates the chat topics.
    pub fn start() -> Self {
        let redis = Redis::start();
        let broker = Broker::start();
        let mongo = Mongo::start();
        for (topic, partitions) in [("chat.changes", 6), ("chat.changes.dlq", 1)] {
            broker.create_topic(topic, partitions);
        }
        Self { redis, broker, mongo, topic_prefix: String::new() }
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
    process: ServerProcess,
}

impl Service {
    /// Starts `name` with `env` (plus ports) and waits until `/healthz` answers.
    pub fn start(name: &str, env: &[(String, String)]) -> Self {
        let public_port = free_port();
        let internal_port = free_port();
        let mut envs = env.to_vec();
        envs.push(("HTTP_HOST".into(), "127.0.0.1".into()));
        envs.push(("HTTP_PORT".into(), public_port.to_string()));
        envs.push(("INTERNAL_HTTP_PORT".into(), internal_port.to_string()));
        let dir = scratch(name);
        let process = ServerProcess::start_with_env(name, &binary(name), &[], &envs, &dir.join(format!("{name}.log")));
        let mut service = Self { name: name.to_owned(), public_port, internal_port, process };
        service.wait_healthy();
        service
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
