//! The producer and the admin helpers against a real broker.

mod common;

use std::time::Duration;

use common::{create_topics, init_tracing, producer, read_topic};

#[tokio::test]
async fn ensure_topics_creates_and_tolerates_existing_topics() {
    init_tracing();
    let broker = testkit::Broker::start();
    let a = testkit::unique("ensure-a");
    let b = testkit::unique("ensure-b");
    create_topics(&broker, &[(&a, 3), (&b, 1)]).await;
    // Creating again (one old, one new) succeeds and leaves the old one alone.
    let c = testkit::unique("ensure-c");
    create_topics(&broker, &[(&a, 5), (&c, 2)]).await;

    let ends = kafkawrapper::end_offsets(&broker.bootstrap(), &a).await.expect("end offsets");
    assert_eq!(ends.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2], "existing topic keeps 3 partitions");
    let ends = kafkawrapper::end_offsets(&broker.bootstrap(), &c).await.expect("end offsets");
    assert_eq!(ends.len(), 2);
    let err = kafkawrapper::end_offsets(&broker.bootstrap(), &testkit::unique("missing")).await;
    assert!(err.is_err(), "a missing topic is an error: {err:?}");
}

#[tokio::test]
async fn idempotent_producer_writes_keyed_messages_with_headers() {
    init_tracing();
    let broker = testkit::Broker::start();
    let topic = testkit::unique("produce");
    create_topics(&broker, &[(&topic, 4)]).await;
    let producer = producer(&broker.bootstrap());

    let mut placements = Vec::new();
    for i in 0..10 {
        let key = format!("user-{}", i % 2);
        let payload = format!("event-{i}");
        let placed = producer
            .send(&topic, key.as_bytes(), payload.as_bytes(), &[("trace", b"t-1".as_slice())])
            .await
            .expect("delivered");
        placements.push((key, placed));
    }
    // Same key, same partition, increasing offsets.
    for key in ["user-0", "user-1"] {
        let mine: Vec<(i32, i64)> = placements.iter().filter(|(k, _)| k == key).map(|(_, p)| *p).collect();
        assert!(mine.iter().all(|(p, _)| *p == mine[0].0), "{key} spread over partitions: {mine:?}");
        assert!(mine.windows(2).all(|w| w[1].1 == w[0].1 + 1), "{key} offsets not consecutive: {mine:?}");
    }
    let (partition, _) = placements[0].1;
    let read = read_topic(&broker.bootstrap(), &topic, partition, 5, Duration::from_secs(10));
    assert_eq!(read.len(), 5);
    assert_eq!(read[0].key.as_deref(), Some(b"user-0".as_slice()));
    assert_eq!(read[0].payload.as_deref(), Some(b"event-0".as_slice()));
    assert_eq!(read[0].header("trace").as_deref(), Some("t-1"));
}

#[tokio::test]
async fn delivery_to_a_paused_broker_fails_within_the_delivery_timeout() {
    init_tracing();
    let broker = testkit::Broker::start();
    let topic = testkit::unique("timeout");
    create_topics(&broker, &[(&topic, 1)]).await;
    let settings = kafkawrapper::KafkaSettings {
        delivery_timeout: Duration::from_secs(2),
        ..kafkawrapper::KafkaSettings::for_brokers(broker.bootstrap())
    };
    let producer = kafkawrapper::Producer::new(&settings).expect("producer");
    producer.send(&topic, b"k", b"warm-up", &[]).await.expect("delivered while the broker runs");

    broker.pause();
    let started = std::time::Instant::now();
    let result = producer.send(&topic, b"k", b"stuck", &[]).await;
    let took = started.elapsed();
    broker.resume();
    assert!(result.is_err(), "no acknowledgement, no success: {result:?}");
    assert!(took < Duration::from_secs(8), "bounded by the delivery timeout, took {took:?}");
}
