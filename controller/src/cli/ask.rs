use std::process::ExitCode;
use std::sync::Arc;

use agentops_agents::llm::Caller;
use agentops_agents::provider::{AnyProvider, PlanRequest, Provider};
use anyhow::Context;

use crate::config::{GlobalConfig, LlmArgs, SourceConfig, StoreConfig, WritebackArgs};
use crate::embedded::{Proposer, plan_and_propose, taken_projects};
use crate::presence::MemoryPresence;
use crate::store::usage::StoreUsageSink;
use crate::store::{AnyStore, Store};
use crate::with_store;

/// `agentops ask`: the Chief of Staff plans the request and proposes it on a branch. Prints
/// the branch (and the pull request's URL) on stdout.
pub async fn run(
    global: &GlobalConfig,
    source_cfg: &SourceConfig,
    store_cfg: &StoreConfig,
    writeback: &WritebackArgs,
    llm: &LlmArgs,
    request: &str,
    project: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let source = super::reconcile::git_source(global, source_cfg)?;
    let forge = writeback.forge(&source).context("configuring the forge")?;
    let mirror = source.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let repo = mirror.open()?;
        mirror.fetch(&repo)?;
        anyhow::Ok(taken_projects(&mirror)?)
    })
    .await??;
    // One call at a time from this process: the in-memory window is enough.
    let provider = AnyProvider::new(
        llm.config(),
        Arc::new(crate::llm::PresenceRateLimiter(Arc::new(
            MemoryPresence::default(),
        ))),
    )
    .context("configuring the language model")?;
    eprintln!("planning with {}", provider.describe());
    let request = PlanRequest {
        request: request.to_owned(),
        project: project.map(str::to_owned),
        taken,
    };
    let proposer = Proposer {
        source,
        author: writeback.author(),
        forge,
    };
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    let (name, proposed) = with_store!(store, store => {
        store.migrate().await?;
        let usage = StoreUsageSink::new(store);
        let caller = Caller { agent: "cos", task_id: None, usage: &usage };
        plan_and_propose(&provider, &caller, &proposer, &request).await?
    });
    eprintln!("proposed project {name}");
    println!("branch {}", proposed.branch);
    if let Some(pr) = &proposed.pull_request {
        println!("pull request {}", pr.url);
    }
    Ok(ExitCode::SUCCESS)
}
