//! The provider used when no model is configured. It is deterministic: the same request gives
//! the same plan, the same task gives the same file, byte for byte, so the whole flow can be
//! tried without a key and tested exactly.
//!
//! - Planning: the request's heading or first sentence is the project's title; its bullet
//!   points (or else its other sentences) are the tasks, in order, each depending on the one
//!   before. A sentence that lists things to do ("Plan the offsite: book a venue, send the
//!   invitations, then confirm the catering") gives one task per item, see [`split_list`].
//! - Writing: one markdown file that restates the instructions and the acceptance criteria,
//!   marked as produced offline, at the path the prompt names (or in the first output folder).
//! - Drafting: a tool from a script template that only echoes its arguments, and a specialist
//!   from an instructions template.

use crate::drafts::{AgentNeed, Draft, ToolNeed, agent_draft, check_draft, tool_draft};
use crate::llm::{Caller, DEFAULT_MODELS};
use crate::plan::{
    Plan, PlannedTask, Proposal, RepoFile, default_output_paths, propose, slugify, unique_name,
};
use crate::prompt::{PromptWork, Written, is_within};

use super::{PlanRequest, Provider, ProviderError};
use agentops_specs::model::{Action, Output, OutputMode, Priority, ProjectSpec, TaskSpec};

/// Names are cut to this many characters between words: long enough to say what the
/// project or task is, short enough for a branch name.
const NAME_LEN: usize = 40;
/// Titles longer than this are cut (at a character boundary) and end with `…`.
const TITLE_LEN: usize = 120;

/// The line that marks a file as written without a model.
pub const OFFLINE_MARK: &str = "<!-- agentops: produced offline, without a language model -->";

#[derive(Debug, Clone, Copy, Default)]
pub struct OfflineProvider;

impl Provider for OfflineProvider {
    fn describe(&self) -> String {
        format!(
            "offline (deterministic; set {} to use a model)",
            crate::llm::API_KEY_ENV
        )
    }

    async fn plan(&self, _: &Caller<'_>, request: &PlanRequest) -> Result<Proposal, ProviderError> {
        let plan = plan_from_text(&request.request, request.project.as_deref(), &request.taken)?;
        propose(plan, &request.taken).map_err(|diagnostics| ProviderError::Offline {
            what: "plan",
            problems: diagnostics.iter().map(ToString::to_string).collect(),
        })
    }

    async fn write(&self, _: &Caller<'_>, work: &PromptWork) -> Result<Written, ProviderError> {
        Ok(write_offline(work))
    }

    async fn draft_tool(&self, _: &Caller<'_>, need: &ToolNeed) -> Result<Draft, ProviderError> {
        let draft = tool_offline(need);
        checked(draft, &[], &[], "tool")
    }

    async fn draft_agent(&self, _: &Caller<'_>, need: &AgentNeed) -> Result<Draft, ProviderError> {
        let draft = agent_offline(need);
        checked(draft, &need.capabilities, &need.taken, "agent")
    }
}

fn checked(
    draft: Result<Draft, crate::plan::RenderError>,
    capabilities: &[String],
    taken: &[String],
    what: &'static str,
) -> Result<Draft, ProviderError> {
    let offline = |problems| ProviderError::Offline { what, problems };
    let draft = draft.map_err(|e| offline(vec![crate::error_chain(&e)]))?;
    check_draft(&draft, capabilities, taken)
        .map_err(|d| offline(d.iter().map(ToString::to_string).collect()))?;
    Ok(draft)
}

