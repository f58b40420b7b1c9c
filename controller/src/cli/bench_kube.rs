//! `agentops bench kube`: Task custom resources served by an in-process fake API server
//! ([`super::fake_kube`]), synced by the real Kubernetes source into a scratch store.
//!
//! Figures: the cold sync (from the first list to the store holding every task), then a burst
//! of three phase changes per task made in the store right after a status flush, and the
//! status patches the next two flushes send (each task's status changed, so one patch each at
//! most is the target), and the process's peak RSS.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Format;
use super::bench::{admin, peak_rss_mb, with_database};
use super::fake_kube::FakeKube;
use crate::runtime::kubernetes::{KubeLoop, KubeOptions};
use crate::store::{AnyStore, Store};
use crate::with_store;
use agentops_specs::Kind;

#[derive(Debug, Args)]
pub struct KubeBench {
    /// Task custom resources to serve.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    /// Tasks per project.
    #[arg(long, default_value_t = 100)]
    pub per_project: usize,
    /// The status interval.
    #[arg(long, default_value = "2s", value_parser = crate::config::parse_duration)]
    pub interval: Duration,
    /// `postgres://…` (a scratch database is created and dropped) or SQLite when omitted.
    #[arg(long)]
    pub database: Option<String>,
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
}

#[derive(Debug, serde::Serialize)]
struct Figures {
    database: &'static str,
    tasks: usize,
    projects: usize,
    /// From the start of the watch to the store holding every task.
    cold_sync_s: f64,
    /// Status patches of the first flushes, one per resource.
    initial_status_patches: usize,
    /// Phase changes made in the burst (three per task).
    phase_changes: usize,
    /// Status patches sent in the two status intervals after the burst.
    status_patches: usize,
    /// The most patches one task got in those two intervals.
    max_patches_per_task: usize,
    interval_s: f64,
    peak_rss_mb: f64,
}

const NAMESPACE: &str = "bench";

pub async fn run(bench: KubeBench) -> anyhow::Result<ExitCode> {
    ensure!(bench.tasks > 0, "--tasks must be at least 1");
    ensure!(bench.per_project > 0, "--per-project must be at least 1");
    let projects = bench.tasks.div_ceil(bench.per_project);
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let (url, scratch_pg) = match &bench.database {
        Some(url) if url.starts_with("postgres") => {
            let name = format!("agentops_bench_kube_{}", std::process::id());
            admin(url, &format!("CREATE DATABASE {name}")).await?;
            (with_database(url, &name), Some((url.clone(), name)))
        }
        _ => (
            format!("sqlite://{}", work.path().join("bench.db").display()),
            None,
        ),
    };
    let database = if scratch_pg.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let result = async {
        // The API server keeps a history of about one event per resource.
        let fake = FakeKube::start_with(false, bench.tasks).await?;
        for p in 0..projects {
            let project = format!("project-{p:04}");
            fake.apply(
                Kind::Project,
                NAMESPACE,
                &project,
                json!({"title": format!("Benchmark project {p}")}),
            );
            for t in 0..bench.per_project.min(bench.tasks - p * bench.per_project) {
                fake.apply(
                    Kind::Task,
                    NAMESPACE,
                    &format!("{project}-task-{t:03}"),
                    json!({"project": project, "title": format!("Task {t} of {project}"),
                        "action": {"prompt": format!("Do task {t}.")}}),
                );
            }
        }
        let config = kube::Config::new(fake.url().parse().context("the fake server's URL")?);
        let client = kube::Client::try_from(config).context("a client for the fake server")?;
        let store = AnyStore::connect(&url).await?;
        with_store!(store, store => {
            store.migrate().await?;
            let source = KubeLoop::new(client, store.clone());
            let mut flushes = source.flushes();
            let (synced_tx, mut synced) = tokio::sync::mpsc::unbounded_channel();
            let stop = CancellationToken::new();
            let started = Instant::now();
            let running = tokio::spawn(source.run(
                KubeOptions { namespace: Some(NAMESPACE.to_owned()), status_interval: bench.interval },
                stop.clone(),
                move |_, report| {
                    let _ = synced_tx.send(report.object_writes);
                },
            ));
            let mut written = 0;
            while written < bench.tasks + projects {
                written += synced.recv().await.context("the source stopped")?;
            }
            let cold_sync_s = started.elapsed().as_secs_f64();
            // The first flushes apply every resource's status.
            let everything = bench.tasks + projects;
            let deadline = Instant::now() + bench.interval * 10 + Duration::from_secs(30);
            while fake.status_patches() < everything {
                ensure!(Instant::now() < deadline, "the first statuses were not all applied");
                flushes.changed().await?;
            }
            // A flush with nothing new, then the burst right after one.
            flushes.changed().await?;
            let before = fake.requests().len();
            let initial_status_patches = fake.status_patches();
            for phase in ["in_progress", "review", "completed"] {
                set_phase(&store, phase).await?;
            }
            let phase_changes = 3 * bench.tasks;
            flushes.changed().await?;
            flushes.changed().await?;
            stop.cancel();
            running.await?;
            let mut per_task: HashMap<String, usize> = HashMap::new();
            let mut status_patches = 0;
            for request in &fake.requests()[before..] {
                if request.is_status_patch() && request.status == 200 {
                    status_patches += 1;
                    *per_task.entry(request.path.clone()).or_default() += 1;
                }
            }
            Ok::<_, anyhow::Error>(Figures {
                database,
                tasks: bench.tasks,
                projects,
                cold_sync_s,
                initial_status_patches,
                phase_changes,
                status_patches,
                max_patches_per_task: per_task.values().copied().max().unwrap_or(0),
                interval_s: bench.interval.as_secs_f64(),
                peak_rss_mb: peak_rss_mb(),
            })
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
            "{} task resources ({} projects) on {}:\n  cold sync       {:>8.3} s\n  burst           {:>8} phase changes\n  status patches  {:>8} (at most {} per task) in two {} s intervals\n  peak RSS        {:>8.1} MB",
            figures.tasks,
            figures.projects,
            figures.database,
            figures.cold_sync_s,
            figures.phase_changes,
            figures.status_patches,
            figures.max_patches_per_task,
            figures.interval_s,
            figures.peak_rss_mb,
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every task of the benchmark to `phase`, in one statement.
async fn set_phase<S: PhaseStore>(store: &S, phase: &str) -> anyhow::Result<()> {
    store.set_phase(phase).await
}

trait PhaseStore {
    async fn set_phase(&self, phase: &str) -> anyhow::Result<()>;
}

impl PhaseStore for crate::store::PgStore {
    async fn set_phase(&self, phase: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE tasks SET status = $1, assigned_to = 'bench', started_at = now() \
             WHERE source = 'kube:bench'",
        )
        .bind(phase)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

impl PhaseStore for crate::store::SqliteStore {
    async fn set_phase(&self, phase: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE tasks SET status = ?1, assigned_to = 'bench', \
             started_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE source = 'kube:bench'",
        )
        .bind(phase)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
