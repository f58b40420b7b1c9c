//! `agentops mcp`: an MCP server on stdin and stdout through which an MCP client (Claude
//! Code, Cursor, …) joins agentops as an agent. It is a process of its own that speaks the
//! agent protocol to the controller at `--api`; docs/mcp.md shows the client configuration.

use std::process::ExitCode;

use agentops_agents::mcp::{McpConfig, serve_stdio};
use agentops_agents::protocol::AgentType;
use agentops_agents::shutdown::Signals;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct McpArgs {
    /// The controller's base URL.
    #[arg(long, env = "AGENTOPS_API", default_value = "http://127.0.0.1:7700")]
    pub api: String,
    /// The agent name to register; `<MCP client's name>-<host name>` by default.
    #[arg(long, env = "AGENTOPS_AGENT_NAME")]
    pub name: Option<String>,
    /// cos, seed, specialist or meta: which tasks the agent may take (with its name).
    #[arg(long = "type", env = "AGENTOPS_AGENT_TYPE", default_value = "seed")]
    pub agent_type: AgentType,
    /// Capabilities the agent offers, comma-separated.
    #[arg(long, env = "AGENTOPS_AGENT_CAPABILITIES", value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// The enrollment secret the controller asks for (its own `--agent-secret`, or this
    /// name's secret in its `--agent-secrets` file).
    #[arg(long, env = "AGENTOPS_AGENT_SECRET", hide_env_values = true)]
    pub agent_secret: Option<String>,
}

pub async fn run(args: McpArgs) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let stopping = shutdown.clone();
    Signals::install()?.spawn_two_step(move |signal| {
        tracing::info!(signal, "stopping: handing back held tasks");
        stopping.cancel();
    });
    let config = McpConfig {
        name: args.name,
        agent_type: args.agent_type,
        capabilities: args.capabilities,
        secret: args.agent_secret,
        ..McpConfig::new(args.api)
    };
    serve_stdio(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
