//! emailhandler end to end: real Redis, broker, MongoDB wire server and SMTP sink, the
//! real binary, records in exactly the capture format (`ChangeEvent::to_flattened()`;
//! domain documents plus `__op`/`__source_ts_ms`), mail read back from the sink's
//! files and parsed as MIME. One test drives chat messages through the whole chat
//! pipeline (chatpersistence → relay → chat.changes) instead of producing them.

use std::time::{Duration, Instant};

use chatfleet_tests::{client, http_status, ChatFleet, Service, Stack};
use chatstream::ChangeEvent;
use kafkawrapper::{KafkaSettings, Producer};
use mailparse::MailHeaderMap;
use mongodb::bson::{doc, Document};
use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::{json, Value};
use testkit::{probe, SmtpSink};

const DLT: &str = "email.dlq";
const DOMAIN_TOPICS: [&str; 3] = ["purchases.changes", "payments.changes", "shipments.changes"];

/// One received email, decoded.
#[derive(Debug, Clone)]
struct Mail {
    to: String,
    subject: String,
    kind: String,
    message_id: String,
    text: String,
    html: String,
}

fn parse_mail(raw: &str) -> Mail {
    let parsed = mailparse::parse_mail(raw.as_bytes()).expect("the sink stores valid MIME");
    let header = |name: &str| parsed.headers.get_first_value(name).unwrap_or_default();
    let mut text = String::new();
    let mut html = String::new();
    for part in &parsed.subparts {
        match part.ctype.mimetype.as_str() {
            "text/plain" => text = part.get_body().expect("text body"),
            "text/html" => html = part.get_body().expect("html body"),
            _ => {}
        }
    }
    Mail {
        to: header("X-Envelope-To"),
        subject: header("Subject"),
        kind: header("X-Chatfleet-Kind"),
        message_id: header("Message-ID"),
        text,
        html,
    }
}

/// The servers, the SMTP sink, a running emailhandler and a producer.
struct Rig {
    stack: Stack,
    smtp: SmtpSink,
    email: Service,
    env: Vec<(String, String)>,
    producer: Producer,
    users: mongodb::Collection<Document>,
    digests: mongodb::Collection<Document>,
}

fn email_env(stack_env: Vec<(String, String)>, smtp: &SmtpSink, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = stack_env;
    env.push(("SMTP_HOST".into(), "127.0.0.1".into()));
    env.push(("SMTP_PORT".into(), smtp.port().to_string()));
    env.push(("SMTP_TIMEOUT".into(), "2s".into()));
    env.push(("EMAIL_DIGEST_WINDOW".into(), "1s".into()));
    env.push(("EMAIL_DIGEST_POLL_INTERVAL".into(), "100ms".into()));
    env.push(("MESSAGE_RETRY_INITIAL_INTERVAL".into(), "200ms".into()));
    env.push(("MESSAGE_RETRY_MAX_INTERVAL".into(), "1s".into()));
    env.push(("KAFKA_GROUP_ID".into(), testkit::unique("email")));
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env
}

async fn collections(mongo_uri: &str) -> (mongodb::Collection<Document>, mongodb::Collection<Document>) {
    let client = mongodb::Client::with_uri_str(mongo_uri).await.expect("mongo client");
    let db = client.database("chat");
    (db.collection("users"), db.collection("email_digests"))
}

async fn ensure_topics(brokers: &str) {
    let topics: Vec<(&str, i32)> =
        DOMAIN_TOPICS.iter().copied().chain([DLT, "chat.changes"]).map(|topic| (topic, 6)).collect();
    kafkawrapper::ensure_topics(brokers, &topics).await.expect("topics exist");
}

impl Rig {
    async fn start(extra: &[(&str, &str)]) -> Self {
        let stack = Stack::start();
        let smtp = SmtpSink::start();
        let env = email_env(stack.env(), &smtp, extra);
        let email = Service::start("emailhandler", &env);
        ensure_topics(&stack.broker.bootstrap()).await;
        let producer = Producer::new(&KafkaSettings::for_brokers(stack.broker.bootstrap())).expect("producer");
        let (users, digests) = collections(&stack.mongo.uri()).await;
        Self { stack, smtp, email, env, producer, users, digests }
    }

