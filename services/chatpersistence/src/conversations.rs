//! Conversations in MongoDB: groups and their members, the per-user inbox
//! projection, read markers, and the conversation events capture carries.
//!
//! Why this module exists: the inbox (`GET /chat/conversations`) must answer fast
//! for a user with 10,000 conversations and stay exact under concurrency, and every
//! membership change must reach the sockets through the same capture path as
//! messages. The collections and the one rule that keeps them consistent:
//!
//! - `conversations` (one document per conversation, pair or group): `members`,
//!   `seq` (the number of messages, incremented atomically when a message is
//!   accepted, which gives the message its sequence number), `last_message`,
//!   `updated_at`, and `reads.<hex user id>`: the sequence number each member has
//!   read up to. Unread count = `seq − reads[user]`. Read markers use `$max`, so
//!   they only move forward and two markers racing end at the larger; a message
//!   racing a marker is counted as unread exactly when its sequence number is above
//!   the marker.
//! - `memberships` (one document per user and conversation, `_id` = `"<conversation>
//!   <user>"`): `active`, and `activity_at` (the conversation's last activity, for
//!   ordering the inbox by an index on `(user_id, activity_at)`). Every accepted
//!   message raises it with `$max` on all the conversation's memberships.
//! - `conversation_events` (insert-only): one document per change (member joined or
//!   left, title changed, read marker moved), marked `outbox_pending` for the relay
//!   (or captured by Debezium), published on `chat.changes` keyed by the
//!   conversation id.
//!
//! Dates are stored as epoch milliseconds (integers): they sort the same on every
//! server, including the local stand-in, which stores dates set by updates as text.

use std::collections::{HashMap, HashSet};

use chatstream::{
    ConversationEvent, ConversationEventKind, MessageId, StreamId, UserId, CONVERSATION_EVENTS_COLLECTION,
};
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// The key of a user's entry in `reads` (field names may not contain `.`).
pub(crate) fn read_key(user: &UserId) -> String {
    format!("reads.{}", hex::encode(user.as_str()))
}

/// The last message of a conversation, as the inbox shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastMessage {
    pub message_id: String,
    pub sender_id: String,
    pub excerpt: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Epoch milliseconds; set when the message was deleted (its excerpt is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<i64>,
}

/// A conversation document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationDoc {
    #[serde(rename = "_id")]
    pub id: String,
    /// `direct` or `group`.
    pub kind: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub owner_id: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub seq: i64,
    #[serde(default)]
    pub last_message: Option<LastMessage>,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub updated_at: i64,
    #[serde(default)]
    pub reads: HashMap<String, i64>,
}

impl ConversationDoc {
    pub fn has_member(&self, user: &UserId) -> bool {
        self.members.iter().any(|m| m == user.as_str())
    }

    /// Sequence number `user` has read up to.
    pub fn read_seq(&self, user: &UserId) -> i64 {
        self.reads.get(&hex::encode(user.as_str())).copied().unwrap_or(0)
    }

    pub fn unread(&self, user: &UserId) -> i64 {
        (self.seq - self.read_seq(user)).max(0)
    }

    fn member_ids(&self) -> Vec<UserId> {
        self.members.iter().filter_map(|m| UserId::parse(m).ok()).collect()
    }
}

/// One inbox row (a membership).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub user_id: String,
    pub conversation_id: String,
    #[serde(default, deserialize_with = "active_flag")]
    pub active: bool,
    pub activity_at: i64,
}

fn active_flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(mongokit::lenient_bool(deserializer)?.unwrap_or(false))
}

/// A page of a user's conversations, most recent activity first.
pub struct InboxPage {
    pub rows: Vec<(MembershipDoc, ConversationDoc)>,
    pub has_more: bool,
}

/// Where an inbox page starts: strictly older than this `(activity_at, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxCursor {
    pub activity_at: i64,
    pub conversation_id: String,
}

/// What a message write learned from its conversation.
pub struct Accepted {
    pub seq: i64,
    /// The members other than the sender (groups; empty for pairs).
    pub recipients: Vec<UserId>,
}

/// Why a conversation operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error("not a member of this conversation")]
    NotAMember,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The conversation collections.
#[derive(Clone)]
pub struct Conversations {
    store: Store,
    conversations: Collection<ConversationDoc>,
    memberships: Collection<MembershipDoc>,
    events: Collection<Document>,
    /// Set when the outbox relay runs: events carry its marker.
    outbox: bool,
    /// Wakes the event relay after an event was written.
    wake: std::sync::Arc<tokio::sync::Notify>,
    /// Each conversation's last sequence number this process wrote.
    seq_cache: std::sync::Arc<SeqCache>,
    /// Inbox activity waiting to be written.
    activity: std::sync::Arc<Activity>,
}

/// The last sequence number this process gave each conversation (bounded: forgotten
/// wholesale when full; a miss costs one extra write).
#[derive(Default)]
struct SeqCache(std::sync::Mutex<HashMap<String, i64>>);

impl SeqCache {
    const MAX: usize = 100_000;

    fn next(&self, id: &StreamId) -> Option<i64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(id.as_str()).map(|seq| seq + 1)
    }

    fn set(&self, id: &StreamId, seq: i64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX && !map.contains_key(id.as_str()) {
            map.clear();
        }
        map.insert(id.to_string(), seq);
    }
}

/// Inbox activity (`memberships.activity_at`) is written in batches: one `update`
/// command per flush for the conversations that had messages since the last,
/// instead of one write per message. The inbox order lags by at most
/// a conversation's interval (below) for other members; a list request first
/// writes its caller's own rows of every conversation not written yet, so a user's
/// own inbox shows what this process accepted at once. A crash loses at most that
/// much ordering (the next message repairs it).
///
/// What a flush costs is the membership rows it rewrites, so it is kept small and
/// sliced:
/// - rows are addressed by `_id` (`"<conversation> <user>"`, from the member list
///   the message write already read), never by a scan of `conversation_id`;
/// - one command rewrites at most [`ACTIVITY_ROWS_PER_COMMAND`] rows, so a large
///   group's flush is many short commands other requests interleave with, not
///   one long one that stalls a single-threaded server (measured on the local
///   stand-in: 1,000 rows in one `update_many` held it for 140 ms, 100 rows for
///   16 ms), and the background flush paces them (see
///   [`Conversations::flush_activity`]);
/// - a busy conversation is written at most once per [`ACTIVITY_MIN_INTERVAL`], and
///   a large group much less often (the interval grows with the square of its
///   slices of [`ACTIVITY_ROWS_PER_INTERVAL`] members, at most
///   [`ACTIVITY_MAX_INTERVAL`]), so a busy group's background writes per second
///   shrink as it grows (a 1,000-member group: 1,000 rows a minute). Its rows are
///   already near the top of its members' inboxes, and a list request writes its
///   caller's own row at once (see [`Conversations::flush_for`]); only a list
///   served by another replica sees the older time, by at most that interval.
#[derive(Default)]
struct Activity(std::sync::Mutex<ActivityState>);

