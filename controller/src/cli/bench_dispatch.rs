//! `agentops bench dispatch`: the dispatch path end to end, in one process but over real
//! HTTP — the queue in the store, the dispatcher, the axum API and the agent runtime — with
//! no-op agents, so the figures are the platform's own overhead.
//!
//! Two phases. Throughput: N ready tasks, K agents drain them. Pick-up: with the agents idle
//! and long-polling, tasks are committed to Git one at a time; pick-up is the time from the
//! sync that made a task ready (its transaction committed) to the agent's handler starting.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentops_agents::runtime::{Agent, AgentConfig, AgentType, Assignment, Outcome, TaskContext};
use anyhow::{Context, ensure};
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::Format;
use super::bench::{admin, fast_import, peak_rss_mb, project_name, with_database};
use crate::api::ApiState;
use crate::bus::{BusNames, NatsBus};
use crate::dispatch::metrics::{self, BatchTotals};
use crate::dispatch::{DispatchConfig, Dispatcher};
use crate::reconcile::sync::Syncer;
use crate::source::git::{GitSource, Location};
use crate::store::queue::Queue;
use crate::store::{AnyStore, PgStore, SqliteStore, Store};
use crate::with_store;

#[derive(Debug, Args)]
pub struct DispatchBench {
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Tasks each agent runs at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Run the agents in this many `agentops agent seed` processes instead of this one
    /// (their handler is the Seed's offline `prompt`, which a no-op task completes at once).
    #[arg(long, default_value_t = 0)]
    agents_remote: usize,
    /// Tasks committed one at a time for the pick-up phase.
    #[arg(long, default_value_t = 200)]
    pickups: usize,
    /// `postgres://…` (a scratch database is created there and dropped after) or SQLite.
    #[arg(long)]
    database: Option<String>,
    /// NATS (JetStream) for events and ready-work announcements; agents then listen there too.
    #[arg(long)]
    nats: Option<String>,
    /// Redis for presence.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Debug, serde::Serialize)]
struct DispatchFigures {
    database: &'static str,
    bus: String,
    presence: String,
    tasks: usize,
    agents: usize,
    concurrency: usize,
    /// Processes the agents ran in besides the benchmark's own (0: all in the benchmark).
    agent_processes: usize,
    /// What a pick-up is timed until: the handler starting (agents in this process) or the
    /// completion reaching the dispatcher (agents in other processes).
    pickup_until: &'static str,
    /// The drain's tasks over the time from their first claim to their last completion, by
    /// the store's clock: dispatch throughput, as the issue defines it.
    tasks_per_sec: f64,
    claim_to_complete_s: f64,
    /// The same tasks over the wall time from starting the agents (their HTTP clients and
    /// registration included) to the last completion.
    wall_tasks_per_sec: f64,
    drain_s: f64,
    pickups: usize,
    pickup_p50_ms: f64,
    pickup_p99_ms: f64,
    pickup_max_ms: f64,
    lost: i64,
    duplicates: i64,
    peak_rss_mb: f64,
    /// Where the drain's time went: the claim and completion batches the dispatcher wrote.
    claim_batches: BatchTotals,
    complete_batches: BatchTotals,
}

const TASKS_PER_PROJECT: usize = 100;

fn noop_task(name: &str) -> String {
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: No-op {name}\n  assignee: seed\n  action:\n    prompt: nothing to do\n  output: {{mode: none}}\n"
    )
}

fn project_yaml(name: &str) -> String {
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: {name}\nspec:\n  title: Dispatch benchmark\n"
    )
}

fn generate(repo: &Path, tasks: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(repo)?;
    let status = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["init", "--quiet", "--initial-branch=main"])
        .status()
        .context("running git init (is git installed?)")?;
    ensure!(status.success(), "git init failed");
    let projects = tasks.div_ceil(TASKS_PER_PROJECT) + 1;
    let files = (0..projects)
        .map(|p| {
            let project = project_name(p);
            (
                format!("projects/{project}/project.yaml"),
                project_yaml(&project),
            )
        })
        .chain((0..tasks).map(|t| {
            let project = project_name(t / TASKS_PER_PROJECT);
            (
                format!("projects/{project}/tasks/t{t:06}.yaml"),
                noop_task(&format!("t{t:06}")),
            )
        }));
    fast_import(repo, "Generated no-op tasks", files)
}

