//! The documented environment variables reach the settings through servicekit's
//! `EnvMap`, exactly as a service loads them.

use std::time::Duration;

use eventstore::EventStoreSettings;
use servicekit::config::load_from;
use servicekit::EnvMap;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct ServiceSettings {
    event_store: EventStoreSettings,
}

/// Loads with `vars` as the environment; the error is rendered (it names the variable).
fn load(vars: &[(&str, &str)]) -> Result<ServiceSettings, String> {
    let env = EnvMap::new().section("event_store", EventStoreSettings::ENV);
    load_from(&env, servicekit::config::lookup(vars)).map_err(|e| e.to_string())
}

#[test]
fn defaults_load_without_any_variable() {
    let settings = load(&[]).expect("defaults load");
    assert_eq!(settings.event_store, EventStoreSettings::default());
}

#[test]
fn every_documented_variable_sets_its_field() {
    let settings = load(&[
        ("REDIS_URL", "redis://redis.chat:6380/2"),
        ("DEDUPLICATION_TTL", "6h"),
        ("EVENT_STORE_KEY_PREFIX", "email-events"),
        ("EVENT_STORE_PROCESSING_LEASE", "45s"),
        ("REDIS_TIMEOUT", "250ms"),
    ])
    .expect("loads");
    let s = settings.event_store;
    assert_eq!(s.redis_url, "redis://redis.chat:6380/2");
    assert_eq!(s.ttl, Duration::from_secs(6 * 3600));
    assert_eq!(s.key_prefix, "email-events");
    assert_eq!(s.processing_lease, Duration::from_secs(45));
    assert_eq!(s.timeout, Duration::from_millis(250));
}

#[test]
fn a_bad_duration_names_its_variable() {
    let err = load(&[("DEDUPLICATION_TTL", "five minutes")]).expect_err("not a duration");
    assert!(err.contains("DEDUPLICATION_TTL"), "{err}");
}
