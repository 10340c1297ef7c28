//! The socket driver: runs one upgraded WebSocket for one [`Registration`].
//!
//! Why this module exists: every socket needs the same life cycle, and its subtle
//! parts are easy to get wrong per service: replayed frames go out before live ones
//! without a gap or a duplicate at the seam, a client that stops answering pings is
//! dropped, a close requested by the hub (resync, slow consumer) or by shutdown
//! interrupts even a write that is blocked on a client that does not read, and every
//! close ends with a close frame when the client can still take one.
//!
//! Reading and writing run concurrently in the socket's task: the writer pumps the
//! replay, then the live queue, pings and replies; the reader watches the pong
//! deadline and hands client frames to the service's handler. A socket opened with
//! a token that expires is closed at that instant with
//! [`close_code::TOKEN_EXPIRED`]: authentication is checked once, at the upgrade, so
//! without a deadline a socket would outlive its token (and a revoked user) for ever.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::pin::{pin, Pin};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::close_code;
use crate::hub::{Close, EventId, Frame, Registration};
use crate::settings::WsSettings;

/// A frame a client sent (pings, pongs and close frames are handled by the driver).
#[derive(Debug, Clone, Copy)]
pub enum Inbound<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// How a socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client sent a close frame.
    ClientClosed,
    /// The server closed it with this code (shutdown, resync, slow consumer, bad frames).
    ServerClosed(u16),
    /// No frame arrived within `WS_PONG_TIMEOUT`.
    HeartbeatTimeout,
    /// The connection broke without a close handshake.
    Disconnected,
}

type Handler = Box<dyn FnMut(Inbound<'_>) -> Option<Utf8Bytes> + Send>;

/// Why the read or write half stopped.
enum Stop {
    Close(Close),
    ClientClosed,
    Heartbeat,
    Gone,
}

/// Runs one socket: see the module documentation.
pub struct Driver<K>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
{
    socket: WebSocket,
    registration: Registration<K>,
    shutdown: CancellationToken,
    replay: Vec<Frame>,
    on_client: Handler,
    expires_at: Option<SystemTime>,
}

impl<K> Driver<K>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + Sync + 'static,
{
    /// A driver for `socket`, fed by `registration`; it closes with 1001 when
    /// `shutdown` is cancelled.
    pub fn new(socket: WebSocket, registration: Registration<K>, shutdown: CancellationToken) -> Self {
        Self { socket, registration, shutdown, replay: Vec::new(), on_client: Box::new(|_| None), expires_at: None }
    }

    /// When the socket's credentials expire (the token's `exp`): at that instant the
    /// socket is closed with [`close_code::TOKEN_EXPIRED`] (reason `token expired`,
    /// after a `{"type":"token_expired"}` frame), interrupting whatever it was doing.
    /// A time already past closes it right away.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Frames to send before any live frame. Live frames queued meanwhile whose event
    /// id is among these are skipped, and broadcasts of these ids from now on are
    /// counted as delivered without being queued: no gap, no duplicate at the seam.
    pub fn replay(mut self, frames: Vec<Frame>) -> Self {
        self.replay = frames;
        self
    }

    /// What to do with client text and binary frames: the handler may return a reply
    /// frame (sent in order with live frames; dropped if the client floods faster than
    /// it reads). By default client frames are ignored.
    pub fn on_client(mut self, handler: impl FnMut(Inbound<'_>) -> Option<Utf8Bytes> + Send + 'static) -> Self {
        self.on_client = Box::new(handler);
        self
    }

    /// Serves the socket until it ends, then unregisters it.
    pub async fn run(self) -> Ended {
        let Driver { socket, mut registration, shutdown, replay, mut on_client, expires_at } = self;
        let settings = registration.hub().settings().clone();
        let hub = registration.hub().name();
        let (mut sink, mut stream) = socket.split();
        let replies = Replies::default();
        let deadline = expires_at.map(instant_of);

        let stop = {
            let writer = write_loop(&mut sink, &mut registration, &shutdown, replay, &replies, &settings, hub);
            let reader = read_loop(&mut stream, &mut on_client, &replies, settings.pong_timeout);
            let expiry = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A due expiry wins over frames that are ready at the same time.
                biased;
                _ = expiry => {
                    metrics::counter!("ws_token_expired_closes_total", "hub" => hub).increment(1);
                    Stop::Close(token_expired())
                }
                stop = writer => stop,
                stop = reader => stop,
            }
        };
        // Closing: later broadcasts must not count this socket as delivered.
        registration.detach();
        let ended = finish(&mut sink, &mut stream, stop, &settings, hub).await;
        tracing::debug!(hub, key = ?registration.key(), connection = %registration.id(), ?ended, "socket finished");
        ended
    }

    /// Closes the socket right away with `close` (for example when the history to
    /// replay could not be read), then unregisters it.
    pub async fn close(self, close: Close) -> Ended {
        let Driver { socket, registration, .. } = self;
        registration.detach();
        let settings = registration.hub().settings().clone();
        let hub = registration.hub().name();
        let (mut sink, mut stream) = socket.split();
        finish(&mut sink, &mut stream, Stop::Close(close), &settings, hub).await
    }
}

/// The close of a socket whose token expired.
fn token_expired() -> Close {
    Close::new(close_code::TOKEN_EXPIRED, "token expired").with_farewell(Utf8Bytes::from_static(TOKEN_EXPIRED_FRAME))
}

/// The frame sent just before close 4003, for clients whose WebSocket API hides close codes.
const TOKEN_EXPIRED_FRAME: &str = r#"{"type":"token_expired"}"#;

/// The monotonic instant of a wall-clock time (now, when it is already past).
fn instant_of(at: SystemTime) -> Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    // Far-future expiries (or absurd ones) must not overflow the monotonic clock.
    let left = left.min(Duration::from_secs(100 * 365 * 24 * 3600));
    Instant::now() + left
}

