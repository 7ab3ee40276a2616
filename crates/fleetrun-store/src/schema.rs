//! Schema migrations, applied in order at open; each runs once, in its own transaction.

use sqlx::{Row, SqlitePool};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_callbacks.sql")),
    (3, include_str!("../migrations/0003_scripts.sql")),
    (4, include_str!("../migrations/0004_inventory.sql")),
    (5, include_str!("../migrations/0005_agent_trust.sql")),
    (6, include_str!("../migrations/0006_write_probe.sql")),
    (7, include_str!("../migrations/0007_host_task.sql")),
];

pub(crate) async fn migrate(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migration (version INTEGER PRIMARY KEY)")
        .execute(pool)
        .await?;
    // Every migration not recorded yet, not just those above the highest: numbers are handed
    // out before the changes that need them land, so one may arrive below another.
    let applied: std::collections::HashSet<i64> =
        sqlx::query("SELECT version FROM schema_migration")
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migration (version) VALUES (?)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}
