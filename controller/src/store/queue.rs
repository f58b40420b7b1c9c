//! The work queue: claiming tasks under a lease, and every report an agent makes about a task
//! it holds. The database is the arbiter. A claim is one statement that picks ready tasks
//! (`FOR UPDATE SKIP LOCKED` on Postgres; SQLite serializes writers) and bumps their
//! `run_lease` fencing token; every later operation names `(task, run_lease, agent)` and
//! matches no row when any of them is stale, so a task is never completed twice.
//!
//! Each operation is one transaction that also writes its `events` and `task_updates` rows.
//! Operations take slices so callers can batch many agents' requests into one statement.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;

/// An agent, as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub name: String,
    /// `cos`, `seed`, `specialist` or `meta`: a task whose assignee is this role may go to it.
    pub agent_type: String,
    pub capabilities: Vec<String>,
    pub concurrency: u32,
}

/// A task leased to an agent, with everything the agent needs to run it. The API answers a
/// claim with `agentops_agents::protocol::Assignment`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub id: Uuid,
    pub run_lease: i64,
    pub attempt: i32,
    pub project: String,
    pub name: String,
    pub title: String,
    pub description: String,
    pub action: serde_json::Value,
    pub output: serde_json::Value,
    pub acceptance_criteria: Vec<String>,
    pub timeout_seconds: Option<i32>,
    /// The source revision the task was dispatched at.
    pub revision: Option<String>,
    pub lease_expires_at: chrono::DateTime<chrono::Utc>,
    /// The comments of the review that rejected the task's last output, when one did: what
    /// this attempt should do differently.
    pub review_comments: Option<String>,
    /// When the task became ready, for the pick-up latency metric; the agent is not told.
    pub ready_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// An agent asking for up to `max` tasks: one of a batch of claims made together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimer {
    pub agent: AgentIdentity,
    pub max: u32,
}

impl Claimer {
    /// Agents of one pool compete for the same tasks: those assigned to their role that need
    /// no capability they lack.
    pub fn pool(&self) -> (&str, &[String]) {
        (&self.agent.agent_type, &self.agent.capabilities)
    }
}

/// `(task, run_lease)`: what every report carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    pub id: Uuid,
    pub run_lease: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub lease: Lease,
    pub result: serde_json::Value,
    pub artifacts: Vec<Artifact>,
    /// The output awaits a person's review (a pull request or a result branch): the task goes
    /// to `review` instead of `completed`, and is completed when the output is merged.
    pub review: bool,
}

/// A completion and the agent that reports it: completions of many agents are written in one
/// transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentCompletion<'a> {
    pub agent: &'a str,
    pub completion: &'a Completion,
}

/// An output an agent stored somewhere (`key` is its object-storage key or branch path).
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    pub name: String,
    pub artifact_type: String,
    pub key: String,
    pub size_bytes: Option<i64>,
    pub mime_type: Option<String>,
}

/// The answer to a heartbeat, per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub id: Uuid,
    /// The lease is still this agent's and was extended.
    pub held: bool,
    /// The task was cancelled (removed from the source, or by a person): stop.
    pub cancel: bool,
}

/// What became of a failed task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Ready again after the backoff, with attempt + 1.
    Retry,
    /// Retries spent, or the failure was not retryable.
    Failed,
}

/// Why a report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no such task")]
    NoTask,
    #[error("the task is not held by this agent under this run lease")]
    NotHeld,
}

/// Leases that ran out, as handled by one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    /// Back to ready with attempt + 1.
    pub retried: Vec<Uuid>,
    /// Retries spent.
    pub failed: Vec<Uuid>,
}

/// How long leases last and how retries back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    pub lease: Duration,
    /// The first retry waits this long, each further one twice as long…
    pub backoff_base: Duration,
    /// …up to this.
    pub backoff_max: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            lease: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

