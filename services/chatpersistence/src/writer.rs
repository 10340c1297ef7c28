//! Group commit: concurrent message inserts share one `insert_many`.
//!
//! Why this module exists: every message must be durable before its `201`
//! (`{w: "majority", j: true}`), and a durable write costs the server a journal
//! flush. One insert per request makes that flush the ceiling of the whole API
//! (about 400 durable inserts/s on the local MongoDB stand-in). Requests that arrive
//! while a batch is being written are written together in the next one, so the
//! flushes are shared while each request still waits for its own document to be
//! acknowledged. At low load a batch is a single document and nothing waits.
//!
//! Duplicate keys stay per document (`ordered: false`): one retried
//! `client_message_id` in a batch fails alone with a duplicate key, the others
//! are written.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use mongodb::error::ErrorKind;
use mongodb::Collection;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::StoreError;

/// One document waiting to be written, and who to tell.
struct Pending<D> {
    doc: D,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The requests' side of the group commit.
#[derive(Clone)]
pub struct Writer<D> {
    tx: mpsc::Sender<Pending<D>>,
    timeout: Duration,
}

impl<D> Writer<D>
where
    D: Serialize + Send + Sync + 'static,
{
    /// Starts `writers` batch writers on `collection`, each writing up to `batch`
    /// documents per `insert_many`, each write bounded by `timeout`.
    pub fn start(collection: Collection<D>, writers: usize, batch: usize, timeout: Duration) -> Self {
        let batch = batch.max(1);
        let (tx, rx) = mpsc::channel(batch.saturating_mul(writers.max(1)).saturating_mul(4));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(collection.clone(), rx.clone(), batch, timeout));
        }
        Self { tx, timeout }
    }

    /// Writes `doc` (in whichever batch it lands) and waits for its outcome: `Ok`
    /// once it is durable, `Duplicate` when a unique index refused it,
    /// `Unavailable` when MongoDB did not confirm it in time.
    pub async fn insert(&self, doc: D) -> Result<(), StoreError> {
        let (reply, outcome) = oneshot::channel();
        // Queueing plus one write: a batch is bounded by the timeout itself.
        let deadline = tokio::time::Instant::now() + self.timeout * 2;
        match tokio::time::timeout_at(deadline, self.tx.send(Pending { doc, reply })).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(StoreError::Unavailable("the message writer stopped".into())),
            Err(_) => return Err(StoreError::Unavailable("the message writer is saturated".into())),
        }
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Unavailable("the message writer stopped".into())),
            Err(_) => Err(StoreError::Unavailable(format!("no answer within {:?}", self.timeout))),
        }
    }
}

/// One writer: takes whatever is queued (at least one, at most `batch`), writes it
/// with one `insert_many`, answers each request, repeats. Ends when every
/// [`Writer`] handle is gone.
async fn write_batches<D>(
    collection: Collection<D>,
    rx: Arc<Mutex<mpsc::Receiver<Pending<D>>>>,
    batch: usize,
    timeout: Duration,
) where
    D: Serialize + Send + Sync + 'static,
{
    loop {
        let mut taken = Vec::with_capacity(batch);
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(first) => taken.push(first),
                None => return,
            }
            while taken.len() < batch {
                match rx.try_recv() {
                    Ok(next) => taken.push(next),
                    Err(_) => break,
                }
            }
        }
        let (docs, replies): (Vec<D>, Vec<_>) = taken.into_iter().map(|p| (p.doc, p.reply)).unzip();
        metrics::histogram!("message_write_batch_size").record(docs.len() as f64);
        let write = collection.insert_many(&docs).ordered(false).into_future();
        let outcomes = match tokio::time::timeout(timeout, write).await {
            Ok(result) => outcomes(result, docs.len()),
            Err(_) => {
                let err = StoreError::Unavailable(format!("no answer within {timeout:?}"));
                (0..docs.len()).map(|_| Err(err.clone())).collect()
            }
        };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // The request may have given up waiting; nothing to tell then.
            let _ = reply.send(outcome);
        }
    }
}

/// Each document's outcome of one `insert_many` (also the write-behind writer's).
pub(crate) fn outcomes(
    result: Result<mongodb::results::InsertManyResult, mongodb::error::Error>,
    count: usize,
) -> Vec<Result<(), StoreError>> {
    let err = match result {
        Ok(_) => return (0..count).map(|_| Ok(())).collect(),
        Err(err) => err,
    };
    let ErrorKind::InsertMany(failure) = err.kind.as_ref() else {
        // The whole command failed (network, timeout, server selection, ...).
        let shared = StoreError::from(err);
        return (0..count).map(|_| Err(shared.clone())).collect();
    };
    // Without a confirmed write concern nothing is known to be durable.
    let unconfirmed = failure
        .write_concern_error
        .as_ref()
        .map(|wc| StoreError::Unavailable(format!("write concern not satisfied: {}", wc.message)));
    let mut out: Vec<Result<(), StoreError>> = (0..count).map(|_| unconfirmed.clone().map_or(Ok(()), Err)).collect();
    for write_error in failure.write_errors.iter().flatten() {
        if let Some(slot) = out.get_mut(write_error.index) {
            *slot = Err(if write_error.code == mongokit::DUPLICATE_KEY {
                StoreError::Duplicate(write_error.message.clone())
            } else {
                StoreError::Other(format!("write error {}: {}", write_error.code, write_error.message))
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successful_batch_acknowledges_every_document() {
        let result = Ok(mongodb::results::InsertManyResult::default());
        let got = outcomes(result, 3);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(Result::is_ok));
    }
}
