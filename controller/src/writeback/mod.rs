//! Write-back: Git shows the truth. Status files under `.agentops/` are rendered from the
//! store (`render`, pure) and committed at most once per interval (`StatusWriter`); an agent's
//! output files become a commit on `agentops/<project>/<task>` or the followed branch
//! (`Results`); tasks in review are completed when their output is merged and retried when
//! it is closed (`Reviews`, through a `Forge`).

pub mod git;
pub mod kube;
pub mod paths;
pub mod render;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::forge::{Forge, ForgeError, ReviewRef, ReviewState};
use crate::source::SourceError;
use crate::source::git::GitSource;
use crate::store::StoreError;
use crate::store::queue::{LeasePolicy, Refusal};
use crate::store::writeback::{Rejected, Writeback};

pub use git::{Author, Retry};
use paths::{OutputFile, OutputMode, PathError};
use render::Renderer;

#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error("git error while {doing}")]
    Git {
        doing: &'static str,
        #[source]
        source: git2::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("could not push {what} after {attempts} attempts; last: {last}")]
    Push {
        what: String,
        attempts: u32,
        last: String,
    },
    #[error(transparent)]
    Forge(#[from] ForgeError),
    #[error("the Git worker thread stopped unexpectedly")]
    Worker(#[source] tokio::task::JoinError),
}

/// Where the last flush spent its time, and how much it wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlushTimings {
    pub snapshot: std::time::Duration,
    pub render: std::time::Duration,
    pub git: std::time::Duration,
    /// Status files rendered again (changed or removed).
    pub files: usize,
}

/// Status files, rendered incrementally and committed by [`StatusWriter::flush`].
pub struct StatusWriter<S> {
    store: S,
    source_name: String,
    renderer: Renderer,
    pub last: FlushTimings,
    /// Taken while a flush runs on the blocking pool.
    git: Option<git::StatusGit>,
    template: (GitSource, Author, Retry),
}

impl<S: Writeback> StatusWriter<S> {
    pub fn new(
        store: S,
        source_name: &str,
        source: GitSource,
        author: Author,
        retry: Retry,
    ) -> StatusWriter<S> {
        StatusWriter {
            store,
            source_name: source_name.to_owned(),
            renderer: Renderer::new(),
            last: FlushTimings::default(),
            git: Some(git::StatusGit::new(source.clone(), author.clone(), retry)),
            template: (source, author, retry),
        }
    }

    /// Render what changed and, if the status in Git differs, commit and push it. Returns the
    /// commit made, if any. Refused pushes are retried (and recorded as events); a flush that
    /// could not land stays pending for the next one.
    pub async fn flush(&mut self) -> Result<Option<git2::Oid>, WritebackError> {
        let started = std::time::Instant::now();
        let snapshot = self.store.status_snapshot(&self.source_name).await?;
        let rendering = std::time::Instant::now();
        let delta = self.renderer.update(&snapshot);
        self.last = FlushTimings {
            snapshot: rendering - started,
            render: rendering.elapsed(),
            git: std::time::Duration::ZERO,
            files: delta.projects.len(),
        };
        let mut status_git = match self.git.take() {
            Some(g) => g,
            None => {
                // A flush died mid-way: start over from a full rendering.
                self.renderer.reset();
                let (source, author, retry) = self.template.clone();
                self.git = Some(git::StatusGit::new(source, author, retry));
                return Box::pin(self.flush()).await;
            }
        };
        if delta.is_empty() && !status_git.pending() {
            self.git = Some(status_git);
            return Ok(None);
        }
        let revision = snapshot.revision.clone();
        drop(snapshot);
        let writing = std::time::Instant::now();
        let (status_git, result) = tokio::task::spawn_blocking(move || {
            let _one = GIT_WRITES.lock().unwrap_or_else(|p| p.into_inner());
            let result = status_git.flush(&delta, revision.as_deref());
            (status_git, result)
        })
        .await
        .map_err(WritebackError::Worker)?;
        self.last.git = writing.elapsed();
        self.git = Some(status_git);
        match result {
            Ok(flushed) => {
                for refusal in &flushed.refusals {
                    self.event("status.push_refused", refusal).await;
                }
                Ok(flushed.commit)
            }
            Err(e) => {
                self.event("status.push_failed", &crate::error_chain(&e))
                    .await;
                Err(e)
            }
        }
    }

