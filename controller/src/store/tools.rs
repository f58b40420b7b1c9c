//! The `tools` table as the Seed uses it: a tool is looked up by name when a task runs it,
//! and every use is counted (`usage_count`, `last_used_at`).

use std::future::Future;

use super::{PgStore, SqliteStore, StoreError, query_error};

pub trait ToolRegistry: Send + Sync + 'static {
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
