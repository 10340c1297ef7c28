//! Group conversations, the inbox and read markers on chatpersistence, black-box:
//! the real binary against real MongoDB wire and Kafka-protocol servers, checked
//! through the public HTTP API, directly in the database and on `chat.changes`.
//!
//! Why these tests exist: who may see and change a conversation is decided by
//! chatpersistence alone, and the inbox (order, paging, unread counts) is what a
//! frontend builds on. They show that strangers and former members are refused on
//! every route without anything being written, that the owner rules hold, that the
//! inbox is ordered by activity and pages without gaps or duplicates, that unread
//! counts follow the documented rule (`seq − read marker`, the sender's marker
//! raised by their own message) under concurrency, that a removal takes effect for
//! every message accepted after it, and that every conversation event reaches
//! `chat.changes` exactly once, keyed by the conversation id.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatfleet_tests::{token, topic_reader, Service, Stack, SERVICE_TOKEN};
use chatstream::{ChatChange, ConversationEventKind};
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use rdkafka::Message as _;
use reqwest::Method;
use serde_json::{json, Value};

/// chatpersistence with outbox capture, on a private stack.
struct Fixture {
    stack: Stack,
    persistence: Service,
    http: reqwest::Client,
    db: mongodb::Database,
}

impl Fixture {
    async fn start() -> Self {
        let stack = Stack::start();
        let mut env = stack.env();
        for (k, v) in [
            ("CAPTURE_MODE", "outbox"),
            // Bursts from few senders are the point here; the limit has its own tests.
            ("RATE_LIMIT_POST_PER_SECOND", "2000"),
            ("RATE_LIMIT_POST_BURST", "4000"),
        ] {
            env.push((k.to_owned(), v.to_owned()));
        }
        let persistence = Service::start("chatpersistence", &env);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client");
        let db = mongodb::Client::with_uri_str(stack.mongo.uri()).await.expect("mongo client").database("chat");
        let fixture = Self { stack, persistence, http, db };
        fixture.wait_ready().await;
        fixture
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(response) = self.http.get(self.persistence.url("/readyz")).send().await {
                if response.status().as_u16() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chatpersistence never became ready:\n{}", self.persistence.log_tail(30));
    }

    /// A public API call as `user`: status and JSON body (`Null` when there is none).
    async fn call(&self, method: Method, path: &str, user: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.http, &self.persistence.url(path), method, user, body).await
    }

    async fn create_group(&self, owner: &str, title: &str, members: &[&str]) -> Value {
        let (status, body) = self
            .call(Method::POST, "/chat/conversations", owner, Some(json!({"title": title, "members": members})))
            .await;
        assert_eq!(status, 201, "create group answered {status} {body}; log:\n{}", self.persistence.log_tail(20));
        body
    }

    async fn post_group(&self, sender: &str, group: &str, content: &str) -> (u16, Value) {
        let (_, status, body) = self.post_group_timed(sender, group, content, Instant::now()).await;
        (status, body)
    }

    /// Posts to a group, retrying a `503` (the conversation's write lock was busy, as
    /// documented) the way a client would; returns when the last attempt was sent
    /// (after `anchor`), its status and body.
    async fn post_group_timed(
        &self,
        sender: &str,
        group: &str,
        content: &str,
        anchor: Instant,
    ) -> (Duration, u16, Value) {
        let body = json!({"sender_id": sender, "conversation_id": group, "content": content});
        self.call_retrying(Method::POST, "/chat/messages", sender, body, anchor).await
    }