/// A conversation's activity waiting to be written.
#[derive(Clone)]
struct PendingActivity {
    at: i64,
    /// The members whose rows move (`None`: not known; then all of the
    /// conversation's active rows, found by `conversation_id`).
    members: Option<std::sync::Arc<[String]>>,
}

/// Which pending activity a flush takes.
#[derive(Debug, Clone, Copy)]
enum Take {
    /// The background flush: what is past its conversation's interval, oldest
    /// first, up to `max_rows` rows (at least one conversation), so what a paced
    /// flush holds in flight (and a list request may owe its caller) stays small.
    Due { max_rows: usize },
    /// Shutdown: everything.
    All,
}

#[derive(Default)]
struct ActivityState {
    pending: HashMap<String, PendingActivity>,
    /// Taken by a flush that has not finished writing them (a paced flush of a
    /// large group takes a while): a list request still writes its caller's rows.
    in_flight: HashMap<String, PendingActivity>,
    /// Per conversation, the users whose own row a list request already brought up
    /// to this time: not owed to them again (a user listing 50 times a second
    /// writes each of their rows once, not on every request).
    written_for: HashMap<String, (i64, HashSet<String>)>,
    /// When each recently flushed conversation may be written again.
    next_allowed: HashMap<String, std::time::Instant>,
}

/// How often pending inbox activity is written.
pub const ACTIVITY_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);
/// The least time between two activity writes of one conversation.
pub const ACTIVITY_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest a large group's activity waits (a list request writes its caller's
/// row at once).
pub const ACTIVITY_MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Membership rows one flush command rewrites at most.
pub const ACTIVITY_ROWS_PER_COMMAND: usize = 25;
/// A group of `n` such slices of members waits `n²` times [`ACTIVITY_MIN_INTERVAL`].
pub const ACTIVITY_ROWS_PER_INTERVAL: usize = 100;
/// Rows the background flush takes per tick at most (one conversation more if
/// the first is larger).
pub const ACTIVITY_ROWS_PER_FLUSH: usize = 250;
/// A paced flush pauses this many times as long as each command took: it takes
/// at most a quarter of the database's time while it lasts.
pub const ACTIVITY_PAUSE_FACTOR: u32 = 3;
/// The longest pause between two commands of a paced flush (a command that took
/// longer than this was slow for another reason; waiting as long helps nobody).
pub const ACTIVITY_MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

impl PendingActivity {
    fn rows(&self) -> usize {
        self.members.as_ref().map_or(ACTIVITY_ROWS_PER_INTERVAL, |m| m.len())
    }

    /// How long until this conversation's rows may be written again: the square
    /// of its slices of members (1 s up to 100 members, 4 s up to 200, 25 s up to
    /// 500, a minute from 800), so a busy group's rows per second fall as it grows.
    /// Sent every 10 s, a 1,000-member group's rows were the slowest messages of
    /// the group benchmark on a slow host, at every flush.
    fn interval(&self) -> std::time::Duration {
        let slices = self.rows().div_ceil(ACTIVITY_ROWS_PER_INTERVAL).clamp(1, 1_000) as u32;
        (ACTIVITY_MIN_INTERVAL * slices.saturating_mul(slices)).min(ACTIVITY_MAX_INTERVAL)
    }
}

impl Activity {
    fn touch(&self, id: &StreamId, at: i64, members: Option<std::sync::Arc<[String]>>) {
        self.put(id.to_string(), PendingActivity { at, members });
    }

