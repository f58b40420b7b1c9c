//! [`Queue`] on SQLite. SQLite has one writer at a time, so each operation is one
//! `BEGIN IMMEDIATE` transaction (the write lock taken up front: a concurrent writer waits on
//! `busy_timeout` instead of failing to upgrade a read lock) of a few set-based statements:
//! the task rows change in one `UPDATE … RETURNING`, and the `events`, `task_updates` and
//! `artifacts` rows follow from one JSON array parameter each (`json_each`). Ids are hyphenated
//! text and times the text of `strftime('%Y-%m-%dT%H:%M:%fZ', …)`, as the schema requires.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::SqliteStore;
use super::queue::*;
use super::{StoreError, query_error};

/// Now, in the schema's one timestamp format.
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
}

/// Readiness of task `t`, apart from who may run it (see the Postgres twin). Most tasks have no
/// dependencies, and `depends_on = '[]'` spares them a JSON parse: the announcer and the
/// depth gauge evaluate this for every pending task.
macro_rules! ready {
    () => {
        concat!(
            "t.status = 'pending' AND t.pruned_at IS NULL \
             AND (t.not_before IS NULL OR t.not_before <= ", now!(), ") \
             AND NOT EXISTS (SELECT 1 FROM projects sp WHERE sp.id = t.project_id AND sp.suspend = 1) \
             AND (t.depends_on = '[]' OR NOT EXISTS (SELECT 1 FROM json_each(t.depends_on) d \
                 WHERE NOT EXISTS (SELECT 1 FROM tasks dt JOIN projects dp ON dp.id = dt.project_id \
                     WHERE dp.name = substr(d.value, 1, instr(d.value, '/') - 1) \
                     AND dt.name = substr(d.value, instr(d.value, '/') + 1) \
                     AND dt.status = 'completed')))"
        )
    };
}

/// `(task ?1, run_lease ?2, agent ?3)` still hold the task.
macro_rules! fence {
    () => {
        "id = ?1 AND run_lease = ?2 AND lease_owner = ?3 AND status = 'in_progress'"
    };
}

/// What every fenced statement returns about the task it changed.
macro_rules! returning {
    () => {
        " RETURNING tasks.id AS id, tasks.run_lease AS run_lease, tasks.attempt AS attempt, \
          tasks.status AS status, tasks.name AS name, tasks.not_before AS not_before, \
          (SELECT p.name FROM projects p WHERE p.id = tasks.project_id) AS project"
    };
}

/// The wait before the retry that follows the row's attempt (`LeasePolicy::backoff`), from
/// the base `$base` and the cap `$max` in milliseconds, as a time from now.
macro_rules! backoff {
    ($base:literal, $max:literal) => {
        concat!(
            "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('+%.3f seconds', \
             min(",
            $base,
            " << min(max(attempt, 0), 20), ",
            $max,
            ") / 1000.0))"
        )
    };
}

const REGISTER_AGENT: &str = concat!(
    "INSERT INTO agents (name, type, capabilities, concurrency, status, last_active_at) \
     VALUES (?1, ?2, ?3, ?4, 'idle', ",
    now!(),
    ") ON CONFLICT (name) DO UPDATE SET type = excluded.type, \
     capabilities = excluded.capabilities, concurrency = excluded.concurrency, \
     status = 'idle', last_active_at = excluded.last_active_at"
);

const DROP_SESSIONS: &str = "DELETE FROM agent_sessions WHERE agent_name = ?1 OR token_hash = ?2";

const INSERT_SESSION: &str = "INSERT INTO agent_sessions (token_hash, agent_name) VALUES (?2, ?1)";

const AUTHENTICATE: &str = "SELECT a.name, a.type, a.capabilities, a.concurrency, \
     (s.last_seen_at IS NULL OR s.last_seen_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2)) AS stale \
     FROM agent_sessions s JOIN agents a ON a.name = s.agent_name WHERE s.token_hash = ?1";

const TOUCH_SESSION: &str = concat!(
    "UPDATE agent_sessions SET last_seen_at = ",
    now!(),
    " WHERE token_hash = ?1"
);

/// ?1 agent, ?2 the assignee to take tasks of (the agent's name or its role), ?3 its
/// capabilities, ?4 how many, ?5 the lease as a modifier.
const CLAIM: &str = concat!(
    "UPDATE tasks SET status = 'in_progress', lease_owner = ?1, assigned_to = ?1, \
     lease_expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?5), \
     run_lease = run_lease + 1, started_at = COALESCE(started_at, ",
    now!(),
    "), claimed_at = ",
    now!(),
    ", dispatch_revision = revision \
     WHERE id IN (SELECT t.id FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = ?2 \
     AND NOT EXISTS (SELECT 1 FROM json_each(t.capabilities) c \
         WHERE c.value NOT IN (SELECT value FROM json_each(?3))) \
     ORDER BY t.priority DESC NULLS LAST, t.created_at LIMIT ?4) \
     RETURNING id, run_lease, attempt, priority, created_at, \
     max(updated_at, COALESCE(not_before, updated_at), COALESCE((SELECT max(dt.completed_at) \
         FROM json_each(tasks.depends_on) d \
         JOIN projects dp ON dp.name = substr(d.value, 1, instr(d.value, '/') - 1) \
         JOIN tasks dt ON dt.project_id = dp.id \
             AND dt.name = substr(d.value, instr(d.value, '/') + 1)), updated_at)) AS ready_at, \
     COALESCE((SELECT p.name FROM projects p WHERE p.id = tasks.project_id), '') AS project, \
     COALESCE(name, '') AS name, title, COALESCE(description, '') AS description, action, \
     output, acceptance_criteria, timeout_seconds, revision, lease_expires_at, review_comments"
);

