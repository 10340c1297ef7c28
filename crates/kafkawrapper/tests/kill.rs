//! A process killed before it commits gets its message redelivered to the next group
//! member. The member that dies is a real child process (this test binary, re-run in
//! "child" mode) killed with SIGKILL, so nothing gets a chance to clean up.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{committed, create_topics, eventually, fast_retry, init_tracing, producer, settings};
use kafkawrapper::{ConsumerGroup, Handler, HandlerError, Record};
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "KAFKAWRAPPER_TEST_CHILD";
const WAIT: Duration = Duration::from_secs(60);

/// Child mode: handles "first", then hangs forever in the handler of anything else,
/// after writing `holding <offset>` to the marker file.
struct HangOnSecond {
    marker: PathBuf,
}

impl Handler for HangOnSecond {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        if record.payload_str() == Some("first") {
            return Ok(());
        }
        std::fs::write(&self.marker, format!("holding {}", record.offset)).expect("marker");
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[test]
#[ignore = "helper run as a child process by killed_member_gets_its_message_redelivered"]
fn child_consumer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [brokers, group, topic, marker] = parts[..] else { panic!("bad child spec {spec}") };
    let mut settings = settings(brokers, &[topic]);
    settings.group_id = group.to_owned();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let handler = HangOnSecond { marker: PathBuf::from(marker) };
        let group = ConsumerGroup::new(settings, fast_retry(0), handler).expect("group");
        group.run(CancellationToken::new()).await.expect("runs until killed");
    });
}

/// Kills the child on drop, so a failing test leaves no consumer behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_marker(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().filter(|s| !s.is_empty())
}

#[derive(Default)]
struct Collect(std::sync::Mutex<Vec<Record>>);

impl Handler for Collect {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(record.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_gets_its_message_redelivered() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("kill");
    create_topics(&broker, &[(&topic, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"k", b"first", &[]).await.expect("sent");
    producer.send(&topic, b"k", b"second", &[]).await.expect("sent");

    let settings = settings(&brokers, &[&topic]);
    let group = settings.group_id.clone();
    let marker = std::env::temp_dir().join(testkit::unique("kafkawrapper-kill-marker"));
    let spec = format!("{brokers}|{group}|{topic}|{}", marker.display());
    let exe = std::env::current_exe().expect("test binary");
    let mut child = ChildGuard(
        Command::new(exe)
            .args(["--exact", "child_consumer", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::null())
            .spawn()
            .expect("child starts"),
    );

    // The child handles "first" (and commits it), then holds "second" in its handler.
    let held = eventually(WAIT, "the child to hold the second message", || async { read_marker(&marker) }).await;
    assert_eq!(held, "holding 1");
    eventually(WAIT, "the child's commit of the first message", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(committed(&brokers, &group, &topic).await.get(&0).copied().flatten(), Some(1), "second not committed");

    // SIGKILL: no commit, no leave-group.
    child.0.kill().expect("SIGKILL");
    let status = child.0.wait().expect("reaped");
    assert!(!status.success(), "the child was killed: {status:?}");
    let killed_at = Instant::now();

    let collector = Arc::new(Collect::default());
    let token = CancellationToken::new();
    let handle =
        tokio::spawn(ConsumerGroup::new(settings, fast_retry(0), collector.clone()).expect("group").run(token.clone()));
    eventually(WAIT, "the redelivered message", || async { (!collector.0.lock().unwrap().is_empty()).then_some(()) })
        .await;
    let redelivered_after = killed_at.elapsed();
    eventually(WAIT, "the redelivered message committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(2)).then_some(())
    })
    .await;
    token.cancel();
    handle.await.expect("no panic").expect("clean stop");

    let got = collector.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "only the uncommitted message comes again: {got:?}");
    assert_eq!(got[0].offset, 1);
    assert_eq!(got[0].payload_str(), Some("second"));
    println!("redelivered {redelivered_after:?} after SIGKILL");
    let _ = std::fs::remove_file(&marker);
}
