//! The agents `up` runs in its own process (unless `--no-agents`): the Seed, the Chief of
//! Staff, and one specialist per `Agent` spec in the repository. They run on the ordinary
//! agent runtime against the controller's own HTTP API, so they claim, heartbeat and report
//! exactly as remote agents do; what they have that remote agents lack is the controller's
//! mirror (for checkouts and proposal branches) and its store (tools, model usage).
//!
//! The Seed's `run` and `tool` actions run in a fresh checkout of the task's dispatch
//! revision (brought up to the followed branch's head when that descends from it, so the
//! merged outputs of its dependencies are there), with a cleared environment (only `PATH`, and `HOME`/`TMPDIR` pointing into the
//! task's own temporary directory), under the task's timeout. Files the command adds or
//! changes are its output; one outside `output.paths` fails the task and nothing is
//! committed. Its stdout and stderr are kept as `<task>.log` in its output folder.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentops_agents::command::{run_in, sandbox_env, text};
use agentops_agents::drafts::{AgentNeed, ToolNeed};
use agentops_agents::llm::{Caller, LlmConfig, RateLimiter};
use agentops_agents::plan::RepoFile;
use agentops_agents::prompt::{PromptWork, is_within, outside_outputs};
use agentops_agents::provider::{AnyProvider, PlanRequest, Provider};
use agentops_agents::runtime::{
    Agent, AgentConfig, AgentType, Assignment, Handler, Outcome, OutputFile, TaskContext,
};
use agentops_agents::shutdown::Stop;
use git2::{ObjectType, Oid, TreeWalkMode, TreeWalkResult};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::error_chain;
use crate::forge::{Forge, ForgeError, Proposal, PullRequest};
use crate::source::SourceError;
use crate::source::git::GitSource;
use crate::store::StoreError;
use crate::store::tools::{NeedingTask, Registered, ToolRegistry};
use crate::store::usage::{StoreUsageSink, UsageLog};
use crate::writeback::git::{commit_proposal, revision_commit};
use crate::writeback::{Author, Retry, WritebackError};

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

/// An `Agent` spec as an embedded agent: who it is, its own models (none: the shared ones),
/// and its instructions for the provider.
pub struct Specialist {
    pub config: AgentConfig,
    pub models: Vec<String>,
    pub instructions: String,
}

/// The `Agent` specs at the followed branch's head: each becomes an embedded specialist,
/// with the models and instructions its spec gives.
pub fn specialists(source: &GitSource) -> Result<Vec<Specialist>, AgentError> {
    let repo = source.open()?;
    let head = source.head(&repo)?;
    let tree = repo
        .find_commit(head)
        .and_then(|c| c.tree())
        .map_err(git("reading the head tree"))?;
    let prefix = source.subpath.trim_matches('/');
    let mut found = Vec::new();
    tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
        let path = format!("{dir}{}", entry.name().unwrap_or_default());
        let inside = prefix.is_empty() || path.starts_with(&format!("{prefix}/"));
        if entry.kind() == Some(ObjectType::Blob)
            && inside
            && (path.ends_with(".yaml") || path.ends_with(".yml"))
            && let Ok(blob) = repo.find_blob(entry.id())
        {
            for object in agentops_specs::parse_file(&path, blob.content()).objects {
                if let agentops_specs::Spec::Agent(spec) = &object.spec {
                    found.push((object.metadata.name.clone(), spec.clone()));
                }
            }
        }
        TreeWalkResult::Ok
    })
    .map_err(git("reading the agent specs"))?;
    Ok(found
        .into_iter()
        .filter(|(name, _)| name != "seed" && name != "cos")
        .map(|(name, spec)| {
            let agent_type = serde_json::to_value(spec.agent_type)
                .ok()
                .and_then(|v| v.as_str().and_then(|t| t.parse().ok()))
                .unwrap_or(AgentType::Specialist);
            let config = AgentConfig {
                agent_type,
                capabilities: spec.capabilities.clone(),
                concurrency: spec.concurrency.max(1) as usize,
                ..AgentConfig::new("", name)
            };
            Specialist {
                config,
                models: spec.models.clone(),
                instructions: spec.instructions.clone(),
            }
        })
        .collect())
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
}

