//! Message forwards to the socket pod, several in one request when they queue up.
//!
//! Why this module exists: at a few hundred messages a second the socket pod spent
//! most of its CPU serving one internal `POST` per message (HTTP parse, routing,
//! middleware, answer), and the change handler as much sending it (docs/benchmarks.md,
//! "CPU per message"). Each partition worker hands its record's forward to one sender
//! task and waits for that record's own result; while a request is in flight the
//! forwards of the other partitions queue, and the next request carries all of them
//! (`POST /chat/forward-batch`, answered per event). By default nothing waits on
//! purpose: a lone forward goes out at once, on its own route, exactly as before;
//! `CHAT_WEBSOCKET_FORWARD_LINGER` lets the first forward of a batch wait up to that
//! long for the forwards of records other partitions are handling right now (claimed or
//! claiming, [`Approach`]); with none on the way it does not wait at all, so a linger
//! neither delays a lone message nor caps a partition's rate.
//!
//! The guarantees stay per record: each event gets the status its own forward would
//! have got (`200`/`206`/`500`/`4xx`, classified by `crate::forward::classify`), so
//! retries, dead letters and failover are unchanged; order per stream holds because a
//! partition (which holds all of a stream's records) has at most one forward queued or
//! in flight. A batch has no single `stream_id`, so the proxies (which hash forwards on
//! it) do not route its path: through them the batch is answered `404` and the sender
//! falls back to one request per event for good (a warning says so). Batching pays off
//! where `CHAT_WEBSOCKET_URL` is one socket pod (the local stack, a single-pod fleet).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kafkawrapper::HandlerError;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

use crate::forward::{classify, Forwarder};

/// Forwards waiting for the sender at most; a partition worker waits for room (there
/// is one forward per partition at a time, so this is never reached in practice).
const QUEUE: usize = 1_024;
/// A batch's body stays under this (the pods' `HTTP_BODY_LIMIT` is 64 KiB by default);
/// a forward that would cross it waits for the next request.
const MAX_BATCH_BYTES: usize = 48 * 1024;
/// The target label of the batch requests' metrics.
const TARGET: &str = "chat_websocket";

/// One record's forward, waiting for the sender.
struct Pending {
    /// The event as it appears in a batch: its single body plus `stream_id`.
    event: Vec<u8>,
    /// Its own route and body, for a lone forward or the fallback.
    single_url: String,
    body: Arc<Value>,
    /// The record's trace: the sender task runs outside the record's span.
    traceparent: Option<String>,
    reply: oneshot::Sender<Result<(), HandlerError>>,
}

/// The handle the pipeline's handler forwards through. Cheap to clone.
#[derive(Clone)]
pub struct ForwardBatcher {
    queue: mpsc::Sender<Pending>,
    approaching: Arc<Approaching>,
}

/// How many records are being handled and will forward soon (claimed or claiming, not
/// yet queued): a lingering batch waits for these and for nothing else.
#[derive(Default)]
struct Approaching {
    count: AtomicUsize,
    changed: Notify,
}

/// A record on its way to a forward; dropped once its forward is queued (or the record
/// needs none after all).
pub struct Approach(Arc<Approaching>);

impl Drop for Approach {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

impl ForwardBatcher {
    /// Starts the sender task (on the current runtime) for `base_url`'s socket pod;
    /// `None` when `max_events` is below 2 (each forward then goes on its own).
    pub fn start(forwarder: Forwarder, base_url: &str, max_events: usize, linger: Duration) -> Option<Self> {
        if max_events < 2 {
            return None;
        }
        let (queue, receiver) = mpsc::channel(QUEUE);
        let approaching = Arc::new(Approaching::default());
        let sender = Sender {
            approaching: approaching.clone(),
            forwarder,
            url: format!("{base_url}/chat/forward-batch"),
            max_events,
            linger,
            unavailable: AtomicBool::new(false),
        };
        tokio::spawn(sender.run(receiver));
        Some(Self { queue, approaching })
    }

    /// Marks a record as on its way to a forward, until the returned guard is dropped
    /// (`forward` drops it once the forward is queued).
    pub fn approach(&self) -> Approach {
        self.approaching.count.fetch_add(1, Ordering::SeqCst);
        Approach(self.approaching.clone())
    }

