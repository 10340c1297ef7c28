//! Typing indicators and presence: ephemeral frames between the sockets of one
//! conversation, never stored, never sent through MongoDB or Kafka.
//!
//! Why this module exists: the L7 proxy hashes every socket of a conversation to the
//! same pod, so this pod alone knows who has the conversation open and who is typing
//! in it. Relaying here is exact and cheap; storing it would cost a write per
//! keystroke. The rules (`docs/socket-protocol.md`):
//!
//! - **Scope.** A frame about user `u` reaches the sockets of the same conversation
//!   that may see `u`: in a group, every member socket; in a pair, the sockets of
//!   exactly that pair (a legacy id shared by two pairs never mixes them). Never a
//!   socket of `u` itself (their other devices included).
//! - **Typing.** At most one `start` per socket is forwarded per
//!   `TYPING_MIN_INTERVAL`; a start that is not forwarded only keeps an ongoing typing
//!   alive. Typing ends with the client's `stop`, by itself `TYPING_TIMEOUT` after the
//!   last `start`, or when the socket closes; each end forwards one `stop`.
//! - **Presence.** A user is online in a conversation while they hold at least one
//!   socket on it. The first socket sends `online`; the last one closing sends
//!   `offline` after `PRESENCE_GRACE`, unless a socket reopened meanwhile (a reconnect
//!   does not flap). A socket that asked for presence gets the users online at its
//!   opening, then every change.
//!
//! Memory: one fixed-size entry per open socket, one per (conversation, user) online
//! or in grace, and at most one pending timer for each of those.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chatstream::{ConversationKind, StreamId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use wsfanout::{ConnectionId, Frame, Hub, Peer};

/// The knobs of typing and presence (`TYPING_TIMEOUT`, `TYPING_MIN_INTERVAL`,
/// `PRESENCE_GRACE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LiveSettings {
    /// `TYPING_TIMEOUT`: a typing without a new `start` ends by itself after this.
    #[serde(with = "humantime_serde")]
    pub typing_timeout: Duration,
    /// `TYPING_MIN_INTERVAL`: at most one `start` per socket is forwarded per interval.
    #[serde(with = "humantime_serde")]
    pub typing_min_interval: Duration,
    /// `PRESENCE_GRACE`: how long after a user's last socket closed `offline` waits.
    #[serde(with = "humantime_serde")]
    pub presence_grace: Duration,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            typing_timeout: Duration::from_secs(5),
            typing_min_interval: Duration::from_secs(2),
            presence_grace: Duration::from_secs(5),
        }
    }
}

impl LiveSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("TYPING_TIMEOUT", "typing_timeout"),
        ("TYPING_MIN_INTERVAL", "typing_min_interval"),
        ("PRESENCE_GRACE", "presence_grace"),
    ];

    pub fn validate(&self) -> Result<(), String> {
        if self.typing_timeout.is_zero() {
            return Err("TYPING_TIMEOUT must be greater than zero".into());
        }
        Ok(())
    }
}

/// What a client says with `{"type":"typing","state":…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    Start,
    Stop,
}

/// The sockets a frame about a user may reach: a conversation, and for a pair the
/// pair's audience.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Scope {
    key: StreamId,
    /// `Some(pair audience)` for a pair conversation, `None` for a group (every
    /// socket on a group key belongs to a member).
    pair: Option<Arc<str>>,
}

impl Scope {
    fn reaches(&self, peer: &Peer<'_>, about: &UserId) -> bool {
        peer.user != about.as_str() && self.pair.as_deref().is_none_or(|pair| pair == peer.audience)
    }

    /// The conversation's id under the field name its sockets know it by.
    fn id_field(&self) -> (&'static str, &str) {
        match self.key.kind() {
            ConversationKind::Group => ("conversation_id", self.key.as_str()),
            _ => ("stream_id", self.key.as_str()),
        }
    }

    fn typing_frame(&self, user: &UserId, state: TypingState) -> Frame {
        let (field, id) = self.id_field();
        let mut value = json!({"type": "typing", "user_id": user, "state": state});
        value[field] = json!(id);
        Frame::new(value.to_string())
    }

    fn presence_frame(&self, user: &UserId, online: bool) -> Frame {
        let (field, id) = self.id_field();
        let mut value = json!({"type": "presence", "user_id": user, "online": online});
        value[field] = json!(id);
        Frame::new(value.to_string())
    }
}

struct ConnLive {
    scope: Scope,
    user: UserId,
    /// Whether this socket asked for presence frames (`presence=true`).
    wants_presence: bool,
    /// Until when its user is typing (`None`: not typing).
    typing_until: Option<Instant>,
    /// When a `start` of this socket was last forwarded.
    last_start: Option<Instant>,
    timer_pending: bool,
}

#[derive(Default)]
struct UserLive {
    sockets: usize,
    /// Set while the user's last socket is closed and the grace runs.
    offline_at: Option<Instant>,
    timer_pending: bool,
}

#[derive(Debug, Clone)]
enum Timer {
    Typing(ConnectionId),
    Offline(Scope, UserId),
}

