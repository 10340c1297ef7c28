//! What operators see: the claim, failed-open and lease-lost counters, the
//! `eventstore_up` gauge, and exactly one warning per outage plus one line when it ends.
//!
//! One test only: it installs the process-wide metrics recorder and log subscriber.

mod common;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, settings, store};
use eventstore::{Claim, EventStoreSettings, METRIC_CLAIMS, METRIC_LEASE_LOST, METRIC_UNAVAILABLE, METRIC_UP};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use testkit::Redis;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const OUTAGE_WARNING: &str = "event store unavailable, processing without deduplication";
const RECOVERY: &str = "event store available again, deduplication resumed";

/// (level, message, prefix) of every event logged.
type Logged = Arc<Mutex<Vec<(tracing::Level, String, String)>>>;

struct Recorder(Logged);

#[derive(Default)]
struct Fields {
    message: String,
    prefix: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "prefix" => self.prefix = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.lock().expect("log").push((*event.metadata().level(), fields.message, fields.prefix));
    }
}

fn count(logged: &Logged, level: tracing::Level, message: &str, prefix: &str) -> usize {
    logged.lock().expect("log").iter().filter(|(l, m, p)| *l == level && m == message && p == prefix).count()
}

/// The value of the series `name{labels...}` in the Prometheus text output.
fn value(handle: &PrometheusHandle, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = handle.render();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\""))))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_are_logged_once_and_counted() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).expect("first recorder");
    let logged: Logged = Arc::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Recorder(logged.clone())))
        .expect("first subscriber");

    let mut redis = Redis::start();
    let settings = settings(&redis.url());
    let p = settings.key_prefix.clone();
    let prefix = p.as_str();
    let store = store(&settings);
    let other_pod = common::store(&settings);

    // Healthy: one of each outcome but `unavailable`.
    let key = store.key("m", "s");
    let Claim::Acquired(token) = store.claim(&key).await else { panic!("acquire") };
    assert_eq!(other_pod.claim(&key).await, Claim::InProgress);
    store.mark_done(&key, token).await;
    assert_eq!(store.claim(&key).await, Claim::AlreadyDone);
    let claims = |outcome: &'static str| value(&metrics, METRIC_CLAIMS, &[("prefix", prefix), ("outcome", outcome)]);
    assert_eq!(claims("acquired"), Some(1.0));
    assert_eq!(claims("in_progress"), Some(1.0));
    assert_eq!(claims("already_done"), Some(1.0));
    assert_eq!(value(&metrics, METRIC_UP, &[("prefix", prefix)]), Some(1.0));

    // A lease that expires before the handler finishes is counted.
    let short = EventStoreSettings { processing_lease: Duration::from_millis(100), ..common::settings(&redis.url()) };
    let short_store = common::store(&short);
    let short_key = short_store.key("slow", "s");
    let Claim::Acquired(slow_token) = short_store.claim(&short_key).await else { panic!("acquire") };
    tokio::time::sleep(Duration::from_millis(300)).await;
    short_store.mark_done(&short_key, slow_token).await;
    assert_eq!(value(&metrics, METRIC_LEASE_LOST, &[("prefix", short.key_prefix.as_str())]), Some(1.0));
    assert_eq!(value(&metrics, METRIC_LEASE_LOST, &[("prefix", prefix)]), None, "no lease lost here");

    // Outage: every operation fails open and is counted, one warning is logged.
    let Claim::Acquired(finish) = store.claim(&store.key("finish", "s")).await else { panic!("acquire") };
    let Claim::Acquired(release) = store.claim(&store.key("release", "s")).await else { panic!("acquire") };
    tokio::task::block_in_place(|| redis.stop());
    for i in 0..5 {
        assert_eq!(store.claim(&store.key(&format!("down-{i}"), "s")).await, Claim::Unavailable);
    }
    store.mark_done(&store.key("finish", "s"), finish).await;
    store.release(&store.key("release", "s"), release).await;
    assert!(store.ping().await.is_err());
    let unavailable =
        |operation: &'static str| value(&metrics, METRIC_UNAVAILABLE, &[("prefix", prefix), ("operation", operation)]);
    assert_eq!(unavailable("claim"), Some(5.0));
    assert_eq!(unavailable("mark_done"), Some(1.0));
    assert_eq!(unavailable("release"), Some(1.0));
    assert_eq!(unavailable("ping"), None, "a readiness probe is not an event processed without dedup");
    assert_eq!(claims("unavailable"), Some(5.0));
    assert_eq!(value(&metrics, METRIC_UP, &[("prefix", prefix)]), Some(0.0));
    assert_eq!(count(&logged, tracing::Level::WARN, OUTAGE_WARNING, prefix), 1, "one warning per outage");
    assert_eq!(count(&logged, tracing::Level::INFO, RECOVERY, prefix), 0);

    // Recovery: one info line, the gauge goes back up.
    tokio::task::block_in_place(|| redis.restart());
    eventually(Duration::from_secs(15), || async {
        matches!(store.claim(&store.key("probe", "s")).await, Claim::Acquired(_)).then_some(())
    })
    .await
    .expect("heals");
    assert_eq!(value(&metrics, METRIC_UP, &[("prefix", prefix)]), Some(1.0));
    assert_eq!(count(&logged, tracing::Level::INFO, RECOVERY, prefix), 1);
    assert_eq!(count(&logged, tracing::Level::WARN, OUTAGE_WARNING, prefix), 1);

    // A second outage warns again, once.
    tokio::task::block_in_place(|| redis.stop());
    for i in 0..3 {
        assert_eq!(store.claim(&store.key(&format!("again-{i}"), "s")).await, Claim::Unavailable);
    }
    assert_eq!(count(&logged, tracing::Level::WARN, OUTAGE_WARNING, prefix), 2);
    assert_eq!(value(&metrics, METRIC_UP, &[("prefix", prefix)]), Some(0.0));
}