    async fn event(&self, kind: &str, error: &str) {
        tracing::warn!("{kind}: {error}");
        let payload = json!({"branch": self.template.0.branch, "error": error});
        if let Err(e) = self.store.record_event(kind, &payload).await {
            tracing::warn!("cannot record {kind}: {}", crate::error_chain(&e));
        }
    }
}

/// Why a completion's files were not committed.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error(transparent)]
    Refused(Refusal),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Writeback(#[from] WritebackError),
    #[error("cannot check out the task's revision")]
    Checkout(#[source] crate::embedded::AgentError),
}

impl From<StoreError> for ResultError {
    fn from(e: StoreError) -> Self {
        ResultError::Writeback(WritebackError::Store(e))
    }
}

/// What committing a completion's files gave.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedOutput {
    /// The task waits for its output to be merged (`review`) rather than being done.
    pub review: bool,
    /// Recorded as `result.output`: `{mode, branch, commit, base, files}`.
    pub output: Value,
}

/// Commits agents' output files; what the HTTP API calls before completing a task.
pub trait Results: Send + Sync + 'static {
    fn commit(
        &self,
        agent: String,
        task: Uuid,
        run_lease: i64,
        files: Vec<OutputFile>,
    ) -> BoxFuture<'static, Result<CommittedOutput, ResultError>>;

    /// The tree `task` works on, for `agent` holding it under `run_lease`: its commit and a
    /// tar archive of its files.
    fn checkout(
        &self,
        agent: String,
        task: Uuid,
        run_lease: i64,
    ) -> BoxFuture<'static, Result<(String, Vec<u8>), ResultError>>;
}

/// [`Results`] on the source's Git repository.
pub struct GitResults<S> {
    pub store: S,
    pub source: GitSource,
    pub author: Author,
    pub retry: Retry,
}

/// One Git write at a time per process: result pushes and status pushes share the mirror's
/// refs (the branch they push from, and the remote-tracking refs they move).
static GIT_WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl<S: Writeback + Clone> Results for GitResults<S> {
    fn checkout(
        &self,
        agent: String,
        task: Uuid,
        run_lease: i64,
    ) -> BoxFuture<'static, Result<(String, Vec<u8>), ResultError>> {
        let store = self.store.clone();
        let source = self.source.clone();
        Box::pin(async move {
            let Some(target) = store.result_task(task, run_lease, &agent).await? else {
                return Err(ResultError::Refused(Refusal::NotHeld));
            };
            tokio::task::spawn_blocking(move || {
                crate::embedded::archive(&source, target.dispatch_revision.as_deref())
            })
            .await
            .map_err(WritebackError::Worker)?
            .map_err(ResultError::Checkout)
        })
    }

    fn commit(
        &self,
        agent: String,
        task: Uuid,
        run_lease: i64,
        files: Vec<OutputFile>,
    ) -> BoxFuture<'static, Result<CommittedOutput, ResultError>> {
        let store = self.store.clone();
        let source = self.source.clone();
        let author = self.author.clone();
        let retry = self.retry;
        Box::pin(async move {
            let Some(target) = store.result_task(task, run_lease, &agent).await? else {
                return Err(ResultError::Refused(Refusal::NotHeld));
            };
            let mode = paths::check_files(&files, &target.output)?;
            let listed: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
            let request = git::ResultCommit {
                project: target.project,
                task: target.name,
                attempt: target.attempt,
                agent,
                mode,
                dispatch_revision: target.dispatch_revision,
                files,
            };
            let committed = tokio::task::spawn_blocking(move || {
                let _one = GIT_WRITES.lock().unwrap_or_else(|p| p.into_inner());
                git::commit_result(&source, &author, retry, &request)
            })
            .await
            .map_err(WritebackError::Worker)?
            .map_err(|e| match e {
                // Found only against the tree (a symlink in the way): still the agent's mistake.
                WritebackError::Path(e) => ResultError::Path(e),
                e => ResultError::Writeback(e),
            })?;
            Ok(CommittedOutput {
                review: mode == OutputMode::PullRequest,
                output: json!({
                    "mode": match mode {
                        OutputMode::PullRequest => "pull-request",
                        OutputMode::Commit => "commit",
                    },
                    "branch": committed.branch,
                    "commit": committed.commit.to_string(),
                    "base": committed.base.to_string(),
                    "files": listed,
                }),
            })
        })
    }
}