/// The handler of an embedded agent: the Seed's actions, and the Chief of Staff's `plan`.
pub struct Worker<S> {
    pub shared: Arc<Embedded<S>>,
    pub name: String,
    /// The shared provider, or a specialist's own models.
    pub provider: Arc<AnyProvider>,
    /// A specialist's instructions (its `Agent` spec), given to the provider with each
    /// `prompt` task; `None` for the Seed and the Chief of Staff.
    pub instructions: Option<String>,
}

impl<S: ToolRegistry + UsageLog + Clone> Handler for Worker<S> {
    async fn handle(&self, task: Assignment, _ctx: TaskContext) -> Outcome {
        let kind = task
            .action
            .as_object()
            .and_then(|a| a.keys().next().cloned())
            .unwrap_or_default();
        match kind.as_str() {
            "prompt" => self.prompt(&task).await,
            "run" => match string_list(task.action.get("run").and_then(|r| r.get("command"))) {
                Some(argv) => self.execute(&task, argv).await,
                None => Outcome::fail("`action.run.command` is not a list of strings", false),
            },
            "tool" => self.tool(&task).await,
            "plan" => self.plan(&task).await,
            other => Outcome::fail(format!("unknown action `{other}`"), false),
        }
    }
}

fn string_list(value: Option<&serde_json::Value>) -> Option<Vec<String>> {
    let list: Vec<String> = value?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<_>>()?;
    (!list.is_empty()).then_some(list)
}

