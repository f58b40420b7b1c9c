//! [`Queue`] on Postgres. Every operation is one statement, hence one transaction: the task
//! rows change in a data-modifying CTE, and the `events`, `task_updates`, `artifacts` and
//! `agents` writes hang off its `RETURNING` rows in further CTEs. Batches arrive as one JSON
//! array parameter (`jsonb_to_recordset`), so a batch of any size is one round trip.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::PgStore;
use super::queue::*;
use super::{StoreError, query_error};

/// Readiness of task `t`, apart from who may run it: pending, not pruned, past its backoff,
/// its project not suspended, every dependency (`project/task`) completed.
///
/// Written so that the planner walks `idx_tasks_dispatch` in order and stops at the LIMIT
/// instead of sorting every pending task: the project check is a scalar subquery (as
/// `NOT EXISTS` it becomes an anti-join the planner estimates at one row), and the common
/// "no dependencies" case is an equality the column statistics know to be almost always
/// true. Dependencies are then looked up through `ux_tasks_project_name`.
macro_rules! ready {
    () => {
        "t.status = 'pending' AND t.pruned_at IS NULL \
         AND (t.not_before IS NULL OR t.not_before <= now()) \
         AND NOT COALESCE((SELECT sp.suspend FROM projects sp WHERE sp.id = t.project_id), false) \
         AND (t.depends_on = '[]' OR NOT EXISTS ( \
             SELECT 1 FROM jsonb_array_elements_text(t.depends_on) AS d(dep) \
             WHERE NOT EXISTS (SELECT 1 FROM tasks dt JOIN projects dp ON dp.id = dt.project_id \
                 WHERE dp.name = split_part(d.dep, '/', 1) \
                 AND dt.name = split_part(d.dep, '/', 2) AND dt.status = 'completed')))"
    };
}

/// When task `t` became ready: its last change (the trigger keeps `updated_at`: created,
/// released, retried), the end of its backoff, or its last dependency's completion.
macro_rules! ready_at {
    () => {
        "GREATEST(t.updated_at, t.not_before, CASE WHEN t.depends_on = '[]' THEN NULL ELSE \
         (SELECT max(dt.completed_at) FROM jsonb_array_elements_text(t.depends_on) AS d(dep) \
             JOIN projects dp ON dp.name = split_part(d.dep, '/', 1) \
             JOIN tasks dt ON dt.project_id = dp.id AND dt.name = split_part(d.dep, '/', 2)) END)"
    };
}

/// `(task $1, run_lease $2, agent $3)` still hold task `t`.
macro_rules! fence {
    () => {
        "t.id = $1 AND t.run_lease = $2 AND t.lease_owner = $3 AND t.status = 'in_progress'"
    };
}

/// The event payload every task event carries, for the task rows of `$rows` (with columns
/// id, project_id, name, run_lease, attempt) and the agent `$agent`.
macro_rules! payload {
    ($rows:literal, $agent:literal) => {
        concat!(
            "jsonb_build_object('id', ",
            $rows,
            ".id, ",
            "'project', (SELECT p.name FROM projects p WHERE p.id = ",
            $rows,
            ".project_id), ",
            "'name', ",
            $rows,
            ".name, 'agent', ",
            $agent,
            ", ",
            "'run_lease', ",
            $rows,
            ".run_lease, 'attempt', ",
            $rows,
            ".attempt)"
        )
    };
}

/// Agent `$agent` is seen now, and idle once it holds no task beyond those in CTE `$ended`.
macro_rules! agent_idle {
    ($agent:literal, $ended:literal) => {
        concat!(
            "agent AS (UPDATE agents SET last_active_at = now(), status = CASE ",
            "WHEN status = 'busy' AND NOT EXISTS (SELECT 1 FROM tasks h ",
            "WHERE h.status = 'in_progress' AND h.lease_owner = ",
            $agent,
            " AND h.id NOT IN (SELECT id FROM ",
            $ended,
            ")) THEN 'idle' ELSE status END WHERE name = ",
            $agent,
            ")"
        )
    };
}

/// Agent `$a`'s `last_active_at` is more than a second old, or… (the condition that follows).
///
/// Claims and completions write an agents row only when they change its status or this
/// holds. They come by the thousand per second, and writing the row on each was a large share
/// of a claim; heartbeats and registrations still write it every time, and liveness allows
/// three heartbeats (30 s by default), so a second's lag is no loss.
macro_rules! stale_or {
    ($a:literal) => {
        concat!(
            "(",
            $a,
            ".last_active_at IS NULL OR ",
            $a,
            ".last_active_at < now() - interval '1000 milliseconds') OR"
        )
    };
}

/// Agent `$a` holds a task in progress besides those completed in CTE `done`.
macro_rules! holds_more {
    ($a:literal) => {
        concat!(
            "SELECT 1 FROM tasks h WHERE h.lease_owner = ",
            $a,
            ".name AND h.status = 'in_progress' AND h.id NOT IN (SELECT id FROM done)"
        )
    };
}

