//! A project plan, the spec files it becomes, and the check that those files are what
//! `agentops validate` accepts.
//!
//! A plan is only ever used through its files: [`propose`] renders it ([`render`], a pure
//! function), parses the result with the `specs` crate's own parser and validates it across
//! objects, so a proposal that passes here passes `agentops validate` and the controller's
//! sync, and a plan that fails gets the same `path:line:column: message` errors a person would.

use agentops_specs::model::{
    API_VERSION, Action, Kind, ObjectMeta, Output, OutputMode, Priority, ProjectSpec, TaskSpec,
};
use agentops_specs::{Diagnostic, Pos, parse_file, validate};
use serde::{Deserialize, Serialize};

/// A file to commit, relative to the repository root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoFile {
    pub path: String,
    pub content: String,
}

/// A project and its tasks, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The project's name (a DNS label).
    pub name: String,
    pub project: ProjectSpec,
    pub tasks: Vec<PlannedTask>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTask {
    pub name: String,
    pub spec: TaskSpec,
}

/// A validated plan with the files to commit for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub plan: Plan,
    pub files: Vec<RepoFile>,
}

impl Proposal {
    /// The project's name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// The project's title, for a pull request ("New project: …").
    pub fn title(&self) -> &str {
        &self.plan.project.title
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write {kind} {name} as YAML")]
pub struct RenderError {
    pub kind: Kind,
    pub name: String,
    #[source]
    pub source: serde_saphyr::SerializeError,
}

/// One resource document as YAML.
pub fn render_object<S: Serialize>(
    kind: Kind,
    name: &str,
    spec: &S,
) -> Result<String, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Document<'a, S> {
        api_version: &'static str,
        kind: &'static str,
        metadata: ObjectMeta,
        spec: &'a S,
    }
    let document = Document {
        api_version: API_VERSION,
        kind: kind.as_str(),
        metadata: ObjectMeta {
            name: name.to_owned(),
            ..ObjectMeta::default()
        },
        spec,
    };
    serde_saphyr::to_string(&document).map_err(|source| RenderError {
        kind,
        name: name.to_owned(),
        source,
    })
}

/// The files of a plan: `projects/<p>/project.yaml` and `projects/<p>/tasks/<t>.yaml`, in the
/// plan's order.
pub fn render(plan: &Plan) -> Result<Vec<RepoFile>, RenderError> {
    let dir = format!("projects/{}", plan.name);
    let mut files = Vec::with_capacity(plan.tasks.len() + 1);
    files.push(RepoFile {
        path: format!("{dir}/project.yaml"),
        content: render_object(Kind::Project, &plan.name, &plan.project)?,
    });
    for task in &plan.tasks {
        files.push(RepoFile {
            path: format!("{dir}/tasks/{}.yaml", task.name),
            content: render_object(Kind::Task, &task.name, &task.spec)?,
        });
    }
    Ok(files)
}

/// Parses and validates spec files together, as a sync of only these files would; every
/// problem, in file order.
pub fn check_files(files: &[RepoFile]) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let mut objects = Vec::new();
    for file in files {
        if !agentops_specs::is_spec_path(&file.path) {
            continue;
        }
        let parsed = parse_file(&file.path, file.content.as_bytes());
        diagnostics.extend(parsed.errors);
        objects.extend(parsed.objects);
    }
    diagnostics.extend(validate(&objects).diagnostics);
    diagnostics
}

/// Renders a plan and checks it; `taken` are the names of projects that already exist.
pub fn propose(plan: Plan, taken: &[String]) -> Result<Proposal, Vec<Diagnostic>> {
    let project_file = format!("projects/{}/project.yaml", plan.name);
    let at = |message: String| Diagnostic::new(&project_file, Pos::START, message);
    let mut diagnostics = Vec::new();
    if taken.contains(&plan.name) {
        diagnostics.push(at(format!(
            "project `{}` already exists; choose another name",
            plan.name
        )));
    }
    if plan.tasks.is_empty() {
        diagnostics.push(at("a plan needs at least one task".to_owned()));
    }
    let files = match render(&plan) {
        Ok(files) => files,
        Err(e) => {
            diagnostics.push(at(crate::error_chain(&e)));
            return Err(diagnostics);
        }
    };
    diagnostics.extend(check_files(&files));
    if diagnostics.is_empty() {
        Ok(Proposal { plan, files })
    } else {
        Err(diagnostics)
    }
}

