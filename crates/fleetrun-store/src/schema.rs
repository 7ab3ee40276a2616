//! Schema migrations, one list for both dialects, run by sqlx's migrator at open.
//!
//! Each migration has a number and a file in `migrations/sqlite` and in `migrations/postgres`;
//! sqlx records every applied one with its checksum in `_sqlx_migrations`, refuses to start on a
//! database whose applied migration no longer matches its file, and applies every listed one not
//! recorded yet (numbers are handed out before the changes that need them land, so one may
//! arrive below another). On PostgreSQL it holds an advisory lock meanwhile, so controllers
//! starting together migrate once.
//!
//! SQLite databases made before sqlx ran the migrations recorded them in `schema_migration`;
//! they are adopted into `_sqlx_migrations` at the first open.

use std::{borrow::Cow, future::Future, pin::Pin};

use sqlx::{
    Connection as _, Row,
    error::BoxDynError,
    migrate::{Migrate, MigrateError, Migration, MigrationSource, MigrationType, Migrator},
};

use crate::backend::Dialect;

/// Every migration: its number, its description, and its SQL in each dialect.
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "callbacks",
        include_str!("../migrations/sqlite/0002_callbacks.sql"),
        include_str!("../migrations/postgres/0002_callbacks.sql"),
    ),
    (
        3,
        "scripts",
        include_str!("../migrations/sqlite/0003_scripts.sql"),
        include_str!("../migrations/postgres/0003_scripts.sql"),
    ),
    (
        4,
        "inventory",
        include_str!("../migrations/sqlite/0004_inventory.sql"),
        include_str!("../migrations/postgres/0004_inventory.sql"),
    ),
    (
        5,
        "agent trust",
        include_str!("../migrations/sqlite/0005_agent_trust.sql"),
        include_str!("../migrations/postgres/0005_agent_trust.sql"),
    ),
    (
        6,
        "write probe",
        include_str!("../migrations/sqlite/0006_write_probe.sql"),
        include_str!("../migrations/postgres/0006_write_probe.sql"),
    ),
    (
        7,
        "host task",
        include_str!("../migrations/sqlite/0007_host_task.sql"),
        include_str!("../migrations/postgres/0007_host_task.sql"),
    ),
    (
        8,
        "audit",
        include_str!("../migrations/sqlite/0008_audit.sql"),
        include_str!("../migrations/postgres/0008_audit.sql"),
    ),
    (
        9,
        "agent timeout status",
        include_str!("../migrations/sqlite/0009_agent_timeout_status.sql"),
        include_str!("../migrations/postgres/0009_agent_timeout_status.sql"),
    ),
    (
        10,
        "rolling",
        include_str!("../migrations/sqlite/0010_rolling.sql"),
        include_str!("../migrations/postgres/0010_rolling.sql"),
    ),
    (
        11,
        "dangerous rules",
        include_str!("../migrations/sqlite/0011_dangerous_rules.sql"),
        include_str!("../migrations/postgres/0011_dangerous_rules.sql"),
    ),
    (
        12,
        "enrollment",
        include_str!("../migrations/sqlite/0012_enrollment.sql"),
        include_str!("../migrations/postgres/0012_enrollment.sql"),
    ),
    (
        13,
        "file log",
        include_str!("../migrations/sqlite/0013_file_log.sql"),
        include_str!("../migrations/postgres/0013_file_log.sql"),
    ),
    (
        14,
        "execute count",
        include_str!("../migrations/sqlite/0014_execute_count.sql"),
        include_str!("../migrations/postgres/0014_execute_count.sql"),
    ),
    (
        15,
        "audit key marker",
        include_str!("../migrations/sqlite/0015_audit_key_marker.sql"),
        include_str!("../migrations/postgres/0015_audit_key_marker.sql"),
    ),
    (
        16,
        "cluster",
        include_str!("../migrations/sqlite/0016_cluster.sql"),
        include_str!("../migrations/postgres/0016_cluster.sql"),
    ),
    (
        18,
        "handover",
        include_str!("../migrations/sqlite/0018_handover.sql"),
        include_str!("../migrations/postgres/0018_handover.sql"),
    ),
    (
        20,
        "host epoch",
        include_str!("../migrations/sqlite/0020_host_epoch.sql"),
        include_str!("../migrations/postgres/0020_host_epoch.sql"),
    ),
];

/// The migrations of one dialect, as sqlx's migrator takes them.
#[derive(Debug)]
struct Embedded(Dialect);

type Resolved = Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send>>;

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> Resolved {
        Box::pin(async move { Ok(migrations(self.0)) })
    }
}

fn migrations(dialect: Dialect) -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .map(|&(version, description, sqlite, postgres)| {
            let sql = match dialect {
                Dialect::Sqlite => sqlite,
                Dialect::Postgres => postgres,
            };
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect()
}

async fn migrator(dialect: Dialect) -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(dialect)).await
}

/// Brings a SQLite database's schema up to date.
pub(crate) async fn migrate_sqlite(
    connection: &mut sqlx::SqliteConnection,
) -> Result<(), MigrateError> {
    let migrator = migrator(Dialect::Sqlite).await?;
    adopt_hand_made_record(connection, &migrator).await?;
    migrator.run(connection).await
}

/// Brings a PostgreSQL database's schema up to date.
pub(crate) async fn migrate_postgres(
    connection: &mut sqlx::PgConnection,
) -> Result<(), MigrateError> {
    migrator(Dialect::Postgres).await?.run(connection).await
}

/// Moves the record of a database migrated by the runner that preceded sqlx's (the table
/// `schema_migration`, versions only) into sqlx's table, with the checksums of the files those
/// versions ran, in one transaction.
async fn adopt_hand_made_record(
    connection: &mut sqlx::SqliteConnection,
    migrator: &Migrator,
) -> Result<(), MigrateError> {
    let old_record: Option<String> = sqlx::query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migration'",
    )
    .fetch_optional(&mut *connection)
    .await?
    .map(|row| row.get(0));
    if old_record.is_none() {
        return Ok(());
    }
    connection.ensure_migrations_table().await?;
    let mut tx = connection.begin().await?;
    let recorded: Vec<i64> = sqlx::query("SELECT version FROM schema_migration ORDER BY version")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for version in recorded {
        let Some(migration) = migrator.iter().find(|m| m.version == version) else {
            // A newer release's migration: this release cannot vouch for it.
            return Err(MigrateError::VersionMissing(version));
        };
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ($1, $2, TRUE, $3, 0) ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(&*migration.description)
        .bind(&*migration.checksum)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DROP TABLE schema_migration")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!("adopted the database's migration record into sqlx's");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in the migration directories is listed, under its number, in both dialects: a
    /// file added without its twin or its line would otherwise never run.
    #[test]
    fn every_migration_file_is_listed_in_both_dialects() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for dialect in ["sqlite", "postgres"] {
            let mut files: Vec<String> = std::fs::read_dir(dir.join(dialect))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            files.sort();
            let numbers: Vec<i64> = files
                .iter()
                .map(|f| f.split('_').next().unwrap().parse().unwrap())
                .collect();
            let listed: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
            assert_eq!(numbers, listed, "migrations/{dialect}: {files:?}");
        }
    }
}
