//! The provider that asks a model. Each answer is a JSON object, checked before it is used:
//! a plan or a draft must parse and validate as specs, and files must lie within the task's
//! output paths. An answer that does not pass is sent back once with its problems; a second
//! failure ends the work with those problems as the message.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{PlanRequest, Provider, ProviderError};
use crate::drafts::{
    AgentNeed, Draft, INTERPRETERS, ToolNeed, agent_draft, check_draft, tool_draft,
};
use crate::llm::{Caller, Format, LlmClient, Message};
use crate::plan::{PlanDraft, Proposal, RepoFile, propose};
use crate::prompt::{PromptWork, Written, outside_outputs};

const PLAN_SYSTEM: &str = r#"You are the Chief of Staff of a team of AI agents. Turn the person's request into a project plan that other agents will carry out.
Answer with one JSON object and nothing else, in exactly this shape:
{"project": {"name": "...", "title": "...", "description": "...", "priority": "medium"},
 "tasks": [{"name": "...", "title": "...", "description": "...", "instructions": "...",
            "dependsOn": [], "capabilities": [], "acceptanceCriteria": ["..."], "outputPaths": ["..."]}]}
Rules:
- Every name is lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit. Task names are unique.
- List tasks in the order they should run. dependsOn names earlier tasks of this plan.
- instructions say what the agent must write. An agent writes files only under its task's outputPaths: paths relative to the repository root such as "docs/launch/", never absolute, never containing "..", never under .git or .agentops. Leave outputPaths out to use results/<project name>/.
- priority is critical, high, medium, low or a number from 0 to 100.
- capabilities are only needed when the task requires a specialist (for example "legal"); usually leave it empty.
- Use 2 to 8 tasks, and no fields other than these."#;

const WRITE_SYSTEM: &str = r#"You are the Seed, an agent that completes tasks by writing files into a Git repository.
Answer with one JSON object and nothing else, in exactly this shape:
{"summary": "one or two sentences on what you wrote", "files": [{"path": "...", "content": "..."}]}
Rules:
- Write only files whose paths lie within the task's output paths. Paths are relative to the repository root.
- Give each file's complete content. Meet every acceptance criterion."#;

const TOOL_SYSTEM: &str = r#"You write small command-line tools for a team of AI agents.
Answer with one JSON object and nothing else, in exactly this shape:
{"description": "what the tool does, in one sentence", "interpreter": "sh", "script": "the whole script"}
Rules:
- interpreter is one of sh, bash, python3.
- The script receives the arguments listed by the user as positional arguments, in that order. It prints its result on standard output and exits with a non-zero status on failure.
- Use only what a standard Linux system provides."#;

const AGENT_SYSTEM: &str = r#"You design specialist AI agents for a team of agents.
Answer with one JSON object and nothing else, in exactly this shape:
{"name": "...", "instructions": "the specialist's system prompt"}
Rules:
- name is lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit, and says what the specialist does.
- instructions tell the specialist how to work: what it is expert in, to write only within a task's output paths, and to meet the task's acceptance criteria."#;

pub struct LlmProvider {
    llm: LlmClient,
}

impl LlmProvider {
    pub fn new(llm: LlmClient) -> LlmProvider {
        LlmProvider { llm }
    }

    /// The models asked, in order.
    pub fn models(&self) -> &[String] {
        &self.llm.config().models
    }

    /// Asks for a JSON answer and checks it; an answer that fails the check is sent back
    /// once with its problems.
    async fn ask<T>(
        &self,
        caller: &Caller<'_>,
        what: &'static str,
        system: &str,
        user: String,
        check: impl Fn(&str) -> Result<T, Vec<String>> + Send + Sync,
    ) -> Result<T, ProviderError> {
        let mut messages = vec![Message::system(system), Message::user(user)];
        let first = self
            .llm
            .chat(caller, &messages, Format::Json)
            .await
            .map_err(ProviderError::Llm)?;
        let problems = match check(&first.content) {
            Ok(value) => return Ok(value),
            Err(problems) => problems,
        };
        tracing::info!(
            what,
            model = %first.model,
            problems = %problems.join("; "),
            "the model's answer is invalid; asking once more"
        );
        messages.push(Message::assistant(first.content));
        messages.push(Message::user(format!(
            "That {what} is invalid:\n- {}\nAnswer again with the whole corrected JSON object \
             only.",
            problems.join("\n- ")
        )));
        let second = self
            .llm
            .chat(caller, &messages, Format::Json)
            .await
            .map_err(ProviderError::Llm)?;
        check(&second.content).map_err(|problems| ProviderError::Invalid { what, problems })
    }
}

impl Provider for LlmProvider {
    fn describe(&self) -> String {
        let config = self.llm.config();
        format!("{} with {}", config.base_url, config.models.join(", "))
    }