    async fn add_user(&self, user: &str, opt_in: bool) {
        add_user(&self.users, user, opt_in).await;
    }

    /// Produces a chat message in the relay's flattened format; returns the event.
    async fn chat(&self, from: &str, to: &str, content: &str) -> ChangeEvent {
        let event = chat_event(from, to, content);
        self.produce_chat(&event, None).await;
        event
    }

    async fn produce_chat(&self, event: &ChangeEvent, key: Option<&str>) {
        let payload = serde_json::to_vec(&event.to_flattened()).expect("json");
        let key = key.map(str::to_owned).unwrap_or_else(|| event.key());
        self.producer.send("chat.changes", key.as_bytes(), &payload, &[]).await.expect("produced");
    }

    async fn domain(&self, topic: &str, document: Value) -> Vec<u8> {
        let payload = serde_json::to_vec(&document).expect("json");
        self.produce_raw(topic, &payload).await;
        payload
    }

    async fn produce_raw(&self, topic: &str, payload: &[u8]) {
        self.producer.send(topic, b"bob", payload, &[]).await.expect("produced");
    }

    fn mails(&self) -> Vec<Mail> {
        self.smtp.messages().iter().map(|raw| parse_mail(raw)).collect()
    }

    /// Waits until the sink holds at least `count` messages; returns them all.
    async fn wait_for_mails(&self, count: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = Instant::now() + timeout;
        loop {
            let raw = self.smtp.messages();
            if raw.len() >= count {
                return raw.iter().map(|r| parse_mail(r)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} mails within {timeout:?}, got {}; emailhandler log:\n{}",
                raw.len(),
                self.email.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the metric (summed over series matching `labels`) reaches `at_least`.
    async fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64, timeout: Duration) -> f64 {
        wait_for_metric(&self.email, name, labels, at_least, timeout).await
    }

    fn set_online(&self, user: &str) {
        let reply = probe(self.stack.redis.port(), format!("SET presence:{user} 1 EX 300\r\n").as_bytes());
        assert!(reply.as_deref().is_some_and(|r| r.starts_with("+OK")), "SET presence: {reply:?}");
    }
}

async fn add_user(users: &mongodb::Collection<Document>, user: &str, opt_in: bool) {
    let display = format!("{}{} Tester", user[..1].to_uppercase(), &user[1..]);
    users
        .insert_one(doc! {
            "user_id": user, "email": format!("{user}@example.com"), "display_name": display, "email_opt_in": opt_in,
        })
        .await
        .expect("insert user");
}

fn chat_event(from: &str, to: &str, content: &str) -> ChangeEvent {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let id = uuid_v7();
    let document = json!({
        "_id": id, "message_id": id, "stream_id": client::stream_id(from, to), "sender_id": from,
        "receiver_id": to, "content": content, "created_at": now, "__op": "c", "__source_ts_ms": now,
        "__deleted": "false",
    });
    let event = ChangeEvent::parse(document.to_string().as_bytes()).expect("a valid change event");
    assert_eq!(event.to_flattened(), document, "the test writes exactly the relay's format");
    event
}

fn uuid_v7() -> String {
    chatstream::MessageId::new().to_string()
}

async fn metrics_text(service: &Service) -> String {
    reqwest::get(service.url("/metrics")).await.expect("metrics").text().await.expect("metrics text")
}

/// The sum of every series of `name` whose labels include `labels`.
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

async fn wait_for_metric(
    service: &Service,
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    timeout: Duration,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = metric_value(&metrics_text(service).await, name, labels);
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} stayed at {value} (< {at_least}) for {timeout:?}; log:\n{}",
            service.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn purchase(id: &str, user: &str, status: &str, ts: i64) -> Value {
    json!({"_id": id, "purchase_id": id, "user_id": user, "status": status, "amount_minor": 1999, "currency": "EUR",
           "updated_at": 1_767_225_600_000_i64, "__op": "c", "__source_ts_ms": ts})
}

/// Reads dead letters until `count` arrived or `timeout` passed.
async fn dead_letters(brokers: &str, count: usize, timeout: Duration) -> Vec<(Vec<(String, String)>, Vec<u8>)> {
    let consumer = chatfleet_tests::topic_reader(brokers, DLT);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(err)) => panic!("reading the dead-letter topic: {err}"),
            Ok(Ok(message)) => {
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((headers, message.payload().unwrap_or_default().to_vec()));
            }
        }
    }
    out
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default()
}