    /// Like `touch`, but copies the member list only when the pending entry has none
    /// yet (a busy group's next messages just raise the time).
    fn touch_members(&self, id: &StreamId, at: i64, members: &[String]) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match state.pending.get_mut(id.as_str()) {
            Some(entry) if entry.members.is_some() => entry.at = entry.at.max(at),
            _ => {
                drop(state);
                self.touch(id, at, Some(members.iter().cloned().collect()));
            }
        }
    }

    fn put(&self, id: String, activity: PendingActivity) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match state.pending.get_mut(&id) {
            Some(entry) => {
                entry.at = entry.at.max(activity.at);
                // The newest member list wins (a member added since moves up too).
                if activity.members.is_some() {
                    entry.members = activity.members;
                }
            }
            None => {
                state.pending.insert(id, activity);
            }
        }
    }

    /// The pending activity a flush writes now (see [`Take`]); what it takes stays
    /// visible to [`Activity::owed_to`] until [`Activity::done`].
    fn take(&self, mode: Take) -> Vec<(String, PendingActivity)> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        state.next_allowed.retain(|_, at| *at > now);
        let ActivityState { pending, next_allowed, in_flight, .. } = &mut *state;
        let mut due: Vec<(&String, &PendingActivity)> = pending
            .iter()
            .filter(|(id, _)| match mode {
                Take::All => true,
                Take::Due { .. } => !next_allowed.contains_key(id.as_str()),
            })
            .collect();
        if let Take::Due { max_rows } = mode {
            // Oldest first, and no more than `max_rows` (but at least one
            // conversation): the rest waits for the next tick.
            due.sort_by_key(|(_, activity)| activity.at);
            let mut rows = 0;
            due.retain(|(_, activity)| {
                let keep = rows == 0 || rows + activity.rows() <= max_rows;
                if keep {
                    rows += activity.rows();
                }
                keep
            });
        }
        let due: Vec<String> = due.into_iter().map(|(id, _)| id.clone()).collect();
        let mut out = Vec::with_capacity(due.len());
        for id in due {
            if let Some(activity) = pending.remove(&id) {
                next_allowed.insert(id.clone(), now + activity.interval());
                in_flight.insert(id.clone(), activity.clone());
                out.push((id, activity));
            }
        }
        out
    }

    /// A flush is over: what it took is written (or back in `pending`).
    fn done(&self, flushed: &[(String, PendingActivity)]) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (id, _) in flushed {
            state.in_flight.remove(id);
            if !state.pending.contains_key(id) {
                state.written_for.remove(id);
            }
        }
    }

    /// A list request wrote `user`'s own rows up to these times (`owed`, from
    /// [`Activity::owed_to`]).
    fn written_for(&self, user: &str, owed: &[(String, i64, bool)]) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (id, at, _) in owed {
            let entry = state.written_for.entry(id.clone()).or_insert_with(|| (*at, HashSet::new()));
            if entry.0 < *at {
                *entry = (*at, HashSet::new());
            }
            if entry.0 == *at {
                entry.1.insert(user.to_owned());
            }
        }
    }

    /// `user`'s own rows whose activity is not written yet (waiting, or in a flush
    /// that has not reached them) and that no earlier list request of theirs
    /// wrote: the conversation, its time, and whether its member list is known
    /// (then `user` is in it).
    fn owed_to(&self, user: &str) -> Vec<(String, i64, bool)> {
        let state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut owed: HashMap<&str, (i64, bool)> = HashMap::new();
        for (id, activity) in state.pending.iter().chain(state.in_flight.iter()) {
            let known = match &activity.members {
                Some(members) if members.iter().any(|m| m == user) => true,
                Some(_) => continue,
                None => false,
            };
            let entry = owed.entry(id.as_str()).or_insert((activity.at, known));
            entry.0 = entry.0.max(activity.at);
        }
        owed.retain(|id, (at, _)| {
            !state.written_for.get(*id).is_some_and(|(written, users)| written >= at && users.contains(user))
        });
        owed.into_iter().map(|(id, (at, known))| (id.to_owned(), at, known)).collect()
    }
}

/// The `update` statements that bring `user`'s own rows up to the activity owed
/// to them (see [`Activity::owed_to`]); each rewrites at most one row.
fn own_rows_statements(user: &str, owed: &[(String, i64, bool)]) -> Vec<Document> {
    owed.iter()
        .map(|(id, at, known)| {
            let mut q = if *known {
                doc! { "_id": { "$eq": format!("{id} {user}") } }
            } else {
                doc! { "conversation_id": { "$eq": id }, "user_id": { "$eq": user } }
            };
            q.insert("active", doc! { "$eq": true });
            q.insert("activity_at", doc! { "$lt": at });
            doc! { "q": q, "u": { "$max": { "activity_at": at } }, "multi": false, "upsert": false }
        })
        .collect()
}

/// The `update` commands of one flush: whole conversations share a command while
/// it stays within [`ACTIVITY_ROWS_PER_COMMAND`] rows, a large group's slices go
/// one per command. Each command comes with the indexes (in `pending`) of the
/// conversations it writes, to put back if it fails.
fn pack_activity(pending: &[(String, PendingActivity)]) -> Vec<(Vec<Document>, Vec<usize>)> {
    let mut commands: Vec<(Vec<Document>, Vec<usize>)> = Vec::new();
    let mut rows_in_last = 0;
    for (index, (id, activity)) in pending.iter().enumerate() {
        for (statement, rows) in activity_statements(id, activity) {
            if commands.is_empty() || rows_in_last + rows > ACTIVITY_ROWS_PER_COMMAND {
                commands.push((Vec::new(), Vec::new()));
                rows_in_last = 0;
            }
            if let Some((statements, owners)) = commands.last_mut() {
                statements.push(statement);
                if owners.last() != Some(&index) {
                    owners.push(index);
                }
            }
            rows_in_last += rows;
        }
    }
    commands
}

/// One `update` statement of an activity flush and the rows it may rewrite.
fn activity_statements(id: &str, activity: &PendingActivity) -> Vec<(Document, usize)> {
    let update = doc! { "$max": { "activity_at": activity.at } };
    match &activity.members {
        None => {
            let q = doc! { "conversation_id": { "$eq": id }, "active": { "$eq": true } };
            vec![(doc! { "q": q, "u": update, "multi": true, "upsert": false }, ACTIVITY_ROWS_PER_COMMAND)]
        }
        Some(members) => members
            .chunks(ACTIVITY_ROWS_PER_COMMAND)
            .map(|chunk| {
                let ids: Vec<String> = chunk.iter().map(|m| format!("{id} {m}")).collect();
                // Rows already at this time or later are matched but not rewritten.
                let q =
                    doc! { "_id": { "$in": ids }, "active": { "$eq": true }, "activity_at": { "$lt": activity.at } };
                (doc! { "q": q, "u": update.clone(), "multi": true, "upsert": false }, chunk.len())
            })
            .collect(),
    }
}

/// Statements (one row each) of one command of a list request's own-rows flush.
const OWN_ROWS_PER_COMMAND: usize = 500;

/// Documents one bulk write carries at most (group creation).
const BULK_CHUNK: usize = 100;

