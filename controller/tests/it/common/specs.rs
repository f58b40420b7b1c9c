//! Spec fixtures: the YAML of projects, tasks and agents.

pub const API: &str = "apiVersion: agentops.dev/v1alpha1";

pub fn project(name: &str, title: &str) -> String {
    format!("{API}\nkind: Project\nmetadata:\n  name: {name}\nspec:\n  title: {title}\n")
}

/// A task for `projects/<p>/tasks/`, its project taken from the folder.
pub fn task(name: &str, title: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: {title}\n  action:\n    prompt: Do {name}\n"
    )
}

/// A task naming its project, for files outside `projects/<p>/tasks/`.
pub fn task_in(project: &str, name: &str, title: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  project: {project}\n  title: {title}\n  action:\n    prompt: Do {name}\n"
    )
}

pub fn agent(name: &str, capabilities: &str) -> String {
    format!(
        "{API}\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n  type: specialist\n  capabilities: [{capabilities}]\n"
    )
}
