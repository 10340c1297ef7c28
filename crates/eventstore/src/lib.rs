//! The Redis event store that makes Kafka consumption idempotent.
//!
//! Why this crate exists: Kafka delivers at least once. A consumer that crashes before
//! committing its offset, or a partition that moves to another pod during a rebalance,
//! hands the same event to a consumer again, and without a shared memory of what was
//! handled, users would get the same chat message or e-mail twice. Every consumer in the
//! fleet (chat CDC, notifications, e-mail) needs that memory in the same, race-safe way,
//! so it lives here once.
//!
//! The protocol, per event key (see `docs/eventstore.md`):
//!
//! 1. [`RedisEventStore::claim`] takes a short processing lease (`SET NX PX`), or reports
//!    that the event is done already, or that another consumer is handling it right now;
//! 2. after handling, [`RedisEventStore::mark_done`] replaces the lease with a `done`
//!    marker that lives for the deduplication TTL;
//! 3. if handling failed, [`RedisEventStore::release`] drops the lease (only if it is
//!    still ours) so a retry can claim it again.
//!
//! Redis being down must not stop the fleet: every operation is bounded by a timeout and
//! *fails open* ([`Claim::Unavailable`]): the event is processed without deduplication,
//! which is logged once per outage and counted in metrics.
//!
//! ```ignore
//! let store = RedisEventStore::new(settings.event_store.clone())?;
//! let key = store.message_key(&message.id, &message.stream_id);
//! match store.claim(&key).await {
//!     Claim::AlreadyDone => {}                         // duplicate: skip, commit offset
//!     Claim::InProgress => return Err(RetryLater),     // someone else has it right now
//!     Claim::Unavailable => handle(&message).await?,   // fail open
//!     Claim::Acquired(token) => match handle(&message).await {
//!         Ok(()) => store.mark_done(&key, token).await,
//!         Err(e) => { store.release(&key, token).await; return Err(e) }
//!     },
//! }
//! ```

mod connection;
mod error;
mod health;
mod key;
mod settings;
mod store;

pub use connection::Connection as RedisConnection;
pub use error::EventStoreError;
pub use health::{METRIC_CLAIMS, METRIC_LEASE_LOST, METRIC_UNAVAILABLE, METRIC_UP};
pub use key::EventKey;
pub use settings::EventStoreSettings;
pub use store::{Claim, ClaimToken, RedisEventStore};
