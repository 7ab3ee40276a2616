//! Databases of their own for tests and local clusters: a fresh PostgreSQL database on a
//! server, dropped (with whatever is still connected to it) when its handle goes; or a SQLite
//! file in a directory of its own.
//!
//! Tests pick the backend with `FLEETRUN_TEST_DATABASE`: unset (or `sqlite`) for SQLite, or a
//! PostgreSQL server's URL (`postgres://postgres@127.0.0.1:5432`) for a database on it per test.

use std::{
    str::FromStr,
    sync::atomic::{AtomicU32, Ordering},
};

use sqlx::{ConnectOptions as _, Connection as _, postgres::PgConnectOptions};

use crate::{Database, StoreError};

/// The environment variable that names the tests' backend.
pub const TEST_DATABASE_VARIABLE: &str = "FLEETRUN_TEST_DATABASE";

/// The PostgreSQL server the tests use, if `FLEETRUN_TEST_DATABASE` names one.
///
/// # Panics
/// When the variable holds something else than `sqlite` or a PostgreSQL URL: a typo must not
/// quietly run the tests against SQLite.
pub fn test_postgres_server() -> Option<String> {
    let value = std::env::var(TEST_DATABASE_VARIABLE).ok()?;
    match value.as_str() {
        "" | "sqlite" => None,
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Some(url.to_owned())
        }
        other => {
            panic!("{TEST_DATABASE_VARIABLE}={other:?}: expected `sqlite` or a postgres:// URL")
        }
    }
}

/// A PostgreSQL database created for one test or cluster; dropped when this is dropped.
#[derive(Debug)]
pub struct ScratchDatabase {
    server: PgConnectOptions,
    name: String,
    url: String,
    database: Database,
}

static CREATED: AtomicU32 = AtomicU32::new(0);

impl ScratchDatabase {
    /// Creates an empty database named `<prefix>_<pid>_<n>_<time>` on the server at
    /// `server_url` (whose own database, if it names one, is only used to connect).
    pub async fn create(server_url: &str, prefix: &str) -> Result<Self, StoreError> {
        let server = PgConnectOptions::from_str(server_url)?.database("postgres");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "{prefix}_{}_{}_{nanos}",
            std::process::id(),
            CREATED.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = server.connect().await?;
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let url = server.clone().database(&name).to_url_lossy().to_string();
        Ok(Self {
            server,
            name,
            database: Database::Postgres(url.clone()),
            url,
        })
    }

    /// The database, as the store and the controller's `database` setting take it.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name on its server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the database refuse writes, or take them again, for every session: new sessions
    /// read the setting, and those open (a controller's pool) are ended, so that they reconnect
    /// and read it too. What a server that turns read-only (a standby after a failover) does to
    /// a controller.
    pub async fn set_read_only(&self, read_only: bool) -> Result<(), StoreError> {
        let name = &self.name;
        let mut admin = self.server.connect().await?;
        sqlx::raw_sql(&format!(
            "ALTER DATABASE \"{name}\" SET default_transaction_read_only = {}",
            if read_only { "on" } else { "off" }
        ))
        .execute(&mut admin)
        .await?;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(())
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = std::mem::take(&mut self.name);
        // Drop may run inside a runtime or outside any: a thread with a runtime of its own
        // works in both.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = server.connect().await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(database = %self.database, %error, "could not drop a scratch database");
            }
            Err(_) => {
                tracing::warn!(database = %self.database, "dropping a scratch database panicked")
            }
        }
    }
}

/// A database for one test: a [`ScratchDatabase`] when `FLEETRUN_TEST_DATABASE` names a
/// PostgreSQL server, else a SQLite file in a temporary directory. Both go when this is dropped.
#[derive(Debug)]
pub enum TestDatabase {
    Sqlite {
        dir: std::path::PathBuf,
        database: Database,
    },
    Postgres(Box<ScratchDatabase>),
}

impl TestDatabase {
    /// A fresh database of the backend the tests run against; `prefix` names it (the test).
    pub async fn create(prefix: &str) -> Result<Self, StoreError> {
        match test_postgres_server() {
            Some(server) => Ok(Self::Postgres(Box::new(
                ScratchDatabase::create(&server, prefix).await?,
            ))),
            None => {
                let dir = std::env::temp_dir().join(format!(
                    "fleetrun-store-{}-{}-{}",
                    std::process::id(),
                    CREATED.fetch_add(1, Ordering::Relaxed),
                    prefix
                ));
                let path = dir.join("db.sqlite");
                Ok(Self::Sqlite {
                    dir,
                    database: Database::Sqlite(path),
                })
            }
        }
    }

    pub fn database(&self) -> &Database {
        match self {
            Self::Sqlite { database, .. } => database,
            Self::Postgres(scratch) => scratch.database(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Self::Sqlite { dir, .. } = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
