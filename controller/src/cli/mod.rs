//! The `agentops` command line: one function per subcommand, each taking its typed
//! configuration and returning an exit code.

mod ask;
mod bench;
mod bench_dispatch;
mod bench_writeback;
mod diff;
mod reconcile;
mod status;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{
    DispatchArgs, EmbeddedArgs, GlobalConfig, LlmArgs, ShutdownArgs, SourceConfig, StoreConfig,
    WritebackArgs,
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
pub enum Command {
    /// Check spec files; print every error as path:line:column: message. Exit 1 if any.
    Validate {
        /// A spec file or a directory of them.
        path: std::path::PathBuf,
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
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Validate { path, format } => validate::run(&path, format),
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
            })
            .await
        }
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
    }
}
