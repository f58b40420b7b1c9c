//! agentops agents: the [`runtime`] any Rust agent is built on, and the agents built on it.
//!
//! The building blocks of the Chief of Staff and the Seed: the [`llm`] client, a
//! [`provider::Provider`] that plans projects, writes a `prompt` task's files and drafts tools
//! and specialists (with a model, or [`provider::OfflineProvider`] without one), the [`plan`]
//! and [`drafts`] that turn its answers into spec files `agentops validate` accepts, and the
//! [`prompt`] action's executor.

pub mod command;
pub mod drafts;
pub mod llm;
pub mod plan;
pub mod prompt;
pub mod provider;
pub mod runtime;
pub mod shutdown;

/// An error and its causes on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
