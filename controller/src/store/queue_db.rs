//! [`Queue`], [`Outbox`] and [`Liveness`], written once for both backends. Each operation is
//! one transaction: the task rows change in one `UPDATE … RETURNING`, and the `task_updates`,
//! `events` and `agents` writes follow, each one statement for all of its rows (the rows go as
//! one JSON array parameter). Claims and completions are each engine's own
//! ([`Dispatch`]): they are the hot paths, and each is one statement per batch on Postgres,
//! which SQLite, without data-modifying CTEs, cannot say.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::StoreError;
use super::db::{Arg, Backend, Conn, Db, args, commit, rows_on, run_on};
use super::queue::*;
use super::sql::statements;

/// Readiness of task `t`, apart from who may run it: pending, not pruned, past its backoff,
/// its project not suspended, every dependency (`project/task`) completed.
///
/// Written so that the planner walks `idx_tasks_dispatch` in order and stops at the LIMIT
/// instead of sorting every pending task: the project check is a scalar subquery (as
/// `NOT EXISTS` Postgres makes it an anti-join it estimates at one row), and the common
/// "no dependencies" case is an equality the column statistics know to be almost always
/// true, which spares most tasks a JSON parse. Dependencies are then looked up through
/// `ux_tasks_project_name`.
macro_rules! ready {
    () => {
        "t.status = 'pending' AND t.pruned_at IS NULL \
         AND (t.not_before IS NULL OR t.not_before <= {now}) \
         AND NOT COALESCE((SELECT sp.suspend FROM projects sp WHERE sp.id = t.project_id), false) \
         AND (t.depends_on = '[]' OR NOT EXISTS (SELECT 1 FROM {each:t.depends_on} \
             WHERE NOT EXISTS (SELECT 1 FROM tasks dt JOIN projects dp ON dp.id = dt.project_id \
                 WHERE dp.name = {head:d.value} AND dt.name = {tail:d.value} \
                 AND dt.status = 'completed')))"
    };
}
pub(super) use ready;

/// $1 how many per pool: the pools found by skipping through `idx_tasks_pending_assignee` one
/// assignee at a time (a loose index scan), and each pool's first ready tasks by walking it in
/// claim order, joined as `$join`…`$end`: the cost follows the number of pools and of tasks
/// announced, not the length of the queue.
macro_rules! ready_tasks {
    ($join:literal, $end:literal) => {
        concat!(
            "WITH RECURSIVE pools(pool) AS ( \
                 SELECT (SELECT min(x.assignee) FROM tasks x WHERE x.status = 'pending') \
                 UNION ALL \
                 SELECT (SELECT min(x.assignee) FROM tasks x WHERE x.status = 'pending' \
                     AND x.assignee > p.pool) FROM pools p WHERE p.pool IS NOT NULL) \
             SELECT p.pool, {text:r.id} AS id, r.run_lease FROM pools p ",
            $join,
            ready!(),
            " AND t.assignee = p.pool ORDER BY t.priority DESC NULLS LAST, t.created_at \
                 LIMIT $1",
            $end,
            " WHERE p.pool IS NOT NULL ORDER BY p.pool, r.priority DESC NULLS LAST, r.created_at"
        )
    };
}

/// `(task $1, run_lease $2, agent $3)` still hold the task.
macro_rules! fence {
    () => {
        "tasks.id = {id:1} AND tasks.run_lease = $2 AND tasks.lease_owner = $3 \
         AND tasks.status = 'in_progress'"
    };
}

/// What every fenced statement returns about the task it changed.
macro_rules! returning {
    () => {
        " RETURNING {text:tasks.id} AS id, tasks.run_lease AS run_lease, \
          CAST(tasks.attempt AS bigint) AS attempt, tasks.status AS status, tasks.name AS name, \
          {time:tasks.not_before} AS not_before, \
          (SELECT p.name FROM projects p WHERE p.id = tasks.project_id) AS project"
    };
}
pub(super) use returning;

/// The wait before a retry, from the row's attempt and the base and cap (ms) of parameters
/// B and M: `{backoff}` is its one definition.
macro_rules! retry_or_fail {
    ($backoff:literal) => {
        concat!(
            "status = CASE WHEN h.retry THEN 'pending' ELSE 'failed' END, \
             attempt = CASE WHEN h.retry THEN attempt + 1 ELSE attempt END, \
             not_before = CASE WHEN h.retry THEN ",
            $backoff,
            " ELSE not_before END, \
             completed_at = CASE WHEN h.retry THEN completed_at ELSE {now} END, \
             assigned_to = CASE WHEN h.retry THEN assignee ELSE assigned_to END, \
             lease_owner = NULL, lease_expires_at = NULL"
        )
    };
}