/// Resolves once the hub asks this connection to close.
async fn close_requested(rx: &mut watch::Receiver<Option<Close>>) -> Close {
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(close) = current {
            return close;
        }
        if rx.changed().await.is_err() {
            let last = rx.borrow().clone();
            match last {
                Some(close) => return close,
                // The hub let go of this connection without a request: none will come.
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// Client replies waiting for the writer (at most [`MAX_REPLIES`]): a plain queue in
/// the socket's own task instead of a channel, whose first block of slots every
/// socket would allocate up front.
#[derive(Default)]
struct Replies {
    queue: Mutex<VecDeque<Utf8Bytes>>,
    ready: Notify,
}

/// Replies a client may have waiting; more are dropped (it floods faster than it reads).
const MAX_REPLIES: usize = 8;

/// Live frames written in one go (one flush, so usually one system call) when
/// several are queued, e.g. during a fan-out burst.
const MAX_BATCH: usize = 32;

impl Replies {
    fn push(&self, reply: Utf8Bytes) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if queue.len() >= MAX_REPLIES {
            return false;
        }
        queue.push_back(reply);
        drop(queue);
        self.ready.notify_one();
        true
    }

    fn take(&self) -> VecDeque<Utf8Bytes> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// Resolves once the socket must stop writing: shutdown, or a close the hub asked
/// for. Made once per socket and polled by every wait of its writer: building the
/// two waits again for each frame (a waiter registered and removed on each, twice
/// per frame) was a sixth of a busy socket pod's CPU in a 1,000-socket fan-out.
async fn stop_requested(close_rx: &mut watch::Receiver<Option<Close>>, shutdown: &CancellationToken) -> Stop {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Stop::Close(Close::going_away()),
        close = close_requested(close_rx) => Stop::Close(close),
    }
}

/// Runs a write, unless a stop (see [`stop_requested`]) comes first (a client that
/// does not read can block a write for ever).
async fn guarded<T>(
    write: impl std::future::Future<Output = Result<T, axum::Error>>,
    stopping: &mut Pin<&mut impl std::future::Future<Output = Stop>>,
) -> Result<T, Stop> {
    tokio::select! {
        biased;
        stop = stopping.as_mut() => Err(stop),
        written = write => written.map_err(|_| Stop::Gone),
    }
}

/// The live frames that may repeat the replay: the first `left` frames queued
/// before the replay's ids were remembered.
struct Seam {
    left: usize,
    replayed: HashSet<EventId>,
}

impl Seam {
    /// Whether `frame` is a live copy of a replayed one (and so is not sent).
    fn skips(&mut self, frame: &Frame) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        frame.event_id().is_some_and(|id| self.replayed.contains(id)) && frame.then_close().is_none()
    }
}

/// Writes `first` and then whatever else is queued already (up to [`MAX_BATCH`]
/// frames), and flushes once. Returns how many frames it wrote and the close that
/// must follow if one of them was the connection's last.
async fn write_batch<S>(
    sink: &mut S,
    first: Frame,
    rx: &mut mpsc::Receiver<Frame>,
    seam: &mut Seam,
) -> Result<(u64, Option<Close>), axum::Error>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let mut next = Some(first);
    let mut written = 0;
    while let Some(frame) = next.take() {
        let (text, then_close) = frame.into_parts();
        sink.feed(Message::Text(text)).await?;
        written += 1;
        if let Some(close) = then_close {
            // The connection's last frame (Hub::send_last): send it, then close.
            sink.flush().await?;
            return Ok((written, Some(close)));
        }
        if written as usize >= MAX_BATCH {
            break;
        }
        while let Ok(frame) = rx.try_recv() {
            if !seam.skips(&frame) {
                next = Some(frame);
                break;
            }
        }
    }
    sink.flush().await?;
    Ok((written, None))
}

