//! The consumer group runner against a real broker: ordering, commits, retries with
//! backoff, dead letters and the failover hook.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{committed, create_topics, eventually, fast_retry, init_tracing, producer, read_topic, settings};
use kafkawrapper::{ConsumerGroup, Handler, HandlerError, Record, RetrySettings};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// Records every call; fails according to the payload.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(Record, Instant)>>,
    exhausted: Mutex<Vec<(Record, HandlerError)>>,
}

impl Recorder {
    fn calls(&self) -> Vec<Record> {
        self.calls.lock().unwrap().iter().map(|(r, _)| r.clone()).collect()
    }

    fn payloads(&self) -> Vec<String> {
        self.calls().iter().map(|r| r.payload_str().unwrap_or_default().to_owned()).collect()
    }
}

impl Handler for Recorder {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push((record.clone(), Instant::now()));
        match record.payload_str() {
            Some(p) if p.starts_with("poison") => Err(HandlerError::malformed("not a chat event")),
            Some(p) if p.starts_with("refused") => Err(HandlerError::permanent("refused by downstream")),
            Some(p) if p.starts_with("flaky") => Err(HandlerError::retryable("downstream unavailable")),
            _ => Ok(()),
        }
    }

    async fn on_exhausted(&self, record: &Record, error: &HandlerError) {
        self.exhausted.lock().unwrap().push((record.clone(), error.clone()));
    }
}

fn start<H: Handler>(
    group: ConsumerGroup<H>,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), kafkawrapper::Error>>) {
    let token = CancellationToken::new();
    let handle = tokio::spawn(group.run(token.clone()));
    (token, handle)
}