/// The wait before the retry that follows the row's attempt (`LeasePolicy::backoff`), from
/// the base `$base` and the cap `$max` in milliseconds, as a time from now.
macro_rules! backoff {
    ($base:literal, $max:literal) => {
        concat!(
            "now() + LEAST(",
            $base,
            " << LEAST(GREATEST(t.attempt, 0), 20), ",
            $max,
            ") * interval '1 millisecond'"
        )
    };
}

const REGISTER_AGENT: &str = "\
    INSERT INTO agents (name, type, capabilities, concurrency, status, last_active_at) \
    VALUES ($1, $2, CAST($3 AS text)::jsonb, $4, 'idle', now()) \
    ON CONFLICT (name) DO UPDATE SET type = excluded.type, capabilities = excluded.capabilities, \
    concurrency = excluded.concurrency, status = 'idle', last_active_at = now()";

/// A token hash taken over from another agent would be a collision of SHA-256: drop it too.
const DROP_SESSIONS: &str = "DELETE FROM agent_sessions WHERE agent_name = $1 OR token_hash = $2";

const INSERT_SESSION: &str = "INSERT INTO agent_sessions (token_hash, agent_name) VALUES ($2, $1)";

const AUTHENTICATE: &str = "\
    WITH seen AS (UPDATE agent_sessions SET last_seen_at = now() WHERE token_hash = $1 \
     AND (last_seen_at IS NULL OR last_seen_at < now() - $2 * interval '1 second')) \
     SELECT a.name, a.type, a.capabilities, a.concurrency \
     FROM agent_sessions s JOIN agents a ON a.name = s.agent_name WHERE s.token_hash = $1";

/// $1 claimers of one pool as [{i, agent, max}], $2 their type, $3 their capabilities, $4 the
/// lease in milliseconds.
///
/// Tasks assigned to a claimer by name go to that claimer (`named`, one index walk each).
/// Tasks assigned to the pool's role are picked once for the whole pool, in claim order, and
/// dealt out over the claimers' free slots round-robin (slot 1 of every claimer, then slot 2…),
/// so a few ready tasks spread over the waiting agents instead of all going to the first.
/// The two sets are disjoint (a claimer named like its role takes only role work), so
/// `SKIP LOCKED` never meets a row this statement locked itself.
const CLAIM: &str = concat!(
    "WITH claimers AS (SELECT * FROM jsonb_to_recordset(CAST($1 AS text)::jsonb) \
         AS c(i integer, agent text, max integer)), \
     named AS (SELECT c.agent, n.id, n.priority, n.created_at, n.ready_at FROM claimers c \
         CROSS JOIN LATERAL (SELECT t.id, t.priority, t.created_at, ",
    ready_at!(),
    " AS ready_at FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = c.agent AND c.agent <> $2 \
         AND (t.capabilities = '[]' OR t.capabilities <@ CAST($3 AS text)::jsonb) \
         ORDER BY t.priority DESC NULLS LAST, t.created_at LIMIT c.max \
         FOR UPDATE OF t SKIP LOCKED) n), \
     free AS (SELECT c.i, c.agent, c.max - (SELECT count(*) FROM named \
         WHERE named.agent = c.agent)::integer AS slots FROM claimers c), \
     picked AS (SELECT t.id, t.priority, t.created_at, ",
    ready_at!(),
    " AS ready_at FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = $2 \
         AND (t.capabilities = '[]' OR t.capabilities <@ CAST($3 AS text)::jsonb) \
         ORDER BY t.priority DESC NULLS LAST, t.created_at \
         LIMIT (SELECT COALESCE(sum(GREATEST(f.slots, 0)), 0) FROM free f) \
         FOR UPDATE OF t SKIP LOCKED), ",
    // Only slots 1..=P of each claimer can be dealt P picked tasks, and they are exactly the
    // first P slots in dealing order: numbering every free slot (1,600 for fifty idle agents
    // of 32) was half of a claim that found one task.
    "slots AS (SELECT f.agent, row_number() OVER (ORDER BY s.k, f.i) AS n FROM free f \
         CROSS JOIN LATERAL generate_series(1, LEAST(f.slots, \
             (SELECT count(*) FROM picked)::integer)) AS s(k)), \
     dealt AS (SELECT s.agent, p.id, p.ready_at FROM (SELECT id, ready_at, row_number() OVER ( \
             ORDER BY priority DESC NULLS LAST, created_at) AS n FROM picked) p \
         JOIN slots s ON s.n = p.n \
         UNION ALL SELECT agent, id, ready_at FROM named), \
     claimed AS (UPDATE tasks t SET status = 'in_progress', lease_owner = d.agent, \
         assigned_to = d.agent, lease_expires_at = now() + $4 * interval '1 millisecond', \
         updated_at = now(), \
         run_lease = t.run_lease + 1, started_at = COALESCE(t.started_at, now()), \
         claimed_at = now(), dispatch_revision = t.revision \
     FROM dealt d WHERE t.id = d.id AND t.id = ANY(ARRAY(SELECT id FROM dealt)) \
     RETURNING d.agent, d.ready_at, t.id, t.project_id, t.run_lease, t.attempt, t.priority, t.created_at, \
         t.name, t.title, t.description, t.action, t.output, t.acceptance_criteria, \
         t.timeout_seconds, t.revision, t.lease_expires_at, t.review_comments), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT 'task.claimed', c.agent, ",
    payload!("c", "c.agent"),
    " FROM claimed c), ",
    // Rows of `agents` are locked in name order, as every statement that touches several of
    // them does, so that a claim and a batch of completions cannot deadlock.
    "agent AS (UPDATE agents a SET last_active_at = now(), \
         status = CASE WHEN EXISTS (SELECT 1 FROM claimed c WHERE c.agent = a.name) \
             THEN 'busy' ELSE a.status END \
         WHERE a.name IN (SELECT l.name FROM agents l WHERE l.name IN \
             (SELECT agent FROM claimers) AND (",
    stale_or!("l"),
    " (l.status <> 'busy' AND EXISTS (SELECT 1 FROM claimed c WHERE c.agent = l.name))) \
             ORDER BY l.name FOR UPDATE)) \
     SELECT c.agent, c.ready_at, c.id, c.run_lease, c.attempt, \
         COALESCE((SELECT p.name FROM projects p WHERE p.id = c.project_id), '') AS project, \
         COALESCE(c.name, '') AS name, c.title, COALESCE(c.description, '') AS description, \
         c.action, c.output, c.acceptance_criteria, c.timeout_seconds, c.revision, \
         c.lease_expires_at, c.review_comments \
     FROM claimed c ORDER BY c.priority DESC NULLS LAST, c.created_at"
);

