//! Status files from store rows: a pure function of the rows, so the same rows always give
//! the same bytes (no clock, no map order), and a commit happens only when something a person
//! would see changed.
//!
//! [`Renderer`] keeps the last rendering of each project and re-renders only the projects
//! whose rows changed; the board is re-joined from the kept sections.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};

use serde_json::Value;

use crate::store::writeback::{StatusArtifact, StatusProject, StatusSnapshot, StatusTask};

/// The directory the controller owns.
pub const DIR: &str = ".agentops";
/// Under [`DIR`]: one `<project>.yaml` per project.
pub const STATUS_DIR: &str = "status";
/// Under [`DIR`]: the board.
pub const BOARD: &str = "STATUS.md";

/// One project's rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectRows<'a> {
    pub project: &'a StatusProject,
    pub tasks: Vec<(&'a StatusTask, Vec<&'a StatusArtifact>)>,
}

/// Group a snapshot's rows by project, in name order.
pub fn group(snapshot: &StatusSnapshot) -> Vec<ProjectRows<'_>> {
    let mut artifacts: HashMap<&str, Vec<&StatusArtifact>> = HashMap::new();
    for a in &snapshot.artifacts {
        artifacts.entry(a.task_id.as_str()).or_default().push(a);
    }
    let mut tasks: HashMap<&str, Vec<(&StatusTask, Vec<&StatusArtifact>)>> = HashMap::new();
    for t in &snapshot.tasks {
        let a = artifacts.remove(t.id.as_str()).unwrap_or_default();
        tasks.entry(t.project.as_str()).or_default().push((t, a));
    }
    let mut projects: Vec<&StatusProject> = snapshot.projects.iter().collect();
    projects.sort_by(|a, b| a.name.cmp(&b.name));
    projects
        .into_iter()
        .map(|p| {
            let mut tasks = tasks.remove(p.name.as_str()).unwrap_or_default();
            tasks.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            ProjectRows { project: p, tasks }
        })
        .collect()
}

/// How many tasks are in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub pending: usize,
    pub in_progress: usize,
    pub blocked: usize,
    pub review: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
}

impl Counts {
    fn of(rows: &ProjectRows<'_>) -> Counts {
        let mut c = Counts::default();
        for (t, _) in &rows.tasks {
            c.total += 1;
            match t.status.as_str() {
                "pending" => c.pending += 1,
                "in_progress" => c.in_progress += 1,
                "blocked" => c.blocked += 1,
                "review" => c.review += 1,
                "completed" => c.completed += 1,
                "failed" => c.failed += 1,
                _ => c.cancelled += 1,
            }
        }
        c
    }

    /// Completed tasks as a whole percentage of those not cancelled.
    pub fn percent(&self) -> usize {
        (self.completed * 100)
            .checked_div(self.total - self.cancelled)
            .unwrap_or(0)
    }
}

/// A Flux-style condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

fn condition(kind: &'static str, status: bool, reason: &'static str, message: &str) -> Condition {
    Condition {
        kind,
        status,
        reason,
        message: message.to_owned(),
    }
}

/// Ready / Reconciling / Stalled of a task in `phase`: Ready once its work is accepted,
/// Reconciling while the controller or an agent or a reviewer still has it, Stalled when it
/// cannot move without a person (failed, or blocked).
pub fn task_conditions(phase: &str, message: &str) -> [Condition; 3] {
    let (ready, reconciling, stalled) = match phase {
        "completed" => (
            condition("Ready", true, "Completed", message),
            condition("Reconciling", false, "Completed", ""),
            condition("Stalled", false, "Completed", ""),
        ),
        "in_progress" => (
            condition("Ready", false, "InProgress", message),
            condition("Reconciling", true, "InProgress", message),
            condition("Stalled", false, "InProgress", ""),
        ),
        "review" => (
            condition("Ready", false, "AwaitingReview", message),
            condition("Reconciling", true, "AwaitingReview", message),
            condition("Stalled", false, "AwaitingReview", ""),
        ),
        "blocked" => (
            condition("Ready", false, "Blocked", message),
            condition("Reconciling", false, "Blocked", ""),
            condition("Stalled", true, "Blocked", message),
        ),
        "failed" => (
            condition("Ready", false, "Failed", message),
            condition("Reconciling", false, "Failed", ""),
            condition("Stalled", true, "Failed", message),
        ),
        "cancelled" => (
            condition("Ready", false, "Cancelled", message),
            condition("Reconciling", false, "Cancelled", ""),
            condition("Stalled", false, "Cancelled", ""),
        ),
        _ => (
            condition("Ready", false, "Pending", message),
            condition("Reconciling", true, "Pending", message),
            condition("Stalled", false, "Pending", ""),
        ),
    };
    [ready, reconciling, stalled]
}

