//! `agentops bench …`: generate a workload, run the real code paths on it, print figures.
//! Benchmarks live here rather than in timed tests, because these machines are noisy and a
//! figure is only meaningful next to the others of the same run.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Subcommand;

use super::Format;
use crate::config::GlobalConfig;
use crate::reconcile::sync::Syncer;
use crate::source::git::{GitSource, Location};
use crate::store::{AnyStore, Store};
use crate::with_store;

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Sync a generated repository of projects × 100 tasks: cold, after a commit that touches
    /// no spec, and after a commit that changes one task.
    Sync {
        #[arg(long, default_value_t = 100_000)]
        tasks: usize,
        /// `postgres://…` (a scratch database is created on that server and dropped after)
        /// or `sqlite://…` (a scratch file is used); SQLite when omitted.
        #[arg(long)]
        database: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Drain generated no-op tasks with in-process agents over the real HTTP protocol, then
    /// measure pick-up latency of tasks committed one at a time to idle agents.
    Dispatch(super::bench_dispatch::DispatchBench),
    /// Phase changes across many projects, written back to a Git remote as status commits.
    Writeback(super::bench_writeback::WritebackBench),
    /// Task custom resources on an in-process fake Kubernetes API server: the cold sync, then
    /// a burst of phase changes and the status patches it causes.
    Kube(super::bench_kube::KubeBench),
}

pub async fn run(_global: &GlobalConfig, bench: Bench) -> anyhow::Result<ExitCode> {
    match bench {
        Bench::Sync {
            tasks,
            database,
            format,
        } => sync(tasks, database.as_deref(), format).await,
        Bench::Dispatch(bench) => super::bench_dispatch::run(bench).await,
        Bench::Writeback(bench) => super::bench_writeback::run(bench).await,
        Bench::Kube(bench) => super::bench_kube::run(bench).await,
    }
}

const TASKS_PER_PROJECT: usize = 100;

#[derive(Debug, serde::Serialize)]
struct SyncFigures {
    database: &'static str,
    projects: usize,
    tasks: usize,
    cold_sync_s: f64,
    noop_sync_s: f64,
    one_file_sync_s: f64,
    peak_rss_mb: f64,
    cold_writes: usize,
    /// Cold sync split into reading+parsing, deciding and writing.
    cold_read_s: f64,
    cold_decide_s: f64,
    cold_apply_s: f64,
    one_file_decide_s: f64,
    one_file_apply_s: f64,
}