/// $1 leases as [{i, id, run_lease}], $2 agent, $3 the lease in milliseconds.
///
/// The agent's `busy`/`idle` is set again from what it holds. Reports keep it up to date one
/// by one, but two reports of one agent that commit at the same moment each see the other's
/// task still in progress (a statement sees the rows as they were when it started), so they
/// can leave it `busy`; the next heartbeat puts that right.
const HEARTBEAT: &str = "\
    WITH input AS (SELECT * FROM jsonb_to_recordset(CAST($1 AS text)::jsonb) \
        AS r(i integer, id uuid, run_lease bigint)), \
    held AS (UPDATE tasks t SET lease_expires_at = now() + $3 * interval '1 millisecond' \
        FROM input r WHERE t.id = r.id AND t.run_lease = r.run_lease AND t.lease_owner = $2 \
        AND t.status = 'in_progress' RETURNING t.id, t.run_lease), \
    agent AS (UPDATE agents SET last_active_at = now(), status = CASE \
        WHEN status NOT IN ('busy', 'idle') THEN status \
        WHEN EXISTS (SELECT 1 FROM tasks h WHERE h.status = 'in_progress' \
            AND h.lease_owner = $2) THEN 'busy' ELSE 'idle' END \
        WHERE name = $2) \
    SELECT r.id, \
        EXISTS (SELECT 1 FROM held h WHERE h.id = r.id AND h.run_lease = r.run_lease) AS held, \
        EXISTS (SELECT 1 FROM tasks x WHERE x.id = r.id AND x.status = 'cancelled') AS cancel \
    FROM input r ORDER BY r.i";

/// $1 task, $2 run lease, $3 agent, $4 message.
const PROGRESS: &str = concat!(
    "WITH held AS (SELECT t.id, t.project_id, t.name, t.run_lease, t.attempt FROM tasks t \
         WHERE ",
    fence!(),
    " FOR SHARE), \
     updates AS (INSERT INTO task_updates (task_id, agent_name, update_type, message) \
         SELECT h.id, $3, 'progress', $4 FROM held h), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT 'task.progress', $3, ",
    payload!("h", "$3"),
    " || jsonb_build_object('message', $4) FROM held h), \
     agent AS (UPDATE agents SET last_active_at = now() \
         WHERE name = $3 AND EXISTS (SELECT 1 FROM held)) \
     SELECT (SELECT 'in_progress' FROM held) AS status, \
         EXISTS (SELECT 1 FROM tasks x WHERE x.id = $1) AS found"
);

