//! The digest store against a real MongoDB wire server (nx-27017, the local stand-in):
//! deduplication, the item bound, compare-and-swap under concurrent writers, leases,
//! and completing a digest while new messages arrive.

use std::time::Duration;

use emailhandler::digest::{DigestItem, DigestStore, Enqueued};
use emailhandler::settings::MongoSettings;
use testkit::Mongo;

const WINDOW: Duration = Duration::from_millis(500);

async fn store(mongo: &Mongo, max_items: usize) -> DigestStore {
    let settings = MongoSettings { uri: mongo.uri(), database: testkit::unique("email"), ..MongoSettings::default() };
    let (_client, database) = emailhandler::store::connect(&settings).await.expect("client");
    let store = DigestStore::new(database.collection("email_digests"), Duration::from_secs(5), WINDOW, max_items);
    store.ensure_indexes().await;
    store
}

fn item(id: &str, at: i64) -> DigestItem {
    DigestItem {
        message_id: id.into(),
        stream_id: "0123456789abcdef".into(),
        sender_id: "alice".into(),
        sender_name: "Alice".into(),
        receiver_id: "bob".into(),
        content: format!("message {id}"),
        created_at: at,
        enqueued_at: at,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_are_deduplicated_bounded_and_scheduled_one_window_after_the_first() {
    let mongo = Mongo::start();
    let store = store(&mongo, 3).await;
    assert_eq!(store.enqueue("bob", item("m1", 1_000)).await.expect("enqueue"), Enqueued::Added);
    assert_eq!(store.enqueue("bob", item("m1", 1_100)).await.expect("enqueue"), Enqueued::AlreadyPending);
    assert_eq!(store.enqueue("bob", item("m2", 1_200)).await.expect("enqueue"), Enqueued::Added);
    assert_eq!(store.enqueue("bob", item("m3", 1_300)).await.expect("enqueue"), Enqueued::Added);
    assert_eq!(store.enqueue("bob", item("m4", 1_400)).await.expect("enqueue"), Enqueued::Overflow);

    let digest = store.get("bob").await.expect("get").expect("stored");
    let ids: Vec<&str> = digest.items.iter().map(|i| i.message_id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m3"]);
    assert_eq!(digest.overflow, 1);
    assert_eq!(digest.due_at, 1_500, "one window after the first item");

    assert!(store.due(1_499, 10).await.expect("due").is_empty(), "not due before its window ends");
    let due = store.due(1_500, 10).await.expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(store.pending().await.expect("count"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_lose_nothing() {
    let mongo = Mongo::start();
    let store = store(&mongo, 100).await;
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.enqueue("bob", item(&format!("m{i:02}"), 1_000 + i)).await })
        })
        .collect();
    for writer in writers {
        assert_eq!(writer.await.expect("task").expect("enqueue"), Enqueued::Added);
    }
    let digest = store.get("bob").await.expect("get").expect("stored");
    let mut ids: Vec<String> = digest.items.iter().map(|i| i.message_id.clone()).collect();
    ids.sort();
    let expected: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    assert_eq!(ids, expected, "every concurrent enqueue is in the digest exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_flusher_wins_the_lease_and_completion_keeps_late_arrivals() {
    let mongo = Mongo::start();
    let store = store(&mongo, 100).await;
    store.enqueue("bob", item("m1", 1_000)).await.expect("enqueue");
    store.enqueue("bob", item("m2", 1_100)).await.expect("enqueue");
    let due = store.due(2_000, 10).await.expect("due").pop().expect("due digest");

    let (a, b) = tokio::join!(
        store.claim(&due, "a", 2_000, Duration::from_secs(60)),
        store.claim(&due, "b", 2_000, Duration::from_secs(60))
    );
    let winners = [a.expect("claim a"), b.expect("claim b")].into_iter().flatten().count();
    assert_eq!(winners, 1, "exactly one flusher holds the digest");
    assert!(store.due(2_000, 10).await.expect("due").is_empty(), "a leased digest is not due");

    // A message arrives while the digest is being sent.
    store.enqueue("bob", item("m3", 2_100)).await.expect("enqueue");
    store.complete("bob", &["m1".into(), "m2".into()], 0).await.expect("complete");
    let left = store.get("bob").await.expect("get").expect("m3 is still pending");
    let ids: Vec<&str> = left.items.iter().map(|i| i.message_id.as_str()).collect();
    assert_eq!(ids, ["m3"]);
    assert_eq!(left.next_attempt_at, 2_100 + 500, "the late arrival gets its own window");
    assert_eq!(left.lease_until, 0, "the lease is released");

    store.reschedule("bob", 1, 9_000, "451 try again").await.expect("reschedule");
    let failed = store.get("bob").await.expect("get").expect("stored");
    assert_eq!((failed.attempts, failed.next_attempt_at), (1, 9_000));
    assert_eq!(failed.last_error, "451 try again");
    assert!(store.due(8_999, 10).await.expect("due").is_empty(), "backing off");

    store.complete("bob", &["m3".into()], 0).await.expect("complete");
    assert!(store.get("bob").await.expect("get").is_none(), "an empty digest is deleted");
    assert_eq!(store.pending().await.expect("count"), 0);
}
