//! Specialists: the `Agent` specs that run as embedded agents, and the search for missing ones.

use std::time::Duration;

use agentops_agents::drafts::AgentNeed;
use agentops_agents::llm::Caller;
use agentops_agents::protocol::{ProposalKind, ProposalRequest, SpecialistGap, SpecialistGaps};
use agentops_agents::provider::Provider;
use agentops_agents::runtime::{AgentConfig, AgentLine};
use git2::{ObjectType, TreeWalkMode, TreeWalkResult};
use tokio_util::sync::CancellationToken;

use crate::error_chain;
use crate::source::git::GitSource;
use crate::store::tools::{NeedingTask, Registered};

use super::*;

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
            let config = AgentConfig {
                agent_type: spec.agent_type,
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

/// The Seed's proposal of a drafted specialist.
pub fn agent_proposal(draft: &agentops_agents::drafts::Draft) -> ProposalRequest {
    ProposalRequest {
        kind: ProposalKind::Agent,
        name: draft.name.clone(),
        title: format!("New specialist: {}", draft.name),
        body: draft.summary.clone(),
        files: proposal_files(&draft.files),
    }
}

/// What the Seed is told of [`gaps`]: each capability set with its first task's words, and
/// the names agents hold.
pub fn specialist_gaps(tasks: &[NeedingTask], agents: &[Registered]) -> SpecialistGaps {
    SpecialistGaps {
        gaps: gaps(tasks, agents)
            .into_iter()
            .map(|task| SpecialistGap {
                capabilities: task.capabilities,
                title: task.title,
                description: task.description,
            })
            .collect(),
        taken: agents.iter().map(|a| a.name.clone()).collect(),
    }
}

/// How often the Seed looks for work that no agent can take.
const GAP_CHECK: Duration = Duration::from_secs(5);

impl<V: Services> Worker<V> {
    /// The Seed's search for missing specialists: when pending work needs capabilities no
    /// agent has, it drafts a specialist `Agent` spec and proposes it (branch, and pull
    /// request with a forge). Each capability set is proposed once per run; once the spec is
    /// merged, the specialist can run (embedded in the next `up`, or as `agentops agent NAME`)
    /// and the task is claimed.
    pub(super) async fn draft_specialists(&self, line: AgentLine, claiming: CancellationToken) {
        let mut proposed: Vec<Vec<String>> = Vec::new();
        loop {
            // The first pass waits too: the other agents register meanwhile.
            if claiming
                .run_until_cancelled(tokio::time::sleep(GAP_CHECK))
                .await
                .is_none()
            {
                return;
            }
            let found = match self.shared.specialist_gaps(&line).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(agent = %self.name, "cannot look for missing specialists: {e}");
                    continue;
                }
            };
            for gap in found.gaps {
                let mut key = gap.capabilities.clone();
                key.sort();
                if proposed.contains(&key) {
                    continue;
                }
                proposed.push(key);
                let need = AgentNeed {
                    capabilities: gap.capabilities.clone(),
                    task_title: gap.title,
                    task_description: gap.description,
                    taken: found.taken.clone(),
                    models: self.provider.models(),
                };
                let caller = Caller {
                    agent: &self.name,
                    task_id: None,
                    usage: self.shared.usage(&line),
                };
                let draft = match self.provider.draft_agent(&caller, &need).await {
                    Ok(draft) => draft,
                    Err(e) => {
                        tracing::warn!(agent = %self.name, "cannot draft a specialist: {}", error_chain(&e));
                        continue;
                    }
                };
                match self.shared.propose(&line, &agent_proposal(&draft)).await {
                    Ok(done) => eprintln!(
                        "no agent has {}: proposed the specialist {} as {}",
                        gap.capabilities.join(", "),
                        draft.name,
                        describe(&done)
                    ),
                    Err(e) => {
                        tracing::warn!(agent = %self.name, "cannot propose a specialist: {}", e.message)
                    }
                }
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
}
