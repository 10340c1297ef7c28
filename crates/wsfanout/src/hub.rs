//! The hub: one service's connections grouped by key, and the delivery rules.
//!
//! Why this module exists: the delivery report (`200`/`206`/`500` upstream) is only
//! meaningful if "delivered" means the same thing everywhere. Here it means *accepted
//! into the connection's bounded outbound queue* (or already accepted before: a
//! retried event is not queued twice). A full queue means the client cannot keep up;
//! that connection is closed with 4001 and counted as failed, so one slow client never
//! slows its peers and the caller retries for it only once.
//!
//! The map lives behind one mutex held only for non-blocking work (`try_send`,
//! hash-set look-ups), never across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, Notify};

use crate::close_code;
use crate::settings::WsSettings;

/// The id of one event (a message, an edit, a notification), used to recognise a
/// retried forward of an event a connection already has.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(Arc<str>);

impl EventId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for EventId {
    fn from(id: String) -> Self {
        Self(id.into())
    }
}

impl From<&str> for EventId {
    fn from(id: &str) -> Self {
        Self(id.into())
    }
}

/// One pre-serialized text frame, optionally tagged with the event it carries.
/// Serialized once per broadcast; cloning it for each connection is one reference
/// count, and a queue slot is one pointer (every socket's queue allocates its first
/// block of slots up front, so the slot size is paid per idle socket).
#[derive(Debug, Clone)]
pub struct Frame(Arc<FrameInner>);

#[derive(Debug)]
struct FrameInner {
    event_id: Option<EventId>,
    text: Utf8Bytes,
    /// Close the connection right after this frame (see [`Hub::send_last`]).
    then_close: Option<Close>,
}

impl Frame {
    /// A frame that is not an event (never deduplicated).
    pub fn new(text: impl Into<Utf8Bytes>) -> Self {
        Self(Arc::new(FrameInner { event_id: None, text: text.into(), then_close: None }))
    }

    /// A frame carrying event `id`: sent at most once per connection while the id is
    /// remembered (`WS_RECENT_EVENTS`), and skipped at the replay seam.
    pub fn event(id: impl Into<EventId>, text: impl Into<Utf8Bytes>) -> Self {
        Self(Arc::new(FrameInner { event_id: Some(id.into()), text: text.into(), then_close: None }))
    }

    /// This frame as a connection's last: the connection closes with `close` after it.
    fn then(&self, close: Close) -> Self {
        let FrameInner { event_id, text, .. } = &*self.0;
        Self(Arc::new(FrameInner { event_id: event_id.clone(), text: text.clone(), then_close: Some(close) }))
    }

    pub fn event_id(&self) -> Option<&EventId> {
        self.0.event_id.as_ref()
    }

    pub fn text(&self) -> &str {
        self.0.text.as_str()
    }

    pub(crate) fn into_text(self) -> Utf8Bytes {
        self.0.text.clone()
    }

    /// The close that must follow this frame, if it is a connection's last.
    pub fn then_close(&self) -> Option<&Close> {
        self.0.then_close.as_ref()
    }

    /// The text, and the close that must follow it (if this is a connection's last frame).
    pub(crate) fn into_parts(self) -> (Utf8Bytes, Option<Close>) {
        (self.0.text.clone(), self.0.then_close.clone())
    }
}

/// A request to close a connection: the close code, its reason, and optionally one
/// last text frame sent just before the close frame (for example a `resync` frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
    pub farewell: Option<Utf8Bytes>,
}

impl Close {
    /// The reason is cut to the 123 bytes a close frame can carry.
    pub fn new(code: u16, reason: &str) -> Self {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self { code, reason: reason[..end].to_owned(), farewell: None }
    }

    pub fn with_farewell(mut self, text: impl Into<Utf8Bytes>) -> Self {
        self.farewell = Some(text.into());
        self
    }

    /// 1001: the server is shutting down.
    pub fn going_away() -> Self {
        Self::new(close_code::GOING_AWAY, "server shutting down")
    }

    /// 4001: the client did not keep up.
    pub fn slow_consumer() -> Self {
        Self::new(close_code::SLOW_CONSUMER, "slow consumer")
    }
}

