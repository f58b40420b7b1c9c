//! The store: Postgres in production, an SQLite file on one machine. Both carry the schema of
//! the original AgentOps system (see `migrations/`) and apply reconcile plans the same way:
//! each batch of rows goes to the database as one JSON array parameter, which both engines
//! turn back into rows in SQL (`jsonb_to_recordset`, `json_each`). One statement per batch,
//! whatever its size, and one row shape (`rows.rs`) shared by both.

mod db;
mod migrations;
pub mod queue;
mod queue_db;
mod queue_postgres;
mod queue_sqlite;
mod rows;
mod sql;
pub mod tools;
pub mod usage;
pub mod writeback;

use std::future::Future;
use std::sync::Arc;

use std::collections::HashMap;

use agentops_specs::{Diagnostic, Kind, Object};
use futures::future::BoxFuture;
use serde::Serialize;

pub use db::{PgStore, SqliteStore};
pub use rows::columns;

use crate::reconcile::plan::{Current, Plan, Write};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply the migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database error while {doing}")]
    Query {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database holds a value the controller cannot read: {0}")]
    Corrupt(String),
    #[error("unsupported database URL `{0}`: expected postgres://… or sqlite://FILE")]
    UnsupportedUrl(String),
    /// A batch this request was written in failed; the batch's writer logged the cause.
    #[error("writing a batch of requests failed: {0}")]
    Batch(String),
    #[error("cannot render the store's statements")]
    Statement(#[source] sql::Unspellable),
    #[error("cannot read the objects to write")]
    Objects(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub(crate) fn query_error(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { doing, source }
}

/// The source a plan belongs to, as recorded in `sync_sources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    pub name: String,
    pub url: String,
    pub branch: String,
    pub path: String,
}

/// One project with its tasks, for `agentops status`.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct ProjectStatus {
    pub name: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[sqlx(rename = "status_message")]
    pub message: Option<String>,
    #[sqlx(skip)]
    pub tasks: Vec<TaskStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct TaskStatus {
    pub name: String,
    pub status: String,
    pub agent: Option<String>,
    pub attempt: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[sqlx(rename = "status_message")]
    pub message: Option<String>,
    /// Seconds since the task was created.
    #[serde(skip)]
    pub age_seconds: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct SourceStatus {
    pub name: String,
    pub url: String,
    pub revision: Option<String>,
    #[sqlx(json)]
    pub errors: Vec<Diagnostic>,
}

/// Where the store gets the whole objects a plan writes: the plan holds only their skeletons.
pub trait Objects: Sync {
    /// The objects of `writes`, one each, in the same order. The future borrows nothing, so
    /// that the next batch's objects can be read while the store writes the current batch.
    fn fetch(&self, writes: &[&Write<'_>]) -> BoxFuture<'static, Result<Vec<Object>, StoreError>>;
}

/// The operations reconcile needs. Each method is one transaction.
pub trait Store: Send + Sync + 'static {
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Everything the store holds that came from `source`, and how far it was synced.
    fn load(&self, source: &str) -> impl Future<Output = Result<Current, StoreError>> + Send;

    /// Apply a plan atomically: either every write lands and the cursor moves, or nothing.
    fn apply(
        &self,
        source: &SourceInfo,
        plan: &Plan<'_>,
        objects: &impl Objects,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn project_status(
        &self,
        project: Option<&str>,
    ) -> impl Future<Output = Result<Vec<ProjectStatus>, StoreError>> + Send;

    fn source_status(&self) -> impl Future<Output = Result<Vec<SourceStatus>, StoreError>> + Send;

    /// Tasks that can still move without a person: in progress, or pending with every
    /// dependency completed (a backoff still to wait out included). A task waiting on work in
    /// review, or on a failed or blocked task, waits for a person and is not counted.
    fn open_tasks(&self) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Whether the database has been migrated at all: a database without the schema holds
    /// nothing, and reading it must not create the schema.
    fn has_schema(&self) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The columns a sync writes (see [`columns`]) of the rows with these ids, by id.
    fn fields(
        &self,
        rows: &[(Kind, uuid::Uuid)],
    ) -> impl Future<Output = Result<HashMap<uuid::Uuid, Columns>, StoreError>> + Send;
}

/// A row's columns by name, as JSON values.
pub type Columns = serde_json::Map<String, serde_json::Value>;

/// The ids of `rows` that live in `table`, as the JSON arrays the `fields` statements read,
/// a batch each.
fn fields_batches(rows: &[(Kind, uuid::Uuid)], table: &str) -> Vec<String> {
    let ids: Vec<serde_json::Value> = rows
        .iter()
        .filter(|(kind, _)| rows::table(*kind) == table)
        .map(|(_, id)| serde_json::json!({ "id": id }))
        .collect();
    ids.chunks(rows::BATCH)
        .map(|chunk| serde_json::Value::from(chunk.to_vec()).to_string())
        .collect()
}

#[derive(sqlx::FromRow)]
struct FieldsRow {
    id: String,
    fields: String,
}

fn columns_from(
    rows: Vec<FieldsRow>,
    out: &mut HashMap<uuid::Uuid, Columns>,
) -> Result<(), StoreError> {
    for row in rows {
        let id = row
            .id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("id `{}` is not a uuid", row.id)))?;
        let columns = serde_json::from_str(&row.fields).map_err(|e| {
            StoreError::Corrupt(format!(
                "the columns of row {id} are not a JSON object: {e}"
            ))
        })?;
        out.insert(id, columns);
    }
    Ok(())
}

/// Either backend, chosen by the URL's scheme.
pub enum AnyStore {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

impl AnyStore {
    /// A connection that cannot write: Postgres sessions are read-only, an SQLite file is
    /// opened read-only. `None` for an SQLite file that does not exist, which is not created.
    pub async fn connect_read_only(url: &str) -> Result<Option<AnyStore>, StoreError> {
        Ok(if postgres(url)? {
            Some(AnyStore::Postgres(PgStore::connect_read_only(url).await?))
        } else {
            SqliteStore::open_read_only(url)
                .await?
                .map(AnyStore::Sqlite)
        })
    }

    pub async fn connect(url: &str) -> Result<AnyStore, StoreError> {
        Ok(if postgres(url)? {
            AnyStore::Postgres(PgStore::connect(url).await?)
        } else {
            AnyStore::Sqlite(SqliteStore::connect(url).await?)
        })
    }
}

/// Whether `url` names a Postgres database (or else an SQLite file).
fn postgres(url: &str) -> Result<bool, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(true)
    } else if url.starts_with("sqlite:") {
        Ok(false)
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}

/// Run `$body` with `$store` bound to the concrete backend, so generic code is monomorphised
/// once per backend instead of going through a boxed trait object.
#[macro_export]
macro_rules! with_store {
    ($any:expr, $store:ident => $body:expr) => {
        match $any {
            $crate::store::AnyStore::Postgres($store) => $body,
            $crate::store::AnyStore::Sqlite($store) => $body,
        }
    };
}

/// One `load` row, the same for both backends.
#[derive(sqlx::FromRow)]
struct LoadRow {
    kind: String,
    id: String,
    name: Option<String>,
    project: Option<String>,
    path: Option<String>,
    spec_hash: Option<String>,
    generation: i64,
    status_message: Option<String>,
    pruned: bool,
}

#[derive(sqlx::FromRow)]
struct CursorRow {
    revision: Option<String>,
    tree_oid: Option<String>,
    errors: sqlx::types::Json<Vec<Diagnostic>>,
}

/// A task of `agentops status` and the project it belongs to.
#[derive(sqlx::FromRow)]
struct TaskRow {
    project: String,
    #[sqlx(flatten)]
    task: TaskStatus,
}

fn current_from(rows: Vec<LoadRow>, cursor: Option<CursorRow>) -> Result<Current, StoreError> {
    use crate::reconcile::plan::{CurrentObject, Cursor, SpecHash};
    use agentops_specs::ObjectKey;

    let mut current = Current::default();
    current.objects.reserve(rows.len());
    for row in rows {
        let id = row
            .id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("id `{}` is not a uuid", row.id)))?;
        // Rows of the compatible API have no Git name; the reconciler does not own them.
        let Some(name) = row.name else { continue };
        let key = match (row.kind.as_str(), row.project) {
            ("project", _) => ObjectKey::Project(name),
            ("task", Some(project)) => ObjectKey::Task { project, name },
            ("agent", _) => ObjectKey::Agent(name),
            ("tool", _) => ObjectKey::Tool(name),
            (kind, _) => return Err(StoreError::Corrupt(format!("unknown kind `{kind}`"))),
        };
        current.objects.insert(
            key,
            CurrentObject {
                id,
                path: row.path.map(Arc::from),
                spec_hash: row.spec_hash.as_deref().and_then(SpecHash::parse),
                generation: row.generation,
                status_message: row.status_message,
                pruned: row.pruned,
            },
        );
    }
    current.cursor = cursor.and_then(|c| {
        Some(Cursor {
            revision: c.revision?,
            tree: c.tree_oid?,
            errors: c.errors.0,
        })
    });
    Ok(current)
}

fn status_from(mut out: Vec<ProjectStatus>, tasks: Vec<TaskRow>) -> Vec<ProjectStatus> {
    let index: std::collections::HashMap<String, usize> = out
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.clone(), i))
        .collect();
    for t in tasks {
        if let Some(&i) = index.get(&t.project) {
            out[i].tasks.push(t.task);
        }
    }
    out
}
