//! The handler of every agent `agentops` runs, embedded in `up` or alone (`agentops agent`):
//! the Seed's `prompt`, `run` and `tool` actions and the Chief of Staff's `plan`. What it
//! does with Git and the store goes through its [`Services`].

use std::sync::Arc;

use agentops_agents::command::{run_in, sandbox_env, text};
use agentops_agents::drafts::ToolNeed;
use agentops_agents::llm::Caller;
use agentops_agents::prompt::{PromptWork, is_within, outside_outputs};
use agentops_agents::protocol::{ProposalKind, ProposalRequest};
use agentops_agents::provider::{AnyProvider, PlanRequest, Provider};
use agentops_agents::runtime::{AgentLine, Assignment, Handler, Outcome, OutputFile, TaskContext};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::error_chain;

use super::*;

/// The handler of an agent: the Seed's actions, and the Chief of Staff's `plan`.
pub struct Worker<V> {
    pub shared: Arc<V>,
    pub name: String,
    /// The shared provider, or a specialist's own models.
    pub provider: Arc<AnyProvider>,
    /// A specialist's instructions (its `Agent` spec), given to the provider with each
    /// `prompt` task; `None` for the Seed and the Chief of Staff.
    pub instructions: Option<String>,
    /// Whether this agent drafts specialists for work no agent can take: one Seed of an
    /// installation's agents does, beside its tasks.
    pub drafts_specialists: bool,
}

impl<V: Services> Handler for Worker<V> {
    async fn handle(&self, task: Assignment, ctx: TaskContext) -> Outcome {
        let ctx = &ctx;
        let kind = task
            .action
            .as_object()
            .and_then(|a| a.keys().next().cloned())
            .unwrap_or_default();
        match kind.as_str() {
            "prompt" => self.prompt(ctx, &task).await,
            "run" => match string_list(task.action.get("run").and_then(|r| r.get("command"))) {
                Some(argv) => self.execute(ctx, &task, argv).await,
                None => Outcome::fail("`action.run.command` is not a list of strings", false),
            },
            "tool" => self.tool(ctx, &task).await,
            "plan" => self.plan(ctx, &task).await,
            other => Outcome::fail(format!("unknown action `{other}`"), false),
        }
    }

    async fn beside(&self, line: AgentLine, claiming: CancellationToken) {
        if self.drafts_specialists {
            self.draft_specialists(line, claiming).await;
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

impl<V: Services> Worker<V> {
    fn caller<'a>(&'a self, ctx: &'a TaskContext, task: &'a Assignment) -> Caller<'a> {
        Caller {
            agent: &self.name,
            task_id: Some(&task.id),
            usage: self.shared.usage(ctx.line()),
        }
    }

    async fn prompt(&self, ctx: &TaskContext, task: &Assignment) -> Outcome {
        let mut work = match PromptWork::from_assignment(task) {
            Ok(work) => work,
            Err(e) => return Outcome::fail(error_chain(&e), false),
        };
        work.instructions = self.instructions.clone();
        let written = match self.provider.write(&self.caller(ctx, task), &work).await {
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

    async fn tool(&self, ctx: &TaskContext, task: &Assignment) -> Outcome {
        let need = match ToolNeed::from_assignment(task, &self.name) {
            Ok(need) => need,
            Err(e) => return Outcome::fail(error_chain(&e), false),
        };
        match self.shared.use_tool(ctx, &need.name).await {
            Ok(Some(command)) if !command.is_empty() => {
                let with = task.action.get("tool").and_then(|t| t.get("with"));
                self.execute(ctx, task, fill_arguments(&command, with))
                    .await
            }
            Ok(Some(_)) => Outcome::fail(
                format!("the tool `{}` has no command to run", need.name),
                false,
            ),
            Ok(None) => self.propose_tool(ctx, task, &need).await,
            Err(e) => Outcome::fail(e, true),
        }
    }

    async fn propose_tool(&self, ctx: &TaskContext, task: &Assignment, need: &ToolNeed) -> Outcome {
        let draft = match self
            .provider
            .draft_tool(&self.caller(ctx, task), need)
            .await
        {
            Ok(draft) => draft,
            Err(e) => return Outcome::fail(error_chain(&e), e.is_retryable()),
        };
        let request = ProposalRequest {
            kind: ProposalKind::Tool,
            name: need.name.clone(),
            title: format!("New tool: {}", need.name),
            body: draft.summary.clone(),
            files: proposal_files(&draft.files),
        };
        let proposed = match self.shared.propose(ctx.line(), &request).await {
            Ok(proposed) => proposed,
            Err(failed) => return Outcome::fail(failed.message, failed.retryable),
        };
        // The store finds this question by its start once the tool exists (`store::tools`).
        Outcome::question(format!(
            "The tool `{}` does not exist. I proposed it as {}; once it is merged, the \
             task runs again.",
            need.name,
            describe(&proposed)
        ))
    }

    async fn plan(&self, ctx: &TaskContext, task: &Assignment) -> Outcome {
        let taken = match self.shared.taken_projects(ctx).await {
            Ok(taken) => taken,
            Err(e) => return Outcome::fail(e, true),
        };
        let Some(request) = PlanRequest::from_assignment(task, taken) else {
            return Outcome::fail("the task's action is not `plan`", false);
        };
        let proposal = match self.provider.plan(&self.caller(ctx, task), &request).await {
            Ok(proposal) => proposal,
            Err(e) => return Outcome::fail(error_chain(&e), e.is_retryable()),
        };
        match self
            .shared
            .propose(ctx.line(), &project_proposal(&request, &proposal))
            .await
        {
            Ok(proposed) => Outcome::complete(json!({
                "project": proposal.name(),
                "branch": proposed.branch,
                "commit": proposed.commit,
                "pull_request": proposed.pull_request,
            })),
            Err(failed) => Outcome::fail(failed.message, failed.retryable),
        }
    }

    /// Runs `argv` in a fresh checkout of the task's dispatch revision and completes the task
    /// with the files it wrote within `output.paths` and its log.
    async fn execute(&self, ctx: &TaskContext, task: &Assignment, argv: Vec<String>) -> Outcome {
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
        let original = match self.shared.check_out(ctx, task, &checkout).await {
            Ok(original) => original,
            Err(e) => return Outcome::fail(e, true),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