/// $1 completions as [`CompletionRow`], each naming its agent.
///
/// The tasks are found by primary key (`= ANY(ARRAY(...))`): left to itself, the planner read
/// every task in progress through `idx_tasks_held` and hashed them against the input.
const COMPLETE: &str = concat!(
    "WITH input AS (SELECT * FROM jsonb_to_recordset(CAST($1 AS text)::jsonb) \
         AS r(i integer, agent text, id uuid, run_lease bigint, result jsonb, review boolean, \
             message text, artifacts jsonb)), \
     done AS (UPDATE tasks t SET \
         status = CASE WHEN r.review THEN 'review' ELSE 'completed' END, \
         completed_at = CASE WHEN r.review THEN NULL ELSE now() END, result = r.result, \
         lease_owner = NULL, lease_expires_at = NULL, status_message = NULL, updated_at = now() \
         FROM input r WHERE t.id = r.id AND t.run_lease = r.run_lease AND t.lease_owner = r.agent \
         AND t.status = 'in_progress' AND t.id = ANY(ARRAY(SELECT id FROM input)) \
         RETURNING r.i, r.agent, t.id, t.project_id, t.name, t.run_lease, t.attempt, t.status), \
     updates AS (INSERT INTO task_updates (task_id, agent_name, update_type, message) \
         SELECT d.id, d.agent, 'completion', r.message FROM done d JOIN input r ON r.i = d.i), \
     stored AS (INSERT INTO artifacts (task_id, agent_name, artifact_type, name, s3_key, \
         size_bytes, mime_type) \
         SELECT d.id, d.agent, a.type, a.name, a.key, a.size_bytes, a.mime_type \
         FROM done d JOIN input r ON r.i = d.i \
         CROSS JOIN LATERAL jsonb_to_recordset(r.artifacts) \
             AS a(name text, type text, key text, size_bytes bigint, mime_type text)), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT CASE WHEN d.status = 'review' THEN 'task.review' ELSE 'task.completed' END, \
             d.agent, ",
    payload!("d", "d.agent"),
    " FROM done d), ",
    // In name order, like the claim: see there.
    "agent AS (UPDATE agents a SET last_active_at = now(), status = CASE \
         WHEN a.status = 'busy' AND NOT EXISTS (",
    holds_more!("a"),
    ") THEN 'idle' ELSE a.status END \
         WHERE a.name IN (SELECT l.name FROM agents l WHERE l.name IN \
             (SELECT agent FROM done) AND (",
    stale_or!("l"),
    " (l.status = 'busy' AND NOT EXISTS (",
    holds_more!("l"),
    "))) ORDER BY l.name FOR UPDATE)) \
     SELECT r.i, CASE WHEN d.i IS NOT NULL THEN 0 \
         WHEN EXISTS (SELECT 1 FROM tasks x WHERE x.id = r.id) THEN 1 ELSE 2 END AS outcome \
     FROM input r LEFT JOIN done d ON d.i = r.i"
);

/// $1 task, $2 run lease, $3 agent, $4 error, $5 retryable, $6/$7 backoff base/cap (ms).
/// `held` locks the task and decides once whether it is retried.
const FAIL: &str = concat!(
    "WITH held AS (SELECT t.id, t.attempt, ($5 AND t.attempt < t.retries) AS retry \
         FROM tasks t WHERE ",
    fence!(),
    " FOR UPDATE), \
     ended AS (UPDATE tasks t SET \
         status = CASE WHEN h.retry THEN 'pending' ELSE 'failed' END, \
         attempt = CASE WHEN h.retry THEN t.attempt + 1 ELSE t.attempt END, \
         not_before = CASE WHEN h.retry THEN ",
    backoff!("$6", "$7"),
    " ELSE t.not_before END, \
         completed_at = CASE WHEN h.retry THEN t.completed_at ELSE now() END, \
         assigned_to = CASE WHEN h.retry THEN t.assignee ELSE t.assigned_to END, \
         error = $4, lease_owner = NULL, lease_expires_at = NULL \
     FROM held h WHERE t.id = h.id \
     RETURNING t.id, t.project_id, t.name, t.run_lease, h.attempt, t.status, t.not_before), \
     updates AS (INSERT INTO task_updates (task_id, agent_name, update_type, message) \
         SELECT e.id, $3, 'error', $4 FROM ended e), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT CASE WHEN e.status = 'pending' THEN 'task.retrying' ELSE 'task.failed' END, $3, ",
    payload!("e", "$3"),
    " || jsonb_build_object('error', $4, 'retryable', $5, 'not_before', \
         CASE WHEN e.status = 'pending' THEN e.not_before END) FROM ended e), ",
    agent_idle!("$3", "ended"),
    " SELECT (SELECT status FROM ended) AS status, \
         EXISTS (SELECT 1 FROM tasks x WHERE x.id = $1) AS found"
);

/// $1 task, $2 run lease, $3 agent, $4 question.
const QUESTION: &str = concat!(
    "WITH ended AS (UPDATE tasks t SET status = 'blocked', status_message = 'question: ' || $4, \
         lease_owner = NULL, lease_expires_at = NULL \
     WHERE ",
    fence!(),
    " \
     RETURNING t.id, t.project_id, t.name, t.run_lease, t.attempt, t.status), \
     updates AS (INSERT INTO task_updates (task_id, agent_name, update_type, message) \
         SELECT e.id, $3, 'question', $4 FROM ended e), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT 'task.question', $3, ",
    payload!("e", "$3"),
    " || jsonb_build_object('question', $4) FROM ended e), ",
    agent_idle!("$3", "ended"),
    " SELECT (SELECT status FROM ended) AS status, \
         EXISTS (SELECT 1 FROM tasks x WHERE x.id = $1) AS found"
);

/// $1 task, $2 run lease, $3 agent.
const RELEASE: &str = concat!(
    "WITH ended AS (UPDATE tasks t SET status = 'pending', assigned_to = t.assignee, \
         not_before = NULL, lease_owner = NULL, lease_expires_at = NULL \
     WHERE ",
    fence!(),
    " \
     RETURNING t.id, t.project_id, t.name, t.run_lease, t.attempt, t.status), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT 'task.released', $3, ",
    payload!("e", "$3"),
    " FROM ended e), ",
    agent_idle!("$3", "ended"),
    " SELECT (SELECT status FROM ended) AS status, \
         EXISTS (SELECT 1 FROM tasks x WHERE x.id = $1) AS found"
);