/// The plan of a request: see the module's description. `name` is the project's name when the
/// person chose it; otherwise one is made from the title that is not in `taken`.
pub fn plan_from_text(
    request: &str,
    name: Option<&str>,
    taken: &[String],
) -> Result<Plan, ProviderError> {
    let (title, items) = outline(request).ok_or(ProviderError::EmptyRequest)?;
    let project = match name {
        Some(name) if taken.iter().any(|t| t == name) => {
            return Err(ProviderError::Taken(name.to_owned()));
        }
        Some(name) => name.to_owned(),
        None => unique_name(&slugify(&title, NAME_LEN, "project"), taken),
    };
    let title = clip(&title);
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    let mut tasks = Vec::with_capacity(items.len());
    for item in &items {
        let task = unique_name(&slugify(item, NAME_LEN, "task"), &names);
        let paths = default_output_paths(&project);
        let result = format!("{}{task}.md", paths[0]);
        tasks.push(PlannedTask {
            name: task.clone(),
            spec: TaskSpec {
                project: project.clone(),
                title: clip(item),
                description: format!("{item}\n\nPart of: {title}"),
                assignee: agentops_specs::model::default_assignee(),
                capabilities: Vec::new(),
                priority: Priority::default(),
                depends_on: names.last().cloned().into_iter().collect(),
                action: Action::Prompt(format!("{item}\n\nWrite the result into {result}.")),
                output: Output {
                    mode: OutputMode::PullRequest,
                    paths,
                },
                timeout: None,
                retries: agentops_specs::model::default_retries(),
                acceptance_criteria: vec![
                    format!("{result} exists"),
                    format!("It covers: {}", clip(item)),
                ],
            },
        });
        names.push(task);
    }
    Ok(Plan {
        name: project,
        project: ProjectSpec {
            title,
            description: request.trim().to_owned(),
            priority: Priority::default(),
            owner: Some("cos".to_owned()),
            suspend: false,
        },
        tasks,
    })
}

/// The request's title and its items; `None` when it says nothing.
fn outline(request: &str) -> Option<(String, Vec<String>)> {
    let mut heading: Option<String> = None;
    let mut bullets: Vec<String> = Vec::new();
    // Lines of prose, a wrapped sentence joined back into one line.
    let mut prose: Vec<String> = Vec::new();
    let mut last_was_bullet = false;
    for line in request.lines() {
        let text = line.trim();
        if text.is_empty() {
            last_was_bullet = false;
            continue;
        }
        if heading.is_none() && bullets.is_empty() && prose.is_empty() && text.starts_with('#') {
            let title = text.trim_start_matches('#').trim();
            if !title.is_empty() {
                heading = Some(title.to_owned());
            }
            continue;
        }
        if let Some(item) = bullet(text) {
            if !item.is_empty() {
                bullets.push(item.to_owned());
                last_was_bullet = true;
            }
            continue;
        }
        let indented = line.starts_with([' ', '\t']);
        match (
            last_was_bullet && indented,
            bullets.last_mut(),
            prose.last_mut(),
        ) {
            (true, Some(item), _) => {
                item.push(' ');
                item.push_str(text);
            }
            (false, _, Some(previous)) if continues(previous, text) => {
                previous.push(' ');
                previous.push_str(text);
            }
            _ => {
                prose.push(text.to_owned());
                last_was_bullet = false;
            }
        }
    }
    // Punctuation alone says nothing to plan from.
    let says_something = |text: &String| text.chars().any(char::is_alphanumeric);
    let heading = heading.filter(says_something);
    bullets.retain(says_something);
    let sentences: Vec<String> = prose
        .iter()
        .flat_map(|p| sentences(p))
        .filter(says_something)
        .collect();
    if !bullets.is_empty() {
        let title = heading
            .or_else(|| sentences.first().cloned())
            .unwrap_or_else(|| bullets[0].clone());
        return Some((strip_end(&title), bullets));
    }
    // A sentence is one task, or as many as it lists.
    let expand = |sentence: &String| match split_list(sentence) {
        Some((_, items)) => items,
        None => vec![sentence.clone()],
    };
    match heading {
        Some(title) if sentences.is_empty() => Some((title.clone(), vec![title])),
        Some(title) => Some((title, sentences.iter().flat_map(expand).collect())),
        None => {
            let first = sentences.first()?;
            let rest = sentences[1..].iter().flat_map(expand);
            match split_list(first) {
                // "Plan the offsite: book a venue, …": the lead-in is the title.
                Some((lead, items)) => {
                    let title = strip_end(lead.as_deref().unwrap_or(first));
                    Some((title, items.into_iter().chain(rest).collect()))
                }
                None if sentences.len() > 1 => Some((strip_end(first), rest.collect())),
                None => Some((strip_end(first), sentences)),
            }
        }
    }
}