/// A name made of `text`: lowercase ASCII letters and digits joined by `-`, at most
/// `max_len` characters and cut between words; `fallback` when nothing is left.
pub fn slugify(text: &str, max_len: usize, fallback: &str) -> String {
    let mut slug = String::new();
    for word in text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_ascii_lowercase();
        let extra = usize::from(!slug.is_empty()) + word.len();
        if slug.len() + extra > max_len {
            if slug.is_empty() {
                slug = word[..max_len.min(word.len())].to_owned();
            }
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word);
    }
    if slug.is_empty() {
        fallback.to_owned()
    } else {
        slug
    }
}

/// `base`, or `base-2`, `base-3`, … whichever is not in `taken`; kept within 63 characters.
pub fn unique_name(base: &str, taken: &[String]) -> String {
    if !taken.iter().any(|t| t == base) {
        return base.to_owned();
    }
    (2..)
        .map(|n| {
            let suffix = format!("-{n}");
            let stem = base[..base.len().min(63 - suffix.len())].trim_end_matches('-');
            format!("{stem}{suffix}")
        })
        .find(|candidate| !taken.contains(candidate))
        .expect("some suffix is free")
}

/// Where a planned task writes by default: a folder of the project's results.
pub fn default_output_paths(project: &str) -> Vec<String> {
    vec![format!("results/{project}/")]
}

