//! Bots and the AI assistant, end to end: the real chatpersistence, socket pod and
//! change handler against a small local server speaking the OpenAI-compatible
//! chat-completions API.
//!
//! Why this test exists: a bot's answer travels the whole fleet (capture → the `bots`
//! pipeline → the model → `POST /chat/bot-messages` → capture → the user's socket), and
//! the promises are end-to-end ones: the user gets one answer, in 1:1 and on `/ai` in a
//! group (and no answer to ordinary group chatter); a model that is down gives a clear
//! message and never costs the user's own message; a redelivered question is not
//! answered twice.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use chatfleet_tests::client::{self, ChatSocket, Seen};
use chatfleet_tests::{token, Service, Stack, SERVICE_TOKEN};
use serde_json::{json, Value};

const MODEL: &str = "test-model";
const API_KEY: &str = "test-api-key";
const FAILURE: &str = "The assistant is unavailable right now; please try again later.";

/// What the fake model does with a request.
const ANSWER: u8 = 0;
const FAIL_500: u8 = 1;
const HANG: u8 = 2;

/// A local OpenAI-compatible `/v1/chat/completions`.
#[derive(Clone, Default)]
struct FakeModel {
    mode: Arc<AtomicU8>,
    calls: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeModel {
    async fn start() -> (Self, String) {
        let model = Self::default();
        let app = Router::new().route("/v1/chat/completions", post(completions)).with_state(model.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        (model, format!("http://{addr}/v1"))
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().expect("lock").clone()
    }
}

async fn completions(
    State(model): State<FakeModel>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let n = model.calls.fetch_add(1, Ordering::SeqCst) + 1;
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {API_KEY}")) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "bad key"}})));
    }
    if body["model"] != MODEL {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "unknown model"}})));
    }
    model.requests.lock().expect("lock").push(body.clone());
    match model.mode.load(Ordering::SeqCst) {
        FAIL_500 => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": {"message": "down"}}))),
        HANG => tokio::time::sleep(Duration::from_secs(30)).await,
        _ => {}
    }
    let last = body["messages"].as_array().and_then(|m| m.last()).cloned().unwrap_or(Value::Null);
    let content = format!("answer #{n} to [{}]", last["content"].as_str().unwrap_or_default());
    (StatusCode::OK, Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})))
}

/// chatpersistence, the socket pod and the change handler, with `BOTS=assistant`.
struct BotFleet {
    stack: Stack,
    persistence: Service,
    sockets: Service,
    handler: Service,
}

impl BotFleet {
    fn start(model_url: &str, extra: &[(&str, &str)]) -> Self {
        let stack = Stack::start();
        let mut base = stack.pipeline_env();
        for (k, v) in [
            ("KAFKA_GROUP_ID", testkit::unique("chat-ws").as_str()),
            ("BOTS", "assistant"),
            ("AI_BASE_URL", model_url),
            ("AI_MODEL", MODEL),
            ("AI_API_KEY", API_KEY),
            ("AI_TIMEOUT", "2s"),
            ("AI_MAX_RETRIES", "2"),
            ("AI_FAILURE_MESSAGE", FAILURE),
        ] {
            base.push((k.to_owned(), v.to_owned()));
        }
        base.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let persistence = Service::start("chatpersistence", &base);
        base.push(("CHATPERSISTENCE_INTERNAL_URL".into(), persistence.internal_url("")));
        let sockets = Service::start("chatwebsocketshandler", &base);
        let mut handler_env = base;
        handler_env.push(("CHAT_WEBSOCKET_URL".into(), sockets.internal_url("")));
        handler_env.push(("NOTIFICATIONS_URL".into(), String::new()));
        let handler = Service::start("chatpersistencechangehandler", &handler_env);
        Self { stack, persistence, sockets, handler }
    }

    async fn group_history(&self, user: &str, group: &str) -> Vec<Value> {
        let response = chatfleet_tests::ws::http()
            .get(self.persistence.url(&format!("/chat/messages?conversation_id={group}&limit=200")))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("history");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("JSON");
        body["messages"].as_array().cloned().unwrap_or_default()
    }

