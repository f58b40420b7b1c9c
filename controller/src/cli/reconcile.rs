use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;

use crate::api::ApiState;
use crate::bus::{Bus, InProcessBus, NatsBus};
use crate::config::{
    DispatchArgs, GlobalConfig, PRESENCE_TIMEOUT, SourceConfig, StoreConfig, WritebackArgs,
};
use crate::dispatch::{Backends, Dispatcher};
use crate::presence::{MemoryPresence, Presence, RedisPresence};
use crate::reconcile::sync::{SyncReport, Syncer};
use crate::source::git::{GitSource, Location};
use crate::source::watch::{Reason, Triggers};
use crate::store::queue::LeasePolicy;
use crate::store::writeback::Writeback;
use crate::store::{AnyStore, Store};
use crate::with_store;
use crate::writeback::{GitResults, Retry, ReviewReport, Reviews, StatusWriter};

/// The Git source `--repo`, `--branch` and `--path` describe.
pub fn git_source(global: &GlobalConfig, cfg: &SourceConfig) -> anyhow::Result<GitSource> {
    let source = locate(
        global,
        &cfg.repo,
        cfg.branch.as_deref(),
        &cfg.subpath,
        cfg.git_token.clone(),
    )?;
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

/// The Git source of `--repo` and `--branch`, nothing read or written yet.
pub fn locate(
    global: &GlobalConfig,
    repo: &str,
    branch: Option<&str>,
    subpath: &str,
    token: Option<String>,
) -> anyhow::Result<GitSource> {
    let location = Location::resolve(repo).with_context(|| format!("--repo {repo}"))?;
    let branch = match branch {
        Some(branch) => branch.to_owned(),
        None => default_branch(&location),
    };
    Ok(GitSource::new(
        location,
        &branch,
        subpath,
        &global.data_dir(),
        token,
    ))
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

fn print_reviews(report: &ReviewReport) {
    if *report != ReviewReport::default() {
        eprintln!(
            "reviews: {} proposed, {} merged, {} retried, {} failed, {} errors",
            report.proposed, report.merged, report.retried, report.failed, report.errors
        );
    }
}

/// The write-back loop of `up`: follows outputs in review on every tick and webhook nudge, and
/// commits the status once per tick (so at most once per interval), and once more on the way
/// out.
async fn writeback_loop<S>(
    status: Option<StatusWriter<S>>,
    reviews: Reviews<S>,
    interval: std::time::Duration,
    review_nudge: Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
    on_merge: impl Fn(&ReviewReport) + Send + 'static,
) where
    S: Writeback,
{
    let mut status = status;
    // Not at once: the first sync has not reached the store yet.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush = tokio::select! {
            _ = tick.tick() => true,
            () = review_nudge.notified() => false,
            () = stop.cancelled() => break,
        };
        match reviews.check().await {
            Ok(report) => {
                print_reviews(&report);
                on_merge(&report);
            }
            Err(e) => tracing::warn!("review check failed: {}", crate::error_chain(&e)),
        }
        if flush && let Some(status) = status.as_mut() {
            match status.flush().await {
                Ok(Some(commit)) => tracing::info!(%commit, "status committed"),
                Ok(None) => {}
                Err(e) => tracing::warn!("status not committed: {}", crate::error_chain(&e)),
            }
        }
    }
    if let Some(status) = status.as_mut()
        && let Err(e) = status.flush().await
    {
        tracing::warn!("final status not committed: {}", crate::error_chain(&e));
    }
}