    async fn call_retrying(
        &self,
        method: Method,
        path: &str,
        user: &str,
        body: Value,
        anchor: Instant,
    ) -> (Duration, u16, Value) {
        for _ in 0..50 {
            let sent = anchor.elapsed();
            let (status, answer) = self.call(method.clone(), path, user, Some(body.clone())).await;
            if status != 503 {
                return (sent, status, answer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{method} {path} as {user} answered 503 fifty times");
    }

    async fn post_group_ok(&self, sender: &str, group: &str, content: &str) -> Value {
        let (status, body) = self.post_group(sender, group, content).await;
        assert_eq!(status, 201, "{sender} posting to {group} answered {status} {body}");
        body
    }

    async fn post_pair_ok(&self, sender: &str, receiver: &str, content: &str) -> Value {
        let body = json!({"sender_id": sender, "receiver_id": receiver, "content": content});
        let (_, status, answer) =
            self.call_retrying(Method::POST, "/chat/messages", sender, body, Instant::now()).await;
        assert_eq!(status, 201, "{sender} → {receiver} answered {status} {answer}");
        answer
    }

    /// The whole history of a group as `user` sees it (oldest first), or the refusal.
    async fn group_history(&self, user: &str, group: &str) -> Result<Vec<Value>, (u16, Value)> {
        let mut all = Vec::new();
        let mut since: Option<String> = None;
        loop {
            let mut path = format!("/chat/messages?conversation_id={group}&limit=200");
            if let Some(since) = &since {
                path.push_str(&format!("&since={since}"));
            }
            let (status, page) = self.call(Method::GET, &path, user, None).await;
            if status != 200 {
                return Err((status, page));
            }
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            since = messages.last().map(id_of);
            all.extend(messages);
            if page["has_more"] != json!(true) || since.is_none() {
                return Ok(all);
            }
        }
    }

    async fn show(&self, user: &str, group: &str) -> Value {
        let (status, body) = self.call(Method::GET, &format!("/chat/conversations/{group}"), user, None).await;
        assert_eq!(status, 200, "{user} GET {group} answered {status} {body}");
        body
    }

    async fn unread(&self, user: &str, conversation: &str) -> i64 {
        self.show(user, conversation).await["unread_count"].as_i64().expect("unread_count")
    }

    async fn read(&self, user: &str, conversation: &str, up_to: &str) -> (u16, Value) {
        let path = format!("/chat/conversations/{conversation}/read");
        self.call(Method::POST, &path, user, Some(json!({ "up_to": up_to }))).await
    }

    /// Every page of `user`'s inbox with page size `limit`, in order.
    async fn inbox(&self, user: &str, limit: usize) -> Vec<Value> {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        for _ in 0..1000 {
            let mut path = format!("/chat/conversations?limit={limit}");
            if let Some(cursor) = &before {
                path.push_str(&format!("&before={cursor}"));
            }
            let (status, page) = self.call(Method::GET, &path, user, None).await;
            assert_eq!(status, 200, "inbox page answered {status} {page}");
            let rows = page["conversations"].as_array().cloned().expect("conversations");
            assert!(rows.len() <= limit, "a page of limit {limit} held {} rows", rows.len());
            all.extend(rows);
            match page["next"].as_str() {
                Some(next) => before = Some(next.to_owned()),
                None => return all,
            }
        }
        panic!("the inbox of {user} did not end within 1000 pages");
    }

    async fn counts(&self) -> HashMap<&'static str, u64> {
        let mut out = HashMap::new();
        for name in ["messages", "conversations", "memberships", "conversation_events"] {
            let n = self.db.collection::<Document>(name).count_documents(doc! {}).await.expect("count");
            out.insert(name, n);
        }
        out
    }

    async fn conversation_doc(&self, id: &str) -> Document {
        self.db
            .collection::<Document>("conversations")
            .find_one(doc! { "_id": id })
            .await
            .expect("find")
            .expect("the conversation is stored")
    }
}

async fn call(http: &reqwest::Client, url: &str, method: Method, user: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = http.request(method, url).bearer_auth(token(user));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("chatpersistence answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn id_of(value: &Value) -> String {
    value["message_id"].as_str().expect("message_id").to_owned()
}

fn conversation_id(view: &Value) -> String {
    view["conversation_id"].as_str().expect("conversation_id").to_owned()
}

fn members(view: &Value) -> BTreeSet<String> {
    view["members"].as_array().expect("members").iter().map(|m| m.as_str().expect("id").to_owned()).collect()
}

fn recipients(message: &Value) -> BTreeSet<String> {
    message["recipients"]
        .as_array()
        .map(|list| list.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn assert_not_a_member(what: &str, status: u16, body: &Value) {
    assert_eq!(status, 403, "{what}: expected 403 not_a_member, got {status} {body}");
    assert_eq!(body["error"]["code"], "not_a_member", "{what}: {body}");
}

/// A 403 that is not about membership (a member without the owner's rights).
fn assert_forbidden(what: &str, status: u16, body: &Value) {
    assert_eq!(status, 403, "{what}: expected 403, got {status} {body}");
    assert!(body["error"]["code"].is_string(), "{what}: error body {body}");
}

/// Every route a member may use, tried by `user`, who must be refused on each with
/// `403 not_a_member`; `message` is a real message of the group (for `read`).
async fn assert_refused_everywhere(f: &Fixture, user: &str, group: &str, message: &str, other_member: &str) {
    let base = format!("/chat/conversations/{group}");
    let tries: Vec<(&str, Method, String, Option<Value>)> = vec![
        ("GET conversation", Method::GET, base.clone(), None),
        ("PATCH title", Method::PATCH, base.clone(), Some(json!({"title": "hijacked"}))),
        ("add a member", Method::POST, format!("{base}/members"), Some(json!({"user_id": user}))),
        ("remove a member", Method::DELETE, format!("{base}/members/{other_member}"), None),
        ("leave", Method::DELETE, format!("{base}/members/{user}"), None),
        ("read marker", Method::POST, format!("{base}/read"), Some(json!({"up_to": message}))),
        (
            "post a message",
            Method::POST,
            "/chat/messages".to_owned(),
            Some(json!({"sender_id": user, "conversation_id": group, "content": "let me in"})),
        ),
        ("history", Method::GET, format!("/chat/messages?conversation_id={group}"), None),
        ("history by stream_id", Method::GET, format!("/chat/messages?stream_id={group}"), None),
    ];
    for (what, method, path, body) in tries {
        let (status, answer) = f.call(method, &path, user, body).await;
        assert_not_a_member(&format!("{user}: {what}"), status, &answer);
    }
    // And the group is not in their inbox.
    let listed: Vec<String> = f.inbox(user, 200).await.iter().map(conversation_id).collect();
    assert!(!listed.contains(&group.to_owned()), "{user} still lists {group}: {listed:?}");
}

/// Test 1: a group of five; strangers, members and the owner.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_of_five_keeps_strangers_out_and_follows_the_owner_rules() {
    let f = Fixture::start().await;
    let (owner, m1, m2, m3, m4) = ("olga", "mia", "noah", "omar", "pia");
    let stranger = "stranger";

    // Creation: the creator is the owner and a member; the answer is the view.
    let created = f.create_group(owner, "  launch  ", &[m1, m2, m3, m4, m1]).await;
    let group = conversation_id(&created);
    assert!(group.len() == 33 && group.starts_with('g'), "group id {group}");
    assert!(group[1..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "group id {group}");
    assert_eq!(created["kind"], "group");
    assert_eq!(created["title"], "launch", "the title is trimmed");
    assert_eq!(created["owner_id"], owner);
    assert_eq!(members(&created), set(&[owner, m1, m2, m3, m4]), "duplicates collapse, the owner is in");
    assert_eq!(created["unread_count"], 0);
    assert!(created["last_message"].is_null(), "{created}");
    assert!(created["updated_at"].as_i64().unwrap_or(0) > 0, "{created}");
    for member in [owner, m1, m2, m3, m4] {
        let seen = f.show(member, &group).await;
        assert_eq!(members(&seen), set(&[owner, m1, m2, m3, m4]), "{member} sees {seen}");
        let listed: Vec<String> = f.inbox(member, 50).await.iter().map(conversation_id).collect();
        assert_eq!(listed, vec![group.clone()], "{member}'s inbox");
    }
    // The internal member list, for the socket pods: service token only.
    let internal = f.persistence.internal_url(&format!("/chat/conversations/{group}/members"));
    let response = f.http.get(&internal).bearer_auth(SERVICE_TOKEN).send().await.expect("internal answers");
    assert_eq!(response.status().as_u16(), 200);
    let listed: Value = response.json().await.expect("json");
    assert_eq!(members(&listed), set(&[owner, m1, m2, m3, m4]), "{listed}");
    let response = f.http.get(&internal).bearer_auth(token(owner)).send().await.expect("internal answers");
    let status = response.status().as_u16();
    assert!(status == 401 || status == 403, "a user token on the internal member list answered {status}");

    let first = f.post_group_ok(owner, &group, "welcome").await;
    assert!(first.get("receiver_id").is_none() || first["receiver_id"].is_null(), "{first}");
    assert_eq!(recipients(&first), set(&[m1, m2, m3, m4]), "{first}");
    let first_id = id_of(&first);

    // A stranger is refused everywhere, and nothing is written.
    let before = f.counts().await;
    let stored_before = f.conversation_doc(&group).await;
    assert_refused_everywhere(&f, stranger, &group, &first_id, m1).await;
    // An unknown group answers exactly like a known one.
    let unknown = chatstream::StreamId::new_group().to_string();
    let (status, body) = f.call(Method::GET, &format!("/chat/conversations/{unknown}"), stranger, None).await;
    assert_not_a_member("an unknown group", status, &body);
    let (status, body) = f.post_group(stranger, &unknown, "hello?").await;
    assert_not_a_member("posting to an unknown group", status, &body);
    assert_eq!(f.counts().await, before, "a refused stranger wrote something");
    assert_eq!(f.conversation_doc(&group).await, stored_before, "a refused stranger changed the group");

    // A member who is not the owner cannot add, remove or rename ...
    let before = f.counts().await;
    let (status, body) = f
        .call(Method::POST, &format!("/chat/conversations/{group}/members"), m1, Some(json!({"user_id": "eve"})))
        .await;
    assert_forbidden("a member adding someone", status, &body);
    let (status, body) = f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{m2}"), m1, None).await;
    assert_forbidden("a member removing someone", status, &body);
    let (status, body) =
        f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{owner}"), m1, None).await;
    assert_forbidden("a member removing the owner", status, &body);
    let (status, body) =
        f.call(Method::PATCH, &format!("/chat/conversations/{group}"), m1, Some(json!({"title": "mine"}))).await;
    assert_forbidden("a member renaming", status, &body);
    assert_eq!(f.counts().await, before, "a refused member wrote something");
    assert_eq!(members(&f.show(owner, &group).await), set(&[owner, m1, m2, m3, m4]));
    // ... but may leave.
    let (status, body) = f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{m1}"), m1, None).await;
    assert_eq!(status, 204, "leaving answered {status} {body}");
    assert_refused_everywhere(&f, m1, &group, &first_id, m2).await;
    assert_eq!(members(&f.show(owner, &group).await), set(&[owner, m2, m3, m4]));

    // The owner adds someone: they read the whole history (from before they joined)
    // and can post.
    let second = f.post_group_ok(m2, &group, "before late joins").await;
    let late = "late";
    let (status, added) = f
        .call(Method::POST, &format!("/chat/conversations/{group}/members"), owner, Some(json!({"user_id": late})))
        .await;
    assert_eq!(status, 200, "adding answered {status} {added}");
    assert_eq!(members(&added), set(&[owner, m2, m3, m4, late]));
    let history = f.group_history(late, &group).await.expect("the added member reads the history");
    let ids: Vec<String> = history.iter().map(id_of).collect();
    assert_eq!(ids, vec![first_id.clone(), id_of(&second)], "the added member's view of the history");
    let from_late = f.post_group_ok(late, &group, "hi all").await;
    assert_eq!(recipients(&from_late), set(&[owner, m2, m3, m4]));
    assert_eq!(f.unread(m3, &group).await, 3, "m3 has read nothing");

    // The owner removes someone: refused at once, on every route.
    let (status, body) =
        f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{m2}"), owner, None).await;
    assert_eq!(status, 204, "removing answered {status} {body}");
    assert_refused_everywhere(&f, m2, &group, &first_id, m3).await;
    let after = f.post_group_ok(owner, &group, "m2 is gone").await;
    assert_eq!(recipients(&after), set(&[m3, m4, late]), "a removed member is no recipient");
    assert_eq!(members(&f.show(m3, &group).await), set(&[owner, m3, m4, late]));
    // The former members still cannot get back in by themselves.
    let (status, body) =
        f.call(Method::POST, &format!("/chat/conversations/{group}/members"), m2, Some(json!({"user_id": m2}))).await;
    assert_not_a_member("a removed member re-adding themself", status, &body);

    // An owner who leaves hands the group to the longest-standing member.
    let (status, body) =
        f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{owner}"), owner, None).await;
    assert_eq!(status, 204, "the owner leaving answered {status} {body}");
    let now = f.show(m3, &group).await;
    assert_eq!(now["owner_id"], m3, "the heir is the longest-standing member: {now}");
    assert_eq!(members(&now), set(&[m3, m4, late]));
    let (status, body) =
        f.call(Method::PATCH, &format!("/chat/conversations/{group}"), late, Some(json!({"title": "late's"}))).await;
    assert_forbidden("a member renaming after the handover", status, &body);
    let (status, body) =
        f.call(Method::PATCH, &format!("/chat/conversations/{group}"), m3, Some(json!({"title": "m3's"}))).await;
    assert_eq!(status, 200, "the new owner renaming answered {status} {body}");
    assert_refused_everywhere(&f, owner, &group, &first_id, m3).await;
}

/// `GROUP_MAX_MEMBERS` (default 256) bounds creating and adding; nothing is written
/// beyond it.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_has_at_most_group_max_members() {
    let f = Fixture::start().await;
    let owner = "big";
    let others: Vec<String> = (0..256).map(|i| format!("member{i}")).collect();
    let all: Vec<&str> = others.iter().map(String::as_str).collect();

    let before = f.counts().await;
    let (status, body) =
        f.call(Method::POST, "/chat/conversations", owner, Some(json!({"title": "too big", "members": all}))).await;
    assert_eq!(status, 400, "257 members answered {status} {body}");
    assert_eq!(f.counts().await, before, "a refused creation wrote something");

    let full = f.create_group(owner, "full", &all[..255]).await;
    let group = conversation_id(&full);
    assert_eq!(members(&full).len(), 256);
    // Written in bulk (chunks of 100): every member's inbox row, active, and one
    // member_joined event each, in member order.
    let after = f.counts().await;
    assert_eq!(after["conversations"], before["conversations"] + 1);
    assert_eq!(after["memberships"], before["memberships"] + 256);
    assert_eq!(after["conversation_events"], before["conversation_events"] + 256);
    let rows = f.db.collection::<Document>("memberships");
    let active = doc! { "conversation_id": group.as_str(), "active": true };
    assert_eq!(rows.count_documents(active).await.expect("count"), 256);
    let events = f.db.collection::<Document>("conversation_events");
    let joined: Vec<Document> = events
        .find(doc! { "conversation_id": group.as_str() })
        .sort(doc! { "event_id": 1 })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("events");
    let joined: Vec<&str> = joined.iter().filter_map(|e| e.get_str("user_id").ok()).collect();
    let expected: Vec<&str> = std::iter::once(owner).chain(all[..255].iter().copied()).collect();
    assert_eq!(joined, expected, "one member_joined per member, in order");
    let before = f.counts().await;
    let add = |user: &str| json!({ "user_id": user });
    let path = format!("/chat/conversations/{group}/members");
    let (status, body) = f.call(Method::POST, &path, owner, Some(add(all[255]))).await;
    assert_eq!(status, 400, "adding a 257th member answered {status} {body}");
    assert_eq!(f.counts().await, before, "a refused add wrote something");
    let (status, _) = f.call(Method::DELETE, &format!("{path}/{}", all[0]), owner, None).await;
    assert_eq!(status, 204);
    let (status, body) = f.call(Method::POST, &path, owner, Some(add(all[255]))).await;
    assert_eq!(status, 200, "adding into a freed place answered {status} {body}");
    assert_eq!(members(&body).len(), 256);
}

/// Creating a group writes the conversation, its memberships and its events.
///
/// Regression test: the partial index `{outbox_pending: 1, _id: 1}` chatpersistence
/// used to create on `conversation_events` made the local stack's MongoDB wire server
/// (nx-27017) refuse every event insert (`JSON path error near '_id'`), so
/// `POST /chat/conversations` answered 500 after writing the conversation and the
/// first membership (a half-created group). Fixed in 4697765 (indexed by `event_id`).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_can_be_created_with_the_indexes_chatpersistence_creates() {
    let f = Fixture::start().await;
    let before = f.counts().await;
    let (status, body) = f
        .call(Method::POST, "/chat/conversations", "alice", Some(json!({"title": "launch", "members": ["bob"]})))
        .await;
    let after = f.counts().await;
    assert_eq!(
        status,
        201,
        "POST /chat/conversations answered {status} {body}; stored before {before:?}, after {after:?}; log:\n{}",
        f.persistence.log_tail(5)
    );
    assert_eq!(after["conversation_events"], before["conversation_events"] + 2, "member_joined ×2");
    assert_eq!(after["memberships"], before["memberships"] + 2, "a membership per member");
    assert_eq!(after["conversations"], before["conversations"] + 1);
}

/// Test 2a: a pair conversation and a group, in order of last activity.
#[tokio::test(flavor = "multi_thread")]
async fn the_inbox_lists_pairs_and_groups_by_last_activity() {
    let f = Fixture::start().await;
    let (alice, bob, carol) = ("alice", "bob", "carol");
    let order = |rows: &[Value]| rows.iter().map(conversation_id).collect::<Vec<_>>();
    // Distinct milliseconds between the steps, so the order is not a tie.
    let tick = || tokio::time::sleep(Duration::from_millis(15));

    assert!(f.inbox(alice, 50).await.is_empty(), "a new user's inbox is empty");
    let hello = f.post_pair_ok(bob, alice, "hello alice").await;
    let pair = hello["stream_id"].as_str().expect("stream_id").to_owned();
    tick().await;
    let group = conversation_id(&f.create_group(carol, "book club", &[alice, bob]).await);
    tick().await;

    let rows = f.inbox(alice, 50).await;
    assert_eq!(order(&rows), vec![group.clone(), pair.clone()], "the new group is the most recent");
    let direct = &rows[1];
    assert_eq!(direct["kind"], "direct", "{direct}");
    assert_eq!(direct["peer_id"], bob, "{direct}");
    assert_eq!(members(direct), set(&[alice, bob]), "{direct}");
    assert_eq!(direct["unread_count"], 1, "{direct}");
    assert_eq!(direct["last_message"]["message_id"], hello["message_id"], "{direct}");
    assert_eq!(direct["last_message"]["sender_id"], bob, "{direct}");
    assert_eq!(direct["last_message"]["excerpt"], "hello alice", "{direct}");
    assert_eq!(rows[0]["kind"], "group");
    assert_eq!(rows[0]["title"], "book club");
    assert_eq!(rows[0]["unread_count"], 0);

    // The older conversation gets a message and moves up, for both of its members.
    let again = f.post_pair_ok(alice, bob, "hi bob").await;
    tick().await;
    let rows = f.inbox(alice, 50).await;
    assert_eq!(order(&rows), vec![pair.clone(), group.clone()], "a message moves the pair up");
    assert_eq!(rows[0]["last_message"]["message_id"], again["message_id"]);
    assert_eq!(rows[0]["unread_count"], 0, "alice's own message marks the pair read");
    assert_eq!(order(&f.inbox(bob, 50).await), vec![pair.clone(), group.clone()], "bob's inbox");
    // carol is not in the pair.
    assert_eq!(order(&f.inbox(carol, 50).await), vec![group.clone()], "carol's inbox");

    // And back: a group message moves the group up for all its members.
    let in_group = f.post_group_ok(carol, &group, "chapter 3?").await;
    let rows = f.inbox(alice, 50).await;
    assert_eq!(order(&rows), vec![group.clone(), pair.clone()], "a group message moves the group up");
    assert_eq!(rows[0]["last_message"]["message_id"], in_group["message_id"]);
    assert_eq!(rows[0]["unread_count"], 1);
    assert!(rows[0]["updated_at"].as_i64() >= rows[1]["updated_at"].as_i64(), "{rows:?}");
    assert_eq!(order(&f.inbox(bob, 50).await), vec![group.clone(), pair.clone()], "bob's inbox");
}

/// Checks one full walk of an inbox: every expected conversation exactly once, in
/// strictly decreasing `(updated_at, conversation_id)` order.
fn assert_walk(what: &str, rows: &[Value], expected: &HashSet<String>) {
    let ids: Vec<String> = rows.iter().map(conversation_id).collect();
    let unique: HashSet<String> = ids.iter().cloned().collect();
    let duplicates = ids.len() - unique.len();
    let missing: Vec<&String> = expected.difference(&unique).collect();
    let extra: Vec<&String> = unique.difference(expected).collect();
    assert!(
        duplicates == 0 && missing.is_empty() && extra.is_empty(),
        "{what}: {} rows, {duplicates} duplicates, {} missing, {} unexpected (expected {})",
        ids.len(),
        missing.len(),
        extra.len(),
        expected.len()
    );
    for pair in rows.windows(2) {
        let key = |v: &Value| (v["updated_at"].as_i64().unwrap_or(0), conversation_id(v));
        assert!(key(&pair[0]) > key(&pair[1]), "{what}: out of order: {:?} then {:?}", key(&pair[0]), key(&pair[1]));
    }
}

/// Test 2b: cursor paging over 120 conversations.
#[tokio::test(flavor = "multi_thread")]
async fn inbox_paging_walks_every_conversation_exactly_once() {
    let f = Arc::new(Fixture::start().await);
    let user = "pager";
    // 100 groups pager owns and 20 pair conversations others start, concurrently.
    let mut tasks = Vec::new();
    for i in 0..120 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            if i < 100 {
                let friend = format!("friend{i}");
                conversation_id(&f.create_group(user, &format!("group {i}"), &[friend.as_str()]).await)
            } else {
                let peer = format!("peer{i}");
                f.post_pair_ok(&peer, user, "hi").await["stream_id"].as_str().expect("stream_id").to_owned()
            }
        }));
    }
    let mut expected = HashSet::new();
    for task in tasks {
        expected.insert(task.await.expect("join"));
    }
    assert_eq!(expected.len(), 120);

    for limit in [50, 7, 120, 200] {
        let rows = f.inbox(user, limit).await;
        assert_walk(&format!("limit {limit}"), &rows, &expected);
    }
    // A cursor that was not issued by the endpoint is a 400.
    let (status, body) = f.call(Method::GET, "/chat/conversations?before=garbage", user, None).await;
    assert_eq!(status, 400, "a bad cursor answered {status} {body}");
    let (status, body) = f.call(Method::GET, "/chat/conversations?limit=0", user, None).await;
    assert_eq!(status, 400, "limit=0 answered {status} {body}");
}

