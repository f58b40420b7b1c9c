//! Where output is reviewed: GitHub pull requests (`github`), or, with no forge configured,
//! the result branch on its own, where merging it into the followed branch is the approval.

pub mod github;

use std::time::Duration;

use futures::future::BoxFuture;

use crate::source::git::GitSource;
use crate::writeback::git::{BranchState, branch_state};

pub use github::GitHub;

#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("{api} refused the token (401 Unauthorized): check --github-token: {message}")]
    Unauthorized { api: String, message: String },
    #[error("{api} answered 403 Forbidden: the token lacks a permission this needs: {message}")]
    Forbidden { api: String, message: String },
    #[error("{api} rate limit: gave up after {attempts} attempts (retry after {retry_after:?})")]
    RateLimited {
        api: String,
        attempts: u32,
        retry_after: Duration,
    },
    #[error("{api} answered 422 Unprocessable Entity for {what}: {message}")]
    Unprocessable {
        api: String,
        what: String,
        message: String,
    },
    #[error("{api} answered {status} for {what}: {message}")]
    Status {
        api: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach {api}")]
    Transport {
        api: String,
        #[source]
        source: octocrab::Error,
    },
    #[error("{api} answered {what} with a body that is not the expected JSON")]
    Decode {
        api: String,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot tell the GitHub owner and repository from `{0}`: set --github-repo OWNER/REPO")]
    NoRepository(String),
    #[error("invalid --github-api-url `{0}`")]
    BadUrl(String),
    #[error("cannot check the result branch")]
    Branch(#[source] Box<crate::writeback::WritebackError>),
}

/// A branch to put up for review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub branch: String,
    pub base: String,
    pub title: String,
    pub body: String,
}

/// A pull request as agentops records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub number: u64,
    pub url: String,
}

/// The output of a task in review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewRef {
    pub branch: String,
    pub commit: Option<String>,
    pub pull_request: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewState {
    Open,
    /// Accepted; `how` says by what (a pull request's URL, or the branch).
    Merged {
        how: String,
    },
    /// Rejected, with the reviewers' comments (empty when there were none).
    Closed {
        comments: String,
    },
}

pub trait Forge: Send + Sync + 'static {
    /// Put a branch up for review: open a pull request, or reuse the open one for the branch.
    /// `None` where there is nothing to open (no forge: the branch is the proposal).
    fn propose<'a>(
        &'a self,
        proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<Option<PullRequest>, ForgeError>>;

    fn review_state<'a>(
        &'a self,
        review: &'a ReviewRef,
    ) -> BoxFuture<'a, Result<ReviewState, ForgeError>>;
}

/// No forge: the branch stands alone. Merged once its commit is in the followed branch;
/// closed once it is deleted from the remote without having been merged.
pub struct Branches {
    pub source: GitSource,
}

impl Forge for Branches {
    fn propose<'a>(
        &'a self,
        _proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<Option<PullRequest>, ForgeError>> {
        Box::pin(async { Ok(None) })
    }

    fn review_state<'a>(
        &'a self,
        review: &'a ReviewRef,
    ) -> BoxFuture<'a, Result<ReviewState, ForgeError>> {
        let source = self.source.clone();
        let branch = review.branch.clone();
        let commit = review.commit.clone();
        Box::pin(async move {
            let state = tokio::task::spawn_blocking(move || {
                branch_state(&source, &branch, commit.as_deref()).map(|s| (s, branch))
            })
            .await
            .map_err(|e| ForgeError::Branch(Box::new(crate::writeback::WritebackError::Worker(e))))?
            .map_err(|e| ForgeError::Branch(Box::new(e)))?;
            Ok(match state {
                (BranchState::Open, _) => ReviewState::Open,
                (BranchState::Merged, branch) => ReviewState::Merged {
                    how: format!("branch {branch} merged"),
                },
                (BranchState::Closed, _) => ReviewState::Closed {
                    comments: String::new(),
                },
            })
        })
    }
}

/// `(owner, repo)` from a GitHub remote URL: `https://host/o/r(.git)`, `ssh://git@host/o/r`,
/// `git@host:o/r.git`.
pub fn owner_repo(url: &str) -> Option<(String, String)> {
    let path = if let Some((_, rest)) = url.split_once("://") {
        rest.split_once('/')?.1
    } else if let Some((_, rest)) = url.split_once(':') {
        rest
    } else {
        return None;
    };
    let path = path.trim_end_matches('/').trim_end_matches(".git");
    let mut parts = path.rsplitn(2, '/');
    let repo = parts.next()?;
    let owner = parts.next()?.rsplit('/').next()?;
    (!owner.is_empty() && !repo.is_empty()).then(|| (owner.to_owned(), repo.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_repo_from_remote_urls() {
        let expected = Some(("acme".to_owned(), "specs".to_owned()));
        for url in [
            "https://github.com/acme/specs.git",
            "https://github.com/acme/specs",
            "https://x-access-token@github.example.com/acme/specs/",
            "ssh://git@github.com/acme/specs.git",
            "git@github.com:acme/specs.git",
        ] {
            assert_eq!(owner_repo(url), expected, "{url}");
        }
        assert_eq!(owner_repo("https://github.com/acme"), None);
        assert_eq!(owner_repo("/srv/git/specs"), None);
    }
}
