//! Dispatch: hands ready tasks to agents that ask for work, and takes their reports.
//!
//! The queue in the store decides who gets what (see `store::queue`); this module adds what a
//! queue in a database cannot do on its own: waking long-polling claimers the moment work may
//! be ready (after a sync, a completion, a retry) instead of making them poll, sweeping
//! expired leases, and counting what happens for `/metrics`.

pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::store::StoreError;
use crate::store::queue::{
    AgentIdentity, Assignment, Completion, FailOutcome, Lease, LeasePolicy, LeaseState, Queue,
    Refusal,
};

pub use metrics::Metrics;

/// How dispatch is tuned; built from flags by the CLI.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    pub policy: LeasePolicy,
    pub heartbeat: Duration,
    /// How often leases are swept and blocked dependents marked.
    pub sweep: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            policy: LeasePolicy::default(),
            heartbeat: Duration::from_secs(10),
            sweep: Duration::from_secs(1),
        }
    }
}

/// Longest a claim may wait: past this, proxies and clients give up on the request.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// A waiting claim re-checks the queue at least this often, so a task that became ready
/// without a wake-up (a retry's backoff ending, another controller's sync) is still found.
const RECHECK: Duration = Duration::from_millis(500);

pub struct Dispatcher<Q> {
    queue: Q,
    config: DispatchConfig,
    wake: Notify,
    /// token hash → agent; tokens are checked on every request.
    sessions: Mutex<HashMap<String, AgentIdentity>>,
    pub metrics: Metrics,
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl<Q: Queue> Dispatcher<Q> {
    pub fn new(queue: Q, config: DispatchConfig) -> Arc<Dispatcher<Q>> {
        Arc::new(Dispatcher {
            queue,
            config,
            wake: Notify::new(),
            sessions: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
        })
    }

    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// Work may be ready: let every waiting claimer look.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Register an agent and return its new token.
    pub async fn register(&self, agent: AgentIdentity) -> Result<String, StoreError> {
        let token = new_token();
        let hash = token_hash(&token);
        self.queue.register(&agent, &hash).await?;
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, a| a.name != agent.name);
        sessions.insert(hash, agent);
        Ok(token)
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<AgentIdentity>, StoreError> {
        let hash = token_hash(token);
        if let Some(agent) = self.sessions.lock().expect("sessions lock").get(&hash) {
            return Ok(Some(agent.clone()));
        }
        // A token issued before a controller restart lives only in the store.
        let agent = self.queue.authenticate(&hash).await?;
        if let Some(agent) = &agent {
            self.sessions
                .lock()
                .expect("sessions lock")
                .insert(hash, agent.clone());
        }
        Ok(agent)
    }

    /// Lease up to `max` ready tasks to `agent`, waiting up to `wait` for one to be ready.
    pub async fn claim(
        &self,
        agent: &AgentIdentity,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Assignment>, StoreError> {
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        loop {
            // Listen before looking, so a wake between the look and the wait is not lost.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let tasks = self
                .queue
                .claim(agent, max.max(1), &self.config.policy)
                .await?;
            if !tasks.is_empty() {
                self.metrics.claimed(tasks.len());
                return Ok(tasks);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(tasks);
            }
            let nap = (deadline - now).min(RECHECK);
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    pub async fn heartbeat(
        &self,
        agent: &AgentIdentity,
        leases: &[Lease],
    ) -> Result<Vec<LeaseState>, StoreError> {
        self.queue
            .heartbeat(&agent.name, leases, &self.config.policy)
            .await
    }

    pub async fn progress(
        &self,
        agent: &AgentIdentity,
        lease: Lease,
        message: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        self.queue.progress(&agent.name, lease, message).await
    }

    pub async fn complete(
        &self,
        agent: &AgentIdentity,
        completions: &[Completion],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        let answers = self.queue.complete(&agent.name, completions).await?;
        let done = answers.iter().filter(|a| a.is_ok()).count();
        self.metrics.completed(done);
        if done > 0 {
            // Dependents of what just completed may be ready now.
            self.wake();
        }
        Ok(answers)
    }

    pub async fn fail(
        &self,
        agent: &AgentIdentity,
        lease: Lease,
        error: &str,
        retryable: bool,
    ) -> Result<Result<FailOutcome, Refusal>, StoreError> {
        let outcome = self
            .queue
            .fail(&agent.name, lease, error, retryable, &self.config.policy)
            .await?;
        if outcome.is_ok() {
            self.metrics.failed();
        }
        Ok(outcome)
    }

    pub async fn question(
        &self,
        agent: &AgentIdentity,
        lease: Lease,
        question: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        self.queue.question(&agent.name, lease, question).await
    }

    pub async fn release(
        &self,
        agent: &AgentIdentity,
        lease: Lease,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let answer = self.queue.release(&agent.name, lease).await?;
        if answer.is_ok() {
            self.wake();
        }
        Ok(answer)
    }

    /// One housekeeping pass: expired leases back to ready (or failed), dependents of failed
    /// work blocked, queue depth measured.
    pub async fn sweep(&self) -> Result<(), StoreError> {
        let expired = self.queue.expire_leases(&self.config.policy).await?;
        self.metrics
            .lease_expired(expired.retried.len() + expired.failed.len());
        if !expired.retried.is_empty() {
            self.wake();
        }
        self.queue.block_dependents().await?;
        self.metrics.set_depth(&self.queue.queue_depth().await?);
        Ok(())
    }

    /// Sweep every `config.sweep` until the process ends.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.sweep().await {
                tracing::warn!("dispatch sweep failed: {}", crate::error_chain(&e));
            }
        }
    }
}
