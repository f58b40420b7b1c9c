//! The `prompt` action: a provider writes files for the task, and they land in the task's
//! worktree only if every path lies within the task's `output.paths`.
//!
//! Deciding is apart from doing: [`outside_outputs`] says which paths a task may not write, and
//! [`execute`] asks the provider, checks, and writes. Committing the files (a result branch,
//! a pull request) is the caller's.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::llm::Caller;
use crate::plan::RepoFile;
use crate::provider::{Provider, ProviderError};
use crate::runtime::Assignment;

/// What a `prompt` task asks, as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptWork {
    pub project: String,
    pub task: String,
    pub title: String,
    pub description: String,
    /// `action.prompt`.
    pub prompt: String,
    pub acceptance_criteria: Vec<String>,
    /// `output.paths`: files, or folders (with or without a trailing `/`).
    pub output_paths: Vec<String>,
    /// The instructions of the specialist doing the task (its `Agent` spec); none for the Seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// The comments of the review that rejected the last attempt's output, to address now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_comments: Option<String>,
}

impl PromptWork {
    /// The work of a claimed task; an error when its action is not a non-empty `prompt`.
    pub fn from_assignment(task: &Assignment) -> Result<PromptWork, PromptError> {
        let prompt = task
            .action
            .get("prompt")
            .and_then(serde_json::Value::as_str)
            .filter(|p| !p.trim().is_empty())
            .ok_or(PromptError::NotPrompt)?;
        let output_paths = task
            .output
            .get("paths")
            .and_then(serde_json::Value::as_array)
            .map(|paths| {
                paths
                    .iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(PromptWork {
            project: task.project.clone(),
            task: task.name.clone(),
            title: task.title.clone(),
            description: task.description.clone(),
            prompt: prompt.to_owned(),
            acceptance_criteria: task.acceptance_criteria.clone(),
            output_paths,
            instructions: None,
            review_comments: task.review_comments.clone(),
        })
    }
}

/// What a provider produced for a `prompt` task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub files: Vec<RepoFile>,
    /// A short account of the work, for the task's result.
    pub summary: String,
}

/// What [`execute`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptResult {
    /// The paths written, relative to the worktree.
    pub paths: Vec<String>,
    pub summary: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("the task's action is not a non-empty `prompt`")]
    NotPrompt,
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("refusing to write {}: outside the task's output paths ({})", .paths.join(", "), .allowed.join(", "))]
    Outside {
        paths: Vec<String>,
        allowed: Vec<String>,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to write {path}: it resolves outside the worktree")]
    Escapes { path: String },
}

impl PromptError {
    /// Whether running the task again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PromptError::Provider(e) => e.is_retryable(),
            PromptError::Write { .. } => true,
            PromptError::NotPrompt | PromptError::Outside { .. } | PromptError::Escapes { .. } => {
                false
            }
        }
    }
}

/// Whether `path` is one of `allowed` or inside one of them. Both must be plain relative
/// paths (see `agentops_specs::names::check_output_path`); anything else is never within.
pub fn is_within(path: &str, allowed: &[String]) -> bool {
    let Some(path) = plain_parts(path) else {
        return false;
    };
    if path.is_empty() {
        return false;
    }
    allowed.iter().any(|root| {
        // `site/` is a folder: the files in it, not a file named `site`.
        let folder = root.ends_with('/');
        plain_parts(root).is_some_and(|root| {
            !root.is_empty() && path.starts_with(&root) && (path.len() > root.len() || !folder)
        })
    })
}

/// The paths of `files` that a task with `allowed` output paths may not write.
pub fn outside_outputs(files: &[RepoFile], allowed: &[String]) -> Vec<String> {
    files
        .iter()
        .filter(|f| !is_within(&f.path, allowed))
        .map(|f| f.path.clone())
        .collect()
}

/// A relative path's parts, without `.` and empty parts; `None` for anything that is not
/// a plain relative path inside the repository.
fn plain_parts(path: &str) -> Option<Vec<&str>> {
    agentops_specs::names::check_output_path(path).ok()?;
    Some(
        path.split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect(),
    )
}