statements! {
    /// Every statement of the queue, the outbox and liveness.
    Statements(d) {
        register_agent = "INSERT INTO agents (name, type, capabilities, concurrency, status, \
            last_active_at) VALUES ($1, $2, {json:3}, $4, 'idle', {now}) \
            ON CONFLICT (name) DO UPDATE SET type = excluded.type, \
            capabilities = excluded.capabilities, concurrency = excluded.concurrency, \
            status = 'idle', last_active_at = excluded.last_active_at",
        /// A token hash taken over from another agent would be a collision of SHA-256: drop
        /// it too.
        drop_sessions = "DELETE FROM agent_sessions WHERE agent_name = $1 OR token_hash = $2",
        insert_session = "INSERT INTO agent_sessions (token_hash, agent_name) VALUES ($2, $1)",
        authenticate = "SELECT a.name, a.type, {text:a.capabilities} AS capabilities, \
            CAST(a.concurrency AS bigint) AS concurrency, \
            (s.last_seen_at IS NULL OR s.last_seen_at < {ago:2}) AS stale \
            FROM agent_sessions s JOIN agents a ON a.name = s.agent_name WHERE s.token_hash = $1",
        touch_session = "UPDATE agent_sessions SET last_seen_at = {now} WHERE token_hash = $1",
        /// $1 a name: how long ago the store saw that agent.
        agent_liveness_of = "SELECT name, status, pruned_at IS NOT NULL AS pruned, \
            {age_ms:last_active_at} AS seen_ms_ago FROM agents WHERE name = $1",
        /// Agents but $1 holding a token: one session per name.
        count_sessions = "SELECT CAST(COUNT(*) AS bigint) FROM agent_sessions \
            WHERE agent_name <> $1",
        /// $1 names as a JSON array: their tokens end with their registration.
        drop_offline_sessions = "DELETE FROM agent_sessions \
            WHERE agent_name IN (SELECT v.value FROM {values:1})",
        claim = d.pick(super::queue_postgres::CLAIM, super::queue_sqlite::CLAIM),
        /// Tasks assigned to these agents by name ($1, a JSON array).
        named_pending = "SELECT DISTINCT t.assignee FROM tasks t \
            WHERE t.status = 'pending' AND t.assignee IN (SELECT v.value FROM {values:1})",
        /// $1 assignee, $2 capabilities, $3 how many: the ready tasks a claim would take.
        pick = concat!("SELECT {text:t.id} FROM tasks t WHERE ", ready!(), " AND t.assignee = $1 \
            AND NOT EXISTS (SELECT 1 FROM {each:t.capabilities} WHERE d.value NOT IN \
                (SELECT v.value FROM {values:2})) \
            ORDER BY t.priority DESC NULLS LAST, t.created_at LIMIT $3"),
        /// $1 agent, $2 whether it took work. Written only to make it `busy` or when
        /// `last_active_at` is a second old: claims come by the thousand per second, and
        /// liveness allows three heartbeats (30 s by default), so a second's lag is no loss.
        agent_claimed = "UPDATE agents SET last_active_at = {now}, \
            status = CASE WHEN $2 THEN 'busy' ELSE status END WHERE name = $1 \
            AND (($2 AND status <> 'busy') OR last_active_at IS NULL \
                OR last_active_at < {ago:3})",
        complete = d.pick(super::queue_postgres::COMPLETE, super::queue_sqlite::COMPLETE),
        /// Seen now, and `busy` or `idle` by what it holds. Reports keep it up to date one
        /// by one, but two reports of one agent that commit at the same moment can each see
        /// the other's task still in progress and leave it `busy`; the heartbeat puts that
        /// right.
        agent_heartbeat = "UPDATE agents SET last_active_at = {now}, \
            status = CASE WHEN status NOT IN ('busy', 'idle') THEN status \
                WHEN EXISTS (SELECT 1 FROM tasks h WHERE h.status = 'in_progress' \
                    AND h.lease_owner = $1) THEN 'busy' ELSE 'idle' END \
            WHERE name = $1",
        agent_seen = "UPDATE agents SET last_active_at = {now} WHERE name = $1",
        /// Seen now, and idle once it holds nothing.
        agent_ended = "UPDATE agents SET last_active_at = {now}, \
            status = CASE WHEN status = 'busy' AND NOT EXISTS (SELECT 1 FROM tasks h \
                WHERE h.status = 'in_progress' AND h.lease_owner = $1) \
                THEN 'idle' ELSE status END \
            WHERE name = $1",
        updates = "INSERT INTO task_updates (task_id, agent_name, update_type, message) \
            SELECT r.id, r.agent, r.type, r.message \
            FROM {rows:id uuid,agent text,type text,message text}",
        /// $1 leases as [{id, run_lease}], $2 agent, $3 the lease (ms).
        heartbeat = "UPDATE tasks SET lease_expires_at = {after:3} \
            FROM {rows:id uuid,run_lease bigint} \
            WHERE tasks.id = r.id AND tasks.run_lease = r.run_lease AND tasks.lease_owner = $2 \
            AND tasks.status = 'in_progress' RETURNING {text:tasks.id} AS id, tasks.run_lease",
        cancelled = "SELECT {text:t.id} FROM tasks t WHERE t.status = 'cancelled' \
            AND t.id IN (SELECT r.id FROM {rows:id uuid})",
        /// The task $1 as its events show it.
        task = "SELECT {text:tasks.id} AS id, tasks.run_lease AS run_lease, \
            CAST(tasks.attempt AS bigint) AS attempt, tasks.status AS status, tasks.name AS name, \
            {time:tasks.not_before} AS not_before, \
            (SELECT p.name FROM projects p WHERE p.id = tasks.project_id) AS project \
            FROM tasks WHERE tasks.id = {id:1}",
        exists = "SELECT count(*) FROM tasks WHERE id = {id:1}",
        /// $4 the message: the `progress` task update of a task still held.
        progress = concat!("INSERT INTO task_updates (task_id, agent_name, update_type, message) \
            SELECT tasks.id, $3, 'progress', $4 FROM tasks WHERE ", fence!()),
        /// Which of these tasks ($1 as [{id}]) exist.
        found = "SELECT {text:t.id} FROM tasks t WHERE t.id IN (SELECT r.id FROM {rows:id uuid})",
        artifacts = "INSERT INTO artifacts (task_id, agent_name, artifact_type, name, s3_key, \
            size_bytes, mime_type) \
            SELECT r.id, r.agent, r.type, r.name, r.key, r.size_bytes, r.mime_type FROM {rows:id \
            uuid,agent text,type text,name text,key text,size_bytes bigint,mime_type text}",
        /// $4 retryable, $5 error, $6/$7 backoff base/cap (ms). `h` decides once, under the
        /// row's lock, whether the task is retried.
        fail = concat!("UPDATE tasks SET ", retry_or_fail!("{backoff:tasks.attempt,6,7}"),
            ", error = $5 FROM (SELECT tasks.id AS task, ($4 AND tasks.attempt < tasks.retries) \
                AS retry FROM tasks WHERE ", fence!(), " {lock}) AS h \
            WHERE tasks.id = h.task", returning!()),
        /// $4 the question.
        question = concat!("UPDATE tasks SET status = 'blocked', \
            status_message = 'question: ' || $4, lease_owner = NULL, lease_expires_at = NULL \
            WHERE ", fence!(), returning!()),
        release = concat!("UPDATE tasks SET status = 'pending', assigned_to = assignee, \
            not_before = NULL, lease_owner = NULL, lease_expires_at = NULL WHERE ",
            fence!(), returning!()),
        /// The expired leases and who held them, locked before they are changed: a task whose
        /// report is being written right now is left to that report, and to the next sweep.
        expired = "SELECT {text:t.id}, t.lease_owner, CAST(t.attempt AS bigint) FROM tasks t \
            WHERE t.status = 'in_progress' AND t.lease_expires_at < {now} {skip_locked}",
        /// $1 ids as [{id}], $2/$3 backoff base/cap (ms).
        expire = concat!("UPDATE tasks SET ", retry_or_fail!("{backoff:tasks.attempt,2,3}"),
            ", error = CASE WHEN h.retry THEN 'lease expired' \
                ELSE 'lease expired; retries spent' END \
            FROM (SELECT x.id AS task, (x.attempt < x.retries) AS retry FROM tasks x \
                WHERE x.id IN (SELECT r.id FROM {rows:id uuid})) AS h \
            WHERE tasks.id = h.task", returning!()),
        /// The first dependency (in `dependsOn` order) that failed or was cancelled, per
        /// pending task.
        block = "UPDATE tasks SET status = 'blocked', \
                status_message = 'dependency ' || dep.dep || ' ' || dep.dep_status \
            FROM (SELECT t.id, d.value AS dep, dt.status AS dep_status, \
                    row_number() OVER (PARTITION BY t.id ORDER BY d.key) AS n \
                FROM tasks t CROSS JOIN {each_n:t.depends_on} \
                JOIN projects dp ON dp.name = {head:d.value} \
                JOIN tasks dt ON dt.project_id = dp.id AND dt.name = {tail:d.value} \
                WHERE t.status = 'pending' AND t.depends_on <> '[]' AND t.pruned_at IS NULL \
                AND dt.status IN ('failed', 'cancelled')) AS dep \
            WHERE tasks.id = dep.id AND dep.n = 1 AND tasks.status = 'pending' \
            RETURNING {text:tasks.id} AS id, tasks.name AS name, tasks.status_message AS status_message, \
                (SELECT p.name FROM projects p WHERE p.id = tasks.project_id) AS project",
        queue_depth = concat!("SELECT t.assignee, count(*) FROM tasks t WHERE ", ready!(),
            " AND t.assignee IS NOT NULL GROUP BY t.assignee ORDER BY t.assignee"),
        unpublished = d.pick(
            super::queue_postgres::UNPUBLISHED,
            super::queue_sqlite::UNPUBLISHED
        ),
        /// $1 outbox entries as a JSON array.
        mark_published = "DELETE FROM event_outbox \
            WHERE seq IN (SELECT CAST(v.value AS bigint) FROM {values:1})",
        /// SQLite has no `LATERAL`, hence its correlated `IN`.
        ready_tasks = d.pick(
            ready_tasks!(
                "CROSS JOIN LATERAL (SELECT t.id, t.run_lease, t.priority, t.created_at \
                    FROM tasks t WHERE ",
                ") r"
            ),
            ready_tasks!("JOIN tasks r ON r.id IN (SELECT t.id FROM tasks t WHERE ", ")")
        ),
        agent_liveness = "SELECT name, status, pruned_at IS NOT NULL AS pruned, \
            {age_ms:last_active_at} AS seen_ms_ago \
            FROM agents WHERE status IN ('idle', 'busy', 'offline') ORDER BY name",
        /// $1 names as a JSON array, $2 how long unseen (ms) before an agent counts as gone.
        mark_offline = "UPDATE agents SET status = 'offline' \
            WHERE name IN (SELECT v.value FROM {values:1}) AND status IN ('idle', 'busy') \
            AND last_active_at IS NOT NULL AND last_active_at < {ago:2} RETURNING name",
        /// $1 names as a JSON array, $2 how recently (ms) the store must have seen them.
        mark_online = "UPDATE agents SET status = CASE WHEN EXISTS (SELECT 1 FROM tasks h \
                WHERE h.status = 'in_progress' AND h.lease_owner = agents.name) \
                THEN 'busy' ELSE 'idle' END \
            WHERE name IN (SELECT v.value FROM {values:1}) AND status = 'offline' \
            AND pruned_at IS NULL AND last_active_at >= {ago:2} RETURNING name",
    }
}

