//! What the Seed proposes when it lacks a capability: a `Tool` (a spec under `tools/` and
//! the script it runs) for a task that names a tool that does not exist, and a specialist
//! `Agent` (a spec under `agents/`) for a task no agent has the capabilities for.
//!
//! A draft is rendered here from its parts and checked like a plan: parsed by the `specs`
//! crate and validated, so that what is proposed is what `agentops validate` accepts.

use agentops_specs::model::{AgentSpec, AgentType, Kind, ToolSpec, ToolType};
use agentops_specs::{Diagnostic, Pos, Spec, parse_file};
use serde::{Deserialize, Serialize};

use crate::plan::{RenderError, RepoFile, check_files, render_object};
use crate::runtime::Assignment;

/// A tool a task asked for that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolNeed {
    /// `action.tool.name`.
    pub name: String,
    /// The names of the arguments the task passes (`action.tool.with`), sorted.
    pub arguments: Vec<String>,
    pub task_title: String,
    pub task_description: String,
    /// The agent drafting the tool: the spec's `createdBy`.
    pub created_by: String,
}

impl ToolNeed {
    /// The tool a claimed task names; an error when its action is not a `tool` action.
    pub fn from_assignment(task: &Assignment, created_by: &str) -> Result<ToolNeed, DraftError> {
        let tool = task.action.get("tool").ok_or(DraftError::NotTool)?;
        let name = tool
            .get("name")
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(DraftError::NotTool)?;
        let mut arguments: Vec<String> = tool
            .get("with")
            .and_then(serde_json::Value::as_object)
            .map(|with| with.keys().cloned().collect())
            .unwrap_or_default();
        arguments.sort();
        Ok(ToolNeed {
            name: name.to_owned(),
            arguments,
            task_title: task.title.clone(),
            task_description: task.description.clone(),
            created_by: created_by.to_owned(),
        })
    }
}

/// Capabilities a task needs that no agent has all of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentNeed {
    pub capabilities: Vec<String>,
    pub task_title: String,
    pub task_description: String,
    /// Names of the agents that exist; the draft takes another.
    pub taken: Vec<String>,
    /// The specialist's models, tried in order.
    pub models: Vec<String>,
}

/// A proposed resource and the files that make it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    pub kind: Kind,
    pub name: String,
    pub files: Vec<RepoFile>,
    /// Why it is proposed, for the pull request's description.
    pub summary: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    #[error("the task's action is not a `tool` action with a name")]
    NotTool,
}

/// The interpreters a drafted script may run under, and the extension its file gets.
pub const INTERPRETERS: [(&str, &str); 3] = [("sh", "sh"), ("bash", "sh"), ("python3", "py")];

/// The agent (by name) that has every capability in `required`, if any.
pub fn covering_agent<'a>(
    required: &[String],
    agents: &'a [(String, Vec<String>)],
) -> Option<&'a str> {
    agents
        .iter()
        .find(|(_, has)| required.iter().all(|c| has.contains(c)))
        .map(|(name, _)| name.as_str())
}

/// A script tool's files: `tools/<name>.<ext>` and the `Tool` spec `tools/<name>.yaml` whose
/// command runs it with the task's arguments (`{arg}`).
pub fn tool_draft(
    need: &ToolNeed,
    description: &str,
    interpreter: &str,
    script: &str,
    summary: String,
) -> Result<Draft, RenderError> {
    let extension = INTERPRETERS
        .iter()
        .find(|(i, _)| *i == interpreter)
        .map_or("sh", |(_, ext)| *ext);
    let script_path = format!("tools/{}.{extension}", need.name);
    let mut command = vec![interpreter.to_owned(), script_path.clone()];
    command.extend(need.arguments.iter().map(|a| format!("{{{a}}}")));
    let spec = ToolSpec {
        tool_type: ToolType::Script,
        description: description.to_owned(),
        command,
        created_by: need.created_by.clone(),
    };
    let mut script = script.to_owned();
    if !script.ends_with('\n') {
        script.push('\n');
    }
    Ok(Draft {
        kind: Kind::Tool,
        name: need.name.clone(),
        files: vec![
            RepoFile {
                path: format!("tools/{}.yaml", need.name),
                content: render_object(Kind::Tool, &need.name, &spec)?,
            },
            RepoFile {
                path: script_path,
                content: script,
            },
        ],
        summary,
    })
}

/// A specialist's file: `agents/<name>.yaml`.
pub fn agent_draft(
    name: &str,
    capabilities: Vec<String>,
    models: Vec<String>,
    instructions: &str,
    summary: String,
) -> Result<Draft, RenderError> {
    let spec = AgentSpec {
        agent_type: AgentType::Specialist,
        capabilities,
        models,
        concurrency: agentops_specs::model::default_concurrency(),
        instructions: instructions.to_owned(),
    };
    Ok(Draft {
        kind: Kind::Agent,
        name: name.to_owned(),
        files: vec![RepoFile {
            path: format!("agents/{name}.yaml"),
            content: render_object(Kind::Agent, name, &spec)?,
        }],
        summary,
    })
}

