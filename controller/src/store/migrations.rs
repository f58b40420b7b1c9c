//! Migrations whose text changed after they shipped, in comments only.
//!
//! sqlx records a SHA-384 of each migration it applied and refuses to start ("migration 1 was
//! previously applied but has been modified") when the file no longer matches. A comment edit
//! does not change the schema, so a database that recorded the earlier text is brought up to
//! date by replacing that one checksum, and only when it is exactly the earlier one: any other
//! mismatch is a real change and still stops the migration.

use sqlx::migrate::Migrator;

use super::db::{Backend, args, rows_on, run_on};
use super::{StoreError, query_error};

/// One migration's checksum as released before its comments were reworded.
pub struct Reworded {
    pub version: i64,
    pub released_sha384: &'static str,
}

pub(crate) const POSTGRES_REWORDED: &[Reworded] = &[Reworded {
    version: 1,
    released_sha384: "7b64ff4450dba1837b5eb4706b1fcd85be1f1606c5cb9f3cf59e7f7d49bb69911aec279e937d8d573b98705413441a65",
}];

pub(crate) const SQLITE_REWORDED: &[Reworded] = &[Reworded {
    version: 1,
    released_sha384: "5c0e2ef85bd29d67cd713a6f87010bfe615b4f69689e6980b01b822cf2dbf506afbcf7a8850f60e765f2a3d6998477d9",
}];

/// The checksum updates to run: (version, released checksum, current checksum).
pub(crate) fn checksum_updates(
    migrator: &Migrator,
    reworded: &[Reworded],
) -> Vec<(i64, Vec<u8>, Vec<u8>)> {
    reworded
        .iter()
        .filter_map(|entry| {
            let current = migrator.iter().find(|m| m.version == entry.version)?;
            let released = hex::decode(entry.released_sha384).expect("a constant hex checksum");
            (released != current.checksum.as_ref())
                .then(|| (entry.version, released, current.checksum.to_vec()))
        })
        .collect()
}

pub(crate) async fn repair<B: Backend>(
    pool: &sqlx::Pool<B>,
    migrator: &Migrator,
    reworded: &[Reworded],
) -> Result<(), StoreError> {
    let sql = &super::sql::Sql::of(B::DIALECT)
        .as_ref()
        .map_err(|e| StoreError::Statement(e.clone()))?
        .core;
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_error("connecting to the database"))?;
    let recorded: Vec<(bool,)> = rows_on::<B, _>(
        &mut conn,
        &sql.has_migrations,
        args![],
        "looking for applied migrations",
    )
    .await?;
    if !recorded.first().is_some_and(|(b,)| *b) {
        return Ok(());
    }
    for (version, released, current) in checksum_updates(migrator, reworded) {
        let args = args![&current[..], version, &released[..]];
        let doing = "recording a reworded migration's checksum";
        run_on::<B>(&mut conn, &sql.reword_migration, args, doing).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reworded_migration_exists_and_differs_from_its_released_text() {
        for (migrator, reworded) in [
            (sqlx::Postgres::MIGRATOR, POSTGRES_REWORDED),
            (sqlx::Sqlite::MIGRATOR, SQLITE_REWORDED),
        ] {
            assert_eq!(
                checksum_updates(&migrator, reworded).len(),
                reworded.len(),
                "a reworded migration is missing or back at its released text"
            );
        }
    }
}
