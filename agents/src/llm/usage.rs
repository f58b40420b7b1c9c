//! Where each model call is accounted: one [`UsageRecord`] per attempt, handed to a
//! [`UsageSink`]. An agent inside the controller process writes `model_usage` rows straight to
//! the store (the controller implements the sink); an agent elsewhere posts them to
//! `POST /api/v1/model-usage` through its [`TaskContext`](crate::runtime::TaskContext).

use std::sync::Mutex;

use futures::future::BoxFuture;

use crate::runtime::TaskContext;

pub use crate::protocol::UsageRecord;

#[derive(Debug, thiserror::Error)]
#[error("cannot record model usage")]
pub struct UsageError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

pub trait UsageSink: Send + Sync {
    fn record<'a>(&'a self, usage: &'a UsageRecord) -> BoxFuture<'a, Result<(), UsageError>>;
}

/// Who is calling a model, and where the call is accounted.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    pub agent: &'a str,
    /// The task the call works on, if any; recorded as `model_usage.task_id`.
    pub task_id: Option<&'a str>,
    pub usage: &'a dyn UsageSink,
}

/// Keeps the records in memory; for tests and tools that report usage themselves.
#[derive(Debug, Default)]
pub struct MemoryUsage {
    records: Mutex<Vec<UsageRecord>>,
}

impl MemoryUsage {
    pub fn records(&self) -> Vec<UsageRecord> {
        self.records.lock().expect("usage lock").clone()
    }
}

impl UsageSink for MemoryUsage {
    fn record<'a>(&'a self, usage: &'a UsageRecord) -> BoxFuture<'a, Result<(), UsageError>> {
        self.records.lock().expect("usage lock").push(usage.clone());
        Box::pin(async { Ok(()) })
    }
}

/// Accounts nothing: for work that calls no model (the offline provider).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoUsage;

impl UsageSink for NoUsage {
    fn record<'a>(&'a self, _: &'a UsageRecord) -> BoxFuture<'a, Result<(), UsageError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Posts to the controller as the agent running the task.
impl UsageSink for TaskContext {
    fn record<'a>(&'a self, usage: &'a UsageRecord) -> BoxFuture<'a, Result<(), UsageError>> {
        self.line().record(usage)
    }
}

/// Posts to the controller as the agent, for calls outside a task.
impl UsageSink for crate::runtime::AgentLine {
    fn record<'a>(&'a self, usage: &'a UsageRecord) -> BoxFuture<'a, Result<(), UsageError>> {
        Box::pin(async move {
            self.record_usage(usage)
                .await
                .map_err(|e| UsageError(Box::new(e)))
        })
    }
}
