//! Shared helpers for the event store's integration tests: settings for a test Redis,
//! a raw connection to inspect what the store wrote, and polling.

#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use eventstore::{EventStoreSettings, RedisEventStore};

/// Settings pointing at `url`, with a prefix no other test uses.
pub fn settings(url: &str) -> EventStoreSettings {
    EventStoreSettings {
        redis_url: url.to_owned(),
        key_prefix: testkit::unique("es"),
        ttl: Duration::from_secs(60),
        processing_lease: Duration::from_secs(30),
        timeout: Duration::from_millis(500),
    }
}

pub fn store(settings: &EventStoreSettings) -> RedisEventStore {
    RedisEventStore::new(settings.clone()).expect("valid settings")
}

/// A plain connection, to look at the keys behind the store's back.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection to the test redis")
}

pub async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.expect("GET")
}

pub async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.expect("PTTL")
}

/// Calls `f` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(value) = f().await {
            return Some((value, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
