//! One partition's bookkeeping on the consumer thread, as an explicit state machine:
//! whether it is flowing or paused, the records held while it is paused, and the
//! offset last sent in a commit.
//!
//! Why this module exists: the consumer's pause/resume and commit decisions were
//! spread over flags and counters inside the librdkafka callbacks, testable only
//! against a broker. Here every decision is a pure transition — a fetched record is
//! sent or held (and the partition paused); a drained partition releases held
//! records and resumes; a finished offset is committed once — and each is unit
//! tested. The consumer performs the side effects (`pause`, `resume`, sending to the
//! worker, committing) the transitions ask for.

use std::collections::VecDeque;

/// Whether librdkafka is fetching the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowState {
    /// Fetched records go straight to the worker.
    Flowing,
    /// Fetching is paused: the worker has its share in flight; later records wait
    /// in `held`, in order.
    Paused,
}

/// What to do with a fetched record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fetched<T> {
    /// Hand it to the worker now.
    Send(T),
    /// It is held; `pause` says the partition must be paused now (it was flowing).
    Held { pause: bool },
}

/// One partition's flow and commit state.
#[derive(Debug)]
pub(crate) struct PartitionFlow<T> {
    state: FlowState,
    held: VecDeque<T>,
    /// The offset last sent in a commit (-1: none).
    committed: i64,
}

impl<T> Default for PartitionFlow<T> {
    fn default() -> Self {
        Self { state: FlowState::Flowing, held: VecDeque::new(), committed: -1 }
    }
}

impl<T> PartitionFlow<T> {
    pub fn state(&self) -> FlowState {
        self.state
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A record was fetched while `in_flight` records of this partition are with the
    /// worker and its share is `share`. Order is kept: while anything is held, new
    /// records are held behind it.
    pub fn fetched(&mut self, record: T, in_flight: usize, share: usize) -> Fetched<T> {
        if self.state == FlowState::Paused || !self.held.is_empty() || in_flight >= share {
            self.held.push_back(record);
            Fetched::Held { pause: self.state == FlowState::Flowing }
        } else {
            Fetched::Send(record)
        }
    }

    /// The consumer paused the partition.
    pub fn paused(&mut self) {
        self.state = FlowState::Paused;
    }

    /// The next held record to hand to the worker, if the partition has room: it
    /// starts releasing once the worker is down to half its share (so records move
    /// in batches, not one by one) and fills up to the share.
    pub fn release(&mut self, in_flight: usize, share: usize, releasing: bool) -> Option<T> {
        if !releasing && in_flight > share / 2 {
            return None;
        }
        if in_flight >= share {
            return None;
        }
        self.held.pop_front()
    }

    /// A released record could not be handed over: it goes back to the front.
    pub fn unrelease(&mut self, record: T) {
        self.held.push_front(record);
    }

    /// Whether the partition should be resumed: paused, and nothing held any more.
    pub fn wants_resume(&self) -> bool {
        self.state == FlowState::Paused && self.held.is_empty()
    }

    /// The consumer resumed the partition.
    pub fn resumed(&mut self) {
        self.state = FlowState::Flowing;
    }

    /// The offset to commit now, if `finished` (one past the last finished record;
    /// -1: none yet) moved since the last commit.
    pub fn commit_due(&self, finished: i64) -> Option<i64> {
        (finished >= 0 && finished != self.committed).then_some(finished)
    }

    /// A commit of `offset` was sent.
    pub fn committed(&mut self, offset: i64) {
        self.committed = offset;
    }

    /// The commit of `offset` failed: the next round sends it again.
    pub fn commit_failed(&mut self, offset: i64) {
        if self.committed == offset {
            self.committed = -1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flowing_sends_until_the_share_is_full_then_holds_and_pauses_once() {
        let mut flow = PartitionFlow::default();
        assert_eq!(flow.fetched(1, 0, 2), Fetched::Send(1));
        assert_eq!(flow.fetched(2, 1, 2), Fetched::Send(2));
        assert_eq!(flow.fetched(3, 2, 2), Fetched::Held { pause: true });
        flow.paused();
        assert_eq!(flow.state(), FlowState::Paused);
        assert_eq!(flow.fetched(4, 2, 2), Fetched::Held { pause: false }, "already paused");
        assert_eq!(flow.held(), 2);
    }

    #[test]
    fn a_failed_pause_still_holds_later_records_behind_the_first() {
        let mut flow = PartitionFlow::default();
        assert_eq!(flow.fetched(1, 5, 5), Fetched::Held { pause: true });
        // pause failed: still flowing, but the worker has room again
        assert_eq!(flow.fetched(2, 0, 5), Fetched::Held { pause: true }, "order: 2 waits behind 1");
    }

    #[test]
    fn release_waits_for_half_the_share_then_fills_it_and_resumes() {
        let mut flow = PartitionFlow::default();
        for n in 0..6 {
            let _ = flow.fetched(n, 4, 4);
        }
        flow.paused();
        assert_eq!(flow.release(3, 4, false), None, "3 of 4 in flight: not yet");
        assert_eq!(flow.release(2, 4, false), Some(0), "down to half: release");
        assert_eq!(flow.release(3, 4, true), Some(1), "fills up to the share");
        assert_eq!(flow.release(4, 4, true), None, "full");
        assert!(!flow.wants_resume(), "records still held");
        flow.unrelease(1);
        let released: Vec<i32> = std::iter::from_fn(|| flow.release(0, 10, true)).collect();
        assert_eq!(released, vec![1, 2, 3, 4, 5], "in order, the unreleased one first");
        assert!(flow.wants_resume());
        flow.resumed();
        assert_eq!(flow.state(), FlowState::Flowing);
        assert!(!flow.wants_resume());
        assert_eq!(flow.fetched(9, 0, 4), Fetched::Send(9));
    }

    #[test]
    fn an_offset_is_committed_once_and_again_after_a_failure() {
        let mut flow = PartitionFlow::<()>::default();
        assert_eq!(flow.commit_due(-1), None, "nothing finished yet");
        assert_eq!(flow.commit_due(5), Some(5));
        flow.committed(5);
        assert_eq!(flow.commit_due(5), None, "already sent");
        flow.commit_failed(4);
        assert_eq!(flow.commit_due(5), None, "a failure of an older commit changes nothing");
        flow.commit_failed(5);
        assert_eq!(flow.commit_due(5), Some(5), "sent again after its failure");
        flow.committed(5);
        assert_eq!(flow.commit_due(7), Some(7));
    }
}