pub async fn up(
    global: &GlobalConfig,
    source_cfg: &SourceConfig,
    store_cfg: &StoreConfig,
    dispatch_args: &DispatchArgs,
    writeback: &WritebackArgs,
    embedded: Option<&(crate::config::EmbeddedArgs, crate::config::LlmArgs)>,
    exit_when_idle: bool,
) -> anyhow::Result<ExitCode> {
    let source = git_source(global, source_cfg)?;
    let forge = writeback.forge(&source).context("configuring the forge")?;
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
    let api_url = format!("http://{}", listener.local_addr()?);
    let limiter: Arc<dyn agentops_agents::llm::RateLimiter> =
        Arc::new(crate::llm::PresenceRateLimiter(backends.presence.clone()));
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    with_store!(store, store => {
        store.migrate().await?;
        let dispatcher =
            Dispatcher::with_backends(store.clone(), dispatch_args.config(), backends);
        let review_nudge = Arc::new(tokio::sync::Notify::new());
        let results = GitResults {
            store: store.clone(),
            source: source.clone(),
            author: writeback.author(),
            retry: Retry::default(),
        };
        let hooks = crate::api::Hooks {
            secret: writeback.webhook_secret.clone(),
            sync: triggers.nudger(),
            review: review_nudge.clone(),
        };
        let review_check = review_nudge.clone();
        let api = ApiState::with_writeback(dispatcher.clone(), Some(Arc::new(results)), Some(hooks));
        let stop = tokio_util::sync::CancellationToken::new();
        let status = (!writeback.no_status).then(|| {
            StatusWriter::new(
                store.clone(),
                &source_cfg.source_name,
                source.clone(),
                writeback.author(),
                Retry::default(),
            )
        });
        let reviews = Reviews {
            store: store.clone(),
            forge: forge.clone(),
            base: source.branch.clone(),
            policy: dispatch_args.config().policy,
        };
        // Before `--exit-when-idle` gives up, outputs merged meanwhile are looked at once more:
        // their dependents may be able to run.
        let idle_reviews = Reviews {
            store: store.clone(),
            forge: forge.clone(),
            base: source.branch.clone(),
            policy: dispatch_args.config().policy,
        };
        let woken = dispatcher.clone();
        let writeback_task = tokio::spawn(writeback_loop(
            status,
            reviews,
            writeback.status_interval,
            review_nudge,
            stop.clone(),
            move |report| {
                if report.proposed + report.merged + report.retried + report.failed > 0 {
                    woken.events_recorded();
                }
                if report.merged + report.retried > 0 {
                    // Dependents of merged work, and retried work, may be ready now.
                    woken.wake();
                }
            },
        ));
        let server = axum::serve(listener, crate::api::router(api.clone()));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
        let _loops = dispatcher.start();
        let _background = dispatcher.spawn_background();
        let agents_stop = tokio_util::sync::CancellationToken::new();
        let mut agents_task = None;
        let mut agents_pending = match embedded {
            Some((agents, llm)) => Some((
                Arc::new(crate::agents::Embedded {
                    store: store.clone(),
                    source: source.clone(),
                    provider: Arc::new(
                        agentops_agents::provider::AnyProvider::new(llm.config(), limiter.clone())
                            .context("configuring the language model")?,
                    ),
                    llm: llm.config(),
                    limiter,
                    usage: crate::store::usage::StoreUsageSink::new(store.clone()),
                    proposer: crate::agents::Proposer {
                        source: source.clone(),
                        author: writeback.author(),
                        forge: forge.clone(),
                    },
                }),
                agents.seed_capabilities.clone(),
            )),
            None => None,
        };
        let mut syncer = Syncer::new(source, &source_cfg.source_name, store.clone());
        // Agents finish work between syncs, so idleness is checked on its own clock.
        let mut idle_check = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            let reason = tokio::select! {
                reason = triggers.next() => reason,
                _ = idle_check.tick(), if exit_when_idle && api.ready.load(Relaxed) => {
                    if syncer.store().open_tasks().await? == 0 {
                        match idle_reviews.check().await {
                            Ok(report) if report.merged + report.retried > 0 => {
                                print_reviews(&report);
                                dispatcher.events_recorded();
                                dispatcher.wake();
                                continue;
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!("review check failed: {}", crate::error_chain(&e)),
                        }
                        if syncer.store().open_tasks().await? != 0 {
                            continue;
                        }
                        eprintln!("idle: no task can move without a person");
                        break;
                    }
                    continue;
                }
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("stopping");
                    break;
                }
            };
            match syncer.sync().await {
                Ok(report) => {
                    api.ready.store(true, Relaxed);
                    // After the first sync: the mirror then holds the agent specs.
                    if let Some((shared, capabilities)) = agents_pending.take() {
                        agents_task = Some(crate::agents::spawn(
                            shared,
                            api_url.clone(),
                            capabilities,
                            agents_stop.clone(),
                        ));
                    }
                    if report.events > 0 {
                        dispatcher.events_recorded();
                    }
                    if report.object_writes > 0 {
                        // A tool that a blocked task waited for may have arrived with it.
                        match crate::store::tools::ToolRegistry::unblock_tool_waiters(&store)
                            .await
                        {
                            Ok(0) => {}
                            Ok(n) => {
                                eprintln!("{n} task(s) waiting for a tool can run now");
                                dispatcher.events_recorded();
                            }
                            Err(e) => tracing::warn!(
                                "cannot unblock tasks waiting for tools: {}",
                                crate::error_chain(&e)
                            ),
                        }
                        dispatcher.wake();
                    }
                    if reason == Reason::Start || report.files_parsed > 0 || report.cursor_moved {
                        print_report(&report);
                    }
                }
                Err(e) => tracing::error!("sync failed: {}", crate::error_chain(&e)),
            }
            if reason == Reason::Nudge {
                // A webhook delivery may be about a pull request: look at the reviews too.
                review_check.notify_one();
            }
        }
        // The agents hand back what they hold, then the last status, then the last events.
        agents_stop.cancel();
        if let Some(agents) = agents_task
            && tokio::time::timeout(EXIT_FLUSH * 5, agents).await.is_err()
        {
            tracing::warn!("gave up waiting for the embedded agents to stop");
        }
        stop.cancel();
        if tokio::time::timeout(EXIT_FLUSH * 15, writeback_task).await.is_err() {
            tracing::warn!("gave up waiting for the last status commit");
        }
        dispatcher.flush_events(EXIT_FLUSH).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// How long `up` spends publishing the last events before it exits.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// The bus and presence `--nats` and `--redis` ask for, else the embedded ones. Neither waits
/// for its server: both connect in the background and keep trying.
pub(crate) async fn backends(args: &DispatchArgs) -> anyhow::Result<Backends> {
    let bus: Arc<dyn Bus> = match &args.nats {
        Some(url) => Arc::new(
            NatsBus::connect(url, args.bus_prefix.clone())
                .await
                .context("--nats")?,
        ),
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
