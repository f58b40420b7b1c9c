//! An agent that runs `run` actions: each task's command in a temporary directory with only
//! `PATH` in its environment. SIGTERM or SIGINT hands its tasks back and exits; a second one
//! exits at once.

use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::process::ExitCode;

use agentops_agents::command::RunCommand;
use agentops_agents::error_chain;
use agentops_agents::runtime::{Agent, AgentConfig, AgentType, BusNames};
use agentops_agents::shutdown::Signals;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// An agentops agent that completes tasks by running their `run` action's command.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The controller's base URL.
    #[arg(long, env = "AGENTOPS_API")]
    api: String,
    #[arg(long, env = "AGENTOPS_AGENT_NAME", default_value = "runner")]
    name: String,
    /// cos, seed, specialist or meta.
    #[arg(long = "type", env = "AGENTOPS_AGENT_TYPE", default_value = "seed")]
    agent_type: AgentType,
    /// Capabilities this agent offers, comma-separated.
    #[arg(long, env = "AGENTOPS_AGENT_CAPABILITIES", value_delimiter = ',')]
    capabilities: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "AGENTOPS_AGENT_CONCURRENCY", default_value = "4")]
    concurrency: NonZeroUsize,
    /// The controller's NATS server: follow its ready-work announcements (optional).
    /// The enrollment secret the controller asks for (its `--agent-secret`).
    #[arg(long, env = "AGENTOPS_AGENT_SECRET", hide_env_values = true)]
    agent_secret: Option<String>,
    #[arg(long, env = "AGENTOPS_NATS")]
    nats: Option<String>,
    /// The prefix of the controller's NATS subjects, streams and consumers (its own
    /// `--bus-prefix`).
    #[arg(long, env = "AGENTOPS_BUS_PREFIX", default_value = agentops_agents::runtime::DEFAULT_BUS_PREFIX)]
    bus_prefix: BusNames,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();

    // Installed before registering, so a signal that comes early is not the default death.
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let stopping = shutdown.clone();
    signals.spawn_two_step(move |signal| {
        tracing::info!(signal, "stopping: handing back held tasks");
        stopping.cancel();
    });

    let config = AgentConfig {
        agent_type: args.agent_type,
        capabilities: args.capabilities,
        concurrency: args.concurrency.get(),
        nats: args.nats,
        bus: args.bus_prefix,
        secret: args.agent_secret,
        ..AgentConfig::new(args.api, args.name)
    };
    match Agent::new(config, RunCommand).run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