/// $1/$2 backoff base/cap (ms). The rows are locked first (`SKIP LOCKED`: a task whose report
/// is being written right now is left to that report, and to the next sweep), and whether each
/// is retried is decided there once.
const EXPIRE: &str = concat!(
    "WITH old AS (SELECT t.id, t.lease_owner, t.attempt, (t.attempt < t.retries) AS retry \
         FROM tasks t WHERE t.status = 'in_progress' AND t.lease_expires_at < now() \
         FOR UPDATE SKIP LOCKED), \
     expired AS (UPDATE tasks t SET \
         status = CASE WHEN old.retry THEN 'pending' ELSE 'failed' END, \
         attempt = CASE WHEN old.retry THEN t.attempt + 1 ELSE t.attempt END, \
         not_before = CASE WHEN old.retry THEN ",
    backoff!("$1", "$2"),
    " ELSE t.not_before END, \
         completed_at = CASE WHEN old.retry THEN t.completed_at ELSE now() END, \
         assigned_to = CASE WHEN old.retry THEN t.assignee ELSE t.assigned_to END, \
         error = CASE WHEN old.retry THEN 'lease expired' \
             ELSE 'lease expired; retries spent' END, \
         lease_owner = NULL, lease_expires_at = NULL \
     FROM old WHERE t.id = old.id \
     RETURNING t.id, t.project_id, t.name, t.run_lease, old.attempt, t.status, t.error, \
         t.not_before, old.lease_owner AS agent), \
     updates AS (INSERT INTO task_updates (task_id, agent_name, update_type, message) \
         SELECT x.id, COALESCE(x.agent, 'controller'), 'error', x.error FROM expired x), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT CASE WHEN x.status = 'pending' THEN 'task.lease_expired' ELSE 'task.failed' END, \
             'controller', ",
    payload!("x", "x.agent"),
    " || jsonb_build_object('error', x.error, 'not_before', \
             CASE WHEN x.status = 'pending' THEN x.not_before END) FROM expired x) \
     SELECT x.id, x.status FROM expired x ORDER BY x.id"
);

/// The first dependency (in `dependsOn` order) that failed or was cancelled, per pending task.
const BLOCK: &str = "\
    WITH dep AS (SELECT DISTINCT ON (t.id) t.id, d.dep, dt.status AS dep_status \
        FROM tasks t \
        CROSS JOIN LATERAL jsonb_array_elements_text(t.depends_on) WITH ORDINALITY AS d(dep, n) \
        JOIN projects dp ON dp.name = split_part(d.dep, '/', 1) \
        JOIN tasks dt ON dt.project_id = dp.id AND dt.name = split_part(d.dep, '/', 2) \
        WHERE t.status = 'pending' AND t.depends_on <> '[]' AND t.pruned_at IS NULL \
        AND dt.status IN ('failed', 'cancelled') \
        ORDER BY t.id, d.n), \
    blocked AS (UPDATE tasks t SET status = 'blocked', \
        status_message = 'dependency ' || dep.dep || ' ' || dep.dep_status \
        FROM dep WHERE t.id = dep.id AND t.status = 'pending' \
        RETURNING t.id, t.project_id, t.name, t.status_message), \
    events AS (INSERT INTO events (event_type, source_agent, payload) \
        SELECT 'task.blocked', 'controller', jsonb_build_object('id', b.id, \
            'project', (SELECT p.name FROM projects p WHERE p.id = b.project_id), \
            'name', b.name, 'message', b.status_message) FROM blocked b) \
    SELECT count(*) FROM blocked";

const QUEUE_DEPTH: &str = concat!(
    "SELECT t.assignee, count(*) FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee IS NOT NULL GROUP BY t.assignee ORDER BY t.assignee"
);

#[derive(sqlx::FromRow)]
struct AgentRow {
    name: String,
    #[sqlx(rename = "type")]
    agent_type: String,
    capabilities: Option<Json<serde_json::Value>>,
    concurrency: i32,
}

#[derive(sqlx::FromRow)]
struct AssignmentRow {
    agent: String,
    ready_at: Option<DateTime<Utc>>,
    id: Uuid,
    run_lease: i64,
    attempt: i32,
    project: String,
    name: String,
    title: String,
    description: String,
    action: Option<Json<serde_json::Value>>,
    output: Option<Json<serde_json::Value>>,
    acceptance_criteria: Json<serde_json::Value>,
    timeout_seconds: Option<i32>,
    revision: Option<String>,
    lease_expires_at: DateTime<Utc>,
    review_comments: Option<String>,
}

#[derive(sqlx::FromRow)]
struct HeartbeatRow {
    id: Uuid,
    held: bool,
    cancel: bool,
}

/// What a fenced single-task operation did: the status it left the task in, if it matched.
#[derive(sqlx::FromRow)]
struct FencedRow {
    status: Option<String>,
    found: bool,
}

impl FencedRow {
    fn answer(&self) -> Result<&str, Refusal> {
        match (&self.status, self.found) {
            (Some(status), _) => Ok(status),
            (None, true) => Err(Refusal::NotHeld),
            (None, false) => Err(Refusal::NoTask),
        }
    }
}

