//! The agents `up` runs in its own process (unless `--no-agents`): the Seed, the Chief of
//! Staff, and one specialist per `Agent` spec in the repository. They run on the ordinary
//! agent runtime against the controller's own HTTP API, so they claim, heartbeat and report
//! exactly as remote agents do; what they have that remote agents lack is the controller's
//! mirror (for checkouts and proposal branches) and its store (tools, model usage).
//!
//! The Seed's `run` and `tool` actions run in a fresh checkout of the task's dispatch
//! revision (brought up to the followed branch's head when that descends from it, so the
//! merged outputs of its dependencies are there), with the sandbox environment every agent
//! gives its commands (`HOME` and `TMPDIR` in the task's own temporary directory, `LANG`,
//! `PATH`, nothing else), under the task's timeout. Files the command adds or
//! changes are its output; one outside `output.paths` fails the task and nothing is
//! committed. Its stdout and stderr are kept as `<task>.log` in its output folder.

mod proposer;
mod sandbox;
mod services;
mod specialists;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use agentops_agents::llm::{LlmConfig, RateLimiter};
use agentops_agents::provider::{AnyProvider, Provider};
use agentops_agents::runtime::{Agent, AgentConfig, AgentType};
use agentops_agents::shutdown::Stop;

use crate::error_chain;
use crate::forge::ForgeError;
use crate::source::SourceError;
use crate::source::git::GitSource;
use crate::store::StoreError;
use crate::store::tools::ToolRegistry;
use crate::store::usage::{StoreUsageSink, UsageLog};
use crate::writeback::WritebackError;

pub use proposer::{
    PlanError, ProposeError, Proposed, Proposer, describe, plan_and_propose, project_proposal,
    proposal_files, taken_projects,
};
pub use sandbox::{Changed, archive, changed_files, check_out};
pub use services::{ProposalFailed, Remote, Services, unpack};
pub use specialists::{Specialist, agent_proposal, gaps, specialist_gaps, specialists};
pub use worker::{Worker, fill_arguments};

/// How long a `run` or `tool` action may take when its task sets no timeout.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("git: {doing}")]
    Git {
        doing: &'static str,
        #[source]
        source: git2::Error,
    },
    #[error("cannot write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Writeback(#[from] WritebackError),
    #[error("cannot open the pull request")]
    Forge(#[source] ForgeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a worker thread stopped")]
    Worker(#[source] tokio::task::JoinError),
}

fn git(doing: &'static str) -> impl Fn(git2::Error) -> AgentError {
    move |source| AgentError::Git { doing, source }
}

/// What every embedded agent shares.
pub struct Embedded<S> {
    pub store: S,
    pub source: GitSource,
    pub provider: Arc<AnyProvider>,
    /// The model configuration `provider` was made from (`None`: offline), for specialists
    /// whose spec names their own models.
    pub llm: Option<LlmConfig>,
    pub limiter: Arc<dyn RateLimiter>,
    pub usage: StoreUsageSink<S>,
    pub proposer: Proposer,
    /// What the embedded agents present to register: the controller accepts it whatever
    /// enrollment asks of other agents.
    pub enrollment_secret: String,
}

/// Runs the embedded agents against the API at `api` until `stop` stops their claiming; what
/// they run then finishes, or is handed back once `stop` stops the work.
pub fn spawn<S: ToolRegistry + UsageLog + Clone>(
    shared: Arc<Embedded<S>>,
    api: String,
    seed_capabilities: Vec<String>,
    stop: Stop,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let source = shared.source.clone();
        let specialists = match tokio::task::spawn_blocking(move || specialists(&source)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!("no specialists: {}", error_chain(&e));
                Vec::new()
            }
            Err(e) => {
                tracing::warn!("no specialists: {e}");
                Vec::new()
            }
        };
        // Each embedded agent with the worker that runs its tasks: the shared provider, or a
        // specialist's own models and instructions.
        let worker = |config: &AgentConfig, provider, instructions| Worker {
            shared: shared.clone(),
            name: config.name.clone(),
            provider,
            instructions,
            drafts_specialists: config.name == "seed",
        };
        let mut agents = Vec::with_capacity(2 + specialists.len());
        for config in [
            AgentConfig {
                capabilities: seed_capabilities,
                concurrency: 2,
                claim_wait: Duration::from_secs(2),
                secret: Some(shared.enrollment_secret.clone()),
                ..AgentConfig::new(&api, "seed")
            },
            AgentConfig {
                agent_type: AgentType::Cos,
                claim_wait: Duration::from_secs(2),
                secret: Some(shared.enrollment_secret.clone()),
                ..AgentConfig::new(&api, "cos")
            },
        ] {
            agents.push((worker(&config, shared.provider.clone(), None), config));
        }
        for Specialist {
            config,
            models,
            instructions,
        } in specialists
        {
            let provider = match &shared.llm {
                Some(llm) if !models.is_empty() => {
                    let mut own = llm.clone();
                    own.models = models;
                    match AnyProvider::new(Some(own), shared.limiter.clone()) {
                        Ok(provider) => Arc::new(provider),
                        Err(e) => {
                            tracing::warn!(agent = %config.name, "the shared models instead of its own: {}", error_chain(&e));
                            shared.provider.clone()
                        }
                    }
                }
                _ => shared.provider.clone(),
            };
            let config = AgentConfig {
                api: api.clone(),
                claim_wait: Duration::from_secs(2),
                secret: Some(shared.enrollment_secret.clone()),
                ..config
            };
            let instructions = Some(instructions).filter(|i| !i.trim().is_empty());
            agents.push((worker(&config, provider, instructions), config));
        }
        let names: Vec<&str> = agents.iter().map(|(_, c)| c.name.as_str()).collect();
        eprintln!(
            "embedded agents: {} ({})",
            names.join(", "),
            shared.provider.describe()
        );
        let mut running = tokio::task::JoinSet::new();
        for (worker, config) in agents {
            let stop = stop.clone();
            running.spawn(async move {
                let name = config.name.clone();
                if let Err(e) = Agent::new(config, worker).run_until(stop).await {
                    tracing::error!(agent = %name, "embedded agent stopped: {}", error_chain(&e));
                }
            });
        }
        while running.join_next().await.is_some() {}
    })
}
