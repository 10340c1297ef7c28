//! The claim / lease / done protocol against a real Redis: deduplication, expiry, the
//! key format, races between consumers, releases and expired leases.

mod common;

use std::time::Duration;

use chatstream::{MessageId, StreamId, UserId};
use common::{get, pttl, raw, settings, store};
use eventstore::{Claim, EventKey, EventStoreSettings, RedisEventStore};
use testkit::Redis;

fn acquired(claim: Claim) -> eventstore::ClaimToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[tokio::test]
async fn a_processed_event_is_deduplicated() {
    let redis = Redis::start();
    let store = store(&settings(&redis.url()));
    let key = store.key("message-1", "stream-1");

    let token = acquired(store.claim(&key).await);
    assert!(!store.is_done(&key).await.expect("redis up"), "a lease is not done");
    store.mark_done(&key, token).await;

    assert_eq!(store.claim(&key).await, Claim::AlreadyDone);
    assert_eq!(store.claim(&key).await, Claim::AlreadyDone, "still done on the third delivery");
    assert!(store.is_done(&key).await.expect("redis up"));
    assert!(store.is_up());

    // Another event is unaffected, and so is the same ids under another prefix.
    acquired(store.claim(&store.key("message-2", "stream-1")).await);
    let other = common::store(&settings(&redis.url()));
    acquired(other.claim(&other.key("message-1", "stream-1")).await);
}

#[tokio::test]
async fn the_done_marker_has_the_documented_key_and_expires_after_the_ttl() {
    let redis = Redis::start();
    let settings = EventStoreSettings {
        ttl: Duration::from_secs(1),
        processing_lease: Duration::from_secs(20),
        ..settings(&redis.url())
    };
    let store = store(&settings);
    let message_id = MessageId::new();
    let stream_id = StreamId::for_pair(&UserId::parse("alice").expect("valid"), &UserId::parse("bob").expect("valid"));
    let key = store.message_key(&message_id, &stream_id);
    let expected = format!("eventstore:{}:{message_id}:{}", settings.key_prefix, stream_id.as_str());
    assert_eq!(key.as_str(), expected);
    assert_eq!(key, EventKey::for_message(&settings.key_prefix, &message_id, &stream_id));

    let mut conn = raw(&redis.url()).await;
    let token = acquired(store.claim(&key).await);
    assert_eq!(get(&mut conn, &expected).await.as_deref(), Some(token.as_str()));
    assert!(token.as_str().starts_with("processing:"), "{}", token.as_str());
    let lease_left = pttl(&mut conn, &expected).await;
    assert!((19_000..=20_000).contains(&lease_left), "lease PTTL {lease_left}");

    store.mark_done(&key, token).await;
    assert_eq!(get(&mut conn, &expected).await.as_deref(), Some("done"));
    let ttl_left = pttl(&mut conn, &expected).await;
    assert!((800..=1_000).contains(&ttl_left), "done PTTL {ttl_left}, configured 1s");
    assert_eq!(store.claim(&key).await, Claim::AlreadyDone);

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(get(&mut conn, &expected).await, None, "the marker expired");
    acquired(store.claim(&key).await);
}

