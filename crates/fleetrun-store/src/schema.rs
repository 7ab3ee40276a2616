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
    (
        21,
        "audit rowid",
        include_str!("../migrations/sqlite/0021_audit_rowid.sql"),
        include_str!("../migrations/postgres/0021_audit_rowid.sql"),
    ),
    (
        22,
        "canonical scope ids",
        include_str!("../migrations/sqlite/0022_canonical_scope_ids.sql"),
        include_str!("../migrations/postgres/0022_canonical_scope_ids.sql"),
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

    /// Migration 21 rebuilds SQLite's audit table around its number: every entry written before
    /// it reads back the same, field for field, and the table is left with no index besides its
    /// row ids (the number is the row id).
    #[tokio::test]
    async fn the_audit_trail_reads_back_the_same_after_its_table_is_rebuilt() {
        use sqlx::ConnectOptions as _;
        let dir = tempfile::tempdir().unwrap();
        let mut connection = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("store.db"))
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        let mut before = migrator(Dialect::Sqlite).await.unwrap();
        before.migrations = before
            .migrations
            .iter()
            .filter(|m| m.version < 21)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        before.run(&mut connection).await.unwrap();
        for seq in 1..=3_i64 {
            sqlx::query(
                "INSERT INTO audit_log (seq, at, app_code, operator, source, request_id, api, \
                 change, outcome_code, outcome, prev_hash, hash) \
                 VALUES ($1, $2, 'app', 'op', '127.0.0.1', $3, 'fast_execute_script', \
                 '{\"a\":1}', $4, 'ok', $5, $6)",
            )
            .bind(seq)
            .bind(1_700_000_000_000 + seq)
            .bind(format!("req-{seq}"))
            .bind(seq - 1)
            .bind(format!("hash-{}", seq - 1))
            .bind(format!("hash-{seq}"))
            .execute(&mut connection)
            .await
            .unwrap();
        }
        async fn rows(connection: &mut sqlx::SqliteConnection) -> Vec<Vec<String>> {
            sqlx::query("SELECT * FROM audit_log ORDER BY seq")
                .fetch_all(connection)
                .await
                .unwrap()
                .iter()
                .map(|row| {
                    (0..row.len())
                        .map(|i| {
                            row.try_get::<String, _>(i)
                                .or_else(|_| row.try_get::<i64, _>(i).map(|n| n.to_string()))
                                .unwrap()
                        })
                        .collect()
                })
                .collect()
        }
        let written = rows(&mut connection).await;
        assert_eq!(written.len(), 3);

        migrate_sqlite(&mut connection).await.unwrap();
        assert_eq!(rows(&mut connection).await, written);
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_log'",
        )
        .fetch_all(&mut connection)
        .await
        .unwrap();
        assert_eq!(indexes, Vec::<String>::new());
        let rowid: i64 = sqlx::query_scalar("SELECT rowid FROM audit_log WHERE seq = 2")
            .fetch_one(&mut connection)
            .await
            .unwrap();
        assert_eq!(rowid, 2);
    }

    /// Migration 22 writes stored scope ids as numbers write them: leading zeros go (all zeros
    /// leave `"0"`), in the script library and in jobs; any other text stays as it is.
    #[tokio::test]
    async fn scope_ids_stored_with_leading_zeros_are_written_as_numbers() {
        let (_db, store) = crate::test_store().await;
        let cases = [
            ("02", "2"),
            ("0010", "10"),
            ("000", "0"),
            ("0", "0"),
            ("2", "2"),
            ("0x2", "0x2"),
            ("a02", "a02"),
        ];
        for (i, (stored, _)) in cases.iter().enumerate() {
            sqlx::query(
                "INSERT INTO script (script_id, bk_scope_type, bk_scope_id, name, \
                 script_language, creator, create_time, last_modify_user, last_modify_time) \
                 VALUES ($1, 'biz', $2, 'n', 1, 'c', 0, 'c', 0)",
            )
            .bind(format!("script-{i}"))
            .bind(*stored)
            .execute(&store.pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO job_instance (job_instance_id, name, operator, app_code, \
                 bk_scope_type, bk_scope_id, status, type, launch_mode, create_time) \
                 VALUES ($1, 'n', 'o', 'a', 'biz', $2, 3, 0, 1, 0)",
            )
            .bind(i as i64 + 1)
            .bind(*stored)
            .execute(&store.pool)
            .await
            .unwrap();
        }
        let &(_, _, sqlite, postgres) = MIGRATIONS.iter().find(|m| m.0 == 22).unwrap();
        let sql = match store.dialect {
            Dialect::Sqlite => sqlite,
            Dialect::Postgres => postgres,
        };
        sqlx::raw_sql(sql).execute(&store.pool).await.unwrap();
        for (i, (stored, written)) in cases.iter().enumerate() {
            let script: String =
                sqlx::query_scalar("SELECT bk_scope_id FROM script WHERE script_id = $1")
                    .bind(format!("script-{i}"))
                    .fetch_one(&store.pool)
                    .await
                    .unwrap();
            let job: String = sqlx::query_scalar(
                "SELECT bk_scope_id FROM job_instance WHERE job_instance_id = $1",
            )
            .bind(i as i64 + 1)
            .fetch_one(&store.pool)
            .await
            .unwrap();
            assert_eq!(
                (script.as_str(), job.as_str()),
                (*written, *written),
                "{stored:?}"
            );
        }
    }
}
