//! The `bot` target: bots answer messages through an OpenAI-compatible model.
//!
//! Why this module exists: a bot is a user id in `BOTS`. A new message to a bot (1:1),
//! or a group message starting with `/ai` in a group the bot is a member of, must get
//! an answer from the model, posted back as a message from the bot, without ever
//! losing the user's message and without answering twice. So the answer is computed
//! here, as one target of a pipeline (the same claim, retry, backoff and dead-letter
//! machinery as every other target), and written through chatpersistence's normal
//! write path (`POST /chat/bot-messages`), so it is captured and delivered like any
//! message. The reply's `client_message_id` is `bot-reply:<message id answered>`:
//! a redelivered change, a rebalance or a crash between the post and the commit
//! posts nothing twice.
//!
//! One answer: read the conversation's last `AI_CONTEXT_MESSAGES` messages up to the
//! one answered (chatpersistence's internal history), call `{AI_BASE_URL}/chat/completions`
//! (up to `AI_MAX_RETRIES` retries of a timeout, refused connection, `408`, `429` or
//! `5xx`), post the answer. When the model cannot answer (retries exhausted, another
//! `4xx`, an unreadable or empty answer) the bot posts `AI_FAILURE_MESSAGE` instead,
//! under the same `client_message_id`: the user learns the assistant is unavailable,
//! and their own message was stored before any of this. Only a failure to read the
//! history or to post the reply fails the target (and is retried by the pipeline).

use std::time::Duration;

use chatstream::{ChangeEvent, ChangeOp, ChatMessage, ConversationKind, MessageContent, UserId};
use kafkawrapper::{HandlerError, RetrySettings, Retryable};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::forward::{classify, ServiceToken};

/// What a bot says when the model cannot answer (`AI_FAILURE_MESSAGE`'s default).
pub const DEFAULT_FAILURE_MESSAGE: &str =
    "Sorry, I can't answer right now: the assistant is unavailable. Please try again in a few minutes.";

/// The longest reply stored (chatpersistence's content limit, in characters).
const MAX_REPLY_CHARS: usize = 4000;

/// The prefix a group message starts with to ask the group's bot.
pub const AI_COMMAND: &str = "/ai";

/// `BOTS` and the built-in AI adapter (`AI_*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BotSettings {
    /// `BOTS`: comma-separated bot user ids; empty: no bots (no `bots` pipeline).
    pub bots: String,
    /// `CHATPERSISTENCE_INTERNAL_URL`: chatpersistence's internal listener (history
    /// and `POST /chat/bot-messages`).
    pub chatpersistence_url: String,
    /// `AI_BASE_URL`: the OpenAI-compatible API, e.g. `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    /// `AI_MODEL`: the `model` of each request.
    pub model: String,
    /// `AI_API_KEY`: sent as `Authorization: Bearer`; empty: no header. Never logged.
    pub api_key: String,
    /// `AI_TIMEOUT`: how long one model call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `AI_CONTEXT_MESSAGES`: how many messages of the conversation (the one answered
    /// included) the model sees.
    pub context_messages: u32,
    /// `AI_MAX_RETRIES`: retries of a failed model call before the failure message.
    pub max_retries: u32,
    /// `AI_FAILURE_MESSAGE`: what the bot posts when the model cannot answer.
    pub failure_message: String,
}

impl Default for BotSettings {
    fn default() -> Self {
        Self {
            bots: String::new(),
            chatpersistence_url: "http://127.0.0.1:9090".to_owned(),
            base_url: String::new(),
            model: String::new(),
            api_key: String::new(),
            timeout: Duration::from_secs(30),
            context_messages: 20,
            max_retries: 2,
            failure_message: DEFAULT_FAILURE_MESSAGE.to_owned(),
        }
    }
}

