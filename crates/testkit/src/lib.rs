//! Real servers for tests, each on a free loopback port, owned by the test.
//!
//! Why this crate exists: tests that cross a service boundary must talk to real
//! servers, and a test that stops Redis or pauses the broker must not disturb any
//! other test. So every test starts its own copy, from the binaries the local stack
//! installs (`deploy/local/install.sh`), and the copy dies with the test (`Drop`).
//!
//! Binaries are found through `REDIS_SERVER_BIN`, `TANSU_BIN`, `NX27017_BIN`,
//! `PYTHON_BIN` and `SMTP_SINK` (set by `tests/run.sh` via `deploy/local/env.sh`),
//! falling back to the repository's `.local/venv` and then to `PATH`.

mod process;
mod servers;

pub use process::{free_port, probe, wait_for_port, workspace_root, ServerProcess};
pub use servers::{scratch, Broker, Mongo, Redis, SmtpSink};

/// A unique name for topics, groups and key prefixes, so tests never share state.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_starts_answers_and_restarts() {
        let mut redis = Redis::start();
        assert!(process::probe(redis.port(), b"PING\r\n").is_some_and(|r| r.starts_with("+PONG")));
        redis.stop();
        assert!(process::probe(redis.port(), b"PING\r\n").is_none(), "stopped server must not answer");
        redis.restart();
        assert!(process::probe(redis.port(), b"PING\r\n").is_some_and(|r| r.starts_with("+PONG")));
    }

    #[test]
    fn broker_starts_and_creates_topics() {
        let broker = Broker::start();
        broker.create_topic(&unique("t"), 3);
    }

    #[test]
    fn mongo_starts() {
        let mongo = Mongo::start();
        assert!(wait_for_port(mongo.port(), std::time::Duration::from_secs(1)));
    }
}