/// ?1 agent, ?2 whether it took work. Written only to make it `busy` or when `last_active_at`
/// is a second old (see `stale_or!` on Postgres).
const AGENT_CLAIMED: &str = concat!(
    "UPDATE agents SET last_active_at = ",
    now!(),
    ", status = CASE WHEN ?2 THEN 'busy' ELSE status END WHERE name = ?1 \
     AND ((?2 AND status <> 'busy') OR last_active_at IS NULL \
         OR last_active_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 seconds'))"
);

/// ?1 agent names as a JSON array: those that have pending tasks assigned by name.
const NAMED_PENDING: &str = "\
    SELECT DISTINCT assignee FROM tasks \
    WHERE status = 'pending' AND assignee IN (SELECT value FROM json_each(?1))";

/// Seen now, and `busy` or `idle` by what it holds (see the Postgres twin).
const AGENT_HEARTBEAT: &str = concat!(
    "UPDATE agents SET last_active_at = ",
    now!(),
    ", status = CASE WHEN status NOT IN ('busy', 'idle') THEN status \
         WHEN EXISTS (SELECT 1 FROM tasks h WHERE h.status = 'in_progress' \
             AND h.lease_owner = ?1) THEN 'busy' ELSE 'idle' END \
     WHERE name = ?1"
);

const AGENT_SEEN: &str = concat!(
    "UPDATE agents SET last_active_at = ",
    now!(),
    " WHERE name = ?1"
);

/// Seen now, and idle once it holds nothing.
const AGENT_ENDED: &str = concat!(
    "UPDATE agents SET last_active_at = ",
    now!(),
    ", status = CASE WHEN status = 'busy' AND NOT EXISTS (SELECT 1 FROM tasks h \
         WHERE h.status = 'in_progress' AND h.lease_owner = ?1) \
         THEN 'idle' ELSE status END \
     WHERE name = ?1"
);

/// ?1 events as [{type, agent, payload}].
const EVENTS: &str = "\
    INSERT INTO events (event_type, source_agent, payload) \
    SELECT value ->> '$.type', value ->> '$.agent', value -> '$.payload' FROM json_each(?1)";

/// ?1 updates as [{id, agent, type, message}].
const UPDATES: &str = "\
    INSERT INTO task_updates (task_id, agent_name, update_type, message) \
    SELECT value ->> '$.id', value ->> '$.agent', value ->> '$.type', value ->> '$.message' \
    FROM json_each(?1)";

/// ?1 leases as [{id, run_lease}], ?2 agent, ?3 the lease as a modifier.
const HEARTBEAT: &str = "\
    UPDATE tasks SET lease_expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?3) \
    WHERE (id, run_lease) IN (SELECT value ->> '$.id', value ->> '$.run_lease' FROM json_each(?1)) \
    AND lease_owner = ?2 AND status = 'in_progress' \
    RETURNING id, run_lease";

const CANCELLED: &str = "\
    SELECT id FROM tasks WHERE status = 'cancelled' \
    AND id IN (SELECT value ->> '$.id' FROM json_each(?1))";

const HELD: &str = concat!(
    "SELECT id, run_lease, attempt, status, name, not_before, \
     (SELECT p.name FROM projects p WHERE p.id = tasks.project_id) AS project \
     FROM tasks WHERE ",
    fence!()
);

const EXISTS: &str = "SELECT count(*) FROM tasks WHERE id = ?1";

/// ?1 completions as [`CompletionRow`], ?2 agent.
///
/// Sets `updated_at` itself, so that the `tasks_set_updated_at` trigger does not update every
/// completed row a second time. (The claim cannot: its `RETURNING` reads `updated_at` as the
/// moment the task became ready.)
const COMPLETE: &str = concat!(
    "UPDATE tasks SET status = CASE WHEN r.review THEN 'review' ELSE 'completed' END, \
     completed_at = CASE WHEN r.review THEN NULL ELSE ",
    now!(),
    " END, result = r.result, lease_owner = NULL, lease_expires_at = NULL, status_message = NULL, \
     updated_at = ",
    now!(),
    " FROM (SELECT value ->> '$.id' AS id, value ->> '$.run_lease' AS run_lease, \
         value ->> '$.agent' AS agent, value -> '$.result' AS result, \
         value ->> '$.review' AS review FROM json_each(?1)) AS r \
     WHERE tasks.id = r.id AND tasks.run_lease = r.run_lease AND tasks.lease_owner = r.agent \
     AND tasks.status = 'in_progress'",
    returning!()
);

