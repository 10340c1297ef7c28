//! Tokens on open sockets and in URLs, black-box: the real socket services and
//! chatpersistence on free ports, real WebSocket clients.
//!
//! A socket is authenticated once, at the upgrade; these tests show it does not
//! outlive its token: at the token's `exp` the chat and the notification socket get
//! a `{"type":"token_expired"}` frame and close 4003 (get a fresh token, reconnect
//! with `since`), while a socket of the same user with a longer-lived token stays
//! open. And a token in the query string, valid or not, is refused outside the two
//! subscribe routes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatfleet_tests::client::stream_id;
use chatfleet_tests::ws::{expect_quiet, next, Got, Ws};
use chatfleet_tests::{token, Service, JWT_SECRET, SERVICE_TOKEN};
use testkit::{Mongo, Redis};

/// `wsfanout::close_code::TOKEN_EXPIRED`.
const TOKEN_EXPIRED: u16 = 4003;

fn env(extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("JWT_SECRET".into(), JWT_SECRET.into()),
        ("INTERNAL_SERVICE_TOKEN".into(), SERVICE_TOKEN.into()),
        ("LOG_LEVEL".into(), "info".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    env
}

/// A token for `user` whose `exp` is `seconds` from now (whole seconds, as JWTs have).
fn short_token(user: &str, seconds: u64) -> (String, SystemTime) {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() + seconds;
    (chatauth::mint_hs256_expiring_at(JWT_SECRET, user, exp), UNIX_EPOCH + Duration::from_secs(exp))
}

async fn connect(service: &Service, path: &str) -> Ws {
    match chatfleet_tests::ws_connect(service.ws_url(path)).await {
        Ok((ws, _)) => ws,
        Err(err) => panic!("could not subscribe to {}: {err}; log:\n{}", service.name, service.log_tail(30)),
    }
}

/// The socket must stay open until `exp`, then say `token_expired` and close 4003 promptly.
async fn expect_closed_at_expiry(ws: &mut Ws, exp: SystemTime, what: &str) {
    let before = exp.duration_since(SystemTime::now()).unwrap_or_default().saturating_sub(Duration::from_millis(300));
    expect_quiet(ws, before).await;
    match next(ws, Duration::from_secs(5)).await {
        Got::Json(frame) => assert_eq!(frame["type"], "token_expired", "{what}: {frame}"),
        other => panic!("{what}: expected the token_expired frame, got {other:?}"),
    }
    match next(ws, Duration::from_secs(2)).await {
        Got::Close(code) => assert_eq!(code, Some(TOKEN_EXPIRED), "{what}"),
        other => panic!("{what}: expected close 4003, got {other:?}"),
    }
    let now = SystemTime::now();
    // The server closes at exp by its clock (the same machine's): not before, and promptly.
    assert!(now + Duration::from_millis(50) >= exp, "{what}: closed before the token expired");
    let late = now.duration_since(exp).unwrap_or_default();
    assert!(late < Duration::from_millis(1_500), "{what}: closed {late:?} after the token expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_socket_closes_with_4003_when_its_token_expires() {
    let sockets = Service::start(
        "chatwebsocketshandler",
        // Nothing to replay from: no chatpersistence is needed.
        &env(&[("CHATPERSISTENCE_INTERNAL_URL", "http://127.0.0.1:9".into())]),
    );
    let stream = stream_id("alice", "bob");
    let base = format!("/chat/subscribe?stream_id={stream}&sender_id=alice&receiver_id=bob");
    let (short, exp) = short_token("alice", 3);
    let mut expiring = connect(&sockets, &format!("{base}&access_token={short}")).await;
    let mut lasting = connect(&sockets, &format!("{base}&access_token={}", token("alice"))).await;
    expect_closed_at_expiry(&mut expiring, exp, "chat socket").await;
    // The same user's socket with a token valid for an hour is untouched.
    expect_quiet(&mut lasting, Duration::from_millis(500)).await;
    let metrics = reqwest::get(sockets.url("/metrics")).await.expect("metrics").text().await.unwrap_or_default();
    assert!(
        metrics.lines().any(|l| l.starts_with("ws_token_expired_closes_total") && l.ends_with(" 1")),
        "metric: {}",
        metrics.lines().filter(|l| l.contains("token_expired")).collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_socket_closes_with_4003_when_its_token_expires() {
    let redis = Redis::start();
    let notifications = Service::start("generalnotificationshandler", &env(&[("REDIS_URL", redis.url())]));
    let (short, exp) = short_token("carol", 3);
    let mut expiring =
        connect(&notifications, &format!("/notifications/subscribe?user_id=carol&access_token={short}")).await;
    let mut lasting =
        connect(&notifications, &format!("/notifications/subscribe?user_id=carol&access_token={}", token("carol")))
            .await;
    expect_closed_at_expiry(&mut expiring, exp, "notification socket").await;
    expect_quiet(&mut lasting, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_query_is_refused_outside_the_subscribe_routes() {
    let mongo = Mongo::start();
    let persistence =
        Service::start("chatpersistence", &env(&[("MONGODB_URI", mongo.uri()), ("CAPTURE_MODE", "debezium".into())]));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let history = persistence.url(&format!("/chat/messages?peer_id=bob&stream_id={}", stream_id("alice", "bob")));
    // The same valid token: in the header it reads the history ...
    let by_header = http.get(&history).bearer_auth(token("alice")).send().await.expect("answers");
    assert_eq!(by_header.status().as_u16(), 200);
    // ... in the query string it is refused, alone or next to a valid header.
    let in_query = format!("{history}&access_token={}", token("alice"));
    let response = http.get(&in_query).send().await.expect("answers");
    assert_eq!(response.status().as_u16(), 401);
    let body: serde_json::Value = response.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let both = http.get(&in_query).bearer_auth(token("alice")).send().await.expect("answers");
    assert_eq!(both.status().as_u16(), 401);
    // Not logged either: no JWT (its header part) appears in the service's log.
    let alice = token("alice");
    let header = alice.split('.').next().expect("a JWT has a header");
    assert!(!persistence.log_tail(500).contains(header), "a token appeared in the log");
}