#[derive(Default)]
struct State {
    conns: HashMap<ConnectionId, ConnLive>,
    users: HashMap<(Scope, UserId), UserLive>,
    timers: BTreeMap<(Instant, u64), Timer>,
    next_timer: u64,
}

impl State {
    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.next_timer += 1;
        self.timers.insert((at, self.next_timer), timer);
    }
}

/// Typing and presence of one pod's chat sockets.
#[derive(Clone)]
pub struct Live {
    hub: Hub<StreamId>,
    settings: LiveSettings,
    state: Arc<Mutex<State>>,
}

impl Live {
    pub fn new(hub: Hub<StreamId>, settings: LiveSettings) -> Self {
        Self { hub, settings, state: Arc::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Offers a presence frame about `user` to the sockets of `scope` that asked for
    /// presence. Called with the state locked (the lock order is always live → hub).
    fn announce(&self, state: &State, scope: &Scope, user: &UserId, online: bool) {
        self.hub.broadcast_where(&scope.key, scope.presence_frame(user, online), |peer| {
            scope.reaches(&peer, user) && state.conns.get(&peer.id).is_some_and(|conn| conn.wants_presence)
        });
        metrics::counter!("chat_presence_frames_total", "online" => if online { "true" } else { "false" }).increment(1);
    }

    fn relay_typing(&self, scope: &Scope, user: &UserId, typing: TypingState) {
        self.hub.broadcast_where(&scope.key, scope.typing_frame(user, typing), |peer| scope.reaches(&peer, user));
        metrics::counter!("chat_typing_frames_total").increment(1);
    }

    /// A socket of `user` opened on `key` (`audience`: what it was registered for; a
    /// pair socket's pair, or a group member's user id).
    pub fn opened(&self, id: ConnectionId, key: StreamId, audience: &str, user: &UserId, wants_presence: bool) {
        let pair = (key.kind() != ConversationKind::Group).then(|| Arc::<str>::from(audience));
        let scope = Scope { key, pair };
        let mut state = self.state();
        let entry = state.users.entry((scope.clone(), user.clone())).or_default();
        let first = entry.sockets == 0 && entry.offline_at.is_none();
        entry.sockets += 1;
        // Reopened within the grace: the others still see them online; no flap.
        entry.offline_at = None;
        state.conns.insert(
            id,
            ConnLive {
                scope: scope.clone(),
                user: user.clone(),
                wants_presence,
                typing_until: None,
                last_start: None,
                timer_pending: false,
            },
        );
        if first {
            self.announce(&state, &scope, user, true);
        }
        if wants_presence {
            for ((other_scope, other), _) in state.users.iter() {
                if other_scope == &scope && other != user {
                    self.hub.broadcast_where(&scope.key, scope.presence_frame(other, true), |peer| peer.id == id);
                }
            }
        }
    }

    /// The socket sent a typing frame.
    pub fn typing(&self, id: ConnectionId, typing: TypingState) {
        let now = Instant::now();
        let mut state = self.state();
        let Some(conn) = state.conns.get_mut(&id) else { return };
        let typing_now = conn.typing_until.is_some_and(|until| until > now);
        let forward = match typing {
            TypingState::Start => {
                let allowed =
                    conn.last_start.is_none_or(|last| now.duration_since(last) >= self.settings.typing_min_interval);
                if !allowed && !typing_now {
                    // Rate-limited and not typing: as if it had not been sent.
                    metrics::counter!("chat_typing_limited_total").increment(1);
                    return;
                }
                conn.typing_until = Some(now + self.settings.typing_timeout);
                if allowed {
                    conn.last_start = Some(now);
                } else {
                    metrics::counter!("chat_typing_limited_total").increment(1);
                }
                allowed
            }
            TypingState::Stop => {
                conn.typing_until = None;
                typing_now
            }
        };
        let (scope, user) = (conn.scope.clone(), conn.user.clone());
        let needs_timer = conn.typing_until.is_some() && !conn.timer_pending;
        if needs_timer {
            conn.timer_pending = true;
            let at = now + self.settings.typing_timeout;
            state.schedule(at, Timer::Typing(id));
        }
        if forward {
            self.relay_typing(&scope, &user, typing);
        }
    }

    /// The socket closed: its typing stops, and its user goes offline after the
    /// grace if it was their last socket on the conversation.
    pub fn closed(&self, id: ConnectionId) {
        let now = Instant::now();
        let mut state = self.state();
        let Some(conn) = state.conns.remove(&id) else { return };
        if conn.typing_until.is_some_and(|until| until > now) {
            self.relay_typing(&conn.scope, &conn.user, TypingState::Stop);
        }
        let key = (conn.scope.clone(), conn.user.clone());
        let Some(entry) = state.users.get_mut(&key) else { return };
        entry.sockets = entry.sockets.saturating_sub(1);
        if entry.sockets > 0 {
            return;
        }
        if self.settings.presence_grace.is_zero() {
            state.users.remove(&key);
            self.announce(&state, &conn.scope, &conn.user, false);
            return;
        }
        let at = now + self.settings.presence_grace;
        entry.offline_at = Some(at);
        if !entry.timer_pending {
            entry.timer_pending = true;
            state.schedule(at, Timer::Offline(conn.scope, conn.user));
        }
    }

    /// Fires the timers that are due: typing that expired, grace periods that ended.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut state = self.state();
        while let Some(entry) = state.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            match timer {
                Timer::Typing(id) => {
                    let Some(conn) = state.conns.get_mut(&id) else { continue };
                    conn.timer_pending = false;
                    match conn.typing_until {
                        Some(until) if until > now => {
                            // Extended since: wait for the new end.
                            conn.timer_pending = true;
                            state.schedule(until, Timer::Typing(id));
                        }
                        Some(_) => {
                            conn.typing_until = None;
                            let (scope, user) = (conn.scope.clone(), conn.user.clone());
                            self.relay_typing(&scope, &user, TypingState::Stop);
                        }
                        None => {}
                    }
                }
                Timer::Offline(scope, user) => {
                    let key = (scope, user);
                    let Some(entry) = state.users.get_mut(&key) else { continue };
                    entry.timer_pending = false;
                    match entry.offline_at {
                        _ if entry.sockets > 0 => {}
                        Some(at) if at > now => {
                            entry.timer_pending = true;
                            state.schedule(at, Timer::Offline(key.0, key.1));
                        }
                        _ => {
                            state.users.remove(&key);
                            self.announce(&state, &key.0, &key.1, false);
                        }
                    }
                }
            }
        }
    }

