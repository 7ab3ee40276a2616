//! Migrations: a SQLite database made by the runner that preceded sqlx's migrator is upgraded in
//! place, keeping its data; a migration whose file changed after it ran is refused.

use sqlx::{Connection as _, Row, SqliteConnection, sqlite::SqliteConnectOptions};

use fleetrun_store::{Database, Store, StoreError, scratch::TestDatabase};

/// The migrations as the old runner applied them: each file's SQL, then its number in
/// `schema_migration`.
const OLD_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_callbacks.sql")),
    (3, include_str!("../migrations/sqlite/0003_scripts.sql")),
    (4, include_str!("../migrations/sqlite/0004_inventory.sql")),
    (5, include_str!("../migrations/sqlite/0005_agent_trust.sql")),
    (6, include_str!("../migrations/sqlite/0006_write_probe.sql")),
];

async fn connect(path: &std::path::Path) -> SqliteConnection {
    SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
    .await
    .unwrap()
}

/// Builds a database the way the old runner did, with the first `applied` migrations, and a
/// host registered in it.
async fn old_database(path: &std::path::Path, applied: usize) {
    let mut db = connect(path).await;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migration (version INTEGER PRIMARY KEY)")
        .execute(&mut db)
        .await
        .unwrap();
    for (version, sql) in &OLD_MIGRATIONS[..applied] {
        sqlx::raw_sql(sql).execute(&mut db).await.unwrap();
        sqlx::query("INSERT INTO schema_migration (version) VALUES (?)")
            .bind(version)
            .execute(&mut db)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO host (agent_id, bk_cloud_id, ip, hostname, os_type, agent_version, online, last_seen)
         VALUES ('old-agent', 0, '10.0.0.9', 'old', 'linux', '0.1', 0, 42)",
    )
    .execute(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
}

async fn recorded(path: &std::path::Path) -> (Vec<i64>, bool) {
    let mut db = connect(path).await;
    let versions =
        sqlx::query("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut db)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    let old_table = sqlx::query("SELECT 1 FROM sqlite_master WHERE name = 'schema_migration'")
        .fetch_optional(&mut db)
        .await
        .unwrap()
        .is_some();
    (versions, old_table)
}

#[tokio::test]
async fn a_database_of_the_old_runner_is_adopted_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    for applied in [OLD_MIGRATIONS.len(), 4] {
        let path = dir.path().join(format!("old-{applied}.sqlite"));
        old_database(&path, applied).await;
        let store = Store::open(&path).await.unwrap();
        let hosts = store.hosts().await.unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            (hosts[0].agent_id.as_str(), hosts[0].last_seen),
            ("old-agent", 42)
        );
        // Migration 5's column and 6's table are there whether the old runner applied them or
        // sqlx did.
        assert_eq!(hosts[0].address_since, 0);
        assert!(store.health().is_writable());
        store.flush().await.unwrap();
        drop(store);
        // Every migration of this release is recorded: the adopted ones and those sqlx ran.
        let (versions, old_table) = recorded(&path).await;
        assert!(!old_table, "{applied}");
        assert_eq!(versions.first(), Some(&1), "{applied}");
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{applied}");
        assert!(versions.len() >= 9, "{versions:?} {applied}");
        // A second open finds everything recorded, with matching checksums.
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.hosts().await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn a_database_of_a_newer_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.sqlite");
    old_database(&path, OLD_MIGRATIONS.len()).await;
    let mut db = connect(&path).await;
    sqlx::query("INSERT INTO schema_migration (version) VALUES (9999)")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    let refused = Store::open(&path).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::Migrate(_)) && refused.to_string().contains("9999"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_migration_changed_after_it_ran_is_refused() {
    let db = TestDatabase::create("changed_migration").await.unwrap();
    drop(Store::open_database(db.database()).await.unwrap());
    // As if migration 3's file had been edited since: its recorded checksum no longer matches.
    let sql = "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 3";
    match db.database() {
        Database::Sqlite(path) => {
            let mut conn = connect(path).await;
            sqlx::query(sql)
                .bind(vec![0u8; 48])
                .execute(&mut conn)
                .await
                .unwrap();
        }
        Database::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query(sql)
                .bind(vec![0u8; 48])
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    let refused = Store::open_database(db.database()).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("previously applied but has been modified"),
        "{refused}"
    );
}
