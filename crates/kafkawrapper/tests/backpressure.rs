//! Bounded in-flight work: a slow handler with a small `max_in_flight` makes the
//! consumer pause partitions (and resume them), while every message is still handled
//! once and in order. Its own test binary, because it installs a global metrics
//! recorder to watch the `kafka_in_flight` and `kafka_paused_partitions` gauges.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{committed, create_topics, eventually, fast_retry, init_tracing, producer, settings};
use kafkawrapper::{ConsumerGroup, Handler, HandlerError, Record};
use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio_util::sync::CancellationToken;

/// Remembers, per gauge name, the largest value and the number of changes.
#[derive(Default)]
struct GaugeWatch {
    max: AtomicU64,
    last: AtomicU64,
}

impl GaugeFn for GaugeWatch {
    fn increment(&self, _value: f64) {}
    fn decrement(&self, _value: f64) {}
    fn set(&self, value: f64) {
        self.last.store(value as u64, Ordering::SeqCst);
        self.max.fetch_max(value as u64, Ordering::SeqCst);
    }
}

struct NoCounter;
impl CounterFn for NoCounter {
    fn increment(&self, _value: u64) {}
    fn absolute(&self, _value: u64) {}
}

#[derive(Default)]
struct Watch {
    gauges: Mutex<HashMap<String, Arc<GaugeWatch>>>,
}

impl Watch {
    fn gauge(&self, name: &str) -> Arc<GaugeWatch> {
        self.gauges.lock().unwrap().entry(name.to_owned()).or_default().clone()
    }
}

impl Recorder for Watch {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(NoCounter))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.gauge(key.name()))
    }
    fn register_histogram(&self, _key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

struct Slow(Mutex<Vec<Record>>);

impl Handler for Slow {
    async fn handle(&self, record: &Record) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(15)).await;
        self.0.lock().unwrap().push(record.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_pauses_its_partitions_and_still_gets_everything_in_order() {
    init_tracing();
    let watch: &'static Watch = Box::leak(Box::default());
    metrics::set_global_recorder(watch).expect("only recorder of this binary");

    let broker = testkit::Broker::start();
    let brokers = broker.bootstrap();
    let topic = testkit::unique("slow");
    create_topics(&broker, &[(&topic, 2)]).await;
    let producer = producer(&brokers);
    let per_key = 40;
    for seq in 0..per_key {
        for key in ["a", "b", "c", "d"] {
            producer.send(&topic, key.as_bytes(), format!("{key}:{seq}").as_bytes(), &[]).await.expect("sent");
        }
    }
    let total = 4 * per_key;

    let mut settings = settings(&brokers, &[&topic]);
    settings.max_in_flight = 4; // 2 per partition
    let group = settings.group_id.clone();
    let handler = Arc::new(Slow(Mutex::new(Vec::new())));
    let token = CancellationToken::new();
    let started = std::time::Instant::now();
    let handle =
        tokio::spawn(ConsumerGroup::new(settings, fast_retry(0), handler.clone()).expect("group").run(token.clone()));
    eventually(Duration::from_secs(60), "all messages handled", || async {
        (handler.0.lock().unwrap().len() >= total).then_some(())
    })
    .await;
    let handled_in = started.elapsed();
    token.cancel();
    handle.await.expect("no panic").expect("clean stop");

    let seen = handler.0.lock().unwrap().clone();
    assert_eq!(seen.len(), total, "each message once");
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for record in &seen {
        let (key, seq) = record.payload_str().and_then(|p| p.split_once(':')).expect("payload");
        by_key.entry(key.to_owned()).or_default().push(seq.parse().expect("seq"));
    }
    for (key, seqs) in by_key {
        assert_eq!(seqs, (0..per_key).collect::<Vec<_>>(), "{key} out of order");
    }

    let paused = watch.gauge("kafka_paused_partitions");
    let in_flight = watch.gauge("kafka_in_flight");
    assert!(paused.max.load(Ordering::SeqCst) >= 1, "a full partition is paused");
    assert_eq!(paused.last.load(Ordering::SeqCst), 0, "nothing is left paused");
    let max_in_flight = in_flight.max.load(Ordering::SeqCst);
    // The share of each partition (2), plus what was already fetched when a pause
    // took effect (held, not lost). Without pausing the whole fetch would pile up.
    assert!(max_in_flight <= 4 + 2 * 8, "in-flight work stays bounded, saw {max_in_flight}");
    let ends = kafkawrapper::end_offsets(&brokers, &topic).await.expect("ends");
    let done = committed(&brokers, &group, &topic).await;
    for (partition, end) in ends {
        assert_eq!(done.get(&partition).copied().flatten(), Some(end), "partition {partition} committed to its end");
    }
    println!("max in flight {max_in_flight}, handled all in {handled_in:?}");
}
