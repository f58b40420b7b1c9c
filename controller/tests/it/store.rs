//! The store's two engines against each other: the same schema after migrating, and every
//! statement the store runs accepted by the engine it is spelled for.

use crate::common;

use agentops::store::{PgStore, SqliteStore, Store};
use common::*;
use sqlx::{Executor, SqlSafeStr};

/// `table.column` of every table and view in column order, and the names of the views.
async fn schema(db: &TestDb) -> (Vec<String>, Vec<String>) {
    let (columns, views) = match db.backend {
        Backend::Postgres => (
            "SELECT c.table_name || '.' || c.column_name FROM information_schema.columns c \
             WHERE c.table_schema = 'public' ORDER BY c.table_name, c.ordinal_position",
            "SELECT table_name FROM information_schema.views WHERE table_schema = 'public' \
             ORDER BY table_name",
        ),
        Backend::Sqlite => (
            "SELECT m.name || '.' || p.name FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite_%' \
             ORDER BY m.name, p.cid",
            "SELECT name FROM sqlite_master WHERE type = 'view' ORDER BY name",
        ),
    };
    let names = |rows: Vec<(String,)>| rows.into_iter().map(|(name,)| name).collect();
    (names(db.rows(columns).await), names(db.rows(views).await))
}

#[tokio::test]
async fn both_engines_migrate_to_the_same_tables_columns_and_views() {
    let pg = TestDb::new(Backend::Postgres).await;
    PgStore::connect(&pg.url)
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let lite = TestDb::new(Backend::Sqlite).await;
    SqliteStore::connect(&lite.url)
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let (pg_columns, pg_views) = schema(&pg).await;
    let (lite_columns, lite_views) = schema(&lite).await;
    assert!(
        pg_columns.contains(&"tasks.run_lease".to_owned()),
        "{pg_columns:?}"
    );
    assert!(pg_columns.contains(&"active_tasks.review_comments".to_owned()));
    assert_eq!(
        pg_views,
        ["active_tasks", "agent_activity", "project_progress"]
    );
    assert_eq!(pg_columns, lite_columns);
    assert_eq!(pg_views, lite_views);
}

#[tokio::test]
async fn every_statement_prepares_on_its_engine() {
    let pg = TestDb::new(Backend::Postgres).await;
    let pg_store = PgStore::connect(&pg.url).await.unwrap();
    pg_store.migrate().await.unwrap();
    let lite = TestDb::new(Backend::Sqlite).await;
    let lite_store = SqliteStore::connect(&lite.url).await.unwrap();
    lite_store.migrate().await.unwrap();
    let mut failures = Vec::new();
    let statements = pg_store.statements();
    assert!(statements.len() > 60, "{} statements", statements.len());
    for (name, statement) in statements {
        if let Err(e) = pg_store.pool().prepare(statement.into_sql_str()).await {
            failures.push(format!("postgres {name}: {e}\n  {statement}"));
        }
    }
    let statements = lite_store.statements();
    assert_eq!(statements.len(), pg_store.statements().len());
    for (name, statement) in statements {
        if let Err(e) = lite_store.pool().prepare(statement.into_sql_str()).await {
            failures.push(format!("sqlite {name}: {e}\n  {statement}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
