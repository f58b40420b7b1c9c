//! Proposals: new projects, tools and specialists committed on their own branches and put up for review.

use std::path::Path;
use std::sync::Arc;

use agentops_agents::llm::Caller;
use agentops_agents::plan::{Proposal as PlanProposal, RepoFile};
use agentops_agents::protocol::{OutputFile, ProposalKind, ProposalRequest, ProposalResponse};
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

impl From<Proposed> for ProposalResponse {
    fn from(p: Proposed) -> Self {
        ProposalResponse {
            branch: p.branch,
            commit: p.commit,
            pull_request: p.pull_request.map(|pr| pr.url),
        }
    }
}

/// "branch X" or "pull request URL (branch X)", for messages.
pub fn describe(proposed: &ProposalResponse) -> String {
    match &proposed.pull_request {
        Some(url) => format!("pull request {url} (branch {})", proposed.branch),
        None => format!("branch {}", proposed.branch),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The files are not a valid proposal: each problem, `path:line:column: message`.
    #[error("the proposal was refused: {}", .0.join("; "))]
    Refused(Vec<String>),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// A proposal's files as the protocol carries them.
pub fn proposal_files(files: &[RepoFile]) -> Vec<OutputFile> {
    files
        .iter()
        .map(|f| OutputFile::text(&f.path, &f.content))
        .collect()
}

/// The Chief of Staff's proposal of a planned project.
pub fn project_proposal(request: &PlanRequest, proposal: &PlanProposal) -> ProposalRequest {
    ProposalRequest {
        kind: ProposalKind::Project,
        name: proposal.name().to_owned(),
        title: format!("New project: {}", proposal.title()),
        body: format!(
            "Proposed by the Chief of Staff for the request:\n\n> {}\n\nMerge to start its {} tasks.",
            request.request.trim().replace('\n', "\n> "),
            proposal.plan.tasks.len()
        ),
        files: proposal_files(&proposal.files),
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
    /// What `POST /api/v1/proposals` does: check the files ([`check_proposal`]), then commit
    /// them on the kind's branch and open the pull request. Nothing reaches Git on refusal.
    ///
    /// [`check_proposal`]: crate::api::proposals::check_proposal
    pub async fn propose_checked(
        &self,
        request: &ProposalRequest,
    ) -> Result<Proposed, ProposeError> {
        let taken = if request.kind == ProposalKind::Project {
            let source = self.source.clone();
            tokio::task::spawn_blocking(move || taken_projects(&source))
                .await
                .map_err(AgentError::Worker)??
        } else {
            Vec::new()
        };
        let files = crate::api::proposals::check_proposal(request, &taken)
            .map_err(ProposeError::Refused)?;
        let branch = request.kind.branch(&request.name);
        Ok(self
            .propose(&branch, &request.title, &request.body, &files)
            .await?)
    }

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
    Propose(#[source] ProposeError),
}

/// The Chief of Staff's work for `agentops ask`: a validated plan, committed on
/// `agentops/proposals/<project>` and put up for review.
pub async fn plan_and_propose(
    provider: &AnyProvider,
    caller: &Caller<'_>,
    proposer: &Proposer,
    request: &PlanRequest,
) -> Result<(String, Proposed), PlanError> {
    let proposal = provider.plan(caller, request).await?;
    let proposed = proposer
        .propose_checked(&project_proposal(request, &proposal))
        .await
        .map_err(PlanError::Propose)?;
    Ok((proposal.name().to_owned(), proposed))
}