/// The engine's own claim and completion (see the module's comment).
pub trait Dispatch: Backend {
    fn claim(
        db: &Db<Self>,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> impl Future<Output = Result<Vec<Vec<Assignment>>, StoreError>> + Send;

    fn complete(
        db: &Db<Self>,
        completions: &[AgentCompletion<'_>],
    ) -> impl Future<Output = Result<Vec<Result<(), Refusal>>, StoreError>> + Send;
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    name: String,
    #[sqlx(rename = "type")]
    agent_type: String,
    capabilities: Option<String>,
    concurrency: i64,
    stale: bool,
}

/// A task row a fenced statement changed (or found held).
#[derive(sqlx::FromRow)]
pub(super) struct TaskRow {
    pub id: String,
    pub run_lease: i64,
    pub attempt: i64,
    pub status: String,
    pub name: Option<String>,
    pub not_before: Option<String>,
    pub project: Option<String>,
}

impl TaskRow {
    /// The payload every task event carries.
    pub fn payload(&self, agent: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "project": self.project,
            "name": self.name,
            "agent": agent,
            "run_lease": self.run_lease,
            "attempt": self.attempt,
        })
    }
}

/// A claimed task, as both engines' claims return it.
#[derive(sqlx::FromRow)]
pub(super) struct AssignmentRow {
    pub agent: String,
    pub id: String,
    pub run_lease: i64,
    pub attempt: i32,
    pub priority: Option<i64>,
    pub created_at: Option<String>,
    pub project: String,
    pub name: String,
    pub title: String,
    pub description: String,
    pub action: Option<String>,
    pub output: Option<String>,
    pub acceptance_criteria: String,
    pub timeout_seconds: Option<i32>,
    pub revision: Option<String>,
    pub lease_expires_at: String,
    pub review_comments: Option<String>,
    /// As it was before this claim (SQLite's RETURNING does not see what the trigger
    /// changes).
    pub ready_at: Option<String>,
}

