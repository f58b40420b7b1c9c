//! `agentops agent cos|seed|NAME`: one agent process against a controller's API, running the
//! same [`Worker`] as the agents `up` embeds. What they do with Git and tools goes through the
//! API ([`Remote`]): proposals to `POST /api/v1/proposals`, checkouts from
//! `GET /api/v1/tasks/{id}/checkout`, so Git credentials stay with the controller.
//!
//! `NAME` is an `Agent` spec at the controller's followed branch: its type, capabilities,
//! concurrency, models and instructions are read from `GET /api/v1/agents/NAME/spec`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agentops_agents::llm::{MemoryRateLimiter, RateLimiter};
use agentops_agents::protocol::AgentSpecAnswer;
use agentops_agents::provider::{AnyProvider, Provider};
use agentops_agents::runtime::{Agent, AgentConfig, AgentType, BusNames};
use anyhow::Context as _;
use clap::Args;

use crate::config::LlmArgs;
use crate::embedded::{Remote, Worker};

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// `cos`, `seed`, or the name of an `Agent` spec in the controller's repository.
    pub role: String,
    /// The controller's base URL.
    #[arg(long, env = "AGENTOPS_API")]
    pub api: String,
    /// The name to register under; `<role>-<hostname>` by default, so that replicas differ.
    #[arg(long, env = "AGENTOPS_AGENT_NAME")]
    pub name: Option<String>,
    /// The controller's NATS server, to follow its ready-work announcements (optional).
    #[arg(long, env = "AGENTOPS_NATS")]
    pub nats: Option<String>,
    /// The prefix of the controller's NATS names (its `--bus-prefix`).
    #[arg(long, env = "AGENTOPS_BUS_PREFIX", default_value = agentops_agents::runtime::DEFAULT_BUS_PREFIX)]
    pub bus_prefix: BusNames,
    /// The enrollment secret the controller asks for (its `--agent-secret`, or this agent's
    /// own from its `--agent-secrets` file).
    #[arg(long, env = "AGENTOPS_AGENT_SECRET", hide_env_values = true)]
    pub agent_secret: Option<String>,
    /// A file holding the enrollment secret instead: in a pod, its ServiceAccount token
    /// (`/var/run/secrets/kubernetes.io/serviceaccount/token`) for a controller that enrolls
    /// that account (`--agent-service-accounts`).
    #[arg(
        long,
        env = "AGENTOPS_AGENT_SECRET_FILE",
        conflicts_with = "agent_secret"
    )]
    pub agent_secret_file: Option<std::path::PathBuf>,
    /// Capabilities a `seed` or `cos` offers, comma-separated (a spec'd agent has its own).
    #[arg(long, env = "AGENTOPS_AGENT_CAPABILITIES", value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// Tasks run at once by a `seed` or `cos` (a spec'd agent has its own).
    #[arg(long, env = "AGENTOPS_AGENT_CONCURRENCY", default_value = "2")]
    pub concurrency: usize,
    /// Agents this process runs, named `<name>-0`, `<name>-1`, … when more than one.
    #[arg(long, env = "AGENTOPS_AGENT_REPLICAS", default_value = "1")]
    pub replicas: usize,
    #[command(flatten)]
    pub llm: LlmArgs,
}

