//! A [`Queue`] held in memory, carrying out [`rules`] on plain maps. It has no events, task
//! updates or artifacts, and nothing survives the process: it exists so that the dispatcher's
//! claim loop, group commit and sweeps can be exercised, and the rules checked against the
//! store's, without a database. An optional latency per operation stands in for a database
//! round trip, which is what lets requests pile up into batches.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rules::{self, Readiness, Route, TaskStatus};
use crate::store::StoreError;
use crate::store::queue::{
    AgentCompletion, AgentIdentity, Assignment, Claimer, Expired, FailOutcome, Lease, LeasePolicy,
    LeaseState, Queue, Refusal,
};

/// A task to put in the queue, ready unless its dependencies say otherwise.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub project: String,
    pub name: String,
    /// A role (`seed`, `specialist`…) or an agent's name.
    pub assignee: String,
    pub capabilities: Vec<String>,
    /// `project/task` names.
    pub depends_on: Vec<String>,
    pub priority: Option<i32>,
    pub retries: i32,
}

impl NewTask {
    pub fn new(project: &str, name: &str, assignee: &str) -> NewTask {
        NewTask {
            project: project.into(),
            name: name.into(),
            assignee: assignee.into(),
            capabilities: Vec::new(),
            depends_on: Vec::new(),
            priority: Some(50),
            retries: 3,
        }
    }
}

/// A task as the memory queue holds it.
#[derive(Debug, Clone)]
pub struct MemoryTask {
    pub id: Uuid,
    pub spec: NewTask,
    pub status: TaskStatus,
    pub attempt: i32,
    pub run_lease: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
    pub status_message: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    agents: HashMap<String, AgentIdentity>,
    /// token hash → agent name
    sessions: HashMap<String, String>,
    /// In creation order, which is the tie-break of the claim order.
    tasks: Vec<MemoryTask>,
    by_id: HashMap<Uuid, usize>,
    by_name: HashMap<String, usize>,
    suspended: HashSet<String>,
}

#[derive(Debug, Default)]
pub struct MemoryQueue {
    state: Mutex<State>,
    latency: Duration,
    claim_calls: AtomicUsize,
    complete_calls: AtomicUsize,
}

impl MemoryQueue {
    pub fn new() -> MemoryQueue {
        MemoryQueue::default()
    }

    /// Every operation waits this long before it takes effect, as a database round trip does.
    pub fn with_latency(latency: Duration) -> MemoryQueue {
        MemoryQueue {
            latency,
            ..MemoryQueue::default()
        }
    }

    pub fn add(&self, task: NewTask) -> Uuid {
        let mut state = self.state.lock().expect("queue lock");
        let id = Uuid::new_v4();
        let index = state.tasks.len();
        state
            .by_name
            .insert(format!("{}/{}", task.project, task.name), index);
        state.by_id.insert(id, index);
        state.tasks.push(MemoryTask {
            id,
            spec: task,
            status: TaskStatus::Pending,
            attempt: 0,
            run_lease: 0,
            lease_owner: None,
            lease_expires_at: None,
            not_before: None,
            status_message: None,
            error: None,
        });
        id
    }

    pub fn task(&self, id: Uuid) -> Option<MemoryTask> {
        let state = self.state.lock().expect("queue lock");
        state.by_id.get(&id).map(|&i| state.tasks[i].clone())
    }

    /// Every task's name and id, in the order they were added.
    pub fn ids(&self) -> Vec<(String, Uuid)> {
        let state = self.state.lock().expect("queue lock");
        state
            .tasks
            .iter()
            .map(|t| (t.spec.name.clone(), t.id))
            .collect()
    }

    /// Set a task's status as a sync or a person would (cancel, suspend its dependents…).
    pub fn set_status(&self, id: Uuid, status: TaskStatus) {
        let mut state = self.state.lock().expect("queue lock");
        if let Some(&i) = state.by_id.get(&id) {
            state.tasks[i].status = status;
        }
    }

