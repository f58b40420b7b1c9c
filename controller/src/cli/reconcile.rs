use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;

use crate::api::ApiState;
use crate::bus::{Bus, InProcessBus, NatsBus};
use crate::config::{DispatchArgs, GlobalConfig, PRESENCE_TIMEOUT, SourceConfig, StoreConfig};
use crate::dispatch::{Backends, Dispatcher};
use crate::presence::{MemoryPresence, Presence, RedisPresence};
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
    let backends = backends(dispatch_args).await?;
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    with_store!(store, store => {
        store.migrate().await?;
        let dispatcher =
            Dispatcher::with_backends(store.clone(), dispatch_args.config(), backends);
        let api = ApiState::new(dispatcher.clone());
        let server = axum::serve(listener, crate::api::router(api.clone()));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
        dispatcher.start();
        let _background = dispatcher.spawn_background();
        let mut syncer = Syncer::new(source, &source_cfg.source_name, store);
        // Agents finish work between syncs, so idleness is checked on its own clock.
        let mut idle_check = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            let reason = tokio::select! {
                reason = triggers.next() => reason,
                _ = idle_check.tick(), if exit_when_idle && api.ready.load(Relaxed) => {
                    if syncer.store().open_tasks().await? == 0 {
                        eprintln!("idle: no task is pending or in progress");
                        dispatcher.flush_events(EXIT_FLUSH).await;
                        return Ok(ExitCode::SUCCESS);
                    }
                    continue;
                }
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("stopping");
                    dispatcher.flush_events(EXIT_FLUSH).await;
                    return Ok(ExitCode::SUCCESS);
                }
            };
            match syncer.sync().await {
                Ok(report) => {
                    api.ready.store(true, Relaxed);
                    if report.events > 0 {
                        dispatcher.events_recorded();
                    }
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

/// How long `up` spends publishing the last events before it exits.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// The bus and presence `--nats` and `--redis` ask for, else the embedded ones. Neither waits
/// for its server: both connect in the background and keep trying.
pub(crate) async fn backends(args: &DispatchArgs) -> anyhow::Result<Backends> {
    let bus: Arc<dyn Bus> = match &args.nats {
        Some(url) => Arc::new(NatsBus::connect(url).await.context("--nats")?),
        None => Arc::new(InProcessBus::default()),
    };
    let presence: Arc<dyn Presence> = match &args.redis {
        Some(url) => Arc::new(RedisPresence::connect(url, PRESENCE_TIMEOUT).context("--redis")?),
        None => Arc::new(MemoryPresence::default()),
    };
    eprintln!(
        "events and announcements: {}; presence: {}",
        bus.describe(),
        presence.describe()
    );
    Ok(Backends { bus, presence })
}
