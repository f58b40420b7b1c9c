//! Getting reports to the controller.
//!
//! A report is retried while the controller is unreachable and our lease is live, because
//! losing it would redo the task; it is dropped as soon as the controller refuses it (409:
//! the lease is gone, so someone else may be running the task) or the lease has run out.
//! Completions are the bulk of the traffic and go out in batches.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::de::IgnoredAny;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::client::{CALL_TIMEOUT, Error};
use crate::error_chain;
use crate::protocol::{
    CompleteManyRequest, CompleteManyResponse, Completion, FailRequest, QuestionRequest,
    ReleaseRequest,
};

/// A completion waits this long for others to share its request...
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// ...unless this many are already waiting.
const BATCH_MAX: usize = 64;

/// A report about one task, sent to `/api/v1/tasks/{id}/{verb}`.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub(crate) enum Report {
    Fail(FailRequest),
    Question(QuestionRequest),
}

impl Report {
    pub fn verb(&self) -> &'static str {
        match self {
            Report::Fail(_) => "fail",
            Report::Question(_) => "question",
        }
    }
}

/// A completion, and who to tell once it is settled (by dropping the sender).
pub(crate) type Pending = (Completion, oneshot::Sender<()>);

pub(crate) fn channel(concurrency: usize) -> (mpsc::Sender<Pending>, mpsc::Receiver<Pending>) {
    mpsc::channel(concurrency.max(BATCH_MAX))
}

impl Shared {
    /// Completes a task through the batcher; returns once the completion is settled.
    pub(crate) async fn complete(&self, completion: Completion) {
        let (settled_tx, settled) = oneshot::channel();
        if self
            .completions
            .send((completion, settled_tx))
            .await
            .is_ok()
        {
            // An error only says the batcher dropped the sender: settled either way.
            let _ = settled.await;
        }
    }

