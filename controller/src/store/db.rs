//! The one store implementation, generic over its engine. A [`Backend`] knows how to connect,
//! migrate, open a writing transaction and run a statement with [`Arg`]s; everything else,
//! statement text included (spelled by its [`Dialect`]), is written once. Values cross as
//! text, integers and booleans on both engines: ids, times and JSON are cast in SQL.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Postgres, Sqlite, Type};

use super::sql::{Dialect, POSTGRES, SQLITE, Sql};
use super::*;
use crate::reconcile::plan::{Current, Plan};

/// A parameter of a statement.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Real(Option<f64>),
    Bool(bool),
    Bytes(&'a [u8]),
}

/// `Arg::from` for each type a statement binds.
macro_rules! arg_from {
    ($($ty:ty => |$v:ident| $arg:expr;)*) => {
        $(impl<'a> From<$ty> for Arg<'a> {
            fn from($v: $ty) -> Self {
                $arg
            }
        })*
    };
}

arg_from! {
    &'a str => |v| Arg::Text(Some(v));
    &'a String => |v| Arg::Text(Some(v));
    Option<&'a str> => |v| Arg::Text(v);
    &'a Option<String> => |v| Arg::Text(v.as_deref());
    i64 => |v| Arg::Int(Some(v));
    Option<i32> => |v| Arg::Int(v.map(i64::from));
    Option<f64> => |v| Arg::Real(v);
    bool => |v| Arg::Bool(v);
    &'a [u8] => |v| Arg::Bytes(v);
}

/// The parameters of a statement, in order.
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        &[$($crate::store::db::Arg::from($arg)),*][..]
    };
}
pub(crate) use args;

/// A row type both engines can decode.
pub trait Decoded:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}
impl<T> Decoded for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// What differs between the engines beyond the SQL text.
pub trait Backend: Database<Connection: Migrate> {
    const DIALECT: &'static Dialect;
    /// The statement that opens a writing transaction.
    const BEGIN: &'static str;
    const MIGRATOR: Migrator;
    /// The migrations reworded since they were released (see `migrations`).
    const REWORDED: &'static [migrations::Reworded];

