use std::process::ExitCode;

use anyhow::Context;

use crate::config::{GlobalConfig, SourceConfig, StoreConfig};
use crate::reconcile::sync::{SyncReport, Syncer};
use crate::source::git::{GitSource, Location};
use crate::source::watch::{Reason, Triggers};
use crate::store::{AnyStore, Store};
use crate::with_store;

/// The Git source `--repo`, `--branch` and `--path` describe.
pub fn git_source(global: &GlobalConfig, cfg: &SourceConfig) -> anyhow::Result<GitSource> {
    let location = Location::resolve(&cfg.repo).with_context(|| format!("--repo {}", cfg.repo))?;
    let branch = match &cfg.branch {
        Some(branch) => branch.clone(),
        None => default_branch(&location),
    };
    let source = GitSource::new(
        location,
        &branch,
        &cfg.subpath,
        &global.data_dir(),
        cfg.git_token.clone(),
    );
    if let Location::Folder(folder) = &source.location {
        eprintln!(
            "{} is not the top of a Git repository: importing it into {} (branch {})",
            folder.display(),
            source.mirror.display(),
            source.branch
        );
    }
    Ok(source)
}

/// A local repository's checked-out branch; `main` otherwise.
fn default_branch(location: &Location) -> String {
    let checked_out = match location {
        Location::Local(path) => git2::Repository::open(path).ok().and_then(|repo| {
            let head = repo.head().ok()?;
            if !head.is_branch() {
                return None;
            }
            head.shorthand().ok().map(str::to_owned)
        }),
        _ => None,
    };
    checked_out.unwrap_or_else(|| "main".to_owned())
}

pub fn print_report(report: &SyncReport) {
    for d in &report.diagnostics {
        eprintln!("{d}");
    }
    eprintln!(
        "synced {}: {} files read, {} objects written, {} events, {} errors",
        report.revision,
        report.files_parsed,
        report.object_writes,
        report.events,
        report.diagnostics.len()
    );
}

pub async fn once(
    global: &GlobalConfig,
    source_cfg: &SourceConfig,
    store_cfg: &StoreConfig,
) -> anyhow::Result<ExitCode> {
    let source = git_source(global, source_cfg)?;
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    with_store!(store, store => {
        store.migrate().await?;
        let mut syncer = Syncer::new(source, &source_cfg.source_name, store);
        let report = syncer.sync().await?;
        print_report(&report);
    });
    Ok(ExitCode::SUCCESS)
}

pub async fn up(
    global: &GlobalConfig,
    source_cfg: &SourceConfig,
    store_cfg: &StoreConfig,
    exit_when_idle: bool,
) -> anyhow::Result<ExitCode> {
    let source = git_source(global, source_cfg)?;
    let mut triggers = Triggers::new(source_cfg.poll_interval);
    match &source.location {
        Location::Folder(folder) => triggers.watch(&[(folder.clone(), true)])?,
        location => {
            if let Some(git_dir) = location.local_git_dir() {
                triggers.watch(&[(git_dir.join("refs"), true), (git_dir, false)])?;
            }
        }
    }
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    with_store!(store, store => {
        store.migrate().await?;
        let mut syncer = Syncer::new(source, &source_cfg.source_name, store);
        loop {
            let reason = tokio::select! {
                reason = triggers.next() => reason,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("stopping");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            match syncer.sync().await {
                Ok(report) => {
                    if reason == Reason::Start || report.files_parsed > 0 || report.cursor_moved {
                        print_report(&report);
                    }
                }
                Err(e) => tracing::error!("sync failed: {:#}", anyhow::Error::from(e)),
            }
            if exit_when_idle && syncer.store().open_tasks().await? == 0 {
                eprintln!("idle: no task is pending or in progress");
                return Ok(ExitCode::SUCCESS);
            }
        }
    })
}