/// Words that introduce the last item of a list, or any item: "…, and C", "…, then D",
/// "…, and then C", "…; and finally E".
const CONJUNCTIONS: [&str; 3] = ["and ", "then ", "finally "];

/// A sentence that lists things to do, as its lead-in and its items; `None` when it is not a
/// list. The rule, meant to split lists of actions and nothing else:
///
/// - Text before a colon that is followed by a list is the lead-in: "Plan a team offsite:
///   book a venue, send the invitations, then confirm the catering".
/// - Semicolons separate items: "Book a venue; send the invitations; and confirm".
/// - Without semicolons, commas (followed by a space) separate items only when the last item
///   is introduced by "and", "then" or "and then", after the last comma ("A, B, and C",
///   "A, B, C, then D", "A, B, and then C") or inside the last part ("A, B and C"), and only
///   when every item has at least two words. So a comma in a single task ("Write the report,
///   which is due on Friday"), an enumeration inside one task ("Buy apples, pears and plums")
///   and a bare "A and B" stay one item.
///
/// Each item loses its leading conjunction and its closing punctuation and starts with a
/// capital letter.
fn split_list(text: &str) -> Option<(Option<String>, Vec<String>)> {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((lead, rest)) = text.split_once(": ")
        && let Some(items) = list_items(rest)
    {
        let lead = lead.trim();
        let lead = (!lead.is_empty()).then(|| lead.to_owned());
        return Some((lead, items));
    }
    list_items(&text).map(|items| (None, items))
}

/// The items of a list (see [`split_list`]), without a lead-in.
fn list_items(text: &str) -> Option<Vec<String>> {
    let parts: Vec<&str> = if text.contains(';') {
        text.split(';').collect()
    } else {
        let mut parts: Vec<&str> = text.split(", ").collect();
        if parts.len() < 2 {
            return None;
        }
        let last = parts.pop()?;
        if starts_with_conjunction(last) {
            parts.push(last);
        } else {
            // "A, B and C", "A, B then C": the last part holds the last two items.
            let (before, after) = [" and then ", " then ", " and "]
                .iter()
                .find_map(|sep| last.rsplit_once(sep))?;
            parts.push(before);
            parts.push(after);
        }
        let words = |part: &str| {
            strip_conjunctions(part)
                .split_whitespace()
                .filter(|w| w.chars().any(char::is_alphanumeric))
                .count()
        };
        if parts.iter().any(|part| words(part) < 2) {
            return None;
        }
        parts
    };
    let items: Vec<String> = parts
        .into_iter()
        .map(|part| capitalize(strip_end_punctuation(strip_conjunctions(part.trim()))))
        .filter(|item| item.chars().any(char::is_alphanumeric))
        .collect();
    (items.len() >= 2).then_some(items)
}

fn starts_with_conjunction(text: &str) -> bool {
    CONJUNCTIONS.iter().any(|c| {
        text.get(..c.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(c))
    })
}

/// `text` without the conjunctions it starts with: "and then C" is "C".
fn strip_conjunctions(mut text: &str) -> &str {
    while starts_with_conjunction(text) {
        let word = text.split_once(' ').map_or("", |(_, rest)| rest);
        text = word.trim_start();
    }
    text
}

fn strip_end_punctuation(text: &str) -> &str {
    text.trim_end_matches(['.', '!', '?', ',', ';', ':', ' '])
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A bullet or numbered item's text.
fn bullet(line: &str) -> Option<&str> {
    let rest = ["- ", "* ", "+ ", "• "]
        .iter()
        .find_map(|marker| line.strip_prefix(marker))
        .or_else(|| {
            let digits = line.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 3 {
                return None;
            }
            let rest = &line[digits..];
            rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") "))
        })?;
    let rest = rest.trim();
    // A task-list checkbox is not part of the item.
    let rest = ["[ ] ", "[x] ", "[X] "]
        .iter()
        .find_map(|b| rest.strip_prefix(b))
        .unwrap_or(rest);
    Some(rest.trim())
}