impl BotSettings {
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("BOTS", "bots"),
        ("CHATPERSISTENCE_INTERNAL_URL", "chatpersistence_url"),
        ("AI_BASE_URL", "base_url"),
        ("AI_MODEL", "model"),
        ("AI_API_KEY", "api_key"),
        ("AI_TIMEOUT", "timeout"),
        ("AI_CONTEXT_MESSAGES", "context_messages"),
        ("AI_MAX_RETRIES", "max_retries"),
        ("AI_FAILURE_MESSAGE", "failure_message"),
    ];

    /// The configured bots; the error names `BOTS`.
    pub fn bot_ids(&self) -> Result<Vec<UserId>, String> {
        self.bots
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(|id| UserId::parse(id).map_err(|e| format!("BOTS: `{id}` is not a valid user id: {e}")))
            .collect()
    }

    /// What the `bot` target needs, each problem naming its variable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.bot_ids() {
            Ok(ids) if ids.is_empty() => problems.push("the bot target needs BOTS (the bots' user ids)".to_owned()),
            Ok(_) => {}
            Err(err) => problems.push(err),
        }
        for (var, url) in [("AI_BASE_URL", &self.base_url), ("CHATPERSISTENCE_INTERNAL_URL", &self.chatpersistence_url)]
        {
            let url = url.trim();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!("the bot target needs {var} (an http:// or https:// URL)"));
            }
        }
        if self.model.trim().is_empty() {
            problems.push("the bot target needs AI_MODEL".to_owned());
        }
        if self.timeout.is_zero() {
            problems.push("AI_TIMEOUT must be greater than zero".to_owned());
        }
        if self.context_messages == 0 {
            problems.push("AI_CONTEXT_MESSAGES must be at least 1".to_owned());
        }
        if MessageContent::parse(&self.failure_message).is_err() {
            problems.push("AI_FAILURE_MESSAGE must be 1 to 4000 characters without control characters".to_owned());
        }
        if self.api_key.contains(['\r', '\n']) {
            problems.push("AI_API_KEY contains a line break".to_owned());
        }
        problems
    }
}

/// Whether `content` asks the group's bot: `/ai` alone or followed by whitespace.
pub fn is_ai_command(content: &str) -> bool {
    content
        .trim_start()
        .strip_prefix(AI_COMMAND)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// The bot adapter shared by a pipeline's handler.
#[derive(Clone)]
pub struct Bots {
    bots: Vec<UserId>,
    settings: BotSettings,
    /// Calls to chatpersistence (bounded by `FORWARD_TIMEOUT`).
    internal: reqwest::Client,
    /// Calls to the model (bounded by `AI_TIMEOUT`).
    model: reqwest::Client,
    token: ServiceToken,
}

impl std::fmt::Debug for Bots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bots").field("bots", &self.bots).field("model", &self.settings.model).finish_non_exhaustive()
    }
}

/// How one model call went.
enum ModelError {
    /// Worth another try (timeout, refused connection, 408, 429, 5xx).
    Transient(String),
    /// No retry will help (another 4xx, an answer without text).
    Final(String),
}

impl ModelError {
    fn reason(&self) -> &str {
        match self {
            Self::Transient(reason) | Self::Final(reason) => reason,
        }
    }
}

impl Bots {
    pub fn new(settings: &BotSettings, forward_timeout: Duration, token: ServiceToken) -> Result<Self, String> {
        let problems = settings.problems();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let build = |timeout: Duration| {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .build()
                .map_err(|err| format!("cannot build the HTTP client: {err}"))
        };
        let mut settings = settings.clone();
        settings.base_url = settings.base_url.trim().trim_end_matches('/').to_owned();
        settings.chatpersistence_url = settings.chatpersistence_url.trim().trim_end_matches('/').to_owned();
        Ok(Self {
            bots: settings.bot_ids()?,
            internal: build(forward_timeout)?,
            model: build(settings.timeout)?,
            settings,
            token,
        })
    }

    fn is_bot(&self, user: &UserId) -> bool {
        self.bots.contains(user)
    }

    /// The bot that answers `event`, if any: a new message to a bot, or a group
    /// message starting with `/ai` whose recipients include a bot (the first
    /// configured one). A bot's own messages never trigger (no loops between bots).
    pub fn trigger(&self, event: &ChangeEvent) -> Option<UserId> {
        let message = &event.message;
        if event.op != ChangeOp::Create || message.state.deleted_at.is_some() || self.is_bot(&message.sender_id) {
            return None;
        }
        match &message.receiver_id {
            Some(receiver) => self.is_bot(receiver).then(|| receiver.clone()),
            None if is_ai_command(message.content.as_str()) => {
                self.bots.iter().find(|bot| message.recipients.contains(bot)).cloned()
            }
            None => None,
        }
    }

