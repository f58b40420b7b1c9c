//! The `tools` table as the Seed uses it: a tool is looked up by name when a task runs it,
//! and every use is counted (`usage_count`, `last_used_at`).

use std::future::Future;

use super::StoreError;
use super::db::{Backend, Db, args, commit, rows_on};
use super::queue_db::{event, events};
use super::sql::statements;

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

const USE: &str = "\
    UPDATE tools SET usage_count = COALESCE(usage_count, 0) + 1, last_used_at = {now} \
    WHERE name = $1 AND pruned_at IS NULL RETURNING {text:implementation}";

/// The Seed's question for a missing tool starts "The tool `" (`embedded::Worker::propose_tool`).
/// A sync that re-validates the task (it referred to a tool that did not exist) clears the
/// message, hence also a blocked tool task without one. Should that be a task blocked by a
/// failed dependency, it is not ready (its dependency is not completed) and the sweeper blocks
/// it again.
const UNBLOCK: &str = "\
    UPDATE tasks SET status = 'pending', status_message = NULL \
    WHERE status = 'blocked' AND pruned_at IS NULL \
    AND (status_message IS NULL OR status_message LIKE 'question: The tool `%') \
    AND EXISTS (SELECT 1 FROM tools tl WHERE tl.pruned_at IS NULL \
        AND tl.name = tasks.action -> 'tool' ->> 'name') \
    RETURNING {text:id} AS id, (SELECT p.name FROM projects p WHERE p.id = tasks.project_id), name";

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

statements! {
    /// Every statement of [`ToolRegistry`].
    Statements {
        use_tool = USE,
        unblock = UNBLOCK,
        needing_tasks = NEEDING_TASKS,
        registered = REGISTERED,
    }
}

impl<B: Backend> ToolRegistry for Db<B> {
    async fn unblock_tool_waiters(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let doing = "unblocking tasks whose tool exists";
        let freed: Vec<(String, Option<String>, Option<String>)> =
            rows_on::<B, _>(&mut tx, &self.sql.registry.unblock, args![], doing).await?;
        if freed.is_empty() {
            return Ok(0);
        }
        let unblocked: Vec<serde_json::Value> = freed
            .iter()
            .map(|(id, project, name)| {
                let payload = serde_json::json!({"id": id, "project": project, "name": name,
                    "reason": "its tool exists now"});
                event("task.unblocked", "controller", payload)
            })
            .collect();
        events(self, &mut tx, &unblocked).await?;
        commit(tx, "committing unblocked tasks").await?;
        Ok(freed.len() as u64)
    }

    async fn capability_needs(&self) -> Result<(Vec<NeedingTask>, Vec<Registered>), StoreError> {
        let sql = &self.sql.registry;
        let doing = "reading tasks that need capabilities";
        let tasks = self.rows(&sql.needing_tasks, args![], doing).await?;
        let agents = self
            .rows(&sql.registered, args![], "reading agents")
            .await?;
        Ok(needs_from(tasks, agents))
    }

    async fn use_tool(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row: Option<(String,)> = self
            .row(&self.sql.registry.use_tool, args![name], "using a tool")
            .await?;
        Ok(row.map(|(implementation,)| {
            command_of(&serde_json::from_str(&implementation).unwrap_or_default())
        }))
    }
}