async fn write_loop<S, K>(
    sink: &mut S,
    registration: &mut Registration<K>,
    shutdown: &CancellationToken,
    replay: Vec<Frame>,
    replies: &Replies,
    settings: &WsSettings,
    hub: &'static str,
) -> Stop
where
    S: Sink<Message, Error = axum::Error> + Unpin,
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
{
    let frames_sent = metrics::counter!("ws_frames_sent_total", "hub" => hub);
    let ping_phase = registration.id().ping_phase();

    // The replay. Its ids are remembered first, so broadcasts stop queuing them; the
    // live frames queued before that are the only ones that can repeat the replay.
    let replayed: HashSet<EventId> = replay.iter().filter_map(|frame| frame.event_id().cloned()).collect();
    let left = if replayed.is_empty() { 0 } else { registration.remember(replayed.iter().cloned()) };
    let mut seam = Seam { left, replayed };
    let Registration { rx, close_rx, .. } = &mut *registration;
    let mut stopping = pin!(stop_requested(close_rx, shutdown));
    if !replay.is_empty() {
        let count = replay.len() as u64;
        let write = async {
            for frame in replay {
                sink.feed(Message::Text(frame.into_text())).await?;
            }
            sink.flush().await
        };
        if let Err(stop) = guarded(write, &mut stopping).await {
            return stop;
        }
        frames_sent.increment(count);
    }

    // The first ping at this connection's own phase of the period, then one per
    // period: 20,000 sockets reconnected in the same second after a deploy would
    // otherwise ping, and answer, in the same instant every period.
    let first = settings.ping_interval.mul_f64(ping_phase);
    let mut ping = tokio::time::interval_at(Instant::now() + first, settings.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reply_ready = pin!(replies.ready.notified());
    loop {
        let written = tokio::select! {
            biased;
            stop = stopping.as_mut() => return stop,
            _ = ping.tick() => {
                guarded(sink.send(Message::Ping(Bytes::new())), &mut stopping).await.map(|()| (0, None))
            }
            _ = reply_ready.as_mut() => {
                reply_ready.set(replies.ready.notified());
                let queued = replies.take();
                let count = queued.len() as u64;
                let write = async {
                    for reply in queued {
                        sink.feed(Message::Text(reply)).await?;
                    }
                    sink.flush().await
                };
                guarded(write, &mut stopping).await.map(|()| (count, None))
            }
            frame = rx.recv() => match frame {
                Some(frame) => {
                    if seam.skips(&frame) {
                        continue;
                    }
                    guarded(write_batch(sink, frame, rx, &mut seam), &mut stopping).await
                }
                // The hub dropped the queue: it asked to close (or is gone).
                None => {
                    return match stopping.as_mut().now_or_never() {
                        Some(stop) => stop,
                        None => Stop::Close(Close::going_away()),
                    }
                }
            },
        };
        match written {
            Err(stop) => return stop,
            Ok((count, then_close)) => {
                frames_sent.increment(count);
                if let Some(close) = then_close {
                    return Stop::Close(close);
                }
            }
        }
    }
}

async fn read_loop<S>(stream: &mut S, on_client: &mut Handler, replies: &Replies, pong_timeout: Duration) -> Stop
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    loop {
        // Any frame at all proves the client is alive; pongs answer our pings.
        let next = match tokio::time::timeout(pong_timeout, stream.next()).await {
            Ok(next) => next,
            Err(_) => return Stop::Heartbeat,
        };
        let reply = match next {
            None => return Stop::Gone,
            Some(Err(err)) => return stop_for(err),
            Some(Ok(Message::Close(_))) => return Stop::ClientClosed,
            Some(Ok(Message::Text(text))) => on_client(Inbound::Text(text.as_str())),
            Some(Ok(Message::Binary(data))) => on_client(Inbound::Binary(&data)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
        };
        if let Some(reply) = reply {
            if !replies.push(reply) {
                tracing::debug!("client sends faster than it reads; reply dropped");
            }
        }
    }
}

/// Maps a read error to how the socket should end.
fn stop_for(err: axum::Error) -> Stop {
    let inner = err.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => {
            Stop::Close(Close::new(close_code::MESSAGE_TOO_BIG, "frame larger than the server accepts"))
        }
        Some(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => {
            Stop::Close(Close::new(close_code::PROTOCOL_ERROR, "protocol error"))
        }
        _ => Stop::Gone,
    }
}

/// The close handshake, bounded by `WS_CLOSE_TIMEOUT`.
async fn finish<SI, ST>(sink: &mut SI, stream: &mut ST, stop: Stop, settings: &WsSettings, hub: &'static str) -> Ended
where
    SI: Sink<Message, Error = axum::Error> + Unpin,
    ST: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    match stop {
        Stop::Close(close) => {
            let code = close.code;
            let handshake = async {
                if let Some(text) = close.farewell {
                    sink.send(Message::Text(text)).await?;
                }
                let frame = CloseFrame { code, reason: Utf8Bytes::from(close.reason) };
                sink.send(Message::Close(Some(frame))).await?;
                // Wait for the client's close frame; anything it still sends is dropped.
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
                Ok::<(), axum::Error>(())
            };
            let _ = tokio::time::timeout(settings.close_timeout, handshake).await;
            Ended::ServerClosed(code)
        }
        Stop::ClientClosed => {
            // Flushes the close reply the protocol layer queued.
            let _ = tokio::time::timeout(settings.close_timeout, sink.close()).await;
            Ended::ClientClosed
        }
        Stop::Heartbeat => {
            metrics::counter!("ws_heartbeat_timeouts_total", "hub" => hub).increment(1);
            // The client is probably gone: try a close frame, but do not wait for a reply.
            let frame =
                CloseFrame { code: close_code::HEARTBEAT_TIMEOUT, reason: Utf8Bytes::from_static("heartbeat timeout") };
            let bound = settings.close_timeout.min(Duration::from_secs(1));
            let _ = tokio::time::timeout(bound, sink.send(Message::Close(Some(frame)))).await;
            Ended::HeartbeatTimeout
        }
        Stop::Gone => Ended::Disconnected,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use axum::extract::{State, WebSocketUpgrade};
    use axum::response::Response;
    use axum::routing::get;
    use axum::Router;
    use futures::{SinkExt, StreamExt};
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::Message as ClientMessage;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{Hub, WsSettings};

    #[derive(Clone)]
    struct Server {
        hub: Hub<u32>,
        expires_in: Option<Duration>,
        ended: mpsc::UnboundedSender<Ended>,
    }

    async fn upgrade(State(server): State<Server>, upgrade: WebSocketUpgrade) -> Response {
        let registration = server.hub.register(7).expect("room for a socket");
        upgrade.on_upgrade(move |socket| async move {
            let mut driver = Driver::new(socket, registration, CancellationToken::new());
            if let Some(expires_in) = server.expires_in {
                driver = driver.expires_at(SystemTime::now() + expires_in);
            }
            let _ = server.ended.send(driver.run().await);
        })
    }

    /// A socket served by a driver whose token expires in `expires_in`.
    async fn socket(
        expires_in: Option<Duration>,
    ) -> (
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        mpsc::UnboundedReceiver<Ended>,
    ) {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        let server = Server { hub: Hub::new("test", WsSettings::default()), expires_in, ended };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        let app = Router::new().route("/ws", get(upgrade)).with_state(server);
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgraded");
        (ws, ended_rx)
    }

    /// The frames a client sees until the close, and the close's code and reason.
    async fn until_close(
        ws: &mut (impl futures::Stream<Item = Result<ClientMessage, tokio_tungstenite::tungstenite::Error>> + Unpin),
    ) -> (Vec<String>, Option<(u16, String)>) {
        let mut texts = Vec::new();
        while let Some(Ok(message)) = ws.next().await {
            match message {
                ClientMessage::Text(text) => texts.push(text.to_string()),
                ClientMessage::Close(frame) => {
                    return (texts, frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                _ => {}
            }
        }
        (texts, None)
    }

    #[tokio::test]
    async fn a_socket_is_closed_with_4003_when_its_token_expires() {
        let opened = tokio::time::Instant::now();
        let (mut ws, mut ended) = socket(Some(Duration::from_millis(800))).await;
        let (texts, close) = tokio::time::timeout(Duration::from_secs(5), until_close(&mut ws)).await.expect("closed");
        let took = opened.elapsed();
        assert!(took >= Duration::from_millis(750), "closed too early: {took:?}");
        assert!(took < Duration::from_millis(2_000), "closed too late: {took:?}");
        assert_eq!(texts, vec![TOKEN_EXPIRED_FRAME.to_owned()]);
        assert_eq!(close, Some((close_code::TOKEN_EXPIRED, "token expired".to_owned())));
        // Reading on sends the client's close reply, which ends the handshake.
        let _ = ws.next().await;
        let ended = tokio::time::timeout(Duration::from_secs(6), ended.recv()).await.expect("driver ended");
        assert_eq!(ended, Some(Ended::ServerClosed(close_code::TOKEN_EXPIRED)));
    }

    #[tokio::test]
    async fn an_expiry_already_past_closes_at_once() {
        let (mut ws, _ended) = socket(Some(Duration::ZERO)).await;
        let (_, close) = tokio::time::timeout(Duration::from_secs(2), until_close(&mut ws)).await.expect("closed");
        assert_eq!(close.map(|(code, _)| code), Some(close_code::TOKEN_EXPIRED));
    }

    /// A socket whose hub the test holds, with `on_client` answering `ping` with `pong`.
    async fn socket_on(
        hub: Hub<u32>,
    ) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route(
                "/ws",
                get(|State(hub): State<Hub<u32>>, upgrade: WebSocketUpgrade| async move {
                    let registration = hub.register(7).expect("room for a socket");
                    // Frames broadcast before the upgrade completes queue up and go out in batches.
                    hub.settings().configure(upgrade).on_upgrade(move |socket| async move {
                        Driver::new(socket, registration, CancellationToken::new())
                            .on_client(|frame| match frame {
                                Inbound::Text("ping") => Some(Utf8Bytes::from_static("pong")),
                                _ => None,
                            })
                            .run()
                            .await;
                    })
                }),
            )
            .with_state(hub);
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgraded");
        ws
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_across_batches_and_a_last_frame_closes_after_them() {
        let hub: Hub<u32> = Hub::new("test", WsSettings::default());
        let mut ws = socket_on(hub.clone()).await;
        // Registered during the upgrade: wait for it, then queue more than one batch.
        while hub.connections_of(&7) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let count = MAX_BATCH * 2 + 5;
        for i in 0..count {
            assert_eq!(hub.broadcast(&7, Frame::event(format!("e{i}"), format!("f{i}"))).delivered, 1);
        }
        let removed = Close::new(close_code::REMOVED, "removed");
        hub.send_last(&7, Frame::event("last", "the last"), removed, |_| true);
        let (texts, close) = tokio::time::timeout(Duration::from_secs(5), until_close(&mut ws)).await.expect("closed");
        let mut expected: Vec<String> = (0..count).map(|i| format!("f{i}")).collect();
        expected.push("the last".to_owned());
        assert_eq!(texts, expected);
        assert_eq!(close.map(|(code, _)| code), Some(close_code::REMOVED));
    }

    #[tokio::test]
    async fn client_frames_get_their_replies() {
        let hub: Hub<u32> = Hub::new("test", WsSettings::default());
        let mut ws = socket_on(hub).await;
        for _ in 0..3 {
            ws.send(ClientMessage::text("ping")).await.expect("sent");
            let reply = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("a reply");
            assert!(matches!(reply, Some(Ok(ClientMessage::Text(text))) if text.as_str() == "pong"));
        }
    }

    #[tokio::test]
    async fn without_an_expiry_the_socket_stays_open() {
        let (mut ws, _ended) = socket(None).await;
        assert!(tokio::time::timeout(Duration::from_millis(1_200), ws.next()).await.is_err(), "nothing arrives");
    }

    #[test]
    fn far_future_expiries_do_not_overflow() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 100);
        assert!(instant_of(far) > Instant::now());
        assert!(instant_of(SystemTime::UNIX_EPOCH) <= Instant::now());
    }
}