/// Test 2c: paging when many conversations share one activity millisecond.
///
/// The API cannot be made to produce equal milliseconds on demand, so the test sets
/// `activity_at` of 60 of the user's memberships to one value directly in MongoDB:
/// the state a burst of activity (a bulk import, a script adding a user to many
/// groups at once, a broadcast) leaves behind.
///
/// BUG (chatpersistence, `Conversations::inbox`): a page after a cursor fetches
/// `limit + 1 + 32` rows with `activity_at <= cursor` and then drops the rows at the
/// cursor's millisecond that were already shown. When more than 32 such rows precede
/// the cursor, fewer than `limit + 1` remain, `has_more` is computed as false and the
/// walk stops early: `GET /chat/conversations?limit=20` then `?before=<next>`… returns
/// 53 of the 120 conversations and no `next`, where every conversation is expected
/// exactly once. Left failing on purpose.
#[tokio::test(flavor = "multi_thread")]
async fn inbox_paging_survives_many_conversations_active_in_the_same_millisecond() {
    let f = Arc::new(Fixture::start().await);
    let user = "tied";
    let mut tasks = Vec::new();
    for i in 0..120 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let friend = format!("friend{i}");
            conversation_id(&f.create_group(user, &format!("group {i}"), &[friend.as_str()]).await)
        }));
    }
    let mut expected = HashSet::new();
    for task in tasks {
        expected.insert(task.await.expect("join"));
    }
    // 60 of them active in the same millisecond, the newest activity of all.
    let tied: Vec<String> = expected.iter().take(60).cloned().collect();
    let at = chrono_now_ms() + 60_000;
    let memberships = f.db.collection::<Document>("memberships");
    let changed = memberships
        .update_many(
            doc! { "user_id": user, "conversation_id": { "$in": tied.clone() } },
            doc! { "$set": { "activity_at": at } },
        )
        .await
        .expect("update");
    assert_eq!(changed.matched_count, 60);
    let conversations = f.db.collection::<Document>("conversations");
    conversations
        .update_many(doc! { "_id": { "$in": tied.clone() } }, doc! { "$set": { "updated_at": at } })
        .await
        .expect("update");

    for limit in [20, 50] {
        let rows = f.inbox(user, limit).await;
        assert_walk(&format!("limit {limit}, 60 conversations in one millisecond"), &rows, &expected);
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Test 3: unread counts and read markers.
#[tokio::test(flavor = "multi_thread")]
async fn unread_counts_follow_messages_and_read_markers_only_move_forward() {
    let f = Fixture::start().await;
    let (alice, bob, carol) = ("alice", "bob", "carol");
    let group = conversation_id(&f.create_group(alice, "team", &[bob, carol]).await);

    // Messages from others raise the count.
    let mut from_bob = Vec::new();
    for i in 0..4 {
        from_bob.push(id_of(&f.post_group_ok(bob, &group, &format!("bob {i}")).await));
    }
    assert_eq!(f.unread(alice, &group).await, 4);
    assert_eq!(f.unread(carol, &group).await, 4);
    assert_eq!(f.unread(bob, &group).await, 0, "own messages are not unread");
    // Two devices of one user (two calls each, and the inbox) see the same count.
    let listed = f.inbox(alice, 50).await;
    assert_eq!(listed[0]["unread_count"], 4, "{listed:?}");
    assert_eq!(f.unread(alice, &group).await, 4);

    // Forward.
    let (status, answer) = f.read(alice, &group, &from_bob[1]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"conversation_id": group, "moved": true, "unread_count": 2}));
    // Back, and to the same place: ignored.
    for stale in [&from_bob[0], &from_bob[1]] {
        let (status, answer) = f.read(alice, &group, stale).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, json!({"conversation_id": group, "moved": false, "unread_count": 2}), "up_to {stale}");
    }
    // Both "devices" agree.
    assert_eq!(f.unread(alice, &group).await, 2);
    assert_eq!(f.inbox(alice, 50).await[0]["unread_count"], 2);
    // The other members' counts are their own.
    assert_eq!(f.unread(carol, &group).await, 4);

    // Everything read, then an own message: nothing unread for the sender, one more
    // for everyone else.
    let (_, answer) = f.read(alice, &group, &from_bob[3]).await;
    assert_eq!(answer["unread_count"], 0, "{answer}");
    let own = f.post_group_ok(alice, &group, "thanks").await;
    assert_eq!(f.unread(alice, &group).await, 0, "an own message is never unread");
    assert_eq!(f.unread(bob, &group).await, 1, "bob: alice's message");
    assert_eq!(f.unread(carol, &group).await, 5);
    let (_, answer) = f.read(carol, &group, &id_of(&own)).await;
    assert_eq!(answer["unread_count"], 0, "{answer}");
    assert_eq!(answer["moved"], true, "{answer}");

    // A marker for a message of another conversation is a 400, and nothing moves.
    let other_group = conversation_id(&f.create_group(alice, "elsewhere", &[bob]).await);
    let elsewhere = id_of(&f.post_group_ok(bob, &other_group, "over here").await);
    let pair_message = id_of(&f.post_pair_ok(bob, alice, "direct").await);
    let extra = f.post_group_ok(bob, &group, "one more").await;
    for (what, foreign) in [("another group", &elsewhere), ("a pair", &pair_message)] {
        let (status, body) = f.read(alice, &group, foreign).await;
        assert_eq!(status, 400, "a marker for a message of {what} answered {status} {body}");
    }
    let (status, body) = f.read(alice, &group, "not-a-message-id").await;
    assert_eq!(status, 400, "a malformed up_to answered {status} {body}");
    let (status, body) = f.read(alice, &group, &chatstream::MessageId::new().to_string()).await;
    assert_eq!(status, 400, "an unknown message answered {status} {body}");
    assert_eq!(f.unread(alice, &group).await, 1, "the refused markers moved nothing");
    assert_eq!(f.unread(alice, &other_group).await, 1);
    let (_, answer) = f.read(alice, &group, &id_of(&extra)).await;
    assert_eq!(answer["unread_count"], 0, "{answer}");

    // A pair conversation has a marker too.
    let pair = chatfleet_tests::client::stream_id(alice, bob);
    assert_eq!(f.unread(alice, &pair).await, 1);
    let (status, answer) = f.read(alice, &pair, &pair_message).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["unread_count"], 0, "{answer}");
}

