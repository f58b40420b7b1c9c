use std::time::Duration;

use sqlx::PgPool;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;

use super::sql::{POSTGRES_SQL, Sql};
use super::*;
use crate::reconcile::plan::{Current, Plan};

/// Cheap to clone: the pool is shared, so the syncer and the dispatcher each hold one.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    sql: &'static Sql,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, false).await
    }

    /// Every session read-only: whatever is run on it, it writes nothing.
    pub async fn connect_read_only(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, true).await
    }

    async fn connect_with(url: &str, read_only: bool) -> Result<PgStore, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: url.to_owned(),
            source,
        };
        // No JIT: the batch statements' set-returning functions (`jsonb_to_recordset`,
        // `generate_series`) have no row estimates, so the planner guesses costs high enough
        // to compile each one, and a claim that runs in milliseconds spent 1.6 s in LLVM.
        //
        // Generic plans from the first execution: Postgres plans a prepared statement afresh
        // for its first five runs on each connection, and planning a claim or a completion
        // batch (a dozen CTEs) cost 3–5 ms, as much as running it. Every statement here is
        // shaped so its plan does not hang on parameter values (batches come as one JSON
        // parameter whose row count the planner cannot see anyway).
        let mut options = PgConnectOptions::from_str(url)
            .map_err(connect_error)?
            .options([("jit", "off"), ("plan_cache_mode", "force_generic_plan")]);
        if read_only {
            options = options.options([("default_transaction_read_only", "on")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Ok(PgStore {
            pool,
            sql: &POSTGRES_SQL,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Store for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = sqlx::migrate!("../migrations/postgres");
        super::migrations::repair_postgres(&self.pool, &migrator).await?;
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
        let mut tx = self
            .pool
            .begin()
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
            sqlx::query(self.sql.cursor.as_str())
                .bind(&source.name)
                .bind(&source.url)
                .bind(&source.branch)
                .bind(&source.path)
                .bind(&cursor.revision)
                .bind(&cursor.tree)
                .bind(Json(&cursor.errors))
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
        sqlx::query_scalar(OPEN_TASKS_POSTGRES)
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("counting open tasks"))
    }

    async fn has_schema(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar("SELECT to_regclass('sync_sources') IS NOT NULL")
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
