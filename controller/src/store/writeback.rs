//! What write-back needs from the store: the rows status files are rendered from, the task a
//! result is committed for, and the tasks whose output waits for review (and what becomes of
//! them when it is merged or closed).
//!
//! Written once for both backends: each statement is a template whose few dialect-specific
//! spellings (`{now}`, `{id1}`, …) [`spell`] fills in, and ids cross as text on both.

use std::future::Future;

use serde_json::{Value, json};

use super::queue::{FailOutcome, LeasePolicy, millis};
use super::{PgStore, SqliteStore, StoreError, query_error};

/// A project as its status file shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, sqlx::FromRow)]
pub struct StatusProject {
    pub name: String,
    pub status: String,
    pub status_message: Option<String>,
}

/// A task as its project's status file shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, sqlx::FromRow)]
pub struct StatusTask {
    pub id: String,
    pub project: String,
    pub name: String,
    pub title: String,
    pub status: String,
    pub agent: Option<String>,
    pub attempt: i64,
    /// RFC 3339, whole seconds, UTC.
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub status_message: Option<String>,
    pub error: Option<String>,
    /// The task's `result` as JSON text.
    pub result: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, sqlx::FromRow)]
pub struct StatusArtifact {
    pub task_id: String,
    pub name: String,
    pub artifact_type: String,
    pub key: String,
}

/// Everything the status files of one source are rendered from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusSnapshot {
    /// The source revision last synced: the `Agentops-Revision:` trailer.
    pub revision: Option<String>,
    pub projects: Vec<StatusProject>,
    /// Ordered by project, then name.
    pub tasks: Vec<StatusTask>,
    pub artifacts: Vec<StatusArtifact>,
}

/// The task a result is committed for, read under its lease.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultTask {
    pub project: String,
    pub name: String,
    pub attempt: i64,
    /// The task's `output` spec (`{mode, paths}`), `null` when it has none.
    pub output: Value,
    /// `<branch>@sha1:<commit>` the task was dispatched at.
    pub dispatch_revision: Option<String>,
}

/// A task in `review`: its output is on a branch (and maybe a pull request) awaiting a person.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewTask {
    pub id: uuid::Uuid,
    pub project: String,
    pub name: String,
    pub title: String,
    pub attempt: i64,
    pub agent: Option<String>,
    /// `result.output.branch`.
    pub branch: Option<String>,
    /// `result.output.commit`.
    pub commit: Option<String>,
    /// `result.output.pull_request.number`, once one was opened.
    pub pull_request: Option<u64>,
    pub result: Value,
}

/// What closing a task's review did to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Ready again with attempt + 1 after the backoff.
    Retry,
    /// Retries spent.
    Failed,
}

impl From<Rejected> for FailOutcome {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::Retry => FailOutcome::Retry,
            Rejected::Failed => FailOutcome::Failed,
        }
    }
}

