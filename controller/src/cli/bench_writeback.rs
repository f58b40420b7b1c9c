//! `agentops bench writeback`: phase changes spread over many projects, written back to Git by
//! the real status writer against a real (local, bare) remote.
//!
//! A generated spec repository (projects × tasks) is synced into a scratch store and its
//! status committed once. Then `--changes` phase changes are made in the store, in batches
//! of one statement each, while the status writer runs on its interval (as `up` runs it);
//! after the last change one more flush runs (as shutdown and `reconcile --once` do). The
//! figures are the commits that reached the remote and the time the flushes took.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use git2::{FileMode, Repository, Signature};

use super::Format;
use super::bench::{admin, with_database};
use crate::reconcile::sync::Syncer;
use crate::source::git::{GitSource, Location};
use crate::store::{AnyStore, Store};
use crate::with_store;
use crate::writeback::{Author, Retry, StatusWriter};

#[derive(Debug, Args)]
pub struct WritebackBench {
    /// Phase changes to make.
    #[arg(long, default_value_t = 10_000)]
    pub changes: usize,
    /// Projects the changes are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub projects: usize,
    /// The status writer's interval while the changes are made.
    #[arg(long, default_value = "15s", value_parser = crate::config::parse_duration)]
    pub interval: Duration,
    /// Changes per store statement.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// `postgres://…` (a scratch database is created and dropped) or SQLite when omitted.
    #[arg(long)]
    pub database: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, serde::Serialize)]
struct Figures {
    database: &'static str,
    projects: usize,
    tasks: usize,
    changes: usize,
    /// Status commits that reached the remote while the changes were made and flushed.
    commits: usize,
    /// Time spent flushing (reading the store, rendering, committing and pushing).
    seconds: f64,
    /// The last flush: its parts, and how many status files it rendered again.
    last_snapshot_s: f64,
    last_render_s: f64,
    last_git_s: f64,
    last_files: usize,
    /// The first flush, which renders every project.
    initial_flush_s: f64,
    /// Time the store took to make the changes (not write-back).
    changes_s: f64,
}

