//! The agent runtime's integration tests, in one binary so that they compile and link once
//! (`cargo test -p agentops-agents --test it runtime::` runs one module). `common` is a fake
//! controller; `common/fake_llm.rs` a fake model API, shared with the controller's tests.

mod common;

mod llm;
mod run_command;
mod runtime;
