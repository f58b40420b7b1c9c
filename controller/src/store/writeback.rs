//! What write-back needs from the store: the rows status files are rendered from, the task a
//! result is committed for, and the tasks whose output waits for review (and what becomes of
//! them when it is merged or closed).
//!
//! Written once for both backends: each statement is a template whose few dialect-specific
//! spellings (`{now}`, `{id:1}`, …) the store's [`Dialect`](super::sql::Dialect) fills in, and
//! ids cross as text on both.

use std::future::Future;

use serde_json::{Value, json};

use super::StoreError;
use super::db::{Backend, Conn, Db, args, commit, rows_on, run_on};
use super::queue::{FailOutcome, LeasePolicy, millis};
use super::queue_db::{TaskRow, event, events, parse_id, update, updates};
use super::sql::statements;

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

/// An agent of a source as its resource's status shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StatusAgent {
    pub name: String,
    /// `idle`, `busy`, `offline` or `error`.
    pub status: String,
    pub last_seen: Option<String>,
    /// Tasks it holds a lease on now.
    pub running: i64,
}

/// A tool of a source as its resource's status shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StatusTool {
    pub name: String,
    pub usage_count: i64,
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

    /// The live agents and tools of `source`, for their resources' status.
    fn agents_and_tools(
        &self,
        source: &str,
    ) -> impl Future<Output = Result<(Vec<StatusAgent>, Vec<StatusTool>), StoreError>> + Send;

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

statements! {
    /// Every statement of [`Writeback`].
    Statements {
        status_revision = "SELECT revision FROM sync_sources WHERE name = $1",
        status_projects = "SELECT name, status, status_message FROM projects \
            WHERE source = $1 AND pruned_at IS NULL AND name IS NOT NULL ORDER BY name",
        status_tasks = "SELECT {text:t.id} AS id, p.name AS project, t.name, t.title, \
            t.status, COALESCE(t.lease_owner, t.assigned_to) AS agent, CAST(t.attempt AS bigint) AS attempt, \
            {ts:t.started_at} AS started_at, {ts:t.completed_at} AS completed_at, \
            t.status_message, t.error, {text:t.result} AS result \
            FROM tasks t JOIN projects p ON p.id = t.project_id \
            WHERE p.source = $1 AND p.pruned_at IS NULL AND t.pruned_at IS NULL AND t.name IS NOT NULL \
            ORDER BY p.name, t.name",
        status_agents = "SELECT a.name, a.status, {ts:a.last_active_at} AS last_seen, \
            CAST((SELECT count(*) FROM tasks t WHERE t.lease_owner = a.name \
            AND t.status = 'in_progress') AS bigint) AS running \
            FROM agents a WHERE a.source = $1 AND a.pruned_at IS NULL ORDER BY a.name",
        status_tools = "SELECT name, CAST(COALESCE(usage_count, 0) AS bigint) AS usage_count \
            FROM tools WHERE source = $1 AND pruned_at IS NULL ORDER BY name",
        status_artifacts = "SELECT {text:a.task_id} AS task_id, a.name, a.artifact_type, \
            a.s3_key AS key FROM artifacts a JOIN tasks t ON t.id = a.task_id \
            JOIN projects p ON p.id = t.project_id \
            WHERE p.source = $1 AND p.pruned_at IS NULL AND t.pruned_at IS NULL \
            ORDER BY a.task_id, a.created_at, a.name",
        result_task = "SELECT p.name AS project, t.name, CAST(t.attempt AS bigint) AS attempt, \
            {text:t.output} AS output, t.dispatch_revision \
            FROM tasks t JOIN projects p ON p.id = t.project_id \
            WHERE t.id = {id:1} AND t.run_lease = $2 AND t.lease_owner = $3 AND t.status = 'in_progress'",
        in_review = "SELECT {text:t.id} AS id, p.name AS project, \
            COALESCE(t.name, '') AS name, t.title, CAST(t.attempt AS bigint) AS attempt, \
            t.assigned_to AS agent, {text:t.result} AS result \
            FROM tasks t JOIN projects p ON p.id = t.project_id \
            WHERE t.status = 'review' ORDER BY p.name, t.name, t.id",
        set_result = "UPDATE tasks SET result = {json:2} WHERE id = {id:1} AND status = 'review'",
        review_row = "SELECT {text:t.id} AS id, p.name AS project, COALESCE(t.name, '') AS name, \
            CAST(t.attempt AS bigint) AS attempt, CAST(t.retries AS bigint) AS retries, \
            CAST(t.run_lease AS bigint) AS run_lease, t.status, {time:t.not_before} AS not_before, \
            t.assigned_to AS agent, {text:t.result} AS result \
            FROM tasks t JOIN projects p ON p.id = t.project_id \
            WHERE t.id = {id:1} AND t.status = 'review' {lock}",
        merged = "UPDATE tasks SET status = 'completed', completed_at = {now}, status_message = NULL \
            WHERE id = {id:1} AND status = 'review'",
        /// $2 retry?, $3/$6 the backoff base/cap (ms), $4 the error, $5 the review's comments (NULL
        /// if none).
        closed = "UPDATE tasks SET \
            status = CASE WHEN $2 THEN 'pending' ELSE 'failed' END, \
            attempt = CASE WHEN $2 THEN attempt + 1 ELSE attempt END, \
            not_before = CASE WHEN $2 THEN {backoff:attempt,3,6} ELSE not_before END, \
            completed_at = CASE WHEN $2 THEN completed_at ELSE {now} END, \
            assigned_to = CASE WHEN $2 THEN assignee ELSE assigned_to END, \
            error = $4, status_message = $4, review_comments = $5 \
            WHERE id = {id:1} AND status = 'review'",
    }
}

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
    #[sqlx(flatten)]
    task: TaskRow,
    retries: i64,
    agent: Option<String>,
    result: Option<String>,
}