    async fn plan(
        &self,
        caller: &Caller<'_>,
        request: &PlanRequest,
    ) -> Result<Proposal, ProviderError> {
        if request.request.trim().is_empty() {
            return Err(ProviderError::EmptyRequest);
        }
        if let Some(name) = &request.project
            && request.taken.contains(name)
        {
            return Err(ProviderError::Taken(name.clone()));
        }
        let mut user = format!("Request:\n{}\n", request.request.trim());
        if let Some(name) = &request.project {
            user.push_str(&format!("\nName the project `{name}`.\n"));
        }
        if !request.taken.is_empty() {
            user.push_str(&format!(
                "\nThese project names are taken: {}.\n",
                request.taken.join(", ")
            ));
        }
        self.ask(caller, "plan", PLAN_SYSTEM, user, |answer| {
            let draft: PlanDraft = parse_answer(answer)?;
            let plan = draft.into_plan(request.project.as_deref());
            propose(plan, &request.taken)
                .map_err(|diagnostics| diagnostics.iter().map(ToString::to_string).collect())
        })
        .await
    }

    async fn write(
        &self,
        caller: &Caller<'_>,
        work: &PromptWork,
    ) -> Result<Written, ProviderError> {
        let mut user = format!(
            "Task: {}\nProject: {}\n\nInstructions:\n{}\n",
            work.title, work.project, work.prompt
        );
        if !work.description.trim().is_empty() {
            user.push_str(&format!("\nDescription:\n{}\n", work.description.trim()));
        }
        if !work.acceptance_criteria.is_empty() {
            user.push_str(&format!(
                "\nAcceptance criteria:\n- {}\n",
                work.acceptance_criteria.join("\n- ")
            ));
        }
        if let Some(comments) = &work.review_comments {
            user.push_str(&format!(
                "\nA person reviewed the previous attempt at this task and rejected it. Address \
                 their review this time:\n{}\n",
                comments.trim()
            ));
        }
        if work.output_paths.is_empty() {
            user.push_str(
                "\nThis task has no output paths: write no files, and put your whole answer in \
                 summary.\n",
            );
        } else {
            user.push_str(&format!(
                "\nOutput paths: {}\n",
                work.output_paths.join(", ")
            ));
        }
        let system = match &work.instructions {
            Some(instructions) => format!(
                "{WRITE_SYSTEM}\n\nYou do this task as a specialist. Your own instructions:\n{}",
                instructions.trim()
            ),
            None => WRITE_SYSTEM.to_owned(),
        };
        self.ask(caller, "answer", &system, user, |answer| {
            let written: Written = parse_answer(answer)?;
            check_written(&written, &work.output_paths)?;
            Ok(written)
        })
        .await
    }

    async fn draft_tool(
        &self,
        caller: &Caller<'_>,
        need: &ToolNeed,
    ) -> Result<Draft, ProviderError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ToolAnswer {
            description: String,
            interpreter: String,
            script: String,
        }
        let arguments = if need.arguments.is_empty() {
            "none".to_owned()
        } else {
            need.arguments.join(", ")
        };
        let user = format!(
            "Write the tool `{}` for this task.\nTask: {}\n{}\nArguments, in order: {arguments}\n",
            need.name, need.task_title, need.task_description
        );
        self.ask(caller, "tool", TOOL_SYSTEM, user, |answer| {
            let tool: ToolAnswer = parse_answer(answer)?;
            let mut problems = Vec::new();
            if !INTERPRETERS.iter().any(|(i, _)| *i == tool.interpreter) {
                problems.push(format!(
                    "interpreter `{}` is not one of sh, bash, python3",
                    tool.interpreter
                ));
            }
            if tool.script.trim().is_empty() {
                problems.push("script must not be empty".to_owned());
            }
            if tool.description.trim().is_empty() {
                problems.push("description must not be empty".to_owned());
            }
            if !problems.is_empty() {
                return Err(problems);
            }
            let summary = format!(
                "The task \"{}\" needs the tool `{}`, which does not exist. Drafted by a model: \
                 {}",
                need.task_title, need.name, tool.description
            );
            let draft = tool_draft(
                need,
                &tool.description,
                &tool.interpreter,
                &tool.script,
                summary,
            )
            .map_err(|e| vec![crate::error_chain(&e)])?;
            check_draft(&draft, &[], &[])
                .map_err(|d| d.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            Ok(draft)
        })
        .await
    }

