//! Online backup and offline restore of the SQLite database.
//!
//! A backup is `VACUUM INTO` from a read-only connection: one read transaction, so the copy is a
//! consistent snapshot of the committed state while the controller goes on writing, compacted,
//! without its `-wal`. A restore puts such a copy in place of a stopped controller's database.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{Connection as _, Row, SqliteConnection, sqlite::SqliteConnectOptions};

use crate::StoreError;

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::File {
        path: path.to_owned(),
        source,
    }
}

/// The database at `path` answered an integrity check with problems.
fn damaged(path: &Path, problems: &str) -> StoreError {
    StoreError::File {
        path: path.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("integrity check failed: {problems}"),
        ),
    }
}

async fn connect(path: &Path, read_only: bool) -> Result<SqliteConnection, StoreError> {
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .read_only(read_only)
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(30));
    Ok(SqliteConnection::connect_with(&options).await?)
}

/// `PRAGMA integrity_check` on the file at `path`: an error unless it says `ok`.
pub async fn check_database(path: &Path) -> Result<(), StoreError> {
    let mut db = connect(path, true).await?;
    let rows = sqlx::query("PRAGMA integrity_check")
        .fetch_all(&mut db)
        .await?;
    db.close().await?;
    let said: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
    if said != ["ok"] {
        return Err(damaged(path, &said.join("; ")));
    }
    Ok(())
}

/// Writes a consistent copy of the database at `database` (in use or not) to `dest`, which
/// must not exist; the copy is readable by its owner only and checked before this returns.
pub async fn backup_database(database: &Path, dest: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    if dest.exists() {
        return Err(file_error(dest)(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists",
        )));
    }
    let mut db = connect(database, true).await?;
    let dest_text = dest.to_str().ok_or_else(|| {
        file_error(dest)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not UTF-8",
        ))
    })?;
    sqlx::query("VACUUM INTO $1")
        .bind(dest_text)
        .execute(&mut db)
        .await?;
    db.close().await?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o600))
        .map_err(file_error(dest))?;
    check_database(dest).await
}

/// Puts the backup at `backup` in place of the database at `database`, whose controller must
/// be stopped: the backup is checked, copied beside the database, synced, and renamed over it,
/// and the old database's `-wal` and `-shm` are removed (they belong to the replaced file).
pub async fn restore_database(backup: &Path, database: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    check_database(backup).await?;
    if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(file_error(dir))?;
    }
    let mut staging = database.as_os_str().to_owned();
    staging.push(".restoring");
    let staging = std::path::PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    {
        let mut from = std::fs::File::open(backup).map_err(file_error(backup))?;
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)
            .map_err(file_error(&staging))?;
        std::io::copy(&mut from, &mut to).map_err(file_error(&staging))?;
        to.sync_all().map_err(file_error(&staging))?;
    }
    for suffix in ["-wal", "-shm"] {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(Path::new(&name))(e)),
        }
    }
    std::fs::rename(&staging, database).map_err(file_error(database))?;
    // The restored file opens and has a schema.
    let mut db = connect(database, false).await?;
    sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut db)
        .await?;
    db.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backup_restores_over_a_changed_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = crate::Store::open(&db).await.unwrap();
        store.set_all_offline().await.unwrap();
        let copy = dir.path().join("copy.sqlite");
        backup_database(&db, &copy).await.unwrap();
        assert!(
            backup_database(&db, &copy).await.is_err(),
            "never overwrites"
        );
        drop(store);
        std::fs::write(&db, b"not a database any more").unwrap();
        restore_database(&copy, &db).await.unwrap();
        check_database(&db).await.unwrap();
        crate::Store::open(&db).await.unwrap();
    }

    #[tokio::test]
    async fn a_damaged_backup_is_refused_and_the_database_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        crate::Store::open(&db).await.unwrap();
        let bad = dir.path().join("bad.sqlite");
        std::fs::write(&bad, b"garbage").unwrap();
        assert!(restore_database(&bad, &db).await.is_err());
        check_database(&db).await.unwrap();
    }
}