/// The filter and update that make `user`'s inbox row of `conversation` exist,
/// `active` or not, with its activity at least `at`.
fn membership_upsert(conversation: &StreamId, user: &UserId, active: bool, at: i64) -> (Document, Document) {
    let update = doc! {
        "$set": { "user_id": user.as_str(), "conversation_id": conversation.as_str(), "active": active },
        "$max": { "activity_at": at },
    };
    (doc! { "_id": { "$eq": membership_id(conversation, user) } }, update)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn membership_id(conversation: &StreamId, user: &UserId) -> String {
    format!("{conversation} {user}")
}

impl Conversations {
    pub fn new(store: Store, outbox: bool) -> Self {
        Self {
            conversations: store.typed_collection("conversations"),
            memberships: store.typed_collection("memberships"),
            events: store.collection(CONVERSATION_EVENTS_COLLECTION),
            store,
            outbox,
            wake: Default::default(),
            seq_cache: Default::default(),
            activity: Default::default(),
        }
    }

    /// Writes the pending inbox activity in `update` commands of at most
    /// [`ACTIVITY_ROWS_PER_COMMAND`] rows each. What was not written is put back
    /// for the next flush.
    ///
    /// `paced` (the background flush): after each command it waits
    /// [`ACTIVITY_PAUSE_FACTOR`] times as long as the command took before sending
    /// the next, so a large group's flush takes at most a quarter of the
    /// database's time while it lasts (and leaves the CPU it shares with the
    /// services alone). Sent back to back, a
    /// 1,000-member group's ten commands held the single-threaded stand-in for
    /// 160 ms every 10 s, and every message written meanwhile (its two writes
    /// under the conversation's lock queued behind them) reached the sockets
    /// 60-100 ms late: the slowest messages of the group benchmark, in clusters
    /// at the start and every 10 s. A list request's flush is not paced: the
    /// caller waits for it.
    async fn flush_activity(&self, take: Take, paced: bool) -> Result<(), StoreError> {
        let pending = self.activity.take(take);
        if pending.is_empty() {
            return Ok(());
        }
        let commands = pack_activity(&pending);
        let last = commands.len().saturating_sub(1);
        let mut failed: Option<StoreError> = None;
        let mut unwritten: HashSet<usize> = HashSet::new();
        for (index, (statements, owners)) in commands.into_iter().enumerate() {
            if failed.is_some() {
                unwritten.extend(owners);
                continue;
            }
            let started = std::time::Instant::now();
            if let Err(err) = self.update_memberships(statements, false).await {
                unwritten.extend(owners);
                failed = Some(err);
            } else if paced && index < last {
                tokio::time::sleep((started.elapsed() * ACTIVITY_PAUSE_FACTOR).min(ACTIVITY_MAX_PAUSE)).await;
            }
        }
        for (index, (id, activity)) in pending.iter().enumerate() {
            if unwritten.contains(&index) {
                self.activity.put(id.clone(), activity.clone());
            }
        }
        self.activity.done(&pending);
        failed.map_or(Ok(()), Err)
    }

    /// What a list request writes first, so the caller's inbox shows what this
    /// process accepted at once: `user`'s own rows of every conversation whose
    /// activity is not written yet (waiting its interval, or held by a paced
    /// flush), each once, and nobody else's. A list request neither waits for nor
    /// does a flush, and a client listing as fast as the read limit allows makes
    /// no more writes than one that lists once.
    async fn flush_for(&self, user: &UserId) -> Result<(), StoreError> {
        let owed = self.activity.owed_to(user.as_str());
        for chunk in own_rows_statements(user.as_str(), &owed).chunks(OWN_ROWS_PER_COMMAND) {
            self.update_memberships(chunk.to_vec(), false).await?;
        }
        self.activity.written_for(user.as_str(), &owed);
        Ok(())
    }

    /// One `update` command of several statements on `memberships` (one round trip).
    async fn update_memberships(&self, statements: Vec<Document>, ordered: bool) -> Result<(), StoreError> {
        let command = doc! { "update": self.memberships.name(), "updates": statements, "ordered": ordered };
        let db = self.memberships.client().database(&self.memberships.namespace().db);
        self.store.run(db.run_command(command)).await.map(|_| ())
    }

    /// Flushes inbox activity every [`ACTIVITY_FLUSH`] until shutdown (and once more then).
    pub async fn run_activity(self, shutdown: servicekit::Shutdown) -> Result<(), String> {
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(ACTIVITY_FLUSH) => {}
            }
            let due = Take::Due { max_rows: ACTIVITY_ROWS_PER_FLUSH };
            if let Err(err) = self.flush_activity(due, true).await {
                metrics::counter!("inbox_activity_flush_failures_total").increment(1);
                tracing::warn!(error = %err, "inbox activity not written yet; retrying");
            }
        }
        let _ = self.flush_activity(Take::All, false).await;
        Ok(())
    }

    /// Moves conversation `id` up in its members' inboxes (batched; the write-behind
    /// writer's share of [`Conversations::accept_message`]).
    ///
    /// `members`: the conversation's members when the caller knows them (`None`
    /// only for a document without a member list).
    pub(crate) fn touch_activity(&self, id: &StreamId, at: i64, members: Option<&[String]>) {
        match members {
            Some(members) => self.activity.touch_members(id, at, members),
            None => self.activity.touch(id, at, None),
        }
    }

    /// Notified whenever an event was written (the relay's fast path).
    pub fn wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    pub fn events(&self) -> &Collection<Document> {
        &self.events
    }

    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let inbox = IndexModel::builder()
            .keys(doc! { "user_id": 1, "activity_at": -1 })
            .options(IndexOptions::builder().name("inbox".to_owned()).build())
            .build();
        let by_conversation = IndexModel::builder()
            .keys(doc! { "conversation_id": 1 })
            .options(IndexOptions::builder().name("by_conversation".to_owned()).build())
            .build();
        self.store.run(self.memberships.create_index(inbox)).await?;
        self.store.run(self.memberships.create_index(by_conversation)).await?;
        let pending = IndexModel::builder()
            // Not `_id`: the local stand-in cannot index it inside a compound key.
            .keys(doc! { "outbox_pending": 1, "event_id": 1 })
            .options(
                IndexOptions::builder()
                    .name("outbox_pending_by_event".to_owned())
                    .partial_filter_expression(doc! { "outbox_pending": true })
                    .build(),
            )
            .build();
        self.store.run(self.events.create_index(pending)).await?;
        Ok(())
    }

    pub async fn get(&self, id: &StreamId) -> Result<Option<ConversationDoc>, StoreError> {
        self.store.run(self.conversations.find_one(doc! { "_id": { "$eq": id.as_str() } })).await
    }

    /// The conversation if `user` is a current member; strangers and unknown ids
    /// get the same error.
    pub async fn for_member(&self, id: &StreamId, user: &UserId) -> Result<ConversationDoc, ConversationError> {
        match self.get(id).await? {
            Some(conversation) if conversation.has_member(user) => Ok(conversation),
            _ => Err(ConversationError::NotAMember),
        }
    }

    /// Applies `update` to conversation `id` and returns it as it is afterwards.
    async fn update_conversation(&self, id: &StreamId, update: Document) -> Result<ConversationDoc, ConversationError> {
        let filter = doc! { "_id": { "$eq": id.as_str() } };
        let update = self.conversations.find_one_and_update(filter, update).return_document(ReturnDocument::After);
        self.store.run(update).await?.ok_or(ConversationError::NotAMember)
    }

    fn event_document(&self, event: &ConversationEvent) -> Result<Document, StoreError> {
        let mut document = mongodb::bson::to_document(event).map_err(|e| StoreError::Other(e.to_string()))?;
        document.insert("_id", event.event_id.clone());
        document.remove("event_id");
        document.insert("event_id", event.event_id.clone());
        document.insert("at", event.at.timestamp_millis());
        if self.outbox {
            document.insert("outbox_pending", true);
        }
        Ok(document)
    }

    async fn append_event(&self, event: &ConversationEvent) -> Result<(), StoreError> {
        let document = self.event_document(event)?;
        self.store.run(self.events.insert_one(document)).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Appends `events` in order, [`BULK_CHUNK`] per round trip.
    async fn append_events(&self, events: &[ConversationEvent]) -> Result<(), StoreError> {
        for chunk in events.chunks(BULK_CHUNK) {
            let documents = chunk.iter().map(|e| self.event_document(e)).collect::<Result<Vec<_>, _>>()?;
            self.store.run(self.events.insert_many(documents).ordered(true)).await?;
        }
        self.wake.notify_one();
        Ok(())
    }

    fn event(
        &self,
        kind: ConversationEventKind,
        conversation: &ConversationDoc,
        user: &UserId,
        actor: &UserId,
    ) -> Result<ConversationEvent, StoreError> {
        Ok(ConversationEvent {
            event_id: MessageId::new().to_string(),
            kind,
            conversation_id: StreamId::parse(&conversation.id).map_err(|e| StoreError::Other(e.to_string()))?,
            user_id: user.clone(),
            actor_id: actor.clone(),
            members: conversation.member_ids(),
            title: conversation.title.clone(),
            up_to: None,
            reason: None,
            message_id: None,
            emoji: None,
            at: Utc::now(),
        })
    }

    pub(crate) async fn upsert_membership(
        &self,
        conversation: &StreamId,
        user: &UserId,
        active: bool,
        at: i64,
    ) -> Result<(), StoreError> {
        let (filter, update) = membership_upsert(conversation, user, active, at);
        self.store.run(self.memberships.update_one(filter, update).upsert(true)).await.map(|_| ())
    }

    /// Creates a group owned by `owner` with `members` (the owner included).
    pub async fn create_group(
        &self,
        owner: &UserId,
        title: &str,
        members: &[UserId],
    ) -> Result<ConversationDoc, ConversationError> {
        let id = StreamId::new_group();
        let now = now_ms();
        let conversation = ConversationDoc {
            id: id.to_string(),
            kind: "group".into(),
            title: Some(title.to_owned()),
            owner_id: Some(owner.to_string()),
            members: members.iter().map(ToString::to_string).collect(),
            seq: 0,
            last_message: None,
            created_at: now,
            updated_at: now,
            reads: HashMap::new(),
        };
        self.store.run(self.conversations.insert_one(&conversation)).await?;
        // Every member's inbox row and `member_joined` event, in a few round trips
        // rather than two per member (a 256-member group was 512 sequential writes).
        for chunk in members.chunks(BULK_CHUNK) {
            let statements: Vec<Document> = chunk
                .iter()
                .map(|member| {
                    let (filter, update) = membership_upsert(&id, member, true, now);
                    doc! { "q": filter, "u": update, "upsert": true, "multi": false }
                })
                .collect();
            self.update_memberships(statements, true).await?;
        }
        let events = members
            .iter()
            .map(|member| self.event(ConversationEventKind::MemberJoined, &conversation, member, owner))
            .collect::<Result<Vec<_>, _>>()?;
        self.append_events(&events).await?;
        Ok(conversation)
    }

    /// Adds `user` to a group (owner only). Adding a current member changes nothing.
    pub async fn add_member(
        &self,
        id: &StreamId,
        actor: &UserId,
        user: &UserId,
        max_members: usize,
    ) -> Result<ConversationDoc, ConversationError> {
        let current = self.for_member(id, actor).await?;
        if current.owner_id.as_deref() != Some(actor.as_str()) {
            return Err(ConversationError::Forbidden("only the owner may add members"));
        }
        if current.has_member(user) {
            return Ok(current);
        }
        if current.members.len() >= max_members {
            return Err(ConversationError::Invalid(format!("a group has at most {max_members} members")));
        }
        // The new member starts with nothing unread.
        let update = doc! {
            "$addToSet": { "members": user.as_str() },
            "$max": { read_key(user): current.seq, "updated_at": now_ms() },
        };
        let updated = self.update_conversation(id, update).await?;
        self.upsert_membership(id, user, true, updated.updated_at).await?;
        let event = self.event(ConversationEventKind::MemberJoined, &updated, user, actor)?;
        self.append_event(&event).await?;
        Ok(updated)
    }

    /// Removes `user` (the owner removing someone, or a member leaving). An owner
    /// who leaves hands the group to the longest-standing remaining member.
    pub async fn remove_member(&self, id: &StreamId, actor: &UserId, user: &UserId) -> Result<(), ConversationError> {
        let current = self.for_member(id, actor).await?;
        if current.kind != "group" {
            return Err(ConversationError::Invalid("members of a direct conversation cannot change".into()));
        }
        let is_owner = current.owner_id.as_deref() == Some(actor.as_str());
        if actor != user && !is_owner {
            return Err(ConversationError::Forbidden("only the owner may remove other members"));
        }
        if !current.has_member(user) {
            return Err(ConversationError::NotAMember);
        }
        let mut set = doc! { "updated_at": now_ms() };
        if current.owner_id.as_deref() == Some(user.as_str()) {
            let heir = current.members.iter().find(|m| m.as_str() != user.as_str()).cloned();
            set.insert("owner_id", heir.map_or(Bson::Null, Bson::String));
        }
        let updated = self.update_conversation(id, doc! { "$pull": { "members": user.as_str() }, "$set": set }).await?;
        self.upsert_membership(id, user, false, updated.updated_at).await?;
        let mut event = self.event(ConversationEventKind::MemberLeft, &updated, user, actor)?;
        event.reason = Some(if actor == user { "left" } else { "removed" }.to_owned());
        self.append_event(&event).await?;
        Ok(())
    }

    /// Renames a group (owner only).
    pub async fn rename(
        &self,
        id: &StreamId,
        actor: &UserId,
        title: &str,
    ) -> Result<ConversationDoc, ConversationError> {
        let current = self.for_member(id, actor).await?;
        if current.owner_id.as_deref() != Some(actor.as_str()) {
            return Err(ConversationError::Forbidden("only the owner may rename the group"));
        }
        let updated = self.update_conversation(id, doc! { "$set": { "title": title, "updated_at": now_ms() } }).await?;
        let event = self.event(ConversationEventKind::ConversationUpdated, &updated, actor, actor)?;
        self.append_event(&event).await?;
        Ok(updated)
    }

    /// Keeps the inbox honest after an edit or a deletion: while `message` is still
    /// its conversation's last message, the list shows the edited excerpt, or an
    /// empty one with `deleted_at` for a deletion. When a later message has replaced
    /// it, the filter matches nothing and nothing changes. Called under the
    /// conversation's write lock.
    pub async fn revise_last_message(
        &self,
        message: &chatstream::ChatMessage,
        deleted_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let last = LastMessage {
            message_id: message.message_id.to_string(),
            sender_id: message.sender_id.to_string(),
            excerpt: if deleted_at.is_some() { String::new() } else { crate::api::excerpt(&message.content) },
            created_at: message.created_at.timestamp_millis(),
            deleted_at,
        };
        let last = mongodb::bson::to_bson(&last).map_err(|e| StoreError::Other(e.to_string()))?;
        let filter = doc! {
            "_id": { "$eq": message.stream_id.as_str() },
            "last_message.message_id": { "$eq": message.message_id.to_string() },
        };
        self.store.run(self.conversations.update_one(filter, doc! { "$set": { "last_message": last } })).await?;
        Ok(())
    }

    /// Records an accepted message: the conversation's counter and last message,
    /// every member's inbox activity, and the sender's own read marker. For a pair
    /// the conversation and both memberships are created on its first message.
    /// Called under the conversation's write lock, before the message is inserted.
    pub async fn accept_message(
        &self,
        id: &StreamId,
        sender: &UserId,
        pair_peer: Option<&UserId>,
        message_id: &MessageId,
        excerpt: &str,
        at: i64,
    ) -> Result<Accepted, ConversationError> {
        let last = LastMessage {
            message_id: message_id.to_string(),
            sender_id: sender.to_string(),
            excerpt: excerpt.to_owned(),
            created_at: at,
            deleted_at: None,
        };
        let last = mongodb::bson::to_bson(&last).map_err(|e| StoreError::Other(e.to_string()))?;
        let mut set = doc! { "last_message": last, "updated_at": at };
        let mut filter = doc! { "_id": { "$eq": id.as_str() } };
        let upsert = if let Some(peer) = pair_peer {
            let mut members = [sender.to_string(), peer.to_string()];
            members.sort();
            // The pair is part of the match: under the legacy id format another pair
            // can share the id, and must never share (or overwrite) this document.
            let pair_key = members.join(" ");
            filter.insert("pair_key", doc! { "$eq": &pair_key });
            // Plain `$set` rather than `$setOnInsert`: a pair's members never change.
            set.insert("pair_key", pair_key);
            set.insert("kind", "direct");
            set.insert("members", members.to_vec());
            true
        } else {
            // Only a current member's message counts (and is accepted).
            filter.insert("members", sender.as_str());
            false
        };
        // The sender has read their own message. The number it gets is known ahead
        // from this process's last write to the conversation (it holds the
        // conversation's write lock); a wrong guess (another replica wrote in
        // between, or a cold cache) is corrected below with one more write.
        let guess = self.seq_cache.next(id);
        let mut update = doc! { "$inc": { "seq": 1_i64 }, "$set": set };
        if let Some(guess) = guess {
            update.insert("$max", doc! { read_key(sender): guess });
        }
        let found = self
            .store
            .run(
                self.conversations
                    .find_one_and_update(filter, update)
                    .upsert(upsert)
                    .return_document(ReturnDocument::After),
            )
            .await;
        let updated = match found {
            Ok(Some(updated)) => updated,
            // Another pair owns this (legacy, colliding) id: the message is stored and
            // delivered, but only the pair that owns the id gets an inbox entry. (The
            // upsert fails with a duplicate `_id`; some servers answer "no document".)
            Ok(None) | Err(StoreError::Duplicate(_)) if pair_peer.is_some() => {
                metrics::counter!("legacy_stream_id_collisions_total").increment(1);
                tracing::warn!(conversation = %id, "legacy stream id shared by two pairs; no inbox entry for the second");
                return Ok(Accepted { seq: 0, recipients: Vec::new() });
            }
            Ok(None) => return Err(ConversationError::NotAMember),
            Err(err) => return Err(err.into()),
        };
        let seq = updated.seq;
        self.seq_cache.set(id, seq);
        if guess != Some(seq) {
            metrics::counter!("conversation_seq_cache_misses_total").increment(1);
            let own = doc! { "$max": { read_key(sender): seq } };
            self.store.run(self.conversations.update_one(doc! { "_id": { "$eq": id.as_str() } }, own)).await?;
        }
        if seq == 1 {
            // A new conversation: its creation time and, for a pair, both inbox rows.
            let created = doc! { "$set": { "created_at": at } };
            self.store.run(self.conversations.update_one(doc! { "_id": { "$eq": id.as_str() } }, created)).await?;
            if pair_peer.is_some() {
                for member in updated.member_ids() {
                    self.upsert_membership(id, &member, true, at).await?;
                }
            }
        }
        // Every member's inbox moves this conversation up: batched in the background.
        self.activity.touch_members(id, at, &updated.members);
        let recipients = if pair_peer.is_some() {
            Vec::new()
        } else {
            updated.member_ids().into_iter().filter(|m| m != sender).collect()
        };
        Ok(Accepted { seq, recipients })
    }

    /// Whether `a` and `b` are members of one conversation: a pair conversation
    /// between them (its document exists once either wrote to the other) or a group
    /// both are current members of. What presence look-ups are allowed on.
    pub async fn share_a_conversation(
        &self,
        format: chatstream::StreamIdFormat,
        a: &UserId,
        b: &UserId,
    ) -> Result<bool, StoreError> {
        if a == b {
            return Ok(true);
        }
        let mut pair = [a.as_str(), b.as_str()];
        pair.sort_unstable();
        let pair_id = StreamId::for_pair_as(format, a, b);
        let direct = doc! { "_id": { "$eq": pair_id.as_str() }, "pair_key": { "$eq": pair.join(" ") } };
        if self.store.run(self.conversations.count_documents(direct)).await? > 0 {
            return Ok(true);
        }
        let group =
            doc! { "kind": { "$eq": "group" }, "$and": [ { "members": a.as_str() }, { "members": b.as_str() } ] };
        Ok(self.store.run(self.conversations.count_documents(group)).await? > 0)
    }

    /// Moves `user`'s read marker forward to the message at `seq` (never back).
    /// Returns whether it moved (and then emits a `read` event).
    pub async fn mark_read(
        &self,
        conversation: &ConversationDoc,
        user: &UserId,
        up_to: MessageId,
        seq: i64,
    ) -> Result<bool, ConversationError> {
        let id = StreamId::parse(&conversation.id).map_err(|e| StoreError::Other(e.to_string()))?;
        let key = read_key(user);
        let filter = doc! { "_id": { "$eq": id.as_str() } };
        let result = self.store.run(self.conversations.update_one(filter, doc! { "$max": { key: seq } })).await?;
        if result.modified_count == 0 {
            return Ok(false);
        }
        let mut event = self.event(ConversationEventKind::Read, conversation, user, user)?;
        event.up_to = Some(up_to);
        self.append_event(&event).await?;
        Ok(true)
    }

    /// Announces a reaction change on `message` to the conversation's sockets.
    pub async fn reaction_event(
        &self,
        conversation: &ConversationDoc,
        user: &UserId,
        message: MessageId,
        emoji: &str,
        added: bool,
    ) -> Result<(), ConversationError> {
        let kind = if added { ConversationEventKind::ReactionAdded } else { ConversationEventKind::ReactionRemoved };
        let mut event = self.event(kind, conversation, user, user)?;
        event.message_id = Some(message);
        event.emoji = Some(emoji.to_owned());
        self.append_event(&event).await?;
        Ok(())
    }

    /// One page of `user`'s conversations, most recent activity first.
    pub async fn inbox(
        &self,
        user: &UserId,
        before: Option<&InboxCursor>,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        // What this process accepted shows in the order at once.
        self.flush_for(user).await?;
        let base = doc! { "user_id": { "$eq": user.as_str() }, "active": { "$eq": true } };
        let want = limit as i64 + 1;
        let mut rows: Vec<MembershipDoc> = Vec::new();
        // After a cursor: first the rest of the cursor's own millisecond (ids below
        // the cursor's), then everything older. Two indexed reads instead of an `$or`,
        // which the local stand-in answers with a full scan.
        let mut queries = Vec::new();
        match before {
            None => queries.push(base),
            Some(cursor) => {
                let mut ties = base.clone();
                ties.insert("activity_at", doc! { "$eq": cursor.activity_at });
                ties.insert("conversation_id", doc! { "$lt": cursor.conversation_id.as_str() });
                queries.push(ties);
                let mut older = base;
                older.insert("activity_at", doc! { "$lt": cursor.activity_at });
                queries.push(older);
            }
        }
        for filter in queries {
            let missing = want - rows.len() as i64;
            if missing <= 0 {
                break;
            }
            let find = async {
                self.memberships
                    .find(filter)
                    .sort(doc! { "activity_at": -1, "conversation_id": -1 })
                    .limit(missing)
                    .await?
                    .try_collect::<Vec<MembershipDoc>>()
                    .await
            };
            rows.extend(self.store.run(find).await?);
        }
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let ids: Vec<&str> = rows.iter().map(|r| r.conversation_id.as_str()).collect();
        let find = async {
            self.conversations.find(doc! { "_id": { "$in": ids } }).await?.try_collect::<Vec<ConversationDoc>>().await
        };
        let mut by_id: HashMap<String, ConversationDoc> =
            self.store.run(find).await?.into_iter().map(|c| (c.id.clone(), c)).collect();
        let rows = rows.into_iter().filter_map(|row| by_id.remove(&row.conversation_id).map(|c| (row, c))).collect();
        Ok(InboxPage { rows, has_more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> std::sync::Arc<[String]> {
        (0..n).map(|i| format!("user{i}")).collect()
    }

    #[test]
    fn large_groups_are_written_less_often_within_a_bound() {
        let pending = |n| PendingActivity { at: 1, members: Some(members(n)) };
        assert_eq!(pending(2).interval(), ACTIVITY_MIN_INTERVAL);
        assert_eq!(pending(100).interval(), ACTIVITY_MIN_INTERVAL);
        assert_eq!(pending(101).interval(), ACTIVITY_MIN_INTERVAL * 4);
        assert_eq!(pending(500).interval(), ACTIVITY_MIN_INTERVAL * 25);
        assert_eq!(pending(701).interval(), ACTIVITY_MAX_INTERVAL);
        assert_eq!(pending(1000).interval(), ACTIVITY_MAX_INTERVAL);
        assert_eq!(pending(50_000).interval(), ACTIVITY_MAX_INTERVAL);
        assert_eq!(PendingActivity { at: 1, members: None }.interval(), ACTIVITY_MIN_INTERVAL);
    }

    #[test]
    fn a_large_group_is_written_in_slices_addressed_by_row_id() {
        let activity = PendingActivity { at: 7, members: Some(members(250)) };
        let statements = activity_statements("g_1", &activity);
        let rows: Vec<usize> = statements.iter().map(|(_, rows)| *rows).collect();
        assert_eq!(rows, vec![25; 10]);
        let q = statements[9].0.get_document("q").expect("q");
        let ids = q.get_document("_id").and_then(|d| d.get_array("$in")).expect("ids");
        assert_eq!(ids.len(), 25);
        assert_eq!(ids[0].as_str(), Some("g_1 user225"));
        assert_eq!(q.get_document("activity_at").and_then(|d| d.get_i64("$lt")), Ok(7));
        // Unknown members: every active row of the conversation, by its id.
        let unknown = activity_statements("g_1", &PendingActivity { at: 7, members: None });
        assert_eq!(unknown.len(), 1);
        assert!(unknown[0].0.get_document("q").expect("q").contains_key("conversation_id"));
    }

    #[test]
    fn pairs_share_a_command_and_a_large_group_gets_its_own_slices() {
        let pair = |at| PendingActivity { at, members: Some(members(2)) };
        let mut pending: Vec<(String, PendingActivity)> = (0..60).map(|i| (format!("p{i}"), pair(i))).collect();
        pending.push(("g".into(), PendingActivity { at: 1, members: Some(members(150)) }));
        let commands = pack_activity(&pending);
        let sizes: Vec<usize> = commands.iter().map(|(statements, _)| statements.len()).collect();
        // 12 pairs (24 rows) fill a command; the group's 25-row slices go one per
        // command, never with pairs.
        assert_eq!(sizes, vec![12, 12, 12, 12, 12, 1, 1, 1, 1, 1, 1]);
        assert_eq!(commands[0].1, (0..12).collect::<Vec<_>>());
        assert_eq!(commands[5].1, vec![60]);
        assert_eq!(commands[10].1, vec![60]);
        assert!(pack_activity(&[]).is_empty());
    }

    #[test]
    fn a_list_request_owes_its_caller_only_their_own_rows_waiting_or_in_flight() {
        let activity = Activity::default();
        let (group, pair, other, unknown) =
            (StreamId::new_group(), StreamId::new_group(), StreamId::new_group(), StreamId::new_group());
        activity.touch(&group, 5, Some(members(1000)));
        // Taken by a (paced) flush that has not written it yet: still owed.
        assert_eq!(activity.take(Take::All).len(), 1);
        activity.touch(&group, 9, Some(members(1000)));
        activity.touch(&pair, 7, Some(["user3".to_owned(), "zed".to_owned()].into()));
        activity.touch(&other, 8, Some(["amy".to_owned(), "zed".to_owned()].into()));
        activity.touch(&unknown, 6, None);
        let mut owed = activity.owed_to("user3");
        owed.sort();
        let mut expected =
            vec![(group.to_string(), 9, true), (pair.to_string(), 7, true), (unknown.to_string(), 6, false)];
        expected.sort();
        assert_eq!(owed, expected);
        let statements = own_rows_statements("user3", &owed);
        assert_eq!(statements.len(), 3);
        for (statement, (id, at, known)) in statements.iter().zip(&owed) {
            let q = statement.get_document("q").expect("q");
            assert_eq!(q.get_document("activity_at").and_then(|d| d.get_i64("$lt")), Ok(*at));
            if *known {
                assert_eq!(q.get_document("_id").and_then(|d| d.get_str("$eq")), Ok(format!("{id} user3").as_str()));
            } else {
                assert_eq!(q.get_document("user_id").and_then(|d| d.get_str("$eq")), Ok("user3"));
            }
            assert_eq!(statement.get_bool("multi"), Ok(false));
        }
        // What a list request wrote is not owed to that user again, until newer
        // activity arrives; other users are not affected.
        activity.written_for("user3", &owed);
        assert!(activity.owed_to("user3").is_empty());
        assert_eq!(activity.owed_to("user4").len(), 2, "the group and the unknown one");
        activity.touch(&pair, 10, Some(["user3".to_owned(), "zed".to_owned()].into()));
        assert_eq!(activity.owed_to("user3"), vec![(pair.to_string(), 10, true)]);
        // Once the flush is done, only what is still waiting is owed.
        activity.done(&[(group.to_string(), PendingActivity { at: 5, members: None })]);
        assert_eq!(activity.owed_to("user999").len(), 2, "the group's newer activity and the unknown one");
        assert!(activity.owed_to("nobody").iter().all(|(_, _, known)| !known));
    }

    #[test]
    fn the_background_takes_the_oldest_due_rows_up_to_its_bound() {
        let activity = Activity::default();
        let pairs: Vec<StreamId> = (0..200).map(|_| StreamId::new_group()).collect();
        for (i, pair) in pairs.iter().enumerate() {
            activity.touch(pair, 1_000 + i as i64, Some(members(2)));
        }
        let group = StreamId::new_group();
        activity.touch(&group, 5, Some(members(1000)));
        // The oldest is the large group: taken alone, although over the bound.
        let first = activity.take(Take::Due { max_rows: 250 });
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, group.to_string());
        // Then 125 pairs (250 rows), oldest first.
        let second = activity.take(Take::Due { max_rows: 250 });
        assert_eq!(second.len(), 125);
        assert!(second.iter().all(|(_, a)| a.at < 1_125));
        // The next tick takes the other 75.
        assert_eq!(activity.take(Take::Due { max_rows: 250 }).len(), 75);
    }

    #[test]
    fn a_flushed_conversation_waits_its_interval_unless_all_is_asked() {
        let activity = Activity::default();
        let id = StreamId::new_group();
        activity.touch(&id, 1, Some(members(2)));
        assert_eq!(activity.take(Take::Due { max_rows: 250 }).len(), 1);
        activity.touch(&id, 2, Some(members(2)));
        activity.touch(&id, 3, None);
        assert!(activity.take(Take::Due { max_rows: 250 }).is_empty(), "within its interval");
        let taken = activity.take(Take::All);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.at, 3, "the newest time");
        assert_eq!(taken[0].1.members.as_ref().map(|m| m.len()), Some(2), "the known members are kept");
        activity.touch_members(&id, 4, &["a".to_owned()]);
        activity.touch_members(&id, 5, &["a".to_owned(), "b".to_owned()]);
        let taken = activity.take(Take::All);
        assert_eq!(taken[0].1.at, 5);
        assert_eq!(taken[0].1.members.as_ref().map(|m| m.len()), Some(1), "copied once per pending entry");
    }
}