const FOUND: &str = "SELECT id FROM tasks WHERE id IN (SELECT value FROM json_each(?1))";

/// ?1 completions as [`CompletionRow`] (those accepted).
const ARTIFACTS: &str = "\
    INSERT INTO artifacts (task_id, agent_name, artifact_type, name, s3_key, size_bytes, mime_type) \
    SELECT c.value ->> '$.id', c.value ->> '$.agent', a.value ->> '$.type', a.value ->> '$.name', \
        a.value ->> '$.key', a.value ->> '$.size_bytes', a.value ->> '$.mime_type' \
    FROM json_each(?1) c, json_each(c.value, '$.artifacts') a";

/// ?1 task, ?2 run lease, ?3 agent, ?4 retryable, ?5 error, ?6/?7 backoff base/cap (ms).
/// `h` decides once whether the task is retried.
const FAIL: &str = concat!(
    "UPDATE tasks SET \
     status = CASE WHEN h.retry THEN 'pending' ELSE 'failed' END, \
     attempt = CASE WHEN h.retry THEN attempt + 1 ELSE attempt END, \
     not_before = CASE WHEN h.retry THEN ",
    backoff!("?6", "?7"),
    " ELSE not_before END, \
     completed_at = CASE WHEN h.retry THEN completed_at ELSE ",
    now!(),
    " END, \
     assigned_to = CASE WHEN h.retry THEN assignee ELSE assigned_to END, \
     error = ?5, lease_owner = NULL, lease_expires_at = NULL \
     FROM (SELECT id AS task, (?4 AND attempt < retries) AS retry FROM tasks WHERE ",
    fence!(),
    ") AS h WHERE tasks.id = h.task",
    returning!()
);

/// ?1 task, ?2 run lease, ?3 agent, ?4 question.
const QUESTION: &str = concat!(
    "UPDATE tasks SET status = 'blocked', status_message = 'question: ' || ?4, \
     lease_owner = NULL, lease_expires_at = NULL WHERE ",
    fence!(),
    returning!()
);

/// ?1 task, ?2 run lease, ?3 agent.
const RELEASE: &str = concat!(
    "UPDATE tasks SET status = 'pending', assigned_to = assignee, not_before = NULL, \
     lease_owner = NULL, lease_expires_at = NULL WHERE ",
    fence!(),
    returning!()
);

/// The expired leases and who held them, read before they are changed (the write lock is
/// already held, so nothing moves in between).
const EXPIRED: &str = concat!(
    "SELECT id, lease_owner, attempt FROM tasks \
     WHERE status = 'in_progress' AND lease_expires_at < ",
    now!()
);

/// ?1 ids as a JSON array, ?2/?3 backoff base/cap (ms). `h` decides once whether each task
/// is retried.
const EXPIRE: &str = concat!(
    "UPDATE tasks SET \
     status = CASE WHEN h.retry THEN 'pending' ELSE 'failed' END, \
     attempt = CASE WHEN h.retry THEN attempt + 1 ELSE attempt END, \
     not_before = CASE WHEN h.retry THEN ",
    backoff!("?2", "?3"),
    " ELSE not_before END, \
     completed_at = CASE WHEN h.retry THEN completed_at ELSE ",
    now!(),
    " END, \
     assigned_to = CASE WHEN h.retry THEN assignee ELSE assigned_to END, \
     error = CASE WHEN h.retry THEN 'lease expired' ELSE 'lease expired; retries spent' END, \
     lease_owner = NULL, lease_expires_at = NULL \
     FROM (SELECT id AS task, (attempt < retries) AS retry FROM tasks \
         WHERE id IN (SELECT value FROM json_each(?1))) AS h \
     WHERE tasks.id = h.task",
    returning!()
);

/// The first dependency (in `dependsOn` order) that failed or was cancelled, per pending task.
const BLOCK: &str = "\
    UPDATE tasks SET status = 'blocked', \
        status_message = 'dependency ' || dep.dep || ' ' || dep.dep_status \
    FROM (SELECT t.id, d.value AS dep, dt.status AS dep_status, \
              row_number() OVER (PARTITION BY t.id ORDER BY d.key) AS n \
          FROM tasks t, json_each(t.depends_on) d \
          JOIN projects dp ON dp.name = substr(d.value, 1, instr(d.value, '/') - 1) \
          JOIN tasks dt ON dt.project_id = dp.id AND dt.name = substr(d.value, instr(d.value, '/') + 1) \
          WHERE t.status = 'pending' AND t.depends_on <> '[]' AND t.pruned_at IS NULL \
          AND dt.status IN ('failed', 'cancelled')) AS dep \
    WHERE tasks.id = dep.id AND dep.n = 1 AND tasks.status = 'pending' \
    RETURNING id, name, status_message, \
        (SELECT p.name FROM projects p WHERE p.id = tasks.project_id) AS project";

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
    capabilities: Option<String>,
    concurrency: i64,
    stale: bool,
}