fn project_conditions(c: &Counts) -> [Condition; 3] {
    let counted = c.total - c.cancelled;
    let done = format!("{}/{} tasks completed", c.completed, counted);
    let stuck = c.failed + c.blocked;
    let moving = c.pending + c.in_progress + c.review;
    [
        if counted > 0 && c.completed == counted {
            condition("Ready", true, "Completed", &done)
        } else {
            condition("Ready", false, "InProgress", &done)
        },
        if moving > 0 {
            condition(
                "Reconciling",
                true,
                "InProgress",
                &format!("{moving} tasks pending, in progress or in review"),
            )
        } else {
            condition("Reconciling", false, "Idle", "")
        },
        if stuck > 0 {
            condition(
                "Stalled",
                true,
                "TasksStuck",
                &format!("{} failed, {} blocked", c.failed, c.blocked),
            )
        } else {
            condition("Stalled", false, "Healthy", "")
        },
    ]
}

/// What a person reads as the task's message: the error of a failed task, else its status
/// message.
pub(crate) fn task_message(t: &StatusTask) -> &str {
    match (t.status.as_str(), &t.error, &t.status_message) {
        ("failed", Some(error), _) => error,
        (_, _, Some(message)) => message,
        ("pending", Some(error), None) => error,
        _ => "",
    }
}

pub(crate) fn result_json(t: &StatusTask) -> Value {
    t.result
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null)
}

/// A YAML scalar that reads back as exactly this string: JSON's quoting is valid YAML.
fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn write_conditions(out: &mut String, indent: &str, conditions: &[Condition]) {
    let _ = writeln!(out, "{indent}conditions:");
    for c in conditions {
        let _ = writeln!(out, "{indent}  - type: {}", c.kind);
        let _ = writeln!(
            out,
            "{indent}    status: \"{}\"",
            if c.status { "True" } else { "False" }
        );
        let _ = writeln!(out, "{indent}    reason: {}", c.reason);
        if !c.message.is_empty() {
            let _ = writeln!(out, "{indent}    message: {}", quote(&c.message));
        }
    }
}

