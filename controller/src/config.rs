//! The controller's configuration: one typed struct per concern, each built from flags or
//! `AGENTOPS_*` environment variables by clap, and shared by every command that needs it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct GlobalConfig {
    /// Where the controller keeps its mirrors, imports and the default SQLite file.
    #[arg(long, global = true, env = "AGENTOPS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl GlobalConfig {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            dirs::data_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("agentops")
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
    /// `postgres://…` or `sqlite://FILE`; an SQLite file in the data directory by default.
    #[arg(long = "database", env = "AGENTOPS_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl StoreConfig {
    pub fn url(&self, global: &GlobalConfig) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                global.data_dir().join("agentops.db").display()
            )
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct SourceConfig {
    /// The spec repository: a local path (a repository, or a plain folder that is imported
    /// into one), or a `file://`, `https://` or `ssh://` URL.
    #[arg(long, env = "AGENTOPS_REPO", default_value = ".")]
    pub repo: String,
    /// The branch to follow; for a local repository, the one it has checked out.
    #[arg(long, env = "AGENTOPS_BRANCH")]
    pub branch: Option<String>,
    /// The directory inside the repository that holds the specs.
    #[arg(long = "path", env = "AGENTOPS_PATH", default_value = "")]
    pub subpath: String,
    /// The name this source's objects are recorded under in the store.
    #[arg(long, env = "AGENTOPS_SOURCE_NAME", default_value = "default")]
    pub source_name: String,
    /// Token for `https://` remotes.
    #[arg(long, env = "AGENTOPS_GIT_TOKEN", hide_env_values = true)]
    pub git_token: Option<String>,
    /// How often to poll the remote, jittered by ±10 %.
    #[arg(long, env = "AGENTOPS_POLL_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DispatchArgs {
    /// Where the HTTP API (agents, health, metrics) listens.
    #[arg(long, env = "AGENTOPS_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: std::net::SocketAddr,
    /// How long a claim holds a task without a heartbeat.
    #[arg(long, env = "AGENTOPS_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// How often agents are asked to heartbeat.
    #[arg(long, env = "AGENTOPS_HEARTBEAT", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// NATS server (JetStream) for events and ready-work announcements, e.g.
    /// `nats://127.0.0.1:4222`; without it they stay inside the process.
    #[arg(long, env = "AGENTOPS_NATS")]
    pub nats: Option<String>,
    /// The prefix of every NATS name: subjects `<prefix>.events.…` and `<prefix>.dispatch.…`,
    /// streams `<PREFIX>_EVENTS` and `<PREFIX>_DISPATCH`, consumers `<prefix>-<pool>`; and of
    /// the agents' Redis keys (`<prefix>:agent:<name>`). Give each installation sharing a NATS
    /// or Redis server its own; agents take the same one.
    #[arg(long, env = "AGENTOPS_BUS_PREFIX", default_value = crate::bus::DEFAULT_BUS_PREFIX)]
    pub bus_prefix: crate::bus::BusNames,
    /// Redis for agent presence, live progress and rate limits, e.g. `redis://127.0.0.1/`;
    /// without it they are kept in memory.
    #[arg(long, env = "AGENTOPS_REDIS")]
    pub redis: Option<String>,
    /// The enrollment secret agents present to register, from any machine. Without it (and
    /// without --agent-secrets) only programs on this machine may register.
    #[arg(long, env = "AGENTOPS_AGENT_SECRET", hide_env_values = true)]
    pub agent_secret: Option<String>,
    /// A YAML file of per-agent secrets: `agents: [{name, secretSha256, types: [seed]}]`.
    #[arg(long, env = "AGENTOPS_AGENT_SECRETS")]
    pub agent_secrets: Option<std::path::PathBuf>,
    /// With --kube: ServiceAccounts (`namespace:name`, comma-separated) whose tokens agents may
    /// register with instead of a secret; the API server checks each by a TokenReview.
    #[arg(long, env = "AGENTOPS_AGENT_SERVICE_ACCOUNTS", value_delimiter = ',')]
    pub agent_service_accounts: Vec<String>,
    /// Most agents holding tokens at once; a registration past it is answered 429 (0: any
    /// number).
    #[arg(long, env = "AGENTOPS_MAX_AGENTS", default_value_t = 1000)]
    pub max_agents: u64,
    /// Claims and reports one agent may send per second on average, in bursts of twice as
    /// many; past it the answer is 429 (0: no limit).
    #[arg(long, env = "AGENTOPS_AGENT_RATE_LIMIT", default_value_t = 200)]
    pub agent_rate_limit: u32,
}