/// The documented unread rule, computed from the history: messages by others after
/// `user`'s last own message (posting raises the sender's marker to their message).
fn expected_unread(history: &[Value], user: &str) -> i64 {
    let start = history.iter().rposition(|m| m["sender_id"] == user).map_or(0, |i| i + 1);
    history[start..].iter().filter(|m| m["sender_id"] != user).count() as i64
}

/// Test 4a/4b: concurrent messages, and a read marker racing new messages.
#[tokio::test(flavor = "multi_thread")]
async fn unread_counts_are_exact_under_concurrent_messages_and_racing_markers() {
    let f = Arc::new(Fixture::start().await);
    let posters = ["ann", "ben", "cat", "dan"];
    let reader = "eve";
    let mut all: Vec<&str> = posters.to_vec();
    all.push(reader);
    let group = conversation_id(&f.create_group(posters[0], "busy", &all[1..]).await);

    // 20 messages at once, 5 from each of 4 members.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (f, group) = (f.clone(), group.clone());
        let sender = posters[i % 4];
        tasks.push(tokio::spawn(async move { f.post_group_ok(sender, &group, &format!("{sender} {i}")).await }));
    }
    for task in tasks {
        task.await.expect("join");
    }
    let history = f.group_history(reader, &group).await.expect("history");
    assert_eq!(history.len(), 20, "every concurrent message is stored once");
    assert_eq!(f.unread(reader, &group).await, 20, "a member who only reads: every message is unread");
    for poster in posters {
        let by_others = history.iter().filter(|m| m["sender_id"] != poster).count();
        assert_eq!(by_others, 15);
        // Posting counts as having read what came before (docs/architecture.md), so a
        // poster's count is the messages by others after their own last one.
        assert_eq!(f.unread(poster, &group).await, expected_unread(&history, poster), "{poster}");
    }
    let listed = f.inbox(reader, 50).await;
    assert_eq!(listed[0]["unread_count"], 20, "{listed:?}");
    assert_eq!(listed[0]["last_message"]["message_id"], json!(id_of(&history[19])), "the last message is the last one");

    // A read marker racing new messages: eve marks what she has seen while ben and
    // cat keep posting. In the end her count is exactly what came after the newest
    // message she marked.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (f, group) = (f.clone(), group.clone());
        let sender = posters[1 + i % 2];
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
            f.post_group_ok(sender, &group, &format!("late {i}")).await;
        }));
    }
    let mut marked: Vec<String> = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let seen = f.group_history(reader, &group).await.expect("history");
        let newest = id_of(seen.last().expect("messages"));
        let (status, answer) = f.read(reader, &group, &newest).await;
        assert_eq!(status, 200, "{answer}");
        marked.push(newest);
    }
    for task in tasks {
        task.await.expect("join");
    }
    let history = f.group_history(reader, &group).await.expect("history");
    assert_eq!(history.len(), 50);
    let ids: Vec<String> = history.iter().map(id_of).collect();
    let furthest =
        marked.iter().filter_map(|m| ids.iter().position(|id| id == m)).max().expect("marked ids are in the history");
    let after = (history.len() - furthest - 1) as i64;
    assert_eq!(f.unread(reader, &group).await, after, "eve marked up to message #{furthest} of {}", history.len());
    for poster in posters {
        assert_eq!(f.unread(poster, &group).await, expected_unread(&history, poster), "{poster} after the race");
    }
}

