//! The agentops controller: reads projects and tasks from a Git source, reconciles them into
//! the store, and (in later modules) dispatches them and writes status back.

pub mod api;
pub mod bus;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod embedded;
pub mod forge;
pub mod llm;
pub mod presence;
pub mod reconcile;
pub mod runtime;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod writeback;

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