#[derive(sqlx::FromRow)]
struct AssignmentRow {
    id: String,
    run_lease: i64,
    attempt: i32,
    priority: Option<i64>,
    created_at: Option<String>,
    project: String,
    name: String,
    title: String,
    description: String,
    action: Option<String>,
    output: Option<String>,
    acceptance_criteria: String,
    timeout_seconds: Option<i32>,
    revision: Option<String>,
    lease_expires_at: String,
    review_comments: Option<String>,
    /// As it was before this claim: RETURNING does not see what the trigger changes.
    ready_at: Option<String>,
}

/// A task row a fenced statement changed (or found held).
#[derive(sqlx::FromRow)]
struct TaskRow {
    id: String,
    run_lease: i64,
    attempt: i64,
    status: String,
    name: Option<String>,
    not_before: Option<String>,
    project: Option<String>,
}

#[derive(sqlx::FromRow)]
struct BlockedRow {
    id: String,
    name: Option<String>,
    status_message: Option<String>,
    project: Option<String>,
}

impl TaskRow {
    /// The payload every task event carries.
    fn payload(&self, agent: Option<&str>) -> Value {
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

fn with(mut payload: Value, extra: Value) -> Value {
    if let (Some(map), Value::Object(extra)) = (payload.as_object_mut(), extra) {
        map.extend(extra);
    }
    payload
}

fn json_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse_id(id: &str) -> Result<Uuid, StoreError> {
    id.parse()
        .map_err(|_| StoreError::Corrupt(format!("task id `{id}` is not a uuid")))
}

fn parse_time(time: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(time)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Corrupt(format!("`{time}` is not an RFC 3339 time")))
}

fn parse_json(text: Option<&str>) -> Result<Option<Value>, StoreError> {
    text.map(serde_json::from_str)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("a task holds malformed JSON: {e}")))
}

/// A duration as an SQLite date modifier: `+12.345 seconds`.
fn modifier(duration: std::time::Duration) -> String {
    let ms = millis(duration);
    format!("+{}.{:03} seconds", ms / 1000, ms % 1000)
}

type Tx = Transaction<'static, Sqlite>;

/// Which of a claimer's two pools may have work this round.
struct Pools {
    /// Tasks are assigned to the agent by name.
    named: bool,
    /// No earlier claimer of this round with the same role and capabilities emptied it.
    role: bool,
}