/// Test 4c: a member removed while messages are being posted.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_removed_mid_stream_is_no_recipient_of_anything_accepted_after() {
    let f = Arc::new(Fixture::start().await);
    let (owner, poster, stays, leaving) = ("owen", "poppy", "sam", "rita");
    let group = conversation_id(&f.create_group(owner, "stream", &[poster, stays, leaving]).await);

    // Two senders post for about two seconds (slow enough that the removal, which
    // waits for the conversation's write lock like a post, is not starved by the
    // queue of posts on a debug build); each post records when it was sent.
    let anchor = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let (f, group) = (f.clone(), group.clone());
        let sender = if i % 2 == 0 { owner } else { poster };
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30 * i)).await;
            let (sent, status, message) = f.post_group_timed(sender, &group, &format!("m{i}"), anchor).await;
            assert_eq!(status, 201, "{sender}: {message}");
            (sent, message)
        }));
    }
    // And the member being removed tries to post too; after the removal they must be refused.
    let refused_after = {
        let (f, group) = (f.clone(), group.clone());
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..40u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let (sent, status, _) = f.post_group_timed(leaving, &group, &format!("rita {i}"), anchor).await;
                outcomes.push((sent, status));
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) =
        f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{leaving}"), owner, None).await;
    assert_eq!(status, 204, "removal answered {status} {body}");
    let removed_at = anchor.elapsed();

    let mut posted = Vec::new();
    for task in tasks {
        posted.push(task.await.expect("join"));
    }
    let mut checked_after = 0;
    let mut before_with_her = 0;
    for (sent, message) in &posted {
        let to = recipients(message);
        assert!(
            !to.contains(message["sender_id"].as_str().unwrap_or_default()),
            "the sender is no recipient: {message}"
        );
        if *sent > removed_at {
            checked_after += 1;
            assert!(
                !to.contains(leaving),
                "a message sent {sent:?} after the removal ({removed_at:?}) lists {leaving}: {message}"
            );
        } else if to.contains(leaving) {
            before_with_her += 1;
        }
    }
    assert!(checked_after >= 10, "only {checked_after} messages were sent after the removal");
    assert!(before_with_her >= 5, "only {before_with_her} messages before the removal listed {leaving}");
    // In stored (history) order, once she is gone she never comes back.
    let history = f.group_history(owner, &group).await.expect("history");
    let mut gone = false;
    for message in &history {
        let has = recipients(message).contains(leaving) || message["sender_id"] == leaving;
        if gone {
            assert!(!has, "{leaving} reappears after the removal: {message}");
        }
        gone |= !has && message["sender_id"] != leaving;
    }
    // Her own posts: accepted before, refused (403 not_a_member) once the removal answered.
    for (sent, status) in refused_after.await.expect("join") {
        if sent > removed_at {
            assert_eq!(status, 403, "{leaving} posted at {sent:?}, after the removal at {removed_at:?}");
        } else {
            assert!(status == 201 || status == 403, "{leaving} posted at {sent:?}: {status}");
        }
    }
    let her_posts = history.iter().filter(|m| m["sender_id"] == leaving).count();
    assert!(her_posts > 0, "{leaving} never got a post in before the removal");
    assert_eq!(f.unread(stays, &group).await, history.len() as i64, "sam read nothing");
}