/// `.agentops/status/<project>.yaml`.
pub fn project_yaml(rows: &ProjectRows<'_>) -> String {
    let p = rows.project;
    let counts = Counts::of(rows);
    let mut out = String::with_capacity(256 + rows.tasks.len() * 512);
    out.push_str("# Written by agentops from its store; edits here are overwritten.\n");
    let _ = writeln!(out, "project: {}", quote(&p.name));
    let _ = writeln!(out, "phase: {}", p.status);
    if let Some(message) = &p.status_message {
        let _ = writeln!(out, "message: {}", quote(message));
    }
    let _ = writeln!(
        out,
        "progress: {{total: {}, completed: {}, inProgress: {}, review: {}, pending: {}, blocked: {}, failed: {}, cancelled: {}, percent: {}}}",
        counts.total,
        counts.completed,
        counts.in_progress,
        counts.review,
        counts.pending,
        counts.blocked,
        counts.failed,
        counts.cancelled,
        counts.percent()
    );
    write_conditions(&mut out, "", &project_conditions(&counts));
    if rows.tasks.is_empty() {
        out.push_str("tasks: {}\n");
        return out;
    }
    out.push_str("tasks:\n");
    for (t, artifacts) in &rows.tasks {
        let _ = writeln!(out, "  {}:", quote(&t.name));
        let _ = writeln!(out, "    title: {}", quote(&t.title));
        let _ = writeln!(out, "    phase: {}", t.status);
        let _ = writeln!(out, "    attempt: {}", t.attempt);
        if let Some(agent) = &t.agent {
            let _ = writeln!(out, "    agent: {}", quote(agent));
        }
        if let Some(at) = &t.started_at {
            let _ = writeln!(out, "    startedAt: {at}");
        }
        if let Some(at) = &t.completed_at {
            let _ = writeln!(out, "    completedAt: {at}");
        }
        let message = task_message(t);
        if !message.is_empty() {
            let _ = writeln!(out, "    message: {}", quote(message));
        }
        let result = result_json(t);
        if let Some(summary) = result.get("summary").and_then(Value::as_str) {
            let _ = writeln!(out, "    result: {}", quote(summary));
        }
        if let Some(output) = result.get("output") {
            if let Some(branch) = output.get("branch").and_then(Value::as_str) {
                let _ = writeln!(out, "    branch: {}", quote(branch));
            }
            if let Some(commit) = output.get("commit").and_then(Value::as_str) {
                let _ = writeln!(out, "    commit: {}", quote(commit));
            }
            if let Some(url) = output
                .get("pull_request")
                .and_then(|p| p.get("url"))
                .and_then(Value::as_str)
            {
                let _ = writeln!(out, "    pullRequest: {}", quote(url));
            }
        }
        if !artifacts.is_empty() {
            out.push_str("    artifacts:\n");
            for a in artifacts {
                let _ = writeln!(out, "      - name: {}", quote(&a.name));
                let _ = writeln!(out, "        type: {}", a.artifact_type);
                let _ = writeln!(out, "        key: {}", quote(&a.key));
            }
        }
        write_conditions(&mut out, "    ", &task_conditions(&t.status, message));
    }
    out
}

/// A table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let short: String = one_line.chars().take(120).collect();
    let short = if one_line.chars().count() > 120 {
        format!("{short}…")
    } else {
        short
    };
    short.replace('|', "\\|")
}

fn bar(percent: usize) -> String {
    let filled = percent / 10;
    format!("{}{}", "█".repeat(filled), "░".repeat(10 - filled))
}

/// One project's section of the board.
pub fn board_section(rows: &ProjectRows<'_>) -> String {
    let c = Counts::of(rows);
    let mut out = String::with_capacity(256 + rows.tasks.len() * 96);
    let _ = writeln!(
        out,
        "## {} ({})\n",
        cell(&rows.project.name),
        rows.project.status
    );
    let mut line = format!(
        "`{}` {}% · {}/{} completed",
        bar(c.percent()),
        c.percent(),
        c.completed,
        c.total - c.cancelled
    );
    for (n, what) in [
        (c.in_progress, "in progress"),
        (c.review, "in review"),
        (c.pending, "pending"),
        (c.blocked, "blocked"),
        (c.failed, "failed"),
        (c.cancelled, "cancelled"),
    ] {
        if n > 0 {
            let _ = write!(line, " · {n} {what}");
        }
    }
    out.push_str(&line);
    out.push_str("\n\n");
    if rows.tasks.is_empty() {
        out.push_str("No tasks.\n\n");
        return out;
    }
    out.push_str("| task | phase | attempt | agent | message |\n|---|---|---|---|---|\n");
    for (t, _) in &rows.tasks {
        let result = result_json(t);
        let pr = result
            .get("output")
            .and_then(|o| o.get("pull_request"))
            .and_then(|p| p.get("url"))
            .and_then(Value::as_str);
        let phase = match pr {
            Some(url) => format!("{} ([PR]({url}))", t.status),
            None => t.status.clone(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(&t.name),
            cell(&phase),
            t.attempt,
            cell(t.agent.as_deref().unwrap_or("")),
            cell(task_message(t))
        );
    }
    out.push('\n');
    out
}

/// `.agentops/STATUS.md` from the projects' sections, in name order.
pub fn board<'a>(sections: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from(
        "# agentops status\n\nWritten by agentops from its store; edits here are overwritten. \
         Each project's details are in `status/<project>.yaml`.\n\n",
    );
    let mut any = false;
    for section in sections {
        any = true;
        out.push_str(section);
    }
    if !any {
        out.push_str("No projects.\n");
    }
    out
}

