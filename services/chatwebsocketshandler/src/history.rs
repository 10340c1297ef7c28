//! Reads the messages a reconnecting client missed from chatpersistence.
//!
//! Why this module exists: a socket opened with `since=<message_id>` must first get
//! every message after that id, and only then live ones. MongoDB (through
//! chatpersistence's internal `GET /chat/messages`) is the source of truth, so the
//! replay pages through it here, bounded by `HISTORY_REPLAY_LIMIT`. The same client
//! asks chatpersistence who the members of a group are (`GET
//! /chat/conversations/{id}/members`), because only current members may subscribe,
//! and which of the messages the client already had changed while it was away (`GET
//! /chat/messages/changes`: edits and deletions it must not keep showing stale).

use chatstream::{ChatMessage, MessageId, StreamId, UserId};
use serde::Deserialize;

use crate::protocol;
use crate::settings::HistorySettings;

/// Why the replay could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history unavailable: {0}")]
    Unavailable(String),
    #[error("more than {limit} messages follow the given since")]
    TooFarBehind { limit: usize },
}

/// One page of chatpersistence's history (`{"stream_id", "messages", "has_more"}`);
/// a bare array of messages is accepted too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Page {
    Object {
        messages: Vec<ChatMessage>,
        #[serde(default)]
        has_more: Option<bool>,
    },
    Bare(Vec<ChatMessage>),
}

/// Whose messages a replay may contain: a pair socket's pair, or a group member's
/// (the group's messages that involve them: sent by them or addressed to them).
#[derive(Debug, Clone, Copy)]
pub enum Reader<'a> {
    Pair(&'a UserId, &'a UserId),
    Member(&'a UserId),
}

/// A group's members as chatpersistence's internal endpoint reports them.
#[derive(Debug, Deserialize)]
pub struct Members {
    pub members: Vec<UserId>,
}

/// A client of chatpersistence's internal history and members endpoints.
#[derive(Clone)]
pub struct HistoryClient {
    http: reqwest::Client,
    url: String,
    /// chatpersistence's internal listener, without a trailing slash.
    base: String,
    token: String,
    page_size: usize,
    replay_limit: usize,
}

impl HistoryClient {
    pub fn new(settings: &HistorySettings, service_token: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .build()
            .map_err(|err| format!("cannot build the history HTTP client: {err}"))?;
        Ok(Self {
            http,
            url: format!("{}/chat/messages", settings.chatpersistence_internal_url.trim_end_matches('/')),
            base: settings.chatpersistence_internal_url.trim_end_matches('/').to_owned(),
            token: service_token.to_owned(),
            page_size: settings.page_size.max(1),
            replay_limit: settings.replay_limit,
        })
    }

