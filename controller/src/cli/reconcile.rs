use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;

use crate::api::ApiState;
use crate::config::{DispatchArgs, GlobalConfig, SourceConfig, StoreConfig};
use crate::dispatch::Dispatcher;
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
    dispatch_args: &DispatchArgs,
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
    let listener = tokio::net::TcpListener::bind(dispatch_args.listen)
        .await
        .with_context(|| format!("listening on {}", dispatch_args.listen))?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    with_store!(store, store => {
        store.migrate().await?;
        let dispatcher = Dispatcher::new(store.clone(), dispatch_args.config());
        let api = ApiState::new(dispatcher.clone());
        let server = axum::serve(listener, crate::api::router(api.clone()));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
        tokio::spawn(dispatcher.clone().run_sweeper());
        let mut syncer = Syncer::new(source, &source_cfg.source_name, store);
        // Agents finish work between syncs, so idleness is checked on its own clock.
        let mut idle_check = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            let reason = tokio::select! {
                reason = triggers.next() => reason,
                _ = idle_check.tick(), if exit_when_idle && api.ready.load(Relaxed) => {
                    if syncer.store().open_tasks().await? == 0 {
                        eprintln!("idle: no task is pending or in progress");
                        return Ok(ExitCode::SUCCESS);
                    }
                    continue;
                }
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("stopping");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            match syncer.sync().await {
                Ok(report) => {
                    api.ready.store(true, Relaxed);
                    if report.object_writes > 0 {
                        dispatcher.wake();
                    }
                    if reason == Reason::Start || report.files_parsed > 0 || report.cursor_moved {
                        print_report(&report);
                    }
                }
                Err(e) => tracing::error!("sync failed: {}", crate::error_chain(&e)),
            }
        }
    })
}