/// Asks the provider for the task's files, checks them against its output paths, and writes
/// them under `worktree`.
pub async fn execute<P: Provider + ?Sized>(
    provider: &P,
    caller: &Caller<'_>,
    work: &PromptWork,
    worktree: &Path,
) -> Result<PromptResult, PromptError> {
    let written = provider.write(caller, work).await?;
    let outside = outside_outputs(&written.files, &work.output_paths);
    if !outside.is_empty() {
        return Err(PromptError::Outside {
            paths: outside,
            allowed: work.output_paths.clone(),
        });
    }
    let root = worktree.to_owned();
    let files = written.files.clone();
    let paths = tokio::task::spawn_blocking(move || write_files(&root, &files))
        .await
        .map_err(|e| PromptError::Write {
            path: worktree.display().to_string(),
            source: std::io::Error::other(e),
        })??;
    Ok(PromptResult {
        paths,
        summary: written.summary,
    })
}

fn write_files(root: &Path, files: &[RepoFile]) -> Result<Vec<String>, PromptError> {
    let write_error = |path: &str| {
        let path = path.to_owned();
        move |source| PromptError::Write { path, source }
    };
    let root = root.canonicalize().map_err(write_error("."))?;
    let mut paths = Vec::with_capacity(files.len());
    for file in files {
        let relative: PathBuf = file
            .path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(PromptError::Escapes {
                path: file.path.clone(),
            });
        }
        let target = root.join(&relative);
        let parent = target.parent().unwrap_or(&root);
        std::fs::create_dir_all(parent).map_err(write_error(&file.path))?;
        // A checked-out symlink (`site -> /etc`) would carry the write out of the worktree.
        let real_parent = parent.canonicalize().map_err(write_error(&file.path))?;
        if !real_parent.starts_with(&root) {
            return Err(PromptError::Escapes {
                path: file.path.clone(),
            });
        }
        let real_target = real_parent.join(target.file_name().unwrap_or_default());
        if real_target
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(PromptError::Escapes {
                path: file.path.clone(),
            });
        }
        std::fs::write(&real_target, &file.content).map_err(write_error(&file.path))?;
        paths.push(file.path.clone());
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn paths_within_output_paths() {
        let allowed = allowed(&["site/", "docs", "report.md"]);
        for good in [
            "site/copy.md",
            "site/a/b.html",
            "docs/x.md",
            "report.md",
            "./site/x",
        ] {
            assert!(is_within(good, &allowed), "{good}");
        }
        for bad in [
            "sitex/copy.md",
            "site",
            "report.md.bak",
            "other.md",
            "site/../etc/passwd",
            "/site/x",
            ".git/config",
            "",
        ] {
            assert!(!is_within(bad, &allowed), "{bad}");
        }
        assert!(!is_within("anything", &[]));
        assert!(!is_within("x", &["".to_owned()]));
    }

    #[test]
    fn the_work_of_an_assignment() {
        let task: Assignment = serde_json::from_value(serde_json::json!({
            "id": "t", "run_lease": 1, "project": "p", "name": "n", "title": "T",
            "action": {"prompt": "Write it"},
            "output": {"mode": "pull-request", "paths": ["site/"]},
            "acceptance_criteria": ["done"]
        }))
        .unwrap();
        let work = PromptWork::from_assignment(&task).unwrap();
        assert_eq!(work.prompt, "Write it");
        assert_eq!(work.output_paths, ["site/"]);
        let run: Assignment = serde_json::from_value(serde_json::json!({
            "id": "t", "run_lease": 1, "action": {"run": {"command": ["true"]}}
        }))
        .unwrap();
        assert!(matches!(
            PromptWork::from_assignment(&run),
            Err(PromptError::NotPrompt)
        ));
    }

    #[test]
    fn writes_stay_inside_the_worktree_even_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("site")).unwrap();
        let files = vec![RepoFile {
            path: "site/copy.md".to_owned(),
            content: "x".to_owned(),
        }];
        let error = write_files(dir.path(), &files).unwrap_err();
        assert!(matches!(error, PromptError::Escapes { .. }), "{error}");
        assert!(!outside.path().join("copy.md").exists());

        let files = vec![RepoFile {
            path: "docs/a/b.md".to_owned(),
            content: "hello".to_owned(),
        }];
        assert_eq!(write_files(dir.path(), &files).unwrap(), ["docs/a/b.md"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("docs/a/b.md")).unwrap(),
            "hello"
        );
    }
}