/// Parses and validates a draft's spec files, and checks that they declare the drafted
/// object, of its kind, under its name, and for a specialist that it has `capabilities` and
/// a name not in `taken`.
pub fn check_draft(
    draft: &Draft,
    capabilities: &[String],
    taken: &[String],
) -> Result<(), Vec<Diagnostic>> {
    let mut diagnostics = check_files(&draft.files);
    let spec_file = draft
        .files
        .iter()
        .find(|f| agentops_specs::is_spec_path(&f.path));
    let Some(spec_file) = spec_file else {
        diagnostics.push(Diagnostic::new(
            "(draft)",
            Pos::START,
            "the draft has no spec file",
        ));
        return Err(diagnostics);
    };
    let at = |message: String| Diagnostic::new(&spec_file.path, Pos::START, message);
    let parsed = parse_file(&spec_file.path, spec_file.content.as_bytes());
    match parsed.objects.as_slice() {
        [object] if object.kind() == draft.kind && object.name() == draft.name => {
            if let Spec::Agent(agent) = &object.spec {
                let missing: Vec<&str> = capabilities
                    .iter()
                    .filter(|c| !agent.capabilities.contains(c))
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    diagnostics.push(at(format!(
                        "the agent lacks the capabilities it is drafted for: {}",
                        missing.join(", ")
                    )));
                }
                if taken.contains(&draft.name) {
                    diagnostics.push(at(format!(
                        "an agent named `{}` already exists; choose another name",
                        draft.name
                    )));
                }
            }
        }
        _ if !parsed.is_ok() => {}
        _ => diagnostics.push(at(format!(
            "expected exactly one {} named `{}`",
            draft.kind, draft.name
        ))),
    }
    if diagnostics.is_empty() {
        Ok(())
    } else {
        Err(diagnostics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need() -> ToolNeed {
        ToolNeed {
            name: "web-scrape".to_owned(),
            arguments: vec!["out".to_owned(), "url".to_owned()],
            task_title: "Collect pricing".to_owned(),
            task_description: "Fetch the pricing pages.".to_owned(),
            created_by: "seed".to_owned(),
        }
    }

    #[test]
    fn a_tool_draft_runs_its_script_with_the_tasks_arguments() {
        let draft = tool_draft(
            &need(),
            "Fetch a page",
            "python3",
            "print(1)",
            String::new(),
        )
        .unwrap();
        assert_eq!(draft.files[0].path, "tools/web-scrape.yaml");
        assert_eq!(draft.files[1].path, "tools/web-scrape.py");
        assert_eq!(draft.files[1].content, "print(1)\n");
        assert_eq!(check_draft(&draft, &[], &[]), Ok(()));
        let parsed = parse_file(&draft.files[0].path, draft.files[0].content.as_bytes());
        let Spec::Tool(tool) = &parsed.objects[0].spec else {
            panic!("not a tool");
        };
        assert_eq!(
            tool.command,
            ["python3", "tools/web-scrape.py", "{out}", "{url}"]
        );
        assert_eq!(tool.created_by, "seed");
    }

    #[test]
    fn a_tool_with_a_bad_name_does_not_pass() {
        let mut bad = need();
        bad.name = "Web Scrape".to_owned();
        let draft = tool_draft(&bad, "x", "sh", "true", String::new()).unwrap();
        let errors = check_draft(&draft, &[], &[]).unwrap_err();
        assert!(
            errors.iter().any(|e| e.message.contains("Web Scrape")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_specialist_must_cover_the_capabilities_and_take_a_free_name() {
        let caps = vec!["writing".to_owned(), "legal".to_owned()];
        let draft = agent_draft(
            "legal-writer",
            caps.clone(),
            vec!["openai/gpt-4o-mini".to_owned()],
            "You write contracts.",
            String::new(),
        )
        .unwrap();
        assert_eq!(draft.files[0].path, "agents/legal-writer.yaml");
        assert_eq!(check_draft(&draft, &caps, &[]), Ok(()));
        let more = vec!["writing".to_owned(), "legal".to_owned(), "tax".to_owned()];
        let errors = check_draft(&draft, &more, &[]).unwrap_err();
        assert!(errors[0].message.contains("tax"), "{errors:?}");
        let errors = check_draft(&draft, &caps, &["legal-writer".to_owned()]).unwrap_err();
        assert!(errors[0].message.contains("already exists"), "{errors:?}");
    }

    #[test]
    fn covering_agents_have_every_capability() {
        let agents = vec![
            ("a".to_owned(), vec!["writing".to_owned()]),
            (
                "b".to_owned(),
                vec!["writing".to_owned(), "legal".to_owned()],
            ),
        ];
        let need = |caps: &[&str]| caps.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>();
        assert_eq!(covering_agent(&need(&["writing"]), &agents), Some("a"));
        assert_eq!(
            covering_agent(&need(&["legal", "writing"]), &agents),
            Some("b")
        );
        assert_eq!(covering_agent(&need(&["tax"]), &agents), None);
        assert_eq!(covering_agent(&[], &agents), Some("a"));
    }

    #[test]
    fn the_need_of_a_tool_task() {
        let task: Assignment = serde_json::from_value(serde_json::json!({
            "id": "t", "run_lease": 1, "title": "Scrape",
            "action": {"tool": {"name": "web-scrape", "with": {"url": "u", "a": 1}}}
        }))
        .unwrap();
        let need = ToolNeed::from_assignment(&task, "seed").unwrap();
        assert_eq!(need.name, "web-scrape");
        assert_eq!(need.arguments, ["a", "url"]);
        let prompt: Assignment = serde_json::from_value(serde_json::json!({
            "id": "t", "run_lease": 1, "action": {"prompt": "x"}
        }))
        .unwrap();
        assert!(ToolNeed::from_assignment(&prompt, "seed").is_err());
    }
}
