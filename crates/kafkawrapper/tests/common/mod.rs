//! Shared helpers for the integration tests: a broker, settings tuned for speed, a
//! producer, readers of topics and of committed offsets, and polling with deadlines.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use kafkawrapper::{KafkaSettings, Producer, RetrySettings};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Consumer settings for a test: unique group, fast commits, short drain.
pub fn settings(brokers: &str, topics: &[&str]) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_owned(),
        group_id: testkit::unique("group"),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        commit_interval: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(3),
        delivery_timeout: Duration::from_secs(10),
        ..KafkaSettings::default()
    }
}

/// Retries that finish fast and deterministically.
pub fn fast_retry(max_retries: u32) -> RetrySettings {
    RetrySettings {
        max_retries,
        initial_interval: Duration::from_millis(10),
        max_interval: Duration::from_millis(200),
        multiplier: 2.0,
        randomization_factor: 0.0,
    }
}

pub async fn create_topics(broker: &testkit::Broker, topics: &[(&str, i32)]) {
    kafkawrapper::ensure_topics(&broker.bootstrap(), topics).await.expect("topics are created");
}

pub fn producer(brokers: &str) -> Producer {
    Producer::new(&KafkaSettings::for_brokers(brokers)).expect("producer")
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn committed(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, Option<i64>> {
    kafkawrapper::committed_offsets(brokers, group, topic).await.expect("committed offsets")
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Read {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads partition `partition` of `topic` from the beginning until `count` messages
/// arrived (or `timeout`), without a consumer group.
pub fn read_topic(brokers: &str, topic: &str, partition: i32, count: usize, timeout: Duration) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("fetch.wait.max.ms", "10")
        // librdkafka wants a group for assign(); nothing is committed with it.
        .set("group.id", testkit::unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning).expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let headers = message
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
                .unwrap_or_default();
            out.push(Read {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}