/// Test 5: every conversation event reaches `chat.changes` once, keyed by the group.
#[tokio::test(flavor = "multi_thread")]
async fn conversation_events_reach_chat_changes_exactly_once_keyed_by_the_conversation() {
    let f = Fixture::start().await;
    let (alice, bob, carol, dave, erin) = ("alice", "bob", "carol", "dave", "erin");
    let consumer = topic_reader(&f.stack.broker.bootstrap(), "chat.changes");

    let group = conversation_id(&f.create_group(alice, "plans", &[bob, carol, dave, erin]).await);
    let frank = "frank";
    let (status, body) = f
        .call(Method::POST, &format!("/chat/conversations/{group}/members"), alice, Some(json!({"user_id": frank})))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = f
        .call(Method::PATCH, &format!("/chat/conversations/{group}"), alice, Some(json!({"title": "new plans"})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["title"], "new plans");
    let (status, _) =
        f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{carol}"), alice, None).await;
    assert_eq!(status, 204);
    let (status, _) = f.call(Method::DELETE, &format!("/chat/conversations/{group}/members/{dave}"), dave, None).await;
    assert_eq!(status, 204);
    let message = id_of(&f.post_group_ok(bob, &group, "agenda").await);
    let (_, moved) = f.read(erin, &group, &message).await;
    assert_eq!(moved["moved"], true, "{moved}");
    // Not moving writes no event; a refused request writes none either.
    let (_, again) = f.read(erin, &group, &message).await;
    assert_eq!(again["moved"], false, "{again}");
    let (status, _) =
        f.call(Method::PATCH, &format!("/chat/conversations/{group}"), bob, Some(json!({"title": "mine"}))).await;
    assert_eq!(status, 403);
    let stored = f.db.collection::<Document>("conversation_events").count_documents(doc! {}).await.expect("count");
    assert_eq!(stored, 10, "5 joined on create + 1 added + 1 renamed + 2 left + 1 read");

    // Read the topic until the nine events arrived, then a little longer for extras.
    let mut events = Vec::new();
    let mut records = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let until = quiet_until.unwrap_or(deadline).min(deadline);
        if now >= until {
            break;
        }
        let Ok(received) = tokio::time::timeout(until - now, consumer.recv()).await else { break };
        let record = received.expect("the broker answers");
        let Some(payload) = record.payload() else { continue };
        match ChatChange::parse(payload).expect("every record on chat.changes parses") {
            ChatChange::Conversation(event) => {
                records += 1;
                let key = record.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                assert_eq!(key, event.conversation_id.to_string(), "the record key is the conversation id");
                events.push(event);
            }
            ChatChange::Message(_) => {}
        }
        let distinct: HashSet<&String> = events.iter().map(|e| &e.event_id).collect();
        if distinct.len() >= 10 && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + Duration::from_secs(2));
        }
    }
    let mut by_id: HashMap<String, chatstream::ConversationEvent> = HashMap::new();
    for event in &events {
        if let Some(seen) = by_id.get(&event.event_id) {
            assert_eq!(seen, event, "a redelivered event must be identical");
        }
        by_id.insert(event.event_id.clone(), event.clone());
    }
    assert!(by_id.len() == 10, "expected 10 distinct events, got {} ({records} records): {events:#?}", by_id.len());
    let of_kind = |kind: ConversationEventKind| {
        let mut found: Vec<&chatstream::ConversationEvent> = by_id.values().filter(|e| e.kind == kind).collect();
        found.sort_by_key(|e| e.event_id.clone());
        found
    };
    for event in by_id.values() {
        assert_eq!(event.conversation_id.to_string(), group, "{event:?}");
    }
    let joined: BTreeSet<String> =
        of_kind(ConversationEventKind::MemberJoined).iter().map(|e| e.user_id.to_string()).collect();
    assert_eq!(joined, set(&[alice, bob, carol, dave, erin, frank]), "member_joined ×5 on create, 1 on add");
    assert_eq!(of_kind(ConversationEventKind::MemberJoined).len(), 6);
    // One key, one partition: the topic carries the conversation's changes in the
    // order they were made.
    let mut first_seen: Vec<&chatstream::ConversationEvent> = Vec::new();
    for event in &events {
        if !first_seen.iter().any(|e| e.event_id == event.event_id) {
            first_seen.push(event);
        }
    }
    let kinds: Vec<(&str, String)> = first_seen.iter().map(|e| (e.kind.as_str(), e.user_id.to_string())).collect();
    let mut expected_order: Vec<(&str, String)> = Vec::new();
    for (kind, user) in kinds.iter().take(5) {
        expected_order.push((kind, user.clone()));
    }
    assert!(kinds[..5].iter().all(|(kind, _)| *kind == "member_joined"), "creation's five joins come first: {kinds:?}");
    for (kind, user) in [
        ("member_joined", frank),
        ("conversation_updated", alice),
        ("member_left", carol),
        ("member_left", dave),
        ("read", erin),
    ] {
        expected_order.push((kind, user.to_owned()));
    }
    assert_eq!(kinds, expected_order, "the order of the conversation's changes on chat.changes");
    let updated = of_kind(ConversationEventKind::ConversationUpdated);
    assert_eq!(updated.len(), 1, "{updated:?}");
    assert_eq!(updated[0].title.as_deref(), Some("new plans"));
    assert_eq!(updated[0].actor_id.as_str(), alice);
    let left = of_kind(ConversationEventKind::MemberLeft);
    let reasons: BTreeSet<(String, String, String)> = left
        .iter()
        .map(|e| (e.user_id.to_string(), e.actor_id.to_string(), e.reason.clone().unwrap_or_default()))
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        (carol.to_owned(), alice.to_owned(), "removed".to_owned()),
        (dave.to_owned(), dave.to_owned(), "left".to_owned()),
    ]
    .into_iter()
    .collect();
    assert_eq!(reasons, expected, "member_left events");
    for event in &left {
        let now: BTreeSet<String> = event.members.iter().map(ToString::to_string).collect();
        assert!(!now.contains(event.user_id.as_str()), "members after the change exclude who left: {event:?}");
    }
    let reads = of_kind(ConversationEventKind::Read);
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].user_id.as_str(), erin);
    assert_eq!(reads[0].up_to.as_ref().map(ToString::to_string), Some(message));
}
