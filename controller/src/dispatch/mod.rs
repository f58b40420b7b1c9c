//! Dispatch: hands ready tasks to agents that ask for work, and takes their reports.
//!
//! The queue in the store decides who gets what (see `store::queue`); this module adds what a
//! queue in a database cannot do on its own: waking long-polling claimers the moment work may
//! be ready (after a sync, a completion, a retry) instead of making them poll, sweeping
//! expired leases, and counting what happens for `/metrics`.

mod background;
pub mod memory;
pub mod metrics;
pub mod rules;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, oneshot};

use crate::store::StoreError;
use crate::store::queue::{
    AgentCompletion, AgentIdentity, Assignment, Claimer, Completion, FailOutcome, Lease,
    LeasePolicy, LeaseState, Queue, Refusal,
};

pub use background::{Backends, Background};
pub use metrics::Metrics;

use background::Backplane;

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
/// Once claiming has stopped, a claim is answered "nothing" after this long: soon enough that
/// a closing API does not wait for long-polls, late enough that agents do not spin.
const STOPPED_CLAIM_WAIT: Duration = Duration::from_secs(1);

pub struct Dispatcher<Q> {
    queue: Q,
    config: DispatchConfig,
    /// Work may be ready: the claim loop should run a round.
    wake: Notify,
    /// A claimer arrived.
    arrivals: Notify,
    waiters: Mutex<VecDeque<Waiter>>,
    completing: Mutex<Vec<PendingCompletion>>,
    started: std::time::Instant,
    /// Held while a batch of completions is written.
    completion_writer: tokio::sync::Mutex<()>,
    /// Held while a round of claims is served, so that stopping can wait for one in flight.
    claim_round: tokio::sync::Mutex<()>,
    /// Set on the way out: nothing more is leased.
    claiming_stopped: AtomicBool,
    /// token hash → agent; tokens are checked on every request.
    sessions: Mutex<HashMap<String, AgentIdentity>>,
    pub metrics: Metrics,
    /// Notes for the bus and presence loops (`background.rs`).
    backplane: Backplane,
}

/// Completions waiting for the writer.
struct PendingCompletion {
    agent: String,
    completions: Vec<Completion>,
    reply: oneshot::Sender<Result<Vec<Result<(), Refusal>>, StoreError>>,
}

/// A claim waiting for the claim loop.
struct Waiter {
    agent: AgentIdentity,
    max: u32,
    reply: oneshot::Sender<Vec<Assignment>>,
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A random 256-bit token, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl<Q: Queue> Dispatcher<Q> {
    /// A dispatcher with the embedded bus and presence.
    pub fn new(queue: Q, config: DispatchConfig) -> Arc<Dispatcher<Q>> {
        Dispatcher::with_backends(queue, config, Backends::default())
    }

    pub fn with_backends(
        queue: Q,
        config: DispatchConfig,
        backends: Backends,
    ) -> Arc<Dispatcher<Q>> {
        Arc::new(Dispatcher {
            queue,
            config,
            wake: Notify::new(),
            arrivals: Notify::new(),
            waiters: Mutex::new(VecDeque::new()),
            completing: Mutex::new(Vec::new()),
            started: std::time::Instant::now(),
            completion_writer: tokio::sync::Mutex::new(()),
            claim_round: tokio::sync::Mutex::new(()),
            claiming_stopped: AtomicBool::new(false),
            sessions: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            backplane: Backplane::new(backends),
        })
    }

    pub fn backends(&self) -> &Backends {
        &self.backplane.backends
    }

    /// How long an agent's presence lasts without news of it: three heartbeats.
    pub fn presence_ttl(&self) -> Duration {
        self.config.heartbeat * 3
    }

    /// Events were committed outside the dispatcher (a sync): have them published.
    pub fn events_recorded(&self) {
        self.backplane.events();
    }

    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// The store behind the queue, for what the API records besides the queue's operations.
    pub fn queue(&self) -> &Q {
        &self.queue
    }

    /// Work may be ready: let the waiting claimers look.
    pub fn wake(&self) {
        // notify_one stores a permit, so a wake during a round is not lost.
        self.wake.notify_one();
        self.backplane.ready();
    }

    /// Register an agent and return its new token.
    pub async fn register(&self, agent: AgentIdentity) -> Result<String, StoreError> {
        let token = new_token();
        let hash = token_hash(&token);
        self.queue.register(&agent, &hash).await?;
        self.backplane.registered(&agent.name);
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, a| a.name != agent.name);
        sessions.insert(hash, agent);
        Ok(token)
    }

