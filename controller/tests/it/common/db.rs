//! Scratch databases (Postgres and SQLite), one per test, and reading their rows back.

use std::collections::BTreeMap;
use std::future::Future;

use agentops::store::{PgStore, SqliteStore, Store};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use tempfile::TempDir;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

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

/// One agent's claim or reports, as the batch operations of [`Queue`] take them.
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