    /// Runs the timers until `shutdown`.
    pub async fn run(self, shutdown: servicekit::Shutdown) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = every.tick() => self.tick(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use wsfanout::{Registration, WsSettings};

    use super::*;

    fn user(raw: &str) -> UserId {
        UserId::parse(raw).expect("valid")
    }

    fn frames(reg: &mut Registration<StreamId>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(frame) = reg.try_recv() {
            out.push(serde_json::from_str(frame.text()).expect("json"));
        }
        out
    }

    /// Settings scaled down (timeout 300 ms, interval 200 ms, grace 300 ms).
    fn fast() -> LiveSettings {
        LiveSettings {
            typing_timeout: Duration::from_millis(300),
            typing_min_interval: Duration::from_millis(200),
            presence_grace: Duration::from_millis(300),
        }
    }

    async fn advance(by: Duration) {
        tokio::time::sleep(by).await;
    }

    fn live(settings: LiveSettings) -> (Live, Hub<StreamId>) {
        let hub = Hub::new("test", WsSettings::default());
        (Live::new(hub.clone(), settings), hub)
    }

    #[tokio::test]
    async fn typing_reaches_the_peer_only_and_is_rate_limited_and_expires() {
        let (live, hub) = live(fast());
        let (alice, bob) = (user("alice"), user("bob"));
        let key = StreamId::for_pair(&alice, &bob);
        let pair = crate::protocol::pair_audience(&alice, &bob);
        let mut a = hub.register_for(key, &pair, "alice").expect("room");
        let mut a2 = hub.register_for(key, &pair, "alice").expect("room");
        let mut b = hub.register_for(key, &pair, "bob").expect("room");
        live.opened(a.id(), key, &pair, &alice, false);
        live.opened(a2.id(), key, &pair, &alice, false);
        live.opened(b.id(), key, &pair, &bob, false);
        live.typing(a.id(), TypingState::Start);
        live.typing(a.id(), TypingState::Start);
        let seen = frames(&mut b);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0]["state"], "start");
        assert_eq!(seen[0]["user_id"], "alice");
        assert_eq!(seen[0]["stream_id"], key.as_str());
        assert!(frames(&mut a).is_empty() && frames(&mut a2).is_empty(), "not to the sender's own sockets");
        advance(Duration::from_millis(400)).await;
        live.tick();
        assert_eq!(frames(&mut b)[0]["state"], "stop");
        live.typing(a.id(), TypingState::Stop);
        assert!(frames(&mut b).is_empty(), "nothing to stop");
    }

    #[tokio::test]
    async fn presence_goes_offline_after_the_grace_and_a_reconnect_does_not_flap() {
        let (live, hub) = live(fast());
        let group = StreamId::new_group();
        let (alice, bob) = (user("alice"), user("bob"));
        let mut b = hub.register_for(group, "bob", "bob").expect("room");
        live.opened(b.id(), group, "bob", &bob, true);
        let a = hub.register_for(group, "alice", "alice").expect("room");
        live.opened(a.id(), group, "alice", &alice, true);
        let seen = frames(&mut b);
        assert_eq!((seen.len(), &seen[0]["online"], &seen[0]["conversation_id"]), (1, &json!(true), &json!(group)));
        live.closed(a.id());
        advance(Duration::from_millis(100)).await;
        live.tick();
        let again = hub.register_for(group, "alice", "alice").expect("room");
        live.opened(again.id(), group, "alice", &alice, false);
        advance(Duration::from_millis(600)).await;
        live.tick();
        assert!(frames(&mut b).is_empty(), "no flap");
        live.closed(again.id());
        advance(Duration::from_millis(400)).await;
        live.tick();
        assert_eq!(frames(&mut b)[0]["online"], false);
    }
}