/// Claims for one agent; also says whether its role's pool ran out.
async fn claim_one(
    tx: &mut Tx,
    agent: &AgentIdentity,
    max: u32,
    policy: &LeasePolicy,
    open: Pools,
) -> Result<(Vec<Assignment>, bool), StoreError> {
    if max == 0 {
        return Ok((Vec::new(), false));
    }
    // Tasks that name the agent first, then its role's, as on Postgres. Two statements on
    // one assignee each, because each then walks `idx_tasks_pending_assignee` in claim order
    // and stops at the limit; `assignee IN (name, role)` made SQLite sort every pending task.
    let capabilities = json_text(&agent.capabilities)?;
    let mut rows: Vec<AssignmentRow> = Vec::new();
    let mut pools: Vec<&str> = Vec::with_capacity(2);
    if open.named && agent.name != agent.agent_type {
        pools.push(&agent.name);
    }
    if open.role {
        pools.push(&agent.agent_type);
    }
    let mut role_emptied = false;
    for assignee in pools {
        let room = i64::from(max) - rows.len() as i64;
        if room <= 0 {
            break;
        }
        let mut taken: Vec<AssignmentRow> = sqlx::query_as(CLAIM)
            .bind(&agent.name)
            .bind(assignee)
            .bind(&capabilities)
            .bind(room)
            .bind(modifier(policy.lease))
            .fetch_all(&mut **tx)
            .await
            .map_err(query_error("claiming tasks"))?;
        if assignee == agent.agent_type && (taken.len() as i64) < room {
            role_emptied = true;
        }
        // RETURNING comes in no particular order.
        taken.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.created_at.cmp(&b.created_at))
        });
        rows.append(&mut taken);
    }
    let claimed: Vec<Value> = rows
        .iter()
        .map(|r| {
            event(
                "task.claimed",
                &agent.name,
                json!({
                    "id": r.id,
                    "project": r.project,
                    "name": r.name,
                    "agent": agent.name,
                    "run_lease": r.run_lease,
                    "attempt": r.attempt,
                }),
            )
        })
        .collect();
    events(tx, &claimed).await?;
    sqlx::query(AGENT_CLAIMED)
        .bind(&agent.name)
        .bind(!rows.is_empty())
        .execute(&mut **tx)
        .await
        .map_err(query_error("updating the agent"))?;
    let assignments = rows
        .into_iter()
        .map(|r| {
            Ok(Assignment {
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
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((assignments, role_emptied))
}

async fn commit(tx: Tx, doing: &'static str) -> Result<(), StoreError> {
    tx.commit().await.map_err(query_error(doing))
}

/// Insert events, one statement for all of them.
async fn events(tx: &mut Tx, events: &[Value]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(EVENTS)
        .bind(json_text(&events)?)
        .execute(&mut **tx)
        .await
        .map_err(query_error("recording events"))?;
    Ok(())
}

async fn updates(tx: &mut Tx, updates: &[Value]) -> Result<(), StoreError> {
    if updates.is_empty() {
        return Ok(());
    }
    sqlx::query(UPDATES)
        .bind(json_text(&updates)?)
        .execute(&mut **tx)
        .await
        .map_err(query_error("recording task updates"))?;
    Ok(())
}

fn event(event_type: &str, agent: &str, payload: Value) -> Value {
    json!({"type": event_type, "agent": agent, "payload": payload})
}

fn update(id: &str, agent: &str, update_type: &str, message: &str) -> Value {
    json!({"id": id, "agent": agent, "type": update_type, "message": message})
}

/// Why a fenced statement matched nothing: the task is someone else's now, or unknown.
async fn refusal(tx: &mut Tx, id: &str) -> Result<Refusal, StoreError> {
    let found: i64 = sqlx::query_scalar(EXISTS)
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(query_error("looking up a task"))?;
    Ok(if found > 0 {
        Refusal::NotHeld
    } else {
        Refusal::NoTask
    })
}

async fn agent_ended(tx: &mut Tx, agent: &str) -> Result<(), StoreError> {
    sqlx::query(AGENT_ENDED)
        .bind(agent)
        .execute(&mut **tx)
        .await
        .map_err(query_error("updating the agent"))?;
    Ok(())
}

impl SqliteStore {
    /// Run a fenced single-task statement (?1 id, ?2 run lease, ?3 agent, then `extra`), and
    /// on success write the task update and event `record` gives for the changed row.
    async fn end_lease<'q>(
        &self,
        statement: &'static str,
        agent: &str,
        lease: Lease,
        bind: impl FnOnce(
            sqlx::query::QueryAs<'q, Sqlite, TaskRow, sqlx::sqlite::SqliteArguments>,
        )
            -> sqlx::query::QueryAs<'q, Sqlite, TaskRow, sqlx::sqlite::SqliteArguments>,
        record: impl FnOnce(&TaskRow) -> (Option<Value>, Value),
        doing: &'static str,
    ) -> Result<Result<TaskRow, Refusal>, StoreError> {
        let id = lease.id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let query = sqlx::query_as::<_, TaskRow>(statement)
            .bind(id.clone())
            .bind(lease.run_lease)
            .bind(agent.to_owned());
        let row = bind(query)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error(doing))?;
        let Some(row) = row else {
            let refusal = refusal(&mut tx, &id).await?;
            return Ok(Err(refusal));
        };
        let (update, event) = record(&row);
        if let Some(update) = update {
            updates(&mut tx, &[update]).await?;
        }
        events(&mut tx, &[event]).await?;
        agent_ended(&mut tx, agent).await?;
        commit(tx, doing).await?;
        Ok(Ok(row))
    }
}

impl Queue for SqliteStore {
    async fn register(&self, agent: &AgentIdentity, token_hash: &str) -> Result<(), StoreError> {
        let capabilities = json_text(&agent.capabilities)?;
        let mut tx = self.begin().await?;
        sqlx::query(REGISTER_AGENT)
            .bind(&agent.name)
            .bind(&agent.agent_type)
            .bind(capabilities)
            .bind(i64::from(agent.concurrency.max(1)))
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
        commit(tx, "committing a registration").await
    }

    async fn authenticate(&self, token_hash: &str) -> Result<Option<AgentIdentity>, StoreError> {
        // A read, and a write only when `last_seen_at` is stale: most checks take no write lock.
        let row: Option<AgentRow> = sqlx::query_as(AUTHENTICATE)
            .bind(token_hash)
            .bind(format!("-{SEEN_EVERY_SECONDS} seconds"))
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("authenticating an agent"))?;
        let Some(row) = row else { return Ok(None) };
        if row.stale {
            sqlx::query(TOUCH_SESSION)
                .bind(token_hash)
                .execute(self.pool())
                .await
                .map_err(query_error("touching an agent session"))?;
        }
        Ok(Some(AgentIdentity {
            name: row.name,
            agent_type: row.agent_type,
            capabilities: strings(parse_json(row.capabilities.as_deref())?),
            concurrency: u32::try_from(row.concurrency).unwrap_or(1),
        }))
    }

    /// SQLite has one writer, so the claimers are simply served one after another in one
    /// transaction: nothing can take a task between them, and the batch costs one commit.
    async fn claim(
        &self,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> Result<Vec<Vec<Assignment>>, StoreError> {
        if claimers.iter().all(|c| c.max == 0) {
            return Ok(vec![Vec::new(); claimers.len()]);
        }
        let mut tx = self.begin().await?;
        // Claimers are served one after another, so a round of fifty idle agents was a
        // hundred and fifty statements. Agents with no task assigned by name, and a role pool
        // that an earlier claimer of the round emptied, are skipped.
        let names: Vec<&str> = claimers
            .iter()
            .filter(|c| c.agent.name != c.agent.agent_type)
            .map(|c| c.agent.name.as_str())
            .collect();
        let named: std::collections::HashSet<String> = sqlx::query_scalar(NAMED_PENDING)
            .bind(json_text(&names)?)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("looking for tasks assigned by name"))?
            .into_iter()
            .collect();
        let mut emptied: Vec<(&str, &[String])> = Vec::new();
        let mut answers = Vec::with_capacity(claimers.len());
        for claimer in claimers {
            let open = Pools {
                named: named.contains(&claimer.agent.name),
                role: !emptied.contains(&claimer.pool()),
            };
            let (assignments, role_emptied) =
                claim_one(&mut tx, &claimer.agent, claimer.max, policy, open).await?;
            if role_emptied {
                emptied.push(claimer.pool());
            }
            answers.push(assignments);
        }
        commit(tx, "committing a claim").await?;
        Ok(answers)
    }

    async fn heartbeat(
        &self,
        agent: &str,
        leases: &[Lease],
        policy: &LeasePolicy,
    ) -> Result<Vec<LeaseState>, StoreError> {
        let input: Vec<Value> = leases
            .iter()
            .map(|l| json!({"id": l.id.hyphenated().to_string(), "run_lease": l.run_lease}))
            .collect();
        let input = json_text(&input)?;
        let mut tx = self.begin().await?;
        let held: Vec<(String, i64)> = sqlx::query_as(HEARTBEAT)
            .bind(&input)
            .bind(agent)
            .bind(modifier(policy.lease))
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("extending leases"))?;
        let cancelled: Vec<String> = if leases.len() > held.len() {
            sqlx::query_scalar(CANCELLED)
                .bind(&input)
                .fetch_all(&mut *tx)
                .await
                .map_err(query_error("looking up cancelled tasks"))?
        } else {
            Vec::new()
        };
        sqlx::query(AGENT_HEARTBEAT)
            .bind(agent)
            .execute(&mut *tx)
            .await
            .map_err(query_error("updating the agent"))?;
        commit(tx, "committing a heartbeat").await?;
        let held: std::collections::HashSet<(Uuid, i64)> = held
            .iter()
            .map(|(id, run_lease)| Ok((parse_id(id)?, *run_lease)))
            .collect::<Result<_, StoreError>>()?;
        let cancelled: std::collections::HashSet<Uuid> = cancelled
            .iter()
            .map(|id| parse_id(id))
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
        let id = lease.id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let row: Option<TaskRow> = sqlx::query_as(HELD)
            .bind(&id)
            .bind(lease.run_lease)
            .bind(agent)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("recording progress"))?;
        let Some(row) = row else {
            return Ok(Err(refusal(&mut tx, &id).await?));
        };
        updates(&mut tx, &[update(&id, agent, "progress", message)]).await?;
        let payload = with(row.payload(Some(agent)), json!({"message": message}));
        events(&mut tx, &[event("task.progress", agent, payload)]).await?;
        sqlx::query(AGENT_SEEN)
            .bind(agent)
            .execute(&mut *tx)
            .await
            .map_err(query_error("updating the agent"))?;
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
        let (rows, repeats) = completion_rows(completions);
        let mut tx = self.begin().await?;
        let done: Vec<TaskRow> = sqlx::query_as(COMPLETE)
            .bind(json_text(&rows)?)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("completing tasks"))?;
        let done_keys: std::collections::HashSet<(&str, i64)> =
            done.iter().map(|d| (d.id.as_str(), d.run_lease)).collect();
        let (accepted, refused): (Vec<&CompletionRow<'_>>, Vec<&CompletionRow<'_>>) = rows
            .iter()
            .partition(|r| done_keys.contains(&(r.id.as_str(), r.run_lease)));
        let found: std::collections::HashSet<String> = if refused.is_empty() {
            Default::default()
        } else {
            let ids: Vec<&str> = refused.iter().map(|r| r.id.as_str()).collect();
            sqlx::query_scalar::<_, String>(FOUND)
                .bind(json_text(&ids)?)
                .fetch_all(&mut *tx)
                .await
                .map_err(query_error("looking up tasks"))?
                .into_iter()
                .collect()
        };
        if !accepted.is_empty() {
            let task_updates: Vec<Value> = accepted
                .iter()
                .map(|r| update(&r.id, r.agent, "completion", &r.message))
                .collect();
            updates(&mut tx, &task_updates).await?;
            if accepted.iter().any(|r| !r.artifacts.is_empty()) {
                sqlx::query(ARTIFACTS)
                    .bind(json_text(&accepted)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording artifacts"))?;
            }
            let agents: std::collections::HashMap<(&str, i64), &str> = accepted
                .iter()
                .map(|r| ((r.id.as_str(), r.run_lease), r.agent))
                .collect();
            let completed: Vec<Value> = done
                .iter()
                .map(|d| {
                    let agent = agents
                        .get(&(d.id.as_str(), d.run_lease))
                        .copied()
                        .unwrap_or_default();
                    let kind = match d.status.as_str() {
                        "review" => "task.review",
                        _ => "task.completed",
                    };
                    event(kind, agent, d.payload(Some(agent)))
                })
                .collect();
            events(&mut tx, &completed).await?;
        }
        let mut reporting: Vec<&str> = rows.iter().map(|r| r.agent).collect();
        reporting.sort_unstable();
        reporting.dedup();
        for agent in reporting {
            agent_ended(&mut tx, agent).await?;
        }
        commit(tx, "committing completions").await?;

        let mut sent = vec![None; completions.len()];
        for r in &accepted {
            sent[r.i] = Some(Ok(()));
        }
        for r in &refused {
            sent[r.i] = Some(Err(if found.contains(&r.id) {
                Refusal::NotHeld
            } else {
                Refusal::NoTask
            }));
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
        let answer = self
            .end_lease(
                FAIL,
                agent,
                lease,
                |q| {
                    q.bind(retryable)
                        .bind(error.to_owned())
                        .bind(base)
                        .bind(max)
                },
                |row| {
                    let retry = row.status == "pending";
                    let mut payload = row.payload(Some(agent));
                    let not_before = if retry { row.not_before.clone() } else { None };
                    if retry {
                        // The payload names the attempt that failed, not the next one.
                        payload["attempt"] = json!(row.attempt - 1);
                    }
                    let payload = with(
                        payload,
                        json!({"error": error, "retryable": retryable, "not_before": not_before}),
                    );
                    let event_type = if retry {
                        "task.retrying"
                    } else {
                        "task.failed"
                    };
                    (
                        Some(update(&row.id, agent, "error", error)),
                        event(event_type, agent, payload),
                    )
                },
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
        let answer = self
            .end_lease(
                QUESTION,
                agent,
                lease,
                |q| q.bind(question.to_owned()),
                |row| {
                    let payload = with(row.payload(Some(agent)), json!({"question": question}));
                    (
                        Some(update(&row.id, agent, "question", question)),
                        event("task.question", agent, payload),
                    )
                },
                "recording a question",
            )
            .await?;
        Ok(answer.map(|_| ()))
    }

    async fn release(&self, agent: &str, lease: Lease) -> Result<Result<(), Refusal>, StoreError> {
        let answer = self
            .end_lease(
                RELEASE,
                agent,
                lease,
                |q| q,
                |row| {
                    (
                        None,
                        event("task.released", agent, row.payload(Some(agent))),
                    )
                },
                "releasing a task",
            )
            .await?;
        Ok(answer.map(|_| ()))
    }

    async fn expire_leases(&self, policy: &LeasePolicy) -> Result<Expired, StoreError> {
        let (base, max) = backoff_params(policy);
        let mut tx = self.begin().await?;
        let old: Vec<(String, Option<String>, i64)> = sqlx::query_as(EXPIRED)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("finding expired leases"))?;
        if old.is_empty() {
            return Ok(Expired::default());
        }
        let ids: Vec<&str> = old.iter().map(|(id, _, _)| id.as_str()).collect();
        let mut rows: Vec<TaskRow> = sqlx::query_as(EXPIRE)
            .bind(json_text(&ids)?)
            .bind(base)
            .bind(max)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("expiring leases"))?;
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        let holders: std::collections::HashMap<&str, (Option<&str>, i64)> = old
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
            let event_type = if retry {
                "task.lease_expired"
            } else {
                "task.failed"
            };
            expired_events.push(event(event_type, "controller", payload));
            task_updates.push(update(
                &row.id,
                owner.unwrap_or("controller"),
                "error",
                error,
            ));
            let id = parse_id(&row.id)?;
            if retry {
                expired.retried.push(id);
            } else {
                expired.failed.push(id);
            }
        }
        updates(&mut tx, &task_updates).await?;
        events(&mut tx, &expired_events).await?;
        commit(tx, "committing expired leases").await?;
        Ok(expired)
    }

    async fn block_dependents(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let blocked: Vec<BlockedRow> = sqlx::query_as(BLOCK)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("blocking dependents of failed tasks"))?;
        if blocked.is_empty() {
            return Ok(0);
        }
        let blocked_events: Vec<Value> = blocked
            .iter()
            .map(|b| {
                event(
                    "task.blocked",
                    "controller",
                    json!({
                        "id": b.id,
                        "project": b.project,
                        "name": b.name,
                        "message": b.status_message,
                    }),
                )
            })
            .collect();
        events(&mut tx, &blocked_events).await?;
        commit(tx, "committing blocked tasks").await?;
        Ok(blocked.len() as u64)
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