    /// Answers `message` as `bot`: context, model (or the failure message), reply.
    pub async fn answer(&self, bot: &UserId, message: &ChatMessage) -> Result<(), HandlerError> {
        let context = self.context(bot, message).await?;
        let (content, outcome) = match self.complete(bot, &context).await {
            Ok(text) => (text, "answered"),
            Err(reason) => {
                tracing::warn!(bot = %bot, message_id = %message.message_id, %reason, "the model did not answer; posting the failure message");
                (self.settings.failure_message.clone(), "failure_message")
            }
        };
        self.reply(bot, message, &content).await?;
        metrics::counter!("bot_replies_total", "outcome" => outcome).increment(1);
        Ok(())
    }

    /// The conversation's last messages up to and including `message`, oldest first.
    async fn context(&self, bot: &UserId, message: &ChatMessage) -> Result<Vec<ChatMessage>, HandlerError> {
        let earlier = self.settings.context_messages.saturating_sub(1);
        let mut messages = Vec::new();
        if earlier > 0 {
            let mut url = format!(
                "{}/chat/messages?stream_id={}&before={}&limit={earlier}",
                self.settings.chatpersistence_url, message.stream_id, message.message_id
            );
            // A pair: only this pair's messages (a legacy stream id may be shared).
            if message.stream_id.kind() == ConversationKind::Pair {
                url.push_str(&format!("&user_id={}&peer_id={bot}", message.sender_id));
            }
            let response = self
                .internal
                .get(&url)
                .headers(servicekit::trace::outgoing())
                .bearer_auth(self.token.expose())
                .send()
                .await
                .map_err(|err| HandlerError::retryable(format!("bot: history: {err}")))?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                let err = classify("bot: history", status, text).err();
                return Err(err.unwrap_or_else(|| HandlerError::retryable(format!("bot: history: {status}"))));
            }
            #[derive(Deserialize)]
            struct Page {
                messages: Vec<ChatMessage>,
            }
            let page: Page =
                response.json().await.map_err(|err| HandlerError::retryable(format!("bot: history: {err}")))?;
            messages = page.messages;
        }
        messages.push(message.clone());
        Ok(messages)
    }

    /// The chat-completions request for `context`.
    fn request(&self, bot: &UserId, context: &[ChatMessage]) -> Value {
        let mut messages = vec![json!({
            "role": "system",
            "content": format!(
                "You are {bot}, an assistant in a chat. Messages from people start with their user id and a colon. \
                 Answer the last message helpfully and briefly, in plain text."
            ),
        })];
        for m in context.iter().filter(|m| m.state.deleted_at.is_none()) {
            if &m.sender_id == bot {
                messages.push(json!({"role": "assistant", "content": m.content.as_str()}));
            } else {
                let text = m.content.as_str().trim_start();
                let text = if is_ai_command(text) { text[AI_COMMAND.len()..].trim_start() } else { text };
                messages.push(json!({"role": "user", "content": format!("{}: {text}", m.sender_id)}));
            }
        }
        json!({ "model": self.settings.model, "messages": messages, "stream": false })
    }

    /// Calls the model, retrying transient failures on the fleet's retry policy
    /// (200 ms doubling to 5 s, `AI_MAX_RETRIES` retries); the answer as storable
    /// content.
    async fn complete(&self, bot: &UserId, context: &[ChatMessage]) -> Result<String, String> {
        let body = &self.request(bot, context);
        let policy =
            RetrySettings::doubling(Duration::from_millis(200), Duration::from_secs(5), self.settings.max_retries);
        let mut attempts = 0u32;
        let result = (|| {
            attempts += 1;
            async move {
                let result = self.call_model(body).await;
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(ModelError::Final(_)) => "failed",
                    Err(ModelError::Transient(_)) => "retryable",
                };
                metrics::counter!("ai_requests_total", "outcome" => outcome).increment(1);
                result
            }
        })
        .retry(&policy)
        .when(|err| matches!(err, ModelError::Transient(_)))
        .notify(|err, wait| tracing::debug!(reason = %err.reason(), ?wait, "model call failed; trying again"))
        .await;
        match result {
            Ok(text) => Ok(text),
            Err(ModelError::Final(reason)) => Err(reason),
            Err(ModelError::Transient(reason)) => Err(format!("{reason} (after {attempts} attempts)")),
        }
    }

    async fn call_model(&self, body: &Value) -> Result<String, ModelError> {
        let mut request = self.model.post(format!("{}/chat/completions", self.settings.base_url)).json(body);
        if !self.settings.api_key.is_empty() {
            request = request.bearer_auth(&self.settings.api_key);
        }
        let response = request.send().await.map_err(|err| ModelError::Transient(format!("model: {err}")))?;
        let status = response.status();
        if !status.is_success() {
            let text: String = response.text().await.unwrap_or_default().chars().take(300).collect();
            let reason = format!("model: {status}: {text}");
            return Err(match status.as_u16() {
                408 | 429 | 500..=599 => ModelError::Transient(reason),
                _ => ModelError::Final(reason),
            });
        }
        let answer: Value = response.json().await.map_err(|err| ModelError::Transient(format!("model: {err}")))?;
        let text = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        storable(text).ok_or_else(|| ModelError::Final("model: the answer has no text".to_owned()))
    }

    /// Posts the reply through chatpersistence's write path, idempotently.
    async fn reply(&self, bot: &UserId, message: &ChatMessage, content: &str) -> Result<(), HandlerError> {
        let mut body = json!({
            "sender_id": bot,
            "content": content,
            "client_message_id": format!("bot-reply:{}", message.message_id),
        });
        if message.receiver_id.is_some() {
            body["receiver_id"] = json!(message.sender_id);
        } else {
            body["conversation_id"] = json!(message.stream_id);
        }
        let url = format!("{}/chat/bot-messages", self.settings.chatpersistence_url);
        let response = self
            .internal
            .post(&url)
            .headers(servicekit::trace::outgoing())
            .bearer_auth(self.token.expose())
            .json(&body)
            .send()
            .await
            .map_err(|err| HandlerError::retryable(format!("bot: reply: {err}")))?;
        match response.status().as_u16() {
            // 200: this reply was already stored (a redelivery); 409: an earlier
            // attempt stored a different answer to the same message. Either way the
            // message has its one reply. 202: queued (chatpersistence in write-behind mode).
            200..=202 | 409 => Ok(()),
            _ => {
                let status = response.status();
                classify("bot: reply", status, response.text().await.unwrap_or_default())
            }
        }
    }
}

