//! Shared helpers for the integration tests, by concern: scratch databases and SQL assertions
//! that read the same way on either backend ([`db`]), real Git repositories in temporary
//! directories ([`git`]), spec fixtures ([`specs`]), and the real controller and agent
//! binaries as child processes that die with the test ([`procs`]). Here: the macros that run a
//! scenario on both backends, and a syncer wired to a repository and a database.

pub mod db;
pub mod fake_kube;
pub mod git;
pub mod procs;
pub mod specs;

pub use db::*;
pub use git::*;
pub use procs::*;
pub use specs::*;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

use agentops::reconcile::sync::{SyncReport, Syncer};
use agentops::source::git::{GitSource, Location};
use tempfile::TempDir;

pub const SOURCE: &str = "default";

/// Generate `mod $name { postgres, sqlite }` running the generic scenario `$name::<S>()` on
/// each backend. A module and a function may share a name: they live in different namespaces.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn postgres() {
                super::$name::<agentops::store::PgStore>().await;
            }
            #[tokio::test]
            async fn sqlite() {
                super::$name::<agentops::store::SqliteStore>().await;
            }
        }
    )+};
}

/// `both_backends!` on the multi-threaded runtime, for scenarios about concurrency.
#[macro_export]
macro_rules! both_backends_multi_thread {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name::<agentops::store::PgStore>().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name::<agentops::store::SqliteStore>().await;
            }
        }
    )+};
}

pub fn git_source(location: &Path, data_dir: &Path) -> GitSource {
    let location = Location::resolve(location.to_str().unwrap()).expect("resolve the location");
    GitSource::new(location, BRANCH, "", data_dir, None)
}

/// Fields drop in order: the syncer (and its pool) before the database it points at.
pub struct Env<S: TestStore> {
    pub syncer: Syncer<S>,
    pub db: TestDb,
    pub repo: GitRepo,
    /// Set when the source is a plain folder rather than `repo`.
    pub folder: Option<TempDir>,
    pub data: TempDir,
    /// Revisions made by `commit`, for `label`.
    revisions: Vec<String>,
    events_seen: BTreeMap<String, i64>,
}

impl<S: TestStore> Env<S> {
    /// A syncer on a new, empty Git repository.
    pub async fn new() -> Env<S> {
        Self::build(None).await
    }

    /// A syncer on a folder that is not a Git repository.
    pub async fn folder() -> Env<S> {
        Self::build(Some(tempfile::tempdir().expect("temp dir"))).await
    }

    async fn build(folder: Option<TempDir>) -> Env<S> {
        let repo = GitRepo::new();
        let db = TestDb::new(S::BACKEND).await;
        let data = tempfile::tempdir().expect("temp dir");
        let store = S::open(&db.url).await;
        let location = folder.as_ref().map_or(repo.path(), |f| f.path());
        let source = git_source(location, data.path());
        Env {
            syncer: Syncer::new(source, SOURCE, store),
            db,
            repo,
            folder,
            data,
            revisions: Vec::new(),
            events_seen: BTreeMap::new(),
        }
    }

    pub async fn sync(&mut self) -> SyncReport {
        self.syncer.sync().await.expect("sync")
    }

    /// A syncer as a new controller process would have it: its own store connection, nothing
    /// in memory, the same database, repository and data directory.
    pub async fn fresh_syncer(&self) -> Syncer<S> {
        let store = S::open(&self.db.url).await;
        Syncer::new(self.syncer.source().clone(), SOURCE, store)
    }

    /// Commit to the repository; the revision is remembered as `c1`, `c2`, … for `label`.
    pub fn commit(&mut self, message: &str, changes: &[(&str, Option<&str>)]) -> String {
        let revision = self.repo.commit(message, changes);
        self.revisions.push(revision.clone());
        revision
    }

    pub fn rename(&mut self, from: &str, to: &str) -> String {
        let revision = self.repo.rename(from, to);
        self.revisions.push(revision.clone());
        revision
    }

    /// `c<N>` for the N-th commit made through this env, the revision itself otherwise.
    pub fn label(&self, revision: Option<&str>) -> String {
        let Some(revision) = revision else {
            return "@-".to_owned();
        };
        match self.revisions.iter().position(|r| r == revision) {
            Some(i) => format!("@c{}", i + 1),
            None => format!("@{revision}"),
        }
    }

    /// Every Git-managed task as one line:
    /// `project/name status gN path @cN "title"[ pruned][ ! message]`.
    pub async fn task_lines(&self) -> Vec<String> {
        self.db
            .tasks()
            .await
            .iter()
            .map(|t| {
                let mut line = format!(
                    "{}/{} {} g{} {} {} {:?}",
                    t.project,
                    t.name,
                    t.status,
                    t.generation,
                    t.path.as_deref().unwrap_or("-"),
                    self.label(t.revision.as_deref()),
                    t.title
                );
                flags(
                    &mut line,
                    t.pruned_at.as_deref(),
                    t.status_message.as_deref(),
                );
                line
            })
            .collect()
    }

    /// Every Git-managed project as `name status gN path @cN "title"[ pruned][ ! message]`.
    pub async fn project_lines(&self) -> Vec<String> {
        self.db
            .projects()
            .await
            .iter()
            .map(|p| {
                let mut line = format!(
                    "{} {} g{} {} {} {:?}",
                    p.name,
                    p.status,
                    p.generation,
                    p.path.as_deref().unwrap_or("-"),
                    self.label(p.revision.as_deref()),
                    p.title.as_deref().unwrap_or("")
                );
                flags(
                    &mut line,
                    p.pruned_at.as_deref(),
                    p.status_message.as_deref(),
                );
                line
            })
            .collect()
    }

    /// Every Git-managed agent as `name type status gN path @cN[ pruned][ ! message]`.
    pub async fn agent_lines(&self) -> Vec<String> {
        self.db
            .agents()
            .await
            .iter()
            .map(|a| {
                let mut line = format!(
                    "{} {} {} g{} {} {}",
                    a.name,
                    a.agent_type,
                    a.status,
                    a.generation,
                    a.path.as_deref().unwrap_or("-"),
                    self.label(a.revision.as_deref()),
                );
                flags(
                    &mut line,
                    a.pruned_at.as_deref(),
                    a.status_message.as_deref(),
                );
                line
            })
            .collect()
    }

    /// Events written since the last call, counted by type.
    pub async fn new_events(&mut self) -> BTreeMap<String, i64> {
        let now = self.db.event_counts().await;
        let mut delta = BTreeMap::new();
        for (t, n) in &now {
            let before = self.events_seen.get(t).copied().unwrap_or(0);
            if *n != before {
                delta.insert(t.clone(), n - before);
            }
        }
        self.events_seen = now;
        delta
    }
}

fn flags(line: &mut String, pruned_at: Option<&str>, message: Option<&str>) {
    if pruned_at.is_some() {
        line.push_str(" pruned");
    }
    if let Some(message) = message {
        line.push_str(" ! ");
        line.push_str(message);
    }
}

/// `{"type": count, …}` from pairs, to compare with `Env::new_events`.
pub fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
}

/// Assert a report of a step that wrote nothing at all.
pub fn assert_noop(report: &SyncReport) {
    assert_eq!(report.object_writes, 0, "{report:?}");
    assert_eq!(report.events, 0, "{report:?}");
    assert!(!report.cursor_moved, "{report:?}");
}

/// Polls `check` every `every` until it gives a value; panics after `timeout` saying `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
