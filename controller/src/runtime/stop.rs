//! The graceful stop, in phases. Each phase gets what is left of one deadline, so the whole
//! stop fits in the grace period however long any phase takes.

use std::time::Duration;

use tokio::time::Instant;

use super::{ControllerStore, Running};

/// The phases of a stop, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing more is leased; agents stop asking.
    StopClaiming,
    /// Running tasks finish, or are handed back (`task.released`) when their time is up.
    HandBack,
    /// The last status commit is pushed.
    FlushStatus,
    /// The last events are published.
    DrainRelay,
    /// In-flight HTTP requests are answered and the listener closed.
    CloseApi,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::StopClaiming => "stop claiming",
            Phase::HandBack => "hand back",
            Phase::FlushStatus => "flush status",
            Phase::DrainRelay => "drain relay",
            Phase::CloseApi => "close API",
        }
    }
}

/// The end of the grace period.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    grace: Duration,
}

/// Kept back from running tasks for the phases after them: a share of the grace period, at
/// most this long.
const RESERVE_AFTER_WORK: Duration = Duration::from_secs(5);
/// How long the relay may take to publish the last events, within the deadline.
const RELAY_DRAIN: Duration = Duration::from_secs(2);

impl Deadline {
    pub fn after(grace: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + grace,
            grace,
        }
    }

    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Until when running tasks may go on: the deadline less what the later phases need.
    pub fn for_work(&self) -> Instant {
        self.at - (self.grace / 2).min(RESERVE_AFTER_WORK)
    }
}

/// Waits for `task` until `until`; says so and returns false if it did not end.
async fn wait_until(phase: Phase, task: &mut tokio::task::JoinHandle<()>, until: Instant) -> bool {
    match tokio::time::timeout_at(until, &mut *task).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(phase = phase.name(), "task failed: {e}");
            true
        }
        Err(_) => false,
    }
}

impl<S: ControllerStore> Running<S> {
    /// Stops every part, phase by phase, by `deadline`.
    pub(super) async fn stop(mut self, deadline: Deadline) {
        let began = Instant::now();
        let log = |phase: Phase| {
            tracing::info!(
                phase = phase.name(),
                elapsed_ms = began.elapsed().as_millis() as u64,
                "stopping"
            );
        };

        log(Phase::StopClaiming);
        // Agents first: a claim of theirs in flight is then still answered, and what it
        // carries is run or handed back rather than stranded until its lease expires.
        self.agents_stop.stop_claiming();
        self.dispatcher.stop_claiming().await;

        log(Phase::HandBack);
        if let Some(agents) = self.agents.as_mut()
            && !wait_until(Phase::HandBack, agents, deadline.for_work()).await
        {
            tracing::info!("the grace period is over: handing back running tasks");
            self.agents_stop.stop_work();
            if !wait_until(
                Phase::HandBack,
                agents,
                Instant::now() + deadline.remaining(),
            )
            .await
            {
                tracing::warn!("gave up waiting for the embedded agents to hand back");
            }
        }

        log(Phase::FlushStatus);
        self.writeback_stop.cancel();
        if !wait_until(
            Phase::FlushStatus,
            &mut self.writeback,
            Instant::now() + deadline.remaining(),
        )
        .await
        {
            tracing::warn!("gave up waiting for the last status commit");
        }

        log(Phase::DrainRelay);
        self.dispatcher
            .flush_events(deadline.remaining().min(RELAY_DRAIN))
            .await;

        log(Phase::CloseApi);
        self.server_stop.cancel();
        // Claims are answered within a second once claiming has stopped, so a closing API
        // waits for reports at most; a second is enough even when the deadline has passed.
        let close_by = Instant::now() + deadline.remaining().max(Duration::from_secs(1));
        if !wait_until(Phase::CloseApi, &mut self.server, close_by).await {
            tracing::warn!("gave up waiting for HTTP requests in flight");
        }
        drop(self.dispatch_loops);
        self.tasks.close();
        tracing::info!(elapsed_ms = began.elapsed().as_millis() as u64, "stopped");
    }
}
