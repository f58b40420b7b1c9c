//! The `agentops` command line: one function per subcommand, each taking its typed
//! configuration and returning an exit code.

mod agent;
mod ask;
mod bench;
mod bench_dispatch;
mod bench_kube;
mod bench_writeback;
mod crds;
mod diff;
pub mod fake_kube;
mod mcp;
mod reconcile;
mod status;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{
    DispatchArgs, EmbeddedArgs, GlobalConfig, KubeArgs, LeaderArgs, LlmArgs, ShutdownArgs,
    SourceConfig, StoreConfig, WritebackArgs,
};

#[derive(Debug, Parser)]
#[command(
    name = "agentops",
    version,
    about = "A GitOps control plane for a team of AI agents"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalConfig,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing `up`'s flags would only obscure the derive"
)]
pub enum Command {
    /// Check spec files; print every error as path:line:column: message. Exit 1 if any.
    Validate {
        /// Directories of spec files, each checked whole, or files (as a pre-commit hook
        /// passes them), checked with the other spec files of their Git work tree (or of
        /// --root); only the errors in the files given are printed.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// The folder the files' specs are synced from (the controller's --path inside the
        /// repository): files given are checked with every spec file under it, their
        /// projects taken from `projects/<p>/tasks/` relative to it.
        #[arg(long, env = "AGENTOPS_VALIDATE_ROOT")]
        root: Option<std::path::PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// One full pass: sync the source into the store, follow outputs in review, commit the
    /// status, then exit.
    Reconcile {
        /// Run one pass and exit (the only mode; `up` is the long-running controller).
        #[arg(long, required = true)]
        once: bool,
        #[command(flatten)]
        source: SourceConfig,
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        writeback: WritebackArgs,
    },
    /// Run the controller: sync on every change of the source and dispatch ready tasks to
    /// agents over the HTTP API.
    Up {
        #[command(flatten)]
        source: SourceConfig,
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        dispatch: DispatchArgs,
        #[command(flatten)]
        writeback: WritebackArgs,
        #[command(flatten)]
        agents: EmbeddedArgs,
        #[command(flatten)]
        llm: LlmArgs,
        #[command(flatten)]
        shutdown: ShutdownArgs,
        #[command(flatten)]
        leader: LeaderArgs,
        #[command(flatten)]
        kube: KubeArgs,
        /// Exit 0 once no task can move without a person: none in progress, none pending with
        /// its dependencies completed (work in review waits for a merge).
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Ask the Chief of Staff for a project: it plans it and proposes it on a branch
    /// `agentops/proposals/<project>` (with a pull request when a forge is configured).
    Ask {
        /// What the project should achieve, in plain words.
        request: String,
        /// The project's name; chosen from the request when not given.
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        source: SourceConfig,
        #[command(flatten)]
        store: StoreConfig,
        #[command(flatten)]
        writeback: WritebackArgs,
        #[command(flatten)]
        llm: LlmArgs,
    },
    /// Show what syncing a revision (or a folder of specs) would do to the store, without
    /// writing anything. Exit 0 when nothing would change, 1 when something would, 2 on error.
    /// One agent against a controller's API, on this machine or another: `cos`, `seed`, or
    /// the name of an `Agent` spec in the controller's repository.
    Agent(agent::AgentArgs),
    Diff(diff::DiffArgs),
    /// Show projects and tasks with phase, agent, attempt and age.
    Status {
        #[command(flatten)]
        store: StoreConfig,
        #[arg(long)]
        project: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: TableFormat,
    },
    /// Print the CustomResourceDefinitions of Project, Task, Agent and Tool for
    /// `kubectl apply -f -`, or write one file each with --dir.
    Crds(crds::CrdsArgs),
    /// Print the JSON Schema of spec files for editors, or write one per kind with --dir.
    Schema(crds::SchemaArgs),
    /// Apply the database migrations.
    Migrate {
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Generate a workload and print performance figures.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Serve MCP on stdin and stdout: an MCP client (Claude Code, Cursor, …) joins as an
    /// agent of the controller at --api, under the same enrollment and leases (docs/mcp.md).
    Mcp(mcp::McpArgs),
    /// Print the shell completion script: `source <(agentops completions bash)`, or save it
    /// where the shell loads completions from.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The completion script, written whole: generated into memory because the generator panics
/// when its writer fails, and a reader that stops early (`| head`) is no error.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "agentops", &mut script);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing the completion script: {e}"))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Validate {
            paths,
            root,
            format,
        } => validate::run(&paths, root.as_deref(), format),
        Command::Reconcile {
            source,
            store,
            writeback,
            ..
        } => reconcile::once(&global, &source, &store, &writeback).await,
        Command::Up {
            source,
            store,
            dispatch,
            writeback,
            agents,
            llm,
            shutdown,
            leader,
            kube,
            exit_when_idle,
        } => {
            let embedded = (!agents.no_agents).then_some((agents, llm));
            reconcile::up(crate::runtime::ControllerConfig {
                global,
                source,
                store,
                dispatch,
                writeback,
                embedded,
                exit_when_idle,
                shutdown,
                leader,
                kube,
            })
            .await
        }
        Command::Agent(args) => agent::run(args).await,
        Command::Ask {
            request,
            project,
            source,
            store,
            writeback,
            llm,
        } => {
            ask::run(
                &global,
                &source,
                &store,
                &writeback,
                &llm,
                &request,
                project.as_deref(),
            )
            .await
        }
        Command::Diff(args) => diff::run(&global, &args).await,
        Command::Mcp(args) => mcp::run(args).await,
        Command::Status {
            store,
            project,
            format,
        } => status::run(&global, &store, project.as_deref(), format).await,
        Command::Migrate { store } => {
            let url = store.url(&global);
            let store = crate::store::AnyStore::connect(&url).await?;
            crate::with_store!(store, s => crate::store::Store::migrate(&s).await)?;
            eprintln!("migrations applied to {}", crate::redact(&url));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { bench } => bench::run(&global, bench).await,
        Command::Completions { shell } => completions(shell),
        Command::Crds(args) => crds::crds(&args),
        Command::Schema(args) => crds::schema(&args),
    }
}