    async fn create_group(&self, owner: &str, members: &[&str]) -> String {
        let response = chatfleet_tests::ws::http()
            .post(self.persistence.url("/chat/conversations"))
            .bearer_auth(token(owner))
            .json(&json!({"title": "team", "members": members}))
            .send()
            .await
            .expect("create group");
        assert_eq!(response.status().as_u16(), 201);
        let body: Value = response.json().await.expect("JSON");
        body["conversation_id"].as_str().expect("conversation_id").to_owned()
    }

    async fn post_group(&self, sender: &str, group: &str, content: &str) -> String {
        let response = chatfleet_tests::ws::http()
            .post(self.persistence.url("/chat/messages"))
            .bearer_auth(token(sender))
            .json(&json!({"sender_id": sender, "conversation_id": group, "content": content}))
            .send()
            .await
            .expect("post");
        assert_eq!(response.status().as_u16(), 201);
        let body: Value = response.json().await.expect("JSON");
        body["message_id"].as_str().expect("message_id").to_owned()
    }

    async fn bot_post(&self, auth: Option<&str>, body: Value) -> (u16, Value) {
        let mut request =
            chatfleet_tests::ws::http().post(self.persistence.internal_url("/chat/bot-messages")).json(&body);
        if let Some(auth) = auth {
            request = request.bearer_auth(auth);
        }
        let response = request.send().await.expect("bot-messages");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn from_bot(messages: &[Value]) -> Vec<Value> {
    messages.iter().filter(|m| m["sender_id"] == "assistant").cloned().collect()
}

/// Waits (up to `within`) until `user`'s pair history with `peer` has `n` bot messages.
async fn pair_replies(fleet: &BotFleet, user: &str, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let history = client::history(&fleet.persistence, user, "assistant").await;
        if from_bot(&history).len() >= n || Instant::now() > deadline {
            return history;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_answers_a_one_to_one_message_once_on_the_users_socket() {
    let (model, url) = FakeModel::start().await;
    let fleet = BotFleet::start(&url, &[]);
    let mut socket = ChatSocket::connect(&fleet.sockets, "alice", "assistant", None).await;
    let (status, posted) =
        client::post(&fleet.persistence, "alice", "assistant", "What is the capital of France?", Some("q-1")).await;
    assert_eq!(status, 201, "{posted}");
    let question = posted["message_id"].as_str().expect("id").to_owned();

    // The socket sees the question and exactly one answer from the bot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut answers = Vec::new();
    let mut seen_question = 0;
    while tokio::time::Instant::now() < deadline {
        let wait = if answers.is_empty() { deadline - tokio::time::Instant::now() } else { Duration::from_secs(3) };
        match socket.next(wait).await {
            Seen::Frame(frame) if frame["type"] == "message" => {
                if frame["message"]["message_id"] == question.as_str() {
                    seen_question += 1;
                } else if frame["message"]["sender_id"] == "assistant" {
                    answers.push(frame["message"].clone());
                }
            }
            Seen::Frame(_) => {}
            Seen::Closed(code) => panic!("socket closed: {code:?}"),
            Seen::Nothing => break,
        }
    }
    assert_eq!(seen_question, 1, "the question is delivered once");
    assert_eq!(answers.len(), 1, "one answer on the socket: {answers:?}\n{}", fleet.handler.log_tail(30));
    let answer = &answers[0];
    assert_eq!(answer["receiver_id"], "alice");
    assert!(
        answer["content"].as_str().unwrap_or_default().contains("alice: What is the capital of France?"),
        "{answer}"
    );

    // The model saw the question with the sender prefixed, a system prompt first.
    let requests = model.requests();
    assert_eq!(requests.len(), 1, "one model call");
    let messages = requests[0]["messages"].as_array().expect("messages");
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages.last().expect("last")["role"], "user");

    // Stored like any message: in history, after the question.
    let history = client::history(&fleet.persistence, "alice", "assistant").await;
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0]["message_id"], question.as_str());
    assert_eq!(history[1]["message_id"], answer["message_id"]);

    // A follow-up carries the conversation so far as context, the bot's turn as assistant.
    let (status, _) = client::post(&fleet.persistence, "alice", "assistant", "And of Italy?", None).await;
    assert_eq!(status, 201);
    let history = pair_replies(&fleet, "alice", 2, Duration::from_secs(30)).await;
    assert_eq!(from_bot(&history).len(), 2, "{history:?}");
    let requests = model.requests();
    let roles: Vec<&str> =
        requests[1]["messages"].as_array().expect("messages").iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    socket.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_the_bot_answers_ai_mentions_only() {
    let (model, url) = FakeModel::start().await;
    let fleet = BotFleet::start(&url, &[]);
    let group = fleet.create_group("alice", &["bob", "assistant"]).await;
    fleet.post_group("alice", &group, "hello everyone").await;
    fleet.post_group("bob", &group, "hi alice").await;
    let ask = fleet.post_group("alice", &group, "/ai summarize the chat please").await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut history = Vec::new();
    while Instant::now() < deadline {
        history = fleet.group_history("bob", &group).await;
        if !from_bot(&history).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing more arrives: ordinary messages are not answered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let history = if from_bot(&history).is_empty() { history } else { fleet.group_history("bob", &group).await };
    let replies = from_bot(&history);
    assert_eq!(replies.len(), 1, "one reply, to the /ai message only: {history:?}\n{}", fleet.handler.log_tail(30));
    assert_eq!(history.last().expect("last")["sender_id"], "assistant");
    let mut recipients: Vec<&str> =
        replies[0]["recipients"].as_array().expect("recipients").iter().filter_map(Value::as_str).collect();
    recipients.sort_unstable();
    assert_eq!(recipients, ["alice", "bob"], "delivered to the group like any message");
    assert_eq!(model.calls(), 1);
    let request = &model.requests()[0];
    let contents: Vec<&str> =
        request["messages"].as_array().expect("messages").iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(&contents[1..], ["alice: hello everyone", "bob: hi alice", "alice: summarize the chat please"]);
    assert!(!ask.is_empty());

    // The internal door: service token, configured bots only, members only.
    let body = json!({"sender_id": "mallory", "conversation_id": group, "content": "x", "client_message_id": "m-1"});
    assert_eq!(fleet.bot_post(Some(SERVICE_TOKEN), body.clone()).await.0, 403, "not a bot");
    let as_bot = json!({"sender_id": "assistant", "conversation_id": group, "content": "x"});
    assert_eq!(fleet.bot_post(None, as_bot.clone()).await.0, 401, "no service token");
    let status = fleet.bot_post(Some(&token("alice")), as_bot).await.0;
    assert!(matches!(status, 401 | 403), "a user token is not a service token: {status}");
    let other = fleet.create_group("carol", &["dave"]).await;
    let outside = json!({"sender_id": "assistant", "conversation_id": other, "content": "x"});
    let (status, body) = fleet.bot_post(Some(SERVICE_TOKEN), outside).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("not_a_member")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_outage_gives_a_clear_message_and_keeps_the_users_message() {
    let (model, url) = FakeModel::start().await;
    model.set(FAIL_500);
    let fleet = BotFleet::start(&url, &[("AI_TIMEOUT", "1s")]);
    let (status, posted) = client::post(&fleet.persistence, "alice", "assistant", "are you there?", None).await;
    assert_eq!(status, 201);
    let history = pair_replies(&fleet, "alice", 1, Duration::from_secs(60)).await;
    assert_eq!(history.len(), 2, "{history:?}\n{}", fleet.handler.log_tail(30));
    assert_eq!(history[0]["message_id"], posted["message_id"], "the user's message is stored");
    assert_eq!(history[1]["content"], FAILURE);
    assert_eq!(model.calls(), 3, "the first call and AI_MAX_RETRIES=2 retries");

    // A model that hangs past AI_TIMEOUT: the same polite answer.
    model.set(HANG);
    let (status, _) = client::post(&fleet.persistence, "bob", "assistant", "hello?", None).await;
    assert_eq!(status, 201);
    let history = pair_replies(&fleet, "bob", 1, Duration::from_secs(60)).await;
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["content"], FAILURE);

    // The model is back: the next question gets a real answer.
    model.set(ANSWER);
    let (status, _) = client::post(&fleet.persistence, "alice", "assistant", "now?", None).await;
    assert_eq!(status, 201);
    let history = pair_replies(&fleet, "alice", 2, Duration::from_secs(60)).await;
    let replies = from_bot(&history);
    assert_eq!(replies.len(), 2, "{history:?}");
    assert!(replies[1]["content"].as_str().unwrap_or_default().contains("alice: now?"), "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_question_is_not_answered_twice() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message;

    let (model, url) = FakeModel::start().await;
    let mut fleet = BotFleet::start(&url, &[]);
    let (status, posted) = client::post(&fleet.persistence, "alice", "assistant", "question one", None).await;
    assert_eq!(status, 201);
    let question = posted["message_id"].as_str().expect("id").to_owned();
    let history = pair_replies(&fleet, "alice", 1, Duration::from_secs(60)).await;
    assert_eq!(from_bot(&history).len(), 1);
    assert_eq!(model.calls(), 1);

    // A duplicate record after the event store forgot it (Redis flushed): the bot
    // answers again (the model says something else this time) and the reply's
    // client_message_id keeps it from being stored a second time.
    assert!(testkit::probe(fleet.stack.redis.port(), b"FLUSHALL\r\n").is_some_and(|r| r.contains("OK")));
    let reader = chatfleet_tests::topic_reader(&fleet.stack.broker.bootstrap(), "chat.changes");
    let (key, payload) = loop {
        let record = tokio::time::timeout(Duration::from_secs(20), reader.recv())
            .await
            .expect("the question is on chat.changes")
            .expect("record");
        let payload = record.payload().unwrap_or_default();
        if String::from_utf8_lossy(payload).contains(&question) {
            break (record.key().unwrap_or_default().to_vec(), payload.to_vec());
        }
    };
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", fleet.stack.broker.bootstrap())
        .create()
        .expect("producer");
    producer
        .send(FutureRecord::to("chat.changes").key(&key).payload(&payload), Duration::from_secs(10))
        .await
        .expect("duplicate produced");
    assert!(
        chatfleet_tests::eventually(Duration::from_secs(30), || model.calls() >= 2).await,
        "the duplicate reached the bot\n{}",
        fleet.handler.log_tail(30)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = client::history(&fleet.persistence, "alice", "assistant").await;
    assert_eq!(from_bot(&history).len(), 1, "still one answer: {history:?}");

    // The change handler killed while the model is thinking: after the restart the
    // question is answered, once.
    model.set(HANG);
    let (status, _) = client::post(&fleet.persistence, "alice", "assistant", "question two", None).await;
    assert_eq!(status, 201);
    let calls = model.calls();
    assert!(
        chatfleet_tests::eventually(Duration::from_secs(30), || model.calls() > calls).await,
        "the bot asked the model"
    );
    fleet.handler.kill();
    model.set(ANSWER);
    fleet.handler.restart();
    let history = pair_replies(&fleet, "alice", 2, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let history = if from_bot(&history).len() == 2 {
        client::history(&fleet.persistence, "alice", "assistant").await
    } else {
        history
    };
    let replies = from_bot(&history);
    assert_eq!(replies.len(), 2, "each question answered once: {history:?}\n{}", fleet.handler.log_tail(30));
    assert!(replies[1]["content"].as_str().unwrap_or_default().contains("question two"), "{history:?}");
}
