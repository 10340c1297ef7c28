//! Many users' notifications of one change in a few `POST /notifications/batch`
//! requests instead of one `POST` each, with a result per user.
//!
//! Why this module exists: a group message to N members used to cost N internal
//! requests, which capped notification fan-out at the HTTP stack's rate, not the
//! sockets'. Here they go as ceil(N / `NOTIFICATIONS_BATCH_SIZE`) requests, and each
//! user's outcome is still its own, so the handler's retries and give-up actions work
//! per user exactly as they did with one call each.
//!
//! Routing. The proxy in front of the notification pods hashes on the `user_id` query
//! parameter, so a batch goes where its `user_id` routes (the first item's user) and
//! that pod delivers what it holds sockets for. For a user it has no socket for, the
//! pod reads presence and answers `no_connections` (offline: done), `elsewhere` with
//! the pod instance holding the user's sockets, or `unknown` (Redis down). The
//! `elsewhere` items are grouped by that instance and sent again, routed by one of
//! them (the proxy sends every user with sockets on a pod to that pod); what is still
//! not placed after that round, and every `unknown`, goes through the single
//! per-user endpoint, routed by the proxy exactly as before. A pod that does not know
//! the batch route (`404`/`405`, an older version during a rolling update) or refuses
//! the batch's size (`413`) gets the same single calls. So with one pod (or the
//! proxy's ring stable) a group message costs one request per chunk, and the worst
//! case costs what it did before plus the batches.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use kafkawrapper::HandlerError;
use serde_json::{json, Value};

use crate::forward::{classify, Forwarder};

/// One user's notification: what the single endpoint would get.
#[derive(Debug, Clone)]
pub struct Item {
    pub user: String,
    /// The batch item's kind (`chat`, `conversation`, …).
    pub kind: &'static str,
    /// The single endpoint's body; items of one change share it (`Arc::ptr_eq`).
    pub body: Arc<Value>,
    /// The single endpoint's URL, for the fallback.
    pub single_url: String,
}

/// What one item of a batch answer asks the caller to do next.
#[derive(Debug)]
enum Next {
    Done(Result<(), HandlerError>),
    /// The user's sockets are on this pod instance.
    Elsewhere(String),
    /// Send it to its single endpoint.
    Single,
}

/// Sends items in batches to `{base}/notifications/batch`.
#[derive(Clone)]
pub struct Batcher {
    forwarder: Forwarder,
    url: String,
    max_items: usize,
}

impl Batcher {
    /// `None` when batching is off (`max_items` below 2).
    pub fn new(forwarder: Forwarder, notifications_url: &str, max_items: usize) -> Option<Self> {
        (max_items >= 2).then(|| Self { forwarder, url: format!("{notifications_url}/notifications/batch"), max_items })
    }

    /// Delivers every item; the result of each, in order.
    pub async fn deliver(&self, target: &'static str, items: &[Item]) -> Vec<Result<(), HandlerError>> {
        let mut results: Vec<Option<Result<(), HandlerError>>> = (0..items.len()).map(|_| None).collect();
        let all: Vec<usize> = (0..items.len()).collect();
        let first = self.round(target, items, vec![all]).await;
        let mut singles = Vec::new();
        let mut elsewhere: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (index, next) in first {
            match next {
                Next::Done(result) => results[index] = Some(result),
                Next::Elsewhere(owner) => elsewhere.entry(owner).or_default().push(index),
                Next::Single => singles.push(index),
            }
        }
        if !elsewhere.is_empty() {
            metrics::counter!("notification_batch_rerouted_total", "target" => target)
                .increment(elsewhere.values().map(Vec::len).sum::<usize>() as u64);
            for (index, next) in self.round(target, items, elsewhere.into_values().collect()).await {
                match next {
                    Next::Done(result) => results[index] = Some(result),
                    // Still not placed: the proxy's ring moved; the single route knows.
                    Next::Elsewhere(_) | Next::Single => singles.push(index),
                }
            }
        }
        if !singles.is_empty() {
            metrics::counter!("notification_batch_singles_total", "target" => target).increment(singles.len() as u64);
            let posts = singles.iter().map(|&index| {
                let item = &items[index];
                async move { (index, self.forwarder.post(target, &item.single_url, &item.body).await) }
            });
            for (index, result) in join_all(posts).await {
                results[index] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(HandlerError::retryable(format!("{target}: no answer")))))
            .collect()
    }

    /// One round: each group (users the same pod should hold) in chunks, all at once.
    async fn round(&self, target: &'static str, items: &[Item], groups: Vec<Vec<usize>>) -> Vec<(usize, Next)> {
        let chunks: Vec<Vec<usize>> =
            groups.iter().flat_map(|group| group.chunks(self.max_items).map(<[usize]>::to_vec)).collect();
        let posts = chunks.into_iter().map(|chunk| async move {
            let answers = self.post(target, items, &chunk).await;
            chunk.into_iter().zip(answers).collect::<Vec<_>>()
        });
        join_all(posts).await.into_iter().flatten().collect()
    }

