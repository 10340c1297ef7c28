//! Failing open: a store whose Redis dies, stalls or is not there yet answers promptly
//! with `Unavailable`, never panics or hangs, and heals by itself once Redis is back.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, settings, store};
use eventstore::{Claim, RedisEventStore};
use testkit::Redis;

/// Generous bound for one operation whose timeout is 500 ms.
const PROMPT: Duration = Duration::from_secs(2);
/// How long a store may take to notice that Redis is back.
const HEAL: Duration = Duration::from_secs(15);

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let value = f.await;
    (value, start.elapsed())
}

/// Claims fresh keys until one is acquired; returns how long that took.
async fn heals(store: &RedisEventStore) -> Duration {
    let mut n = 0;
    let (_, took) = eventually(HEAL, || {
        n += 1;
        let key = store.key(&format!("probe-{n}"), "stream");
        async move {
            match store.claim(&key).await {
                Claim::Acquired(token) => {
                    store.release(&key, token).await;
                    Some(())
                }
                Claim::Unavailable => None,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|| panic!("the store did not heal within {HEAL:?}"));
    took
}

async fn dedup_works(store: &RedisEventStore, name: &str) {
    let key = store.key(name, "stream");
    match store.claim(&key).await {
        Claim::Acquired(token) => store.mark_done(&key, token).await,
        other => panic!("expected Acquired, got {other:?}"),
    }
    assert_eq!(store.claim(&key).await, Claim::AlreadyDone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_open_promptly_and_the_same_store_heals() {
    let mut redis = Redis::start();
    let store = store(&settings(&redis.url()));
    dedup_works(&store, "before").await;
    assert!(store.is_up());
    let done_key = store.key("before", "stream");

    // Leases taken before the outage, to finish during it.
    let to_finish = store.key("finish", "stream");
    let to_release = store.key("release", "stream");
    let Claim::Acquired(finish_token) = store.claim(&to_finish).await else { panic!("acquire") };
    let Claim::Acquired(release_token) = store.claim(&to_release).await else { panic!("acquire") };

    tokio::task::block_in_place(|| redis.stop());

    for i in 0..5 {
        let (claim, took) = timed(store.claim(&store.key(&format!("during-{i}"), "stream"))).await;
        assert_eq!(claim, Claim::Unavailable, "attempt {i}");
        assert!(took < PROMPT, "attempt {i} took {took:?}");
    }
    // Even a key that is done answers Unavailable: nobody can tell.
    assert_eq!(store.claim(&done_key).await, Claim::Unavailable);
    let ((), took) = timed(store.mark_done(&to_finish, finish_token)).await;
    assert!(took < PROMPT, "mark_done took {took:?}");
    let ((), took) = timed(store.release(&to_release, release_token)).await;
    assert!(took < PROMPT, "release took {took:?}");
    let (is_done, took) = timed(store.is_done(&done_key)).await;
    assert!(is_done.is_err() && took < PROMPT, "{is_done:?} after {took:?}");
    let (ping, took) = timed(store.ping()).await;
    assert!(ping.is_err() && took < PROMPT, "{ping:?} after {took:?}");
    assert!(!store.is_up(), "the store must report itself down");

    // Many concurrent callers during the outage: all return promptly.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.spawn(async move { store.claim(&store.key(&format!("burst-{i}"), "s")).await });
    }
    while let Some(claim) = tasks.join_next().await {
        assert_eq!(claim.expect("task"), Claim::Unavailable);
    }
    assert!(started.elapsed() < PROMPT, "a burst took {:?}", started.elapsed());

    tokio::task::block_in_place(|| redis.restart());
    let took = heals(&store).await;
    eprintln!("healed {took:?} after redis came back");
    assert!(store.is_up());
    dedup_works(&store, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_created_while_redis_is_down_works_once_it_is_up() {
    let mut redis = Redis::start();
    redis.stop();
    let store = store(&settings(&redis.url()));
    let (claim, took) = timed(store.claim(&store.key("early", "stream"))).await;
    assert_eq!(claim, Claim::Unavailable);
    assert!(took < PROMPT, "took {took:?}");
    assert!(!store.is_up());

    tokio::task::block_in_place(|| redis.restart());
    let took = heals(&store).await;
    eprintln!("connected {took:?} after redis came up");
    dedup_works(&store, "late").await;
    assert!(store.ping().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_times_out_instead_of_hanging() {
    let redis = Redis::start();
    let store = store(&settings(&redis.url()));
    dedup_works(&store, "before").await;

    redis.pause();
    for i in 0..3 {
        let (claim, took) = timed(store.claim(&store.key(&format!("stalled-{i}"), "stream"))).await;
        assert_eq!(claim, Claim::Unavailable, "attempt {i}");
        assert!(took < PROMPT, "attempt {i} took {took:?}");
    }
    assert!(!store.is_up());
    redis.resume();

    let took = heals(&store).await;
    eprintln!("healed {took:?} after redis resumed");
    dedup_works(&store, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_reset_period_heals_too() {
    let mut redis = Redis::start();
    let store = store(&settings(&redis.url()));
    dedup_works(&store, "before").await;

    tokio::task::block_in_place(|| redis.stop());
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(7) {
        let (claim, took) = timed(store.claim(&store.key("during", "stream"))).await;
        assert_eq!(claim, Claim::Unavailable);
        assert!(took < PROMPT, "took {took:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::block_in_place(|| redis.restart());
    heals(&store).await;
    dedup_works(&store, "after").await;
}

/// A TCP proxy in front of Redis whose existing connections can be made to swallow
/// everything without closing, like a half-open connection after a network partition.
mod blackhole {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub struct Proxy {
        pub port: u16,
        connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    }

    impl Proxy {
        pub async fn start(upstream: u16) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let port = listener.local_addr().expect("proxy address").port();
            let connections: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
            let registry = connections.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    let dead = Arc::new(AtomicBool::new(false));
                    registry.lock().expect("registry").push(dead.clone());
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, dead.clone()));
                    tokio::spawn(pump(server_read, client_write, dead));
                }
            });
            Self { port, connections }
        }

        /// Every connection open now stops forwarding, forever, without closing.
        /// Connections made later work normally.
        pub fn blackhole_existing(&self) {
            for dead in self.connections.lock().expect("registry").iter() {
                dead.store(true, Ordering::SeqCst);
            }
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        dead: Arc<AtomicBool>,
    ) {
        let mut buf = [0u8; 4096];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if dead.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_without_closing_is_replaced() {
    let redis = Redis::start();
    let proxy = blackhole::Proxy::start(redis.port()).await;
    let store = store(&settings(&format!("redis://127.0.0.1:{}", proxy.port)));
    dedup_works(&store, "before").await;

    proxy.blackhole_existing();
    let (claim, took) = timed(store.claim(&store.key("silent", "stream"))).await;
    assert_eq!(claim, Claim::Unavailable);
    assert!(took < PROMPT, "took {took:?}");

    // Nothing closes the dead connection; the store must give up on it by itself.
    let took = heals(&store).await;
    eprintln!("replaced a silent connection after {took:?}");
    dedup_works(&store, "after").await;
}