/// Hand each claimed task to its claimer, in claim order (higher priority, then older, first).
pub(super) fn assign(
    answers: &mut [Vec<Assignment>],
    claimers: &[Claimer],
    mut rows: Vec<AssignmentRow>,
) -> Result<(), StoreError> {
    rows.sort_by(|a, b| {
        (b.priority.cmp(&a.priority)).then_with(|| a.created_at.cmp(&b.created_at))
    });
    let slot: HashMap<&str, usize> = claimers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.agent.name.as_str(), i))
        .collect();
    for r in rows {
        let Some(&i) = slot.get(r.agent.as_str()) else {
            let who = r.agent;
            return Err(StoreError::Corrupt(format!(
                "a claim leased a task to {who}, who did not ask"
            )));
        };
        answers[i].push(Assignment {
            id: parse_id(&r.id)?,
            run_lease: r.run_lease,
            attempt: r.attempt,
            project: r.project,
            name: r.name,
            title: r.title,
            description: r.description,
            action: parse_json(r.action.as_deref())?.unwrap_or(Value::Null),
            output: parse_json(r.output.as_deref())?.unwrap_or(Value::Null),
            acceptance_criteria: strings(parse_json(Some(&r.acceptance_criteria))?),
            timeout_seconds: r.timeout_seconds,
            revision: r.revision,
            lease_expires_at: parse_time(&r.lease_expires_at)?,
            review_comments: r.review_comments,
            ready_at: r.ready_at.as_deref().map(parse_time).transpose()?,
        });
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct BlockedRow {
    id: String,
    name: Option<String>,
    status_message: Option<String>,
    project: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    id: Option<String>,
    event_type: Option<String>,
    source_agent: Option<String>,
    target_agent: Option<String>,
    payload: Option<String>,
    created_at: Option<String>,
}

#[derive(sqlx::FromRow)]
struct LivenessRow {
    name: String,
    status: String,
    pruned: bool,
    seen_ms_ago: Option<i64>,
}

impl LivenessRow {
    fn into_liveness(self) -> AgentLiveness {
        AgentLiveness {
            name: self.name,
            status: self.status,
            pruned: self.pruned,
            last_seen: self
                .seen_ms_ago
                .map(|ms| std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        }
    }
}

fn with(mut payload: Value, extra: Value) -> Value {
    if let (Some(map), Value::Object(extra)) = (payload.as_object_mut(), extra) {
        map.extend(extra);
    }
    payload
}

pub(super) fn json_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn parse_id(id: &str) -> Result<Uuid, StoreError> {
    id.parse()
        .map_err(|_| StoreError::Corrupt(format!("task id `{id}` is not a uuid")))
}

pub(super) fn parse_time(time: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(time)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Corrupt(format!("`{time}` is not an RFC 3339 time")))
}

pub(super) fn parse_json(text: Option<&str>) -> Result<Option<Value>, StoreError> {
    text.map(serde_json::from_str)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("a task holds malformed JSON: {e}")))
}

