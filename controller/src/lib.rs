//! The agentops controller: reads projects and tasks from a Git source, reconciles them into
//! the store, and (in later modules) dispatches them and writes status back.

pub mod cli;
pub mod config;
pub mod reconcile;
pub mod source;
pub mod store;
