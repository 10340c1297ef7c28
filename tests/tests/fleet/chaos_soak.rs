//! The chaos soak's one-minute version: the load generator's `--chaos` mode
//! (`chatfleet_tests::chaos`) against the debug binaries.
//!
//! Why this file exists: the ten-minute soak (docs/benchmarks.md) is run by hand; this
//! keeps its guarantees from regressing between runs. Each of the five services is
//! SIGKILLed and restarted once and Redis, the broker and MongoDB are each paused for
//! a few seconds while clients post, some without a `client_message_id`. Only
//! correctness is asserted (nothing lost, nothing stored twice, every service back),
//! never latency: CI machines are small and shared.

use std::time::Duration;

use chatfleet_tests::chaos::{self, ChaosFleet, ChaosOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minute_of_kills_and_pauses_loses_nothing_and_stores_nothing_twice() {
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let options = ChaosOptions {
        duration: Duration::from_secs(60),
        rate: 30,
        conversations: 24,
        rounds: 1,
        pause: Duration::from_secs(4),
        idless_every: 3,
        seed,
        drain: Duration::from_secs(120),
    };
    let fleet = ChaosFleet::start(&[]).await;
    let r = chaos::run(fleet, &options).await;
    let report = r.markdown();
    println!("{report}");
    assert_eq!(r.faults.len(), 8, "every service killed and every server paused once:\n{report}");
    assert!(r.accepted >= r.attempted * 9 / 10, "most posts were answered:\n{report}");
    assert!(r.accepted_idless > 0, "some clients posted without a client_message_id:\n{report}");
    assert_eq!(r.refused_posts, 0, "a valid post was refused:\n{report}");
    assert_eq!(r.stored_twice, 0, "stored twice:\n{report}");
    assert_eq!(r.accepted_not_stored, 0, "acknowledged but not stored:\n{report}");
    assert_eq!(r.lost, 0, "lost:\n{report}");
    assert_eq!(r.stored_once, r.accepted, "{report}");
    assert!(r.dead_at_end.is_empty(), "{report}");
}