/// What one review pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReviewReport {
    pub proposed: usize,
    pub merged: usize,
    pub retried: usize,
    pub failed: usize,
    pub errors: usize,
}

/// Tasks in review, followed through the forge.
#[derive(Clone)]
pub struct Reviews<S> {
    pub store: S,
    pub forge: Arc<dyn Forge>,
    /// The branch pull requests are opened against.
    pub base: String,
    pub policy: LeasePolicy,
}

impl<S: Writeback> Reviews<S> {
    /// Open a pull request where one is missing, then act on every merged or closed one. A
    /// forge error on one task is logged and recorded and leaves the others unaffected.
    pub async fn check(&self) -> Result<ReviewReport, WritebackError> {
        let mut report = ReviewReport::default();
        for task in self.store.tasks_in_review().await? {
            let Some(branch) = task.branch.clone() else {
                continue;
            };
            match self.check_one(&task, &branch, &mut report).await {
                Ok(()) => {}
                Err(e) => {
                    report.errors += 1;
                    let error = crate::error_chain(&e);
                    tracing::warn!(task = %task.id, "review of {branch}: {error}");
                    let payload = json!({"id": task.id, "project": task.project,
                        "name": task.name, "branch": branch, "error": error});
                    if let Err(e) = self.store.record_event("task.review_error", &payload).await {
                        tracing::warn!("cannot record a review error: {}", crate::error_chain(&e));
                    }
                }
            }
        }
        Ok(report)
    }

    async fn check_one(
        &self,
        task: &crate::store::writeback::ReviewTask,
        branch: &str,
        report: &mut ReviewReport,
    ) -> Result<(), WritebackError> {
        let mut pull_request = task.pull_request;
        if pull_request.is_none() {
            let proposal = crate::forge::Proposal {
                branch: branch.to_owned(),
                base: self.base.clone(),
                title: format!("{}/{}: {}", task.project, task.name, task.title),
                body: format!(
                    "Output of the agentops task `{}/{}` (attempt {}, agent {}).\n\n\
                     Merging this pull request accepts the work and completes the task; \
                     closing it rejects the work, and the review comments go back to the task.",
                    task.project,
                    task.name,
                    task.attempt,
                    task.agent.as_deref().unwrap_or("unknown")
                ),
            };
            if let Some(pr) = self.forge.propose(&proposal).await? {
                self.store
                    .set_pull_request(task.id, &json!({"number": pr.number, "url": pr.url}))
                    .await?;
                pull_request = Some(pr.number);
                report.proposed += 1;
            }
        }
        let state = self
            .forge
            .review_state(&ReviewRef {
                branch: branch.to_owned(),
                commit: task.commit.clone(),
                pull_request,
            })
            .await?;
        match state {
            ReviewState::Open => {}
            ReviewState::Merged { how } => {
                if self.store.review_merged(task.id, &how).await? {
                    report.merged += 1;
                }
            }
            ReviewState::Closed { comments } => {
                match self
                    .store
                    .review_closed(task.id, &comments, &self.policy)
                    .await?
                {
                    Some(Rejected::Retry) => report.retried += 1,
                    Some(Rejected::Failed) => report.failed += 1,
                    None => {}
                }
            }
        }
        Ok(())
    }
}