fn json_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl PgStore {
    async fn fenced(
        &self,
        statement: &'static str,
        agent: &str,
        lease: Lease,
        text: Option<&str>,
        doing: &'static str,
    ) -> Result<FencedRow, StoreError> {
        let mut query = sqlx::query_as(statement)
            .bind(lease.id)
            .bind(lease.run_lease)
            .bind(agent);
        if let Some(text) = text {
            query = query.bind(text);
        }
        query
            .fetch_one(self.pool())
            .await
            .map_err(query_error(doing))
    }
}

impl Queue for PgStore {
    async fn register(&self, agent: &AgentIdentity, token_hash: &str) -> Result<(), StoreError> {
        let capabilities = json_text(&agent.capabilities)?;
        let concurrency = i32::try_from(agent.concurrency.max(1)).unwrap_or(i32::MAX);
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(query_error("starting a transaction"))?;
        sqlx::query(REGISTER_AGENT)
            .bind(&agent.name)
            .bind(&agent.agent_type)
            .bind(capabilities)
            .bind(concurrency)
            .execute(&mut *tx)
            .await
            .map_err(query_error("registering an agent"))?;
        for statement in [DROP_SESSIONS, INSERT_SESSION] {
            sqlx::query(statement)
                .bind(&agent.name)
                .bind(token_hash)
                .execute(&mut *tx)
                .await
                .map_err(query_error("recording an agent session"))?;
        }
        tx.commit()
            .await
            .map_err(query_error("committing a registration"))
    }

    async fn authenticate(&self, token_hash: &str) -> Result<Option<AgentIdentity>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(AUTHENTICATE)
            .bind(token_hash)
            .bind(SEEN_EVERY_SECONDS)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("authenticating an agent"))?;
        Ok(row.map(|a| AgentIdentity {
            name: a.name,
            agent_type: a.agent_type,
            capabilities: strings(a.capabilities.map(|c| c.0)),
            concurrency: u32::try_from(a.concurrency).unwrap_or(1),
        }))
    }

    async fn claim(
        &self,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> Result<Vec<Vec<Assignment>>, StoreError> {
        let mut answers = vec![Vec::new(); claimers.len()];
        for pool in pools(claimers) {
            let input: Vec<serde_json::Value> = pool
                .iter()
                .filter(|&&i| claimers[i].max > 0)
                .map(|&i| {
                    let max = i32::try_from(claimers[i].max).unwrap_or(i32::MAX);
                    serde_json::json!({"i": i, "agent": claimers[i].agent.name, "max": max})
                })
                .collect();
            if input.is_empty() {
                continue;
            }
            let (agent_type, capabilities) = claimers[pool[0]].pool();
            let rows: Vec<AssignmentRow> = sqlx::query_as(CLAIM)
                .bind(json_text(&input)?)
                .bind(agent_type)
                .bind(json_text(&capabilities)?)
                .bind(millis(policy.lease))
                .fetch_all(self.pool())
                .await
                .map_err(query_error("claiming tasks"))?;
            let slot: HashMap<&str, usize> = pool
                .iter()
                .map(|&i| (claimers[i].agent.name.as_str(), i))
                .collect();
            for r in rows {
                let Some(&i) = slot.get(r.agent.as_str()) else {
                    return Err(StoreError::Corrupt(format!(
                        "a claim leased a task to {}, who did not ask",
                        r.agent
                    )));
                };
                answers[i].push(Assignment {
                    id: r.id,
                    run_lease: r.run_lease,
                    attempt: r.attempt,
                    project: r.project,
                    name: r.name,
                    title: r.title,
                    description: r.description,
                    action: r.action.map_or(serde_json::Value::Null, |a| a.0),
                    output: r.output.map_or(serde_json::Value::Null, |o| o.0),
                    acceptance_criteria: strings(Some(r.acceptance_criteria.0)),
                    timeout_seconds: r.timeout_seconds,
                    revision: r.revision,
                    lease_expires_at: r.lease_expires_at,
                    review_comments: r.review_comments,
                    ready_at: r.ready_at,
                });
            }
        }
        Ok(answers)
    }

    async fn heartbeat(
        &self,
        agent: &str,
        leases: &[Lease],
        policy: &LeasePolicy,
    ) -> Result<Vec<LeaseState>, StoreError> {
        let input: Vec<serde_json::Value> = leases
            .iter()
            .enumerate()
            .map(|(i, l)| serde_json::json!({"i": i, "id": l.id, "run_lease": l.run_lease}))
            .collect();
        let rows: Vec<HeartbeatRow> = sqlx::query_as(HEARTBEAT)
            .bind(json_text(&input)?)
            .bind(agent)
            .bind(millis(policy.lease))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("extending leases"))?;
        Ok(rows
            .into_iter()
            .map(|r| LeaseState {
                id: r.id,
                held: r.held,
                cancel: r.cancel,
            })
            .collect())
    }

    async fn progress(
        &self,
        agent: &str,
        lease: Lease,
        message: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let row = self
            .fenced(PROGRESS, agent, lease, Some(message), "recording progress")
            .await?;
        Ok(row.answer().map(|_| ()))
    }

    async fn complete(
        &self,
        completions: &[AgentCompletion<'_>],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let (rows, repeats) = completion_rows(completions);
        let outcomes: Vec<(i32, i32)> = sqlx::query_as(COMPLETE)
            .bind(json_text(&rows)?)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("completing tasks"))?;
        let mut sent = vec![None; completions.len()];
        for (i, outcome) in outcomes {
            let answer = match outcome {
                0 => Ok(()),
                1 => Err(Refusal::NotHeld),
                _ => Err(Refusal::NoTask),
            };
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| sent.get_mut(i)) {
                *slot = Some(answer);
            }
        }
        Ok(completion_answers(sent, &repeats))
    }

    async fn fail(
        &self,
        agent: &str,
        lease: Lease,
        error: &str,
        retryable: bool,
        policy: &LeasePolicy,
    ) -> Result<Result<FailOutcome, Refusal>, StoreError> {
        let (base, max) = backoff_params(policy);
        let row: FencedRow = sqlx::query_as(FAIL)
            .bind(lease.id)
            .bind(lease.run_lease)
            .bind(agent)
            .bind(error)
            .bind(retryable)
            .bind(base)
            .bind(max)
            .fetch_one(self.pool())
            .await
            .map_err(query_error("failing a task"))?;
        Ok(row.answer().map(|status| match status {
            "pending" => FailOutcome::Retry,
            _ => FailOutcome::Failed,
        }))
    }

    async fn question(
        &self,
        agent: &str,
        lease: Lease,
        question: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let row = self
            .fenced(
                QUESTION,
                agent,
                lease,
                Some(question),
                "recording a question",
            )
            .await?;
        Ok(row.answer().map(|_| ()))
    }

    async fn release(&self, agent: &str, lease: Lease) -> Result<Result<(), Refusal>, StoreError> {
        let row = self
            .fenced(RELEASE, agent, lease, None, "releasing a task")
            .await?;
        Ok(row.answer().map(|_| ()))
    }

    async fn expire_leases(&self, policy: &LeasePolicy) -> Result<Expired, StoreError> {
        let (base, max) = backoff_params(policy);
        let rows: Vec<(Uuid, String)> = sqlx::query_as(EXPIRE)
            .bind(base)
            .bind(max)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("expiring leases"))?;
        let mut expired = Expired::default();
        for (id, status) in rows {
            match status.as_str() {
                "pending" => expired.retried.push(id),
                _ => expired.failed.push(id),
            }
        }
        Ok(expired)
    }

    async fn block_dependents(&self) -> Result<u64, StoreError> {
        let blocked: i64 = sqlx::query_scalar(BLOCK)
            .fetch_one(self.pool())
            .await
            .map_err(query_error("blocking dependents of failed tasks"))?;
        Ok(u64::try_from(blocked).unwrap_or(0))
    }

    async fn queue_depth(&self) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query_as(QUEUE_DEPTH)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("measuring the queue"))
    }
}