    /// Forwards one event of `stream` (whose own route is `single_url`) and returns its
    /// own result.
    /// `approach` (the record's guard from [`ForwardBatcher::approach`]) is dropped once
    /// the forward is queued.
    pub async fn forward(
        &self,
        stream: &str,
        single_url: &str,
        body: &Arc<Value>,
        approach: Option<Approach>,
    ) -> Result<(), HandlerError> {
        // The record's trace travels with its event: a batch carries several records'
        // traces, so the request's own headers cannot.
        let traceparent = servicekit::trace::traceparent();
        let event = batch_event(stream, body, traceparent.as_deref())?;
        let (reply, answer) = oneshot::channel();
        let pending = Pending { event, single_url: single_url.to_owned(), body: body.clone(), traceparent, reply };
        let stopped = || HandlerError::retryable(format!("{TARGET}: the forward sender stopped"));
        let queued = self.queue.send(pending).await;
        drop(approach);
        queued.map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// `{"stream_id":…,` (and `"traceparent":…,` when the record has a trace) followed by
/// the rest of the single body: one batch event.
fn batch_event(stream: &str, body: &Value, traceparent: Option<&str>) -> Result<Vec<u8>, HandlerError> {
    let (Ok(stream), Ok(single), Ok(trace)) =
        (serde_json::to_vec(stream), serde_json::to_vec(body), traceparent.map(serde_json::to_vec).transpose())
    else {
        return Err(HandlerError::permanent(format!("{TARGET}: the event cannot be serialized")));
    };
    // The single body is a non-empty JSON object: `{"type":…}`.
    if single.len() < 3 || single.first() != Some(&b'{') {
        return Err(HandlerError::permanent(format!("{TARGET}: the event is not a JSON object")));
    }
    let mut event = Vec::with_capacity(single.len() + stream.len() + 14);
    event.extend_from_slice(b"{\"stream_id\":");
    event.extend_from_slice(&stream);
    event.push(b',');
    if let Some(trace) = trace {
        event.extend_from_slice(b"\"traceparent\":");
        event.extend_from_slice(&trace);
        event.push(b',');
    }
    event.extend_from_slice(&single[1..]);
    Ok(event)
}

struct Sender {
    forwarder: Forwarder,
    url: String,
    max_events: usize,
    /// How long the first forward of a batch waits for more (`CHAT_WEBSOCKET_FORWARD_LINGER`),
    /// as long as records are approaching.
    linger: Duration,
    approaching: Arc<Approaching>,
    /// Set after the route was answered `404`/`405` (a proxy, or an older pod): from
    /// then on every forward goes on its own.
    unavailable: AtomicBool,
}

impl Sender {
    async fn run(self, mut receiver: mpsc::Receiver<Pending>) {
        let mut carried: Option<Pending> = None;
        loop {
            let first = match carried.take() {
                Some(pending) => pending,
                None => match receiver.recv().await {
                    Some(pending) => pending,
                    None => return,
                },
            };
            let mut bytes = first.event.len();
            let mut batch = vec![first];
            let until = tokio::time::Instant::now() + self.linger;
            while batch.len() < self.max_events {
                let next = match receiver.try_recv() {
                    Ok(next) => next,
                    Err(_) if self.linger.is_zero() || self.unavailable.load(Ordering::Relaxed) => break,
                    // Nobody else is on the way: waiting would only delay this batch.
                    Err(_) if self.approaching.count.load(Ordering::SeqCst) == 0 => break,
                    Err(_) => tokio::select! {
                        next = receiver.recv() => match next {
                            Some(next) => next,
                            None => break,
                        },
                        // One of them queued its forward, or needs none: look again.
                        _ = self.approaching.changed.notified() => continue,
                        _ = tokio::time::sleep_until(until) => break,
                    },
                };
                if bytes + next.event.len() + 1 > MAX_BATCH_BYTES {
                    carried = Some(next);
                    break;
                }
                bytes += next.event.len() + 1;
                batch.push(next);
            }
            metrics::gauge!("forward_batch_queued").set(receiver.len() as f64);
            self.send(batch).await;
        }
    }

    /// Sends `batch` (one request, or one per event when it holds one or the batch
    /// route is unavailable) and hands each event its result.
    async fn send(&self, batch: Vec<Pending>) {
        if batch.len() < 2 || self.unavailable.load(Ordering::Relaxed) {
            return self.one_by_one(batch).await;
        }
        metrics::histogram!("forward_batch_events").record(batch.len() as f64);
        let mut body = Vec::with_capacity(batch.iter().map(|p| p.event.len() + 1).sum::<usize>() + 16);
        body.extend_from_slice(b"{\"events\":[");
        for (index, pending) in batch.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&pending.event);
        }
        body.extend_from_slice(b"]}");
        match self.forwarder.post_raw_for_json(TARGET, &self.url, body).await {
            Ok((StatusCode::OK, answer)) => {
                let results = answer.get("results").and_then(Value::as_array);
                for (index, pending) in batch.into_iter().enumerate() {
                    let result = match results.and_then(|results| results.get(index)) {
                        Some(result) => event_result(result),
                        None => Err(HandlerError::retryable(format!("{TARGET}: the batch answer lacks event {index}"))),
                    };
                    let _ = pending.reply.send(result);
                }
            }
            // The pod (or the proxy in front of it) could not take it now: each retries.
            Ok((status, answer)) if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 => {
                let error = HandlerError::retryable(format!("{TARGET}: batch: {status}: {answer}"));
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
            // Not routed (a proxy), or refused as a whole: each on its own route, which
            // answers for itself.
            Ok((status, answer)) => {
                if matches!(status.as_u16(), 404 | 405) && !self.unavailable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        url = %self.url, %status,
                        "the socket pod's batch route is not reachable here (a proxy does not route it); \
                         forwarding one request per event from now on"
                    );
                } else {
                    tracing::warn!(url = %self.url, %status, %answer, "batch refused; forwarding its events one by one");
                }
                metrics::counter!("forward_batch_fallbacks_total").increment(1);
                self.one_by_one(batch).await;
            }
            Err(error) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Each forward on its own route, concurrently.
    async fn one_by_one(&self, batch: Vec<Pending>) {
        join_all(batch.into_iter().map(|pending| async move {
            // Sent in the record's trace (the headers come from the current span).
            let span =
                tracing::info_span!(target: servicekit::trace::TARGET, "forward", trace_id = tracing::field::Empty);
            servicekit::trace::adopt(&span, pending.traceparent.as_deref());
            let post = self.forwarder.post(TARGET, &pending.single_url, &pending.body);
            let result = post.instrument(span).await;
            let _ = pending.reply.send(result);
        }))
        .await;
    }
}

/// One event's result in a batch answer, as its own forward's status would count.
fn event_result(result: &Value) -> Result<(), HandlerError> {
    let status = result.get("status").and_then(Value::as_u64).and_then(|s| u16::try_from(s).ok());
    match status.and_then(|s| StatusCode::from_u16(s).ok()) {
        Some(status) => classify(TARGET, status, result.to_string()),
        None => Err(HandlerError::retryable(format!("{TARGET}: a batch result without a status: {result}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_batch_event_is_the_single_body_with_its_stream() {
        let body = json!({"type": "message", "message": {"content": "a \"quoted\" ,}"}});
        let event = batch_event("d.alice.bob", &body, None).expect("serializes");
        let parsed: Value = serde_json::from_slice(&event).expect("valid JSON");
        assert_eq!(parsed["stream_id"], "d.alice.bob");
        assert!(parsed.get("traceparent").is_none());
        let traced = batch_event("d.alice.bob", &body, Some("00-ab-cd-01")).expect("serializes");
        let traced: Value = serde_json::from_slice(&traced).expect("valid JSON");
        assert_eq!((&traced["traceparent"], &traced["message"]), (&json!("00-ab-cd-01"), &parsed["message"]));
        assert_eq!(parsed["type"], "message");
        assert_eq!(parsed["message"]["content"], "a \"quoted\" ,}");
        assert!(batch_event("s", &json!({}), None).is_err(), "an empty body is no event");
        assert!(batch_event("s", &json!([1]), None).is_err());
    }

    #[test]
    fn each_result_counts_as_its_own_forward_would() {
        assert!(event_result(&json!({"status": 200})).is_ok());
        assert!(matches!(event_result(&json!({"status": 206})), Err(HandlerError::Retryable(_))));
        assert!(matches!(event_result(&json!({"status": 500})), Err(HandlerError::Retryable(_))));
        assert!(matches!(event_result(&json!({"status": 400, "error": "x"})), Err(HandlerError::Permanent(_))));
        assert!(matches!(event_result(&json!({"status": "200"})), Err(HandlerError::Retryable(_))));
        assert!(matches!(event_result(&json!({})), Err(HandlerError::Retryable(_))));
        assert!(matches!(event_result(&json!({"status": 70000})), Err(HandlerError::Retryable(_))));
    }
}