/// Whether `next` carries on the sentence `previous` left open (a wrapped line).
fn continues(previous: &str, next: &str) -> bool {
    !previous.ends_with(['.', '!', '?', ':']) && next.starts_with(|c: char| c.is_lowercase())
}

/// Sentences end at `.`, `!` or `?` followed by a space or the end.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|(_, n)| n.is_whitespace()) {
            let sentence = text[start..i + c.len_utf8()].trim();
            if !sentence.is_empty() {
                out.push(sentence.to_owned());
            }
            start = i + c.len_utf8();
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// A title without the punctuation that ends a sentence.
fn strip_end(text: &str) -> String {
    text.trim_end_matches(['.', '!', ':', ';', ' ']).to_owned()
}

/// `text` as a one-line title of at most `TITLE_LEN` characters.
fn clip(text: &str) -> String {
    let line = strip_end(&text.split_whitespace().collect::<Vec<_>>().join(" "));
    if line.chars().count() <= TITLE_LEN {
        return line;
    }
    let mut cut: String = line.chars().take(TITLE_LEN - 1).collect();
    cut.push('…');
    cut
}

/// The markdown result of a `prompt` task: the instructions and acceptance criteria restated,
/// marked as produced offline, at [`target_path`]; with no output paths, the summary carries it.
pub fn write_offline(work: &PromptWork) -> Written {
    let mut text = format!(
        "{OFFLINE_MARK}\n# {}\n\n_Produced offline by agentops: no language model was configured \
         (set {}), so this file restates the task instead of doing it._\n\n\
         Project: `{}` · Task: `{}`\n\n## Instructions\n\n{}\n",
        clip(if work.title.is_empty() {
            &work.task
        } else {
            &work.title
        }),
        crate::llm::API_KEY_ENV,
        work.project,
        work.task,
        work.prompt.trim(),
    );
    let description = work.description.trim();
    if !description.is_empty() && description != work.prompt.trim() {
        text.push_str(&format!("\n## Description\n\n{description}\n"));
    }
    if let Some(instructions) = &work.instructions {
        text.push_str(&format!(
            "\n## Specialist instructions\n\n{}\n",
            instructions.trim()
        ));
    }
    text.push_str("\n## Acceptance criteria\n\n");
    if work.acceptance_criteria.is_empty() {
        text.push_str("_None given._\n");
    }
    for criterion in &work.acceptance_criteria {
        text.push_str(&format!("- [ ] {criterion}\n"));
    }
    if let Some(comments) = &work.review_comments {
        text.push_str(&format!(
            "\n## Review of the previous attempt\n\n{}\n",
            comments.trim()
        ));
    }
    match target_path(work) {
        Some(path) => Written {
            summary: format!(
                "Produced offline: {path} restates the instructions and {} acceptance criteria.",
                work.acceptance_criteria.len()
            ),
            files: vec![RepoFile {
                path,
                content: text,
            }],
        },
        None => Written {
            files: Vec::new(),
            summary: text,
        },
    }
}

/// Where the offline result goes: a file the prompt (or else the description) names within
/// the output paths; else the first output path that names a file; else `<task>.md` in the
/// first output folder; `None` with no output paths.
pub fn target_path(work: &PromptWork) -> Option<String> {
    let named = [&work.prompt, &work.description]
        .into_iter()
        .flat_map(|text| text.split_whitespace())
        .map(|word| word.trim_matches(['`', '"', '\'', '(', ')', ',', ';', ':', '*']))
        .map(|word| word.strip_suffix('.').unwrap_or(word))
        .find(|word| {
            !word.ends_with('/')
                && word.contains('/')
                && looks_like_file(word)
                && is_within(word, &work.output_paths)
        });
    if let Some(path) = named {
        return Some(path.to_owned());
    }
    let files = work.output_paths.iter().find(|p| looks_like_file(p));
    if let Some(path) = files {
        return Some(path.clone());
    }
    let folder = work.output_paths.first()?;
    Some(format!("{}/{}.md", folder.trim_end_matches('/'), work.task))
}

