use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::{SQLITE_SQL, Sql};
use super::*;
use crate::reconcile::plan::{Current, Plan};

/// The embedded store: one SQLite file, for one controller process on one machine.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: &'static Sql,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: url.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error)?
            .create_if_missing(true)
            .foreign_keys(true)
            // WAL lets `status` read while the controller writes.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| connect_error(sqlx::Error::Io(e)))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Ok(SqliteStore {
            pool,
            sql: &SQLITE_SQL,
        })
    }

    /// The file opened read-only; `None` when there is no such file (it is not created).
    pub async fn open_read_only(url: &str) -> Result<Option<SqliteStore>, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: url.to_owned(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error)?
            .read_only(true)
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(30));
        if !options.get_filename().is_file() {
            return Ok(None);
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Ok(Some(SqliteStore {
            pool,
            sql: &SQLITE_SQL,
        }))
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = sqlx::migrate!("../migrations/sqlite");
        super::migrations::repair_sqlite(&self.pool, &migrator).await?;
        migrator.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    async fn load(&self, source: &str) -> Result<Current, StoreError> {
        let rows: Vec<LoadRow> = sqlx::query_as(self.sql.load.as_str())
            .bind(source)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("loading the synced objects"))?;
        let cursor: Option<CursorRow> = sqlx::query_as(self.sql.load_cursor.as_str())
            .bind(source)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("loading the sync cursor"))?;
        current_from(rows, cursor)
    }

    async fn apply(
        &self,
        source: &SourceInfo,
        plan: &Plan<'_>,
        objects: &impl Objects,
    ) -> Result<(), StoreError> {
        if plan.is_empty() {
            return Ok(());
        }
        // IMMEDIATE takes the write lock up front, so a concurrent writer waits on
        // busy_timeout instead of failing when a read lock cannot be upgraded.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_error("starting a transaction"))?;
        let mut batches = rows::Batches::new(plan, &source.name, self.sql, objects);
        while let Some(batch) = batches.next().await {
            let (statement, rows) = batch?;
            let started = std::time::Instant::now();
            let bytes = rows.len();
            sqlx::query(statement)
                .bind(rows)
                .execute(&mut *tx)
                .await
                .map_err(query_error("applying the plan"))?;
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                bytes,
                "{}",
                &statement[..statement.len().min(40)]
            );
        }
        if let Some(cursor) = &plan.cursor {
            let errors = serde_json::to_string(&cursor.errors)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(self.sql.cursor.as_str())
                .bind(&source.name)
                .bind(&source.url)
                .bind(&source.branch)
                .bind(&source.path)
                .bind(&cursor.revision)
                .bind(&cursor.tree)
                .bind(errors)
                .execute(&mut *tx)
                .await
                .map_err(query_error("moving the sync cursor"))?;
        }
        tx.commit()
            .await
            .map_err(query_error("committing the sync"))
    }

    async fn project_status(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProjectStatus>, StoreError> {
        let projects: Vec<ProjectRow> = sqlx::query_as(self.sql.project_status.as_str())
            .bind(project)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading projects"))?;
        let tasks: Vec<TaskRow> = sqlx::query_as(self.sql.task_status.as_str())
            .bind(project)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading tasks"))?;
        Ok(status_from(projects, tasks))
    }

    async fn source_status(&self) -> Result<Vec<SourceStatus>, StoreError> {
        let rows: Vec<SourceRow> = sqlx::query_as(self.sql.source_status.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading sources"))?;
        Ok(rows.into_iter().map(SourceRow::into_status).collect())
    }

    async fn open_tasks(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(OPEN_TASKS_SQLITE)
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("counting open tasks"))
    }

    async fn has_schema(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = 'sync_sources')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("looking for the schema"))
    }

    async fn fields(
        &self,
        rows: &[(Kind, uuid::Uuid)],
    ) -> Result<HashMap<uuid::Uuid, Columns>, StoreError> {
        let mut out = HashMap::with_capacity(rows.len());
        for (table, statement) in &self.sql.fields {
            for batch in fields_batches(rows, table) {
                let found: Vec<FieldsRow> = sqlx::query_as(statement.as_str())
                    .bind(batch)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(query_error("reading the synced columns"))?;
                columns_from(found, &mut out)?;
            }
        }
        Ok(out)
    }
}