/// `text` as chatpersistence stores it: control characters other than newline and tab
/// dropped, at most 4000 characters; `None` when nothing is left.
fn storable(text: &str) -> Option<String> {
    let cleaned: String = text.chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\t')).collect();
    let cleaned: String = cleaned.trim().chars().take(MAX_REPLY_CHARS).collect();
    MessageContent::parse(&cleaned).ok().map(|content| content.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bots(ids: &str) -> Bots {
        let settings = BotSettings {
            bots: ids.to_owned(),
            base_url: "http://model:1/v1/".to_owned(),
            model: "m".to_owned(),
            ..BotSettings::default()
        };
        let token = ServiceToken::parse("0123456789abcdef0123456789abcdef").expect("token");
        Bots::new(&settings, Duration::from_secs(1), token).expect("valid")
    }

    fn event(value: Value) -> ChangeEvent {
        match chatstream::ChatChange::parse(value.to_string().as_bytes()).expect("parses") {
            chatstream::ChatChange::Message(event) => event,
            chatstream::ChatChange::Conversation(_) => panic!("a message"),
        }
    }

    fn pair(sender: &str, receiver: &str, content: &str, op: &str) -> ChangeEvent {
        let stream = chatstream::StreamId::for_pair(
            &UserId::parse(sender).expect("valid"),
            &UserId::parse(receiver).expect("valid"),
        );
        event(json!({"_id": "m", "message_id": "0195c1a4-0000-7000-8000-000000000001", "stream_id": stream.to_string(),
            "sender_id": sender, "receiver_id": receiver, "content": content, "created_at": 1_760_000_000_000_i64,
            "__op": op, "__source_ts_ms": 5, "__deleted": "false"}))
    }

    fn group(sender: &str, recipients: &[&str], content: &str) -> ChangeEvent {
        event(json!({"_id": "m", "message_id": "0195c1a4-0000-7000-8000-000000000002",
            "stream_id": chatstream::StreamId::new_group().to_string(), "sender_id": sender,
            "recipients": recipients, "content": content, "created_at": 1_760_000_000_000_i64,
            "__op": "c", "__source_ts_ms": 5, "__deleted": "false"}))
    }

    #[test]
    fn who_triggers_a_bot() {
        let b = bots("assistant, helper");
        let assistant = UserId::parse("assistant").expect("valid");
        assert_eq!(b.trigger(&pair("alice", "assistant", "hi", "c")), Some(assistant.clone()));
        assert_eq!(b.trigger(&pair("alice", "bob", "/ai hi", "c")), None, "a pair without a bot");
        assert_eq!(b.trigger(&pair("assistant", "alice", "hello", "c")), None, "never its own messages");
        assert_eq!(b.trigger(&pair("helper", "assistant", "hello", "c")), None, "no loops between bots");
        assert_eq!(b.trigger(&pair("alice", "assistant", "hi", "u")), None, "an edit is not a question");
        assert_eq!(b.trigger(&group("alice", &["bob", "assistant"], "  /ai what time is it")), Some(assistant));
        assert_eq!(
            b.trigger(&group("alice", &["bob", "assistant"], "/ai")).map(|u| u.to_string()).as_deref(),
            Some("assistant")
        );
        assert_eq!(b.trigger(&group("alice", &["bob", "assistant"], "hello all")), None, "no /ai");
        assert_eq!(b.trigger(&group("alice", &["bob", "assistant"], "/aim high")), None, "/ai is a word");
        assert_eq!(b.trigger(&group("alice", &["bob"], "/ai hi")), None, "no bot in the group");
        assert_eq!(b.trigger(&group("assistant", &["alice", "helper"], "/ai hi")), None);
    }

    #[test]
    fn the_request_has_roles_and_sender_prefixes() {
        let b = bots("assistant");
        let bot = UserId::parse("assistant").expect("valid");
        let first = group("alice", &["bob", "assistant"], "/ai what is 2+2?").message;
        let mut answer = group("assistant", &["alice", "bob"], "4").message;
        answer.sender_id = bot.clone();
        let request = b.request(&bot, &[first, answer]);
        assert_eq!(request["model"], "m");
        let messages = request["messages"].as_array().expect("messages");
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[1], json!({"role": "user", "content": "alice: what is 2+2?"}));
        assert_eq!(messages[2], json!({"role": "assistant", "content": "4"}));
    }

    #[test]
    fn answers_are_made_storable() {
        assert_eq!(storable("  hi\u{0}\r\nthere "), Some("hi\nthere".to_owned()));
        assert_eq!(storable(" \u{7} "), None);
        assert_eq!(storable(&"x".repeat(5000)).map(|s| s.chars().count()), Some(4000));
    }

    #[test]
    fn settings_problems_name_their_variables() {
        let problems = BotSettings { bots: "assistant".into(), ..BotSettings::default() }.problems().join("; ");
        assert!(problems.contains("AI_BASE_URL"), "{problems}");
        assert!(problems.contains("AI_MODEL"), "{problems}");
        let problems = BotSettings::default().problems().join("; ");
        assert!(problems.contains("needs BOTS"), "{problems}");
        let problems = BotSettings { bots: "bad id".into(), ..BotSettings::default() }.problems().join("; ");
        assert!(problems.contains("BOTS: `bad id`"), "{problems}");
    }
}