/// What changed in `.agentops/` since the last rendering.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// `<project>.yaml` contents to write (`Some`) or remove (`None`).
    pub projects: BTreeMap<String, Option<String>>,
    /// The new board, when any project changed.
    pub board: Option<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.projects.is_empty() && self.board.is_none()
    }
}

struct Kept {
    hash: u64,
    section: String,
}

/// Renders incrementally: a project is rendered again only when its rows changed.
#[derive(Default)]
pub struct Renderer {
    kept: BTreeMap<String, Kept>,
    rendered_once: bool,
}

impl Renderer {
    pub fn new() -> Renderer {
        Renderer::default()
    }

    /// Forget everything, so that the next [`Renderer::update`] renders every project.
    pub fn reset(&mut self) {
        self.kept.clear();
        self.rendered_once = false;
    }

    /// The files that differ from the last update's.
    pub fn update(&mut self, snapshot: &StatusSnapshot) -> Delta {
        let mut delta = Delta::default();
        let grouped = group(snapshot);
        let mut seen = std::collections::HashSet::with_capacity(grouped.len());
        for rows in &grouped {
            let name = rows.project.name.clone();
            let mut hasher = DefaultHasher::new();
            rows.hash(&mut hasher);
            let hash = hasher.finish();
            seen.insert(name.clone());
            if self.kept.get(&name).is_some_and(|k| k.hash == hash) {
                continue;
            }
            delta
                .projects
                .insert(format!("{name}.yaml"), Some(project_yaml(rows)));
            self.kept.insert(
                name,
                Kept {
                    hash,
                    section: board_section(rows),
                },
            );
        }
        let gone: Vec<String> = self
            .kept
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for name in gone {
            self.kept.remove(&name);
            delta.projects.insert(format!("{name}.yaml"), None);
        }
        if !delta.projects.is_empty() || !self.rendered_once {
            delta.board = Some(board(self.kept.values().map(|k| k.section.as_str())));
            self.rendered_once = true;
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str) -> StatusProject {
        StatusProject {
            name: name.to_owned(),
            status: "active".to_owned(),
            status_message: None,
        }
    }

    fn task(id: &str, project: &str, name: &str, status: &str) -> StatusTask {
        StatusTask {
            id: id.to_owned(),
            project: project.to_owned(),
            name: name.to_owned(),
            title: format!("Title of {name}"),
            status: status.to_owned(),
            agent: Some("seed".to_owned()),
            attempt: 0,
            started_at: None,
            completed_at: None,
            status_message: None,
            error: None,
            result: None,
        }
    }

    fn snapshot() -> StatusSnapshot {
        let mut done = task("1", "web", "draft-copy", "completed");
        done.started_at = Some("2026-11-25T10:00:00Z".to_owned());
        done.completed_at = Some("2026-11-25T10:05:00Z".to_owned());
        done.result = Some(
            r#"{"summary": "wrote copy.md", "output": {"branch": "agentops/web/draft-copy", "commit": "abc", "pull_request": {"number": 7, "url": "https://github.example/o/r/pull/7"}}}"#
                .to_owned(),
        );
        let mut failed = task("2", "web", "publish", "failed");
        failed.attempt = 2;
        failed.error = Some("deploy | failed\nbadly".to_owned());
        StatusSnapshot {
            revision: Some("main@sha1:abc".to_owned()),
            projects: vec![project("web"), project("empty")],
            tasks: vec![failed, done],
            artifacts: vec![StatusArtifact {
                task_id: "1".to_owned(),
                name: "copy.md".to_owned(),
                artifact_type: "document".to_owned(),
                key: "s3://bucket/copy.md".to_owned(),
            }],
        }
    }

    #[test]
    fn project_file_has_phases_results_artifacts_and_conditions() {
        let snap = snapshot();
        let grouped = group(&snap);
        assert_eq!(grouped[0].project.name, "empty");
        let yaml = project_yaml(&grouped[1]);
        let expected = r#"# Written by agentops from its store; edits here are overwritten.
project: "web"
phase: active
progress: {total: 2, completed: 1, inProgress: 0, review: 0, pending: 0, blocked: 0, failed: 1, cancelled: 0, percent: 50}
conditions:
  - type: Ready
    status: "False"
    reason: InProgress
    message: "1/2 tasks completed"
  - type: Reconciling
    status: "False"
    reason: Idle
  - type: Stalled
    status: "True"
    reason: TasksStuck
    message: "1 failed, 0 blocked"
tasks:
  "draft-copy":
    title: "Title of draft-copy"
    phase: completed
    attempt: 0
    agent: "seed"
    startedAt: 2026-11-25T10:00:00Z
    completedAt: 2026-11-25T10:05:00Z
    result: "wrote copy.md"
    branch: "agentops/web/draft-copy"
    commit: "abc"
    pullRequest: "https://github.example/o/r/pull/7"
    artifacts:
      - name: "copy.md"
        type: document
        key: "s3://bucket/copy.md"
    conditions:
      - type: Ready
        status: "True"
        reason: Completed
      - type: Reconciling
        status: "False"
        reason: Completed
      - type: Stalled
        status: "False"
        reason: Completed
  "publish":
    title: "Title of publish"
    phase: failed
    attempt: 2
    agent: "seed"
    message: "deploy | failed\nbadly"
    conditions:
      - type: Ready
        status: "False"
        reason: Failed
        message: "deploy | failed\nbadly"
      - type: Reconciling
        status: "False"
        reason: Failed
      - type: Stalled
        status: "True"
        reason: Failed
        message: "deploy | failed\nbadly"
"#;
        assert_eq!(yaml, expected);
        // It is YAML a parser reads back to the same values.
        let parsed: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(
            parsed["tasks"]["publish"]["message"],
            "deploy | failed\nbadly"
        );
        assert_eq!(parsed["progress"]["percent"], 50);
    }

    #[test]
    fn board_has_a_progress_line_and_a_table_per_project() {
        let snap = snapshot();
        let grouped = group(&snap);
        let section = board_section(&grouped[1]);
        assert_eq!(
            section,
            "## web (active)\n\n`█████░░░░░` 50% · 1/2 completed · 1 failed\n\n\
             | task | phase | attempt | agent | message |\n|---|---|---|---|---|\n\
             | draft-copy | completed ([PR](https://github.example/o/r/pull/7)) | 0 | seed |  |\n\
             | publish | failed | 2 | seed | deploy \\| failed badly |\n\n"
        );
        assert!(board_section(&grouped[0]).contains("No tasks."));
    }

    #[test]
    fn renderer_re_renders_only_changed_projects_and_removes_gone_ones() {
        let mut snap = snapshot();
        let mut renderer = Renderer::new();
        let first = renderer.update(&snap);
        assert_eq!(
            first.projects.keys().collect::<Vec<_>>(),
            ["empty.yaml", "web.yaml"]
        );
        assert!(first.board.as_deref().unwrap().contains("## web (active)"));
        assert!(
            renderer.update(&snap).is_empty(),
            "same rows, nothing to write"
        );

        snap.tasks[0].status = "pending".to_owned();
        let second = renderer.update(&snap);
        assert_eq!(second.projects.keys().collect::<Vec<_>>(), ["web.yaml"]);
        assert!(second.board.as_deref().unwrap().contains("1 pending"));

        snap.projects.retain(|p| p.name != "empty");
        let third = renderer.update(&snap);
        assert_eq!(third.projects.get("empty.yaml"), Some(&None));
        assert!(!third.board.as_deref().unwrap().contains("## empty"));

        renderer.reset();
        assert_eq!(renderer.update(&snap).projects.len(), 1);
    }

    #[test]
    fn conditions_follow_the_phase() {
        let [ready, reconciling, stalled] = task_conditions("review", "PR #3");
        assert!(!ready.status && reconciling.status && !stalled.status);
        assert_eq!(ready.reason, "AwaitingReview");
        let [ready, reconciling, stalled] = task_conditions("blocked", "dep failed");
        assert!(!ready.status && !reconciling.status && stalled.status);
        let [ready, _, _] = task_conditions("completed", "");
        assert!(ready.status);
    }
}