    /// When the live agent holding `name` was last seen; `None` when no live agent holds it.
    /// Presence is asked first; the store decides too, so that a controller whose presence
    /// is empty (restarted without Redis) or unreachable does not give a live name away.
    pub async fn holder_seen(
        &self,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        let presence = match self.backplane.backends.presence.last_seen(name).await {
            Ok(seen) => seen,
            Err(e) => {
                self.metrics.presence_failed();
                tracing::warn!(
                    "presence unreadable, the store decides: {}",
                    crate::error_chain(&e)
                );
                None
            }
        };
        let stored = self.queue.agent_seen(name).await?;
        Ok(rules::live_holder(
            presence,
            stored.as_ref(),
            self.presence_ttl(),
            chrono::Utc::now(),
        ))
    }

    /// How many agents other than `except` hold a token.
    pub async fn registered_agents(&self, except: &str) -> Result<u64, StoreError> {
        self.queue.registered_agents(except).await
    }

    /// Whether `token` is the current token of the agent `name`.
    pub async fn holds(&self, token: &str, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .authenticate(token)
            .await?
            .is_some_and(|agent| agent.name == name))
    }

    /// These agents' tokens ended (they went offline): forget them here too.
    pub fn forget_sessions(&self, names: &[String]) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .retain(|_, a| !names.contains(&a.name));
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
    ///
    /// Claims are not run by the caller: they queue for the claim loop ([`Self::start`]),
    /// which runs one claim statement at a time. Fifty agents woken by one completion would
    /// otherwise send fifty concurrent claims that mostly fight over the same rows.
    pub async fn claim(
        &self,
        agent: &AgentIdentity,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Assignment>, StoreError> {
        self.backplane.seen(&agent.name);
        if self.claiming_stopped() {
            tokio::time::sleep(wait.min(STOPPED_CLAIM_WAIT)).await;
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .push_back(Waiter {
                agent: agent.clone(),
                max: max.max(1),
                reply,
            });
        self.arrivals.notify_one();
        // A claimer waiting on an open connection is alive: longer waits than its presence
        // lasts (60 s against 30 s by default) must not mark it offline and end its token.
        let mut still_here =
            tokio::time::interval(self.config.heartbeat.max(Duration::from_millis(100)));
        still_here.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let waiting = async {
            tokio::pin!(answer);
            loop {
                tokio::select! {
                    answer = &mut answer => break answer,
                    _ = still_here.tick() => self.backplane.seen(&agent.name),
                }
            }
        };
        match tokio::time::timeout(wait.min(MAX_WAIT), waiting).await {
            Ok(Ok(tasks)) => {
                self.backplane.seen(&agent.name);
                self.metrics.claimed(tasks.len());
                self.backplane.events();
                Ok(tasks)
            }
            // Timed out, or the loop is gone: nothing this time; the agent claims again.
            Ok(Err(_)) | Err(_) => Ok(Vec::new()),
        }
    }

    /// Lease nothing more, to anyone: the first step of a graceful stop. Returns once a round
    /// of claims in flight has been answered; every claim still waiting is answered with
    /// nothing. Heartbeats and reports are still taken, so running work can finish.
    pub async fn stop_claiming(&self) {
        self.claiming_stopped.store(true, Ordering::SeqCst);
        let _round = self.claim_round.lock().await;
        // Dropping a waiter's reply answers its claim with nothing.
        self.waiters.lock().expect("waiters lock").clear();
    }

    pub fn claiming_stopped(&self) -> bool {
        self.claiming_stopped.load(Ordering::SeqCst)
    }

    /// Start the claim loop and the sweeper. They run until the returned handle is dropped:
    /// a benchmark that drops its scratch database stops them first.
    #[must_use = "dropping the handle stops the claim loop and the sweeper"]
    pub fn start(self: &Arc<Self>) -> Background {
        Background::of(vec![
            tokio::spawn(self.clone().run_claims()),
            tokio::spawn(self.clone().run_sweeper()),
        ])
    }

    async fn run_claims(self: Arc<Self>) {
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.arrivals.notified() => {}
                () = self.wake.notified() => {}
                _ = recheck.tick() => {}
            }
            if let Err(e) = self.serve_waiters().await {
                tracing::warn!("claiming failed: {}", crate::error_chain(&e));
                tokio::time::sleep(RECHECK).await;
            }
        }
    }

    /// One round: every waiting claimer is served by one batch claim (a statement per pool).
    /// Claimers who arrive meanwhile wait for the next round, which starts as soon as this
    /// one ends, so the busier the queue, the larger the batches.
    async fn serve_waiters(&self) -> Result<(), StoreError> {
        let _round = self.claim_round.lock().await;
        if self.claiming_stopped() {
            self.waiters.lock().expect("waiters lock").clear();
            return Ok(());
        }
        let round: Vec<Waiter> = self
            .waiters
            .lock()
            .expect("waiters lock")
            .drain(..)
            .filter(|w| !w.reply.is_closed())
            .collect();
        if round.is_empty() {
            return Ok(());
        }
        let claimers: Vec<Claimer> = round
            .iter()
            .map(|w| Claimer {
                agent: w.agent.clone(),
                max: w.max,
            })
            .collect();
        let began = std::time::Instant::now();
        let answers = match self.queue.claim(&claimers, &self.config.policy).await {
            Ok(answers) => {
                let tasks = answers.iter().map(Vec::len).sum();
                self.metrics
                    .store_batch(metrics::CLAIM, tasks, began.elapsed());
                let now = chrono::Utc::now();
                for task in answers.iter().flatten() {
                    if let Some(ready_at) = task.ready_at {
                        self.metrics
                            .picked_up((now - ready_at).to_std().unwrap_or_default());
                    }
                }
                answers
            }
            Err(e) => {
                // Nobody was served: all wait for the next round.
                self.requeue(round);
                return Err(e);
            }
        };
        let mut waiting = Vec::new();
        for (waiter, tasks) in round.into_iter().zip(answers) {
            if tasks.is_empty() {
                waiting.push(waiter);
                continue;
            }
            if let Err(tasks) = waiter.reply.send(tasks) {
                // The claimer gave up while its claim ran: hand the tasks straight back
                // rather than leaving them leased to nobody until the lease runs out.
                for task in tasks {
                    let lease = Lease {
                        id: task.id,
                        run_lease: task.run_lease,
                    };
                    // Refused only if the lease is gone already, which is just as good.
                    let _ = self.queue.release(&waiter.agent.name, lease).await?;
                }
            }
        }
        self.requeue(waiting);
        Ok(())
    }

    fn requeue(&self, waiting: Vec<Waiter>) {
        let mut queue = self.waiters.lock().expect("waiters lock");
        // Ahead of newcomers: first come, first served.
        for waiter in waiting.into_iter().rev() {
            queue.push_front(waiter);
        }
    }

    pub async fn heartbeat(
        &self,
        agent: &AgentIdentity,
        leases: &[Lease],
    ) -> Result<Vec<LeaseState>, StoreError> {
        self.backplane.seen(&agent.name);
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
        let answer = self.queue.progress(&agent.name, lease, message).await?;
        if answer.is_ok() {
            self.backplane.progress(lease.id, message);
            self.backplane.events();
        }
        Ok(answer)
    }

    /// Completions are group-committed: while one batch is written, the completions that
    /// arrive queue up, and the next caller to get the writer's lock writes all of them in one
    /// transaction. Under load that turns many agents' small batches into one large one;
    /// alone, a completion is written at once.
    pub async fn complete(
        &self,
        agent: &AgentIdentity,
        completions: &[Completion],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        let (reply, mut answer) = oneshot::channel();
        self.completing
            .lock()
            .expect("completing lock")
            .push(PendingCompletion {
                agent: agent.name.clone(),
                completions: completions.to_vec(),
                reply,
            });
        let writer = self.completion_writer.lock().await;
        if let Ok(answers) = answer.try_recv() {
            // A writer before us wrote ours too.
            drop(writer);
            let answers = answers?;
            self.completions_written(&answers);
            return Ok(answers);
        }
        let batch = std::mem::take(&mut *self.completing.lock().expect("completing lock"));
        let reports: Vec<AgentCompletion<'_>> = batch
            .iter()
            .flat_map(|p| {
                p.completions.iter().map(|completion| AgentCompletion {
                    agent: &p.agent,
                    completion,
                })
            })
            .collect();
        let began = std::time::Instant::now();
        let written = self.queue.complete(&reports).await;
        self.metrics
            .store_batch(metrics::COMPLETE, reports.len(), began.elapsed());
        drop(reports);
        // The writer is held until every caller in the batch has its answer: the next caller
        // to take it looks for its answer first, and would otherwise write a batch without
        // its own completion, which an earlier writer wrote but had not answered yet.
        let mut answers = match written {
            Ok(answers) => answers.into_iter(),
            Err(e) => {
                let message = e.to_string();
                for pending in batch {
                    let _ = pending.reply.send(Err(StoreError::Batch(message.clone())));
                }
                return Err(e);
            }
        };
        for pending in batch {
            let mine: Vec<_> = answers.by_ref().take(pending.completions.len()).collect();
            let _ = pending.reply.send(Ok(mine));
        }
        drop(writer);
        let answers = answer.try_recv().unwrap_or_else(|_| {
            Err(StoreError::Batch(
                "our completion was not in the batch".into(),
            ))
        })?;
        self.completions_written(&answers);
        Ok(answers)
    }

    fn completions_written(&self, answers: &[Result<(), Refusal>]) {
        let done = answers.iter().filter(|a| a.is_ok()).count();
        self.metrics.completed(done);
        if done > 0 {
            self.backplane.events();
            // Dependents of what just completed may be ready now.
            self.wake();
        }
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
            // A retry is ready once its backoff passed; the announcer's tick finds it then.
            self.backplane.events();
        }
        Ok(outcome)
    }

    pub async fn question(
        &self,
        agent: &AgentIdentity,
        lease: Lease,
        question: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let answer = self.queue.question(&agent.name, lease, question).await?;
        if answer.is_ok() {
            self.backplane.events();
        }
        Ok(answer)
    }

    pub async fn release(
        &self,
        agent: &AgentIdentity,
        lease: Lease,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let answer = self.queue.release(&agent.name, lease).await?;
        if answer.is_ok() {
            self.backplane.events();
            self.wake();
        }
        Ok(answer)
    }

    /// One housekeeping pass: expired leases back to ready (or failed), dependents of failed
    /// work blocked, queue depth measured.
    ///
    /// Leases are left alone for one lease after the dispatcher started: while the controller
    /// was down, agents could not heartbeat, so their leases ran out although they are still
    /// working; they get one lease to check in before their tasks are given to others.
    pub async fn sweep(&self) -> Result<(), StoreError> {
        let expired = if self.started.elapsed() < self.config.policy.lease {
            Default::default()
        } else {
            self.queue.expire_leases(&self.config.policy).await?
        };
        self.metrics
            .lease_expired(expired.retried.len() + expired.failed.len());
        if !expired.retried.is_empty() || !expired.failed.is_empty() {
            self.backplane.events();
        }
        if !expired.retried.is_empty() {
            self.wake();
        }
        if self.queue.block_dependents().await? > 0 {
            self.backplane.events();
        }
        self.metrics.set_depth(&self.queue.queue_depth().await?);
        Ok(())
    }

    async fn run_sweeper(self: Arc<Self>) {
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