/// ?1 after which entry, ?2 how many. An entry whose event is gone comes with an empty
/// event.
const UNPUBLISHED: &str = "\
    SELECT o.seq, e.id, e.event_type, e.source_agent, e.target_agent, e.payload, e.created_at \
    FROM (SELECT seq, event_id FROM event_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2) o \
    LEFT JOIN events e ON e.id = o.event_id ORDER BY o.seq";

/// ?1 outbox entries as a JSON array.
const MARK_PUBLISHED: &str =
    "DELETE FROM event_outbox WHERE seq IN (SELECT value FROM json_each(?1))";

/// ?1 how many per pool.
///
/// As on Postgres: the pools by a loose scan of `idx_tasks_pending_assignee`, then each pool's
/// first ready tasks in claim order, so the cost does not grow with the length of the queue.
const READY_TASKS: &str = concat!(
    "WITH RECURSIVE pools(pool) AS ( \
         SELECT (SELECT min(x.assignee) FROM tasks x WHERE x.status = 'pending') \
         UNION ALL \
         SELECT (SELECT min(x.assignee) FROM tasks x WHERE x.status = 'pending' \
             AND x.assignee > p.pool) FROM pools p WHERE p.pool IS NOT NULL) \
     SELECT p.pool, r.id, r.run_lease FROM pools p JOIN tasks r ON r.id IN ( \
         SELECT t.id FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = p.pool ORDER BY t.priority DESC NULLS LAST, t.created_at LIMIT ?1) \
     WHERE p.pool IS NOT NULL \
     ORDER BY p.pool, r.priority DESC NULLS LAST, r.created_at"
);

