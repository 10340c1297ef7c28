//! chatpersistence: the chat message API (one durable write per message, history)
//! and, in outbox mode, the relay that carries new messages to Kafka.
//!
//! This file only wires the parts together; see `api`, `store`, `relay` and `lease`.

mod api;
mod bot_api;
mod conversations;
mod conversations_api;
mod domain_relay;
mod event_relay;
mod lease;
mod message_changes;
mod message_status;
mod read_limit;
mod recent_cache;
mod relay;
mod settings;
mod store;
mod write_behind;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatauth::Authenticator;
use servicekit::{Context, Launch, Readiness, Routes, Shutdown};

use crate::settings::{CaptureMode, Settings};
use crate::store::Store;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::run("chatpersistence", &Settings::env_map(), build).await
}

async fn build(ctx: Context, settings: Settings) -> Result<Launch, String> {
    settings.validate()?;
    settings.fits_request_timeout(ctx.base.http.request_timeout)?;
    let auth = Authenticator::start(&settings.auth).await.map_err(|e| e.to_string())?;
    let outbox = settings.capture.mode == CaptureMode::Outbox;
    let store = Store::new(&settings.mongo, outbox).await.map_err(|e| e.to_string())?;

    let conversations = conversations::Conversations::new(store.clone(), outbox);
    let activity = conversations.clone();
    let indexes_ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(create_indexes(store.clone(), conversations.clone(), indexes_ready.clone(), ctx.shutdown.clone()));

    let feed = outbox.then(|| relay::RelayFeed::new(settings.capture.batch_size as usize * 8));
    let api_feed = feed.as_ref().map(|(feed, _)| feed.clone());
    let presence = match settings.presence.redis_url.as_str() {
        "" => None,
        url => Some(Arc::new(presence::Presence::new(
            url,
            &settings.presence.key_prefix,
            settings.presence.timeout,
            "inbox_presence_failures_total",
        )?)),
    };
    let limits = api::Limits {
        max_members: settings.writes.group_max_members,
        presence,
        history: settings.history.clone(),
        writes: settings.writes.clone(),
        reads: settings.reads.clone(),
        format: settings.ids.stream_id_format,
    };
    let mut state =
        api::AppState::new(store.clone(), auth, limits, conversations.clone(), api_feed.clone(), indexes_ready.clone());
    let mut writers = Vec::new();
    if settings.write_behind.mode == settings::WriteMode::WriteBehind {
        let queue = Arc::new(write_behind::Queue::new(settings.write_behind_redis_url(), &settings.write_behind)?);
        // Unique per process: the consumer name and the lease holder.
        let holder = format!("chatpersistence-{}-{}", std::process::id(), chatstream::MessageId::new());
        tracing::info!(holder, shards = queue.shards(), "write-behind mode: posts are queued in Redis");
        let cache = match settings.recent_cache.length {
            0 => None,
            _ => Some(Arc::new(recent_cache::RecentCache::new(
                settings.write_behind_redis_url(),
                &settings.write_behind.key_prefix,
                settings.write_behind.redis_timeout,
                &settings.recent_cache,
            )?)),
        };
        if let Some(cache) = &cache {
            state = state.with_cache(cache.clone());
        }
        let parts = write_behind::WriterParts {
            queue: queue.clone(),
            store: store.clone(),
            conversations: conversations.clone(),
            feed: api_feed.clone(),
            cache: cache.clone(),
            holder,
            settings: settings.write_behind.clone(),
            indexes_ready: indexes_ready.clone(),
        };
        writers.extend((0..queue.shards()).map(|shard| write_behind::ShardWriter::new(&parts, shard)));
        state = state.with_queue(queue);
    }
    let routes = Routes::new(api::public_router(state.clone())).internal(api::internal_router(state));

    let ping_store = store.clone();
    let readiness = Readiness::new()
        .check_fn("mongodb", move || {
            let store = ping_store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        })
        .check_fn("indexes", move || {
            let ready = indexes_ready.load(Ordering::Acquire);
            Box::pin(async move {
                if ready {
                    Ok(())
                } else {
                    Err("indexes not created yet".to_owned())
                }
            })
        });
    let mut launch =
        Launch::new(routes).readiness(readiness).worker("inbox activity", activity.run_activity(ctx.shutdown.clone()));
    for writer in writers {
        launch = launch.worker("write-behind writer", writer.run(ctx.shutdown.clone()));
    }

    if let Some(feed) = feed {
        let mut kafka = settings.kafka.clone();
        let set = kafka.effective_properties();
        // The relay batches by itself: do not let librdkafka wait for more.
        if !set.contains_key("linger.ms") {
            kafka.merge_properties([("linger.ms", "0")]);
        }
        // Kafka Connect's (Java) partitioner: with the same key bytes Debezium puts a
        // conversation in the same partition, so switching capture modes keeps order.
        if !set.contains_key("partitioner") {
            kafka.merge_properties([("partitioner", "murmur2_random")]);
        }
        let producer = kafkawrapper::Producer::new(&kafka).map_err(|e| e.to_string())?;
        let (lease, handle) = lease::Lease::new(store.clone(), &settings.capture.topic, settings.capture.lease_ttl);
        let lease = lease.reported_as("relay_is_leader");
        tracing::info!(holder = lease.holder(), "outbox relay enabled");
        let lease_shutdown = ctx.shutdown.clone();
        let (domain_lease, domain_handle) =
            lease::Lease::new(store.clone(), "domain-collections", settings.capture.lease_ttl);
        let domain_relay = domain_relay::DomainRelay::new(
            store.clone(),
            producer.clone(),
            kafka.brokers.clone(),
            domain_handle,
            settings.capture.poll_interval,
            settings.capture.batch_size,
            settings.capture.partitions,
        );
        let domain_shutdown = ctx.shutdown.clone();
        let (event_lease, event_handle) =
            lease::Lease::new(store.clone(), "conversation-events", settings.capture.lease_ttl);
        let event_relay = event_relay::EventRelay::new(
            store.clone(),
            conversations,
            producer.clone(),
            settings.capture.topic.clone(),
            event_handle,
            settings.capture.poll_interval,
            settings.capture.batch_size,
        );
        let event_shutdown = ctx.shutdown.clone();
        let relay = relay::Relay::new(store, producer, kafka.brokers.clone(), settings.capture.clone(), feed, handle);
        launch = launch
            .worker("domain capture lease", async move {
                domain_lease.run(domain_shutdown).await;
                Ok(())
            })
            .worker("domain capture", domain_relay.run(ctx.shutdown.clone()))
            .worker("conversation events lease", async move {
                event_lease.run(event_shutdown).await;
                Ok(())
            })
            .worker("conversation events capture", event_relay.run(ctx.shutdown.clone()))
            .worker("relay lease", async move {
                lease.run(lease_shutdown).await;
                Ok(())
            })
            .worker("outbox relay", relay.run(ctx.shutdown.clone()));
    } else {
        tracing::info!("CAPTURE_MODE=debezium: the outbox relay is off");
    }
    Ok(launch)
}

/// Creates the indexes, retrying while MongoDB is unreachable; writes are refused
/// (503) until they exist, because idempotent retries depend on the unique index.
async fn create_indexes(
    store: Store,
    conversations: conversations::Conversations,
    ready: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let created = match store.ensure_indexes().await {
            Ok(()) => conversations.ensure_indexes().await,
            Err(err) => Err(err),
        };
        match created {
            Ok(()) => {
                ready.store(true, Ordering::Release);
                tracing::info!("indexes ready");
                return;
            }
            Err(err) => {
                if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(error = %err, "cannot create indexes yet; retrying every second");
                    last_warning = Some(std::time::Instant::now());
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