pub trait Queue: Send + Sync + 'static {
    /// Record the agent (upsert by name) and a session token for it; earlier tokens of the
    /// same name stop working. Stores only a hash of the token.
    fn register(
        &self,
        agent: &AgentIdentity,
        token_hash: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The agent a token belongs to.
    fn authenticate(
        &self,
        token_hash: &str,
    ) -> impl Future<Output = Result<Option<AgentIdentity>, StoreError>> + Send;

    /// The agent of this name as liveness sees it (`None`: never registered). A store that
    /// keeps no agents knows none.
    fn agent_seen(
        &self,
        _name: &str,
    ) -> impl Future<Output = Result<Option<AgentLiveness>, StoreError>> + Send {
        async { Ok(None) }
    }

    /// How many agents other than `except` hold a token now.
    fn registered_agents(
        &self,
        _except: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async { Ok(0) }
    }

    /// Lease to each claimer up to its `max` ready tasks; one answer per claimer, in order.
    /// Claimers of one pool are served by one statement, so a round of many waiting agents
    /// costs a statement per pool, not one per agent.
    fn claim(
        &self,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> impl Future<Output = Result<Vec<Vec<Assignment>>, StoreError>> + Send;

    /// Extend the given leases of `agent`; mark the agent alive, and `busy` or `idle` by
    /// whether it holds any task.
    fn heartbeat(
        &self,
        agent: &str,
        leases: &[Lease],
        policy: &LeasePolicy,
    ) -> impl Future<Output = Result<Vec<LeaseState>, StoreError>> + Send;

    fn progress(
        &self,
        agent: &str,
        lease: Lease,
        message: &str,
    ) -> impl Future<Output = Result<Result<(), Refusal>, StoreError>> + Send;

    /// Complete many tasks, of many agents, in one transaction; one answer per completion, in
    /// order.
    fn complete(
        &self,
        completions: &[AgentCompletion<'_>],
    ) -> impl Future<Output = Result<Vec<Result<(), Refusal>>, StoreError>> + Send;

    fn fail(
        &self,
        agent: &str,
        lease: Lease,
        error: &str,
        retryable: bool,
        policy: &LeasePolicy,
    ) -> impl Future<Output = Result<Result<FailOutcome, Refusal>, StoreError>> + Send;

    /// The task waits for a person: `blocked`, lease ended, a `question` task update.
    fn question(
        &self,
        agent: &str,
        lease: Lease,
        question: &str,
    ) -> impl Future<Output = Result<Result<(), Refusal>, StoreError>> + Send;

    /// Hand a task back unstarted: ready at once, attempt unchanged.
    fn release(
        &self,
        agent: &str,
        lease: Lease,
    ) -> impl Future<Output = Result<Result<(), Refusal>, StoreError>> + Send;

    /// Return every task whose lease ran out to ready (attempt + 1, backoff) or fail it.
    fn expire_leases(
        &self,
        policy: &LeasePolicy,
    ) -> impl Future<Output = Result<Expired, StoreError>> + Send;

    /// Mark pending tasks whose dependency failed or was cancelled as `blocked`, saying which.
    /// Returns how many changed.
    fn block_dependents(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Ready tasks per pool (the assignee: a role or an agent name), for metrics.
    fn queue_depth(&self) -> impl Future<Output = Result<Vec<(String, i64)>, StoreError>> + Send;
}

/// An `events` row, as the outbox hands it to the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub source_agent: Option<String>,
    pub target_agent: Option<String>,
    /// Passed through as the store wrote it: the relay never looks inside, and building a
    /// `Value` of every event only to write it out again was most of the relay's CPU.
    pub payload: Box<serde_json::value::RawValue>,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The outbox entry that queued it. The bus never puts events of two entries in one
    /// message, so an entry read again (after a failed publish, or by the next controller
    /// after a crash) makes the same messages, with the same ids, and JetStream drops them.
    #[serde(skip)]
    pub outbox_entry: i64,
}

/// A ready task and the pool it is announced to (its assignee: a role or an agent name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReadyTask {
    pub pool: String,
    pub task: Uuid,
    /// The task's fencing token now; its next claim makes it `run_lease + 1`. So
    /// `<task>:<run_lease>` names this one stretch of readiness, and a task that is ready again
    /// after a retry or a release is announced anew.
    pub run_lease: i64,
}

/// Events waiting in the outbox, oldest first.
#[derive(Debug, Default)]
pub struct OutboxBatch {
    /// The outbox entries read, to hand to [`Outbox::mark_published`] once published. There
    /// can be more than events: an entry whose event row is gone is only cleared.
    pub entries: Vec<i64>,
    pub events: Vec<StoredEvent>,
}

/// What the event relay and the announcer need from the store.
///
/// Every operation writes its events in its own transaction, and a trigger on `events` queues
/// the new rows in `event_outbox` in that same transaction (on Postgres one entry per
/// statement, holding all of its events; on SQLite one per event). The relay publishes what is
/// queued and then deletes it. So an event reaches the bus only once it is committed, and one
/// that could not be published (the bus was down, the controller stopped) is published later.
pub trait Outbox: Send + Sync + 'static {
    /// The outbox entries after entry `after`, oldest first, with their events in the order
    /// they were written: up to `limit` entries, and once they hold `limit` events no more
    /// (an entry is never split, so one large entry can exceed `limit` alone).
    ///
    /// Entries are numbered as they are written, but a transaction can commit after one that
    /// wrote later entries; so `after` is a hint for the next pass of a busy relay, which
    /// must still come back for everything (`after` = 0) now and then.
    fn unpublished_events(
        &self,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<OutboxBatch, StoreError>> + Send;

    /// Record that these outbox entries were handed to the bus.
    fn mark_published(
        &self,
        entries: &[i64],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Up to `per_pool` ready tasks of each pool, in claim order (priority, then age).
    fn ready_tasks(
        &self,
        per_pool: u32,
    ) -> impl Future<Output = Result<Vec<ReadyTask>, StoreError>> + Send;
}

/// An agent as the liveness pass sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentLiveness {
    pub name: String,
    /// `idle`, `busy` or `offline`; agents in `error` are left alone.
    pub status: String,
    /// Removed from the source: it stays `offline` until it registers again.
    pub pruned: bool,
    /// How long ago the store last saw it (register, claim, heartbeat, report); `None` if never.
    pub last_seen: Option<Duration>,
}

/// Keeping the agents table's `status` in step with presence.
pub trait Liveness: Send + Sync + 'static {
    /// Every agent whose status is `idle`, `busy` or `offline`.
    fn agent_liveness(&self)
    -> impl Future<Output = Result<Vec<AgentLiveness>, StoreError>> + Send;

    /// Mark these agents as `to` says, with an `agent.offline` or `agent.online` event each;
    /// returns the names changed. Offline: except those the store saw within `within` or
    /// never saw at all. Online: those marked `offline` that are alive again (seen within
    /// `within`, not pruned), `busy` or `idle` by what they hold.
    fn mark(
        &self,
        to: Mark,
        names: &[String],
        within: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// What [`Liveness::mark`] makes of agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Offline,
    Online,
}

// ---------------------------------------------------------------------------------------------
// Shared by both backends
// ---------------------------------------------------------------------------------------------

/// The artifact types the schema accepts (`artifacts_artifact_type_check`); anything else is
/// stored as `other`.
pub(super) fn artifact_type(kind: &str) -> &'static str {
    match kind {
        "code" => "code",
        "document" => "document",
        "image" => "image",
        "data" => "data",
        "log" => "log",
        _ => "other",
    }
}

