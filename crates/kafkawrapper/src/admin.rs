//! Topic creation and offset inspection.
//!
//! Why this module exists: the local broker does not auto-create topics (and real
//! clusters should not), so services create what they need at start-up with
//! [`ensure_topics`]; and operators and tests need to see what a group has committed
//! against what the log holds ([`committed_offsets`], [`end_offsets`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::client::{client_config_from, TracingContext};
use crate::Error;

/// How long the admin helpers wait for the broker.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates each `(topic, partitions)` that does not exist yet; a topic that already
/// exists counts as success (its partition count is left alone). Topics are created
/// with the broker's default replication factor. Returns once the new topics show up
/// in the cluster metadata. Uses the `RDKAFKA_*` overrides of the environment.
pub async fn ensure_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<(), Error> {
    if topics.is_empty() {
        return Ok(());
    }
    let properties = crate::settings::properties_from_env();
    let config = client_config_from(brokers, &properties, &[]);
    let admin: AdminClient<TracingContext> =
        config.create_with_context(TracingContext).map_err(|e| Error::Config(e.to_string()))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, (*partitions).max(1), TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)).operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin.create_topics(new_topics.iter(), &options).await?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, "created topic"),
            Err((_topic, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
        }
    }

    // Wait until every topic is visible with its partitions, so a consumer or
    // producer created next does not see "unknown topic".
    let names: Vec<String> = topics.iter().map(|(name, _)| (*name).to_owned()).collect();
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        let config = client_config_from(&brokers, &properties, &[]);
        let consumer: BaseConsumer<TracingContext> =
            config.create_with_context(TracingContext).map_err(|e| Error::Config(e.to_string()))?;
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        for name in &names {
            loop {
                let visible = consumer
                    .fetch_metadata(Some(name), Duration::from_secs(2))
                    .map(|m| {
                        m.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                    })
                    .unwrap_or(false);
                if visible {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::UnknownTopic(name.clone()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Thread(e.to_string()))?
}

/// The offsets `group` has committed for each partition of `topic` (`None`: nothing
/// committed yet). A committed offset is the next offset the group will read.
pub async fn committed_offsets(brokers: &str, group: &str, topic: &str) -> Result<BTreeMap<i32, Option<i64>>, Error> {
    let brokers = brokers.to_owned();
    let group = group.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let properties = crate::settings::properties_from_env();
        let config = client_config_from(&brokers, &properties, &[("group.id", group)]);
        let consumer: BaseConsumer<TracingContext> =
            config.create_with_context(TracingContext).map_err(|e| Error::Config(e.to_string()))?;
        let partitions = partitions_of(&consumer, &topic)?;
        let mut tpl = TopicPartitionList::new();
        for partition in &partitions {
            tpl.add_partition(&topic, *partition);
        }
        let committed = consumer.committed_offsets(tpl, ADMIN_TIMEOUT)?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (e.partition(), offset)
            })
            .collect())
    })
    .await
    .map_err(|e| Error::Thread(e.to_string()))?
}

/// The end offset (the offset the next message will get) of each partition of `topic`.
pub async fn end_offsets(brokers: &str, topic: &str) -> Result<BTreeMap<i32, i64>, Error> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let properties = crate::settings::properties_from_env();
        let config = client_config_from(&brokers, &properties, &[]);
        let consumer: BaseConsumer<TracingContext> =
            config.create_with_context(TracingContext).map_err(|e| Error::Config(e.to_string()))?;
        let mut out = BTreeMap::new();
        for partition in partitions_of(&consumer, &topic)? {
            let (_low, high) = consumer.fetch_watermarks(&topic, partition, ADMIN_TIMEOUT)?;
            out.insert(partition, high);
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Thread(e.to_string()))?
}

fn partitions_of(consumer: &BaseConsumer<TracingContext>, topic: &str) -> Result<Vec<i32>, Error> {
    let metadata = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
        .unwrap_or_default();
    if found.is_empty() {
        return Err(Error::UnknownTopic(topic.to_owned()));
    }
    Ok(found)
}
