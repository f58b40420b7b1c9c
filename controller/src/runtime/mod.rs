//! The controller runtime behind `agentops up`: [`Runtime::build`] turns the typed
//! configuration into the running parts (source, store, dispatcher, bus, presence, write-back,
//! forge, API, embedded agents), and [`Runtime::run`] owns their tasks until it is told to stop
//! or, with `--exit-when-idle`, runs out of work. Either way it stops in the phases of
//! [`stop`]: stop claiming, let agents finish or hand back, push the status, drain the relay,
//! close the API.

pub mod kubernetes;
pub mod leader;
mod stop;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use agentops_agents::shutdown::Stop;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::ApiState;
use crate::bus::{Bus, BusError, InProcessBus, NatsBus};
use crate::config::{
    DispatchArgs, EmbeddedArgs, GlobalConfig, KubeArgs, LeaderArgs, LlmArgs, PRESENCE_TIMEOUT,
    ShutdownArgs, SourceConfig, StoreConfig, WritebackArgs,
};
use crate::dispatch::{Backends, Dispatcher};
use crate::forge::{Forge, ForgeError};
use crate::presence::{MemoryPresence, Presence, PresenceError, RedisPresence};
use crate::reconcile::sync::{SyncReport, Syncer};
use crate::source::SourceError;
use crate::source::git::{GitSource, Location};
use crate::source::watch::{Reason, Triggers};
use crate::store::queue::{Liveness, Outbox, Queue};
use crate::store::tools::ToolRegistry;
use crate::store::usage::UsageLog;
use crate::store::writeback::Writeback;
use crate::store::{AnyStore, Store, StoreError};
use crate::telemetry::{
    InternalEvent, LeadershipLost, Leading, ReviewCheckFailed, ReviewsChecked, StandingBy,
    StatusNotCommitted, SyncCompleted, SyncFailed,
};
use crate::writeback::{GitResults, Retry, ReviewReport, Reviews, StatusWriter};

pub use stop::{Deadline, Phase};