/// Write-back: status commits, result commits, and the forge that reviews results.
#[derive(Debug, Clone, Args)]
pub struct WritebackArgs {
    /// Status changes are committed at most once per this interval.
    #[arg(long, env = "AGENTOPS_STATUS_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// Do not commit status files to Git.
    #[arg(long, env = "AGENTOPS_NO_STATUS")]
    pub no_status: bool,
    /// The author (and committer) of the controller's commits.
    #[arg(long, env = "AGENTOPS_AUTHOR_NAME", default_value = "agentops")]
    pub author_name: String,
    #[arg(
        long,
        env = "AGENTOPS_AUTHOR_EMAIL",
        default_value = "agentops@localhost"
    )]
    pub author_email: String,
    /// A GitHub token: result branches get pull requests, and merging one completes its task.
    /// Without it, a result branch merged into the followed branch counts as merged.
    #[arg(long, env = "AGENTOPS_GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,
    /// The GitHub API, e.g. `https://HOST/api/v3` for GitHub Enterprise.
    #[arg(
        long,
        env = "AGENTOPS_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    pub github_api_url: String,
    /// `OWNER/REPO` on GitHub; taken from the remote URL when not given.
    #[arg(long, env = "AGENTOPS_GITHUB_REPO")]
    pub github_repo: Option<String>,
    /// The secret GitHub signs webhook deliveries with (`POST /hooks/github`); without it
    /// every delivery is refused.
    #[arg(long, env = "AGENTOPS_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
}

impl WritebackArgs {
    pub fn author(&self) -> crate::writeback::Author {
        crate::writeback::Author {
            name: self.author_name.clone(),
            email: self.author_email.clone(),
        }
    }

    /// The forge results are reviewed on: GitHub with a token, else the branches alone.
    pub fn forge(
        &self,
        source: &crate::source::git::GitSource,
    ) -> Result<std::sync::Arc<dyn crate::forge::Forge>, crate::forge::ForgeError> {
        use crate::forge::{Branches, ForgeError, GitHub, github::GitHubConfig, owner_repo};
        let Some(token) = &self.github_token else {
            return Ok(std::sync::Arc::new(Branches {
                source: source.clone(),
            }));
        };
        let url = source.location.url();
        let (owner, repo) = match &self.github_repo {
            Some(full) => full
                .split_once('/')
                .map(|(o, r)| (o.to_owned(), r.to_owned()))
                .ok_or_else(|| ForgeError::NoRepository(full.clone()))?,
            None => owner_repo(&url).ok_or(ForgeError::NoRepository(url))?,
        };
        let config = GitHubConfig::new(&self.github_api_url, token, &owner, &repo);
        Ok(std::sync::Arc::new(GitHub::new(config)?))
    }
}

/// How long one Redis call may take before it is given up (and dispatch carries on).
pub const PRESENCE_TIMEOUT: Duration = Duration::from_millis(250);

impl DispatchArgs {
    pub fn config(&self) -> crate::dispatch::DispatchConfig {
        let mut config = crate::dispatch::DispatchConfig::default();
        config.policy.lease = self.lease;
        config.heartbeat = self.heartbeat;
        // Sweep well within a lease so an expired one is noticed promptly.
        config.sweep = (self.lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        config
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("invalid duration `{text}`: {e}"))
}

/// The language model the Chief of Staff and the Seed use. Without a key they work offline
/// (deterministically), so nothing here is required.
#[derive(Debug, Clone, Args)]
pub struct LlmArgs {
    /// API key of the OpenAI-compatible endpoint (OpenRouter by default).
    #[arg(
        long = "llm-api-key",
        env = "OPENROUTER_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// The endpoint's base URL, up to `/chat/completions`.
    #[arg(long = "llm-base-url", env = "AGENTOPS_LLM_BASE_URL", default_value = agentops_agents::llm::OPENROUTER_URL)]
    pub base_url: String,
    /// Models tried in order, comma-separated; the default is Llama 3.3 70B, gpt-4o-mini,
    /// Claude 3.5 Sonnet.
    #[arg(
        long = "llm-models",
        env = "AGENTOPS_LLM_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// How long one attempt at one model may take.
    #[arg(long = "llm-timeout", env = "AGENTOPS_LLM_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Calls per minute to each provider, shared by all agents (through Redis with
    /// `--redis`); 0 for no limit.
    #[arg(
        long = "llm-rate-limit",
        env = "AGENTOPS_LLM_RATE_LIMIT",
        default_value = "0"
    )]
    pub rate_limit_per_minute: u64,
}