// ---------------------------------------------------------------------------------------------
// The outbox and agent liveness
// ---------------------------------------------------------------------------------------------

/// $1 after which entry, $2 how many events: the entries from there on until they hold $2
/// events (the last one may take the batch past $2: an entry is published whole), each event
/// in the order its statement wrote it. An entry whose event is gone comes with an empty
/// event, and so does one without events, so that both are cleared.
///
/// The events are fetched by primary key (`= ANY(ARRAY(...))`): joined plainly, the planner
/// may hash the whole `events` table on every pass, which cost 20–35 ms a pass with a few
/// ten thousand events and grows with the table.
const UNPUBLISHED: &str = "\
    WITH o AS MATERIALIZED (SELECT seq, event_ids FROM ( \
            SELECT seq, event_ids, sum(cardinality(event_ids)) OVER (ORDER BY seq) \
                - cardinality(event_ids) AS before \
            FROM (SELECT seq, event_ids FROM event_outbox WHERE seq > $1 \
                ORDER BY seq LIMIT $2) first_entries) counted \
        WHERE before < $2), \
    ids AS MATERIALIZED (SELECT o.seq, u.id, u.n FROM o \
        LEFT JOIN LATERAL unnest(o.event_ids) WITH ORDINALITY AS u(id, n) ON true) \
    SELECT ids.seq, e.id, e.event_type, e.source_agent, e.target_agent, \
        CAST(e.payload AS text) AS payload, e.created_at \
    FROM ids LEFT JOIN events e ON e.id = ids.id \
        AND e.id = ANY(ARRAY(SELECT id FROM ids WHERE id IS NOT NULL)) \
    ORDER BY ids.seq, ids.n";

/// $1 outbox entries.
const MARK_PUBLISHED: &str = "DELETE FROM event_outbox WHERE seq = ANY($1)";