/// The name registered under when `--name` is not given.
pub fn default_name(role: &str, hostname: &str) -> String {
    let host: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = format!("{role}-{}", host.trim_matches('-'));
    // A DNS label: at most 63 characters, no trailing dash.
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The `Agent` spec `name` as the controller serves it, presenting the enrollment secret.
async fn agent_spec(
    api: &str,
    name: &str,
    secret: Option<&str>,
) -> anyhow::Result<AgentSpecAnswer> {
    let url = format!("{}/api/v1/agents/{name}/spec", api.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut request = http.get(&url);
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                return response
                    .json()
                    .await
                    .with_context(|| format!("GET {url}: not an agent spec"));
            }
            Ok(response) if response.status().is_client_error() => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                anyhow::bail!("GET {url} answered {status}: {}", body.trim());
            }
            // Unreachable, or not serving yet: wait for it.
            Ok(response) => {
                tracing::warn!(status = %response.status(), "{url}: waiting for the controller")
            }
            Err(e) => tracing::warn!("{url}: waiting for the controller: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

pub async fn run(mut args: AgentArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.agent_secret_file {
        let secret = std::fs::read_to_string(path)
            .with_context(|| format!("--agent-secret-file {}", path.display()))?;
        anyhow::ensure!(
            !secret.trim().is_empty(),
            "--agent-secret-file {}: the file is empty",
            path.display()
        );
        args.agent_secret = Some(secret.trim().to_owned());
    }
    let signals = agentops_agents::shutdown::Signals::install().context("handling signals")?;
    let stop = agentops_agents::shutdown::Stop::new();
    let stopping = stop.clone();
    signals.spawn_two_step(move |signal| {
        eprintln!("{signal}: handing back held tasks (a second signal exits at once)");
        stopping.stop_claiming();
        stopping.stop_work();
    });
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&args.role, &hostname()));
    let limiter: Arc<dyn RateLimiter> = Arc::new(MemoryRateLimiter::default());
    let mut llm = args.llm.config();
    let (config, instructions) = match args.role.as_str() {
        role @ ("seed" | "cos") => (
            AgentConfig {
                agent_type: if role == "cos" {
                    AgentType::Cos
                } else {
                    AgentType::Seed
                },
                capabilities: args.capabilities.clone(),
                concurrency: args.concurrency.max(1),
                ..AgentConfig::new(&args.api, &name)
            },
            None,
        ),
        spec_name => {
            let spec = agent_spec(&args.api, spec_name, args.agent_secret.as_deref()).await?;
            if let Some(llm) = llm.as_mut()
                && !spec.models.is_empty()
            {
                llm.models = spec.models.clone();
            }
            (
                AgentConfig {
                    agent_type: spec.agent_type,
                    capabilities: spec.capabilities,
                    concurrency: usize::try_from(spec.concurrency.max(1)).unwrap_or(1),
                    ..AgentConfig::new(
                        &args.api,
                        args.name
                            .clone()
                            .unwrap_or_else(|| default_name(spec_name, &hostname())),
                    )
                },
                Some(spec.instructions).filter(|i| !i.trim().is_empty()),
            )
        }
    };
    let config = AgentConfig {
        nats: args.nats.clone(),
        bus: args.bus_prefix.clone(),
        secret: args.agent_secret.clone(),
        claim_wait: Duration::from_secs(20),
        ..config
    };
    let provider = Arc::new(AnyProvider::new(llm, limiter).context("the language model")?);
    eprintln!(
        "agent {} ({}) against {} ({})",
        config.name,
        config.agent_type.as_str(),
        config.api,
        provider.describe()
    );
    let replicas = args.replicas.max(1);
    let mut running = tokio::task::JoinSet::new();
    for n in 0..replicas {
        let name = if replicas == 1 {
            config.name.clone()
        } else {
            format!("{}-{n}", config.name)
        };
        let worker = Worker {
            shared: Arc::new(Remote),
            name: name.clone(),
            provider: provider.clone(),
            instructions: instructions.clone(),
            // One drafter per process: replicas would draft the same specialist each.
            drafts_specialists: config.agent_type == AgentType::Seed && n == 0,
        };
        let config = AgentConfig {
            name,
            ..config.clone()
        };
        running.spawn(Agent::new(config, worker).run_until(stop.clone()));
    }
    let mut failed = None;
    while let Some(done) = running.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(crate::error_chain(&e)),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    match failed {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_name_is_the_role_and_the_host_as_a_dns_label() {
        assert_eq!(
            default_name("seed", "Build_Box.local"),
            "seed-build-box-local"
        );
        assert_eq!(default_name("cos", "-x-"), "cos-x");
        let long = default_name("seed", &"h".repeat(100));
        assert_eq!(long.len(), 63);
        assert!(agentops_specs::names::check_dns_label(&long).is_ok());
    }
}
