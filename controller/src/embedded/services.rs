//! What a [`Worker`](super::Worker) does through its controller: look up a tool, propose spec
//! files, find work no agent can take, check out a task's tree, list the projects, account
//! model calls. The embedded agents
//! call the controller's parts in their own process ([`Embedded`]); an agent elsewhere calls
//! the API as the agent holding the task ([`Remote`]). Both propose through
//! [`Proposer::propose_checked`], so a proposal is checked and committed the same way.

use std::collections::HashMap;
use std::path::Path;

use agentops_agents::llm::UsageSink;
use agentops_agents::protocol::{ProposalRequest, ProposalResponse, SpecialistGaps};
use agentops_agents::runtime::{AgentLine, Assignment, TaskContext};
use futures::future::BoxFuture;
use git2::{ObjectType, Oid};

use crate::error_chain;
use crate::store::tools::ToolRegistry;
use crate::store::usage::UsageLog;

use super::*;

/// A proposal that did not go up: why, and whether trying again may help.
#[derive(Debug)]
pub struct ProposalFailed {
    pub message: String,
    pub retryable: bool,
}

pub trait Services: Send + Sync + 'static {
    /// The command of the tool `name`; `None` when there is no such tool.
    fn use_tool<'a>(
        &'a self,
        ctx: &'a TaskContext,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, String>>;

    /// Spec files for review, as the agent `line` is.
    fn propose<'a>(
        &'a self,
        line: &'a AgentLine,
        request: &'a ProposalRequest,
    ) -> BoxFuture<'a, Result<ProposalResponse, ProposalFailed>>;

    /// Pending specialist work no agent can take, and the names agents hold.
    fn specialist_gaps<'a>(
        &'a self,
        line: &'a AgentLine,
    ) -> BoxFuture<'a, Result<SpecialistGaps, String>>;

    /// The tree `task` works on, written into `dir`: each file's blob id.
    fn check_out<'a>(
        &'a self,
        ctx: &'a TaskContext,
        task: &'a Assignment,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<HashMap<String, Oid>, String>>;

    /// The projects at the followed branch's head.
    fn taken_projects<'a>(
        &'a self,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Vec<String>, String>>;

    /// Where the agent's model calls are accounted.
    fn usage<'a>(&'a self, line: &'a AgentLine) -> &'a dyn UsageSink;
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> BoxFuture<'static, Result<T, String>> {
    Box::pin(async move {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(e) => Err(e.to_string()),
        }
    })
}

impl<S: ToolRegistry + UsageLog + Clone> Services for Embedded<S> {
    fn use_tool<'a>(
        &'a self,
        _ctx: &'a TaskContext,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, String>> {
        Box::pin(async move { self.store.use_tool(name).await.map_err(|e| error_chain(&e)) })
    }

    fn propose<'a>(
        &'a self,
        _line: &'a AgentLine,
        request: &'a ProposalRequest,
    ) -> BoxFuture<'a, Result<ProposalResponse, ProposalFailed>> {
        Box::pin(async move {
            match self.proposer.propose_checked(request).await {
                Ok(proposed) => Ok(proposed.into()),
                Err(e) => Err(ProposalFailed {
                    retryable: !matches!(e, ProposeError::Refused(_)),
                    message: error_chain(&e),
                }),
            }
        })
    }

    fn specialist_gaps<'a>(
        &'a self,
        _line: &'a AgentLine,
    ) -> BoxFuture<'a, Result<SpecialistGaps, String>> {
        // What the API answers a remote Seed, asked of the store directly.
        let gaps = crate::api::reads::Tools::specialist_gaps(&self.store);
        Box::pin(async move { gaps.await.map_err(|e| error_chain(&e)) })
    }

    fn check_out<'a>(
        &'a self,
        _ctx: &'a TaskContext,
        task: &'a Assignment,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<HashMap<String, Oid>, String>> {
        let (source, revision, dir) = (self.source.clone(), task.revision.clone(), dir.to_owned());
        blocking(move || check_out(&source, revision.as_deref(), &dir))
    }

    fn taken_projects<'a>(
        &'a self,
        _ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        let source = self.source.clone();
        blocking(move || taken_projects(&source))
    }

    fn usage<'a>(&'a self, _line: &'a AgentLine) -> &'a dyn UsageSink {
        &self.usage
    }
}

/// An agent off the controller: everything through the API, as the agent holding the task.
#[derive(Debug, Default, Clone, Copy)]
pub struct Remote;

impl Services for Remote {
    fn use_tool<'a>(
        &'a self,
        ctx: &'a TaskContext,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, String>> {
        Box::pin(async move { ctx.tool(name).await.map_err(|e| error_chain(&e)) })
    }

    fn propose<'a>(
        &'a self,
        line: &'a AgentLine,
        request: &'a ProposalRequest,
    ) -> BoxFuture<'a, Result<ProposalResponse, ProposalFailed>> {
        Box::pin(async move {
            line.propose(request).await.map_err(|e| ProposalFailed {
                retryable: e.is_transient(),
                message: error_chain(&e),
            })
        })
    }

    fn specialist_gaps<'a>(
        &'a self,
        line: &'a AgentLine,
    ) -> BoxFuture<'a, Result<SpecialistGaps, String>> {
        Box::pin(async move { line.specialist_gaps().await.map_err(|e| error_chain(&e)) })
    }

    fn check_out<'a>(
        &'a self,
        ctx: &'a TaskContext,
        _task: &'a Assignment,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<HashMap<String, Oid>, String>> {
        Box::pin(async move {
            let (_commit, archive) = ctx.checkout().await.map_err(|e| error_chain(&e))?;
            let dir = dir.to_owned();
            blocking(move || unpack(&archive, &dir)).await
        })
    }

    fn taken_projects<'a>(
        &'a self,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move { ctx.projects().await.map_err(|e| error_chain(&e)) })
    }

    fn usage<'a>(&'a self, line: &'a AgentLine) -> &'a dyn UsageSink {
        line
    }
}

/// Writes a checkout archive ([`archive`]) into `dir`: regular files only, each inside
/// `dir`; returns each file's blob id, as [`check_out`] does.
pub fn unpack(archive: &[u8], dir: &Path) -> Result<HashMap<String, Oid>, AgentError> {
    let io = |path: &str| {
        let path = path.to_owned();
        move |source| AgentError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(&dir.display().to_string()))?;
    let mut files = HashMap::new();
    let mut entries = tar::Archive::new(archive);
    for entry in entries.entries().map_err(io("the checkout archive"))? {
        let mut entry = entry.map_err(io("the checkout archive"))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry
            .path()
            .map_err(io("the checkout archive"))?
            .to_string_lossy()
            .into_owned();
        // `unpack_in` refuses paths that would leave `dir`.
        if !entry.unpack_in(dir).map_err(io(&path))? {
            continue;
        }
        let content = std::fs::read(dir.join(&path)).map_err(io(&path))?;
        let oid = Oid::hash_object(ObjectType::Blob, &content).map_err(git("hashing a file"))?;
        files.insert(path, oid);
    }
    Ok(files)
}
