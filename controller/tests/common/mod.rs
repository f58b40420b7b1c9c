//! Shared helpers for the integration tests: scratch databases (Postgres and SQLite), real Git
//! repositories in temporary directories, a syncer wired to both, direct SQL assertions that
//! read the same way on either backend, and the real controller and agent binaries as child
//! processes that die with the test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;

use agentops::reconcile::sync::{SyncReport, Syncer};
use agentops::source::git::{GitSource, Location};
use agentops::store::{PgStore, SqliteStore, Store};
use git2::{Repository, RepositoryInitOptions, Signature};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use tempfile::TempDir;

pub const BRANCH: &str = "main";
pub const SOURCE: &str = "default";
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A store the tests can open by URL on a scratch database of its backend.
pub trait TestStore: Store + Sized {
    const BACKEND: Backend;
    fn open(url: &str) -> impl Future<Output = Self>;
}

impl TestStore for PgStore {
    const BACKEND: Backend = Backend::Postgres;
    async fn open(url: &str) -> Self {
        let store = PgStore::connect(url).await.expect("connect to Postgres");
        store.migrate().await.expect("migrate Postgres");
        store
    }
}

impl TestStore for SqliteStore {
    const BACKEND: Backend = Backend::Sqlite;
    async fn open(url: &str) -> Self {
        let store = SqliteStore::connect(url).await.expect("connect to SQLite");
        store.migrate().await.expect("migrate SQLite");
        store
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch databases
// ---------------------------------------------------------------------------------------------

pub fn admin_url() -> String {
    std::env::var("AGENTOPS_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    match base[authority..].find('/') {
        Some(slash) => format!("{}/{database}{query}", &base[..authority + slash]),
        None => format!("{base}/{database}{query}"),
    }
}

/// A database of its own for one test: `agentops_t_<random>` on Postgres (dropped WITH (FORCE)
/// when this value is dropped), a file in a temporary directory for SQLite. Holds a small pool
/// of its own for assertions, apart from the store under test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub pool: Pool,
    pg_name: Option<String>,
    _dir: Option<TempDir>,
}

pub enum Pool {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

impl TestDb {
    /// An empty database (no migrations applied).
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => {
                let admin = admin_url();
                let name = format!("agentops_t_{}", uuid::Uuid::new_v4().simple());
                let admin_pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("connect to {admin} (set AGENTOPS_TEST_POSTGRES): {e}")
                    });
                sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin_pool)
                    .await
                    .expect("create the scratch database");
                admin_pool.close().await;
                let url = with_database(&admin, &name);
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await
                    .expect("connect to the scratch database");
                TestDb {
                    backend,
                    url,
                    pool: Pool::Pg(pool),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("agentops.db").display());
                let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("sqlite url");
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(
                        options
                            .create_if_missing(true)
                            .busy_timeout(std::time::Duration::from_secs(30)),
                    )
                    .await
                    .expect("open the SQLite file");
                TestDb {
                    backend,
                    url,
                    pool: Pool::Sqlite(pool),
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
        }
    }

    pub async fn rows<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + Send
            + Unpin,
    {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(pool) => sqlx::query_as(sql).fetch_all(pool).await,
            Pool::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await,
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn execute(&self, sql: &str) -> u64 {
        let q = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(pool) => sqlx::query(q)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Pool::Sqlite(pool) => sqlx::query(q)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        let q = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(pool) => sqlx::query_scalar(q).fetch_one(pool).await,
            Pool::Sqlite(pool) => sqlx::query_scalar(q).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn text(&self, sql: &str) -> Option<String> {
        let q = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(pool) => sqlx::query_scalar(q).fetch_one(pool).await,
            Pool::Sqlite(pool) => sqlx::query_scalar(q).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// SQL for the time `seconds` from now (negative: ago), as the backend stores times.
    pub fn time_from_now(&self, seconds: i64) -> String {
        match self.backend {
            Backend::Postgres => format!("(now() + interval '{seconds} seconds')"),
            Backend::Sqlite => {
                format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '{seconds:+} seconds')")
            }
        }
    }

    /// SQL for the whole seconds from now until the time `expr` (negative when past).
    pub fn seconds_until(&self, expr: &str) -> String {
        match self.backend {
            Backend::Postgres => {
                format!("CAST(round(EXTRACT(EPOCH FROM ({expr} - now()))) AS bigint)")
            }
            Backend::Sqlite => {
                format!("CAST(round((julianday({expr}) - julianday('now')) * 86400) AS INTEGER)")
            }
        }
    }

    pub async fn projects(&self) -> Vec<ProjectRow> {
        self.rows(
            "SELECT CAST(id AS text) AS id, name, title, status, generation, path, revision, \
             spec_hash, status_message, CAST(pruned_at AS text) AS pruned_at, \
             CAST(updated_at AS text) AS updated_at \
             FROM projects WHERE source IS NOT NULL ORDER BY name",
        )
        .await
    }

    pub async fn project(&self, name: &str) -> ProjectRow {
        let rows = self.projects().await;
        rows.iter()
            .find(|p| p.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no project `{name}` in {rows:#?}"))
    }

    pub async fn tasks(&self) -> Vec<TaskRow> {
        self.rows(
            "SELECT CAST(t.id AS text) AS id, p.name AS project, t.name, t.title, t.status, \
             t.generation, t.path, t.revision, t.spec_hash, t.status_message, \
             CAST(t.pruned_at AS text) AS pruned_at, CAST(t.updated_at AS text) AS updated_at, \
             CAST(t.attempt AS bigint) AS attempt, CAST(t.depends_on AS text) AS depends_on \
             FROM tasks t JOIN projects p ON p.id = t.project_id \
             WHERE t.source IS NOT NULL ORDER BY p.name, t.name",
        )
        .await
    }

    pub async fn task(&self, project: &str, name: &str) -> TaskRow {
        let rows = self.tasks().await;
        rows.iter()
            .find(|t| t.project == project && t.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no task `{project}/{name}` in {rows:#?}"))
    }

    pub async fn task_names(&self) -> Vec<String> {
        self.tasks()
            .await
            .into_iter()
            .map(|t| format!("{}/{}", t.project, t.name))
            .collect()
    }

    /// Agents declared in Git (the seeded `cos` and `seed` rows have no source).
    pub async fn agents(&self) -> Vec<AgentRow> {
        self.rows(
            "SELECT CAST(id AS text) AS id, name, type, status, generation, path, revision, \
             spec_hash, status_message, CAST(pruned_at AS text) AS pruned_at \
             FROM agents WHERE source IS NOT NULL ORDER BY name",
        )
        .await
    }

    pub async fn agent(&self, name: &str) -> AgentRow {
        let rows = self.agents().await;
        rows.iter()
            .find(|a| a.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no agent `{name}` in {rows:#?}"))
    }

    pub async fn sources(&self) -> Vec<SourceRow> {
        self.rows(
            "SELECT name, url, branch, revision, tree_oid, CAST(synced_at AS text) AS synced_at, \
             CAST(errors AS text) AS errors FROM sync_sources ORDER BY name",
        )
        .await
    }

    pub async fn source(&self) -> SourceRow {
        let rows = self.sources().await;
        assert_eq!(rows.len(), 1, "one sync source expected: {rows:#?}");
        rows.into_iter().next().unwrap()
    }

    /// Events as (type, payload), oldest first.
    pub async fn events(&self) -> Vec<(String, serde_json::Value)> {
        let rows: Vec<EventRow> = self
            .rows(
                "SELECT event_type, CAST(payload AS text) AS payload FROM events \
                 ORDER BY created_at, event_type",
            )
            .await;
        rows.into_iter()
            .map(|e| {
                let payload = serde_json::from_str(&e.payload).expect("event payload is JSON");
                (e.event_type, payload)
            })
            .collect()
    }

    pub async fn events_of(&self, event_type: &str) -> Vec<serde_json::Value> {
        self.events()
            .await
            .into_iter()
            .filter(|(t, _)| t == event_type)
            .map(|(_, p)| p)
            .collect()
    }

    pub async fn event_counts(&self) -> BTreeMap<String, i64> {
        let mut counts = BTreeMap::new();
        for (t, _) in self.events().await {
            *counts.entry(t).or_insert(0) += 1;
        }
        counts
    }

    /// Postgres only: `sum(xmin)` per table, which moves with any write to a row, even one
    /// that leaves every value as it was.
    pub async fn xmin(&self, tables: &[&str]) -> Option<Vec<i64>> {
        if self.backend != Backend::Postgres {
            return None;
        }
        let mut sums = Vec::new();
        for table in tables {
            sums.push(
                self.scalar(&format!(
                    "SELECT CAST(coalesce(sum(xmin::text::bigint), 0) AS bigint) FROM {table}"
                ))
                .await,
            );
        }
        Some(sums)
    }

    /// Everything a no-op sync must leave untouched.
    pub async fn snapshot(&self) -> DbSnapshot {
        DbSnapshot {
            projects: self.projects().await,
            tasks: self.tasks().await,
            agents: self.agents().await,
            events: self.event_counts().await,
            sources: self.sources().await,
            xmin_objects: self.xmin(&["projects", "tasks", "agents", "events"]).await,
            xmin_sources: self.xmin(&["sync_sources"]).await,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop may run inside the test's runtime: do the async work on a thread of its own.
        let admin = admin_url();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin)
                    .await?;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&pool)
                .await?;
                pool.close().await;
                Ok::<(), sqlx::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop the scratch database: {e}");
        }
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProjectRow {
    pub id: String,
    pub name: String,
    pub title: Option<String>,
    pub status: String,
    pub generation: i64,
    pub path: Option<String>,
    pub revision: Option<String>,
    pub spec_hash: Option<String>,
    pub status_message: Option<String>,
    pub pruned_at: Option<String>,
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TaskRow {
    pub id: String,
    pub project: String,
    pub name: String,
    pub title: String,
    pub status: String,
    pub generation: i64,
    pub path: Option<String>,
    pub revision: Option<String>,
    pub spec_hash: Option<String>,
    pub status_message: Option<String>,
    pub pruned_at: Option<String>,
    pub updated_at: Option<String>,
    pub attempt: i64,
    pub depends_on: String,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AgentRow {
    pub id: String,
    pub name: String,
    #[sqlx(rename = "type")]
    pub agent_type: String,
    pub status: String,
    pub generation: i64,
    pub path: Option<String>,
    pub revision: Option<String>,
    pub spec_hash: Option<String>,
    pub status_message: Option<String>,
    pub pruned_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SourceRow {
    pub name: String,
    pub url: String,
    pub branch: String,
    pub revision: Option<String>,
    pub tree_oid: Option<String>,
    pub synced_at: Option<String>,
    pub errors: String,
}

impl SourceRow {
    pub fn errors(&self) -> serde_json::Value {
        serde_json::from_str(&self.errors).expect("sync_sources.errors is JSON")
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    event_type: String,
    payload: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DbSnapshot {
    pub projects: Vec<ProjectRow>,
    pub tasks: Vec<TaskRow>,
    pub agents: Vec<AgentRow>,
    pub events: BTreeMap<String, i64>,
    pub sources: Vec<SourceRow>,
    pub xmin_objects: Option<Vec<i64>>,
    pub xmin_sources: Option<Vec<i64>>,
}

// ---------------------------------------------------------------------------------------------
// Git repositories
// ---------------------------------------------------------------------------------------------

/// A non-bare repository in a temporary directory, on branch `main`.
pub struct GitRepo {
    pub dir: TempDir,
    repo: Repository,
}

impl Default for GitRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl GitRepo {
    pub fn new() -> GitRepo {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = Repository::init_opts(
            dir.path(),
            RepositoryInitOptions::new().initial_head(BRANCH),
        )
        .expect("git init");
        GitRepo { dir, repo }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write (`Some`) or delete (`None`) files, relative to the top, and commit them all.
    /// Returns the revision as the controller spells it.
    pub fn commit(&self, message: &str, changes: &[(&str, Option<&str>)]) -> String {
        let mut index = self.repo.index().expect("index");
        for (path, content) in changes {
            let full = self.path().join(path);
            match content {
                Some(content) => {
                    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                    std::fs::write(&full, content).unwrap();
                    index.add_path(Path::new(path)).expect("git add");
                }
                None => {
                    std::fs::remove_file(&full).unwrap_or_else(|e| panic!("rm {path}: {e}"));
                    index.remove_path(Path::new(path)).expect("git rm");
                }
            }
        }
        index.write().expect("write index");
        let tree = self
            .repo
            .find_tree(index.write_tree().expect("write tree"))
            .unwrap();
        let signature = Signature::now("Test", "test@example.com").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        let oid = self
            .repo
            .commit(
                Some("HEAD"),
                &signature,
                &signature,
                message,
                &tree,
                &parents,
            )
            .expect("git commit");
        format!("{BRANCH}@sha1:{oid}")
    }

    /// `git mv` with the content unchanged, committed.
    pub fn rename(&self, from: &str, to: &str) -> String {
        let content = std::fs::read_to_string(self.path().join(from)).unwrap();
        self.commit(
            &format!("mv {from} {to}"),
            &[(from, None), (to, Some(&content))],
        )
    }
}

/// A bare repository in a temporary directory: the remote clones push to and controllers
/// fetch from.
pub struct BareRemote {
    _dir: TempDir,
    pub path: PathBuf,
}

impl Default for BareRemote {
    fn default() -> Self {
        Self::new()
    }
}

impl BareRemote {
    pub fn new() -> BareRemote {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("remote.git");
        Repository::init_opts(
            &path,
            RepositoryInitOptions::new().bare(true).initial_head(BRANCH),
        )
        .expect("git init --bare");
        BareRemote { _dir: dir, path }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Every ref with its target: what a test compares to show nothing was pushed.
    pub fn refs(&self) -> BTreeMap<String, String> {
        let repo = Repository::open_bare(&self.path).expect("open the remote");
        let refs = repo.references().expect("list refs");
        refs.filter_map(Result::ok)
            .filter_map(|r| Some((r.name().ok()?.to_owned(), r.target()?.to_string())))
            .collect()
    }
}

impl GitRepo {
    /// `git push <remote> <local>:<branch>` (forced), as a person publishing a branch; a
    /// `branch` starting with `refs/` is pushed as that ref (such as a forge's
    /// `refs/pull/7/head`).
    pub fn push(&self, remote: &BareRemote, local: &str, branch: &str) {
        let target = if branch.starts_with("refs/") {
            branch.to_owned()
        } else {
            format!("refs/heads/{branch}")
        };
        let mut origin = self.repo.remote_anonymous(&remote.url()).expect("remote");
        origin
            .push(&[format!("+{local}:{target}")], None)
            .expect("git push");
    }

    /// `git checkout -b <branch>` at the current commit, files unchanged.
    pub fn branch(&self, branch: &str) {
        let head = self.repo.head().unwrap().peel_to_commit().unwrap();
        self.repo.branch(branch, &head, true).expect("git branch");
        self.repo
            .set_head(&format!("refs/heads/{branch}"))
            .expect("git checkout");
    }
}

// ---------------------------------------------------------------------------------------------
// A syncer on a repository and a scratch database
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Spec fixtures
// ---------------------------------------------------------------------------------------------

pub const API: &str = "apiVersion: agentops.dev/v1alpha1";

pub fn project(name: &str, title: &str) -> String {
    format!("{API}\nkind: Project\nmetadata:\n  name: {name}\nspec:\n  title: {title}\n")
}

/// A task for `projects/<p>/tasks/`, its project taken from the folder.
pub fn task(name: &str, title: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: {title}\n  action:\n    prompt: Do {name}\n"
    )
}

/// A task naming its project, for files outside `projects/<p>/tasks/`.
pub fn task_in(project: &str, name: &str, title: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  project: {project}\n  title: {title}\n  action:\n    prompt: Do {name}\n"
    )
}

pub fn agent(name: &str, capabilities: &str) -> String {
    format!(
        "{API}\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n  type: specialist\n  capabilities: [{capabilities}]\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Real processes: the controller (`agentops up`) and agents (`agentops-agent-run`)
// ---------------------------------------------------------------------------------------------

/// A child process that cannot outlive the test: dropping it (also while a test panics)
/// SIGKILLs its whole process group and reaps it. Its stdout and stderr are appended to `log`.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `command` as the leader of a new process group.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Proc {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        writeln!(file, "--- {name}: {command:?}").unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({command:?}): {e}"));
        Proc {
            name: name.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running (not yet exited, not killed by us).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// How it ended, if it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    /// SIGKILL to the process group, then reap. Does nothing once done.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals a process group we created; ESRCH once it is gone is harmless.
            unsafe {
                libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the process group without reaping (SIGSTOP, SIGCONT, …).
    pub fn signal_group(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        assert!(pid > 0, "{} is not running", self.name);
        // SAFETY: signals a process group we created.
        let rc = unsafe { libc::killpg(pid, signal) };
        assert_eq!(rc, 0, "killpg({pid}, {signal}) for {}", self.name);
    }

    /// The last `lines` lines of the log, to explain a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Processes that are not our children but were started on our behalf (a task's command,
/// which the agent runs in a process group of its own and which a SIGKILLed agent leaves
/// behind): SIGKILLed on drop if they still run. Each is known by its pid and start time, so a
/// pid the system has given to another process since is left alone.
#[derive(Default)]
pub struct Strays(Vec<(u32, u64)>);

impl Strays {
    /// Remembers `pid` if it is running now.
    pub fn add(&mut self, pid: u32) {
        if let Some(started) = start_time(pid)
            && !self.0.contains(&(pid, started))
        {
            self.0.push((pid, started));
        }
    }
}

impl Drop for Strays {
    fn drop(&mut self) {
        for (pid, started) in &self.0 {
            if start_time(*pid) == Some(*started) {
                // SAFETY: signals the very process we recorded (same pid, same start time).
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// A running process's start time (clock ticks since boot), from `/proc/PID/stat`; `None`
/// when there is no such process or it is a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name: state is the first, starttime the 20th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    start_time(pid).is_some()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `command` without any `AGENTOPS_*` or `RUST_LOG` variable of the caller's environment.
fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("AGENTOPS_") || key_text == "RUST_LOG" {
            command.env_remove(key);
        }
    }
}

/// The `agentops-agent-run` binary, built next to the `agentops` binary under test.
///
/// Cargo builds another package's binary for an integration test only when that package is
/// tested too (`cargo test --workspace` does, `cargo test -p agentops` does not), so this runs
/// `cargo build --workspace --bin agentops-agent-run` once per test process, into the same
/// target directory and profile: a no-op when the binary is fresh, a rebuild when `agents/`
/// changed since. `--workspace` gives its dependencies the features `cargo test --workspace`
/// gives them, so that neither build undoes the other's. When cargo cannot run (no `CARGO` in the environment), an existing
/// binary is used as it is.
pub fn agent_run_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let controller = Path::new(env!("CARGO_BIN_EXE_agentops"));
        let dir = controller.parent().expect("the binary's directory");
        let bin = dir.join(format!(
            "agentops-agent-run{}",
            std::env::consts::EXE_SUFFIX
        ));
        let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
        let target_dir = dir.parent().expect("the target directory");
        let cargo = std::env::var_os("CARGO");
        if let Some(cargo) = &cargo {
            let mut build = Command::new(cargo);
            build
                .args(["build", "--quiet", "--workspace"])
                .args(["--bin", "agentops-agent-run"])
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            match profile {
                "debug" => {}
                "release" => {
                    build.arg("--release");
                }
                other => {
                    build.args(["--profile", other]);
                }
            }
            let status = build
                .status()
                .unwrap_or_else(|e| panic!("run {build:?}: {e}"));
            assert!(status.success(), "{build:?} failed: {status}");
        }
        assert!(
            bin.exists(),
            "{} is missing (CARGO is {cargo:?}): run `cargo build -p agentops-agents` or `cargo \
             test --workspace`",
            bin.display()
        );
        bin
    })
    .clone()
}

/// `agentops up` on a repository and a database, on a fixed loopback port so that it can be
/// killed and restarted where its agents expect it.
pub struct Controller {
    pub addr: std::net::SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    args: Vec<std::ffi::OsString>,
    data_dir: PathBuf,
    log: PathBuf,
    /// How many times it was started.
    pub starts: usize,
    pub proc: Option<Proc>,
}

impl Controller {
    /// Starts `agentops up` with a data directory and log under `dir`, and returns without
    /// waiting for it to be ready.
    pub fn start(database: &str, repo: &Path, dir: &Path, lease: &str, heartbeat: &str) -> Self {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let args: Vec<std::ffi::OsString> = vec![
            "up".into(),
            "--repo".into(),
            repo.into(),
            "--database".into(),
            database.into(),
            "--listen".into(),
            addr.to_string().into(),
            "--lease".into(),
            lease.into(),
            "--heartbeat".into(),
            heartbeat.into(),
            // The tests run their own agents and count what each did.
            "--no-agents".into(),
        ];
        let mut controller = Controller {
            addr,
            url: format!("http://{addr}"),
            args,
            data_dir,
            log: dir.join("controller.log"),
            starts: 0,
            proc: None,
        };
        controller.spawn();
        controller
    }

    /// (Re)starts the process: same flags, database, repository, data directory and port.
    pub fn spawn(&mut self) {
        assert!(
            !self.proc.as_mut().is_some_and(Proc::is_running),
            "the controller is already running"
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
        clean_env(&mut command);
        command
            .args(&self.args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("AGENTOPS_LOG", "warn")
            .current_dir(&self.data_dir);
        self.starts += 1;
        let name = format!("controller #{}", self.starts);
        self.proc = Some(Proc::spawn(&name, command, &self.log));
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Waits until `/readyz` answers 200 (the first sync reached the store). A process that
    /// exits because the port is still taken is started again, a few times; any other exit,
    /// or no readiness within `timeout`, fails the test with the end of the log.
    pub async fn wait_ready(&mut self, timeout: std::time::Duration) {
        self.wait_for_readyz(timeout, |status| status == reqwest::StatusCode::OK)
            .await;
    }

    /// Waits until the API answers at all: it serves agents from then on, while the first
    /// sync may still be running (`/readyz` 503). Restarts and failures as in [`Self::wait_ready`].
    #[allow(dead_code)] // each test binary uses its own part of the fixtures
    pub async fn wait_serving(&mut self, timeout: std::time::Duration) {
        self.wait_for_readyz(timeout, |_| true).await;
    }

    async fn wait_for_readyz(
        &mut self,
        timeout: std::time::Duration,
        accept: impl Fn(reqwest::StatusCode) -> bool,
    ) {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = std::time::Instant::now() + timeout;
        let mut respawns = 0;
        loop {
            if let Ok(answer) = http.get(format!("{}/readyz", self.url)).send().await
                && accept(answer.status())
            {
                return;
            }
            if !self.is_running() {
                let status = self.proc.as_mut().and_then(Proc::exit_status);
                let log = self.log_tail(5);
                respawns += 1;
                assert!(
                    log.contains("Address already in use") && respawns <= 5,
                    "the controller exited ({status:?}):\n{}",
                    self.log_tail(40)
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                self.kill();
                self.spawn();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the controller did not answer as awaited within {timeout:?}:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// `agentops-agent-run` against `api`: a `seed` agent named `name` running `concurrency`
/// tasks at once, logging to `log` (at `info`: a lost lease or a refused report is logged,
/// a task that simply completes is not).
pub fn spawn_agent(api: &str, name: &str, concurrency: usize, log: &Path) -> Proc {
    let mut command = Command::new(agent_run_bin());
    clean_env(&mut command);
    command
        .args(["--api", api, "--name", name, "--type", "seed"])
        .args(["--concurrency", &concurrency.to_string()])
        .env("RUST_LOG", "info");
    Proc::spawn(name, command, log)
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

/// One agent's claim or reports, as the batch operations of [`Queue`] take them.
#[allow(dead_code)] // each test binary uses its own part of the fixtures
pub trait QueueExt: agentops::store::queue::Queue {
    async fn claim_for(
        &self,
        agent: &agentops::store::queue::AgentIdentity,
        max: u32,
        policy: &agentops::store::queue::LeasePolicy,
    ) -> Result<Vec<agentops::store::queue::Assignment>, agentops::store::StoreError> {
        let claimer = agentops::store::queue::Claimer {
            agent: agent.clone(),
            max,
        };
        Ok(self
            .claim(std::slice::from_ref(&claimer), policy)
            .await?
            .remove(0))
    }

    async fn complete_as(
        &self,
        agent: &str,
        completions: &[agentops::store::queue::Completion],
    ) -> Result<Vec<Result<(), agentops::store::queue::Refusal>>, agentops::store::StoreError> {
        let batch: Vec<agentops::store::queue::AgentCompletion<'_>> = completions
            .iter()
            .map(|completion| agentops::store::queue::AgentCompletion { agent, completion })
            .collect();
        self.complete(&batch).await
    }
}

impl<Q: agentops::store::queue::Queue> QueueExt for Q {}