pub async fn run(bench: WritebackBench) -> anyhow::Result<ExitCode> {
    ensure!(bench.projects > 0, "--projects must be at least 1");
    ensure!(bench.changes > 0, "--changes must be at least 1");
    let tasks_per_project = bench.changes.div_ceil(bench.projects);
    let tasks = tasks_per_project * bench.projects;
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let remote = work.path().join("remote.git");
    generate(&remote, bench.projects, tasks_per_project)?;

    let (url, scratch_pg) = match &bench.database {
        Some(url) if url.starts_with("postgres") => {
            let name = format!("agentops_bench_wb_{}", std::process::id());
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
        let store = AnyStore::connect(&url).await?;
        let location = Location::Remote(format!("file://{}", remote.display()));
        let source = GitSource::new(location, "main", "", &work.path().join("data"), None);
        with_store!(store, store => {
            store.migrate().await?;
            let mut syncer = Syncer::new(source.clone(), "bench", store.clone());
            let report = syncer.sync().await?;
            ensure!(
                report.object_writes == bench.projects + tasks,
                "the sync wrote {} objects; expected {}",
                report.object_writes,
                bench.projects + tasks
            );
            let mut writer = StatusWriter::new(
                store.clone(),
                "bench",
                source.clone(),
                Author::default(),
                Retry::default(),
            );
            let started = Instant::now();
            writer.flush().await?.context("the first flush made no commit")?;
            let initial_flush_s = started.elapsed().as_secs_f64();
            let before = commit_count(&remote)?;

            let ids = task_ids(&store, bench.changes).await?;
            let mut flush_time = Duration::ZERO;
            // As `up` ticks: a tick missed during a long flush is not made up for.
            let mut tick = tokio::time::interval(bench.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let changing = Instant::now();
            let mut changes_time = Duration::ZERO;
            for chunk in ids.chunks(bench.batch.max(1)) {
                let t = Instant::now();
                set_phase(&store, chunk).await?;
                changes_time += t.elapsed();
                if tokio::time::timeout(Duration::ZERO, tick.tick()).await.is_ok() {
                    let t = Instant::now();
                    writer.flush().await?;
                    flush_time += t.elapsed();
                }
            }
            let t = Instant::now();
            writer.flush().await?;
            flush_time += t.elapsed();
            tracing::debug!(total = ?changing.elapsed(), "changes and flushes");
            let commits = commit_count(&remote)? - before;
            Ok::<_, anyhow::Error>(Figures {
                database,
                projects: bench.projects,
                tasks,
                changes: ids.len(),
                commits,
                seconds: flush_time.as_secs_f64(),
                last_snapshot_s: writer.last.snapshot.as_secs_f64(),
                last_render_s: writer.last.render.as_secs_f64(),
                last_git_s: writer.last.git.as_secs_f64(),
                last_files: writer.last.files,
                initial_flush_s,
                changes_s: changes_time.as_secs_f64(),
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
            "{} phase changes over {} projects ({} tasks) on {}:\n  commits        {:>8}\n  flush time     {:>8.3} s  (last: store {:.3}, render {:.3}, git {:.3}; {} files)\n  first flush    {:>8.3} s\n  store changes  {:>8.3} s",
            figures.changes,
            figures.projects,
            figures.tasks,
            figures.database,
            figures.commits,
            figures.seconds,
            figures.last_snapshot_s,
            figures.last_render_s,
            figures.last_git_s,
            figures.last_files,
            figures.initial_flush_s,
            figures.changes_s,
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// One task of each project in turn, so that the changes reach every project.
async fn task_ids<S: BenchStore>(store: &S, changes: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = store.ids().await?;
    ids.truncate(changes);
    Ok(ids)
}

async fn set_phase<S: BenchStore>(store: &S, ids: &[String]) -> anyhow::Result<()> {
    store.start(ids).await
}

/// The two statements the benchmark needs, on either backend.
trait BenchStore {
    async fn ids(&self) -> anyhow::Result<Vec<String>>;
    async fn start(&self, ids: &[String]) -> anyhow::Result<()>;
}

const IDS: &str = "SELECT CAST(t.id AS text) FROM tasks t JOIN projects p ON p.id = t.project_id \
    ORDER BY t.name, p.name";

impl BenchStore for crate::store::PgStore {
    async fn ids(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(IDS).fetch_all(self.pool()).await?)
    }
    async fn start(&self, ids: &[String]) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE tasks SET status = 'in_progress', assigned_to = 'bench', started_at = now() \
             WHERE CAST(id AS text) = ANY($1)",
        )
        .bind(ids)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

impl BenchStore for crate::store::SqliteStore {
    async fn ids(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(IDS).fetch_all(self.pool()).await?)
    }
    async fn start(&self, ids: &[String]) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE tasks SET status = 'in_progress', assigned_to = 'bench', \
             started_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids)?)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

fn commit_count(remote: &Path) -> anyhow::Result<usize> {
    let repo = Repository::open_bare(remote)?;
    let mut walk = repo.revwalk()?;
    walk.push_ref("refs/heads/main")?;
    Ok(walk.count())
}

/// A bare repository with `projects` projects of `tasks` tasks each, in one commit.
fn generate(path: &Path, projects: usize, tasks: usize) -> anyhow::Result<()> {
    let repo = Repository::init_opts(
        path,
        git2::RepositoryInitOptions::new()
            .bare(true)
            .initial_head("main"),
    )?;
    let mut projects_dir = repo.treebuilder(None)?;
    for p in 0..projects {
        let name = format!("project-{p:04}");
        let mut task_dir = repo.treebuilder(None)?;
        for t in 0..tasks {
            let yaml = format!(
                "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: task-{t:03}\nspec:\n  title: Task {t} of {name}\n  assignee: seed\n  action:\n    prompt: Do task {t}.\n"
            );
            let blob = repo.blob(yaml.as_bytes())?;
            task_dir.insert(format!("task-{t:03}.yaml"), blob, FileMode::Blob.into())?;
        }
        let project_yaml = format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: {name}\nspec:\n  title: Benchmark project {p}\n"
        );
        let mut dir = repo.treebuilder(None)?;
        dir.insert(
            "project.yaml",
            repo.blob(project_yaml.as_bytes())?,
            FileMode::Blob.into(),
        )?;
        dir.insert("tasks", task_dir.write()?, FileMode::Tree.into())?;
        projects_dir.insert(&name, dir.write()?, FileMode::Tree.into())?;
    }
    let mut root = repo.treebuilder(None)?;
    root.insert("projects", projects_dir.write()?, FileMode::Tree.into())?;
    let tree = repo.find_tree(root.write()?)?;
    let signature = Signature::now("bench", "bench@localhost")?;
    repo.commit(
        Some("refs/heads/main"),
        &signature,
        &signature,
        "specs",
        &tree,
        &[],
    )?;
    Ok(())
}