/// A plan as a model writes it: a flat JSON shape that is easy to ask for, turned into specs
/// by [`PlanDraft::into_plan`]. Unknown fields are errors, as in spec files, so that a
/// misspelt field is sent back to the model instead of being dropped.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDraft {
    pub project: ProjectDraft,
    pub tasks: Vec<TaskDraft>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProjectDraft {
    pub name: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskDraft {
    pub name: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// What the Seed is asked to do: the task's `action.prompt`.
    pub instructions: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub acceptance_criteria: Vec<String>,
    #[serde(default)]
    pub output_paths: Vec<String>,
    #[serde(default)]
    pub priority: Priority,
}

impl PlanDraft {
    /// The plan, named `name` when given (the person's choice wins over the model's).
    pub fn into_plan(self, name: Option<&str>) -> Plan {
        let project_name = name.map_or(self.project.name, str::to_owned);
        let tasks = self
            .tasks
            .into_iter()
            .map(|t| {
                let paths = if t.output_paths.is_empty() {
                    default_output_paths(&project_name)
                } else {
                    t.output_paths
                };
                PlannedTask {
                    name: t.name,
                    spec: TaskSpec {
                        project: project_name.clone(),
                        title: t.title,
                        description: t.description,
                        assignee: agentops_specs::model::default_assignee(),
                        capabilities: t.capabilities,
                        priority: t.priority,
                        depends_on: t.depends_on,
                        action: Action::Prompt(t.instructions),
                        output: Output {
                            mode: OutputMode::PullRequest,
                            paths,
                        },
                        timeout: None,
                        retries: agentops_specs::model::default_retries(),
                        acceptance_criteria: t.acceptance_criteria,
                    },
                }
            })
            .collect();
        Plan {
            name: project_name,
            project: ProjectSpec {
                title: self.project.title,
                description: self.project.description,
                priority: self.project.priority,
                owner: Some("cos".to_owned()),
                suspend: false,
            },
            tasks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(project: &str, name: &str, depends_on: &[&str]) -> PlannedTask {
        PlannedTask {
            name: name.to_owned(),
            spec: TaskSpec {
                project: project.to_owned(),
                title: format!("Do {name}"),
                description: "Line one.\nLine two: with a colon, and \"quotes\".".to_owned(),
                assignee: "seed".to_owned(),
                capabilities: vec!["writing".to_owned()],
                priority: Priority::new(70).unwrap(),
                depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
                action: Action::Prompt(format!("Write {name}.md")),
                output: Output {
                    mode: OutputMode::PullRequest,
                    paths: vec![format!("results/{project}/")],
                },
                timeout: None,
                retries: 2,
                acceptance_criteria: vec!["it exists".to_owned()],
            },
        }
    }

    fn plan() -> Plan {
        Plan {
            name: "demo".to_owned(),
            project: ProjectSpec {
                title: "A demo: with a colon".to_owned(),
                description: "Why.\n\n- a bullet".to_owned(),
                priority: Priority::default(),
                owner: Some("cos".to_owned()),
                suspend: false,
            },
            tasks: vec![
                task("demo", "first", &[]),
                task("demo", "second", &["first"]),
            ],
        }
    }

    #[test]
    fn a_plan_renders_to_files_the_parser_reads_back_unchanged() {
        let plan = plan();
        let proposal = propose(plan.clone(), &[]).unwrap();
        let paths: Vec<&str> = proposal.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "projects/demo/project.yaml",
                "projects/demo/tasks/first.yaml",
                "projects/demo/tasks/second.yaml"
            ]
        );
        let second = parse_file(
            &proposal.files[2].path,
            proposal.files[2].content.as_bytes(),
        );
        assert!(second.is_ok(), "{:?}", second.errors);
        let agentops_specs::Spec::Task(spec) = &second.objects[0].spec else {
            panic!("not a task");
        };
        assert_eq!(spec, &plan.tasks[1].spec);
        let project = parse_file(
            &proposal.files[0].path,
            proposal.files[0].content.as_bytes(),
        );
        let agentops_specs::Spec::Project(spec) = &project.objects[0].spec else {
            panic!("not a project");
        };
        assert_eq!(spec, &plan.project);
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(render(&plan()).unwrap(), render(&plan()).unwrap());
    }

    #[test]
    fn invalid_plans_are_refused_with_positions() {
        let mut bad = plan();
        bad.tasks[1].spec.depends_on = vec!["missing".to_owned()];
        bad.tasks[0].name = "Bad Name".to_owned();
        let errors = propose(bad, &[]).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.contains("projects/demo/tasks/second.yaml:") && e.contains("`missing`")),
            "{text:?}"
        );
        assert!(text.iter().any(|e| e.contains("Bad Name")), "{text:?}");

        let taken = propose(plan(), &["demo".to_owned()]).unwrap_err();
        assert!(taken[0].message.contains("already exists"), "{taken:?}");

        let mut empty = plan();
        empty.tasks.clear();
        let errors = propose(empty, &[]).unwrap_err();
        assert!(
            errors[0].message.contains("at least one task"),
            "{errors:?}"
        );
    }

    #[test]
    fn slugs_are_dns_labels_cut_between_words() {
        assert_eq!(
            slugify("Launch the Website!", 40, "x"),
            "launch-the-website"
        );
        assert_eq!(slugify("  --  ", 40, "project"), "project");
        assert_eq!(slugify("Ünïcode café", 40, "x"), "n-code-caf");
        assert_eq!(
            slugify("research competitors pricing", 20, "x"),
            "research-competitors"
        );
        assert_eq!(slugify(&"a".repeat(100), 10, "x"), "aaaaaaaaaa");
        for text in ["Hello, World", "x".repeat(200).as_str(), "1. Do it"] {
            let slug = slugify(text, 63, "x");
            assert_eq!(
                agentops_specs::names::check_dns_label(&slug),
                Ok(()),
                "{slug}"
            );
        }
    }

    #[test]
    fn unique_names_take_the_next_free_suffix() {
        let taken = vec!["a".to_owned(), "a-2".to_owned()];
        assert_eq!(unique_name("b", &taken), "b");
        assert_eq!(unique_name("a", &taken), "a-3");
        let long = "x".repeat(63);
        let name = unique_name(&long, std::slice::from_ref(&long));
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("-2"));
    }

    #[test]
    fn a_draft_becomes_prompt_tasks_with_default_outputs() {
        let draft: PlanDraft = serde_json::from_value(serde_json::json!({
            "project": {"name": "site", "title": "Site", "priority": "high"},
            "tasks": [
                {"name": "copy", "title": "Copy", "instructions": "Write copy",
                 "acceptanceCriteria": ["short"]},
                {"name": "page", "title": "Page", "instructions": "Build it",
                 "dependsOn": ["copy"], "outputPaths": ["site/"]}
            ]
        }))
        .unwrap();
        let plan = draft.clone().into_plan(None);
        assert_eq!(plan.name, "site");
        assert_eq!(plan.project.priority.value(), 70);
        assert_eq!(plan.tasks[0].spec.output.paths, ["results/site/"]);
        assert_eq!(plan.tasks[1].spec.output.paths, ["site/"]);
        assert_eq!(
            plan.tasks[1].spec.action,
            Action::Prompt("Build it".to_owned())
        );
        assert!(propose(plan, &[]).is_ok());
        let renamed = draft.into_plan(Some("other"));
        assert_eq!(renamed.name, "other");
        assert!(renamed.tasks.iter().all(|t| t.spec.project == "other"));

        let typo = serde_json::from_value::<PlanDraft>(serde_json::json!({
            "project": {"name": "s", "title": "S"},
            "tasks": [{"name": "a", "title": "A", "instructions": "x", "depends_on": []}]
        }));
        assert!(typo.unwrap_err().to_string().contains("depends_on"));
    }
}