const AGENT_LIVENESS: &str = "\
    SELECT name, status, pruned_at IS NOT NULL AS pruned, \
        CAST((julianday('now') - julianday(last_active_at)) * 86400000 AS INTEGER) AS seen_ms_ago \
    FROM agents WHERE status IN ('idle', 'busy', 'offline') ORDER BY name";

/// ?1 names as a JSON array, ?2 the staleness as a modifier (`-30.000 seconds`).
const MARK_OFFLINE: &str = "\
    UPDATE agents SET status = 'offline' \
    WHERE name IN (SELECT value FROM json_each(?1)) AND status IN ('idle', 'busy') \
    AND last_active_at IS NOT NULL \
    AND last_active_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2) \
    RETURNING name";

/// ?1 names as a JSON array, ?2 how recently the store must have seen them, as a modifier.
const MARK_ONLINE: &str = "\
    UPDATE agents SET status = CASE WHEN EXISTS (SELECT 1 FROM tasks h \
        WHERE h.status = 'in_progress' AND h.lease_owner = agents.name) THEN 'busy' ELSE 'idle' END \
    WHERE name IN (SELECT value FROM json_each(?1)) AND status = 'offline' \
    AND pruned_at IS NULL \
    AND last_active_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2) \
    RETURNING name";

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