fn output_paths(task: &Assignment) -> Vec<String> {
    task.output
        .get("paths")
        .and_then(serde_json::Value::as_array)
        .map(|p| {
            p.iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn output_none(task: &Assignment) -> bool {
    task.output.get("mode").and_then(serde_json::Value::as_str) == Some("none")
}

/// `{name}` in a tool's command replaced by the task's `with.name`.
pub fn fill_arguments(command: &[String], with: Option<&serde_json::Value>) -> Vec<String> {
    command
        .iter()
        .map(|arg| {
            let mut arg = arg.clone();
            if let Some(with) = with.and_then(serde_json::Value::as_object) {
                for (key, value) in with {
                    let value = match value {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    arg = arg.replace(&format!("{{{key}}}"), &value);
                }
            }
            arg
        })
        .collect()
}

impl<S: ToolRegistry + UsageLog + Clone> Worker<S> {
    fn caller<'a>(&'a self, task: &'a Assignment) -> Caller<'a> {
        Caller {
            agent: &self.name,
            task_id: Some(&task.id),
            usage: &self.shared.usage,
        }
    }

    async fn prompt(&self, task: &Assignment) -> Outcome {
        let mut work = match PromptWork::from_assignment(task) {
            Ok(work) => work,
            Err(e) => return Outcome::fail(error_chain(&e), false),
        };
        work.instructions = self.instructions.clone();
        let written = match self.provider.write(&self.caller(task), &work).await {
            Ok(written) => written,
            Err(e) => return Outcome::fail(error_chain(&e), e.is_retryable()),
        };
        let outside = outside_outputs(&written.files, &work.output_paths);
        if !outside.is_empty() {
            return Outcome::fail(
                format!(
                    "refusing to write {}: outside the task's output paths ({})",
                    outside.join(", "),
                    work.output_paths.join(", ")
                ),
                false,
            );
        }
        let paths: Vec<&str> = written.files.iter().map(|f| f.path.as_str()).collect();
        let result = json!({"summary": written.summary, "paths": paths});
        if output_none(task) {
            return Outcome::complete(result);
        }
        let files = written
            .files
            .iter()
            .map(|f| OutputFile::text(&f.path, &f.content))
            .collect();
        Outcome::complete_with_files(result, files)
    }

    async fn tool(&self, task: &Assignment) -> Outcome {
        let need = match ToolNeed::from_assignment(task, &self.name) {
            Ok(need) => need,
            Err(e) => return Outcome::fail(error_chain(&e), false),
        };
        match self.shared.store.use_tool(&need.name).await {
            Ok(Some(command)) if !command.is_empty() => {
                let with = task.action.get("tool").and_then(|t| t.get("with"));
                self.execute(task, fill_arguments(&command, with)).await
            }
            Ok(Some(_)) => Outcome::fail(
                format!("the tool `{}` has no command to run", need.name),
                false,
            ),
            Ok(None) => self.propose_tool(task, &need).await,
            Err(e) => Outcome::fail(error_chain(&e), true),
        }
    }

    async fn propose_tool(&self, task: &Assignment, need: &ToolNeed) -> Outcome {
        let draft = match self.provider.draft_tool(&self.caller(task), need).await {
            Ok(draft) => draft,
            Err(e) => return Outcome::fail(error_chain(&e), e.is_retryable()),
        };
        let branch = format!("agentops/proposals/tool-{}", need.name);
        let title = format!("New tool: {}", need.name);
        let proposed = match self
            .shared
            .proposer
            .propose(&branch, &title, &draft.summary, &draft.files)
            .await
        {
            Ok(proposed) => proposed,
            Err(e) => return Outcome::fail(error_chain(&e), true),
        };
        // The store finds this question by its start once the tool exists (`store::tools`).
        Outcome::question(format!(
            "The tool `{}` does not exist. I proposed it as {}; once it is merged, the \
             task runs again.",
            need.name,
            proposed.describe()
        ))
    }

    async fn plan(&self, task: &Assignment) -> Outcome {
        let source = self.shared.source.clone();
        let taken = match tokio::task::spawn_blocking(move || taken_projects(&source)).await {
            Ok(Ok(taken)) => taken,
            Ok(Err(e)) => return Outcome::fail(error_chain(&e), true),
            Err(e) => return Outcome::fail(e.to_string(), true),
        };
        let Some(request) = PlanRequest::from_assignment(task, taken) else {
            return Outcome::fail("the task's action is not `plan`", false);
        };
        match plan_and_propose(
            &self.provider,
            &self.caller(task),
            &self.shared.proposer,
            &request,
        )
        .await
        {
            Ok((name, proposed)) => Outcome::complete(json!({
                "project": name,
                "branch": proposed.branch,
                "commit": proposed.commit,
                "pull_request": proposed.pull_request.as_ref().map(|pr| pr.url.clone()),
            })),
            Err(PlanError::Provider(e)) => Outcome::fail(error_chain(&e), e.is_retryable()),
            Err(PlanError::Propose(e)) => Outcome::fail(error_chain(&e), true),
        }
    }

    /// Runs `argv` in a fresh checkout of the task's dispatch revision and completes the task
    /// with the files it wrote within `output.paths` and its log.
    async fn execute(&self, task: &Assignment, argv: Vec<String>) -> Outcome {
        let allowed = output_paths(task);
        let work = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => return Outcome::fail(format!("cannot make a work directory: {e}"), true),
        };
        let (checkout, home, tmp) = (
            work.path().join("checkout"),
            work.path().join("home"),
            work.path().join("tmp"),
        );
        for dir in [&home, &tmp] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                return Outcome::fail(format!("cannot make {}: {e}", dir.display()), true);
            }
        }
        let (source, revision, at) = (
            self.shared.source.clone(),
            task.revision.clone(),
            checkout.clone(),
        );
        let original =
            match tokio::task::spawn_blocking(move || check_out(&source, revision.as_deref(), &at))
                .await
            {
                Ok(Ok(original)) => original,
                Ok(Err(e)) => return Outcome::fail(error_chain(&e), true),
                Err(e) => return Outcome::fail(e.to_string(), true),
            };
        let env = sandbox_env(&home, &tmp);
        let timeout = task.timeout().unwrap_or(DEFAULT_RUN_TIMEOUT);
        let output = match tokio::time::timeout(timeout, run_in(&argv, &checkout, &env)).await {
            Err(_) => return Outcome::fail(format!("timed out after {timeout:?}"), true),
            Ok(Err(e)) => return Outcome::fail(format!("cannot run `{}`: {e}", argv[0]), false),
            Ok(Ok(output)) => output,
        };
        let log = format!(
            "$ {}\n--- stdout\n{}\n--- stderr\n{}\n--- {}\n",
            argv.join(" "),
            text(&output.stdout),
            text(&output.stderr),
            output.status
        );
        if !output.status.success() {
            let stderr = text(&output.stderr);
            let tail: String = stderr
                .chars()
                .rev()
                .take(2048)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Outcome::fail(
                format!("`{}` failed ({}): {}", argv[0], output.status, tail.trim()),
                true,
            );
        }
        let at = checkout.clone();
        let changed = match tokio::task::spawn_blocking(move || changed_files(&at, &original)).await
        {
            Ok(Ok(changed)) => changed,
            Ok(Err(e)) => return Outcome::fail(error_chain(&e), true),
            Err(e) => return Outcome::fail(e.to_string(), true),
        };
        let (inside, outside): (Vec<_>, Vec<_>) = changed
            .into_iter()
            .partition(|f| is_within(&f.path, &allowed));
        if !outside.is_empty() {
            let paths: Vec<&str> = outside.iter().map(|f| f.path.as_str()).collect();
            return Outcome::fail(
                format!(
                    "refused: the command wrote {} outside the task's output paths ({}); \
                     nothing was committed",
                    paths.join(", "),
                    allowed.join(", ")
                ),
                false,
            );
        }
        let written: Vec<String> = inside.iter().map(|f| f.path.clone()).collect();
        let mut files: Vec<OutputFile> = inside
            .into_iter()
            .map(|f| {
                let file = OutputFile::bytes(f.path, f.content);
                if f.executable {
                    file.executable()
                } else {
                    file
                }
            })
            .collect();
        let log_path = allowed
            .iter()
            .find(|p| p.ends_with('/'))
            .map(|folder| format!("{folder}{}.log", task.name));
        if let Some(path) = &log_path {
            files.retain(|f| &f.path != path);
            files.push(OutputFile::text(path, &log));
        }
        let result = json!({
            "exit_code": output.status.code(),
            "paths": written,
            "log": log_path,
            "stdout": text(&output.stdout),
            "stderr": text(&output.stderr),
        });
        if output_none(task) {
            return Outcome::complete(result);
        }
        Outcome::complete_with_files(result, files)
    }
}

/// Write the tree of the dispatch revision (the followed branch's head when it is unknown)
/// into `dir`, returning each file's blob id.
pub fn check_out(
    source: &GitSource,
    revision: Option<&str>,
    dir: &Path,
) -> Result<HashMap<String, Oid>, AgentError> {
    let repo = source.open()?;
    // Outputs merged since the dispatch (a dependency's, typically) are what the task works
    // on, so the head is taken when it descends from the dispatch revision; a dispatch
    // revision the head has moved away from (a force-push) is kept as it was.
    if let Err(e) = source.refresh(&repo, &[]) {
        tracing::warn!("checking out without a fetch: {}", error_chain(&e));
    }
    let head = source.head(&repo)?;
    let commit = match revision
        .and_then(revision_commit)
        .filter(|c| repo.find_commit(*c).is_ok())
    {
        Some(dispatched)
            if dispatched != head
                && !repo.graph_descendant_of(head, dispatched).unwrap_or(false) =>
        {
            dispatched
        }
        _ => head,
    };
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(git("reading the dispatch tree"))?;
    std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = HashMap::new();
    let mut failed = None;
    tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
        if entry.kind() != Some(ObjectType::Blob) {
            return TreeWalkResult::Ok;
        }
        let path = format!("{parent}{}", entry.name().unwrap_or_default());
        let mode = entry.filemode();
        // Symlinks are not checked out: a command must not be led outside its checkout.
        if mode == i32::from(git2::FileMode::Link) {
            return TreeWalkResult::Ok;
        }
        let written = repo
            .find_blob(entry.id())
            .map_err(git("reading a blob"))
            .and_then(|blob| {
                let target = dir.join(&path);
                let io = |source| AgentError::Io {
                    path: path.clone(),
                    source,
                };
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                std::fs::write(&target, blob.content()).map_err(io)?;
                if mode == i32::from(git2::FileMode::BlobExecutable) {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                        .map_err(io)?;
                }
                Ok(())
            });
        match written {
            Ok(()) => {
                files.insert(path, entry.id());
                TreeWalkResult::Ok
            }
            Err(e) => {
                failed = Some(e);
                TreeWalkResult::Abort
            }
        }
    })
    .or_else(|e| match failed.take() {
        Some(_) => Ok(()),
        None => Err(e),
    })
    .map_err(git("checking out"))?;
    match failed {
        Some(e) => Err(e),
        None => Ok(files),
    }
}