/// Identifies one connection within a hub (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(u64);

impl ConnectionId {
    /// Where in each ping period this connection's pings fall, as a fraction in
    /// (0, 1]: consecutive ids land far apart (multiples of the golden ratio), so
    /// sockets that connected together, as after a deploy, do not ping together.
    pub fn ping_phase(self) -> f64 {
        const GOLDEN: f64 = 0.618_033_988_749_895;
        1.0 - (self.0 as f64 * GOLDEN).fract()
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// One connection as a broadcast's filter sees it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub id: ConnectionId,
    /// What it was registered to see ([`Hub::register_as`]).
    pub audience: &'a str,
    /// Who holds it ([`Hub::register_for`]; empty when not given).
    pub user: &'a str,
}

/// What one broadcast achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryReport {
    /// Connections the key had when the broadcast started.
    pub connections: usize,
    /// Connections that accepted the frame (or had already accepted this event).
    pub delivered: usize,
    /// Connections that could not take it (queue full: closed as slow consumers; or already gone).
    pub failed: usize,
}

/// The summary of a [`DeliveryReport`], as the callers' status codes need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The key had no connection here: nothing to do, nothing failed.
    NoConnections,
    /// Every connection accepted it.
    Ok,
    /// Some accepted it, some failed: retry.
    Partial,
    /// Every connection failed.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NoConnections => "no_connections",
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
        }
    }
}

impl DeliveryReport {
    pub fn outcome(&self) -> Outcome {
        match (self.connections, self.delivered, self.failed) {
            (0, _, _) => Outcome::NoConnections,
            (_, _, 0) => Outcome::Ok,
            (_, 0, _) => Outcome::Failed,
            _ => Outcome::Partial,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// `WS_MAX_CONNECTIONS` sockets are open already.
    Full { limit: usize },
}

impl std::error::Error for RegisterError {}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegisterError::Full { limit } => write!(f, "this server holds its maximum of {limit} sockets"),
        }
    }
}

/// The events most recently queued to one connection, as keyed 64-bit hashes of
/// their ids (the hub's random key: ids are not chosen by clients, and a collision
/// among 256 ids has odds of about 1 in 10^16). Eight bytes per event instead of a
/// hash set and a queue of shared strings (about 12 KiB per busy socket at 256
/// events), grown only as events arrive, so an idle socket holds nothing.
struct Recent {
    order: VecDeque<u64>,
    capacity: usize,
}

impl Recent {
    fn new(capacity: usize) -> Self {
        Self { order: VecDeque::new(), capacity }
    }

    fn contains(&self, id: u64) -> bool {
        self.order.contains(&id)
    }

    fn insert(&mut self, id: u64) {
        if !self.contains(id) {
            self.insert_new(id);
        }
    }

    /// Like `insert`, for an id the caller has just looked up (one scan, not two:
    /// a fan-out looks every socket's ids up once per frame).
    fn insert_new(&mut self, id: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.order.len() >= self.capacity {
            self.order.pop_front();
        }
        self.order.push_back(id);
    }
}

struct Conn {
    id: ConnectionId,
    /// Who this socket is for, in the service's terms (the chat hub: the user and
    /// the peer). Broadcasts may be narrowed to some audiences.
    audience: Arc<str>,
    /// The authenticated user holding the socket (empty when not given).
    user: Arc<str>,
    tx: mpsc::Sender<Frame>,
    close_tx: watch::Sender<Option<Close>>,
    recent: Recent,
}

impl Conn {
    fn close(&self, close: Close) {
        self.close_tx.send_replace(Some(close));
    }
}

struct Shared<K> {
    name: &'static str,
    settings: WsSettings,
    admission: crate::admit::Limits,
    groups: Mutex<HashMap<K, Vec<Conn>>>,
    /// Live registrations (sockets not yet finished), for the cap, the gauge and draining.
    live: AtomicUsize,
    next_id: AtomicU64,
    idle: Notify,
    /// The random key of the event hashes connections remember.
    event_keys: std::collections::hash_map::RandomState,
}

