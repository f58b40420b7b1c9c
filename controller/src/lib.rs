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

pub use agentops_agents::{error_chain, redact};