/// A path whose last part has an extension: `site/copy.md`, not `site/` or `docs`.
fn looks_like_file(path: &str) -> bool {
    !path.ends_with('/')
        && path
            .rsplit('/')
            .next()
            .and_then(|last| last.rsplit_once('.'))
            .is_some_and(|(stem, ext)| !stem.is_empty() && !ext.is_empty())
}

/// A tool from a template script that only echoes its arguments, for a person (or a model,
/// later) to replace.
pub fn tool_offline(need: &ToolNeed) -> Result<Draft, crate::plan::RenderError> {
    let title = clip(&need.task_title);
    let arguments = if need.arguments.is_empty() {
        "(none)".to_owned()
    } else {
        need.arguments.join(", ")
    };
    let script = format!(
        "#!/bin/sh\n\
         # {name}: drafted offline by agentops for the task \"{title}\".\n\
         # A template: replace it with the real implementation before merging.\n\
         # Arguments, in order: {arguments}\n\
         echo \"{name} (offline template) was called with: $*\"\n",
        name = need.name,
    );
    let description = format!(
        "Drafted offline for the task \"{title}\": a template script to replace with the real tool."
    );
    let summary = format!(
        "The task \"{title}\" needs the tool `{}`, which does not exist. This draft was made \
         offline from a template: tools/{}.sh only echoes its arguments ({arguments}); replace \
         it with the real implementation before merging.",
        need.name, need.name
    );
    tool_draft(need, &description, "sh", &script, summary)
}