    /// Sends one report, retrying while that can still matter.
    pub(crate) async fn deliver(&self, id: &str, run_lease: i64, report: Report) {
        let path = format!("/api/v1/tasks/{id}/{}", report.verb());
        let mut backoff = Backoff::reports();
        loop {
            match self
                .client
                .post::<_, IgnoredAny>(&path, &report, CALL_TIMEOUT)
                .await
            {
                Ok(_) => return,
                Err(e) if e.is_transient() && self.leases.is_live(id, run_lease) => {
                    let verb = report.verb();
                    tracing::warn!(error = %error_chain(&e), "{verb} not delivered yet; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => return log_dropped(report.verb(), &e),
            }
        }
    }

    /// Hands a task back. Tried once: if it is lost, the task still comes back when its lease
    /// expires, only later and as a new attempt.
    pub(crate) async fn release(&self, id: &str, run_lease: i64) {
        let path = format!("/api/v1/tasks/{id}/release");
        let body = ReleaseRequest { run_lease };
        match self
            .client
            .post::<_, IgnoredAny>(&path, &body, CALL_TIMEOUT)
            .await
        {
            Ok(_) => tracing::info!("released"),
            Err(e) => tracing::warn!(
                error = %error_chain(&e),
                "could not release; the task returns when its lease expires"
            ),
        }
    }
}

fn log_dropped(what: &str, e: &Error) {
    if e.status() == Some(StatusCode::CONFLICT) {
        tracing::info!("{what} refused: the lease is no longer ours");
    } else {
        tracing::warn!(error = %error_chain(e), "{what} dropped");
    }
}

/// Collects completions into batches and sends each batch on its own task, so the next
/// batch fills while the last one is in flight. Ends when `stop` is cancelled.
pub(crate) async fn batch_completions(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Pending>,
    stop: CancellationToken,
) {
    while let Some(Some(batch)) = stop
        .run_until_cancelled(next_batch(&mut queue, BATCH_WINDOW, BATCH_MAX))
        .await
    {
        tokio::spawn(send_batch(shared.clone(), batch));
    }
}

/// The first item to arrive, and whatever follows within `window` of it, up to `max` items;
/// `None` once the queue is closed.
async fn next_batch<T>(
    queue: &mut mpsc::Receiver<T>,
    window: Duration,
    max: usize,
) -> Option<Vec<T>> {
    let mut batch = Vec::with_capacity(max);
    if queue.recv_many(&mut batch, max).await == 0 {
        return None;
    }
    let window_ends = Instant::now() + window;
    while batch.len() < max {
        let room = max - batch.len();
        let more = tokio::time::timeout_at(window_ends, queue.recv_many(&mut batch, room));
        if !matches!(more.await, Ok(n) if n > 0) {
            break;
        }
    }
    Some(batch)
}

async fn send_batch(shared: Arc<Shared>, mut batch: Vec<Pending>) {
    let mut backoff = Backoff::reports();
    loop {
        let request = CompleteManyRequest {
            tasks: batch.iter().map(|(c, _)| c).collect(),
        };
        let answer = shared
            .client
            .post::<_, CompleteManyResponse>("/api/v1/complete", &request, CALL_TIMEOUT)
            .await;
        match answer {
            Ok(answer) => {
                for refused in answer.tasks.iter().filter(|a| !a.ok) {
                    tracing::info!(
                        task = %refused.id,
                        reason = refused.error.as_deref().unwrap_or("not held"),
                        "completion refused: the lease is no longer ours"
                    );
                }
                return;
            }
            Err(e) if e.is_transient() => {
                batch.retain(|(c, _)| shared.leases.is_live(&c.id, c.run_lease));
                if batch.is_empty() {
                    let error = error_chain(&e);
                    return tracing::warn!(%error, "completions dropped: their leases ran out");
                }
                tracing::warn!(
                    error = %error_chain(&e),
                    count = batch.len(),
                    "completions not delivered yet; retrying"
                );
                tokio::time::sleep(backoff.next()).await;
            }
            Err(e) => return log_dropped("completions", &e),
        }
    }
}

/// Exponential backoff with jitter, so agents that lost the controller together do not
/// come back together.
pub(crate) struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            max,
        }
    }

    fn reports() -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
    }

    pub fn next(&mut self) -> Duration {
        let wait = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_what_comes_within_the_window_of_its_first_item() {
        let (tx, mut rx) = mpsc::channel(16);
        let sender = tokio::spawn(async move {
            for (item, after_ms) in [(1, 0), (2, 1), (3, 0), (4, 5)] {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                tx.send(item).await.unwrap();
            }
        });
        let window = BATCH_WINDOW;
        assert_eq!(next_batch(&mut rx, window, 64).await, Some(vec![1, 2, 3]));
        assert_eq!(next_batch(&mut rx, window, 64).await, Some(vec![4]));
        sender.await.unwrap();
        assert_eq!(next_batch(&mut rx, window, 64).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once() {
        let (tx, mut rx) = mpsc::channel(BATCH_MAX * 2);
        for item in 0..BATCH_MAX + 6 {
            tx.send(item).await.unwrap();
        }
        let started = Instant::now();
        let first = next_batch(&mut rx, BATCH_WINDOW, BATCH_MAX).await.unwrap();
        assert_eq!(first, (0..BATCH_MAX).collect::<Vec<_>>());
        assert_eq!(started.elapsed(), Duration::ZERO);
        let rest = next_batch(&mut rx, BATCH_WINDOW, BATCH_MAX).await.unwrap();
        assert_eq!(rest, (BATCH_MAX..BATCH_MAX + 6).collect::<Vec<_>>());
    }

    #[test]
    fn reports_go_to_their_verb_with_their_protocol_bodies() {
        let fail = Report::Fail(FailRequest {
            run_lease: 3,
            error: "boom".into(),
            retryable: true,
        });
        assert_eq!(fail.verb(), "fail");
        assert_eq!(
            serde_json::to_value(&fail).unwrap(),
            serde_json::json!({"run_lease": 3, "error": "boom", "retryable": true})
        );
        let question = Report::Question(QuestionRequest {
            run_lease: 3,
            question: "Which tone?".into(),
        });
        assert_eq!(question.verb(), "question");
        assert_eq!(
            serde_json::to_value(&question).unwrap(),
            serde_json::json!({"run_lease": 3, "question": "Which tone?"})
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<Duration> = (0..4).map(|_| backoff.next()).collect();
        for (wait, full) in waits.iter().zip([100, 200, 350, 350]) {
            let full = Duration::from_millis(full);
            assert!(*wait >= full / 2 && *wait <= full, "{wait:?} for {full:?}");
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