pub async fn run(bench: DispatchBench) -> anyhow::Result<ExitCode> {
    ensure!(
        bench.tasks > 0 && bench.agents > 0,
        "--tasks and --agents must be positive"
    );
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let repo = work.path().join("specs");
    generate(&repo, bench.tasks)?;

    let (url, scratch_pg) = match bench.database.as_deref() {
        Some(url) if url.starts_with("postgres") => {
            let name = format!("agentops_bench_{}", std::process::id());
            admin(url, &format!("CREATE DATABASE {name}")).await?;
            (with_database(url, &name), Some((url.to_owned(), name)))
        }
        _ => (
            format!("sqlite://{}", work.path().join("bench.db").display()),
            None,
        ),
    };
    let backend = if scratch_pg.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let source = GitSource::new(
        Location::resolve(repo.to_str().context("non-UTF-8 scratch path")?)?,
        "main",
        "",
        &work.path().join("data"),
        None,
    );

    let result = async {
        let store = AnyStore::connect(&url).await?;
        with_store!(store, store => {
            store.migrate().await?;
            measure(&bench, backend, &repo, source, store).await
        })
    }
    .await;

    if let Some((admin_url, name)) = scratch_pg {
        admin(
            &admin_url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await?;
    }
    let figures = result?;
    match bench.format {
        Format::Json => println!("{}", serde_json::to_string(&figures)?),
        Format::Text => println!(
            "{} no-op tasks, {} agents × {} on {} ({}, {}):\n  throughput  {:>9.0} tasks/s ({:.2} s from first claim to last completion; {:.0} tasks/s over {:.2} s from starting the agents)\n  pick-up     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} tasks)\n  lost {}, duplicates {}, peak RSS {:.0} MB",
            figures.tasks,
            figures.agents,
            figures.concurrency,
            figures.database,
            figures.bus,
            figures.presence,
            figures.tasks_per_sec,
            figures.claim_to_complete_s,
            figures.wall_tasks_per_sec,
            figures.drain_s,
            figures.pickup_p50_ms,
            figures.pickup_p99_ms,
            figures.pickup_max_ms,
            figures.pickups,
            figures.lost,
            figures.duplicates,
            figures.peak_rss_mb
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// When each task's handler started, by task name.
type Started = Arc<Mutex<HashMap<String, Instant>>>;

async fn measure<S>(
    bench: &DispatchBench,
    backend: &'static str,
    repo: &Path,
    source: GitSource,
    store: S,
) -> anyhow::Result<DispatchFigures>
where
    S: Store
        + Queue
        + crate::store::queue::Outbox
        + crate::store::queue::Liveness
        + crate::store::usage::UsageLog
        + Clone
        + Counts,
{
    let mut syncer = Syncer::new(source, "bench", store.clone());
    let cold = syncer.sync().await?;
    ensure!(cold.diagnostics.is_empty(), "generated specs have errors");

    // With NATS, streams of the run's own, deleted at the end: the bench neither fills an
    // installation's events stream (40,000 events a run) nor slows down in one that sits at
    // its size limit (each publish then also discards the oldest message).
    let bus_names = BusNames::new(&format!("agentops_bench_{}", std::process::id()))?;
    let backends = super::reconcile::backends(&crate::config::DispatchArgs {
        listen: ([127, 0, 0, 1], 0).into(),
        lease: DispatchConfig::default().policy.lease,
        heartbeat: DispatchConfig::default().heartbeat,
        nats: bench.nats.clone(),
        bus_prefix: bus_names.clone(),
        redis: bench.redis.clone(),
        agent_secret: None,
        agent_secrets: None,
        agent_service_accounts: Vec::new(),
        max_agents: 0,
        agent_rate_limit: 0,
    })
    .await?;
    let bus = backends.bus.describe();
    let presence = backends.presence.describe();
    let dispatcher = Dispatcher::with_backends(store.clone(), DispatchConfig::default(), backends);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    let server = crate::api::serve(
        listener,
        crate::api::router(ApiState::new(dispatcher.clone())),
        std::future::pending(),
    );
    let server = tokio::spawn(server);
    let loops = dispatcher.start();
    let background = dispatcher.spawn_background();

    if let Some(url) = &bench.nats {
        // Before the agents start, so that they find the run's streams to follow instead of
        // falling back to long-polling alone until the first publish creates them.
        NatsBus::connect(url, bus_names.clone())
            .await?
            .ensure_streams()
            .await
            .context("creating the benchmark's NATS streams")?;
    }
    let started: Started = Arc::default();
    let shutdown = CancellationToken::new();
    let began = Instant::now();
    let mut agents = Vec::new();
    let mut processes = Vec::new();
    if bench.agents_remote > 0 {
        let exe = std::env::current_exe().context("locating this executable")?;
        let per = bench.agents.div_ceil(bench.agents_remote);
        let mut left = bench.agents;
        for p in 0..bench.agents_remote {
            let replicas = per.min(left);
            left -= replicas;
            if replicas == 0 {
                break;
            }
            let mut command = tokio::process::Command::new(&exe);
            command
                .args(["agent", "seed", "--api", &api])
                .args(["--name", &format!("bench-p{p}")])
                .args(["--replicas", &replicas.to_string()])
                .args(["--concurrency", &bench.concurrency.to_string()])
                .env_remove("OPENROUTER_API_KEY")
                .env("AGENTOPS_LOG", "warn")
                .env("RUST_LOG", "warn")
                .kill_on_drop(true);
            if let Some(url) = &bench.nats {
                command
                    .args(["--nats", url])
                    .args(["--bus-prefix", bus_names.prefix()]);
            }
            processes.push(command.spawn().context("starting an agent process")?);
        }
    } else {
        for n in 0..bench.agents {
            let mut config = AgentConfig::new(api.clone(), format!("bench-{n:03}"));
            config.agent_type = AgentType::Seed;
            config.concurrency = bench.concurrency;
            config.nats = bench.nats.clone();
            config.bus = bus_names.clone();
            let started = started.clone();
            let handler = move |task: Assignment, _ctx: TaskContext| {
                let started = started.clone();
                async move {
                    started
                        .lock()
                        .expect("started lock")
                        .entry(task.name)
                        .or_insert_with(Instant::now);
                    Outcome::complete(serde_json::json!({}))
                }
            };
            let agent = Agent::new(config, handler);
            agents.push(tokio::spawn(agent.run(shutdown.clone())));
        }
    }

    let total = bench.tasks as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while dispatcher.metrics.completions_total() < total {
        ensure!(
            Instant::now() < deadline,
            "the drain did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = began.elapsed();
    let claim_batches = dispatcher.metrics.store_batch_totals(metrics::CLAIM);
    let complete_batches = dispatcher.metrics.store_batch_totals(metrics::COMPLETE);

    // Pick-up: one task per commit, agents idle and long-polling.
    let mut pickups = Vec::with_capacity(bench.pickups);
    for n in 0..bench.pickups {
        let name = format!("p{n:06}");
        let project = project_name(bench.tasks.div_ceil(TASKS_PER_PROJECT));
        fast_import(
            repo,
            &format!("Add {name}"),
            std::iter::once((
                format!("projects/{project}/tasks/{name}.yaml"),
                noop_task(&name),
            )),
        )?;
        let completed_before = dispatcher.metrics.completions_total();
        syncer.sync().await?;
        let ready = Instant::now();
        dispatcher.wake();
        let deadline = ready + Duration::from_secs(10);
        loop {
            if let Some(at) = started.lock().expect("started lock").get(&name) {
                pickups.push(at.saturating_duration_since(ready));
                break;
            }
            if !processes.is_empty() && dispatcher.metrics.completions_total() > completed_before {
                pickups.push(ready.elapsed());
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "task {name} was not picked up in 10 s"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let expected = total + bench.pickups as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while dispatcher.metrics.completions_total() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    shutdown.cancel();
    for agent in agents {
        let _ = agent.await;
    }
    for mut process in processes {
        let _ = process.kill().await;
    }
    server.abort();
    // Before the scratch database is dropped, or they log its absence.
    drop(loops);
    drop(background);
    if let Some(url) = &bench.nats {
        NatsBus::connect(url, bus_names)
            .await?
            .delete_streams()
            .await
            .context("deleting the benchmark's NATS streams")?;
    }

    let (completed, duplicates) = store.completion_counts().await?;
    let window = store.drain_window().await?;
    pickups.sort();
    let percentile = |p: f64| -> f64 {
        if pickups.is_empty() {
            return 0.0;
        }
        let i = ((pickups.len() as f64 - 1.0) * p).round() as usize;
        pickups[i].as_secs_f64() * 1_000.0
    };
    Ok(DispatchFigures {
        database: backend,
        bus,
        presence,
        tasks: bench.tasks,
        agents: bench.agents,
        concurrency: bench.concurrency,
        agent_processes: bench.agents_remote,
        pickup_until: if bench.agents_remote > 0 {
            "completion"
        } else {
            "handler_start"
        },
        tasks_per_sec: bench.tasks as f64 / window,
        claim_to_complete_s: window,
        wall_tasks_per_sec: bench.tasks as f64 / drain.as_secs_f64(),
        drain_s: drain.as_secs_f64(),
        pickups: pickups.len(),
        pickup_p50_ms: percentile(0.5),
        pickup_p99_ms: percentile(0.99),
        pickup_max_ms: percentile(1.0),
        lost: expected as i64 - completed,
        duplicates,
        peak_rss_mb: peak_rss_mb(),
        claim_batches,
        complete_batches,
    })
}

/// Counted from the store itself, not from the benchmark's own bookkeeping: tasks with a
/// completion, and completions beyond the first of any task.
pub trait Counts {
    fn completion_counts(
        &self,
    ) -> impl std::future::Future<Output = anyhow::Result<(i64, i64)>> + Send;

    /// Seconds from the first claim of a drain task (`t…`; pick-up tasks are `p…`) to the
    /// last completion of one.
    fn drain_window(&self) -> impl std::future::Future<Output = anyhow::Result<f64>> + Send;
}

const DRAIN_WINDOW_PG: &str = "\
    SELECT CAST(EXTRACT(EPOCH FROM max(completed_at) - min(claimed_at)) AS float8) \
    FROM tasks WHERE name LIKE 't%'";

const DRAIN_WINDOW_SQLITE: &str = "\
    SELECT (julianday(max(completed_at)) - julianday(min(claimed_at))) * 86400.0 \
    FROM tasks WHERE name LIKE 't%'";

const COUNTS: &str = "\
    SELECT \
      (SELECT count(*) FROM tasks WHERE status = 'completed') AS completed, \
      (SELECT COALESCE(sum(n - 1), 0) FROM ( \
         SELECT count(*) AS n FROM events WHERE event_type = 'task.completed' \
         GROUP BY payload ->> 'id' HAVING count(*) > 1) AS d) AS duplicates";

impl Counts for PgStore {
    async fn completion_counts(&self) -> anyhow::Result<(i64, i64)> {
        let (completed, duplicates): (i64, i64) =
            sqlx::query_as(COUNTS_PG).fetch_one(self.pool()).await?;
        Ok((completed, duplicates))
    }

    async fn drain_window(&self) -> anyhow::Result<f64> {
        let window: Option<f64> = sqlx::query_scalar(DRAIN_WINDOW_PG)
            .fetch_one(self.pool())
            .await?;
        window.context("no drain task was claimed and completed")
    }
}

/// Postgres sums bigints into numeric; cast back.
const COUNTS_PG: &str = "\
    SELECT \
      (SELECT count(*) FROM tasks WHERE status = 'completed') AS completed, \
      CAST((SELECT COALESCE(sum(n - 1), 0) FROM ( \
         SELECT count(*) AS n FROM events WHERE event_type = 'task.completed' \
         GROUP BY payload ->> 'id' HAVING count(*) > 1) AS d) AS bigint) AS duplicates";

impl Counts for SqliteStore {
    async fn completion_counts(&self) -> anyhow::Result<(i64, i64)> {
        let (completed, duplicates): (i64, i64) =
            sqlx::query_as(COUNTS).fetch_one(self.pool()).await?;
        Ok((completed, duplicates))
    }

    async fn drain_window(&self) -> anyhow::Result<f64> {
        let window: Option<f64> = sqlx::query_scalar(DRAIN_WINDOW_SQLITE)
            .fetch_one(self.pool())
            .await?;
        window.context("no drain task was claimed and completed")
    }
}