/// A file a command added or changed.
pub struct Changed {
    pub path: String,
    pub content: Vec<u8>,
    pub executable: bool,
}

/// The files under `dir` that are new or differ from `original`. A symlink the command made
/// counts as changed, with no content: it is refused wherever it is.
pub fn changed_files(
    dir: &Path,
    original: &HashMap<String, Oid>,
) -> Result<Vec<Changed>, AgentError> {
    let mut changed = Vec::new();
    for entry in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(|e| AgentError::Io {
            path: dir.display().to_string(),
            source: e.into(),
        })?;
        if entry.file_type().is_dir() {
            continue;
        }
        let Ok(relative) = entry.path().strip_prefix(dir) else {
            continue;
        };
        let path = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if entry.file_type().is_symlink() {
            changed.push(Changed {
                path: format!("{path} (a symlink)"),
                content: Vec::new(),
                executable: false,
            });
            continue;
        }
        let content = std::fs::read(entry.path()).map_err(|source| AgentError::Io {
            path: path.clone(),
            source,
        })?;
        let oid = Oid::hash_object(ObjectType::Blob, &content).map_err(git("hashing a file"))?;
        if original.get(&path) == Some(&oid) {
            continue;
        }
        let executable = {
            use std::os::unix::fs::PermissionsExt;
            entry
                .metadata()
                .map(|m| m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        };
        changed.push(Changed {
            path,
            content,
            executable,
        });
    }
    Ok(changed)
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
        };
        let mut agents = Vec::with_capacity(2 + specialists.len());
        for config in [
            AgentConfig {
                capabilities: seed_capabilities,
                concurrency: 2,
                claim_wait: Duration::from_secs(2),
                ..AgentConfig::new(&api, "seed")
            },
            AgentConfig {
                agent_type: AgentType::Cos,
                claim_wait: Duration::from_secs(2),
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
        running.spawn(propose_specialists(shared.clone(), stop.claiming().clone()));
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

/// The capability sets that pending `specialist` tasks need and no registered agent of that
/// role (or named like the assignee) has all of, each once, in the order first seen.
///
/// Only tasks assigned to the `specialist` role: a proposed specialist is of that role, so it
/// could not take a task assigned to `seed` or `cos` anyway (which then waits for a person to
/// give those agents the capability).
pub fn gaps(tasks: &[NeedingTask], agents: &[Registered]) -> Vec<NeedingTask> {
    let mut found: Vec<NeedingTask> = Vec::new();
    for task in tasks {
        if task.assignee != "specialist" {
            continue;
        }
        let served = agents.iter().any(|a| {
            (a.agent_type == task.assignee || a.name == task.assignee)
                && task.capabilities.iter().all(|c| a.capabilities.contains(c))
        });
        let mut wanted = task.capabilities.clone();
        wanted.sort();
        let repeat = found.iter().any(|f| {
            let mut have = f.capabilities.clone();
            have.sort();
            have == wanted
        });
        if !served && !repeat {
            found.push(task.clone());
        }
    }
    found
}

/// How often the Seed looks for work that no agent can take.
const GAP_CHECK: Duration = Duration::from_secs(5);

/// The Seed's search for missing specialists: when pending work needs capabilities no agent
/// has, it drafts a specialist `Agent` spec and proposes it (branch, and pull request with a
/// forge). Each capability set is proposed once per run; once the spec is merged, the next
/// `up` runs the specialist as an embedded agent and the task is claimed.
async fn propose_specialists<S: ToolRegistry + UsageLog + Clone>(
    shared: Arc<Embedded<S>>,
    stop: CancellationToken,
) {
    let mut proposed: Vec<Vec<String>> = Vec::new();
    loop {
        // The first pass waits too: the embedded agents register meanwhile.
        if stop
            .run_until_cancelled(tokio::time::sleep(GAP_CHECK))
            .await
            .is_none()
        {
            return;
        }
        match shared.store.unblock_tool_waiters().await {
            Ok(0) => {}
            Ok(n) => eprintln!("{n} task(s) waiting for a tool that exists now are pending again"),
            Err(e) => tracing::warn!(
                "cannot unblock tasks waiting for tools: {}",
                error_chain(&e)
            ),
        }
        let (tasks, agents) = match shared.store.capability_needs().await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("cannot look for missing specialists: {}", error_chain(&e));
                continue;
            }
        };
        for gap in gaps(&tasks, &agents) {
            let mut key = gap.capabilities.clone();
            key.sort();
            if proposed.contains(&key) {
                continue;
            }
            proposed.push(key);
            let need = AgentNeed {
                capabilities: gap.capabilities.clone(),
                task_title: gap.title.clone(),
                task_description: gap.description.clone(),
                taken: agents.iter().map(|a| a.name.clone()).collect(),
                models: shared
                    .llm
                    .as_ref()
                    .map(|l| l.models.clone())
                    .unwrap_or_default(),
            };
            let caller = Caller {
                agent: "seed",
                task_id: None,
                usage: &shared.usage,
            };
            let draft = match shared.provider.draft_agent(&caller, &need).await {
                Ok(draft) => draft,
                Err(e) => {
                    tracing::warn!("cannot draft a specialist: {}", error_chain(&e));
                    continue;
                }
            };
            let branch = format!("agentops/proposals/agent-{}", draft.name);
            let title = format!("New specialist: {}", draft.name);
            match shared
                .proposer
                .propose(&branch, &title, &draft.summary, &draft.files)
                .await
            {
                Ok(done) => eprintln!(
                    "no agent has {}: proposed the specialist {} as {}",
                    gap.capabilities.join(", "),
                    draft.name,
                    done.describe()
                ),
                Err(e) => tracing::warn!("cannot propose a specialist: {}", error_chain(&e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needing(assignee: &str, capabilities: &[&str]) -> NeedingTask {
        NeedingTask {
            assignee: assignee.to_owned(),
            title: "t".to_owned(),
            description: String::new(),
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn registered(name: &str, agent_type: &str, capabilities: &[&str]) -> Registered {
        Registered {
            name: name.to_owned(),
            agent_type: agent_type.to_owned(),
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn gaps_are_specialist_work_no_agent_covers_each_once() {
        let agents = [
            registered("seed", "seed", &["writing", "translation"]),
            registered("lawyer", "specialist", &["legal"]),
        ];
        let tasks = [
            needing("specialist", &["legal"]),
            needing("specialist", &["translation"]),
            needing("specialist", &["legal", "translation"]),
            needing("specialist", &["translation", "legal"]),
            needing("seed", &["painting"]),
        ];
        let found: Vec<Vec<String>> = gaps(&tasks, &agents)
            .into_iter()
            .map(|g| g.capabilities)
            .collect();
        assert_eq!(
            found,
            [
                vec!["translation".to_owned()],
                vec!["legal".to_owned(), "translation".to_owned()]
            ],
            "covered work, repeats and non-specialist work are not gaps"
        );
    }

    #[test]
    fn arguments_are_filled_from_with() {
        let command = vec![
            "python3".to_owned(),
            "t.py".to_owned(),
            "{url}".to_owned(),
            "--n={n}".to_owned(),
        ];
        let with = json!({"url": "https://x", "n": 3});
        assert_eq!(
            fill_arguments(&command, Some(&with)),
            ["python3", "t.py", "https://x", "--n=3"]
        );
    }

    #[test]
    fn changed_files_are_the_new_and_the_modified() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, content: &str| {
            let target = dir.path().join(path);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(target, content).unwrap();
        };
        write("same.txt", "same\n");
        write("edited.txt", "before\n");
        let hash = |content: &str| Oid::hash_object(ObjectType::Blob, content.as_bytes()).unwrap();
        let original: HashMap<String, Oid> = [
            ("same.txt".to_owned(), hash("same\n")),
            ("edited.txt".to_owned(), hash("before\n")),
            ("deleted.txt".to_owned(), hash("gone\n")),
        ]
        .into();
        write("edited.txt", "after\n");
        write("new/deep/file.txt", "new\n");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let changed = changed_files(dir.path(), &original).unwrap();
        let paths: Vec<&str> = changed.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            ["edited.txt", "link (a symlink)", "new/deep/file.txt"]
        );
        assert_eq!(changed[0].content, b"after\n");
        // A symlink is never within any output path.
        assert!(!is_within(&changed[1].path, &["link".to_owned()]));
    }
}