impl ReviewRow {
    fn payload(&self) -> Value {
        self.task.payload(self.agent.as_deref())
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

impl<B: Backend> Writeback for Db<B> {
    async fn status_snapshot(&self, source: &str) -> Result<StatusSnapshot, StoreError> {
        let sql = &self.sql.writeback;
        let args = args![source];
        let revision: Option<(Option<String>,)> = self
            .row(&sql.status_revision, args, "reading the synced revision")
            .await?;
        Ok(StatusSnapshot {
            revision: revision.and_then(|(r,)| r),
            projects: self
                .rows(&sql.status_projects, args, "reading projects for status")
                .await?,
            tasks: self
                .rows(&sql.status_tasks, args, "reading tasks for status")
                .await?,
            artifacts: self
                .rows(&sql.status_artifacts, args, "reading artifacts for status")
                .await?,
        })
    }

    async fn agents_and_tools(
        &self,
        source: &str,
    ) -> Result<(Vec<StatusAgent>, Vec<StatusTool>), StoreError> {
        let sql = &self.sql.writeback;
        let args = args![source];
        Ok((
            self.rows(&sql.status_agents, args, "reading agents for status")
                .await?,
            self.rows(&sql.status_tools, args, "reading tools for status")
                .await?,
        ))
    }

    async fn record_event(&self, event_type: &str, payload: &Value) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let recorded = [event(event_type, "controller", payload.clone())];
        events(self, &mut conn, &recorded).await
    }

    async fn result_task(
        &self,
        id: uuid::Uuid,
        run_lease: i64,
        agent: &str,
    ) -> Result<Option<ResultTask>, StoreError> {
        let id = id.hyphenated().to_string();
        let args = args![&id, run_lease, agent];
        let row: Option<ResultTaskRow> = self
            .row(
                &self.sql.writeback.result_task,
                args,
                "reading the task of a result",
            )
            .await?;
        Ok(row.map(|r| ResultTask {
            project: r.project,
            name: r.name.unwrap_or_default(),
            attempt: r.attempt,
            output: parse_json(r.output.as_deref()),
            dispatch_revision: r.dispatch_revision,
        }))
    }

    async fn tasks_in_review(&self) -> Result<Vec<ReviewTask>, StoreError> {
        let rows: Vec<InReviewRow> = self
            .rows(
                &self.sql.writeback.in_review,
                args![],
                "listing tasks in review",
            )
            .await?;
        rows.into_iter().map(review_task).collect()
    }

    async fn set_pull_request(
        &self,
        id: uuid::Uuid,
        pull_request: &Value,
    ) -> Result<bool, StoreError> {
        let sql = &self.sql.writeback;
        let id_text = id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let Some(row) = review_row::<B>(&mut tx, sql, &id_text).await? else {
            return Ok(false);
        };
        let mut result = parse_json(row.result.as_deref());
        if !result.is_object() {
            result = json!({});
        }
        if !result["output"].is_object() {
            result["output"] = json!({});
        }
        result["output"]["pull_request"] = pull_request.clone();
        let result = result.to_string();
        let doing = "recording a pull request";
        run_on::<B>(&mut tx, &sql.set_result, args![&id_text, &result], doing).await?;
        let mut payload = row.payload();
        payload["pull_request"] = pull_request.clone();
        event_on(self, &mut tx, "task.pull_request", payload).await?;
        commit(tx, "committing a pull request").await?;
        Ok(true)
    }

    async fn review_merged(&self, id: uuid::Uuid, how: &str) -> Result<bool, StoreError> {
        let sql = &self.sql.writeback;
        let id_text = id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let Some(row) = review_row::<B>(&mut tx, sql, &id_text).await? else {
            return Ok(false);
        };
        let doing = "completing a merged task";
        run_on::<B>(&mut tx, &sql.merged, args![&id_text], doing).await?;
        let message = format!("output merged: {how}");
        update_on(self, &mut tx, &row, "completion", &message).await?;
        let mut payload = row.payload();
        payload["merged"] = json!(how);
        payload["output"] = row.output();
        event_on(self, &mut tx, "task.completed", payload).await?;
        commit(tx, "committing a merge").await?;
        Ok(true)
    }

    async fn review_closed(
        &self,
        id: uuid::Uuid,
        comments: &str,
        policy: &LeasePolicy,
    ) -> Result<Option<Rejected>, StoreError> {
        let sql = &self.sql.writeback;
        let id_text = id.hyphenated().to_string();
        let mut tx = self.begin().await?;
        let Some(row) = review_row::<B>(&mut tx, sql, &id_text).await? else {
            return Ok(None);
        };
        let retry = row.task.attempt < row.retries;
        let error = if retry {
            "output rejected in review; retrying"
        } else {
            "output rejected in review; retries spent"
        };
        let comments_kept = Some(comments.trim()).filter(|c| !c.is_empty());
        let (base, max) = (millis(policy.backoff_base), millis(policy.backoff_max));
        let args = args![&id_text, retry, base, error, comments_kept, max];
        run_on::<B>(&mut tx, &sql.closed, args, "ending a rejected review").await?;
        update_on(self, &mut tx, &row, "info", &rejection_message(comments)).await?;
        let mut payload = row.payload();
        payload["output"] = row.output();
        payload["comments"] = json!(comments);
        if !retry {
            payload["error"] = json!(error);
        }
        let kind = if retry {
            "task.rejected"
        } else {
            "task.failed"
        };
        event_on(self, &mut tx, kind, payload).await?;
        commit(tx, "committing a rejection").await?;
        Ok(Some(if retry {
            Rejected::Retry
        } else {
            Rejected::Failed
        }))
    }
}

/// The task `id` if it is in review, locked where rows can be.
async fn review_row<B: Backend>(
    conn: &mut B::Connection,
    sql: &'static Statements,
    id: &str,
) -> Result<Option<ReviewRow>, StoreError> {
    let doing = "reading a task in review";
    let rows: Vec<ReviewRow> = rows_on::<B, _>(conn, &sql.review_row, args![id], doing).await?;
    Ok(rows.into_iter().next())
}

/// A task update for `row`, in the name of the agent that holds it (or the controller).
async fn update_on<B: Backend>(
    db: &Db<B>,
    conn: &mut Conn<B>,
    row: &ReviewRow,
    kind: &str,
    message: &str,
) -> Result<(), StoreError> {
    let agent = row.agent.as_deref().unwrap_or("controller");
    updates(db, conn, &[update(&row.task.id, agent, kind, message)]).await
}

async fn event_on<B: Backend>(
    db: &Db<B>,
    conn: &mut Conn<B>,
    kind: &str,
    payload: Value,
) -> Result<(), StoreError> {
    events(db, conn, &[event(kind, "controller", payload)]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_message_says_when_there_are_no_comments() {
        assert_eq!(rejection_message("  "), "review: closed without merging");
        assert!(rejection_message("too long").ends_with("comments:\ntoo long"));
    }
}