impl LlmArgs {
    /// `None` without a key: the agents then use the offline provider.
    pub fn config(&self) -> Option<agentops_agents::llm::LlmConfig> {
        let key = self
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())?;
        let mut config = agentops_agents::llm::LlmConfig::new(key);
        config.base_url = self.base_url.clone();
        if !self.models.is_empty() {
            config.models = self.models.clone();
        }
        config.timeout = self.timeout;
        config.rate_limit =
            (self.rate_limit_per_minute > 0).then_some(agentops_agents::llm::RateLimit {
                requests: self.rate_limit_per_minute,
                per: Duration::from_secs(60),
            });
        Some(config)
    }
}

/// How `up` stops on SIGTERM or SIGINT.
#[derive(Debug, Clone, Args)]
pub struct ShutdownArgs {
    /// How long a graceful stop may take: running tasks may finish for most of it, then they
    /// are handed back, the status is pushed and the API closed. A second signal stops at once.
    #[arg(long, env = "AGENTOPS_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// Which of several controllers on one database leads: only the leader syncs, dispatches and
/// writes back; the others serve `/healthz` and `/metrics` and wait to take over.
#[derive(Debug, Clone, Args)]
pub struct LeaderArgs {
    /// The name of the leadership several controllers compete for: with `--kube` the name of
    /// a Lease, on Postgres a session advisory lock derived from it. Controllers of one
    /// installation share it; give an installation with its own sources its own.
    #[arg(
        long,
        env = "AGENTOPS_LEADER_LOCK",
        default_value = "agentops-controller"
    )]
    pub leader_lock: String,
    /// How often a standby controller tries to take the lead, and the leader checks (with
    /// `--kube`: renews) that it still holds it.
    #[arg(long, env = "AGENTOPS_LEADER_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub leader_retry: Duration,
    /// With `--kube`: how long the Lease holds after its last renewal. A standby takes over a
    /// lease not renewed for this long. Whole seconds.
    #[arg(long, env = "AGENTOPS_LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_lease_duration: Duration,
    /// With `--kube`: a leader that could not renew its Lease for this long stops leading
    /// (and exits 1). Shorter than `--leader-lease-duration`: the difference is the margin
    /// for the replicas' clocks.
    #[arg(long, env = "AGENTOPS_LEADER_RENEW", default_value = "10s", value_parser = parse_duration)]
    pub leader_renew: Duration,
    /// With `--kube`: the namespace of the Lease. By default the pod's own namespace, else
    /// `--namespace`, else `default`.
    #[arg(long, env = "AGENTOPS_LEADER_NAMESPACE")]
    pub leader_namespace: Option<String>,
    /// With `--kube`: this controller's name in the Lease (`holderIdentity`), unique among
    /// the replicas. By default the host name (a pod's name) and the process id.
    #[arg(long, env = "AGENTOPS_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,
}

/// The agents `up` runs in its own process.
#[derive(Debug, Clone, Args)]
pub struct EmbeddedArgs {
    /// Run no agents inside the controller; only remote agents take work.
    #[arg(long, env = "AGENTOPS_NO_AGENTS")]
    pub no_agents: bool,
    /// The capabilities the embedded Seed registers with, comma-separated.
    #[arg(
        long,
        env = "AGENTOPS_SEED_CAPABILITIES",
        value_delimiter = ',',
        default_value = "writing,research,code"
    )]
    pub seed_capabilities: Vec<String>,
}

/// The Kubernetes source: the custom resources of a cluster, beside the Git source.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Also sync the Project, Task, Agent and Tool custom resources of the cluster (in-cluster
    /// configuration, or `KUBECONFIG`), and write their status back to them; the replicas
    /// elect their leader through a Lease.
    #[arg(long, env = "AGENTOPS_KUBE")]
    pub kube: bool,
    /// The namespace to watch; every namespace when not given. Each namespace is a source of
    /// its own, `kube:<namespace>`.
    #[arg(long, env = "AGENTOPS_NAMESPACE")]
    pub namespace: Option<String>,
}