/// A specialist from a template, named after its capabilities.
pub fn agent_offline(need: &AgentNeed) -> Result<Draft, crate::plan::RenderError> {
    let capabilities = need.capabilities.join(", ");
    let base = format!(
        "{}-specialist",
        slugify(&need.capabilities.join(" "), NAME_LEN, "general")
    );
    let name = unique_name(&base, &need.taken);
    let title = clip(&need.task_title);
    let models = if need.models.is_empty() {
        DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect()
    } else {
        need.models.clone()
    };
    let instructions = format!(
        "You are a specialist in {capabilities}. You were proposed because the task \"{title}\" \
         needs capabilities no agent had. Do each task's instructions, write only within its \
         output paths, and meet its acceptance criteria. (Drafted offline from a template: \
         review these instructions before merging.)"
    );
    let summary = format!(
        "No agent has all of {capabilities}, which the task \"{title}\" needs. This specialist \
         was drafted offline from a template; review its instructions and models before merging."
    );
    agent_draft(
        &name,
        need.capabilities.clone(),
        models,
        &instructions,
        summary,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::NoUsage;

    fn caller() -> Caller<'static> {
        Caller {
            agent: "cos",
            task_id: None,
            usage: &NoUsage,
        }
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.tasks.iter().map(|t| t.name.as_str()).collect()
    }

    fn deps(plan: &Plan) -> Vec<Vec<String>> {
        plan.tasks
            .iter()
            .map(|t| t.spec.depends_on.clone())
            .collect()
    }

    #[test]
    fn bullets_become_chained_tasks_under_the_heading() {
        let request = "# Launch the website\n\n\
                       We need a site by Friday.\n\
                       - Research three competitors\n\
                       - Draft the landing page copy\n  in a friendly tone\n\
                       * [ ] Build the page\n";
        let plan = plan_from_text(request, None, &[]).unwrap();
        assert_eq!(plan.name, "launch-the-website");
        assert_eq!(plan.project.title, "Launch the website");
        assert_eq!(
            names(&plan),
            [
                "research-three-competitors",
                "draft-the-landing-page-copy-in-a",
                "build-the-page"
            ]
        );
        assert_eq!(
            deps(&plan),
            [
                vec![],
                vec!["research-three-competitors".to_owned()],
                vec!["draft-the-landing-page-copy-in-a".to_owned()]
            ]
        );
        assert_eq!(
            plan.tasks[1].spec.title,
            "Draft the landing page copy in a friendly tone"
        );
        assert_eq!(
            plan.tasks[2].spec.output.paths,
            ["results/launch-the-website/"]
        );
        assert_eq!(plan.project.description, request.trim());
    }

    #[test]
    fn without_bullets_the_first_sentence_is_the_title_and_the_rest_are_tasks() {
        let plan = plan_from_text(
            "Launch a website. Research competitors! Draft copy? Build the page.",
            None,
            &[],
        )
        .unwrap();
        assert_eq!(plan.project.title, "Launch a website");
        assert_eq!(
            names(&plan),
            ["research-competitors", "draft-copy", "build-the-page"]
        );

        let single = plan_from_text("Write a haiku about Rust.", None, &[]).unwrap();
        assert_eq!(single.project.title, "Write a haiku about Rust");
        assert_eq!(names(&single), ["write-a-haiku-about-rust"]);

        let numbered =
            plan_from_text("Plan the offsite:\n1. Pick a venue\n2) Book it", None, &[]).unwrap();
        assert_eq!(numbered.project.title, "Plan the offsite");
        assert_eq!(names(&numbered), ["pick-a-venue", "book-it"]);
    }

    /// What [`split_list`] returns for a list with `lead` and `items`.
    fn list(lead: Option<&str>, items: &[&str]) -> Option<(Option<String>, Vec<String>)> {
        Some((
            lead.map(str::to_owned),
            items.iter().map(|i| (*i).to_owned()).collect(),
        ))
    }

    #[test]
    fn a_list_ending_in_then() {
        assert_eq!(
            split_list(
                "Book a venue, send the invitations, collect dietary needs, then confirm the catering"
            ),
            list(
                None,
                &[
                    "Book a venue",
                    "Send the invitations",
                    "Collect dietary needs",
                    "Confirm the catering"
                ]
            )
        );
    }

    #[test]
    fn a_list_ending_in_and() {
        assert_eq!(
            split_list("Draft the copy, review the draft, and publish the page"),
            list(
                None,
                &["Draft the copy", "Review the draft", "Publish the page"]
            )
        );
        assert_eq!(
            split_list("Draft the copy, review the draft and publish the page."),
            list(
                None,
                &["Draft the copy", "Review the draft", "Publish the page"]
            )
        );
    }

    #[test]
    fn a_list_of_semicolons_ending_in_and() {
        assert_eq!(
            split_list("Book a venue; send the invitations; and confirm the catering"),
            list(
                None,
                &[
                    "Book a venue",
                    "Send the invitations",
                    "Confirm the catering"
                ]
            )
        );
        // Semicolons separate items that have commas of their own.
        assert_eq!(
            split_list("Book a venue, near the office; confirm"),
            list(None, &["Book a venue, near the office", "Confirm"])
        );
    }

    #[test]
    fn a_list_ending_in_and_then() {
        assert_eq!(
            split_list("Gather the numbers, write the summary, and then send the report!"),
            list(
                None,
                &["Gather the numbers", "Write the summary", "Send the report"]
            )
        );
    }

    #[test]
    fn the_text_before_a_colon_leads_the_list_in() {
        assert_eq!(
            split_list("Plan a team offsite: book a venue, then send the invitations"),
            list(
                Some("Plan a team offsite"),
                &["Book a venue", "Send the invitations"]
            )
        );
        // A colon that is not followed by a list is part of the sentence.
        assert_eq!(split_list("Note: the venue is booked"), None);
    }

    #[test]
    fn text_without_a_list_is_not_split() {
        for text in [
            "Write a haiku about Rust",
            // A comma without a conjunction for the last item.
            "Write the report, which is due on Friday",
            "Dear team, please book a venue",
            // One task enumerating things: items of one word.
            "Buy apples, pears and plums",
            "Write a haiku, short and sweet",
            // "and" alone joins, it does not list.
            "Draft the terms and conditions",
            "Research and write a report",
            // A number's comma has no space after it.
            "Raise 1,000 dollars and thank the donors",
        ] {
            assert_eq!(split_list(text), None, "{text}");
        }
    }

    #[test]
    fn a_sentence_that_lists_tasks_plans_one_each_in_order() {
        let plan = plan_from_text(
            "Plan a team offsite: book a venue, send the invitations, collect dietary needs, then confirm the catering",
            None,
            &[],
        )
        .unwrap();
        assert_eq!(plan.name, "plan-a-team-offsite");
        assert_eq!(plan.project.title, "Plan a team offsite");
        assert_eq!(
            names(&plan),
            [
                "book-a-venue",
                "send-the-invitations",
                "collect-dietary-needs",
                "confirm-the-catering"
            ]
        );
        assert_eq!(
            deps(&plan),
            [
                vec![],
                vec!["book-a-venue".to_owned()],
                vec!["send-the-invitations".to_owned()],
                vec!["collect-dietary-needs".to_owned()]
            ]
        );
        assert_eq!(plan.tasks[3].spec.title, "Confirm the catering");

        // A list after a title sentence, and a sentence that is not a list, in order.
        let plan = plan_from_text(
            "Launch the site. Draft the copy, review it twice and build the page. Celebrate.",
            None,
            &[],
        )
        .unwrap();
        assert_eq!(plan.project.title, "Launch the site");
        assert_eq!(
            names(&plan),
            [
                "draft-the-copy",
                "review-it-twice",
                "build-the-page",
                "celebrate"
            ]
        );

        // Bullets are items as written, commas and all.
        let plan = plan_from_text(
            "# Offsite\n- Book a venue, send the invitations and confirm\n- Go",
            None,
            &[],
        )
        .unwrap();
        assert_eq!(plan.tasks.len(), 2);
    }

    #[test]
    fn names_are_unique_and_respect_the_persons_choice() {
        let plan =
            plan_from_text("Tidy up. - Fix it\n- Fix it", None, &["tidy-up".to_owned()]).unwrap();
        assert_eq!(plan.name, "tidy-up-2");
        let plan = plan_from_text("Fix it. Fix it. Fix it.", Some("mine"), &[]).unwrap();
        assert_eq!(plan.name, "mine");
        assert_eq!(names(&plan), ["fix-it", "fix-it-2"]);
        assert!(matches!(
            plan_from_text("x", Some("mine"), &["mine".to_owned()]),
            Err(ProviderError::Taken(_))
        ));
        assert!(matches!(
            plan_from_text(" \n\t\n", None, &[]),
            Err(ProviderError::EmptyRequest)
        ));
    }

    #[tokio::test]
    async fn offline_plans_are_deterministic_and_valid() {
        let request = PlanRequest {
            request: "Prepare the quarterly report.\n- Gather numbers\n- Write the summary"
                .to_owned(),
            project: None,
            taken: vec![],
        };
        let a = OfflineProvider.plan(&caller(), &request).await.unwrap();
        let b = OfflineProvider.plan(&caller(), &request).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.files.len(), 3);
        assert!(crate::plan::check_files(&a.files).is_empty());
        // Odd input still gives a valid plan or a clear error, never a panic.
        for odd in [
            "###",
            "- ",
            "ü",
            "...",
            "a.b.c",
            &"word ".repeat(500),
            "#\n-\n1.\n",
        ] {
            let request = PlanRequest {
                request: odd.to_owned(),
                project: None,
                taken: vec![],
            };
            match OfflineProvider.plan(&caller(), &request).await {
                Ok(p) => assert!(crate::plan::check_files(&p.files).is_empty(), "{odd:?}"),
                Err(e) => assert!(matches!(e, ProviderError::EmptyRequest), "{odd:?}: {e}"),
            }
        }
    }

    fn work(prompt: &str, paths: &[&str]) -> PromptWork {
        PromptWork {
            project: "launch-website".to_owned(),
            task: "draft-copy".to_owned(),
            title: "Draft the landing page copy".to_owned(),
            description: "Write the headline.".to_owned(),
            prompt: prompt.to_owned(),
            acceptance_criteria: vec![
                "site/copy.md exists".to_owned(),
                "under 300 words".to_owned(),
            ],
            output_paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            instructions: None,
            review_comments: None,
        }
    }

    #[test]
    fn the_offline_result_restates_the_task_where_the_prompt_says() {
        let written = write_offline(&work(
            "Write the landing page copy into site/copy.md.",
            &["site/"],
        ));
        assert_eq!(written.files.len(), 1);
        let file = &written.files[0];
        assert_eq!(file.path, "site/copy.md");
        assert!(file.content.starts_with(OFFLINE_MARK));
        assert!(
            file.content
                .contains("Write the landing page copy into site/copy.md.")
        );
        assert!(
            file.content
                .contains("- [ ] site/copy.md exists\n- [ ] under 300 words\n")
        );
        assert!(file.content.contains("Write the headline."));
        assert!(!file.content.contains("## Review"));
        assert_eq!(
            written,
            write_offline(&work(
                "Write the landing page copy into site/copy.md.",
                &["site/"]
            ))
        );

        // A specialist's instructions are restated too.
        let mut specialist = work("Write the landing page copy into site/copy.md.", &["site/"]);
        specialist.instructions = Some("Write like a lawyer.".to_owned());
        assert!(write_offline(&specialist).files[0].content.contains(
            "\n## Specialist instructions\n\nWrite like a lawyer.\n\n## Acceptance criteria\n"
        ));

        // A retry after a rejected review says what the review asked for.
        let mut retry = work("Write the landing page copy into site/copy.md.", &["site/"]);
        retry.review_comments = Some("Too long.\n".to_owned());
        let written = write_offline(&retry);
        assert!(
            written.files[0]
                .content
                .ends_with("\n## Review of the previous attempt\n\nToo long.\n"),
            "{}",
            written.files[0].content
        );
    }

    #[test]
    fn the_offline_result_goes_to_a_named_output_or_the_first_folder() {
        // A path outside the outputs is not taken from the prompt.
        let w = work("Read docs/brief.md and write the copy", &["site/"]);
        assert_eq!(target_path(&w).as_deref(), Some("site/draft-copy.md"));
        let w = work("Write it", &["notes", "report/summary.md"]);
        assert_eq!(target_path(&w).as_deref(), Some("report/summary.md"));
        let w = work("Write it", &[]);
        assert_eq!(target_path(&w), None);
        let written = write_offline(&w);
        assert!(written.files.is_empty());
        assert!(written.summary.contains("## Acceptance criteria"));
    }

    #[tokio::test]
    async fn offline_drafts_validate() {
        let need = ToolNeed {
            name: "pdf-extract".to_owned(),
            arguments: vec!["file".to_owned()],
            task_title: "Read the \"contract\"\nnow".to_owned(),
            task_description: String::new(),
            created_by: "seed".to_owned(),
        };
        let tool = OfflineProvider.draft_tool(&caller(), &need).await.unwrap();
        assert_eq!(tool.files[0].path, "tools/pdf-extract.yaml");
        assert_eq!(tool.files[1].path, "tools/pdf-extract.sh");
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), &tool.files[1].content).unwrap();
        let out = std::process::Command::new("sh")
            .arg(script.path())
            .arg("a.pdf")
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "pdf-extract (offline template) was called with: a.pdf\n"
        );

        let need = AgentNeed {
            capabilities: vec!["legal".to_owned(), "writing".to_owned()],
            task_title: "Draft the contract".to_owned(),
            task_description: String::new(),
            taken: vec!["legal-writing-specialist".to_owned()],
            models: vec![],
        };
        let agent = OfflineProvider.draft_agent(&caller(), &need).await.unwrap();
        assert_eq!(agent.name, "legal-writing-specialist-2");
        assert_eq!(
            agent.files[0].path,
            "agents/legal-writing-specialist-2.yaml"
        );
        assert!(agent.files[0].content.contains("openai/gpt-4o-mini"));
    }
}