    pub fn suspend(&self, project: &str, suspended: bool) {
        let mut state = self.state.lock().expect("queue lock");
        if suspended {
            state.suspended.insert(project.into());
        } else {
            state.suspended.remove(project);
        }
    }

    /// How many claim batches and completion batches reached the queue.
    pub fn calls(&self) -> (usize, usize) {
        (
            self.claim_calls.load(Ordering::SeqCst),
            self.complete_calls.load(Ordering::SeqCst),
        )
    }

    async fn round_trip(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl State {
    fn ready(&self, task: &MemoryTask, now: DateTime<Utc>) -> bool {
        let dependencies: Vec<Option<TaskStatus>> = task
            .spec
            .depends_on
            .iter()
            .map(|d| self.by_name.get(d).map(|&i| self.tasks[i].status))
            .collect();
        rules::is_ready(
            &Readiness {
                status: task.status,
                pruned: false,
                not_before: task.not_before,
                project_suspended: self.suspended.contains(&task.spec.project),
                dependencies: &dependencies,
            },
            now,
        )
    }

    /// Ready tasks `claimer` may take by `route`, in claim order, at most `limit`.
    fn candidates(
        &self,
        claimer: &Claimer,
        route: Route,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Vec<usize> {
        let mut found: Vec<usize> = (0..self.tasks.len())
            .filter(|&i| {
                let task = &self.tasks[i];
                rules::route(claimer, &task.spec.assignee, &task.spec.capabilities) == Some(route)
                    && self.ready(task, now)
            })
            .collect();
        self.sort_in_claim_order(&mut found);
        found.truncate(limit);
        found
    }

    /// Task positions in the order they are handed out; creation order breaks ties.
    fn sort_in_claim_order(&self, tasks: &mut [usize]) {
        tasks.sort_by(|&a, &b| {
            rules::claim_order(
                (self.tasks[a].spec.priority, a),
                (self.tasks[b].spec.priority, b),
            )
        });
    }

    fn lease(&mut self, index: usize, agent: &str, policy: &LeasePolicy, now: DateTime<Utc>) {
        let task = &mut self.tasks[index];
        task.status = TaskStatus::InProgress;
        task.lease_owner = Some(agent.into());
        task.lease_expires_at = Some(now + duration(policy.lease));
        task.run_lease += 1;
    }

    fn assignment(&self, index: usize) -> Assignment {
        let task = &self.tasks[index];
        Assignment {
            id: task.id,
            run_lease: task.run_lease,
            attempt: task.attempt,
            project: task.spec.project.clone(),
            name: task.spec.name.clone(),
            title: task.spec.name.clone(),
            description: String::new(),
            action: serde_json::json!({"prompt": task.spec.name}),
            output: serde_json::json!({}),
            acceptance_criteria: Vec::new(),
            timeout_seconds: None,
            revision: None,
            lease_expires_at: task.lease_expires_at.unwrap_or_else(Utc::now),
            review_comments: None,
            ready_at: None,
        }
    }

    /// The index of the task `lease` names if `agent` holds it, or why not.
    fn held(&self, agent: &str, lease: Lease) -> Result<usize, Refusal> {
        let &i = self.by_id.get(&lease.id).ok_or(Refusal::NoTask)?;
        let task = &self.tasks[i];
        let fenced = task.run_lease == lease.run_lease
            && task.lease_owner.as_deref() == Some(agent)
            && task.status == TaskStatus::InProgress;
        if fenced { Ok(i) } else { Err(Refusal::NotHeld) }
    }

    fn end_lease(&mut self, index: usize, status: TaskStatus) {
        let task = &mut self.tasks[index];
        task.status = status;
        task.lease_owner = None;
        task.lease_expires_at = None;
    }

    /// A failure of the held task at `index`: retried after its backoff, or failed.
    fn failed(
        &mut self,
        index: usize,
        retryable: bool,
        error: &str,
        policy: &LeasePolicy,
        now: DateTime<Utc>,
    ) -> FailOutcome {
        let task = &self.tasks[index];
        let outcome = rules::fail_outcome(retryable, task.attempt, task.spec.retries);
        let not_before = rules::retry_at(now, policy, task.attempt);
        match outcome {
            FailOutcome::Retry => {
                self.end_lease(index, TaskStatus::Pending);
                let task = &mut self.tasks[index];
                task.attempt += 1;
                task.not_before = Some(not_before);
            }
            FailOutcome::Failed => self.end_lease(index, TaskStatus::Failed),
        }
        self.tasks[index].error = Some(error.into());
        outcome
    }
}

fn duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Queue for MemoryQueue {
    async fn register(&self, agent: &AgentIdentity, token_hash: &str) -> Result<(), StoreError> {
        self.round_trip().await;
        let mut state = self.state.lock().expect("queue lock");
        state.agents.insert(agent.name.clone(), agent.clone());
        state
            .sessions
            .retain(|hash, name| *name != agent.name && hash != token_hash);
        state.sessions.insert(token_hash.into(), agent.name.clone());
        Ok(())
    }

    async fn authenticate(&self, token_hash: &str) -> Result<Option<AgentIdentity>, StoreError> {
        self.round_trip().await;
        let state = self.state.lock().expect("queue lock");
        Ok(state
            .sessions
            .get(token_hash)
            .and_then(|name| state.agents.get(name))
            .cloned())
    }

    async fn claim(
        &self,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> Result<Vec<Vec<Assignment>>, StoreError> {
        self.claim_calls.fetch_add(1, Ordering::SeqCst);
        self.round_trip().await;
        let now = Utc::now();
        let mut state = self.state.lock().expect("queue lock");
        let mut answers: Vec<Vec<usize>> = vec![Vec::new(); claimers.len()];
        for pool in rules::pools(claimers) {
            let mut free = Vec::with_capacity(pool.len());
            for &c in &pool {
                let claimer = &claimers[c];
                let named = state.candidates(claimer, Route::Named, claimer.max as usize, now);
                for &task in &named {
                    state.lease(task, &claimer.agent.name, policy, now);
                }
                free.push(claimer.max.saturating_sub(named.len() as u32));
                answers[c] = named;
            }
            let capacity = free.iter().map(|&f| f as usize).sum();
            let picked = state.candidates(&claimers[pool[0]], Route::Role, capacity, now);
            for (task, dealt_to) in picked.iter().zip(rules::deal(&free, picked.len())) {
                let c = pool[dealt_to];
                state.lease(*task, &claimers[c].agent.name, policy, now);
                answers[c].push(*task);
            }
        }
        Ok(answers
            .into_iter()
            .map(|mut tasks| {
                state.sort_in_claim_order(&mut tasks);
                tasks.into_iter().map(|t| state.assignment(t)).collect()
            })
            .collect())
    }

    async fn heartbeat(
        &self,
        agent: &str,
        leases: &[Lease],
        policy: &LeasePolicy,
    ) -> Result<Vec<LeaseState>, StoreError> {
        self.round_trip().await;
        let now = Utc::now();
        let mut state = self.state.lock().expect("queue lock");
        Ok(leases
            .iter()
            .map(|lease| {
                let held = state.held(agent, *lease).ok();
                if let Some(i) = held {
                    state.tasks[i].lease_expires_at = Some(now + duration(policy.lease));
                }
                let cancel = state
                    .by_id
                    .get(&lease.id)
                    .is_some_and(|&i| state.tasks[i].status == TaskStatus::Cancelled);
                LeaseState {
                    id: lease.id,
                    held: held.is_some(),
                    cancel,
                }
            })
            .collect())
    }

    async fn progress(
        &self,
        agent: &str,
        lease: Lease,
        _message: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        self.round_trip().await;
        let state = self.state.lock().expect("queue lock");
        Ok(state.held(agent, lease).map(|_| ()))
    }

    async fn complete(
        &self,
        completions: &[AgentCompletion<'_>],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        self.complete_calls.fetch_add(1, Ordering::SeqCst);
        self.round_trip().await;
        let repeats = rules::repeats(completions.iter().map(|c| c.completion.lease));
        let mut state = self.state.lock().expect("queue lock");
        let written = completions
            .iter()
            .zip(&repeats)
            .map(|(c, repeat)| {
                if repeat.is_some() {
                    return None;
                }
                let answer = state.held(c.agent, c.completion.lease).map(|i| {
                    let status = if c.completion.review {
                        TaskStatus::Review
                    } else {
                        TaskStatus::Completed
                    };
                    state.end_lease(i, status);
                });
                Some(answer)
            })
            .collect();
        Ok(rules::completion_answers(written, &repeats))
    }

    async fn fail(
        &self,
        agent: &str,
        lease: Lease,
        error: &str,
        retryable: bool,
        policy: &LeasePolicy,
    ) -> Result<Result<FailOutcome, Refusal>, StoreError> {
        self.round_trip().await;
        let mut state = self.state.lock().expect("queue lock");
        Ok(state
            .held(agent, lease)
            .map(|i| state.failed(i, retryable, error, policy, Utc::now())))
    }

    async fn question(
        &self,
        agent: &str,
        lease: Lease,
        question: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        self.round_trip().await;
        let mut state = self.state.lock().expect("queue lock");
        Ok(state.held(agent, lease).map(|i| {
            state.end_lease(i, TaskStatus::Blocked);
            state.tasks[i].status_message = Some(question.into());
        }))
    }

    async fn release(&self, agent: &str, lease: Lease) -> Result<Result<(), Refusal>, StoreError> {
        self.round_trip().await;
        let mut state = self.state.lock().expect("queue lock");
        Ok(state
            .held(agent, lease)
            .map(|i| state.end_lease(i, TaskStatus::Pending)))
    }

    async fn expire_leases(&self, policy: &LeasePolicy) -> Result<Expired, StoreError> {
        self.round_trip().await;
        let now = Utc::now();
        let mut state = self.state.lock().expect("queue lock");
        let mut expired = Expired::default();
        for i in 0..state.tasks.len() {
            let task = &state.tasks[i];
            if task.status != TaskStatus::InProgress
                || task.lease_expires_at.is_none_or(|t| t >= now)
            {
                continue;
            }
            let id = task.id;
            match state.failed(i, true, "lease expired", policy, now) {
                FailOutcome::Retry => expired.retried.push(id),
                FailOutcome::Failed => expired.failed.push(id),
            }
        }
        Ok(expired)
    }

    async fn block_dependents(&self) -> Result<u64, StoreError> {
        self.round_trip().await;
        let mut state = self.state.lock().expect("queue lock");
        let mut blocked = 0;
        for i in 0..state.tasks.len() {
            let task = &state.tasks[i];
            if task.status != TaskStatus::Pending {
                continue;
            }
            let reason = rules::block_reason(task.spec.depends_on.iter().map(|d| {
                (
                    d.as_str(),
                    state.by_name.get(d).map(|&j| state.tasks[j].status),
                )
            }));
            if let Some(reason) = reason {
                let task = &mut state.tasks[i];
                task.status = TaskStatus::Blocked;
                task.status_message = Some(reason);
                blocked += 1;
            }
        }
        Ok(blocked)
    }

    async fn queue_depth(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.round_trip().await;
        let now = Utc::now();
        let state = self.state.lock().expect("queue lock");
        let mut depth: std::collections::BTreeMap<String, i64> = Default::default();
        for task in &state.tasks {
            if state.ready(task, now) {
                *depth.entry(task.spec.assignee.clone()).or_default() += 1;
            }
        }
        Ok(depth.into_iter().collect())
    }
}