/// An offline recipient gets one digest for three messages sent through the real chat
/// pipeline, and hostile content is text (escaped) in the HTML part.
#[tokio::test]
async fn an_offline_recipient_gets_one_digest_with_hostile_content_escaped() {
    let fleet = ChatFleet::start(&[]);
    let smtp = SmtpSink::start();
    let env = email_env(fleet.stack.env(), &smtp, &[("EMAIL_DIGEST_WINDOW", "5s")]);
    let email = Service::start("emailhandler", &env);
    let (users, _) = collections(&fleet.stack.mongo.uri()).await;
    add_user(&users, "alice", true).await;
    add_user(&users, "bob", true).await;
    users.update_one(doc! {"user_id": "alice"}, doc! {"$set": {"display_name": "Alice Liddell"}}).await.expect("name");
    fleet.warm_up().await;
    wait_for_metric(&email, "kafka_messages_total", &[("topic", "chat.changes")], 1.0, Duration::from_secs(30)).await;

    let hostile = "<script>alert(1)</script>";
    for content in ["hi bob", hostile, "see you & bye"] {
        let (status, body) = client::post(&fleet.persistence, "alice", "bob", content, None).await;
        assert_eq!(status, 201, "{body}");
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while smtp.messages().is_empty() {
        assert!(Instant::now() < deadline, "no digest within 30 s; log:\n{}", email.log_tail(40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mails: Vec<Mail> = smtp.messages().iter().map(|raw| parse_mail(raw)).collect();
    assert_eq!(mails.len(), 1, "one digest, not one mail per message: {mails:#?}");
    let mail = &mails[0];
    assert_eq!(mail.to, "<bob@example.com>");
    assert_eq!(mail.kind, "chat_digest");
    assert_eq!(mail.subject, "3 new messages from Alice Liddell");
    for content in ["hi bob", hostile, "see you & bye"] {
        assert!(mail.text.contains(content), "the text part shows {content:?} as written:\n{}", mail.text);
    }
    assert!(mail.html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"), "escaped in HTML:\n{}", mail.html);
    assert!(mail.html.contains("see you &amp; bye"), "{}", mail.html);
    assert!(!mail.html.to_ascii_lowercase().contains("<script"), "no script tag in the HTML part:\n{}", mail.html);
}

/// Online, opted-out, unknown and address-less recipients get nothing (counted, not
/// retried: a later message on the same partition still gets through); a user whose
/// opt-in was written with `$set` (stored as 1 by nx-27017) is mailed; a recipient who
/// comes online before the digest goes out gets none either.
#[tokio::test]
async fn only_offline_opted_in_known_users_are_mailed() {
    // A window long enough to set frank's presence before his digest is due.
    let rig = Rig::start(&[("EMAIL_DIGEST_WINDOW", "3s")]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    rig.add_user("carol", false).await;
    rig.add_user("dave", false).await;
    rig.add_user("frank", true).await;
    rig.users.update_one(doc! {"user_id": "dave"}, doc! {"$set": {"email_opt_in": true}}).await.expect("opt in");
    rig.users.insert_one(doc! {"user_id": "erin", "display_name": "Erin", "email_opt_in": true}).await.expect("erin");
    let stored = rig.users.find_one(doc! {"user_id": "dave"}).await.expect("find").expect("dave");
    eprintln!("dave's email_opt_in as stored: {:?}", stored.get("email_opt_in"));
    rig.set_online("bob");

    // All on one partition (same key), the mailable one last.
    let key = "same-partition";
    for to in ["bob", "carol", "zed", "erin", "dave"] {
        rig.produce_chat(&chat_event("alice", to, &format!("hello {to}")), Some(key)).await;
    }
    let mails = rig.wait_for_mails(1, Duration::from_secs(30)).await;
    assert_eq!(mails[0].to, "<dave@example.com>", "{mails:#?}");
    assert_eq!(mails[0].subject, "1 new message from Alice Tester");
    for (reason, count) in [("online", 1.0), ("opted_out", 1.0), ("unknown_user", 1.0), ("no_email", 1.0)] {
        let value = metric_value(&metrics_text(&rig.email).await, "emails_skipped_total", &[("reason", reason)]);
        assert_eq!(value, count, "emails_skipped_total{{reason={reason}}}");
    }
    let retries = metric_value(&metrics_text(&rig.email).await, "kafka_retries_total", &[]);
    assert_eq!(retries, 0.0, "skips are not retried");

    // frank is offline when the message arrives, online before the digest is due.
    rig.chat("alice", "frank", "are you there?").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.digests.find_one(doc! {"_id": "frank"}).await.expect("find").is_none() {
        assert!(Instant::now() < deadline, "frank's message never reached the digest store");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.set_online("frank");
    rig.wait_for_metric("emails_skipped_total", &[("reason", "online")], 2.0, Duration::from_secs(10)).await;
    assert!(rig.digests.find_one(doc! {"_id": "frank"}).await.expect("find").is_none(), "dropped digest is deleted");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.mails().len(), 1, "only dave was mailed: {:#?}", rig.mails());
}

/// The presence contract with the real notification service: while bob has a
/// notification socket open he gets no chat email; once he has closed it he does.
#[tokio::test]
async fn an_open_notification_socket_suppresses_chat_email() {
    let rig = Rig::start(&[]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    let notifications = Service::start("generalnotificationshandler", &rig.stack.env());
    let path = format!("/notifications/subscribe?user_id=bob&access_token={}", chatfleet_tests::token("bob"));
    let (socket, _) = chatfleet_tests::ws_connect(notifications.ws_url(&path)).await.expect("bob subscribes");
    let exists = || probe(rig.stack.redis.port(), b"EXISTS presence:bob\r\n").unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exists().starts_with(":1") {
        assert!(Instant::now() < deadline, "presence:bob never appeared; log:\n{}", notifications.log_tail(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    rig.chat("alice", "bob", "you are online, no mail").await;
    rig.wait_for_metric("emails_skipped_total", &[("reason", "online")], 1.0, Duration::from_secs(30)).await;

    drop(socket);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !exists().starts_with(":0") {
        assert!(Instant::now() < deadline, "presence:bob never went away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.chat("alice", "bob", "you are offline now").await;
    let mails = rig.wait_for_mails(1, Duration::from_secs(20)).await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    assert!(mails[0].text.contains("you are offline now") && !mails[0].text.contains("no mail"), "{}", mails[0].text);
}

/// Redis down: presence cannot be asked and deduplication cannot be recorded; both
/// fail open, so the recipient counts as offline and the mail still goes out.
#[tokio::test]
async fn with_redis_down_the_recipient_counts_as_offline() {
    let mut rig = Rig::start(&[("REDIS_TIMEOUT", "200ms")]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    rig.set_online("bob");
    rig.stack.redis.stop();
    rig.chat("alice", "bob", "redis is down").await;
    let mails = rig.wait_for_mails(1, Duration::from_secs(30)).await;
    assert_eq!(mails[0].to, "<bob@example.com>");
    assert!(mails[0].text.contains("redis is down"));
    assert!(metric_value(&metrics_text(&rig.email).await, "email_presence_check_failures_total", &[]) >= 1.0);
}

/// The SMTP relay down: sends fail transiently and are retried; once it is back each
/// pending mail (a purchase email and a chat digest) arrives exactly once.
#[tokio::test]
async fn an_smtp_outage_is_retried_and_each_mail_arrives_once() {
    let mut rig = Rig::start(&[]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    rig.domain("purchases.changes", purchase("p-warm", "bob", "created", 1)).await;
    rig.wait_for_mails(1, Duration::from_secs(30)).await;

    rig.smtp.stop();
    rig.domain("purchases.changes", purchase("p-outage", "bob", "paid", 2)).await;
    rig.chat("alice", "bob", "sent while the relay is down").await;
    for kind in ["purchase", "chat_digest"] {
        rig.wait_for_metric(
            "email_send_failures_total",
            &[("kind", kind), ("class", "transient")],
            2.0,
            Duration::from_secs(20),
        )
        .await;
    }
    assert_eq!(rig.mails().len(), 1);
    rig.smtp.restart();

    let mails = rig.wait_for_mails(3, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mails_after = rig.mails();
    assert_eq!(mails_after.len(), 3, "each mail exactly once: {mails_after:#?}");
    let subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    assert!(subjects.contains(&"Payment received for order p-outage"), "{subjects:?}");
    assert!(subjects.contains(&"1 new message from Alice Tester"), "{subjects:?}");
    let digest = mails.iter().find(|m| m.kind == "chat_digest").expect("digest");
    assert!(digest.text.contains("sent while the relay is down"));
    assert_eq!(metric_value(&metrics_text(&rig.email).await, "kafka_dead_letters_total", &[]), 0.0);
}

/// A permanent (5xx) rejection is dead-lettered at once with the relay's reply as
/// reason, for a domain event and for a chat digest; malformed records are
/// dead-lettered too; nothing is mailed; mail flows again once the relay accepts.
#[tokio::test]
async fn a_permanent_rejection_is_dead_lettered_with_the_reason() {
    let rig = Rig::start(&[]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    let flag = rig.smtp.mail_dir().join(".reject-permanent");
    std::fs::write(&flag, "").expect("reject flag");

    let payment = json!({"_id": "pay-1", "payment_id": "pay-1", "user_id": "bob", "status": "pending",
        "amount_minor": 4200, "currency": "EUR", "due_date": "2026-06-01T00:00:00Z", "__op": "c", "__source_ts_ms": 5});
    let payment_bytes = rig.domain("payments.changes", payment).await;
    let chat = rig.chat("alice", "bob", "this one bounces").await;
    rig.produce_raw("purchases.changes", b"{\"purchase_id\": \"broken\"").await;

    let letters = dead_letters(&rig.stack.broker.bootstrap(), 3, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 3, "three dead letters: {letters:?}\nlog:\n{}", rig.email.log_tail(40));
    let by_topic = |topic: &str| {
        letters
            .iter()
            .find(|(h, _)| header(h, "x-original-topic") == topic)
            .unwrap_or_else(|| panic!("no dead letter from {topic}: {letters:?}"))
    };

    let (headers, payload) = by_topic("payments.changes");
    assert_eq!(header(headers, "x-error-kind"), "permanent");
    assert!(header(headers, "x-error").contains("550"), "{headers:?}");
    assert_eq!(header(headers, "x-attempts"), "1", "not retried");
    assert_eq!(payload, &payment_bytes, "the original record, for replay");

    let (headers, payload) = by_topic("chat.changes");
    assert_eq!(header(headers, "x-error-kind"), "permanent");
    assert!(header(headers, "x-error").contains("550"), "{headers:?}");
    assert_eq!(header(headers, "x-email-recipient"), "bob");
    let replayable = ChangeEvent::parse(payload).expect("the dead letter is the chat change");
    assert_eq!(replayable.message_id(), chat.message_id());

    let (headers, _) = by_topic("purchases.changes");
    assert_eq!(header(headers, "x-error-kind"), "malformed");

    assert!(rig.mails().is_empty(), "nothing was accepted: {:#?}", rig.mails());
    assert_eq!(
        metric_value(&metrics_text(&rig.email).await, "email_send_failures_total", &[("class", "permanent")]),
        2.0
    );

    std::fs::remove_file(&flag).expect("unflag");
    rig.domain("purchases.changes", purchase("p-after", "bob", "created", 6)).await;
    let mails = rig.wait_for_mails(1, Duration::from_secs(20)).await;
    assert_eq!(mails[0].subject, "Thanks for your order p-after");
}

/// The relay stays down: after `MESSAGE_RETRY_MAX_RETRIES` retries a domain event and a
/// digest are dead-lettered as `retryable-exhausted` with the last error.
#[tokio::test]
async fn exhausted_retries_are_dead_lettered() {
    let mut rig = Rig::start(&[("MESSAGE_RETRY_MAX_RETRIES", "2")]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    rig.smtp.stop();
    rig.domain("purchases.changes", purchase("p-lost", "bob", "paid", 1)).await;
    let chat = rig.chat("alice", "bob", "nobody will read this").await;

    let letters = dead_letters(&rig.stack.broker.bootstrap(), 2, Duration::from_secs(40)).await;
    assert_eq!(letters.len(), 2, "{letters:?}\nlog:\n{}", rig.email.log_tail(40));
    for (headers, payload) in &letters {
        assert_eq!(header(headers, "x-error-kind"), "retryable-exhausted", "{headers:?}");
        assert_eq!(header(headers, "x-attempts"), "3", "first try + 2 retries: {headers:?}");
        assert!(header(headers, "x-error").contains("transient SMTP failure"), "{headers:?}");
        if header(headers, "x-original-topic") == "chat.changes" {
            assert_eq!(ChangeEvent::parse(payload).expect("chat change").message_id(), chat.message_id());
        }
    }
    assert!(rig.digests.find_one(doc! {"_id": "bob"}).await.expect("find").is_none(), "the digest was dropped");
}

/// The same record delivered again — at once, after its mail went out, and to a
/// brand-new consumer group that re-reads every topic from the start — never sends a
/// second email.
#[tokio::test]
async fn a_redelivered_event_never_sends_a_second_email() {
    let mut rig = Rig::start(&[]).await;
    rig.add_user("alice", true).await;
    rig.add_user("bob", true).await;
    let order = purchase("p-dup", "bob", "paid", 7);
    rig.domain("purchases.changes", order.clone()).await;
    rig.domain("purchases.changes", order.clone()).await;
    let chat = rig.chat("alice", "bob", "only once please").await;
    rig.produce_chat(&chat, None).await;

    let mails = rig.wait_for_mails(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.domain("purchases.changes", order.clone()).await;
    rig.produce_chat(&chat, None).await;
    rig.wait_for_metric("emails_skipped_total", &[("reason", "duplicate")], 4.0, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.mails().len(), 2, "{:#?}", rig.mails());
    let digest = mails.iter().find(|m| m.kind == "chat_digest").expect("digest");
    assert_eq!(digest.subject, "1 new message from Alice Tester", "the message is listed once");

    // A new consumer group replays everything from the beginning.
    rig.email.kill();
    let mut env = rig.env.clone();
    env.push(("KAFKA_GROUP_ID".into(), testkit::unique("email-replay")));
    rig.email = Service::start("emailhandler", &env);
    rig.wait_for_metric("emails_skipped_total", &[("reason", "duplicate")], 6.0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.mails().len(), 2, "a replay sends nothing: {:#?}", rig.mails());
}

/// A purchase, a payment reminder and a shipping update each produce one email to the
/// right person with the right subject; a deletion produces none.
#[tokio::test]
async fn purchase_payment_and_shipping_each_send_one_email() {
    let rig = Rig::start(&[]).await;
    rig.add_user("bob", true).await;
    rig.domain("purchases.changes", purchase("p-1", "bob", "paid", 1)).await;
    rig.domain(
        "payments.changes",
        json!({"payment_id": "pay-1", "user_id": "bob", "purchase_id": "p-1", "status": "pending",
               "amount_minor": 4200, "currency": "EUR", "due_date": "2026-06-01T00:00:00Z",
               "__op": "c", "__source_ts_ms": 2}),
    )
    .await;
    rig.domain(
        "shipments.changes",
        json!({"shipment_id": "s-1", "user_id": "bob", "purchase_id": "p-1", "status": "in_transit",
               "carrier": "DHL", "tracking_number": "JD0001", "estimated_delivery": "2026-06-03T00:00:00Z",
               "updated_at": 1_767_225_600_000_i64, "__op": "u", "__source_ts_ms": 3}),
    )
    .await;
    let mut deleted = purchase("p-2", "bob", "cancelled", 4);
    deleted["__op"] = json!("d");
    rig.domain("purchases.changes", deleted).await;

    let mails = rig.wait_for_mails(3, Duration::from_secs(30)).await;
    rig.wait_for_metric("emails_skipped_total", &[("reason", "deleted")], 1.0, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.mails().len(), 3, "{:#?}", rig.mails());
    let find = |kind: &str| mails.iter().find(|m| m.kind == kind).unwrap_or_else(|| panic!("no {kind} mail"));

    let mail = find("purchase");
    assert_eq!(mail.to, "<bob@example.com>");
    assert_eq!(mail.subject, "Payment received for order p-1");
    assert!(mail.text.contains("19.99 EUR") && mail.html.contains("19.99 EUR"));

    let mail = find("payment_reminder");
    assert_eq!(mail.to, "<bob@example.com>");
    assert_eq!(mail.subject, "Payment reminder: 42.00 EUR due on 2026-06-01");

    let mail = find("shipping");
    assert_eq!(mail.to, "<bob@example.com>");
    assert_eq!(mail.subject, "Your shipment is on its way with DHL");
    assert!(mail.text.contains("JD0001") && mail.text.contains("2026-06-03"), "{}", mail.text);
    assert!(mails.iter().all(|m| m.message_id.ends_with("@chatfleet.local>")), "{mails:#?}");
    assert_eq!(http_status(rig.email.public_port, "/readyz"), Some(200));
    for kind in ["purchase", "payment_reminder", "shipping"] {
        assert_eq!(metric_value(&metrics_text(&rig.email).await, "emails_sent_total", &[("kind", kind)]), 1.0);
    }
}

/// Emails per second into the SMTP sink: purchase events for 50 users, sent by the
/// release build. Run once by hand:
///
/// ```sh
/// cargo build --release -p emailhandler
/// CHATFLEET_TEST_PROFILE=release cargo nextest run -p chatfleet-tests --test fleet \
///     --run-ignored only --no-capture email_handler::
/// ```
#[tokio::test]
#[ignore = "a measurement, run by hand with the release build"]
async fn emails_per_second_into_the_sink() {
    let total: usize = std::env::var("EMAIL_BENCH_COUNT").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let rig = Rig::start(&[("LOG_LEVEL", "warn"), ("SMTP_POOL_SIZE", "8")]).await;
    for i in 0..50 {
        rig.add_user(&format!("user{i:02}"), true).await;
    }
    rig.domain("purchases.changes", purchase("warm", "user00", "created", 0)).await;
    rig.wait_for_mails(1, Duration::from_secs(30)).await;

    let payloads: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| {
            let user = format!("user{:02}", i % 50);
            let doc = purchase(&format!("bench-{i}"), &user, "created", 100 + i as i64);
            (user, serde_json::to_vec(&doc).expect("json"))
        })
        .collect();
    let started = Instant::now();
    let sends =
        payloads.iter().map(|(user, payload)| rig.producer.send("purchases.changes", user.as_bytes(), payload, &[]));
    for result in futures::future::join_all(sends).await {
        result.expect("produced");
    }
    let produced = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mail_dir = rig.smtp.mail_dir().to_owned();
    let count = || {
        std::fs::read_dir(&mail_dir)
            .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "eml")).count())
            .unwrap_or(0)
    };
    while count() < total + 1 {
        assert!(Instant::now() < deadline, "only {} of {total} mails within 10 min", count() - 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "emails/s into the sink: {rate:.0} ({total} purchase emails in {:.2} s; produced in {:.2} s)",
        elapsed.as_secs_f64(),
        produced.as_secs_f64()
    );
    let text = metrics_text(&rig.email).await;
    let sum = metric_value(&text, "smtp_send_duration_seconds_sum", &[("outcome", "ok")]);
    let n = metric_value(&text, "smtp_send_duration_seconds_count", &[("outcome", "ok")]);
    println!("mean SMTP send: {:.1} ms over {n} sends", 1000.0 * sum / n.max(1.0));
}