    /// Posts one chunk, routed by its first user; one `Next` per item of the chunk.
    async fn post(&self, target: &'static str, items: &[Item], chunk: &[usize]) -> Vec<Next> {
        let body = batch_body(items, chunk);
        let route = chunk.first().map_or("", |&index| items[index].user.as_str());
        let url = format!("{}?user_id={route}", self.url);
        let all = |next: &dyn Fn() -> Next| chunk.iter().map(|_| next()).collect::<Vec<_>>();
        match self.forwarder.post_for_json(target, &url, &body).await {
            Err(err) => all(&|| Next::Done(Err(err.clone()))),
            Ok((status, answer)) => match status.as_u16() {
                200 => read_answer(target, &answer, chunk.len()),
                // No batch route there (an older pod) or a body it will not take.
                404 | 405 | 413 => all(&|| Next::Single),
                _ => {
                    let error = classify(target, status, answer.to_string()).err();
                    all(&|| Next::Done(Err(error.clone().unwrap_or_else(|| HandlerError::retryable("batch")))))
                }
            },
        }
    }
}

/// `{"shared": [...], "items": [...]}` for the chunk: a body several items share (the
/// same `Arc`) is sent once.
fn batch_body(items: &[Item], chunk: &[usize]) -> Value {
    let mut shared: Vec<&Arc<Value>> = Vec::new();
    let mut out = Vec::with_capacity(chunk.len());
    for &index in chunk {
        let item = &items[index];
        let at = match shared.iter().position(|body| Arc::ptr_eq(body, &item.body)) {
            Some(at) => at,
            None => {
                shared.push(&item.body);
                shared.len() - 1
            }
        };
        out.push(json!({"user_id": item.user, "kind": item.kind, "shared": at}));
    }
    let shared: Vec<&Value> = shared.into_iter().map(|body| body.as_ref()).collect();
    json!({"shared": shared, "items": out})
}

/// The per-item answers of a `200`: done, retry, give up, reroute or single.
fn read_answer(target: &'static str, answer: &Value, expected: usize) -> Vec<Next> {
    let results = answer["results"].as_array().filter(|results| results.len() == expected);
    let Some(results) = results else {
        let error = HandlerError::retryable(format!("{target}: a batch answer without one result per item"));
        return (0..expected).map(|_| Next::Done(Err(error.clone()))).collect();
    };
    results
        .iter()
        .map(|result| {
            let outcome = result["outcome"].as_str().unwrap_or_default();
            match outcome {
                "ok" | "no_connections" => Next::Done(Ok(())),
                "elsewhere" => match result["owner"].as_str() {
                    Some(owner) => Next::Elsewhere(owner.to_owned()),
                    None => Next::Single,
                },
                "unknown" => Next::Single,
                _ => {
                    let status = result["status"]
                        .as_u64()
                        .and_then(|s| u16::try_from(s).ok())
                        .and_then(|s| reqwest::StatusCode::from_u16(s).ok())
                        .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR);
                    let detail = format!("{} {}", result["user_id"], outcome);
                    Next::Done(classify(target, status, detail))
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(user: &str, body: &Arc<Value>) -> Item {
        Item { user: user.into(), kind: "chat", body: body.clone(), single_url: format!("http://n/x?user_id={user}") }
    }

    #[test]
    fn a_shared_body_is_sent_once_per_batch() {
        let message = Arc::new(json!({"message": {"message_id": "m"}}));
        let other = Arc::new(json!({"message": {"message_id": "m"}}));
        let items = vec![item("bob", &message), item("carol", &message), item("dave", &other)];
        let body = batch_body(&items, &[0, 1, 2]);
        assert_eq!(body["shared"].as_array().map(Vec::len), Some(2), "by identity, not by value");
        assert_eq!(body["items"][1], json!({"user_id": "carol", "kind": "chat", "shared": 0}));
        assert_eq!(body["items"][2]["shared"], 1);
    }

    #[test]
    fn each_item_answer_means_done_retry_give_up_or_reroute() {
        let answer = json!({"results": [
            {"user_id": "a", "status": 200, "outcome": "ok"},
            {"user_id": "b", "status": 200, "outcome": "no_connections"},
            {"user_id": "c", "status": 206, "outcome": "partial"},
            {"user_id": "d", "status": 500, "outcome": "failed"},
            {"user_id": "e", "status": 400, "outcome": "invalid"},
            {"user_id": "f", "status": 200, "outcome": "elsewhere", "owner": "pod-2/x"},
            {"user_id": "g", "status": 200, "outcome": "unknown"},
        ]});
        let next = read_answer("chat_notification", &answer, 7);
        assert!(matches!(next[0], Next::Done(Ok(()))));
        assert!(matches!(next[1], Next::Done(Ok(()))));
        assert!(matches!(next[2], Next::Done(Err(HandlerError::Retryable(_)))));
        assert!(matches!(next[3], Next::Done(Err(HandlerError::Retryable(_)))));
        assert!(matches!(next[4], Next::Done(Err(HandlerError::Permanent(_)))));
        assert!(matches!(&next[5], Next::Elsewhere(owner) if owner == "pod-2/x"));
        assert!(matches!(next[6], Next::Single));
        let short = read_answer("chat_notification", &answer, 8);
        assert!(short.iter().all(|n| matches!(n, Next::Done(Err(HandlerError::Retryable(_))))), "count mismatch");
    }
}
