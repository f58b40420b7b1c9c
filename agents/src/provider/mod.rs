//! The work the Chief of Staff and the Seed hand to a model: plan a project, write a `prompt`
//! task's files, draft a missing tool, draft a missing specialist.
//!
//! [`LlmProvider`] asks a model and checks each answer (a plan or a draft must parse and
//! validate as specs; files must lie within the task's output paths), asking once more with
//! the problems when it does not pass. [`OfflineProvider`] answers deterministically without
//! a model, so everything runs with no key. Both sit behind [`Provider`], and [`AnyProvider`]
//! picks one from the configuration: callers do the same thing either way.

mod llm;
mod offline;

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use llm::LlmProvider;
pub use offline::{OfflineProvider, agent_offline, plan_from_text, tool_offline, write_offline};

use crate::drafts::{AgentNeed, Draft, ToolNeed};
use crate::llm::{Caller, LlmClient, LlmConfig, LlmError, RateLimiter};
use crate::plan::Proposal;
use crate::prompt::{PromptWork, Written};

/// A person's request for a project (from `agentops ask`, the API, or a `plan` task).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRequest {
    pub request: String,
    /// The project's name, when the person chose it.
    #[serde(default)]
    pub project: Option<String>,
    /// Names of projects that exist already; the plan takes another.
    #[serde(default)]
    pub taken: Vec<String>,
}

impl PlanRequest {
    /// The request of a `plan` task: `action.plan.request`, else the task's description,
    /// else its title. `None` when the task's action is not `plan`.
    pub fn from_assignment(
        task: &crate::runtime::Assignment,
        taken: Vec<String>,
    ) -> Option<PlanRequest> {
        let plan = task.action.get("plan")?;
        let request = plan
            .get("request")
            .and_then(serde_json::Value::as_str)
            .filter(|r| !r.trim().is_empty())
            .or(Some(task.description.as_str()).filter(|d| !d.trim().is_empty()))
            .unwrap_or(&task.title);
        Some(PlanRequest {
            request: request.to_owned(),
            project: None,
            taken,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("the request is empty: say what the project should achieve")]
    EmptyRequest,
    #[error("project `{0}` already exists; choose another name")]
    Taken(String),
    #[error("the language model could not answer")]
    Llm(#[source] LlmError),
    #[error("the model's {what} is still invalid after one correction:\n  {}", .problems.join("\n  "))]
    Invalid {
        what: &'static str,
        problems: Vec<String>,
    },
    /// The offline provider produced something that does not validate: a bug, reported
    /// instead of proposed.
    #[error("the offline {what} is invalid:\n  {}", .problems.join("\n  "))]
    Offline {
        what: &'static str,
        problems: Vec<String>,
    },
}

impl ProviderError {
    /// Whether asking again later may succeed: every model was busy, down or slow.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Llm(e) if e.is_transient())
    }
}

pub trait Provider: Send + Sync {
    /// What answers, for logs.
    fn describe(&self) -> String;

    /// A validated project with its tasks, and the files to propose for it.
    fn plan(
        &self,
        caller: &Caller<'_>,
        request: &PlanRequest,
    ) -> impl Future<Output = Result<Proposal, ProviderError>> + Send;

    /// The files of a `prompt` task, each within its output paths.
    fn write(
        &self,
        caller: &Caller<'_>,
        work: &PromptWork,
    ) -> impl Future<Output = Result<Written, ProviderError>> + Send;

    /// A `Tool` spec and its script, validated.
    fn draft_tool(
        &self,
        caller: &Caller<'_>,
        need: &ToolNeed,
    ) -> impl Future<Output = Result<Draft, ProviderError>> + Send;

    /// A specialist `Agent` spec, validated.
    fn draft_agent(
        &self,
        caller: &Caller<'_>,
        need: &AgentNeed,
    ) -> impl Future<Output = Result<Draft, ProviderError>> + Send;
}

/// A model when one is configured, offline otherwise.
pub enum AnyProvider {
    /// Boxed: a client and its configuration against a unit struct.
    Llm(Box<LlmProvider>),
    Offline(OfflineProvider),
}

impl AnyProvider {
    /// `config` is typically [`LlmConfig::from_env`]: `None` (no key) means offline.
    pub fn new(
        config: Option<LlmConfig>,
        limiter: Arc<dyn RateLimiter>,
    ) -> Result<AnyProvider, LlmError> {
        Ok(match config {
            Some(config) => {
                AnyProvider::Llm(Box::new(LlmProvider::new(LlmClient::new(config, limiter)?)))
            }
            None => AnyProvider::Offline(OfflineProvider),
        })
    }

    /// The models asked, in order; none offline. A drafted specialist names these.
    pub fn models(&self) -> Vec<String> {
        match self {
            AnyProvider::Llm(p) => p.models().to_vec(),
            AnyProvider::Offline(_) => Vec::new(),
        }
    }
}

impl Provider for AnyProvider {
    fn describe(&self) -> String {
        match self {
            AnyProvider::Llm(p) => p.describe(),
            AnyProvider::Offline(p) => p.describe(),
        }
    }

    async fn plan(
        &self,
        caller: &Caller<'_>,
        request: &PlanRequest,
    ) -> Result<Proposal, ProviderError> {
        match self {
            AnyProvider::Llm(p) => p.plan(caller, request).await,
            AnyProvider::Offline(p) => p.plan(caller, request).await,
        }
    }

    async fn write(
        &self,
        caller: &Caller<'_>,
        work: &PromptWork,
    ) -> Result<Written, ProviderError> {
        match self {
            AnyProvider::Llm(p) => p.write(caller, work).await,
            AnyProvider::Offline(p) => p.write(caller, work).await,
        }
    }

    async fn draft_tool(
        &self,
        caller: &Caller<'_>,
        need: &ToolNeed,
    ) -> Result<Draft, ProviderError> {
        match self {
            AnyProvider::Llm(p) => p.draft_tool(caller, need).await,
            AnyProvider::Offline(p) => p.draft_tool(caller, need).await,
        }
    }

    async fn draft_agent(
        &self,
        caller: &Caller<'_>,
        need: &AgentNeed,
    ) -> Result<Draft, ProviderError> {
        match self {
            AnyProvider::Llm(p) => p.draft_agent(caller, need).await,
            AnyProvider::Offline(p) => p.draft_agent(caller, need).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_of_a_plan_task() {
        let task = |action: serde_json::Value, description: &str| -> crate::runtime::Assignment {
            serde_json::from_value(serde_json::json!({
                "id": "t", "run_lease": 1, "title": "Plan the offsite",
                "description": description, "action": action
            }))
            .unwrap()
        };
        let taken = vec!["x".to_owned()];
        let explicit = task(
            serde_json::json!({"plan": {"request": "Book a venue."}}),
            "d",
        );
        let request = PlanRequest::from_assignment(&explicit, taken.clone()).unwrap();
        assert_eq!(request.request, "Book a venue.");
        assert_eq!(request.taken, taken);
        let described = task(serde_json::json!({"plan": {}}), "From the description.");
        assert_eq!(
            PlanRequest::from_assignment(&described, vec![])
                .unwrap()
                .request,
            "From the description."
        );
        let bare = task(serde_json::json!({"plan": {}}), "");
        assert_eq!(
            PlanRequest::from_assignment(&bare, vec![]).unwrap().request,
            "Plan the offsite"
        );
        let prompt = task(serde_json::json!({"prompt": "x"}), "");
        assert_eq!(PlanRequest::from_assignment(&prompt, vec![]), None);
    }
}