async fn sync(tasks: usize, database: Option<&str>, format: Format) -> anyhow::Result<ExitCode> {
    ensure!(tasks > 0, "--tasks must be at least 1");
    let projects = tasks.div_ceil(TASKS_PER_PROJECT);
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let repo = work.path().join("specs");
    let started = Instant::now();
    generate_repo(&repo, projects, tasks)?;
    eprintln!(
        "generated {projects} projects, {tasks} tasks in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (url, scratch_pg) = match database {
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

    let result = async {
        let store = AnyStore::connect(&url).await?;
        let source = GitSource::new(
            Location::resolve(repo.to_str().context("non-UTF-8 scratch path")?)?,
            "main",
            "",
            &work.path().join("data"),
            None,
        );
        with_store!(store, store => {
            store.migrate().await?;
            let mut syncer = Syncer::new(source, "bench", store);

            let (cold, cold_s) = timed(syncer.sync()).await?;
            ensure!(
                cold.object_writes == projects + tasks && cold.diagnostics.is_empty(),
                "cold sync wrote {} objects with {} errors; expected {}",
                cold.object_writes,
                cold.diagnostics.len(),
                projects + tasks
            );

            commit(&repo, "README.md", "A commit that changes no spec.\n")?;
            let (noop, noop_s) = timed(syncer.sync()).await?;
            ensure!(
                noop.files_parsed == 0 && noop.object_writes == 0 && noop.cursor_moved,
                "no-op sync parsed {} files and wrote {} objects",
                noop.files_parsed,
                noop.object_writes
            );

            let path = task_path(0, 0);
            commit(&repo, &path, &task_yaml(0, 0, "Changed title"))?;
            let (one, one_s) = timed(syncer.sync()).await?;
            ensure!(
                one.files_parsed == 1 && one.object_writes == 1,
                "one-file sync parsed {} files and wrote {} objects",
                one.files_parsed,
                one.object_writes
            );

            Ok::<_, anyhow::Error>(SyncFigures {
                database: backend,
                projects,
                tasks,
                cold_sync_s: cold_s,
                noop_sync_s: noop_s,
                one_file_sync_s: one_s,
                peak_rss_mb: peak_rss_mb(),
                cold_writes: cold.object_writes,
                cold_read_s: cold.read.as_secs_f64(),
                cold_decide_s: cold.decide.as_secs_f64(),
                cold_apply_s: cold.apply.as_secs_f64(),
                one_file_decide_s: one.decide.as_secs_f64(),
                one_file_apply_s: one.apply.as_secs_f64(),
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
    match format {
        Format::Json => println!("{}", serde_json::to_string(&figures)?),
        Format::Text => println!(
            "{} projects, {} tasks on {}:\n  cold sync      {:>8.3} s  (read {:.3}, decide {:.3}, apply {:.3})\n  no-op sync     {:>8.3} s\n  one-file sync  {:>8.3} s  (decide {:.3}, apply {:.3})\n  peak RSS       {:>8.1} MB",
            figures.projects,
            figures.tasks,
            figures.database,
            figures.cold_sync_s,
            figures.cold_read_s,
            figures.cold_decide_s,
            figures.cold_apply_s,
            figures.noop_sync_s,
            figures.one_file_sync_s,
            figures.one_file_decide_s,
            figures.one_file_apply_s,
            figures.peak_rss_mb
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn timed<F, T, E>(f: F) -> anyhow::Result<(T, f64)>
where
    F: std::future::Future<Output = Result<T, E>>,
    anyhow::Error: From<E>,
{
    let started = Instant::now();
    let value = f.await?;
    Ok((value, started.elapsed().as_secs_f64()))
}

/// Peak resident memory of this process so far.
pub(super) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(super) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

pub(super) async fn admin(url: &str, statement: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {}", crate::redact(url)))?;
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut conn)
        .await
        .with_context(|| statement.to_owned())?;
    Ok(())
}

pub(super) fn project_name(p: usize) -> String {
    format!("project-{p:04}")
}

fn task_path(p: usize, t: usize) -> String {
    format!("projects/{}/tasks/task-{t:03}.yaml", project_name(p))
}

fn project_yaml(p: usize) -> String {
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: {name}\n  labels: {{area: bench}}\nspec:\n  title: Benchmark project {p}\n  description: Generated by agentops bench sync.\n  priority: medium\n  owner: cos\n",
        name = project_name(p)
    )
}

fn task_yaml(p: usize, t: usize, title: &str) -> String {
    // Chains of ten: realistic dependency depth without one 100-long chain per project.
    let depends = if t.is_multiple_of(10) {
        String::new()
    } else {
        format!("  dependsOn: [task-{:03}]\n", t - 1)
    };
    let project = project_name(p);
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: task-{t:03}\n  labels: {{area: bench}}\nspec:\n  title: {title}\n  description: |\n    Generated by agentops bench. Summarise the findings of the previous task\n    and write them to section {t} of the report.\n  assignee: seed\n  capabilities: [writing]\n  priority: {prio}\n{depends}  action:\n    prompt: Write section {t} of the report into reports/{project}/{t}.md\n  output: {{mode: pull-request, paths: [reports/{project}/]}}\n  timeout: 30m\n  retries: 2\n  acceptanceCriteria: [\"reports/{project}/{t}.md exists\", \"under 300 words\"]\n",
        prio = 30 + (t % 60),
    )
}

fn git(repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(repo);
    cmd
}

/// One commit of many files, written by `git fast-import` so the repository is packed the way
/// a real one is.
pub(super) fn fast_import(
    repo: &Path,
    message: &str,
    files: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    let mut child = git(repo)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running git fast-import (is git installed?)")?;
    {
        let stdin = child.stdin.as_mut().context("fast-import stdin")?;
        let mut out = std::io::BufWriter::new(stdin);
        let has_parent = git(repo)
            .args(["rev-parse", "--verify", "--quiet", "refs/heads/main"])
            .stdout(Stdio::null())
            .status()?
            .success();
        write!(
            out,
            "commit refs/heads/main\ncommitter bench <bench@localhost> 1700000000 +0000\ndata {}\n{message}\n",
            message.len() + 1
        )?;
        if has_parent {
            writeln!(out, "from refs/heads/main^0")?;
        }
        for (path, content) in files {
            write!(
                out,
                "M 100644 inline {path}\ndata {}\n{content}\n",
                content.len()
            )?;
        }
        out.flush()?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("git fast-import failed: {status}");
    }
    Ok(())
}

fn generate_repo(repo: &Path, projects: usize, tasks: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(repo)?;
    let status = git(repo)
        .args(["init", "--quiet", "--initial-branch=main"])
        .status()
        .context("running git init (is git installed?)")?;
    ensure!(status.success(), "git init failed");
    let files = (0..projects).flat_map(move |p| {
        let in_project = TASKS_PER_PROJECT.min(tasks - p * TASKS_PER_PROJECT);
        std::iter::once((
            format!("projects/{}/project.yaml", project_name(p)),
            project_yaml(p),
        ))
        .chain((0..in_project).map(move |t| {
            (
                task_path(p, t),
                task_yaml(p, t, &format!("Task {t} of project {p}")),
            )
        }))
    });
    fast_import(repo, "Generated specs", files)
}

fn commit(repo: &Path, path: &str, content: &str) -> anyhow::Result<()> {
    fast_import(
        repo,
        &format!("Change {path}"),
        std::iter::once((path.to_owned(), content.to_owned())),
    )
}