/// File descriptors a socket service needs besides its sockets (listeners, clients
/// of Redis and the other services, the runtime's own).
const RESERVED_FILES: u64 = 64;

/// The connections of one service, grouped by key (a stream id, a user id, ...).
pub struct Hub<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for Hub<K> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<K> Hub<K>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
{
    /// A hub named `name` (the `hub` label of its metrics).
    pub fn new(name: &'static str, settings: WsSettings) -> Self {
        metrics::gauge!("ws_connections", "hub" => name).set(0.0);
        // Every socket is a file descriptor: a cap above the open-files limit is never
        // reached, and the sockets past the limit fail at accept instead of with 503.
        if let Some(files) = servicekit::limits::open_files_limit() {
            let needed = settings.max_connections as u64 + RESERVED_FILES;
            if settings.max_connections > 0 && files < needed {
                tracing::warn!(
                    hub = name,
                    open_files_limit = files,
                    ws_max_connections = settings.max_connections,
                    "the open files limit is below WS_MAX_CONNECTIONS plus {RESERVED_FILES}: raise the hard limit \
                     (ulimit -Hn, docker --ulimit nofile, the container runtime's default) or lower WS_MAX_CONNECTIONS"
                );
            }
        }
        Self {
            shared: Arc::new(Shared {
                name,
                admission: crate::admit::Limits::new(name, &settings),
                settings,
                groups: Mutex::new(HashMap::new()),
                live: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                idle: Notify::new(),
                event_keys: std::collections::hash_map::RandomState::new(),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.shared.name
    }

    pub fn settings(&self) -> &WsSettings {
        &self.shared.settings
    }

    pub(crate) fn admission(&self) -> &crate::admit::Limits {
        &self.shared.admission
    }

    /// Sockets currently open (registered and not yet finished).
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// The keys that have at least one connection (for example to refresh presence).
    pub fn keys(&self) -> Vec<K> {
        self.groups().keys().cloned().collect()
    }

    /// Connections of `key` that broadcasts currently reach.
    pub fn connections_of(&self, key: &K) -> usize {
        self.groups().get(key).map_or(0, Vec::len)
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<K, Vec<Conn>>> {
        // A panic while holding the lock cannot leave the map inconsistent in a way
        // that matters more than refusing all further work would.
        self.shared.groups.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a connection for `key`. From now on broadcasts to `key` queue frames for
    /// it, so register *before* fetching anything to replay. Dropping the
    /// registration (for example when the upgrade fails) removes the connection.
    pub fn register(&self, key: K) -> Result<Registration<K>, RegisterError> {
        self.register_as(key, "")
    }

    /// [`Hub::register`] for a socket of `audience` (see [`Hub::broadcast_to`]).
    pub fn register_as(&self, key: K, audience: &str) -> Result<Registration<K>, RegisterError> {
        self.register_for(key, audience, "")
    }

    /// [`Hub::register_as`] naming the socket's `user` too (see [`Hub::broadcast_where`]),
    /// so a broadcast can skip the sockets of the user it is about.
    pub fn register_for(&self, key: K, audience: &str, user: &str) -> Result<Registration<K>, RegisterError> {
        let limit = self.shared.settings.max_connections;
        let admitted = self
            .shared
            .live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (limit == 0 || n < limit).then_some(n + 1));
        if admitted.is_err() {
            return Err(RegisterError::Full { limit });
        }
        metrics::gauge!("ws_connections", "hub" => self.shared.name).increment(1.0);

        let id = ConnectionId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel(self.shared.settings.outbound_queue.max(1));
        let (close_tx, close_rx) = watch::channel(None);
        let conn = Conn {
            id,
            audience: audience.into(),
            user: user.into(),
            tx,
            close_tx,
            recent: Recent::new(self.shared.settings.recent_events),
        };
        self.groups().entry(key.clone()).or_default().push(conn);
        Ok(Registration { hub: self.clone(), key, id, rx, close_rx, slots: Vec::new() })
    }

    /// Offers `frame` to every connection of `key` without waiting for any of them.
    pub fn broadcast(&self, key: &K, frame: Frame) -> DeliveryReport {
        self.broadcast_to(key, frame, |_| true)
    }

    /// Offers `frame` to the connections of `key` whose audience `accepts`; the
    /// others neither get it nor count in the report. This is how a socket only ever
    /// sees what its own user may see, whatever else shares its key.
    pub fn broadcast_to(&self, key: &K, frame: Frame, accepts: impl Fn(&str) -> bool) -> DeliveryReport {
        self.broadcast_where(key, frame, |peer| accepts(peer.audience))
    }

    /// Offers `frame` to the connections of `key` that `accepts` (it sees each one's
    /// id, audience and user); the others neither get it nor count in the report.
    /// Ephemeral frames (typing, presence) use it to skip the sockets of the user
    /// they are about, or to reach exactly one connection.
    pub fn broadcast_where(&self, key: &K, frame: Frame, accepts: impl Fn(Peer<'_>) -> bool) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        let mut slow = Vec::new();
        let event = frame.event_id().map(|id| self.event_hash(id));
        {
            let mut groups = self.groups();
            if let Some(conns) = groups.get_mut(key) {
                conns.retain_mut(|conn| {
                    if !accepts(Peer { id: conn.id, audience: &conn.audience, user: &conn.user }) {
                        return true;
                    }
                    report.connections += 1;
                    if let Some(id) = event {
                        if conn.recent.contains(id) {
                            report.delivered += 1;
                            return true;
                        }
                    }
                    match conn.tx.try_send(frame.clone()) {
                        Ok(()) => {
                            if let Some(id) = event {
                                conn.recent.insert_new(id);
                            }
                            report.delivered += 1;
                            true
                        }
                        Err(TrySendError::Full(_)) => {
                            conn.close(Close::slow_consumer());
                            slow.push(conn.id);
                            report.failed += 1;
                            false
                        }
                        Err(TrySendError::Closed(_)) => {
                            report.failed += 1;
                            false
                        }
                    }
                });
                if conns.is_empty() {
                    groups.remove(key);
                }
            }
        }
        for id in &slow {
            tracing::warn!(hub = self.shared.name, ?key, connection = %id, "outbound queue full: closing slow consumer");
        }
        if !slow.is_empty() {
            metrics::counter!("ws_slow_consumer_closes_total", "hub" => self.shared.name).increment(slow.len() as u64);
        }
        metrics::counter!("ws_broadcasts_total", "hub" => self.shared.name, "outcome" => report.outcome().as_str())
            .increment(1);
        report
    }

    /// Closes every connection of `key` with `close` and stops broadcasting to them.
    /// Returns how many were asked to close. The sockets finish asynchronously.
    pub fn close_key(&self, key: &K, close: Close) -> usize {
        let conns = self.groups().remove(key).unwrap_or_default();
        for conn in &conns {
            conn.close(close.clone());
        }
        if !conns.is_empty() {
            tracing::info!(hub = self.shared.name, ?key, code = close.code, closed = conns.len(), "closing key");
        }
        conns.len()
    }

    /// Sends `frame` as the **last** frame of the connections of `key` whose audience
    /// `accepts`, then closes them with `close`: they leave the key at once (no later
    /// broadcast reaches them), but every frame queued for them before this one is
    /// still sent, in order, and then `frame`, then the close. A connection whose
    /// queue is full is closed at once, with `frame` as the close's farewell. A
    /// connection that already has `frame`'s event is closed the same way, without it.
    /// Returns the delivery report of `frame` (a closed queue counts as failed).
    pub fn send_last(&self, key: &K, frame: Frame, close: Close, accepts: impl Fn(&str) -> bool) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        let mut leaving = Vec::new();
        let event = frame.event_id().map(|id| self.event_hash(id));
        {
            let mut groups = self.groups();
            if let Some(conns) = groups.get_mut(key) {
                let mut index = 0;
                while index < conns.len() {
                    if accepts(&conns[index].audience) {
                        leaving.push(conns.swap_remove(index));
                    } else {
                        index += 1;
                    }
                }
                if conns.is_empty() {
                    groups.remove(key);
                }
            }
        }
        for conn in leaving {
            report.connections += 1;
            if event.is_some_and(|id| conn.recent.contains(id)) {
                // It has the frame already (a retry): only the close is left to do.
                report.delivered += 1;
                conn.close(close.clone());
                continue;
            }
            match conn.tx.try_send(frame.then(close.clone())) {
                Ok(()) => report.delivered += 1,
                Err(TrySendError::Full(_)) => {
                    conn.close(close.clone().with_farewell(frame.0.text.clone()));
                    report.failed += 1;
                }
                Err(TrySendError::Closed(_)) => report.failed += 1,
            }
            // Dropping `conn` drops its queue's sender: the socket sends what is
            // queued, this frame last, and then closes. A close request set above
            // outlives the sender (the driver reads the last value).
        }
        if report.connections > 0 {
            tracing::info!(
                hub = self.shared.name,
                ?key,
                code = close.code,
                closed = report.connections,
                "closing connections after a last frame"
            );
        }
        report
    }

    /// Closes every connection of the hub with `close`. Returns how many.
    pub fn close_all(&self, close: Close) -> usize {
        let groups = std::mem::take(&mut *self.groups());
        let mut count = 0;
        for conn in groups.values().flatten() {
            conn.close(close.clone());
            count += 1;
        }
        count
    }

    /// Waits until every socket has finished, at most `timeout`. `true` if they did.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.connections() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.connections() == 0;
            }
        }
    }

    /// Removes connection `id` from broadcasting (it may already be gone).
    fn detach(&self, key: &K, id: ConnectionId) {
        let mut groups = self.groups();
        if let Some(conns) = groups.get_mut(key) {
            conns.retain(|conn| conn.id != id);
            if conns.is_empty() {
                groups.remove(key);
            }
        }
    }

    /// Records that `ids` were delivered to connection `id` by other means (a replay),
    /// and returns how many frames are queued for it at that instant.
    fn remember(
        &self,
        key: &K,
        id: ConnectionId,
        ids: &mut dyn Iterator<Item = EventId>,
        queued: impl Fn() -> usize,
    ) -> usize {
        let mut groups = self.groups();
        if let Some(conn) = groups.get_mut(key).and_then(|conns| conns.iter_mut().find(|conn| conn.id == id)) {
            for event in ids {
                conn.recent.insert(self.event_hash(&event));
            }
        }
        // Read while the lock is held: no broadcast can queue anything in between.
        queued()
    }

    /// The key under which a connection remembers event `id` (see `Recent`).
    fn event_hash(&self, id: &EventId) -> u64 {
        self.shared.event_keys.hash_one(id.as_str())
    }

    fn release(&self) {
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("ws_connections", "hub" => self.shared.name).decrement(1.0);
        self.shared.idle.notify_waiters();
    }
}

/// One admitted connection: its live queue and its close signal. Hand it to a
/// [`crate::Driver`] once the socket is upgraded; dropping it unregisters.
pub struct Registration<K>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
{
    hub: Hub<K>,
    key: K,
    id: ConnectionId,
    pub(crate) rx: mpsc::Receiver<Frame>,
    pub(crate) close_rx: watch::Receiver<Option<Close>>,
    /// Per-user and per-address socket slots, freed with the registration.
    slots: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl<K> Registration<K>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
{
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    pub fn key(&self) -> &K {
        &self.key
    }

    pub fn hub(&self) -> &Hub<K> {
        &self.hub
    }

    /// Keeps `slot` (a per-user or per-address cap) held as long as this connection.
    pub(crate) fn hold(&mut self, slot: Box<dyn std::any::Any + Send + Sync>) {
        self.slots.push(slot);
    }

    /// Marks `ids` as already delivered (they are being replayed), so broadcasts of
    /// them from now on are not queued. Returns how many live frames were queued
    /// before this call: only those can duplicate the replay.
    pub fn remember(&self, ids: impl IntoIterator<Item = EventId>) -> usize {
        let rx = &self.rx;
        self.hub.remember(&self.key, self.id, &mut ids.into_iter(), || rx.len())
    }

    /// The next live frame (for drivers other than [`crate::Driver`], and tests).
    pub async fn recv(&mut self) -> Option<Frame> {
        self.rx.recv().await
    }

    /// A queued live frame, if any.
    pub fn try_recv(&mut self) -> Option<Frame> {
        self.rx.try_recv().ok()
    }

    /// Whether the hub asked this connection to close, and how.
    pub fn close_requested(&self) -> Option<Close> {
        self.close_rx.borrow().clone()
    }

    /// Stops broadcasts from reaching this connection (it is closing).
    pub(crate) fn detach(&self) {
        self.hub.detach(&self.key, self.id);
    }
}

impl<K> Drop for Registration<K>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
{
    fn drop(&mut self) {
        self.hub.detach(&self.key, self.id);
        self.hub.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(queue: usize) -> Hub<String> {
        Hub::new("test", WsSettings { outbound_queue: queue, recent_events: 4, ..WsSettings::default() })
    }

    fn key(k: &str) -> String {
        k.to_owned()
    }

    #[test]
    fn sockets_that_connect_together_ping_spread_over_the_period() {
        // 1,000 consecutive connections: every phase in (0, 1], and each tenth of
        // the period gets about a tenth of them (a burst would put them in one).
        let phases: Vec<f64> = (5_000..6_000).map(|i| ConnectionId(i).ping_phase()).collect();
        assert!(phases.iter().all(|p| *p > 0.0 && *p <= 1.0), "{phases:?}");
        for tenth in 0..10 {
            let (low, high) = (tenth as f64 / 10.0, (tenth + 1) as f64 / 10.0);
            let n = phases.iter().filter(|p| **p > low && **p <= high).count();
            assert!((90..=110).contains(&n), "{n} of 1,000 in ({low}, {high}]");
        }
    }

    fn texts(reg: &mut Registration<String>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(frame) = reg.try_recv() {
            out.push(frame.text().to_owned());
        }
        out
    }

    #[test]
    fn broadcast_to_reaches_only_the_accepted_audiences_and_counts_only_them() {
        let hub = hub(8);
        let mut alice = hub.register_as(key("s1"), "alice").expect("admitted");
        let mut mallory = hub.register_as(key("s1"), "mallory").expect("admitted");
        let report = hub.broadcast_to(&key("s1"), Frame::event("m1", "secret"), |who| who == "alice");
        assert_eq!(report, DeliveryReport { connections: 1, delivered: 1, failed: 0 });
        assert_eq!(texts(&mut alice), ["secret"]);
        assert!(texts(&mut mallory).is_empty());
        let nobody = hub.broadcast_to(&key("s1"), Frame::event("m2", "x"), |_| false);
        assert_eq!(nobody.outcome(), Outcome::NoConnections);
        assert_eq!(hub.connections_of(&key("s1")), 2, "filtered sockets stay registered");
    }

    #[test]
    fn send_last_drains_the_queue_then_the_last_frame_then_closes_and_nothing_after() {
        let hub = hub(8);
        let mut carol = hub.register_as(key("g1"), "carol").expect("admitted");
        let mut alice = hub.register_as(key("g1"), "alice").expect("admitted");
        hub.broadcast(&key("g1"), Frame::event("m1", "before"));
        let left = Frame::event("e1", "carol left");
        hub.broadcast_to(&key("g1"), left.clone(), |who| who != "carol");
        let removed = Close::new(close_code::REMOVED, "removed");
        let report = hub.send_last(&key("g1"), left.clone(), removed.clone(), |who| who == "carol");
        assert_eq!(report, DeliveryReport { connections: 1, delivered: 1, failed: 0 });
        hub.broadcast(&key("g1"), Frame::event("m2", "after"));
        let first = carol.try_recv().expect("queued before");
        assert_eq!((first.text(), first.then_close()), ("before", None));
        let last = carol.try_recv().expect("the last frame");
        assert_eq!((last.text(), last.then_close()), ("carol left", Some(&removed)));
        assert!(carol.try_recv().is_none(), "nothing after the last frame");
        assert_eq!(carol.close_requested(), None, "the close rides on the last frame");
        assert_eq!(texts(&mut alice), ["before", "carol left", "after"]);
        assert_eq!(hub.connections_of(&key("g1")), 1);
        // A retry finds no one left to close.
        let again = hub.send_last(&key("g1"), left, removed, |who| who == "carol");
        assert_eq!(again.outcome(), Outcome::NoConnections);
    }

    #[test]
    fn send_last_to_a_full_queue_closes_at_once_with_the_frame_as_farewell() {
        let hub = hub(1);
        let carol = hub.register_as(key("g1"), "carol").expect("admitted");
        hub.broadcast(&key("g1"), Frame::event("m1", "fills the queue"));
        let removed = Close::new(close_code::REMOVED, "removed");
        let report = hub.send_last(&key("g1"), Frame::event("e1", "carol left"), removed.clone(), |_| true);
        assert_eq!(report, DeliveryReport { connections: 1, delivered: 0, failed: 1 });
        assert_eq!(carol.close_requested(), Some(removed.with_farewell("carol left")));
    }

    #[test]
    fn broadcast_reaches_every_connection_of_the_key_and_no_other() {
        let hub = hub(8);
        let mut a = hub.register(key("s1")).expect("admitted");
        let mut b = hub.register(key("s1")).expect("admitted");
        let mut other = hub.register(key("s2")).expect("admitted");

        let report = hub.broadcast(&key("s1"), Frame::event("m1", "hello"));
        assert_eq!(report, DeliveryReport { connections: 2, delivered: 2, failed: 0 });
        assert_eq!(report.outcome(), Outcome::Ok);
        assert_eq!(texts(&mut a), ["hello"]);
        assert_eq!(texts(&mut b), ["hello"]);
        assert!(texts(&mut other).is_empty());
    }

    #[test]
    fn a_key_without_connections_reports_zero() {
        let hub = hub(8);
        let report = hub.broadcast(&key("nobody"), Frame::event("m1", "hello"));
        assert_eq!(report, DeliveryReport::default());
        assert_eq!(report.outcome(), Outcome::NoConnections);
    }

    #[test]
    fn a_retried_event_is_counted_delivered_but_queued_once() {
        let hub = hub(8);
        let mut a = hub.register(key("s1")).expect("admitted");
        let first = hub.broadcast(&key("s1"), Frame::event("m1", "hello"));
        let retry = hub.broadcast(&key("s1"), Frame::event("m1", "hello"));
        assert_eq!(first.delivered, 1);
        assert_eq!(retry, DeliveryReport { connections: 1, delivered: 1, failed: 0 });
        assert_eq!(texts(&mut a), ["hello"]);

        // Frames without an event id are never deduplicated.
        hub.broadcast(&key("s1"), Frame::new("tick"));
        hub.broadcast(&key("s1"), Frame::new("tick"));
        assert_eq!(texts(&mut a), ["tick", "tick"]);
    }

    #[test]
    fn the_memory_of_recent_events_is_bounded() {
        let hub = hub(16);
        let mut a = hub.register(key("s1")).expect("admitted");
        for i in 0..6 {
            hub.broadcast(&key("s1"), Frame::event(format!("m{i}"), format!("f{i}")));
        }
        texts(&mut a);
        // recent_events = 4: m0 and m1 are forgotten, m5 is not.
        hub.broadcast(&key("s1"), Frame::event("m0", "f0 again"));
        hub.broadcast(&key("s1"), Frame::event("m5", "f5 again"));
        assert_eq!(texts(&mut a), ["f0 again"]);
    }

    #[test]
    fn a_full_queue_closes_that_connection_as_slow_consumer_and_spares_its_peers() {
        let hub = hub(2);
        let mut healthy = hub.register(key("s1")).expect("admitted");
        let slow = hub.register(key("s1")).expect("admitted");

        for i in 0..2 {
            let report = hub.broadcast(&key("s1"), Frame::event(format!("m{i}"), format!("f{i}")));
            assert_eq!(report.delivered, 2);
            assert_eq!(texts(&mut healthy).len(), 1, "the healthy peer keeps reading");
        }
        assert_eq!(slow.close_requested(), None);

        let report = hub.broadcast(&key("s1"), Frame::event("m2", "f2"));
        assert_eq!(report, DeliveryReport { connections: 2, delivered: 1, failed: 1 });
        assert_eq!(report.outcome(), Outcome::Partial);
        assert_eq!(slow.close_requested().map(|c| c.code), Some(close_code::SLOW_CONSUMER));
        assert_eq!(texts(&mut healthy), ["f2"]);

        // The slow consumer no longer counts: the retry succeeds for everyone left.
        let retry = hub.broadcast(&key("s1"), Frame::event("m2", "f2"));
        assert_eq!(retry, DeliveryReport { connections: 1, delivered: 1, failed: 0 });
        assert!(texts(&mut healthy).is_empty(), "no duplicate for the peer that had it");
        assert_eq!(hub.connections(), 2, "the slow socket is still open until its driver finishes");
        drop(slow);
        assert_eq!(hub.connections(), 1);
    }

    #[test]
    fn every_connection_failing_is_a_failed_outcome() {
        let hub = hub(1);
        let mut gone = hub.register(key("s1")).expect("admitted");
        gone.rx.close();
        let report = hub.broadcast(&key("s1"), Frame::event("m1", "hello"));
        assert_eq!(report, DeliveryReport { connections: 1, delivered: 0, failed: 1 });
        assert_eq!(report.outcome(), Outcome::Failed);
        assert_eq!(hub.connections_of(&key("s1")), 0);
    }

    #[test]
    fn close_key_closes_every_connection_of_the_key_with_the_given_close() {
        let hub = hub(8);
        let a = hub.register(key("s1")).expect("admitted");
        let b = hub.register(key("s1")).expect("admitted");
        let other = hub.register(key("s2")).expect("admitted");

        let close = Close::new(close_code::RESYNC, "resync").with_farewell("{\"type\":\"resync\"}");
        assert_eq!(hub.close_key(&key("s1"), close.clone()), 2);
        assert_eq!(a.close_requested(), Some(close.clone()));
        assert_eq!(b.close_requested(), Some(close));
        assert_eq!(other.close_requested(), None);
        assert_eq!(hub.keys(), [key("s2")]);
        assert_eq!(hub.broadcast(&key("s1"), Frame::event("m1", "x")).outcome(), Outcome::NoConnections);
        assert_eq!(hub.close_key(&key("s1"), Close::going_away()), 0);
    }

    #[test]
    fn the_connection_cap_refuses_and_frees_slots() {
        let hub: Hub<String> = Hub::new("capped", WsSettings { max_connections: 2, ..WsSettings::default() });
        let a = hub.register(key("s1")).expect("first");
        let _b = hub.register(key("s2")).expect("second");
        assert_eq!(hub.register(key("s3")).err(), Some(RegisterError::Full { limit: 2 }));
        drop(a);
        assert!(hub.register(key("s3")).is_ok(), "a slot was freed");
    }

    #[test]
    fn remembered_events_are_not_queued_and_the_queued_count_is_reported() {
        let hub = hub(8);
        let mut a = hub.register(key("s1")).expect("admitted");
        hub.broadcast(&key("s1"), Frame::event("m1", "live m1"));
        assert_eq!(a.remember(["m1".into(), "m2".into()]), 1, "m1 was queued before the replay");
        hub.broadcast(&key("s1"), Frame::event("m2", "live m2"));
        hub.broadcast(&key("s1"), Frame::event("m3", "live m3"));
        assert_eq!(texts(&mut a), ["live m1", "live m3"]);
    }

    #[test]
    fn close_reasons_fit_in_a_close_frame() {
        let long = "é".repeat(100);
        let close = Close::new(close_code::RESYNC, &long);
        assert!(close.reason.len() <= 123);
        assert!(close.reason.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn wait_idle_returns_once_every_registration_is_gone() {
        let hub = hub(8);
        let a = hub.register(key("s1")).expect("admitted");
        assert!(!hub.wait_idle(Duration::from_millis(20)).await);
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_idle(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        assert!(waiter.await.expect("join"));
    }
}