pub trait Writeback: Send + Sync + 'static {
    /// The rows of every live project of `source` and its live tasks.
    fn status_snapshot(
        &self,
        source: &str,
    ) -> impl Future<Output = Result<StatusSnapshot, StoreError>> + Send;

    /// Record a controller event (`events` row), e.g. a push that was refused.
    fn record_event(
        &self,
        event_type: &str,
        payload: &Value,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The task `id` if `agent` holds it under `run_lease`.
    fn result_task(
        &self,
        id: uuid::Uuid,
        run_lease: i64,
        agent: &str,
    ) -> impl Future<Output = Result<Option<ResultTask>, StoreError>> + Send;

    fn tasks_in_review(&self) -> impl Future<Output = Result<Vec<ReviewTask>, StoreError>> + Send;

    /// Record the pull request opened (or found) for a task in review.
    fn set_pull_request(
        &self,
        id: uuid::Uuid,
        pull_request: &Value,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The output was merged: `review` → `completed`, with a `completion` task update and a
    /// `task.completed` event. False when the task was no longer in review.
    fn review_merged(
        &self,
        id: uuid::Uuid,
        how: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The output was closed without merging: the review comments become an `info` task
    /// update, and the task is retried (attempt + 1, after the backoff) or, with its retries
    /// spent, `failed`. `None` when the task was no longer in review.
    fn review_closed(
        &self,
        id: uuid::Uuid,
        comments: &str,
        policy: &LeasePolicy,
    ) -> impl Future<Output = Result<Option<Rejected>, StoreError>> + Send;
}

/// Fill in a template's dialect-specific spellings:
/// `{now}`, `{idN}` (text parameter N as a task id), `{jsonN}` (text parameter N as JSON),
/// `{afterN}` (now plus parameter N milliseconds), `{ts:COL}` (a timestamp as RFC 3339 text),
/// `{text:COL}` (a uuid or JSON column as text) and `{lock}` (row lock on Postgres), and
/// `$N` as `?N` on SQLite.
fn spell(pg: bool, template: &str) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').expect("a closed token");
        let token = &rest[start + 1..end];
        let param = |prefix: &str| token.strip_prefix(prefix).map(str::to_owned);
        let spelled = if token == "now" {
            if pg {
                "now()".to_owned()
            } else {
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')".to_owned()
            }
        } else if token == "lock" {
            if pg { "FOR UPDATE" } else { "" }.to_owned()
        } else if let Some(col) = param("ts:") {
            if pg {
                format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
            } else {
                format!("strftime('%Y-%m-%dT%H:%M:%SZ', {col})")
            }
        } else if let Some(col) = param("text:") {
            if pg {
                format!("CAST({col} AS text)")
            } else {
                col
            }
        } else if let Some(n) = param("id") {
            if pg {
                format!("CAST(CAST(${n} AS text) AS uuid)")
            } else {
                format!("?{n}")
            }
        } else if let Some(n) = param("json") {
            if pg {
                format!("CAST(${n} AS text)::jsonb")
            } else {
                format!("?{n}")
            }
        } else if let Some(n) = param("after") {
            if pg {
                format!("now() + CAST(${n} AS bigint) * interval '1 millisecond'")
            } else {
                format!(
                    "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('+%.3f seconds', ?{n} / 1000.0))"
                )
            }
        } else {
            panic!("unknown template token {{{token}}}");
        };
        out.push_str(&spelled);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    if pg {
        out
    } else {
        super::sql::SQLITE.sql(&out)
    }
}

const STATUS_REVISION: &str = "SELECT revision FROM sync_sources WHERE name = $1";

const STATUS_PROJECTS: &str = "SELECT name, status, status_message FROM projects \
    WHERE source = $1 AND pruned_at IS NULL AND name IS NOT NULL ORDER BY name";

const STATUS_TASKS: &str = "SELECT {text:t.id} AS id, p.name AS project, t.name, t.title, \
    t.status, COALESCE(t.lease_owner, t.assigned_to) AS agent, CAST(t.attempt AS bigint) AS attempt, \
    {ts:t.started_at} AS started_at, {ts:t.completed_at} AS completed_at, \
    t.status_message, t.error, {text:t.result} AS result \
    FROM tasks t JOIN projects p ON p.id = t.project_id \
    WHERE p.source = $1 AND p.pruned_at IS NULL AND t.pruned_at IS NULL AND t.name IS NOT NULL \
    ORDER BY p.name, t.name";

const STATUS_ARTIFACTS: &str = "SELECT {text:a.task_id} AS task_id, a.name, a.artifact_type, \
    a.s3_key AS key FROM artifacts a JOIN tasks t ON t.id = a.task_id \
    JOIN projects p ON p.id = t.project_id \
    WHERE p.source = $1 AND p.pruned_at IS NULL AND t.pruned_at IS NULL \
    ORDER BY a.task_id, a.created_at, a.name";

const RECORD_EVENT: &str = "INSERT INTO events (event_type, source_agent, payload) \
    VALUES ($1, 'controller', {json2})";

const RESULT_TASK: &str = "SELECT p.name AS project, t.name, CAST(t.attempt AS bigint) AS attempt, \
    {text:t.output} AS output, t.dispatch_revision \
    FROM tasks t JOIN projects p ON p.id = t.project_id \
    WHERE t.id = {id1} AND t.run_lease = $2 AND t.lease_owner = $3 AND t.status = 'in_progress'";

const IN_REVIEW: &str = "SELECT {text:t.id} AS id, p.name AS project, \
    COALESCE(t.name, '') AS name, t.title, CAST(t.attempt AS bigint) AS attempt, \
    t.assigned_to AS agent, {text:t.result} AS result \
    FROM tasks t JOIN projects p ON p.id = t.project_id \
    WHERE t.status = 'review' ORDER BY p.name, t.name, t.id";

const SET_RESULT: &str = "UPDATE tasks SET result = {json2} WHERE id = {id1} AND status = 'review'";

const REVIEW_ROW: &str = "SELECT {text:t.id} AS id, p.name AS project, COALESCE(t.name, '') AS name, \
    CAST(t.attempt AS bigint) AS attempt, CAST(t.retries AS bigint) AS retries, \
    CAST(t.run_lease AS bigint) AS run_lease, t.assigned_to AS agent, {text:t.result} AS result \
    FROM tasks t JOIN projects p ON p.id = t.project_id \
    WHERE t.id = {id1} AND t.status = 'review' {lock}";

const MERGED: &str = "UPDATE tasks SET status = 'completed', completed_at = {now}, status_message = NULL \
    WHERE id = {id1} AND status = 'review'";

/// $2 retry?, $3 the backoff (ms), $4 the error, $5 the review's comments (NULL if none).
const CLOSED: &str = "UPDATE tasks SET \
    status = CASE WHEN $2 THEN 'pending' ELSE 'failed' END, \
    attempt = CASE WHEN $2 THEN attempt + 1 ELSE attempt END, \
    not_before = CASE WHEN $2 THEN {after3} ELSE not_before END, \
    completed_at = CASE WHEN $2 THEN completed_at ELSE {now} END, \
    assigned_to = CASE WHEN $2 THEN assignee ELSE assigned_to END, \
    error = $4, status_message = $4, review_comments = $5 \
    WHERE id = {id1} AND status = 'review'";

const UPDATE: &str = "INSERT INTO task_updates (task_id, agent_name, update_type, message) \
    VALUES ({id1}, $2, $3, $4)";

const EVENT: &str = "INSERT INTO events (event_type, source_agent, payload) \
    VALUES ($1, $2, {json3})";

/// Every statement, spelled for one backend.
struct Statements {
    status_revision: String,
    status_projects: String,
    status_tasks: String,
    status_artifacts: String,
    record_event: String,
    result_task: String,
    in_review: String,
    set_result: String,
    review_row: String,
    merged: String,
    closed: String,
    update: String,
    event: String,
}

impl Statements {
    fn new(pg: bool) -> Statements {
        Statements {
            status_revision: spell(pg, STATUS_REVISION),
            status_projects: spell(pg, STATUS_PROJECTS),
            status_tasks: spell(pg, STATUS_TASKS),
            status_artifacts: spell(pg, STATUS_ARTIFACTS),
            record_event: spell(pg, RECORD_EVENT),
            result_task: spell(pg, RESULT_TASK),
            in_review: spell(pg, IN_REVIEW),
            set_result: spell(pg, SET_RESULT),
            review_row: spell(pg, REVIEW_ROW),
            merged: spell(pg, MERGED),
            closed: spell(pg, CLOSED),
            update: spell(pg, UPDATE),
            event: spell(pg, EVENT),
        }
    }
}

static PG: std::sync::LazyLock<Statements> = std::sync::LazyLock::new(|| Statements::new(true));
static LITE: std::sync::LazyLock<Statements> = std::sync::LazyLock::new(|| Statements::new(false));

#[derive(sqlx::FromRow)]
struct ResultTaskRow {
    project: String,
    name: Option<String>,
    attempt: i64,
    output: Option<String>,
    dispatch_revision: Option<String>,
}

#[derive(sqlx::FromRow)]
struct InReviewRow {
    id: String,
    project: String,
    name: String,
    title: String,
    attempt: i64,
    agent: Option<String>,
    result: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ReviewRow {
    id: String,
    project: String,
    name: String,
    attempt: i64,
    retries: i64,
    run_lease: i64,
    agent: Option<String>,
    result: Option<String>,
}

impl ReviewRow {
    fn payload(&self) -> Value {
        json!({
            "id": self.id,
            "project": self.project,
            "name": self.name,
            "agent": self.agent,
            "run_lease": self.run_lease,
            "attempt": self.attempt,
        })
    }

    fn output(&self) -> Value {
        parse_json(self.result.as_deref())
            .get("output")
            .cloned()
            .unwrap_or(Value::Null)
    }
}

fn parse_json(text: Option<&str>) -> Value {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

fn parse_id(id: &str) -> Result<uuid::Uuid, StoreError> {
    id.parse()
        .map_err(|_| StoreError::Corrupt(format!("task id `{id}` is not a uuid")))
}

fn json_text(value: &Value) -> String {
    value.to_string()
}

fn review_task(row: InReviewRow) -> Result<ReviewTask, StoreError> {
    let result = parse_json(row.result.as_deref());
    let output = result.get("output");
    let text = |key: &str| {
        output
            .and_then(|o| o.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(ReviewTask {
        id: parse_id(&row.id)?,
        project: row.project,
        name: row.name,
        title: row.title,
        attempt: row.attempt,
        agent: row.agent,
        branch: text("branch"),
        commit: text("commit"),
        pull_request: output
            .and_then(|o| o.get("pull_request"))
            .and_then(|p| p.get("number"))
            .and_then(Value::as_u64),
        result,
    })
}

/// The message of the task update that records a rejection.
fn rejection_message(comments: &str) -> String {
    if comments.trim().is_empty() {
        "review: closed without merging".to_owned()
    } else {
        format!(
            "review: closed without merging; comments:\n{}",
            comments.trim()
        )
    }
}

/// One implementation for both backends: the pool type, its transaction opener and its
/// statements differ, the code does not.
macro_rules! writeback_impl {
    ($store:ty, $sql:expr, $begin:literal) => {
        impl Writeback for $store {
            async fn status_snapshot(&self, source: &str) -> Result<StatusSnapshot, StoreError> {
                let sql = &*$sql;
                let revision: Option<Option<String>> =
                    sqlx::query_scalar(sql.status_revision.as_str())
                        .bind(source)
                        .fetch_optional(self.pool())
                        .await
                        .map_err(query_error("reading the synced revision"))?;
                let projects = sqlx::query_as(sql.status_projects.as_str())
                    .bind(source)
                    .fetch_all(self.pool())
                    .await
                    .map_err(query_error("reading projects for status"))?;
                let tasks = sqlx::query_as(sql.status_tasks.as_str())
                    .bind(source)
                    .fetch_all(self.pool())
                    .await
                    .map_err(query_error("reading tasks for status"))?;
                let artifacts = sqlx::query_as(sql.status_artifacts.as_str())
                    .bind(source)
                    .fetch_all(self.pool())
                    .await
                    .map_err(query_error("reading artifacts for status"))?;
                Ok(StatusSnapshot {
                    revision: revision.flatten(),
                    projects,
                    tasks,
                    artifacts,
                })
            }

            async fn record_event(
                &self,
                event_type: &str,
                payload: &Value,
            ) -> Result<(), StoreError> {
                sqlx::query($sql.record_event.as_str())
                    .bind(event_type)
                    .bind(json_text(payload))
                    .execute(self.pool())
                    .await
                    .map_err(query_error("recording an event"))?;
                Ok(())
            }

            async fn result_task(
                &self,
                id: uuid::Uuid,
                run_lease: i64,
                agent: &str,
            ) -> Result<Option<ResultTask>, StoreError> {
                let row: Option<ResultTaskRow> = sqlx::query_as($sql.result_task.as_str())
                    .bind(id.hyphenated().to_string())
                    .bind(run_lease)
                    .bind(agent)
                    .fetch_optional(self.pool())
                    .await
                    .map_err(query_error("reading the task of a result"))?;
                Ok(row.map(|r| ResultTask {
                    project: r.project,
                    name: r.name.unwrap_or_default(),
                    attempt: r.attempt,
                    output: parse_json(r.output.as_deref()),
                    dispatch_revision: r.dispatch_revision,
                }))
            }

            async fn tasks_in_review(&self) -> Result<Vec<ReviewTask>, StoreError> {
                let rows: Vec<InReviewRow> = sqlx::query_as($sql.in_review.as_str())
                    .fetch_all(self.pool())
                    .await
                    .map_err(query_error("listing tasks in review"))?;
                rows.into_iter().map(review_task).collect()
            }

            async fn set_pull_request(
                &self,
                id: uuid::Uuid,
                pull_request: &Value,
            ) -> Result<bool, StoreError> {
                let sql = &*$sql;
                let id_text = id.hyphenated().to_string();
                let mut tx = self
                    .pool()
                    .begin_with($begin)
                    .await
                    .map_err(query_error("starting a transaction"))?;
                let row: Option<ReviewRow> = sqlx::query_as(sql.review_row.as_str())
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_error("reading a task in review"))?;
                let Some(row) = row else {
                    return Ok(false);
                };
                let mut result = parse_json(row.result.as_deref());
                if !result.is_object() {
                    result = json!({});
                }
                let output = result
                    .as_object_mut()
                    .expect("an object")
                    .entry("output")
                    .or_insert_with(|| json!({}));
                if !output.is_object() {
                    *output = json!({});
                }
                output["pull_request"] = pull_request.clone();
                sqlx::query(sql.set_result.as_str())
                    .bind(&id_text)
                    .bind(json_text(&result))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording a pull request"))?;
                let mut payload = row.payload();
                payload["pull_request"] = pull_request.clone();
                sqlx::query(sql.event.as_str())
                    .bind("task.pull_request")
                    .bind("controller")
                    .bind(json_text(&payload))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording an event"))?;
                tx.commit()
                    .await
                    .map_err(query_error("committing a pull request"))?;
                Ok(true)
            }

            async fn review_merged(&self, id: uuid::Uuid, how: &str) -> Result<bool, StoreError> {
                let sql = &*$sql;
                let id_text = id.hyphenated().to_string();
                let mut tx = self
                    .pool()
                    .begin_with($begin)
                    .await
                    .map_err(query_error("starting a transaction"))?;
                let row: Option<ReviewRow> = sqlx::query_as(sql.review_row.as_str())
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_error("reading a task in review"))?;
                let Some(row) = row else {
                    return Ok(false);
                };
                sqlx::query(sql.merged.as_str())
                    .bind(&id_text)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("completing a merged task"))?;
                let agent = row.agent.clone().unwrap_or_else(|| "controller".to_owned());
                sqlx::query(sql.update.as_str())
                    .bind(&id_text)
                    .bind(&agent)
                    .bind("completion")
                    .bind(format!("output merged: {how}"))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording a task update"))?;
                let mut payload = row.payload();
                payload["merged"] = json!(how);
                payload["output"] = row.output();
                sqlx::query(sql.event.as_str())
                    .bind("task.completed")
                    .bind("controller")
                    .bind(json_text(&payload))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording an event"))?;
                tx.commit()
                    .await
                    .map_err(query_error("committing a merge"))?;
                Ok(true)
            }

            async fn review_closed(
                &self,
                id: uuid::Uuid,
                comments: &str,
                policy: &LeasePolicy,
            ) -> Result<Option<Rejected>, StoreError> {
                let sql = &*$sql;
                let id_text = id.hyphenated().to_string();
                let mut tx = self
                    .pool()
                    .begin_with($begin)
                    .await
                    .map_err(query_error("starting a transaction"))?;
                let row: Option<ReviewRow> = sqlx::query_as(sql.review_row.as_str())
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query_error("reading a task in review"))?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let retry = row.attempt < row.retries;
                let backoff = policy.backoff(i32::try_from(row.attempt).unwrap_or(i32::MAX));
                let error = if retry {
                    "output rejected in review; retrying"
                } else {
                    "output rejected in review; retries spent"
                };
                sqlx::query(sql.closed.as_str())
                    .bind(&id_text)
                    .bind(retry)
                    .bind(millis(backoff))
                    .bind(error)
                    .bind(Some(comments.trim()).filter(|c| !c.is_empty()))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("ending a rejected review"))?;
                let agent = row.agent.clone().unwrap_or_else(|| "controller".to_owned());
                sqlx::query(sql.update.as_str())
                    .bind(&id_text)
                    .bind(&agent)
                    .bind("info")
                    .bind(rejection_message(comments))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording the review comments"))?;
                let mut payload = row.payload();
                payload["output"] = row.output();
                payload["comments"] = json!(comments);
                let kind = if retry {
                    "task.rejected"
                } else {
                    "task.failed"
                };
                if !retry {
                    payload["error"] = json!(error);
                }
                sqlx::query(sql.event.as_str())
                    .bind(kind)
                    .bind("controller")
                    .bind(json_text(&payload))
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("recording an event"))?;
                tx.commit()
                    .await
                    .map_err(query_error("committing a rejection"))?;
                Ok(Some(if retry {
                    Rejected::Retry
                } else {
                    Rejected::Failed
                }))
            }
        }
    };
}

writeback_impl!(PgStore, PG, "BEGIN");
writeback_impl!(SqliteStore, LITE, "BEGIN IMMEDIATE");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spells_tokens_per_backend() {
        assert_eq!(
            spell(true, "WHERE id = {id1} AND x = $2 AND t < {now}"),
            "WHERE id = CAST(CAST($1 AS text) AS uuid) AND x = $2 AND t < now()"
        );
        assert_eq!(
            spell(false, "WHERE id = {id1} AND x = $2 AND t < {now}"),
            "WHERE id = ?1 AND x = ?2 AND t < strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
        );
        assert_eq!(spell(false, "SELECT {text:t.id} {lock}"), "SELECT t.id ");
        assert_eq!(
            spell(true, "SELECT {text:t.id} {lock}"),
            "SELECT CAST(t.id AS text) FOR UPDATE"
        );
    }

    #[test]
    fn rejection_message_says_when_there_are_no_comments() {
        assert_eq!(rejection_message("  "), "review: closed without merging");
        assert!(rejection_message("too long").ends_with("comments:\ntoo long"));
    }
}