    fn fetch<R: Decoded>(
        conn: &mut Self::Connection,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<Vec<R>, sqlx::Error>> + Send;

    /// Run a statement; how many rows it changed.
    fn execute(
        conn: &mut Self::Connection,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
}

fn query<'q, DB>(sql: &'static str, args: &[Arg<'_>]) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<i64>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<f64>: Encode<'t, DB> + Type<DB>,
    for<'t> bool: Encode<'t, DB> + Type<DB>,
    for<'t> &'t [u8]: Encode<'t, DB> + Type<DB>,
{
    args.iter().fold(sqlx::query(sql), |query, arg| match *arg {
        Arg::Text(v) => query.bind(v),
        Arg::Int(v) => query.bind(v),
        Arg::Real(v) => query.bind(v),
        Arg::Bool(v) => query.bind(v),
        Arg::Bytes(v) => query.bind(v),
    })
}

/// The two engines run statements alike; only their row and connection types differ.
macro_rules! engine_io {
    () => {
        async fn fetch<R: Decoded>(
            conn: &mut Self::Connection,
            sql: &'static str,
            args: &[Arg<'_>],
        ) -> Result<Vec<R>, sqlx::Error> {
            let rows = conn.fetch_all(query::<Self>(sql, args)).await?;
            rows.iter().map(R::from_row).collect()
        }

        async fn execute(
            conn: &mut Self::Connection,
            sql: &'static str,
            args: &[Arg<'_>],
        ) -> Result<u64, sqlx::Error> {
            Ok(conn
                .execute(query::<Self>(sql, args))
                .await?
                .rows_affected())
        }
    };
}

impl Backend for Postgres {
    const DIALECT: &'static Dialect = &POSTGRES;
    const BEGIN: &'static str = "BEGIN";
    const MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");
    const REWORDED: &'static [migrations::Reworded] = migrations::POSTGRES_REWORDED;

    engine_io!();
}

impl Backend for Sqlite {
    const DIALECT: &'static Dialect = &SQLITE;
    /// IMMEDIATE takes the write lock up front, so a concurrent writer waits on busy_timeout
    /// instead of failing when a read lock cannot be upgraded.
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");
    const REWORDED: &'static [migrations::Reworded] = migrations::SQLITE_REWORDED;

    engine_io!();
}

/// The store on one engine. Cheap to clone: the pool is shared, so the syncer and the
/// dispatcher each hold one.
pub struct Db<B: Backend> {
    pool: Pool<B>,
    pub(crate) sql: &'static Sql,
}

impl<B: Backend> Clone for Db<B> {
    fn clone(&self) -> Self {
        Db {
            pool: self.pool.clone(),
            sql: self.sql,
        }
    }
}

/// Postgres in production.
pub type PgStore = Db<Postgres>;

/// The embedded store: one SQLite file, for one controller process on one machine.
pub type SqliteStore = Db<Sqlite>;

/// A connection of the pool or a transaction: where a statement runs.
pub(crate) type Conn<B> = <B as Database>::Connection;

impl<B: Backend> Db<B> {
    fn open(pool: Pool<B>) -> Result<Db<B>, StoreError> {
        let sql = Sql::of(B::DIALECT)
            .as_ref()
            .map_err(|e| StoreError::Statement(e.clone()))?;
        Ok(Db { pool, sql })
    }

    pub fn pool(&self) -> &Pool<B> {
        &self.pool
    }

    /// Every statement the store runs, by name, as this engine's dialect spells it.
    pub fn statements(&self) -> Vec<(&'static str, &'static str)> {
        self.sql.all()
    }

    pub(crate) async fn conn(&self) -> Result<sqlx::pool::PoolConnection<B>, StoreError> {
        self.pool
            .acquire()
            .await
            .map_err(query_error("connecting to the database"))
    }

    pub(crate) async fn begin(&self) -> Result<sqlx::Transaction<'static, B>, StoreError> {
        self.pool
            .begin_with(B::BEGIN)
            .await
            .map_err(query_error("starting a transaction"))
    }

    /// The rows of a statement run on a connection of the pool.
    pub(crate) async fn rows<R: Decoded>(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
        doing: &'static str,
    ) -> Result<Vec<R>, StoreError> {
        let mut conn = self.conn().await?;
        B::fetch(&mut conn, sql, args)
            .await
            .map_err(query_error(doing))
    }

    pub(crate) async fn row<R: Decoded>(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
        doing: &'static str,
    ) -> Result<Option<R>, StoreError> {
        Ok(self.rows(sql, args, doing).await?.into_iter().next())
    }

    pub(crate) async fn run(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
        doing: &'static str,
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        B::execute(&mut conn, sql, args)
            .await
            .map_err(query_error(doing))
    }
}

/// The rows of a statement run on `conn` (a transaction's, say).
pub(crate) async fn rows_on<B: Backend, R: Decoded>(
    conn: &mut Conn<B>,
    sql: &'static str,
    args: &[Arg<'_>],
    doing: &'static str,
) -> Result<Vec<R>, StoreError> {
    B::fetch(conn, sql, args).await.map_err(query_error(doing))
}

pub(crate) async fn run_on<B: Backend>(
    conn: &mut Conn<B>,
    sql: &'static str,
    args: &[Arg<'_>],
    doing: &'static str,
) -> Result<u64, StoreError> {
    B::execute(conn, sql, args)
        .await
        .map_err(query_error(doing))
}

pub(crate) async fn commit<B: Backend>(
    tx: sqlx::Transaction<'static, B>,
    doing: &'static str,
) -> Result<(), StoreError> {
    tx.commit().await.map_err(query_error(doing))
}

fn connect_error(url: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |source| StoreError::Connect {
        url: url.to_owned(),
        source,
    }
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
            .map_err(connect_error(url))?
            .options([("jit", "off"), ("plan_cache_mode", "force_generic_plan")]);
        if read_only {
            options = options.options([("default_transaction_read_only", "on")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(connect_error(url))?;
        Db::open(pool)
    }
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error(url))?
            .create_if_missing(true)
            .foreign_keys(true)
            // WAL lets `status` read while the controller writes.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| connect_error(url)(sqlx::Error::Io(e)))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(connect_error(url))?;
        Db::open(pool)
    }

    /// The file opened read-only; `None` when there is no such file (it is not created).
    pub async fn open_read_only(url: &str) -> Result<Option<SqliteStore>, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error(url))?
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
            .map_err(connect_error(url))?;
        Db::open(pool).map(Some)
    }
}

impl<B: Backend> Store for Db<B> {
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = B::MIGRATOR;
        migrations::repair::<B>(&self.pool, &migrator, B::REWORDED).await?;
        migrator.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    async fn load(&self, source: &str) -> Result<Current, StoreError> {
        let core = &self.sql.core;
        let rows: Vec<LoadRow> = self
            .rows(&core.load, args![source], "loading the synced objects")
            .await?;
        let cursor: Option<CursorRow> = self
            .row(&core.load_cursor, args![source], "loading the sync cursor")
            .await?;
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
        let mut tx = self.begin().await?;
        let mut batches = rows::Batches::new(plan, &source.name, self.sql, objects);
        while let Some(batch) = batches.next().await {
            let (statement, rows) = batch?;
            let started = std::time::Instant::now();
            let bytes = rows.len();
            run_on::<B>(&mut tx, statement, args![&rows], "applying the plan").await?;
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
            let args = args![
                &source.name,
                &source.url,
                &source.branch,
                &source.path,
                &cursor.revision,
                &cursor.tree,
                &errors
            ];
            run_on::<B>(
                &mut tx,
                &self.sql.core.cursor,
                args,
                "moving the sync cursor",
            )
            .await?;
        }
        commit(tx, "committing the sync").await
    }

    async fn project_status(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ProjectStatus>, StoreError> {
        let core = &self.sql.core;
        let projects: Vec<ProjectStatus> = self
            .rows(&core.project_status, args![project], "reading projects")
            .await?;
        let tasks: Vec<TaskRow> = self
            .rows(&core.task_status, args![project], "reading tasks")
            .await?;
        Ok(status_from(projects, tasks))
    }

    async fn source_status(&self) -> Result<Vec<SourceStatus>, StoreError> {
        self.rows(&self.sql.core.source_status, args![], "reading sources")
            .await
    }

    async fn open_tasks(&self) -> Result<i64, StoreError> {
        let count: Option<(i64,)> = self
            .row(&self.sql.core.open_tasks, args![], "counting open tasks")
            .await?;
        Ok(count.map_or(0, |(n,)| n))
    }

    async fn has_schema(&self) -> Result<bool, StoreError> {
        let found: Option<(bool,)> = self
            .row(&self.sql.core.has_schema, args![], "looking for the schema")
            .await?;
        Ok(found.is_some_and(|(b,)| b))
    }

    async fn fields(
        &self,
        rows: &[(Kind, uuid::Uuid)],
    ) -> Result<HashMap<uuid::Uuid, Columns>, StoreError> {
        let mut out = HashMap::with_capacity(rows.len());
        for (table, statement) in &self.sql.fields {
            for batch in fields_batches(rows, table) {
                let found: Vec<FieldsRow> = self
                    .rows(statement, args![&batch], "reading the synced columns")
                    .await?;
                columns_from(found, &mut out)?;
            }
        }
        Ok(out)
    }
}
