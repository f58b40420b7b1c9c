//! `reconcile --once` and `up`: the flags are parsed here, the work is done by the runtime.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::{GlobalConfig, SourceConfig, StoreConfig, WritebackArgs};
use crate::reconcile::sync::Syncer;
use crate::runtime::{ControllerConfig, Exit, Runtime, print_report, print_reviews};
use crate::source::git::GitSource;
use crate::store::queue::LeasePolicy;
use crate::store::{AnyStore, Store};
use crate::with_store;
use crate::writeback::{Retry, Reviews, StatusWriter};

/// The Git source `--repo`, `--branch` and `--path` describe.
pub fn git_source(global: &GlobalConfig, cfg: &SourceConfig) -> anyhow::Result<GitSource> {
    Ok(crate::runtime::git_source(global, cfg)?)
}

/// The bus and presence `--nats` and `--redis` ask for, else the embedded ones.
pub(crate) async fn backends(
    args: &crate::config::DispatchArgs,
) -> anyhow::Result<crate::dispatch::Backends> {
    Ok(crate::runtime::backends(args).await?)
}

/// The Git source of `--repo` and `--branch`, nothing read or written yet.
pub fn locate(
    global: &GlobalConfig,
    repo: &str,
    branch: Option<&str>,
    subpath: &str,
    token: Option<String>,
) -> anyhow::Result<GitSource> {
    Ok(crate::runtime::locate(
        global, repo, branch, subpath, token,
    )?)
}

pub async fn once(
    global: &GlobalConfig,
    source_cfg: &SourceConfig,
    store_cfg: &StoreConfig,
    writeback: &WritebackArgs,
) -> anyhow::Result<ExitCode> {
    let source = git_source(global, source_cfg)?;
    let forge = writeback.forge(&source).context("configuring the forge")?;
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    with_store!(store, store => {
        store.migrate().await?;
        let mut syncer = Syncer::new(source.clone(), &source_cfg.source_name, store.clone());
        let report = syncer.sync().await?;
        print_report(&report);
        let reviews = Reviews {
            store: store.clone(),
            forge,
            base: source.branch.clone(),
            policy: LeasePolicy::default(),
        };
        print_reviews(&reviews.check().await?);
        if !writeback.no_status {
            let mut status = StatusWriter::new(
                store,
                &source_cfg.source_name,
                source,
                writeback.author(),
                Retry::default(),
            );
            match status.flush().await {
                Ok(Some(commit)) => eprintln!("status committed: {commit}"),
                Ok(None) => eprintln!("status unchanged"),
                Err(e) => {
                    // The pass ran; the status is committed by the next one.
                    eprintln!("status not committed: {}", crate::error_chain(&e));
                    return Ok(ExitCode::from(1));
                }
            }
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// `agentops up`: the controller until SIGTERM or SIGINT (a second one exits at once), or
/// until it is idle with `--exit-when-idle`.
pub async fn up(config: ControllerConfig) -> anyhow::Result<ExitCode> {
    let signals = agentops_agents::shutdown::Signals::install().context("handling signals")?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stopping = shutdown.clone();
    signals.spawn_two_step(move |signal| {
        eprintln!("{signal}: stopping (a second signal exits at once)");
        stopping.cancel();
    });
    let runtime = Runtime::build(config).await?;
    match runtime.run(shutdown).await? {
        Exit::Stopped | Exit::Idle => Ok(ExitCode::SUCCESS),
        // A supervisor restarts it, and it stands by until it can lead again.
        Exit::LostLeadership => Ok(ExitCode::from(1)),
    }
}
