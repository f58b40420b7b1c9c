//! `model_usage`: one row per model call, from agents inside the controller process (through
//! [`StoreUsageSink`]) and from agents elsewhere (through `POST /api/v1/model-usage`).
//!
//! The row keeps the original columns; the call's latency, success and error go to its
//! `metadata`. A task id that names no task is stored as NULL, as the foreign key's
//! `ON DELETE SET NULL` would leave it: spend is kept on the books either way.

use std::future::Future;

use agentops_agents::llm::{UsageError, UsageRecord, UsageSink};
use futures::future::BoxFuture;
use uuid::Uuid;

use super::StoreError;
use super::db::{Backend, Db, args};
use super::sql::statements;

/// The largest cost `numeric(10, 6)` holds.
pub const MAX_COST_USD: f64 = 9_999.999_999;

/// Why a usage record cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadUsage {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("task_id `{0}` is not a UUID")]
    TaskId(String),
    #[error("estimated_cost_usd {0} is not a cost between 0 and {MAX_COST_USD}")]
    Cost(String),
}

/// A usage record checked for what the columns hold.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub agent: String,
    pub model: String,
    pub provider: String,
    pub task_id: Option<Uuid>,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
    pub estimated_cost_usd: Option<f64>,
    pub metadata: serde_json::Value,
}

impl UsageRow {
    /// `agent` is who the record is stored under: for the API, the authenticated agent, not
    /// whatever the body says.
    pub fn new(agent: &str, record: &UsageRecord) -> Result<UsageRow, BadUsage> {
        for (field, value) in [
            ("agent", agent),
            ("model", &record.model),
            ("provider", &record.provider),
        ] {
            if value.trim().is_empty() {
                return Err(BadUsage::Empty { field });
            }
        }
        let task_id = match &record.task_id {
            None => None,
            Some(id) => Some(id.parse().map_err(|_| BadUsage::TaskId(id.clone()))?),
        };
        if let Some(cost) = record.estimated_cost_usd
            && !(0.0..=MAX_COST_USD).contains(&cost)
        {
            return Err(BadUsage::Cost(cost.to_string()));
        }
        let tokens = |n: Option<u32>| n.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
        let mut metadata = serde_json::json!({
            "latency_ms": record.latency_ms,
            "success": record.success,
        });
        if let Some(error) = &record.error {
            metadata["error"] = serde_json::Value::String(error.clone());
        }
        Ok(UsageRow {
            agent: agent.to_owned(),
            model: record.model.clone(),
            provider: record.provider.clone(),
            task_id,
            prompt_tokens: tokens(record.prompt_tokens),
            completion_tokens: tokens(record.completion_tokens),
            total_tokens: tokens(record.total_tokens),
            estimated_cost_usd: record.estimated_cost_usd,
            metadata,
        })
    }
}

pub trait UsageLog: Send + Sync + 'static {
    fn record_usage(&self, row: &UsageRow) -> impl Future<Output = Result<(), StoreError>> + Send;
}

statements! {
    /// Every statement of [`UsageLog`].
    Statements {
        /// The cost rounded to the six places of `numeric(10, 6)`.
        insert = "INSERT INTO model_usage (agent_name, model_name, provider, task_id, \
            prompt_tokens, completion_tokens, total_tokens, estimated_cost_usd, metadata) \
            VALUES ($1, $2, $3, (SELECT id FROM tasks WHERE id = {id:4}), $5, $6, $7, \
            round(CAST($8 AS numeric), 6), {json:9})",
    }
}

impl<B: Backend> UsageLog for Db<B> {
    async fn record_usage(&self, row: &UsageRow) -> Result<(), StoreError> {
        let task_id = row.task_id.map(|id| id.hyphenated().to_string());
        let metadata = row.metadata.to_string();
        let args = args![
            &row.agent,
            &row.model,
            &row.provider,
            &task_id,
            row.prompt_tokens,
            row.completion_tokens,
            row.total_tokens,
            row.estimated_cost_usd,
            &metadata
        ];
        let doing = "recording model usage";
        self.run(&self.sql.usage.insert, args, doing).await?;
        Ok(())
    }
}

/// The sink of agents that run inside the controller: rows go straight to the store.
#[derive(Clone)]
pub struct StoreUsageSink<S> {
    store: S,
}

impl<S: UsageLog> StoreUsageSink<S> {
    pub fn new(store: S) -> StoreUsageSink<S> {
        StoreUsageSink { store }
    }
}

impl<S: UsageLog> UsageSink for StoreUsageSink<S> {
    fn record<'a>(&'a self, usage: &'a UsageRecord) -> BoxFuture<'a, Result<(), UsageError>> {
        Box::pin(async move {
            let row = UsageRow::new(&usage.agent, usage).map_err(|e| UsageError(Box::new(e)))?;
            self.store
                .record_usage(&row)
                .await
                .map_err(|e| UsageError(Box::new(e)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UsageRecord {
        UsageRecord {
            agent: "body-says".to_owned(),
            model: "openai/gpt-4o-mini".to_owned(),
            provider: "openai".to_owned(),
            task_id: None,
            prompt_tokens: Some(10),
            completion_tokens: Some(u32::MAX),
            total_tokens: None,
            estimated_cost_usd: Some(0.25),
            latency_ms: 120,
            success: false,
            error: Some("HTTP 429".to_owned()),
        }
    }

    #[test]
    fn rows_take_the_given_agent_and_keep_the_extras_in_metadata() {
        let row = UsageRow::new("seed", &record()).unwrap();
        assert_eq!(row.agent, "seed");
        assert_eq!(row.completion_tokens, Some(i32::MAX));
        assert_eq!(
            row.metadata,
            serde_json::json!({"latency_ms": 120, "success": false, "error": "HTTP 429"})
        );
    }

    #[test]
    fn bad_records_are_named() {
        let mut r = record();
        r.task_id = Some("not-a-uuid".to_owned());
        assert_eq!(
            UsageRow::new("seed", &r),
            Err(BadUsage::TaskId("not-a-uuid".to_owned()))
        );
        let mut r = record();
        r.estimated_cost_usd = Some(f64::NAN);
        assert!(matches!(UsageRow::new("seed", &r), Err(BadUsage::Cost(_))));
        r.estimated_cost_usd = Some(10_000.0);
        assert!(matches!(UsageRow::new("seed", &r), Err(BadUsage::Cost(_))));
        r.estimated_cost_usd = Some(-1.0);
        assert!(matches!(UsageRow::new("seed", &r), Err(BadUsage::Cost(_))));
        let mut r = record();
        r.model = " ".to_owned();
        assert_eq!(
            UsageRow::new("seed", &r),
            Err(BadUsage::Empty { field: "model" })
        );
    }
}
