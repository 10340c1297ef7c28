//! Graceful shutdown and rebalances between live members. The periodic commit is
//! switched off (an hour) so only the commits made on revocation and shutdown count:
//! if those were missing, the tests would see messages handled twice.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{committed, create_topics, eventually, fast_retry, init_tracing, producer, settings};
use kafkawrapper::{ConsumerGroup, Handler, HandlerError, Record};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// Sleeps `delay` per message (forever for payload "hang") and records who handled what.
struct Slow {
    name: &'static str,
    delay: Duration,
    seen: Arc<Mutex<Vec<(&'static str, Record)>>>,
    started: Arc<Mutex<Vec<i64>>>,
}

impl Handler for Slow {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        self.started.lock().unwrap().push(record.offset);
        if record.payload_str() == Some("hang") {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.delay).await;
        self.seen.lock().unwrap().push((self.name, record.clone()));
        Ok(())
    }
}

fn slow(name: &'static str, delay: Duration, seen: &Arc<Mutex<Vec<(&'static str, Record)>>>) -> Slow {
    Slow { name, delay, seen: seen.clone(), started: Arc::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_message_in_hand_commits_and_leaves() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("shutdown");
    create_topics(&broker, &[(&topic, 1)]).await;
    let producer = producer(&brokers);
    for i in 0..5 {
        producer.send(&topic, b"k", format!("m{i}").as_bytes(), &[]).await.expect("sent");
    }

    let mut settings = settings(&brokers, &[&topic]);
    settings.commit_interval = Duration::from_secs(3600);
    let group = settings.group_id.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = slow("a", Duration::from_millis(600), &seen);
    let started = handler.started.clone();
    let token = CancellationToken::new();
    let handle =
        tokio::spawn(ConsumerGroup::new(settings.clone(), fast_retry(0), handler).expect("group").run(token.clone()));
    eventually(WAIT, "the second message in the handler", || async {
        (started.lock().unwrap().len() >= 2).then_some(())
    })
    .await;
    let stop_at = Instant::now();
    token.cancel();
    tokio::time::timeout(WAIT, handle).await.expect("stops").expect("no panic").expect("clean stop");
    let stop_took = stop_at.elapsed();

    // The message in the handler was finished, nothing after it was started.
    let handled: Vec<i64> = seen.lock().unwrap().iter().map(|(_, r)| r.offset).collect();
    assert_eq!(handled, vec![0, 1]);
    assert_eq!(started.lock().unwrap().clone(), vec![0, 1]);
    assert_eq!(committed(&brokers, &group, &topic).await.get(&0).copied().flatten(), Some(2), "committed at shutdown");

    // The group was left: the next member starts at once (no session timeout) with m2.
    let next = Arc::new(Mutex::new(Vec::new()));
    let token = CancellationToken::new();
    let joined_at = Instant::now();
    let handle = tokio::spawn(
        ConsumerGroup::new(settings, fast_retry(0), slow("b", Duration::ZERO, &next))
            .expect("group")
            .run(token.clone()),
    );
    eventually(WAIT, "the rest", || async { (next.lock().unwrap().len() >= 3).then_some(()) }).await;
    let rejoin_took = joined_at.elapsed();
    token.cancel();
    handle.await.expect("no panic").expect("clean stop");
    let offsets: Vec<i64> = next.lock().unwrap().iter().map(|(_, r)| r.offset).collect();
    assert_eq!(offsets, vec![2, 3, 4]);
    println!("shutdown took {stop_took:?}; next member consuming after {rejoin_took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_a_hanging_handler_after_the_drain_timeout() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("hang");
    create_topics(&broker, &[(&topic, 1)]).await;
    let producer = producer(&brokers);
    producer.send(&topic, b"k", b"fine", &[]).await.expect("sent");
    producer.send(&topic, b"k", b"hang", &[]).await.expect("sent");

    let mut settings = settings(&brokers, &[&topic]);
    settings.commit_interval = Duration::from_secs(3600);
    settings.drain_timeout = Duration::from_millis(800);
    let group = settings.group_id.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = slow("a", Duration::ZERO, &seen);
    let started = handler.started.clone();
    let token = CancellationToken::new();
    let handle = tokio::spawn(ConsumerGroup::new(settings, fast_retry(0), handler).expect("group").run(token.clone()));
    eventually(WAIT, "the hanging message", || async { (started.lock().unwrap().len() >= 2).then_some(()) }).await;
    let stop_at = Instant::now();
    token.cancel();
    tokio::time::timeout(WAIT, handle).await.expect("stops").expect("no panic").expect("clean stop");
    let took = stop_at.elapsed();
    assert!(took >= Duration::from_millis(700), "waited for the drain timeout, took {took:?}");
    assert!(took < Duration::from_secs(5), "but not much longer, took {took:?}");
    assert_eq!(committed(&brokers, &group, &topic).await.get(&0).copied().flatten(), Some(1), "only the finished one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_commits_before_moving_partitions_so_nothing_is_handled_twice() {
    init_tracing();
    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("rebalance");
    create_topics(&broker, &[(&topic, 4)]).await;
    let producer = producer(&brokers);
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let per_key = 50;
    for seq in 0..per_key {
        for key in keys {
            producer.send(&topic, key.as_bytes(), format!("{key}:{seq}").as_bytes(), &[]).await.expect("sent");
        }
    }
    let total = keys.len() * per_key;

    let mut settings = settings(&brokers, &[&topic]);
    settings.commit_interval = Duration::from_secs(3600);
    let group = settings.group_id.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let token_a = CancellationToken::new();
    let a = tokio::spawn(
        ConsumerGroup::new(settings.clone(), fast_retry(0), slow("a", Duration::from_millis(60), &seen))
            .expect("group")
            .run(token_a.clone()),
    );
    eventually(WAIT, "a first part handled by a", || async { (seen.lock().unwrap().len() >= 40).then_some(()) }).await;
    let token_b = CancellationToken::new();
    let b = tokio::spawn(
        ConsumerGroup::new(settings, fast_retry(0), slow("b", Duration::from_millis(60), &seen))
            .expect("group")
            .run(token_b.clone()),
    );
    eventually(WAIT, "everything handled", || async { (seen.lock().unwrap().len() >= total).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    token_a.cancel();
    token_b.cancel();
    a.await.expect("no panic").expect("clean stop");
    b.await.expect("no panic").expect("clean stop");

    let seen = seen.lock().unwrap().clone();
    let by_b = seen.iter().filter(|(who, _)| *who == "b").count();
    assert!(by_b >= 10, "b took over some partitions (handled {by_b})");
    let mut count: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for (_, record) in &seen {
        *count.entry((record.partition, record.offset)).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(count.len(), total);
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (_, record) in &seen {
        let (key, seq) = record.payload_str().and_then(|p| p.split_once(':')).expect("payload");
        by_key.entry(key.to_owned()).or_default().push(seq.parse().expect("seq"));
    }
    for (key, seqs) in by_key {
        assert_eq!(seqs, (0..per_key).collect::<Vec<_>>(), "{key} out of order across the rebalance");
    }
    let ends = kafkawrapper::end_offsets(&brokers, &topic).await.expect("ends");
    let done = committed(&brokers, &group, &topic).await;
    for (partition, end) in ends {
        assert_eq!(done.get(&partition).copied().flatten(), Some(end), "partition {partition}");
    }
    println!("a handled {}, b handled {by_b}", seen.len() - by_b);
}