async fn stop(token: CancellationToken, handle: tokio::task::JoinHandle<Result<(), kafkawrapper::Error>>) {
    token.cancel();
    tokio::time::timeout(WAIT, handle).await.expect("consumer stops in time").expect("no panic").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_every_message_in_order_per_partition_and_commits() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("ordered");
    create_topics(&broker, &[(&topic, 3)]).await;

    let producer = producer(&brokers);
    let keys = ["alice", "bob", "carol", "dave", "erin"];
    let per_key = 20;
    for seq in 0..per_key {
        for key in keys {
            producer.send(&topic, key.as_bytes(), format!("{key}:{seq}").as_bytes(), &[]).await.expect("sent");
        }
    }
    let total = keys.len() * per_key;

    let settings = settings(&brokers, &[&topic]);
    let group = settings.group_id.clone();
    let recorder = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(settings.clone(), fast_retry(3), recorder.clone()).expect("group"));
    eventually(WAIT, "all messages handled", || async { (recorder.calls().len() >= total).then_some(()) }).await;
    stop(token, handle).await;

    let calls = recorder.calls();
    assert_eq!(calls.len(), total, "each message handled exactly once");
    let mut by_key: BTreeMap<String, Vec<(i32, i64, usize)>> = BTreeMap::new();
    for record in &calls {
        let (key, seq) = record.payload_str().and_then(|p| p.split_once(':')).expect("payload");
        assert_eq!(record.key_str(), Some(key));
        by_key.entry(key.to_owned()).or_default().push((record.partition, record.offset, seq.parse().expect("seq")));
    }
    let partitions: std::collections::BTreeSet<i32> = calls.iter().map(|r| r.partition).collect();
    assert!(partitions.len() > 1, "the keys should spread over partitions: {partitions:?}");
    for (key, seen) in &by_key {
        let seqs: Vec<usize> = seen.iter().map(|s| s.2).collect();
        assert_eq!(seqs, (0..per_key).collect::<Vec<_>>(), "{key} handled out of order");
        assert!(seen.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1), "{key}: {seen:?}");
    }

    // Everything handled is committed: committed offsets equal the end offsets.
    let ends = kafkawrapper::end_offsets(&brokers, &topic).await.expect("ends");
    let done = committed(&brokers, &group, &topic).await;
    for (partition, end) in &ends {
        let expected = if *end > 0 { Some(*end) } else { None };
        assert_eq!(done.get(partition).copied().flatten(), expected, "partition {partition}: {done:?} vs {ends:?}");
    }

    // A new member of the same group gets only what was produced afterwards.
    let second = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(settings, fast_retry(3), second.clone()).expect("group"));
    producer.send(&topic, b"alice", b"alice:late", &[]).await.expect("sent");
    eventually(WAIT, "the late message", || async { (!second.calls().is_empty()).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(token, handle).await;
    assert_eq!(second.payloads(), vec!["alice:late".to_owned()], "nothing old is redelivered");
}

/// Fails twice with a retryable error, then blocks (on the third attempt) until
/// released, then succeeds.
struct FlakyThenBlocked {
    attempts: Mutex<Vec<Instant>>,
    entered_third: Notify,
    release: Notify,
}

impl Handler for FlakyThenBlocked {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        if record.payload_str() != Some("target") {
            return Ok(());
        }
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            attempts.push(Instant::now());
            attempts.len()
        };
        match attempt {
            1 | 2 => Err(HandlerError::retryable(format!("attempt {attempt} failed"))),
            _ => {
                self.entered_third.notify_one();
                self.release.notified().await;
                Ok(())
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_growing_backoff_and_commits_only_after_success() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("retry");
    create_topics(&broker, &[(&topic, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"k", b"before", &[]).await.expect("sent");
    producer.send(&topic, b"k", b"target", &[]).await.expect("sent");

    let retry = RetrySettings {
        max_retries: 5,
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(5),
        multiplier: 3.0,
        randomization_factor: 0.2,
    };
    let settings = settings(&brokers, &[&topic]);
    let group = settings.group_id.clone();
    let handler = Arc::new(FlakyThenBlocked {
        attempts: Mutex::new(Vec::new()),
        entered_third: Notify::new(),
        release: Notify::new(),
    });
    let (token, handle) = start(ConsumerGroup::new(settings, retry, handler.clone()).expect("group"));

    tokio::time::timeout(WAIT, handler.entered_third.notified()).await.expect("third attempt starts");
    // "before" (offset 0) is committed, "target" (offset 1) is not while its handler runs.
    eventually(WAIT, "offset 0 committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await; // several commit intervals
    assert_eq!(
        committed(&brokers, &group, &topic).await.get(&0).copied().flatten(),
        Some(1),
        "not committed before success"
    );

    handler.release.notify_one();
    eventually(WAIT, "offset 1 committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(2)).then_some(())
    })
    .await;
    stop(token, handle).await;

    let attempts = handler.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3, "two failures and one success");
    let first_wait = attempts[1] - attempts[0];
    let second_wait = attempts[2] - attempts[1];
    // 100 ms then 300 ms, each within ±20 %.
    assert!(first_wait >= Duration::from_millis(80), "first wait {first_wait:?}");
    assert!(second_wait >= Duration::from_millis(240), "second wait {second_wait:?}");
    assert!(second_wait > first_wait, "waits grow: {first_wait:?} then {second_wait:?}");
    assert!(first_wait < Duration::from_millis(1000), "first wait {first_wait:?} far beyond the schedule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_and_consumption_continues() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("poison");
    let dlt = testkit::unique("poison-dlt");
    create_topics(&broker, &[(&topic, 1), (&dlt, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"k1", b"good-1", &[]).await.expect("sent");
    producer.send(&topic, b"k2", b"poison{", &[("trace", b"t-9".as_slice())]).await.expect("sent");
    producer.send(&topic, b"k3", b"good-2", &[]).await.expect("sent");

    let mut settings = settings(&brokers, &[&topic]);
    settings.dead_letter_topic = Some(dlt.clone());
    let group = settings.group_id.clone();
    let recorder = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(settings, fast_retry(5), recorder.clone()).expect("group"));
    eventually(WAIT, "all three committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(3)).then_some(())
    })
    .await;
    stop(token, handle).await;

    assert_eq!(recorder.payloads(), vec!["good-1", "poison{", "good-2"], "the poison message is not retried");
    let exhausted = recorder.exhausted.lock().unwrap().clone();
    assert_eq!(exhausted.len(), 1);
    assert_eq!(exhausted[0].1, HandlerError::malformed("not a chat event"));

    let letters = read_topic(&brokers, &dlt, 0, 1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1, "one dead letter");
    let letter = &letters[0];
    assert_eq!(letter.key.as_deref(), Some(b"k2".as_slice()));
    assert_eq!(letter.payload.as_deref(), Some(b"poison{".as_slice()));
    assert_eq!(letter.header("x-error").as_deref(), Some("not a chat event"));
    assert_eq!(letter.header("x-error-kind").as_deref(), Some("malformed"));
    assert_eq!(letter.header("x-attempts").as_deref(), Some("1"));
    assert_eq!(letter.header("x-original-topic").as_deref(), Some(topic.as_str()));
    assert_eq!(letter.header("x-original-partition").as_deref(), Some("0"));
    assert_eq!(letter.header("x-original-offset").as_deref(), Some("1"));
    assert_eq!(letter.header("trace").as_deref(), Some("t-9"), "original headers are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_over_dead_letter_and_commit() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("exhaust");
    let dlt = testkit::unique("exhaust-dlt");
    create_topics(&broker, &[(&topic, 1), (&dlt, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"stream-1", b"flaky", &[]).await.expect("sent");
    producer.send(&topic, b"stream-2", b"refused", &[]).await.expect("sent");
    producer.send(&topic, b"stream-3", b"good", &[]).await.expect("sent");

    let mut settings = settings(&brokers, &[&topic]);
    settings.dead_letter_topic = Some(dlt.clone());
    let group = settings.group_id.clone();
    let recorder = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(settings, fast_retry(2), recorder.clone()).expect("group"));
    eventually(WAIT, "all three committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(3)).then_some(())
    })
    .await;
    stop(token, handle).await;

    // 1 attempt + 2 retries for the flaky one, one call each for the others.
    assert_eq!(recorder.payloads(), vec!["flaky", "flaky", "flaky", "refused", "good"]);
    let exhausted = recorder.exhausted.lock().unwrap().clone();
    assert_eq!(exhausted.len(), 2, "the hook runs once per given-up message: {exhausted:?}");
    assert_eq!(exhausted[0].0.payload_str(), Some("flaky"));
    assert_eq!(exhausted[0].0.offset, 0);
    assert_eq!(exhausted[0].1, HandlerError::retryable("downstream unavailable"));
    assert_eq!(exhausted[1].1, HandlerError::permanent("refused by downstream"));

    let letters = read_topic(&brokers, &dlt, 0, 2, Duration::from_secs(10));
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].key.as_deref(), Some(b"stream-1".as_slice()));
    assert_eq!(letters[0].header("x-error-kind").as_deref(), Some("retryable-exhausted"));
    assert_eq!(letters[0].header("x-attempts").as_deref(), Some("3"));
    assert_eq!(letters[0].header("x-error").as_deref(), Some("downstream unavailable"));
    assert_eq!(letters[0].header("x-original-offset").as_deref(), Some("0"));
    assert_eq!(letters[1].header("x-error-kind").as_deref(), Some("permanent"));
    assert_eq!(letters[1].header("x-attempts").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_topic_given_up_messages_are_skipped_and_committed() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("nodlt");
    create_topics(&broker, &[(&topic, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"a", b"flaky", &[]).await.expect("sent");
    producer.send(&topic, b"b", b"good", &[]).await.expect("sent");

    let settings = settings(&brokers, &[&topic]);
    let group = settings.group_id.clone();
    let recorder = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(settings, fast_retry(1), recorder.clone()).expect("group"));
    eventually(WAIT, "both committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(2)).then_some(())
    })
    .await;
    stop(token, handle).await;
    assert_eq!(recorder.payloads(), vec!["flaky", "flaky", "good"]);
    assert_eq!(recorder.exhausted.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dead_letter_publish_blocks_the_commit() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("dltfail");
    let dlt = testkit::unique("dltfail-dlt");
    create_topics(&broker, &[(&topic, 1), (&dlt, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"a", b"poison", &[]).await.expect("sent");
    producer.send(&topic, b"b", b"good", &[]).await.expect("sent");

    // The broker refuses every write to an invalid topic name.
    let mut broken = settings(&brokers, &[&topic]);
    broken.dead_letter_topic = Some("not a valid topic!".to_owned());
    let group = broken.group_id.clone();
    let recorder = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(broken.clone(), fast_retry(0), recorder.clone()).expect("group"));
    eventually(WAIT, "the poison message handled", || async { (!recorder.calls().is_empty()).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(committed(&brokers, &group, &topic).await.get(&0).copied().flatten(), None, "nothing committed");
    assert_eq!(recorder.payloads(), vec!["poison"], "the next message waits for the dead letter");
    stop(token, handle).await;
    assert_eq!(committed(&brokers, &group, &topic).await.get(&0).copied().flatten(), None, "not even at shutdown");

    // The next member of the group (with a working dead-letter topic) gets the
    // message again, dead-letters it and moves on.
    let mut fixed = broken;
    fixed.dead_letter_topic = Some(dlt.clone());
    let second = Arc::new(Recorder::default());
    let (token, handle) = start(ConsumerGroup::new(fixed, fast_retry(0), second.clone()).expect("group"));
    eventually(WAIT, "both committed", || async {
        (committed(&brokers, &group, &topic).await.get(&0).copied().flatten() == Some(2)).then_some(())
    })
    .await;
    stop(token, handle).await;
    assert_eq!(second.payloads(), vec!["poison", "good"]);
    let letters = read_topic(&brokers, &dlt, 0, 1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].payload.as_deref(), Some(b"poison".as_slice()));
}
