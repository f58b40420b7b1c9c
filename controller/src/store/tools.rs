//! The `tools` table as the Seed uses it: a tool is looked up by name when a task runs it,
//! and every use is counted (`usage_count`, `last_used_at`).

use std::future::Future;

use super::{PgStore, SqliteStore, StoreError, query_error};

/// A pending task that names capabilities, as the search for missing specialists sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedingTask {
    pub assignee: String,
    pub title: String,
    pub description: String,
    pub capabilities: Vec<String>,
}

/// A registered agent: who could take a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub name: String,
    pub agent_type: String,
    pub capabilities: Vec<String>,
}

pub trait ToolRegistry: Send + Sync + 'static {
    /// Tasks `blocked` on a tool that did not exist (the Seed's question) whose tool exists
    /// now go back to `pending`, each with a `task.unblocked` event. Returns how many.
    fn unblock_tool_waiters(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Pending tasks that need capabilities, and every agent that is not pruned: whether some
    /// task has no agent that could ever take it is decided from these (`embedded::gaps`).
    fn capability_needs(
        &self,
    ) -> impl Future<Output = Result<(Vec<NeedingTask>, Vec<Registered>), StoreError>> + Send;

    /// The command of the live tool `name`, counting this use; `None` when there is no such
    /// tool (never synced, or pruned).
    fn use_tool(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Vec<String>>, StoreError>> + Send;
}

const USE_POSTGRES: &str = "\
    UPDATE tools SET usage_count = COALESCE(usage_count, 0) + 1, last_used_at = now() \
    WHERE name = $1 AND pruned_at IS NULL RETURNING implementation";

const USE_SQLITE: &str = "\
    UPDATE tools SET usage_count = COALESCE(usage_count, 0) + 1, \
    last_used_at = strftime('%Y-%m-%dT%H:%M:%fZ','now') \
    WHERE name = ?1 AND pruned_at IS NULL RETURNING implementation";

/// The Seed's question for a missing tool starts "The tool `" (`embedded::Worker::propose_tool`).
/// A sync that re-validates the task (it referred to a tool that did not exist) clears the
/// message, hence also a blocked tool task without one. Should that be a task blocked by a
/// failed dependency, it is not ready (its dependency is not completed) and the sweeper blocks
/// it again.
const UNBLOCK_POSTGRES: &str = "\
    WITH freed AS (UPDATE tasks t SET status = 'pending', status_message = NULL \
        WHERE t.status = 'blocked' AND t.pruned_at IS NULL \
        AND (t.status_message IS NULL OR t.status_message LIKE 'question: The tool `%') \
        AND EXISTS (SELECT 1 FROM tools tl WHERE tl.pruned_at IS NULL \
            AND tl.name = t.action -> 'tool' ->> 'name') \
        RETURNING t.id, t.project_id, t.name), \
    events AS (INSERT INTO events (event_type, source_agent, payload) \
        SELECT 'task.unblocked', 'controller', jsonb_build_object('id', f.id, \
            'project', (SELECT p.name FROM projects p WHERE p.id = f.project_id), \
            'name', f.name, 'reason', 'its tool exists now') FROM freed f) \
    SELECT count(*) FROM freed";

const UNBLOCK_SQLITE: &str = "\
    UPDATE tasks SET status = 'pending', status_message = NULL \
    WHERE status = 'blocked' AND pruned_at IS NULL \
    AND (status_message IS NULL OR status_message LIKE 'question: The tool `%') \
    AND EXISTS (SELECT 1 FROM tools tl WHERE tl.pruned_at IS NULL \
        AND tl.name = json_extract(tasks.action, '$.tool.name')) \
    RETURNING id, (SELECT p.name FROM projects p WHERE p.id = tasks.project_id), name";

const UNBLOCKED_EVENT_SQLITE: &str = "\
    INSERT INTO events (event_type, source_agent, payload) \
    VALUES ('task.unblocked', 'controller', json_object('id', ?1, 'project', ?2, 'name', ?3, \
        'reason', 'its tool exists now'))";

const NEEDING_TASKS: &str = "\
    SELECT assignee, title, COALESCE(description, '') AS description, \
        CAST(capabilities AS text) AS capabilities FROM tasks \
    WHERE status = 'pending' AND pruned_at IS NULL AND assignee IS NOT NULL \
    AND capabilities <> '[]' ORDER BY created_at LIMIT 100";

const REGISTERED: &str = "\
    SELECT name, type, CAST(COALESCE(capabilities, '[]') AS text) AS capabilities FROM agents \
    WHERE pruned_at IS NULL";

fn string_array(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn needs_from(
    tasks: Vec<(String, String, String, String)>,
    agents: Vec<(String, String, String)>,
) -> (Vec<NeedingTask>, Vec<Registered>) {
    (
        tasks
            .into_iter()
            .map(|(assignee, title, description, capabilities)| NeedingTask {
                assignee,
                title,
                description,
                capabilities: string_array(&capabilities),
            })
            .collect(),
        agents
            .into_iter()
            .map(|(name, agent_type, capabilities)| Registered {
                name,
                agent_type,
                capabilities: string_array(&capabilities),
            })
            .collect(),
    )
}

fn command_of(implementation: &serde_json::Value) -> Vec<String> {
    implementation
        .get("command")
        .and_then(serde_json::Value::as_array)
        .map(|argv| {
            argv.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl ToolRegistry for PgStore {
    async fn unblock_tool_waiters(&self) -> Result<u64, StoreError> {
        let freed: i64 = sqlx::query_scalar(UNBLOCK_POSTGRES)
            .fetch_one(self.pool())
            .await
            .map_err(query_error("unblocking tasks whose tool exists"))?;
        Ok(u64::try_from(freed).unwrap_or(0))
    }

    async fn capability_needs(&self) -> Result<(Vec<NeedingTask>, Vec<Registered>), StoreError> {
        let tasks = sqlx::query_as(NEEDING_TASKS)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading tasks that need capabilities"))?;
        let agents = sqlx::query_as(REGISTERED)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading agents"))?;
        Ok(needs_from(tasks, agents))
    }

    async fn use_tool(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row: Option<(sqlx::types::Json<serde_json::Value>,)> = sqlx::query_as(USE_POSTGRES)
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("using a tool"))?;
        Ok(row.map(|(implementation,)| command_of(&implementation.0)))
    }
}

impl ToolRegistry for SqliteStore {
    async fn unblock_tool_waiters(&self) -> Result<u64, StoreError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(query_error("starting a transaction"))?;
        let freed: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(UNBLOCK_SQLITE)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("unblocking tasks whose tool exists"))?;
        for (id, project, name) in &freed {
            sqlx::query(UNBLOCKED_EVENT_SQLITE)
                .bind(id)
                .bind(project)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(query_error("recording an unblocked task"))?;
        }
        tx.commit()
            .await
            .map_err(query_error("committing unblocked tasks"))?;
        Ok(freed.len() as u64)
    }

    async fn capability_needs(&self) -> Result<(Vec<NeedingTask>, Vec<Registered>), StoreError> {
        let tasks = sqlx::query_as(NEEDING_TASKS)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading tasks that need capabilities"))?;
        let agents = sqlx::query_as(REGISTERED)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("reading agents"))?;
        Ok(needs_from(tasks, agents))
    }

    async fn use_tool(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(USE_SQLITE)
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("using a tool"))?;
        Ok(row.map(|(implementation,)| {
            command_of(&serde_json::from_str(&implementation).unwrap_or_default())
        }))
    }
}
