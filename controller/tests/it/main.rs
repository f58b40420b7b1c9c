//! The controller's integration tests, in one binary so that they compile and link once. Each
//! module is one area (`cargo test -p agentops --test it dispatch::` runs one); `common` holds
//! the helpers they share.

#[macro_use]
mod common;

mod agents_e2e;
mod bus;
mod chart;
mod cli;
mod crds;
mod diff;
mod dispatch;
mod forge_github;
mod kube;
mod kube_examples;
mod lease;
mod llm;
mod mcp;
mod queue;
mod queue_rules;
mod remote_agents;
mod repository;
mod store;
mod sync;
mod up;
mod writeback;
