//! Proposals: new projects, tools and specialists committed on their own branches and put up for review.

use std::path::Path;
use std::sync::Arc;

use agentops_agents::llm::Caller;
use agentops_agents::plan::RepoFile;
use agentops_agents::provider::{AnyProvider, PlanRequest, Provider};
use git2::ObjectType;

use crate::forge::{Forge, Proposal, PullRequest};
use crate::source::git::GitSource;
use crate::writeback::git::commit_proposal;
use crate::writeback::{Author, Retry};

use super::*;

/// A proposal as it was put up: the branch, and the pull request when there is a forge.
#[derive(Debug, Clone)]
pub struct Proposed {
    pub branch: String,
    pub commit: String,
    pub pull_request: Option<PullRequest>,
}

impl Proposed {
    /// "branch X" or "pull request URL (branch X)", for messages.
    pub fn describe(&self) -> String {
        match &self.pull_request {
            Some(pr) => format!("pull request {} (branch {})", pr.url, self.branch),
            None => format!("branch {}", self.branch),
        }
    }
}

/// Commits proposals (new projects, tools) on their own branches and opens pull requests.
#[derive(Clone)]
pub struct Proposer {
    pub source: GitSource,
    pub author: Author,
    pub forge: Arc<dyn Forge>,
}

impl Proposer {
    pub async fn propose(
        &self,
        branch: &str,
        title: &str,
        body: &str,
        files: &[RepoFile],
    ) -> Result<Proposed, AgentError> {
        // Proposed files are relative to the specs' root, which may be below the repository's.
        let prefix = self.source.subpath.trim_matches('/');
        let files: Vec<crate::writeback::paths::OutputFile> = files
            .iter()
            .map(|f| crate::writeback::paths::OutputFile {
                path: if prefix.is_empty() {
                    f.path.clone()
                } else {
                    format!("{prefix}/{}", f.path)
                },
                content: f.content.clone().into_bytes(),
                executable: f.path.ends_with(".sh") || f.path.ends_with(".py"),
                symlink: false,
            })
            .collect();
        let (source, author) = (self.source.clone(), self.author.clone());
        let (branch_name, message) = (branch.to_owned(), format!("{title}\n\n{body}\n"));
        let committed = tokio::task::spawn_blocking(move || {
            commit_proposal(
                &source,
                &author,
                Retry::default(),
                &branch_name,
                &message,
                &files,
            )
        })
        .await
        .map_err(AgentError::Worker)??;
        let pull_request = self
            .forge
            .propose(&Proposal {
                branch: branch.to_owned(),
                base: self.source.branch.clone(),
                title: title.to_owned(),
                body: body.to_owned(),
            })
            .await
            .map_err(AgentError::Forge)?;
        Ok(Proposed {
            branch: committed.branch,
            commit: committed.commit.to_string(),
            pull_request,
        })
    }
}

/// The names of the projects at the followed branch's head (`projects/<name>/`).
pub fn taken_projects(source: &GitSource) -> Result<Vec<String>, AgentError> {
    let repo = source.open()?;
    let head = source.head(&repo)?;
    let tree = repo
        .find_commit(head)
        .and_then(|c| c.tree())
        .map_err(git("reading the head tree"))?;
    let root = [source.subpath.trim_matches('/'), "projects"]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    let Ok(entry) = tree.get_path(Path::new(&root)) else {
        return Ok(Vec::new());
    };
    let Ok(projects) = repo.find_tree(entry.id()) else {
        return Ok(Vec::new());
    };
    Ok(projects
        .iter()
        .filter(|e| e.kind() == Some(ObjectType::Tree))
        .filter_map(|e| e.name().ok().map(str::to_owned))
        .collect())
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Provider(#[from] agentops_agents::provider::ProviderError),
    #[error("cannot propose the project")]
    Propose(#[source] AgentError),
}

/// The Chief of Staff's work for `agentops ask` and `plan` tasks: a validated plan, committed
/// on `agentops/proposals/<project>` and put up for review.
pub async fn plan_and_propose(
    provider: &AnyProvider,
    caller: &Caller<'_>,
    proposer: &Proposer,
    request: &PlanRequest,
) -> Result<(String, Proposed), PlanError> {
    let proposal = provider.plan(caller, request).await?;
    let branch = format!("agentops/proposals/{}", proposal.name());
    let title = format!("New project: {}", proposal.title());
    let body = format!(
        "Proposed by the Chief of Staff for the request:\n\n> {}\n\nMerge to start its {} tasks.",
        request.request.trim().replace('\n', "\n> "),
        proposal.plan.tasks.len()
    );
    let proposed = proposer
        .propose(&branch, &title, &body, &proposal.files)
        .await
        .map_err(PlanError::Propose)?;
    Ok((proposal.name().to_owned(), proposed))
}