    async fn draft_agent(
        &self,
        caller: &Caller<'_>,
        need: &AgentNeed,
    ) -> Result<Draft, ProviderError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct AgentAnswer {
            name: String,
            instructions: String,
        }
        let mut user = format!(
            "Design a specialist with the capabilities {} for this task, which no agent can do \
             now.\nTask: {}\n{}\n",
            need.capabilities.join(", "),
            need.task_title,
            need.task_description
        );
        if !need.taken.is_empty() {
            user.push_str(&format!(
                "These agent names are taken: {}.\n",
                need.taken.join(", ")
            ));
        }
        let models = if need.models.is_empty() {
            self.llm.config().models.clone()
        } else {
            need.models.clone()
        };
        self.ask(caller, "specialist", AGENT_SYSTEM, user, |answer| {
            let agent: AgentAnswer = parse_answer(answer)?;
            if agent.instructions.trim().is_empty() {
                return Err(vec!["instructions must not be empty".to_owned()]);
            }
            let summary = format!(
                "No agent has all of {}, which the task \"{}\" needs. Drafted by a model.",
                need.capabilities.join(", "),
                need.task_title
            );
            let draft = agent_draft(
                &agent.name,
                need.capabilities.clone(),
                models.clone(),
                &agent.instructions,
                summary,
            )
            .map_err(|e| vec![crate::error_chain(&e)])?;
            check_draft(&draft, &need.capabilities, &need.taken)
                .map_err(|d| d.iter().map(ToString::to_string).collect::<Vec<_>>())?;
            Ok(draft)
        })
        .await
    }
}

/// The problems of a `prompt` task's answer: paths outside the outputs, repeated paths, and
/// no file at all when the task has somewhere to write.
fn check_written(written: &Written, output_paths: &[String]) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let outside = outside_outputs(&written.files, output_paths);
    if !outside.is_empty() {
        problems.push(format!(
            "these paths are outside the output paths ({}): {}",
            if output_paths.is_empty() {
                "none".to_owned()
            } else {
                output_paths.join(", ")
            },
            outside.join(", ")
        ));
    }
    let mut seen: Vec<&RepoFile> = Vec::new();
    for file in &written.files {
        if seen.iter().any(|f| f.path == file.path) {
            problems.push(format!("{} is written twice", file.path));
        }
        seen.push(file);
    }
    if written.files.is_empty() && !output_paths.is_empty() {
        problems.push("no file was written".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The JSON object of an answer, also when a model wraps it in a code fence or prose; YAML
/// is accepted as well, since models sometimes answer in it.
fn parse_answer<T: DeserializeOwned>(answer: &str) -> Result<T, Vec<String>> {
    let text = json_part(answer);
    match serde_json::from_str(text) {
        Ok(value) => Ok(value),
        Err(json_error) => serde_saphyr::from_str(strip_fence(answer)).map_err(|_| {
            vec![format!(
                "the answer is not the JSON object asked for: {json_error}"
            )]
        }),
    }
}

fn json_part(answer: &str) -> &str {
    match (answer.find('{'), answer.rfind('}')) {
        (Some(start), Some(end)) if start < end => &answer[start..=end],
        _ => answer.trim(),
    }
}

fn strip_fence(answer: &str) -> &str {
    let text = answer.trim();
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    let body = rest.split_once('\n').map_or("", |(_, body)| body);
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Small {
        a: u32,
    }

    #[test]
    fn answers_are_read_from_fences_prose_and_yaml() {
        assert_eq!(parse_answer::<Small>(r#"{"a": 1}"#), Ok(Small { a: 1 }));
        assert_eq!(
            parse_answer::<Small>("```json\n{\"a\": 2}\n```"),
            Ok(Small { a: 2 })
        );
        assert_eq!(
            parse_answer::<Small>("Here it is: {\"a\": 3} Hope it helps."),
            Ok(Small { a: 3 })
        );
        assert_eq!(
            parse_answer::<Small>("```yaml\na: 4\n```"),
            Ok(Small { a: 4 })
        );
        let error = parse_answer::<Small>("I cannot do that.").unwrap_err();
        assert!(error[0].contains("not the JSON object"), "{error:?}");
    }

    #[test]
    fn written_files_must_stay_within_outputs() {
        let file = |path: &str| RepoFile {
            path: path.to_owned(),
            content: String::new(),
        };
        let outputs = vec!["site/".to_owned()];
        let ok = Written {
            files: vec![file("site/a.md")],
            summary: String::new(),
        };
        assert_eq!(check_written(&ok, &outputs), Ok(()));
        let bad = Written {
            files: vec![file("site/a.md"), file("site/a.md"), file("../etc/passwd")],
            summary: String::new(),
        };
        let problems = check_written(&bad, &outputs).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("../etc/passwd"));
        let none = Written {
            files: vec![],
            summary: String::new(),
        };
        assert!(check_written(&none, &outputs).unwrap_err()[0].contains("no file"));
        assert_eq!(check_written(&none, &[]), Ok(()));
    }
}