/// $1 how many per pool.
///
/// The pools are found by skipping through `idx_tasks_pending_assignee` one assignee at a time
/// (a loose index scan), and each pool's first tasks by walking it in claim order: the cost
/// follows the number of pools and of tasks announced, not the length of the queue.
const READY_TASKS: &str = concat!(
    "WITH RECURSIVE pools AS ( \
         SELECT (SELECT min(x.assignee) FROM tasks x WHERE x.status = 'pending') AS pool \
         UNION ALL \
         SELECT (SELECT min(x.assignee) FROM tasks x WHERE x.status = 'pending' \
             AND x.assignee > p.pool) FROM pools p WHERE p.pool IS NOT NULL) \
     SELECT p.pool, r.id, r.run_lease FROM pools p CROSS JOIN LATERAL ( \
         SELECT t.id, t.run_lease, t.priority, t.created_at FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = p.pool ORDER BY t.priority DESC NULLS LAST, t.created_at LIMIT $1) r \
     WHERE p.pool IS NOT NULL \
     ORDER BY p.pool, r.priority DESC NULLS LAST, r.created_at"
);

const AGENT_LIVENESS: &str = "\
    SELECT name, status, pruned_at IS NOT NULL AS pruned, \
        CAST(EXTRACT(EPOCH FROM (now() - last_active_at)) * 1000 AS bigint) AS seen_ms_ago \
    FROM agents WHERE status IN ('idle', 'busy', 'offline') ORDER BY name";

/// $1 names, $2 how long unseen (ms) before an agent counts as gone.
const MARK_OFFLINE: &str = "\
    WITH gone AS (UPDATE agents SET status = 'offline' \
        WHERE name = ANY($1) AND status IN ('idle', 'busy') AND last_active_at IS NOT NULL \
        AND last_active_at < now() - $2 * interval '1 millisecond' RETURNING name), \
    events AS (INSERT INTO events (event_type, source_agent, payload) \
        SELECT 'agent.offline', 'controller', jsonb_build_object('kind', 'Agent', 'name', g.name) \
        FROM gone g) \
    SELECT name FROM gone ORDER BY name";

/// $1 names, $2 how recently (ms) the store must have seen them.
const MARK_ONLINE: &str = "\
    WITH back AS (UPDATE agents a SET status = CASE WHEN EXISTS (SELECT 1 FROM tasks h \
            WHERE h.status = 'in_progress' AND h.lease_owner = a.name) THEN 'busy' ELSE 'idle' END \
        WHERE a.name = ANY($1) AND a.status = 'offline' AND a.pruned_at IS NULL \
        AND a.last_active_at >= now() - $2 * interval '1 millisecond' RETURNING a.name), \
    events AS (INSERT INTO events (event_type, source_agent, payload) \
        SELECT 'agent.online', 'controller', jsonb_build_object('kind', 'Agent', 'name', b.name) \
        FROM back b) \
    SELECT name FROM back ORDER BY name";

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    id: Option<Uuid>,
    event_type: Option<String>,
    source_agent: Option<String>,
    target_agent: Option<String>,
    payload: Option<String>,
    created_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct LivenessRow {
    name: String,
    status: String,
    pruned: bool,
    seen_ms_ago: Option<i64>,
}

impl Outbox for PgStore {
    async fn unpublished_events(&self, after: i64, limit: u32) -> Result<OutboxBatch, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(UNPUBLISHED)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading unpublished events"))?;
        let mut batch = OutboxBatch::default();
        for r in rows {
            // An entry holds the events of one statement: one row each, in a run.
            if batch.entries.last() != Some(&r.seq) {
                batch.entries.push(r.seq);
            }
            if let (Some(id), Some(event_type)) = (r.id, r.event_type) {
                batch.events.push(StoredEvent {
                    id,
                    event_type,
                    source_agent: r.source_agent,
                    target_agent: r.target_agent,
                    payload: raw_json(r.payload)?,
                    created_at: r.created_at,
                    outbox_entry: r.seq,
                });
            }
        }
        Ok(batch)
    }

    async fn mark_published(&self, entries: &[i64]) -> Result<u64, StoreError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(MARK_PUBLISHED)
            .bind(entries)
            .execute(self.pool())
            .await
            .map_err(query_error("clearing published events from the outbox"))?;
        Ok(done.rows_affected())
    }

    async fn ready_tasks(&self, per_pool: u32) -> Result<Vec<ReadyTask>, StoreError> {
        let rows: Vec<(String, Uuid, i64)> = sqlx::query_as(READY_TASKS)
            .bind(i64::from(per_pool))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("listing ready tasks"))?;
        Ok(rows
            .into_iter()
            .map(|(pool, task, run_lease)| ReadyTask {
                pool,
                task,
                run_lease,
            })
            .collect())
    }
}

impl Liveness for PgStore {
    async fn agent_liveness(&self) -> Result<Vec<AgentLiveness>, StoreError> {
        let rows: Vec<LivenessRow> = sqlx::query_as(AGENT_LIVENESS)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading agent liveness"))?;
        Ok(rows
            .into_iter()
            .map(|r| AgentLiveness {
                name: r.name,
                status: r.status,
                pruned: r.pruned,
                last_seen: r
                    .seen_ms_ago
                    .map(|ms| std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
            })
            .collect())
    }

    async fn mark_offline(
        &self,
        names: &[String],
        stale_after: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(MARK_OFFLINE)
            .bind(names)
            .bind(millis(stale_after))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("marking agents offline"))
    }

    async fn mark_online(
        &self,
        names: &[String],
        fresh_within: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(MARK_ONLINE)
            .bind(names)
            .bind(millis(fresh_within))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("marking agents online"))
    }
}