/// Everything `up` is configured with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub global: GlobalConfig,
    pub source: SourceConfig,
    pub store: StoreConfig,
    pub dispatch: DispatchArgs,
    pub writeback: WritebackArgs,
    /// The embedded agents and their model; `None` with `--no-agents`.
    pub embedded: Option<(EmbeddedArgs, LlmArgs)>,
    pub exit_when_idle: bool,
    pub shutdown: ShutdownArgs,
    pub leader: LeaderArgs,
    pub kube: KubeArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("--repo {repo}")]
    Source {
        repo: String,
        #[source]
        source: SourceError,
    },
    #[error("watching the source")]
    Watch(#[source] SourceError),
    #[error("configuring the forge")]
    Forge(#[source] ForgeError),
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--nats")]
    Bus(#[source] BusError),
    #[error("--redis")]
    Presence(#[source] PresenceError),
    #[error("the store")]
    Store(#[source] StoreError),
    #[error("configuring the language model")]
    Llm(#[source] agentops_agents::llm::LlmError),
    #[error("leader election")]
    Leader(#[source] leader::LeaderError),
    #[error("agent enrollment")]
    Enrollment(#[source] crate::api::enroll::EnrollmentError),
    #[error("--kube")]
    Kube(#[source] crate::source::kube::KubeError),
}

/// Why [`Runtime::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A signal (or the caller's token) asked it to stop.
    Stopped,
    /// `--exit-when-idle`: no task can move without a person.
    Idle,
    /// The leader lock failed, so another controller may lead now.
    LostLeadership,
}

/// The store operations the controller needs, all in one bound.
pub trait ControllerStore:
    Store + Queue + Outbox + Liveness + Writeback + ToolRegistry + UsageLog + Clone
{
}

impl<T> ControllerStore for T where
    T: Store + Queue + Outbox + Liveness + Writeback + ToolRegistry + UsageLog + Clone
{
}

/// The parts of a controller, built and connected but not yet running.
pub struct Runtime {
    config: ControllerConfig,
    source: GitSource,
    forge: Arc<dyn Forge>,
    triggers: Triggers,
    listener: tokio::net::TcpListener,
    backends: Backends,
    store: AnyStore,
    leadership: leader::Leadership,
    /// With `--kube`: the cluster's client.
    kube: Option<kube::Client>,
}

/// The Git source `--repo`, `--branch` and `--path` describe.
pub fn git_source(global: &GlobalConfig, cfg: &SourceConfig) -> Result<GitSource, RuntimeError> {
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

/// The Git source of `repo` and `branch`, nothing read or written yet.
pub fn locate(
    global: &GlobalConfig,
    repo: &str,
    branch: Option<&str>,
    subpath: &str,
    token: Option<String>,
) -> Result<GitSource, RuntimeError> {
    let location = Location::resolve(repo).map_err(|source| RuntimeError::Source {
        repo: repo.to_owned(),
        source,
    })?;
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

/// The bus and presence `--nats` and `--redis` ask for, else the embedded ones. Neither waits
/// for its server: both connect in the background and keep trying.
pub async fn backends(args: &DispatchArgs) -> Result<Backends, RuntimeError> {
    let bus: Arc<dyn Bus> = match &args.nats {
        Some(url) => Arc::new(
            NatsBus::connect(url, args.bus_prefix.clone())
                .await
                .map_err(RuntimeError::Bus)?,
        ),
        None => Arc::new(InProcessBus::default()),
    };
    let presence: Arc<dyn Presence> = match &args.redis {
        Some(url) => {
            let prefix = args.bus_prefix.prefix();
            Arc::new(
                RedisPresence::connect(url, prefix, PRESENCE_TIMEOUT)
                    .map_err(RuntimeError::Presence)?,
            )
        }
        None => Arc::new(MemoryPresence::default()),
    };
    eprintln!(
        "events and announcements: {}; presence: {}",
        bus.describe(),
        presence.describe()
    );
    Ok(Backends { bus, presence })
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

pub fn print_reviews(report: &ReviewReport) {
    if *report != ReviewReport::default() {
        eprintln!(
            "reviews: {} proposed, {} merged, {} retried, {} failed, {} errors",
            report.proposed, report.merged, report.retried, report.failed, report.errors
        );
    }
}

impl Runtime {
    /// Resolves the source, binds the API's address, connects the bus, presence and store.
    pub async fn build(config: ControllerConfig) -> Result<Runtime, RuntimeError> {
        let source = git_source(&config.global, &config.source)?;
        let forge = config
            .writeback
            .forge(&source)
            .map_err(RuntimeError::Forge)?;
        let mut triggers = Triggers::new(config.source.poll_interval);
        match &source.location {
            Location::Folder(folder) => triggers
                .watch(&[(folder.clone(), true)])
                .map_err(RuntimeError::Watch)?,
            location => {
                if let Some(git_dir) = location.local_git_dir() {
                    triggers
                        .watch(&[(git_dir.join("refs"), true), (git_dir, false)])
                        .map_err(RuntimeError::Watch)?;
                }
            }
        }
        let addr = config.dispatch.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Listen { addr, source })?;
        let backends = backends(&config.dispatch).await?;
        let store = AnyStore::connect(&config.store.url(&config.global))
            .await
            .map_err(RuntimeError::Store)?;
        let kube = match config.kube.kube {
            true => Some(
                crate::source::kube::client()
                    .await
                    .map_err(RuntimeError::Kube)?,
            ),
            false => None,
        };
        let leadership = leader::Leadership::configure(
            &config.store.url(&config.global),
            &config.leader,
            &config.kube,
            kube.clone(),
        )
        .map_err(RuntimeError::Leader)?;
        Ok(Runtime {
            kube,
            config,
            leadership,
            source,
            forge,
            triggers,
            listener,
            backends,
            store,
        })
    }

    /// Where the API listens (the port is the real one when `--listen` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until `shutdown` fires (or, with `--exit-when-idle`, until no task can move), then
    /// stops within the configured grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Exit, RuntimeError> {
        let Runtime {
            config,
            source,
            forge,
            triggers,
            listener,
            backends,
            store,
            leadership,
            kube,
        } = self;
        let parts = Parts {
            kube,
            config,
            source,
            forge,
            triggers,
            listener,
            backends,
            leadership,
        };
        crate::with_store!(store, store => parts.run(store, shutdown).await)
    }
}

/// Stand by until this controller leads, serving health and metrics meanwhile. Returns the
/// lead and the listener for the API, or `None` when told to stop first.
async fn lead(
    mut leadership: leader::Leadership,
    lock: &str,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> Result<Option<(leader::Lead, tokio::net::TcpListener)>, RuntimeError> {
    if matches!(leadership, leader::Leadership::Sole) {
        Leading { lock }.emit();
        return Ok(Some((leadership.watch(), listener)));
    }
    // The standby's server and then the leader's API serve the same socket.
    let addr = listener_addr(&listener);
    let listen_error_at = move |source| RuntimeError::Listen { addr, source };
    let socket = listener.into_std().map_err(listen_error_at)?;
    let spare = socket.try_clone().map_err(listen_error_at)?;
    let standby_listener = tokio::net::TcpListener::from_std(socket).map_err(listen_error_at)?;
    let standby_stop = CancellationToken::new();
    let closing = standby_stop.clone();
    let standby = tokio::spawn(async move {
        let serving = axum::serve(standby_listener, crate::api::standby_router())
            .with_graceful_shutdown(closing.cancelled_owned())
            .await;
        if let Err(e) = serving {
            tracing::error!("HTTP server stopped: {e}");
        }
    });
    let acquired = leadership
        .acquire(shutdown, || StandingBy { lock }.emit())
        .await;
    standby_stop.cancel();
    let _ = standby.await;
    if !acquired.map_err(RuntimeError::Leader)? {
        return Ok(None);
    }
    Leading { lock }.emit();
    let listener = tokio::net::TcpListener::from_std(spare).map_err(listen_error_at)?;
    Ok(Some((leadership.watch(), listener)))
}

fn listener_addr(listener: &tokio::net::TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// [`Runtime`] without its store, which [`Parts::run`] takes in its concrete type.
struct Parts {
    kube: Option<kube::Client>,
    config: ControllerConfig,
    source: GitSource,
    forge: Arc<dyn Forge>,
    triggers: Triggers,
    listener: tokio::net::TcpListener,
    backends: Backends,
    leadership: leader::Leadership,
}

/// The long-running tasks of a controller, each stopped in its own phase.
struct Running<S: ControllerStore> {
    dispatcher: Arc<Dispatcher<S>>,
    api: Arc<ApiState<S>>,
    tasks: TaskTracker,
    /// The embedded agents, once they are started (after the first sync).
    agents: Option<tokio::task::JoinHandle<()>>,
    agents_stop: Stop,
    writeback: tokio::task::JoinHandle<()>,
    writeback_stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    server_stop: CancellationToken,
    /// The claim loop, sweeper, relay, announcer and presence loop: stopped when dropped.
    dispatch_loops: (crate::dispatch::Background, crate::dispatch::Background),
}

impl Parts {
    async fn run<S: ControllerStore>(
        self,
        store: S,
        shutdown: CancellationToken,
    ) -> Result<Exit, RuntimeError> {
        let Parts {
            kube,
            config,
            source,
            forge,
            mut triggers,
            listener,
            backends,
            leadership,
        } = self;
        store.migrate().await.map_err(RuntimeError::Store)?;
        let Some((mut leadership, listener)) =
            lead(leadership, &config.leader.leader_lock, listener, &shutdown).await?
        else {
            return Ok(Exit::Stopped);
        };
        let local_addr = listener
            .local_addr()
            .map_err(|source| RuntimeError::Listen {
                addr: config.dispatch.listen,
                source,
            })?;
        let api_url = format!("http://{local_addr}");
        eprintln!("listening on {api_url}");
        let limiter: Arc<dyn agentops_agents::llm::RateLimiter> =
            Arc::new(crate::llm::PresenceRateLimiter(backends.presence.clone()));
        let dispatch_config = config.dispatch.config();
        let dispatcher = Dispatcher::with_backends(store.clone(), dispatch_config, backends);
        let review_nudge = Arc::new(tokio::sync::Notify::new());
        let results = GitResults {
            store: store.clone(),
            source: source.clone(),
            author: config.writeback.author(),
            retry: Retry::default(),
        };
        let hooks = crate::api::Hooks {
            secret: config.writeback.webhook_secret.clone(),
            sync: triggers.nudger(),
            review: review_nudge.clone(),
        };
        let mut enrollment = crate::api::Enrollment::configure(
            config.dispatch.agent_secret.as_deref(),
            config.dispatch.agent_secrets.as_deref(),
        )
        .map_err(RuntimeError::Enrollment)?;
        let token_reviewer = if config.dispatch.agent_service_accounts.is_empty() {
            None
        } else {
            let refused = |message: String| {
                RuntimeError::Enrollment(crate::api::enroll::EnrollmentError::ServiceAccounts {
                    message,
                })
            };
            let Some(client) = kube.clone() else {
                return Err(refused(
                    "needs --kube: the Kubernetes API server checks the tokens".to_owned(),
                ));
            };
            enrollment
                .allow_service_accounts(&config.dispatch.agent_service_accounts)
                .map_err(refused)?;
            Some(crate::api::enroll::TokenReviewer::new(client))
        };
        if !enrollment.requires_secret() {
            eprintln!(
                "agent registration: from this machine only (--agent-secret or --agent-secrets \
                 enrolls agents elsewhere)"
            );
        }
        let embedded_secret = crate::dispatch::new_token();
        enrollment.allow_internal(&embedded_secret);
        let proposer = crate::embedded::Proposer {
            source: source.clone(),
            author: config.writeback.author(),
            forge: forge.clone(),
        };
        let api = ApiState::build(crate::api::ApiParts {
            dispatcher: dispatcher.clone(),
            results: Some(Arc::new(results)),
            hooks: Some(hooks),
            enrollment,
            limits: crate::api::Limits::new(
                config.dispatch.max_agents,
                config.dispatch.agent_rate_limit,
            ),
            proposer: Some(proposer.clone()),
            tools: Some(Arc::new(store.clone())),
            token_reviewer,
        });
        let reviews = Reviews {
            store: store.clone(),
            forge: forge.clone(),
            base: source.branch.clone(),
            policy: dispatch_config.policy,
        };
        let status = (!config.writeback.no_status).then(|| {
            StatusWriter::new(
                store.clone(),
                &config.source.source_name,
                source.clone(),
                config.writeback.author(),
                Retry::default(),
            )
        });

        let tasks = TaskTracker::new();
        let writeback_stop = CancellationToken::new();
        let woken = dispatcher.clone();
        let writeback = tasks.spawn(writeback_loop(
            status,
            reviews.clone(),
            config.writeback.status_interval,
            review_nudge.clone(),
            writeback_stop.clone(),
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
        let server_stop = CancellationToken::new();
        let closing = server_stop.clone();
        let mcp_url = crate::api::mcp::loopback_url(local_addr);
        let router = crate::api::router(api.clone()).merge(crate::api::mcp::router(
            &mcp_url,
            &api.enrollment,
            closing.child_token(),
        ));
        let server = tasks.spawn(async move {
            let serving = crate::api::serve(listener, router, closing.cancelled_owned()).await;
            if let Err(e) = serving {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
        let mut running = Running {
            dispatch_loops: (dispatcher.start(), dispatcher.spawn_background()),
            dispatcher,
            api,
            tasks,
            agents: None,
            agents_stop: Stop::new(),
            writeback,
            writeback_stop,
            server,
            server_stop,
        };
        let mut agents_pending = match &config.embedded {
            Some((agents, llm)) => Some((
                Arc::new(crate::embedded::Embedded {
                    store: store.clone(),
                    source: source.clone(),
                    provider: Arc::new(
                        agentops_agents::provider::AnyProvider::new(llm.config(), limiter.clone())
                            .map_err(RuntimeError::Llm)?,
                    ),
                    llm: llm.config(),
                    limiter,
                    usage: crate::store::usage::StoreUsageSink::new(store.clone()),
                    proposer,
                    enrollment_secret: embedded_secret.clone(),
                }),
                agents.seed_capabilities.clone(),
            )),
            None => None,
        };

        let kube_stop = CancellationToken::new();
        let claims = crate::reconcile::claims::Claims::default();
        if kube.is_some() {
            // Another source's declarations changed: the Git source decides afresh.
            let mut changed = claims.changed();
            let nudger = triggers.nudger();
            let stop = kube_stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        r = changed.changed() => match r {
                            Ok(()) => nudger.nudge(),
                            Err(_) => break,
                        },
                    }
                }
            });
        }
        let kube_loop = kube.map(|client| {
            let dispatcher = running.dispatcher.clone();
            let options = kubernetes::KubeOptions {
                namespace: config.kube.namespace.clone(),
                status_interval: config.writeback.status_interval,
            };
            let source =
                kubernetes::KubeLoop::new(client, store.clone()).with_claims(claims.clone());
            tokio::spawn(source.run(options, kube_stop.clone(), move |_, report| {
                if report.events > 0 {
                    dispatcher.events_recorded();
                }
                if report.object_writes > 0 {
                    dispatcher.wake();
                }
            }))
        });
        let mut syncer = Syncer::new(source, &config.source.source_name, store.clone());
        if kube_loop.is_some() {
            syncer = syncer.with_claims(claims);
        }
        // Agents finish work between syncs, so idleness is checked on its own clock.
        let mut idle_check = tokio::time::interval(Duration::from_millis(500));
        let exit = loop {
            let reason = tokio::select! {
                // A stop asked for during a sync is seen as soon as the sync ends.
                biased;
                () = shutdown.cancelled() => break Exit::Stopped,
                error = leadership.lost() => {
                    LeadershipLost { error: &error }.emit();
                    break Exit::LostLeadership;
                }
                reason = triggers.next() => reason,
                _ = idle_check.tick(), if config.exit_when_idle && running.api.ready.load(Relaxed) => {
                    if idle(&store, &reviews, &running.dispatcher).await {
                        eprintln!("idle: no task can move without a person");
                        break Exit::Idle;
                    }
                    continue;
                }
            };
            let began = std::time::Instant::now();
            match syncer.sync().await {
                Ok(report) => {
                    SyncCompleted {
                        source: &config.source.source_name,
                        report: &report,
                        took: began.elapsed(),
                    }
                    .emit();
                    running.api.ready.store(true, Relaxed);
                    // After the first sync: the mirror then holds the agent specs.
                    if let Some((shared, capabilities)) = agents_pending.take() {
                        running.agents = Some(crate::embedded::spawn(
                            shared,
                            api_url.clone(),
                            capabilities,
                            running.agents_stop.clone(),
                        ));
                    }
                    after_sync(&store, &running.dispatcher, &report).await;
                    if reason == Reason::Start || report.files_parsed > 0 || report.cursor_moved {
                        print_report(&report);
                    }
                }
                Err(error) => SyncFailed {
                    source: &config.source.source_name,
                    error: &error,
                }
                .emit(),
            }
            if reason == Reason::Nudge {
                // A webhook delivery may be about a pull request: look at the reviews too.
                review_nudge.notify_one();
            }
        };
        kube_stop.cancel();
        if let Some(kube_loop) = kube_loop {
            let _ = kube_loop.await;
        }
        if exit == Exit::Stopped {
            eprintln!(
                "stopping within {}",
                humantime::format_duration(config.shutdown.shutdown_grace)
            );
        }
        running
            .stop(Deadline::after(config.shutdown.shutdown_grace))
            .await;
        if exit != Exit::LostLeadership {
            // Only once everything has stopped: a standby may lead from the next moment.
            leadership.release().await;
        }
        Ok(exit)
    }
}

/// What a sync's outcome asks of dispatch.
async fn after_sync<S: ControllerStore>(
    store: &S,
    dispatcher: &Dispatcher<S>,
    report: &SyncReport,
) {
    if report.events > 0 {
        dispatcher.events_recorded();
    }
    // A tool that a blocked task waited for may have arrived with this sync, or with an
    // earlier one while the agent was still asking about it: every pass looks.
    let unblocked = match store.unblock_tool_waiters().await {
        Ok(0) => false,
        Ok(n) => {
            eprintln!("{n} task(s) waiting for a tool can run now");
            dispatcher.events_recorded();
            true
        }
        Err(e) => {
            tracing::warn!(
                "cannot unblock tasks waiting for tools: {}",
                crate::error_chain(&e)
            );
            false
        }
    };
    if report.object_writes > 0 || unblocked {
        dispatcher.wake();
    }
}

/// Whether no task can move without a person. Outputs merged meanwhile are looked at once
/// more before saying so: their dependents may be able to run.
async fn idle<S: ControllerStore>(
    store: &S,
    reviews: &Reviews<S>,
    dispatcher: &Dispatcher<S>,
) -> bool {
    let open = |store: &S| {
        let store = store.clone();
        async move {
            store.open_tasks().await.unwrap_or_else(|e| {
                tracing::warn!("cannot count open tasks: {}", crate::error_chain(&e));
                1
            })
        }
    };
    if open(store).await != 0 {
        return false;
    }
    match reviews.check().await {
        Ok(report) if report.merged + report.retried > 0 => {
            print_reviews(&report);
            dispatcher.events_recorded();
            dispatcher.wake();
            return false;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("review check failed: {}", crate::error_chain(&e)),
    }
    open(store).await == 0
}

/// The write-back loop of `up`: follows outputs in review on every tick and webhook nudge, and
/// commits the status once per tick (so at most once per interval), and once more on the way
/// out.
async fn writeback_loop<S>(
    status: Option<StatusWriter<S>>,
    reviews: Reviews<S>,
    interval: Duration,
    review_nudge: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
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
                ReviewsChecked { report: &report }.emit();
                on_merge(&report);
            }
            Err(error) => ReviewCheckFailed { error: &error }.emit(),
        }
        if flush && let Some(status) = status.as_mut() {
            // A pushed commit is its own event, emitted where it is pushed.
            if let Err(error) = status.flush().await {
                StatusNotCommitted { error: &error }.emit();
            }
        }
    }
    if let Some(status) = status.as_mut()
        && let Err(error) = status.flush().await
    {
        StatusNotCommitted { error: &error }.emit();
    }
}