    /// The current members of group `conversation`: `Ok(None)` when chatpersistence
    /// knows no such conversation (`404`), `Unavailable` when it cannot say (down,
    /// timeout, any other answer).
    pub async fn members(&self, conversation: StreamId) -> Result<Option<Vec<UserId>>, HistoryError> {
        let url = format!("{}/chat/conversations/{conversation}/members", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|err| HistoryError::Unavailable(format!("GET {url}: {err}")))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(HistoryError::Unavailable(format!("GET {url} answered {status}")));
        }
        let body =
            response.bytes().await.map_err(|err| HistoryError::Unavailable(format!("reading members: {err}")))?;
        serde_json::from_slice::<Members>(&body)
            .map(|members| Some(members.members))
            .map_err(|err| HistoryError::Unavailable(format!("unexpected members body: {err}")))
    }

    /// Every message of `stream` after `since` that `reader` may see, oldest first.
    pub async fn after(
        &self,
        stream: StreamId,
        reader: Reader<'_>,
        since: MessageId,
    ) -> Result<Vec<ChatMessage>, HistoryError> {
        let audience = match reader {
            Reader::Pair(user, peer) => protocol::pair_audience(user, peer),
            Reader::Member(user) => user.to_string(),
        };
        let mut messages: Vec<ChatMessage> = Vec::new();
        let mut cursor = since;
        // Each page advances the cursor, so this ends; the bound is a second guard.
        let max_pages = self.replay_limit / self.page_size + 2;
        for _ in 0..max_pages {
            let (page, has_more) = self.page(stream, reader, cursor).await?;
            let received = page.len();
            for message in page {
                // Defensive: only this stream and pair, strictly after the cursor, in order.
                if message.message_id <= cursor {
                    continue;
                }
                cursor = message.message_id;
                if message.stream_id == stream && protocol::may_see(&message, &audience) {
                    messages.push(message);
                }
            }
            if messages.len() > self.replay_limit {
                return Err(HistoryError::TooFarBehind { limit: self.replay_limit });
            }
            let more = has_more.unwrap_or(received >= self.page_size);
            if !more || received == 0 {
                return Ok(messages);
            }
        }
        Err(HistoryError::TooFarBehind { limit: self.replay_limit })
    }

    /// The current state of the messages of `stream` up to `up_to` (included) that
    /// changed (edit, deletion, reaction) after `after_ms` epoch milliseconds and that
    /// `reader` may see, oldest first: what a client reconnecting with `since = up_to`
    /// missed about messages it already had. More than `HISTORY_REPLAY_LIMIT` (or than
    /// chatpersistence serves in one page) is `TooFarBehind`. A `404` (a
    /// chatpersistence that predates the endpoint) is no changes.
    pub async fn changes(
        &self,
        stream: StreamId,
        reader: Reader<'_>,
        up_to: MessageId,
        after_ms: u64,
    ) -> Result<Vec<ChatMessage>, HistoryError> {
        let url = format!("{}/chat/messages/changes", self.base);
        let limit = (self.replay_limit + 1).to_string();
        let mut query = vec![
            ("stream_id", stream.to_string()),
            ("up_to", up_to.to_string()),
            ("after_ms", after_ms.to_string()),
            ("limit", limit),
        ];
        let audience = match reader {
            Reader::Pair(user, peer) => {
                query.push(("user_id", user.to_string()));
                query.push(("peer_id", peer.to_string()));
                protocol::pair_audience(user, peer)
            }
            Reader::Member(user) => user.to_string(),
        };
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .query(&query)
            .send()
            .await
            .map_err(|err| HistoryError::Unavailable(format!("GET {url}: {err}")))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            // A chatpersistence older than this endpoint (a rolling deploy): replay the
            // messages, as before, without the changes.
            tracing::debug!(%url, "no changes endpoint on chatpersistence; replaying messages only");
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(HistoryError::Unavailable(format!("GET {url} answered {status}")));
        }
        let body =
            response.bytes().await.map_err(|err| HistoryError::Unavailable(format!("reading changes: {err}")))?;
        let (messages, has_more) = match serde_json::from_slice::<Page>(&body) {
            Ok(Page::Object { messages, has_more }) => (messages, has_more.unwrap_or(false)),
            Ok(Page::Bare(messages)) => (messages, false),
            Err(err) => return Err(HistoryError::Unavailable(format!("unexpected changes body: {err}"))),
        };
        if has_more || messages.len() > self.replay_limit {
            return Err(HistoryError::TooFarBehind { limit: self.replay_limit });
        }
        Ok(messages
            .into_iter()
            .filter(|m| m.stream_id == stream && m.message_id <= up_to && protocol::may_see(m, &audience))
            .collect())
    }

    async fn page(
        &self,
        stream: StreamId,
        reader: Reader<'_>,
        since: MessageId,
    ) -> Result<(Vec<ChatMessage>, Option<bool>), HistoryError> {
        let limit = self.page_size.min(self.replay_limit + 1).max(1).to_string();
        let mut query = vec![("stream_id", stream.to_string()), ("since", since.to_string()), ("limit", limit)];
        // A pair's page is filtered by chatpersistence too; a group's page is the
        // group's (filtered here by involvement, like live frames).
        if let Reader::Pair(user, peer) = reader {
            query.push(("user_id", user.to_string()));
            query.push(("peer_id", peer.to_string()));
        }
        let response = self
            .http
            .get(&self.url)
            .bearer_auth(&self.token)
            .query(&query)
            .send()
            .await
            .map_err(|err| HistoryError::Unavailable(format!("GET {}: {err}", self.url)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(HistoryError::Unavailable(format!("GET {} answered {status}", self.url)));
        }
        let body =
            response.bytes().await.map_err(|err| HistoryError::Unavailable(format!("reading history: {err}")))?;
        match serde_json::from_slice::<Page>(&body) {
            Ok(Page::Object { messages, has_more }) => Ok((messages, has_more)),
            Ok(Page::Bare(messages)) => Ok((messages, None)),
            Err(err) => Err(HistoryError::Unavailable(format!("unexpected history body: {err}"))),
        }
    }
}
