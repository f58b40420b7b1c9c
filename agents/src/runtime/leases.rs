//! The tasks this agent holds, as far as it knows.
//!
//! A task is held from its claim until its report is settled (accepted, refused or given up),
//! so the heartbeat keeps its lease alive while a report is still being retried. Every
//! operation names the `run_lease` too: an answer about an earlier lease of the same task must
//! not touch a later one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::{LeaseRef, LeaseState};

#[derive(Default)]
pub(crate) struct Leases(Mutex<HashMap<String, Held>>);

struct Held {
    run_lease: i64,
    /// When the controller would let the lease expire, by our clock: the send time of the
    /// last request that extended it, plus the lease length.
    until: Instant,
    cancel: CancellationToken,
}

/// What a heartbeat answer did to one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Renewed,
    Lost,
    Cancelled,
}

impl Leases {
    pub fn insert(&self, id: &str, run_lease: i64, until: Instant, cancel: CancellationToken) {
        self.lock().insert(
            id.to_owned(),
            Held {
                run_lease,
                until,
                cancel,
            },
        );
    }

    pub fn snapshot(&self) -> Vec<LeaseRef> {
        self.lock()
            .iter()
            .map(|(id, held)| LeaseRef {
                id: id.clone(),
                run_lease: held.run_lease,
            })
            .collect()
    }

    /// Applies a heartbeat answer to the leases it was sent for. A lost or cancelled task is
    /// forgotten and its handler cancelled; nothing more is reported about it.
    pub fn apply(
        &self,
        sent: &[LeaseRef],
        answer: &[LeaseState],
        sent_at: Instant,
        lease: Duration,
    ) -> Vec<(String, Verdict)> {
        let mut held = self.lock();
        let mut verdicts = Vec::new();
        for state in answer {
            let Some(lease_ref) = sent.iter().find(|l| l.id == state.id) else {
                continue;
            };
            let Some(entry) = held
                .get_mut(&state.id)
                .filter(|h| h.run_lease == lease_ref.run_lease)
            else {
                continue;
            };
            let verdict = match (state.held, state.cancel) {
                (true, false) => Verdict::Renewed,
                (false, _) => Verdict::Lost,
                (true, true) => Verdict::Cancelled,
            };
            if verdict == Verdict::Renewed {
                entry.until = entry.until.max(sent_at + lease);
            } else {
                entry.cancel.cancel();
                held.remove(&state.id);
            }
            verdicts.push((state.id.clone(), verdict));
        }
        verdicts
    }

    /// Whether we still hold the lease, as far as we know.
    pub fn holds(&self, id: &str, run_lease: i64) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|h| h.run_lease == run_lease)
    }

    /// Whether a report about this lease is still worth retrying: we hold it and the
    /// controller has not had reason to expire it yet.
    pub fn is_live(&self, id: &str, run_lease: i64) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|h| h.run_lease == run_lease && Instant::now() < h.until)
    }

    pub fn remove(&self, id: &str, run_lease: i64) {
        let mut held = self.lock();
        if held.get(id).is_some_and(|h| h.run_lease == run_lease) {
            held.remove(id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.0.lock().expect("leases lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, run_lease: i64) -> LeaseRef {
        LeaseRef {
            id: id.into(),
            run_lease,
        }
    }

    fn state(id: &str, held: bool, cancel: bool) -> LeaseState {
        LeaseState {
            id: id.into(),
            held,
            cancel,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_renews_loses_and_cancels() {
        let leases = Leases::default();
        let now = Instant::now();
        let tokens: Vec<_> = (0..3).map(|_| CancellationToken::new()).collect();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            leases.insert(id, 1, now, tokens[i].clone());
        }
        let sent = [lease("a", 1), lease("b", 1), lease("c", 1)];
        let verdicts = leases.apply(
            &sent,
            &[
                state("a", true, false),
                state("b", false, false),
                state("c", true, true),
            ],
            now,
            Duration::from_secs(30),
        );
        assert_eq!(
            verdicts,
            [
                ("a".into(), Verdict::Renewed),
                ("b".into(), Verdict::Lost),
                ("c".into(), Verdict::Cancelled)
            ]
        );
        assert!(leases.is_live("a", 1));
        assert!(!tokens[0].is_cancelled());
        assert!(!leases.holds("b", 1) && tokens[1].is_cancelled());
        assert!(!leases.holds("c", 1) && tokens[2].is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_about_an_earlier_lease_does_not_touch_a_later_one() {
        let leases = Leases::default();
        let token = CancellationToken::new();
        leases.insert("a", 2, Instant::now(), token.clone());
        let verdicts = leases.apply(
            &[lease("a", 1)],
            &[state("a", false, false)],
            Instant::now(),
            Duration::from_secs(30),
        );
        assert!(verdicts.is_empty());
        assert!(leases.holds("a", 2));
        assert!(!token.is_cancelled());
        leases.remove("a", 1);
        assert!(leases.holds("a", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_live_until_it_would_expire() {
        let leases = Leases::default();
        leases.insert(
            "a",
            1,
            Instant::now() + Duration::from_secs(30),
            CancellationToken::new(),
        );
        assert!(leases.is_live("a", 1));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!leases.is_live("a", 1));
        assert!(leases.holds("a", 1));
    }
}