/// Whole milliseconds, capped at 2^40 (35 years) so that the backoff arithmetic in SQL
/// (`base << 20`) cannot overflow a bigint.
pub(super) fn millis(duration: Duration) -> i64 {
    duration.as_millis().min(1 << 40) as i64
}

/// The backoff base and cap in milliseconds, as the `{backoff}` token of the statements takes
/// them: `min(base << min(max(attempt, 0), 20), cap)`.
pub(super) fn backoff_params(policy: &LeasePolicy) -> (i64, i64) {
    (millis(policy.backoff_base), millis(policy.backoff_max))
}

/// A completion as one JSON row of the batch the store reads in SQL.
#[derive(Serialize)]
pub(super) struct CompletionRow<'a> {
    /// Position in the caller's slice.
    pub i: usize,
    pub agent: &'a str,
    pub id: String,
    pub run_lease: i64,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub result: &'a serde_json::Value,
    /// `review` instead of `completed` (see [`Completion::review`]).
    pub review: bool,
    /// The `completion` task update's message.
    pub message: String,
    pub artifacts: Vec<ArtifactRow<'a>>,
}

#[derive(Serialize)]
pub(super) struct ArtifactRow<'a> {
    pub name: &'a str,
    #[serde(rename = "type")]
    pub artifact_type: &'static str,
    pub key: &'a str,
    pub size_bytes: Option<i64>,
    pub mime_type: Option<&'a str>,
}

/// The completions to send to the database, and for each completion the earlier one with the
/// same `(task, run_lease)` it repeats, if any. A repeat is not sent: the first one decides,
/// and the repeat is refused once the first completed the task.
pub(super) fn completion_rows<'a>(
    completions: &[AgentCompletion<'a>],
) -> (Vec<CompletionRow<'a>>, Vec<Option<usize>>) {
    let repeats = crate::dispatch::rules::repeats(completions.iter().map(|c| c.completion.lease));
    let mut rows = Vec::with_capacity(completions.len());
    for (
        i,
        (
            &AgentCompletion {
                agent,
                completion: c,
            },
            repeat,
        ),
    ) in completions.iter().zip(&repeats).enumerate()
    {
        if repeat.is_some() {
            continue;
        }
        rows.push(CompletionRow {
            i,
            agent,
            id: c.lease.id.hyphenated().to_string(),
            run_lease: c.lease.run_lease,
            result: &c.result,
            review: c.review,
            message: completion_message(&c.result),
            artifacts: c
                .artifacts
                .iter()
                .map(|a| ArtifactRow {
                    name: &a.name,
                    artifact_type: artifact_type(&a.artifact_type),
                    key: &a.key,
                    size_bytes: a.size_bytes,
                    mime_type: a.mime_type.as_deref(),
                })
                .collect(),
        });
    }
    (rows, repeats)
}

/// The `completion` task update's message: the result's `summary` when it has one.
fn completion_message(result: &serde_json::Value) -> String {
    match result.get("summary").and_then(serde_json::Value::as_str) {
        Some(summary) if !summary.trim().is_empty() => summary.to_owned(),
        _ => "completed".to_owned(),
    }
}

/// An event's stored payload, checked to be JSON but not parsed into a tree; none is `null`.
pub(super) fn raw_json(
    payload: Option<String>,
) -> Result<Box<serde_json::value::RawValue>, super::StoreError> {
    serde_json::value::RawValue::from_string(payload.unwrap_or_else(|| "null".to_owned()))
        .map_err(|e| super::StoreError::Corrupt(format!("an event payload is not JSON: {e}")))
}

/// A JSON array of strings as a list, skipping anything else.
pub(super) fn strings(value: Option<serde_json::Value>) -> Vec<String> {
    match value {
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// How long a session's `last_seen_at` may lag before `authenticate` writes it again: a token
/// is checked on every request, and a write per request would be the busiest write there is.
pub(super) const SEEN_EVERY_SECONDS: i64 = 30;