pub(super) fn event(event_type: &str, agent: &str, payload: Value) -> Value {
    json!({"type": event_type, "agent": agent, "payload": payload})
}

pub(super) fn update(id: &str, agent: &str, update_type: &str, message: &str) -> Value {
    json!({"id": id, "agent": agent, "type": update_type, "message": message})
}

/// Insert events, one statement for all of them.
pub(super) async fn events<B: Backend>(
    db: &Db<B>,
    conn: &mut Conn<B>,
    events: &[Value],
) -> Result<(), StoreError> {
    if !events.is_empty() {
        let events = json_text(&events)?;
        run_on::<B>(
            conn,
            &db.sql.core.add_events,
            args![&events],
            "recording events",
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn updates<B: Backend>(
    db: &Db<B>,
    conn: &mut Conn<B>,
    updates: &[Value],
) -> Result<(), StoreError> {
    if !updates.is_empty() {
        let updates = json_text(&updates)?;
        let doing = "recording task updates";
        run_on::<B>(conn, &db.sql.queue.updates, args![&updates], doing).await?;
    }
    Ok(())
}

pub(super) async fn agent_ended<B: Backend>(
    db: &Db<B>,
    conn: &mut Conn<B>,
    agent: &str,
) -> Result<(), StoreError> {
    let sql = &db.sql.queue.agent_ended;
    run_on::<B>(conn, sql, args![agent], "updating the agent").await?;
    Ok(())
}

/// Why a fenced statement matched nothing: the task is someone else's now, or unknown.
async fn refusal<B: Backend>(
    db: &Db<B>,
    conn: &mut Conn<B>,
    id: &str,
) -> Result<Refusal, StoreError> {
    let found: Vec<(i64,)> =
        rows_on::<B, _>(conn, &db.sql.queue.exists, args![id], "looking up a task").await?;
    Ok(if found.first().is_some_and(|(n,)| *n > 0) {
        Refusal::NotHeld
    } else {
        Refusal::NoTask
    })
}

impl<B: Backend> Db<B> {
    /// Run a fenced single-task statement ($1 id, $2 run lease, $3 agent, then `extra`), and
    /// on success write the task update and event `record` gives for the changed row.
    async fn end_lease(
        &self,
        statement: &'static str,
        agent: &str,
        lease: Lease,
        extra: &[Arg<'_>],
        record: impl FnOnce(&TaskRow) -> (Option<Value>, Value),
        doing: &'static str,
    ) -> Result<Result<TaskRow, Refusal>, StoreError> {
        let id = lease.id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let mut args = args![&id, lease.run_lease, agent].to_vec();
        args.extend_from_slice(extra);
        let rows: Vec<TaskRow> = rows_on::<B, _>(&mut tx, statement, &args, doing).await?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(Err(refusal(self, &mut tx, &id).await?));
        };
        let (update, event) = record(&row);
        if let Some(update) = update {
            updates(self, &mut tx, &[update]).await?;
        }
        events(self, &mut tx, &[event]).await?;
        agent_ended(self, &mut tx, agent).await?;
        commit(tx, doing).await?;
        Ok(Ok(row))
    }
}

impl<B: Dispatch> Queue for Db<B> {
    async fn register(&self, agent: &AgentIdentity, token_hash: &str) -> Result<(), StoreError> {
        let sql = &self.sql.queue;
        let capabilities = json_text(&agent.capabilities)?;
        let mut tx = self.begin().await?;
        let concurrency = i64::from(agent.concurrency.max(1));
        let args = args![&agent.name, &agent.agent_type, &capabilities, concurrency];
        run_on::<B>(&mut tx, &sql.register_agent, args, "registering an agent").await?;
        for statement in [&sql.drop_sessions, &sql.insert_session] {
            let args = args![&agent.name, token_hash];
            run_on::<B>(&mut tx, statement, args, "recording an agent session").await?;
        }
        commit(tx, "committing a registration").await
    }

    async fn authenticate(&self, token_hash: &str) -> Result<Option<AgentIdentity>, StoreError> {
        let sql = &self.sql.queue;
        // A read, and a write only when `last_seen_at` is stale: a token is checked on every
        // request, and a write per request would be the busiest write there is.
        let args = args![token_hash, SEEN_EVERY_SECONDS * 1000];
        let row: Option<AgentRow> = self
            .row(&sql.authenticate, args, "authenticating an agent")
            .await?;
        let Some(row) = row else { return Ok(None) };
        if row.stale {
            self.run(
                &sql.touch_session,
                args![token_hash],
                "touching an agent session",
            )
            .await?;
        }
        Ok(Some(AgentIdentity {
            name: row.name,
            agent_type: row.agent_type,
            capabilities: strings(parse_json(row.capabilities.as_deref())?),
            concurrency: u32::try_from(row.concurrency).unwrap_or(1),
        }))
    }

    async fn agent_seen(&self, name: &str) -> Result<Option<AgentLiveness>, StoreError> {
        let row: Option<LivenessRow> = self
            .row(
                &self.sql.queue.agent_liveness_of,
                args![name],
                "reading an agent",
            )
            .await?;
        Ok(row.map(LivenessRow::into_liveness))
    }

    async fn registered_agents(&self, except: &str) -> Result<u64, StoreError> {
        let row: Option<(i64,)> = self
            .row(
                &self.sql.queue.count_sessions,
                args![except],
                "counting agents",
            )
            .await?;
        Ok(row.map_or(0, |(n,)| u64::try_from(n).unwrap_or(0)))
    }

    async fn claim(
        &self,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> Result<Vec<Vec<Assignment>>, StoreError> {
        B::claim(self, claimers, policy).await
    }

    async fn heartbeat(
        &self,
        agent: &str,
        leases: &[Lease],
        policy: &LeasePolicy,
    ) -> Result<Vec<LeaseState>, StoreError> {
        let sql = &self.sql.queue;
        // `[{id, run_lease}]`, as a lease serializes.
        let input = json_text(&leases)?;
        let mut tx = self.begin().await?;
        let args = args![&input, agent, millis(policy.lease)];
        let held: Vec<(String, i64)> =
            rows_on::<B, _>(&mut tx, &sql.heartbeat, args, "extending leases").await?;
        let cancelled: Vec<(String,)> = if leases.len() > held.len() {
            let doing = "looking up cancelled tasks";
            rows_on::<B, _>(&mut tx, &sql.cancelled, args![&input], doing).await?
        } else {
            Vec::new()
        };
        let doing = "updating the agent";
        run_on::<B>(&mut tx, &sql.agent_heartbeat, args![agent], doing).await?;
        commit(tx, "committing a heartbeat").await?;
        let held: HashSet<(Uuid, i64)> = held
            .iter()
            .map(|(id, run_lease)| Ok((parse_id(id)?, *run_lease)))
            .collect::<Result<_, StoreError>>()?;
        let cancelled: HashSet<Uuid> = cancelled
            .iter()
            .map(|(id,)| parse_id(id))
            .collect::<Result<_, StoreError>>()?;
        Ok(leases
            .iter()
            .map(|l| LeaseState {
                id: l.id,
                held: held.contains(&(l.id, l.run_lease)),
                cancel: cancelled.contains(&l.id),
            })
            .collect())
    }

    async fn progress(
        &self,
        agent: &str,
        lease: Lease,
        message: &str,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let sql = &self.sql.queue;
        let id = lease.id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let args = args![&id, lease.run_lease, agent, message];
        let doing = "recording progress";
        if run_on::<B>(&mut tx, &sql.progress, args, doing).await? == 0 {
            return Ok(Err(refusal(self, &mut tx, &id).await?));
        }
        let task: Vec<TaskRow> = rows_on::<B, _>(&mut tx, &sql.task, args![&id], doing).await?;
        let Some(row) = task.into_iter().next() else {
            return Ok(Err(Refusal::NoTask));
        };
        let payload = with(row.payload(Some(agent)), json!({"message": message}));
        events(self, &mut tx, &[event("task.progress", agent, payload)]).await?;
        run_on::<B>(&mut tx, &sql.agent_seen, args![agent], "updating the agent").await?;
        commit(tx, "committing progress").await?;
        Ok(Ok(()))
    }

    async fn complete(
        &self,
        completions: &[AgentCompletion<'_>],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        B::complete(self, completions).await
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
        let record = |row: &TaskRow| {
            let retry = row.status == "pending";
            let mut payload = row.payload(Some(agent));
            let not_before = if retry { row.not_before.clone() } else { None };
            if retry {
                // The payload names the attempt that failed, not the next one.
                payload["attempt"] = json!(row.attempt - 1);
            }
            let extra = json!({"error": error, "retryable": retryable, "not_before": not_before});
            let kind = if retry {
                "task.retrying"
            } else {
                "task.failed"
            };
            (
                Some(update(&row.id, agent, "error", error)),
                event(kind, agent, with(payload, extra)),
            )
        };
        let extra = args![retryable, error, base, max];
        let answer = self
            .end_lease(
                &self.sql.queue.fail,
                agent,
                lease,
                extra,
                record,
                "failing a task",
            )
            .await?;
        Ok(answer.map(|row| match row.status.as_str() {
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
        let record = |row: &TaskRow| {
            let payload = with(row.payload(Some(agent)), json!({"question": question}));
            (
                Some(update(&row.id, agent, "question", question)),
                event("task.question", agent, payload),
            )
        };
        let statement = &self.sql.queue.question;
        let doing = "recording a question";
        let answer = self
            .end_lease(statement, agent, lease, args![question], record, doing)
            .await?;
        Ok(answer.map(|_| ()))
    }

    async fn release(&self, agent: &str, lease: Lease) -> Result<Result<(), Refusal>, StoreError> {
        let record = |row: &TaskRow| {
            (
                None,
                event("task.released", agent, row.payload(Some(agent))),
            )
        };
        let statement = &self.sql.queue.release;
        let answer = self
            .end_lease(statement, agent, lease, args![], record, "releasing a task")
            .await?;
        Ok(answer.map(|_| ()))
    }

    async fn expire_leases(&self, policy: &LeasePolicy) -> Result<Expired, StoreError> {
        let sql = &self.sql.queue;
        let (base, max) = backoff_params(policy);
        let mut tx = self.begin().await?;
        let old: Vec<(String, Option<String>, i64)> =
            rows_on::<B, _>(&mut tx, &sql.expired, args![], "finding expired leases").await?;
        if old.is_empty() {
            return Ok(Expired::default());
        }
        let ids: Vec<Value> = old.iter().map(|(id, _, _)| json!({"id": id})).collect();
        let ids = json_text(&ids)?;
        let args = args![&ids, base, max];
        let mut rows: Vec<TaskRow> =
            rows_on::<B, _>(&mut tx, &sql.expire, args, "expiring leases").await?;
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        let holders: HashMap<&str, (Option<&str>, i64)> = old
            .iter()
            .map(|(id, owner, attempt)| (id.as_str(), (owner.as_deref(), *attempt)))
            .collect();
        let mut task_updates = Vec::with_capacity(rows.len());
        let mut expired_events = Vec::with_capacity(rows.len());
        let mut expired = Expired::default();
        for row in &rows {
            let (owner, attempt) = holders.get(row.id.as_str()).copied().unwrap_or((None, 0));
            let retry = row.status == "pending";
            let error = if retry {
                "lease expired"
            } else {
                "lease expired; retries spent"
            };
            let mut payload = row.payload(owner);
            payload["attempt"] = json!(attempt);
            let not_before = if retry { row.not_before.clone() } else { None };
            let payload = with(payload, json!({"error": error, "not_before": not_before}));
            let kind = if retry {
                "task.lease_expired"
            } else {
                "task.failed"
            };
            expired_events.push(event(kind, "controller", payload));
            let agent = owner.unwrap_or("controller");
            task_updates.push(update(&row.id, agent, "error", error));
            let id = parse_id(&row.id)?;
            if retry {
                expired.retried.push(id);
            } else {
                expired.failed.push(id);
            }
        }
        updates(self, &mut tx, &task_updates).await?;
        events(self, &mut tx, &expired_events).await?;
        commit(tx, "committing expired leases").await?;
        Ok(expired)
    }

    async fn block_dependents(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let doing = "blocking dependents of failed tasks";
        let blocked: Vec<BlockedRow> =
            rows_on::<B, _>(&mut tx, &self.sql.queue.block, args![], doing).await?;
        if blocked.is_empty() {
            return Ok(0);
        }
        let blocked_events: Vec<Value> = blocked
            .iter()
            .map(|b| {
                let payload = json!({"id": b.id, "project": b.project, "name": b.name,
                    "message": b.status_message});
                event("task.blocked", "controller", payload)
            })
            .collect();
        events(self, &mut tx, &blocked_events).await?;
        commit(tx, "committing blocked tasks").await?;
        Ok(blocked.len() as u64)
    }

    async fn queue_depth(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = &self.sql.queue.queue_depth;
        self.rows(sql, args![], "measuring the queue").await
    }
}

impl<B: Backend> Outbox for Db<B> {
    async fn unpublished_events(&self, after: i64, limit: u32) -> Result<OutboxBatch, StoreError> {
        let args = args![after, i64::from(limit)];
        let rows: Vec<EventRow> = self
            .rows(
                &self.sql.queue.unpublished,
                args,
                "reading unpublished events",
            )
            .await?;
        let mut batch = OutboxBatch::default();
        for r in rows {
            // An entry holds the events of one statement (on SQLite, one event): one row
            // each, in a run.
            if batch.entries.last() != Some(&r.seq) {
                batch.entries.push(r.seq);
            }
            let (Some(id), Some(event_type)) = (r.id, r.event_type) else {
                continue;
            };
            batch.events.push(StoredEvent {
                id: id
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("event id `{id}`")))?,
                event_type,
                source_agent: r.source_agent,
                target_agent: r.target_agent,
                payload: raw_json(r.payload)?,
                created_at: r.created_at.as_deref().map(parse_time).transpose()?,
                outbox_entry: r.seq,
            });
        }
        Ok(batch)
    }

    async fn mark_published(&self, entries: &[i64]) -> Result<u64, StoreError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let entries = json_text(&entries)?;
        let doing = "clearing published events from the outbox";
        self.run(&self.sql.queue.mark_published, args![&entries], doing)
            .await
    }

    async fn ready_tasks(&self, per_pool: u32) -> Result<Vec<ReadyTask>, StoreError> {
        let args = args![i64::from(per_pool)];
        let rows: Vec<(String, String, i64)> = self
            .rows(&self.sql.queue.ready_tasks, args, "listing ready tasks")
            .await?;
        rows.into_iter()
            .map(|(pool, task, run_lease)| {
                Ok(ReadyTask {
                    pool,
                    task: parse_id(&task)?,
                    run_lease,
                })
            })
            .collect()
    }
}

impl<B: Backend> Liveness for Db<B> {
    async fn agent_liveness(&self) -> Result<Vec<AgentLiveness>, StoreError> {
        let rows: Vec<LivenessRow> = self
            .rows(
                &self.sql.queue.agent_liveness,
                args![],
                "reading agent liveness",
            )
            .await?;
        Ok(rows.into_iter().map(LivenessRow::into_liveness).collect())
    }

    async fn mark(
        &self,
        to: Mark,
        names: &[String],
        within: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let sql = &self.sql.queue;
        let (statement, event_type, doing) = match to {
            Mark::Offline => (&sql.mark_offline, "agent.offline", "marking agents offline"),
            Mark::Online => (&sql.mark_online, "agent.online", "marking agents online"),
        };
        let mut tx = self.begin().await?;
        let names = json_text(&names)?;
        let args = args![&names, millis(within)];
        let changed: Vec<(String,)> = rows_on::<B, _>(&mut tx, statement, args, doing).await?;
        let mut changed: Vec<String> = changed.into_iter().map(|(name,)| name).collect();
        changed.sort();
        if matches!(to, Mark::Offline) && !changed.is_empty() {
            // A registration ends when its agent goes offline: its token stops working, and
            // its name is free to take.
            let names = json_text(&changed)?;
            let statement = &sql.drop_offline_sessions;
            let doing = "ending offline agents' tokens";
            run_on::<B>(&mut tx, statement, args![&names], doing).await?;
        }
        let recorded: Vec<Value> = changed
            .iter()
            .map(|name| {
                event(
                    event_type,
                    "controller",
                    json!({"kind": "Agent", "name": name}),
                )
            })
            .collect();
        events(self, &mut tx, &recorded).await?;
        commit(tx, doing).await?;
        Ok(changed)
    }
}