/// A duration back from now as an SQLite date modifier: `-12.345 seconds`.
fn modifier_back(duration: std::time::Duration) -> String {
    let ms = millis(duration);
    format!("-{}.{:03} seconds", ms / 1000, ms % 1000)
}

impl SqliteStore {
    /// Run an agent status change that returns the names it changed, and record `event_type`
    /// for each, in one transaction.
    async fn agent_status_change(
        &self,
        statement: &'static str,
        names: &[String],
        modifier: String,
        event_type: &'static str,
        doing: &'static str,
    ) -> Result<Vec<String>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let mut changed: Vec<String> = sqlx::query_scalar(statement)
            .bind(json_text(&names)?)
            .bind(modifier)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error(doing))?;
        changed.sort();
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
        events(&mut tx, &recorded).await?;
        commit(tx, doing).await?;
        Ok(changed)
    }
}

impl Outbox for SqliteStore {
    async fn unpublished_events(&self, after: i64, limit: u32) -> Result<OutboxBatch, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(UNPUBLISHED)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading unpublished events"))?;
        let mut batch = OutboxBatch::default();
        for r in rows {
            batch.entries.push(r.seq);
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
        let done = sqlx::query(MARK_PUBLISHED)
            .bind(json_text(&entries)?)
            .execute(self.pool())
            .await
            .map_err(query_error("clearing published events from the outbox"))?;
        Ok(done.rows_affected())
    }

    async fn ready_tasks(&self, per_pool: u32) -> Result<Vec<ReadyTask>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(READY_TASKS)
            .bind(i64::from(per_pool))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("listing ready tasks"))?;
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

impl Liveness for SqliteStore {
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
        self.agent_status_change(
            MARK_OFFLINE,
            names,
            modifier_back(stale_after),
            "agent.offline",
            "marking agents offline",
        )
        .await
    }

    async fn mark_online(
        &self,
        names: &[String],
        fresh_within: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        self.agent_status_change(
            MARK_ONLINE,
            names,
            modifier_back(fresh_within),
            "agent.online",
            "marking agents online",
        )
        .await
    }
}