#[tokio::test]
async fn markers_written_by_the_go_services_still_deduplicate() {
    let redis = Redis::start();
    let store = store(&settings(&redis.url()));
    let key = store.key("legacy-message", "legacy-stream");
    let mut conn = raw(&redis.url()).await;
    let _: () =
        redis::cmd("SET").arg(key.as_str()).arg("1").arg("EX").arg(60).query_async(&mut conn).await.expect("SET");
    assert_eq!(store.claim(&key).await, Claim::AlreadyDone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_of_two_racing_consumers_acquires() {
    let redis = Redis::start();
    let settings = settings(&redis.url());
    let a = store(&settings);
    let b = store(&settings);
    a.ping().await.expect("redis up");
    b.ping().await.expect("redis up");

    for round in 0..50 {
        let key = a.key(&format!("message-{round}"), "stream");
        let (first, second) = tokio::join!(
            tokio::spawn({
                let (a, key) = (a.clone(), key.clone());
                async move { a.claim(&key).await }
            }),
            tokio::spawn({
                let (b, key) = (b.clone(), key.clone());
                async move { b.claim(&key).await }
            }),
        );
        let outcomes = [first.expect("task"), second.expect("task")];
        let winners = outcomes.iter().filter(|c| matches!(c, Claim::Acquired(_))).count();
        let busy = outcomes.iter().filter(|c| matches!(c, Claim::InProgress)).count();
        assert_eq!((winners, busy), (1, 1), "round {round}: {outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_of_twenty_racing_pods_acquires_and_then_all_see_done() {
    const PODS: usize = 20;
    let redis = Redis::start();
    let settings = settings(&redis.url());
    let pods: Vec<RedisEventStore> = (0..PODS).map(|_| store(&settings)).collect();
    for pod in &pods {
        pod.ping().await.expect("redis up");
    }
    let key = pods[0].key(&MessageId::new().to_string(), "a83ab2505ace9a87");

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(PODS));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, pod) in pods.iter().enumerate() {
        let (pod, key, barrier) = (pod.clone(), key.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            (i, pod.claim(&key).await)
        });
    }
    let mut winner = None;
    let mut in_progress = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("task") {
            (i, Claim::Acquired(token)) => {
                assert!(winner.is_none(), "two pods acquired the same event");
                winner = Some((i, token));
            }
            (_, Claim::InProgress) => in_progress += 1,
            (i, other) => panic!("pod {i}: unexpected {other:?}"),
        }
    }
    let (i, token) = winner.expect("one pod acquires");
    assert_eq!(in_progress, PODS - 1);

    pods[i].mark_done(&key, token).await;
    for pod in &pods {
        assert_eq!(pod.claim(&key).await, Claim::AlreadyDone);
    }
}

#[tokio::test]
async fn a_released_claim_can_be_claimed_again() {
    let redis = Redis::start();
    let settings = settings(&redis.url());
    let (a, b) = (store(&settings), store(&settings));
    let key = a.key("message", "stream");

    let token = acquired(a.claim(&key).await);
    assert_eq!(b.claim(&key).await, Claim::InProgress, "a live lease keeps others off");
    a.release(&key, token).await;

    let token = acquired(b.claim(&key).await);
    b.mark_done(&key, token).await;
    assert_eq!(a.claim(&key).await, Claim::AlreadyDone);
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_and_a_stale_release_leaves_the_new_lease_alone() {
    let redis = Redis::start();
    let settings = EventStoreSettings { processing_lease: Duration::from_millis(300), ..settings(&redis.url()) };
    let (slow, fast, third) = (store(&settings), store(&settings), store(&settings));
    let key = slow.key("message", "stream");
    let mut conn = raw(&redis.url()).await;

    let stale = acquired(slow.claim(&key).await);
    assert_eq!(fast.claim(&key).await, Claim::InProgress);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fresh = acquired(fast.claim(&key).await);
    let fresh_value = fresh.as_str().to_owned();
    slow.release(&key, stale).await;
    assert_eq!(get(&mut conn, key.as_str()).await.as_deref(), Some(fresh_value.as_str()), "not deleted");
    assert_eq!(third.claim(&key).await, Claim::InProgress, "the new owner's lease survives a stale release");

    fast.mark_done(&key, fresh).await;
    assert_eq!(third.claim(&key).await, Claim::AlreadyDone);
}

#[tokio::test]
async fn marking_done_after_losing_the_lease_still_records_the_event() {
    let redis = Redis::start();
    let settings = EventStoreSettings { processing_lease: Duration::from_millis(200), ..settings(&redis.url()) };
    let (slow, other) = (store(&settings), store(&settings));
    let key = slow.key("message", "stream");

    let stale = acquired(slow.claim(&key).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let taken_over = acquired(other.claim(&key).await);

    // The slow consumer finished processing: the event is done, whoever holds the key.
    slow.mark_done(&key, stale).await;
    assert_eq!(other.claim(&key).await, Claim::AlreadyDone);
    // The other consumer then fails: its release must not erase the done marker.
    other.release(&key, taken_over).await;
    assert_eq!(slow.claim(&key).await, Claim::AlreadyDone);
}
