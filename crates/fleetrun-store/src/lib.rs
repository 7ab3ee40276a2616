//! fleetrun's durable state in SQLite or PostgreSQL: hosts, jobs, steps, per-host results and
//! logs.
//!
//! One API over both: queries are written once in SQL both dialects read and run through sqlx's
//! `Any` driver (see [`Database`] and `backend.rs`).
//!
//! Reads go through a small connection pool. Writes from the job engine go through one writer
//! task ([`Store::record`]) that commits whatever has queued up in a single transaction (group
//! commit), so a job on thousands of hosts costs a handful of transactions, not one per event.
//! Creating a job ([`Store::create_job`]) is its own transaction: a job is stored whole or not at all.
//!
//! **Architecture invariant:** only this crate speaks SQL.

mod agent_trust;
mod audit;
mod backend;
mod backup;
mod callbacks;
mod cluster;
mod console;
mod dangerous_rules;
mod enroll;
mod fence;
mod files;
mod handover;
mod health;
mod inventory;
mod job_end;
mod model;
mod reattach;
mod retention;
mod retry;
mod rolling;
mod schema;
pub mod scratch;
mod scripts;
mod stats;
mod watch;
mod writer;

use std::path::Path;

use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

use backend::{Dialect, Statement};

pub use agent_trust::{AddressClaim, Revocation, Revoked};
pub use audit::{
    AuditFilter, AuditHasher, AuditKeyMarker, AuditRecord, NewAuditEntry, SharedAuditHasher,
};
pub use backend::{Database, DatabaseParseError};
pub use backup::{backup_database, check_database, restore_database};
pub use callbacks::{
    CallbackAttempt, CallbackDelivery, CallbackNext, CallbackStatus, NewCallbackDelivery,
};
pub use cluster::ControllerRecord;
pub use console::LogHead;
pub use dangerous_rules::{DangerousRule, DangerousRuleError, DangerousRuleFields};
pub use enroll::{Enrollment, JoinToken};
pub use fence::FIRST_EPOCH;
pub use files::FileLog;
pub use handover::Handover;
pub use health::Health;
pub use inventory::{
    InventoryCommitError, InventoryRevision, KEPT_INVENTORY_REVISIONS, NewInventoryRevision,
    RevisionInfo,
};
pub use model::*;
pub use reattach::{HostCheckpoint, ResumableHost, ResumableJob, StoredTask};
pub use retry::{Retried, RetryScope};
pub use rolling::{NewRolling, RollingRecord};
pub use scripts::{
    NewScript, ScriptBasics, ScriptFilter, ScriptRecord, ScriptVersionRecord, ScriptsError,
};
pub use stats::AgentCount;
pub use watch::JobWatch;
pub use writer::Write;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed the operation.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The database's schema could not be brought up to date.
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The writer task is gone (the store is shutting down).
    #[error("store writer stopped")]
    WriterStopped,
    /// Another controller uses the database.
    #[error("{0}")]
    InUse(String),
    /// The database file or its directory could not be prepared.
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the database refused to be written (a full disk, a read-only or failing file),
    /// rather than the request being wrong.
    pub fn is_write_failure(&self) -> bool {
        matches!(self, StoreError::Database(e) if health::is_write_failure(e))
    }
}

/// The name of a controller that was given none.
pub const DEFAULT_CONTROLLER: &str = "default";

/// Values bound per host when a job's hosts are stored.
const HOST_COLUMNS: usize = 5;

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    writes: mpsc::Sender<Write>,
    watchers: watch::Watchers,
    health: std::sync::Arc<health::HealthState>,
    /// On PostgreSQL, the session that holds the lock on the controller's name in the database
    /// for as long as the store lives (see [`backend::claim_sole_use`]).
    _sole_use: Option<std::sync::Arc<tokio::sync::Mutex<sqlx::PgConnection>>>,
    /// On PostgreSQL, the task waking followers on other controllers' commits
    /// ([`watch::listen`]).
    _listening: Option<std::sync::Arc<watch::Listening>>,
    /// On PostgreSQL with a `[cluster]` section, this store's name among those listening (its
    /// announcements carry it).
    member_id: Option<String>,
    /// The last audit entry the writer committed.
    audit_head: tokio::sync::watch::Receiver<writer::AuditHead>,
}

/// The database holds scripts, their output and callback URLs with their tokens: only the
/// controller's user may read it. SQLite gives the `-wal` and `-shm` files the database's mode.
const DATABASE_MODE: u32 = 0o600;
/// The directory the store creates for its database, when it has to.
const DIRECTORY_MODE: u32 = 0o700;

/// Creates the database's directory (0700) and the database file (0600) if missing, and takes
/// read access away from others on an existing database and its `-wal` and `-shm` files.
fn prepare_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let file_error = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::File { path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIRECTORY_MODE)
            .create(dir)
            .map_err(file_error(dir))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(DATABASE_MODE)
        .open(path)
        .map_err(file_error(path))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = Path::new(&name);
        match std::fs::metadata(file) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(DATABASE_MODE))
                    .map_err(file_error(file))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(file)(e)),
        }
    }
    Ok(())
}

/// Seals a step's parameter for the job and step it belongs to.
type ParamSeal<'a> = dyn FnOnce(&str, CreatedJob) -> String + Send + 'a;

impl Store {
    /// Opens (creating if needed, readable by its owner only) the SQLite database at `path` and
    /// brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_database(&Database::Sqlite(path.to_owned())).await
    }

    /// Opens a database and brings its schema up to date: a SQLite file is created if needed,
    /// readable by its owner only; a PostgreSQL database must exist. The controller is alone on
    /// it: a second store is refused while this one lives, and no commit is announced.
    pub async fn open_database(database: &Database) -> Result<Self, StoreError> {
        Self::open_with(database, None).await
    }

    /// [`Store::open_database`] for the cluster member called `controller` (a controller with a
    /// `[cluster]` section): on PostgreSQL, one live store per name and database (a second is
    /// refused while the first lives), none while a store opened alone lives, and commits are
    /// announced to the other members' followers.
    pub async fn open_as(database: &Database, controller: &str) -> Result<Self, StoreError> {
        Self::open_with(database, Some(controller)).await
    }

    async fn open_with(database: &Database, member: Option<&str>) -> Result<Self, StoreError> {
        if let Database::Sqlite(path) = database {
            prepare_files(path)?;
        }
        let sole_use = match database {
            Database::Postgres(url) => Some(std::sync::Arc::new(tokio::sync::Mutex::new(
                backend::claim_sole_use(url, member).await?,
            ))),
            Database::Sqlite(_) => None,
        };
        let (pool, dialect) = backend::connect(database).await?;
        let watchers = watch::Watchers::default();
        let health = health::HealthState::new();
        let shared = (member.is_some() && dialect == Dialect::Postgres).then(watch::store_id);
        let (audit_head_sender, audit_head) = tokio::sync::watch::channel(None);
        let writes = writer::spawn(
            pool.clone(),
            dialect,
            watchers.clone(),
            health.clone(),
            shared.clone(),
            audit_head_sender,
        );
        let listening = match (database, shared.clone()) {
            (Database::Postgres(url), Some(own)) => Some(std::sync::Arc::new(watch::Listening(
                watch::listen(url.clone(), watchers.clone(), own),
            ))),
            _ => None,
        };
        Ok(Self {
            pool,
            dialect,
            writes,
            watchers,
            health,
            _sole_use: sole_use,
            _listening: listening,
            member_id: shared,
            audit_head,
        })
    }

    /// Whether the database accepts writes, and what waits to be written.
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// Notes a failed write made outside the writer, so that [`Store::health`] says so and the
    /// writer probes until writes succeed again.
    fn noting_write_failure<T>(&self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        result.map_err(|e| {
            if health::is_write_failure(&e) {
                self.health.failed(&e);
                self.health.failed_elsewhere.notify_one();
            }
            StoreError::Database(e)
        })
    }

    /// Queues a write for the next group commit. Waits only when the queue is full.
    pub async fn record(&self, write: Write) -> Result<(), StoreError> {
        self.writes
            .send(write)
            .await
            .map_err(|_| StoreError::WriterStopped)
    }

    /// Returns once every write queued before this call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.record(Write::Flush(done)).await?;
        committed.await.map_err(|_| StoreError::WriterStopped)
    }

    /// The last audit entry ([`Write::Audit`]) the writer committed, number and hash; changes
    /// after each commit that appended to the trail. `None` until the first.
    pub fn committed_audit_head(&self) -> tokio::sync::watch::Receiver<Option<(i64, String)>> {
        self.audit_head.clone()
    }

    /// Follows a job: [`JobWatch::changed`] returns after the writer committed something of it.
    pub fn watch_job(&self, job_instance_id: i64, step_instance_id: i64) -> JobWatch {
        self.watchers.watch(job_instance_id, step_instance_id)
    }

    /// Records an agent's registration: creates the host at the first one, refreshes it after.
    /// A host keeps the time it began claiming its address (`address_since`) while the address
    /// stays the same. Where the host sits (business, modules) is the inventory's business, not the store's.
    pub async fn register_agent(&self, reg: &AgentRegistration) -> Result<HostRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO host (agent_id, bk_cloud_id, ip, hostname, os_type, agent_version, online, last_seen, address_since)
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $7)
             ON CONFLICT (agent_id) DO UPDATE SET
                 address_since = CASE WHEN host.bk_cloud_id = excluded.bk_cloud_id AND host.ip = excluded.ip
                                      THEN host.address_since ELSE excluded.address_since END,
                 bk_cloud_id = excluded.bk_cloud_id, ip = excluded.ip, hostname = excluded.hostname,
                 os_type = excluded.os_type, agent_version = excluded.agent_version,
                 online = 1, last_seen = excluded.last_seen
             RETURNING *",
        )
        .bind(&reg.agent_id)
        .bind(reg.bk_cloud_id)
        .bind(&reg.ip)
        .bind(&reg.hostname)
        .bind(&reg.os_type)
        .bind(&reg.agent_version)
        .bind(reg.now)
        .fetch_one(&self.pool)
        .await?;
        Ok(HostRecord::from_row(&row))
    }

    /// Marks a host's agent offline when the connection that registered at `registered_at` ends,
    /// unless a newer registration (a reconnection that raced the old connection's end) has
    /// marked it online since.
    pub async fn set_offline(
        &self,
        bk_host_id: i64,
        registered_at: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE host SET online = 0, last_seen = $1 WHERE bk_host_id = $2 AND last_seen <= $3",
        )
        .bind(now)
        .bind(bk_host_id)
        .bind(registered_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks every host offline: at start nobody is connected yet.
    pub async fn set_all_offline(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE host SET online = 0")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// All hosts, ordered by id.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM host ORDER BY bk_host_id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(HostRecord::from_row).collect())
    }

    /// Stores a new job with its step and a pending result per host, in one transaction.
    pub async fn create_job(&self, job: &NewJob) -> Result<CreatedJob, StoreError> {
        self.insert_job(job, None, None).await
    }

    /// [`Store::create_job`], with a sensitive step parameter stored as `seal` makes it from the
    /// clear `script_param` and the ids the job and step receive (to bind it to them). The step's
    /// row is written with an empty parameter first, then the sealed one, in the same
    /// transaction: the clear value never reaches the database.
    /// A rolling step's plan (`rolling`) is written in the same transaction: a job is never
    /// stored without the batches it must go out in.
    pub async fn create_job_sealing(
        &self,
        job: &NewJob,
        seal: impl FnOnce(&str, CreatedJob) -> String + Send,
        rolling: Option<&rolling::NewRolling>,
    ) -> Result<CreatedJob, StoreError> {
        let seal: Box<ParamSeal<'_>> = Box::new(seal);
        self.insert_job(job, job.step.is_param_sensitive.then_some(seal), rolling)
            .await
    }

    async fn insert_job(
        &self,
        job: &NewJob,
        seal: Option<Box<ParamSeal<'_>>>,
        rolling: Option<&rolling::NewRolling>,
    ) -> Result<CreatedJob, StoreError> {
        let created = async {
            let mut connection = self.pool.acquire().await?;
            let created = insert_job(&mut connection, job, seal, rolling, self.dialect).await;
            health::discard_if_broken(&mut connection, &created);
            created
        }
        .await;
        self.noting_write_failure(created)
    }

    /// Moves a job from `pending` to `running` (status values as the caller names them), once:
    /// of several concurrent calls, from this process or another sharing the database, exactly
    /// one gets `true`. The job's step follows.
    pub async fn claim_pending_job(
        &self,
        job_instance_id: i64,
        pending: i32,
        running: i32,
        now: i64,
    ) -> Result<bool, StoreError> {
        let claimed = async {
            let mut connection = self.pool.acquire().await?;
            let claimed = claim(&mut connection, job_instance_id, pending, running, now).await;
            health::discard_if_broken(&mut connection, &claimed);
            claimed
        }
        .await;
        self.noting_write_failure(claimed)
    }

    /// A job's status alone, or `None` if there is no such job: what a follower reads often.
    pub async fn job_status(&self, job_instance_id: i64) -> Result<Option<i32>, StoreError> {
        Ok(
            sqlx::query("SELECT status FROM job_instance WHERE job_instance_id = $1")
                .bind(job_instance_id)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.get(0)),
        )
    }

    /// A job with its steps, or `None` if there is no such job.
    pub async fn job(&self, job_instance_id: i64) -> Result<Option<JobRecord>, StoreError> {
        let Some(row) = sqlx::query("SELECT * FROM job_instance WHERE job_instance_id = $1")
            .bind(job_instance_id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let steps = sqlx::query(
            // Not the script (up to 16 MiB) nor its parameter: status reads are frequent.
            "SELECT step_instance_id, name, type, status, execute_count, script_language,
                    is_param_sensitive, timeout, account_id, account, create_time, start_time, end_time
             FROM step_instance WHERE job_instance_id = $1 ORDER BY step_instance_id",
        )
        .bind(job_instance_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(JobRecord::from_rows(&row, &steps)))
    }

    /// Jobs matching `filter`, newest first, with the total count before paging. Steps are not loaded.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<(i64, Vec<JobRecord>), StoreError> {
        fn conditions<'a>(q: &mut Statement<'a>, f: &'a JobFilter, dialect: Dialect) {
            q.push(" WHERE bk_scope_type = ")
                .push_bind(&f.bk_scope_type);
            q.push(" AND bk_scope_id = ").push_bind(&f.bk_scope_id);
            q.push(" AND create_time >= ")
                .push_bind(f.create_time_start);
            q.push(" AND create_time <= ").push_bind(f.create_time_end);
            if let Some(id) = f.job_instance_id {
                q.push(" AND job_instance_id = ").push_bind(id);
            }
            if let Some(operator) = &f.operator {
                q.push(" AND operator = ").push_bind(operator);
            }
            if let Some(name) = &f.name {
                q.push(" AND ");
                let at = q.bind(name);
                q.push(&dialect.contains("name", &at));
            }
            if let Some(mode) = f.launch_mode {
                q.push(" AND launch_mode = ").push_bind(mode);
            }
            if let Some(kind) = f.job_type {
                q.push(" AND type = ").push_bind(kind);
            }
            if let Some(status) = f.status {
                q.push(" AND status = ").push_bind(status);
            }
            if let Some(ip) = &f.ip {
                q.push(
                    " AND job_instance_id IN (SELECT s.job_instance_id FROM step_instance s \
                     JOIN host_result r ON r.step_instance_id = s.step_instance_id WHERE r.ip = ",
                )
                .push_bind(ip)
                .push(")");
            }
        }
        let mut count = Statement::new(self.dialect, "SELECT COUNT(*) FROM job_instance");
        conditions(&mut count, filter, self.dialect);
        let total: i64 = count.build().fetch_one(&self.pool).await?.get(0);
        let mut page = Statement::new(self.dialect, "SELECT * FROM job_instance");
        conditions(&mut page, filter, self.dialect);
        page.push(" ORDER BY job_instance_id DESC LIMIT ")
            .push_bind(filter.length)
            .push(" OFFSET ")
            .push_bind(filter.start);
        let rows = page.build().fetch_all(&self.pool).await?;
        Ok((
            total,
            rows.iter().map(|r| JobRecord::from_rows(r, &[])).collect(),
        ))
    }

    /// What a step runs: its script and its parameter as stored (sealed when sensitive).
    pub async fn step_payload(
        &self,
        step_instance_id: i64,
    ) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT script_content, script_param FROM step_instance WHERE step_instance_id = $1",
        )
        .bind(step_instance_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// The per-host results of a step, ordered by host id.
    pub async fn host_results(
        &self,
        step_instance_id: i64,
    ) -> Result<Vec<HostResultRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM host_result WHERE step_instance_id = $1 ORDER BY bk_host_id",
        )
        .bind(step_instance_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(HostResultRecord::from_row).collect())
    }

    /// A host's whole stored log for a step.
    pub async fn host_log(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
    ) -> Result<Vec<u8>, StoreError> {
        let rows = sqlx::query(
            "SELECT data FROM host_log WHERE step_instance_id = $1 AND bk_host_id = $2 ORDER BY \"offset\"",
        )
        .bind(step_instance_id)
        .bind(bk_host_id)
        .fetch_all(&self.pool)
        .await?;
        let mut log = Vec::new();
        for row in rows {
            log.extend_from_slice(row.get::<&[u8], _>(0));
        }
        Ok(log)
    }
}

/// Inserts a job, its step and a pending result per host, in one transaction.
async fn insert_job(
    connection: &mut sqlx::AnyConnection,
    job: &NewJob,
    seal: Option<Box<ParamSeal<'_>>>,
    rolling: Option<&rolling::NewRolling>,
    dialect: Dialect,
) -> Result<CreatedJob, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(connection).await?;
    let job_instance_id: i64 = sqlx::query(
        "INSERT INTO job_instance (name, operator, app_code, bk_scope_type, bk_scope_id, status, type, launch_mode, callback_url, create_time)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING job_instance_id",
    )
    .bind(&job.name)
    .bind(&job.operator)
    .bind(&job.app_code)
    .bind(&job.bk_scope_type)
    .bind(&job.bk_scope_id)
    .bind(job.status)
    .bind(job.job_type)
    .bind(job.launch_mode)
    .bind(&job.callback_url)
    .bind(job.create_time)
    .fetch_one(&mut *tx)
    .await?
    .get(0);
    let step = &job.step;
    let step_instance_id: i64 = sqlx::query(
        "INSERT INTO step_instance (job_instance_id, name, type, status, script_language, script_content, script_param,
             is_param_sensitive, timeout, account_id, account, create_time)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING step_instance_id",
    )
    .bind(job_instance_id)
    .bind(&step.name)
    .bind(step.step_type)
    .bind(job.status)
    .bind(step.script_language)
    .bind(&step.script_content)
    .bind(if seal.is_some() { "" } else { step.script_param.as_str() })
    .bind(i32::from(step.is_param_sensitive))
    .bind(step.timeout)
    .bind(step.account_id)
    .bind(&step.account)
    .bind(job.create_time)
    .fetch_one(&mut *tx)
    .await?
    .get(0);
    if let Some(seal) = seal {
        let ids = CreatedJob {
            job_instance_id,
            step_instance_id,
        };
        sqlx::query("UPDATE step_instance SET script_param = $1 WHERE step_instance_id = $2")
            .bind(seal(&step.script_param, ids))
            .bind(step_instance_id)
            .execute(&mut *tx)
            .await?;
    }
    // Many rows per statement, as many as the dialect's parameter limit allows: one statement
    // per host costs a round trip each, which is most of the time a job on thousands of hosts
    // takes to be accepted.
    for chunk in job.hosts.chunks(dialect.max_parameters() / HOST_COLUMNS) {
        let mut insert = Statement::new(
            dialect,
            "INSERT INTO host_result (step_instance_id, bk_host_id, bk_cloud_id, ip, status)",
        );
        insert.push_values(chunk, |row, host| {
            row.push_bind(step_instance_id)
                .push_bind(host.bk_host_id)
                .push_bind(host.bk_cloud_id)
                .push_bind(&host.ip)
                .push_bind(host.status);
        });
        insert.build().execute(&mut *tx).await?;
    }
    if let Some(plan) = rolling {
        rolling::insert_rolling(
            &mut tx,
            dialect,
            step_instance_id,
            &plan.config,
            &plan.batches,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(CreatedJob {
        job_instance_id,
        step_instance_id,
    })
}

/// Moves a pending job and its step to running, if it is still pending; whether it did.
async fn claim(
    connection: &mut sqlx::AnyConnection,
    job_instance_id: i64,
    pending: i32,
    running: i32,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(connection).await?;
    let claimed = sqlx::query(
        "UPDATE job_instance SET status = $1, start_time = $2
         WHERE job_instance_id = $3 AND status = $4 AND start_time IS NULL",
    )
    .bind(running)
    .bind(now)
    .bind(job_instance_id)
    .bind(pending)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        sqlx::query(
            "UPDATE step_instance SET status = $1 WHERE job_instance_id = $2 AND status = $3",
        )
        .bind(running)
        .bind(job_instance_id)
        .bind(pending)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(claimed)
}

/// `column IN (…)` for a list of ids of any length, at placeholder `$n` on PostgreSQL: there
/// one bound array read by `unnest`, so the server parses no list and the statement's text
/// stays the same and stays prepared (a controller following 5,000 hosts handed to another
/// asks about them every few hundred milliseconds); on SQLite the ids as text
/// ([`join_ids`]). Bound after every other value of the statement.
pub(crate) struct Ids {
    sql: String,
    array: Option<String>,
}

impl Ids {
    pub(crate) fn new(dialect: Dialect, column: &str, n: usize, ids: &[i64]) -> Self {
        match dialect {
            Dialect::Postgres => Self {
                sql: format!("{column} IN (SELECT unnest(${n}::int8[]))"),
                array: Some(backend::array_literal(ids)),
            },
            Dialect::Sqlite => Self {
                sql: format!("{column} IN ({})", join_ids(ids)),
                array: None,
            },
        }
    }

    pub(crate) fn sql(&self) -> &str {
        &self.sql
    }

    /// Binds the array (PostgreSQL), or marks the statement as one not to keep (SQLite: its
    /// text serves once).
    pub(crate) fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        match self.array {
            Some(array) => query.bind(array),
            None => query.persistent(false),
        }
    }
}

/// Ids as SQL text for an `IN (…)` list of any length (thousands of bound parameters cost more
/// than the text). A statement carrying them runs with `.persistent(false)`: its text serves
/// once, and kept prepared it would push reused statements out of the connection's cache.
fn join_ids(values: &[i64]) -> String {
    values
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `INSERT INTO table (…) VALUES (…) ON CONFLICT (key) DO UPDATE SET` every other column to
/// its new value: a row written whole, whether a row with its key stood or not. `columns` holds
/// each column with the SQL of its value (a placeholder or an expression), the key first.
fn upsert_row(table: &str, columns: &[(&str, &str)]) -> String {
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let values: Vec<&str> = columns.iter().map(|(_, value)| *value).collect();
    let updates: Vec<String> = names[1..]
        .iter()
        .map(|name| format!("{name} = excluded.{name}"))
        .collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
        names.join(", "),
        values.join(", "),
        names[0],
        updates.join(", ")
    )
}

fn join_ints(values: &[i32]) -> String {
    values
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A piece of a host's stored log, as [`Store::log_chunks_from`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub bk_host_id: i64,
    /// Where the chunk begins in the host's stored log.
    pub offset: i64,
    pub data: Vec<u8>,
}

impl Store {
    /// The chunks of a step's logs that hold bytes at or after a position, for the hosts in
    /// `positions` (`(bk_host_id, byte offset)`): at most `limit` chunks, in offset order for each
    /// host. A host's first chunk may begin before its position; the caller trims it.
    ///
    /// One query for all hosts, each an index seek, so a follower of many hosts pays one round
    /// trip per poll; `limit` bounds what one poll reads.
    pub async fn log_chunks_from(
        &self,
        step_instance_id: i64,
        positions: &[(i64, i64)],
        limit: i64,
    ) -> Result<Vec<LogChunk>, StoreError> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        // Each host's position is two bound values; a follower of more hosts than one statement
        // can carry asks in several.
        let per_statement = self.dialect.max_parameters() / 2 - 2;
        let mut rows = Vec::new();
        for wanted in positions.chunks(per_statement) {
            let remaining = limit - rows.len() as i64;
            if remaining <= 0 {
                break;
            }
            let mut query = Statement::new(self.dialect, "WITH wanted (bk_host_id, position) AS (");
            query.push_values(wanted, |row, (host, offset)| {
                row.push_bind(*host).push_bind(*offset);
            });
            // No ORDER BY: it would make SQLite read every pending chunk before applying the
            // limit. The join walks each host's primary-key range in offset order anyway.
            query.push(") SELECT l.bk_host_id, l.\"offset\", l.data FROM wanted w JOIN host_log l ON l.step_instance_id = ");
            query.push_bind(step_instance_id);
            query.push(
                " AND l.bk_host_id = w.bk_host_id
                 AND l.\"offset\" >= COALESCE((SELECT MAX(p.\"offset\") FROM host_log p
                     WHERE p.step_instance_id = l.step_instance_id AND p.bk_host_id = w.bk_host_id
                       AND p.\"offset\" <= w.position), 0)
                 AND l.\"offset\" + length(l.data) > w.position
             LIMIT ",
            );
            query.push_bind(remaining);
            rows.extend(query.build().fetch_all(&self.pool).await?);
        }
        let mut chunks: Vec<LogChunk> = rows
            .iter()
            .map(|row| LogChunk {
                bk_host_id: row.get(0),
                offset: row.get(1),
                data: row.get(2),
            })
            .collect();
        chunks.sort_by_key(|c| (c.bk_host_id, c.offset));
        Ok(chunks)
    }
}

/// A store on a fresh database of the backend the tests run against (`FLEETRUN_TEST_DATABASE`);
/// the database goes with the first value.
#[cfg(test)]
pub(crate) async fn test_store() -> (scratch::TestDatabase, Store) {
    let db = scratch::TestDatabase::create("fleetrun_store_unit")
        .await
        .unwrap();
    let store = Store::open_database(db.database()).await.unwrap();
    (db, store)
}

/// The store tests' job: one script step on `hosts` (host `n` at `10.0.<n / 256>.<n % 256>`),
/// each at host status `status`, the job running; a test sets what it is about on top.
#[cfg(test)]
pub(crate) fn test_job(hosts: impl IntoIterator<Item = i64>, status: i32) -> NewJob {
    NewJob {
        name: "job".into(),
        operator: "admin".into(),
        app_code: "app".into(),
        bk_scope_type: "biz".into(),
        bk_scope_id: "2".into(),
        status: 2,
        job_type: 1,
        launch_mode: 1,
        callback_url: None,
        create_time: 0,
        step: NewStep {
            name: "job".into(),
            step_type: 1,
            script_language: 1,
            script_content: b"true".to_vec(),
            script_param: String::new(),
            is_param_sensitive: false,
            timeout: 60,
            account_id: 1,
            account: "root".into(),
        },
        hosts: hosts
            .into_iter()
            .map(|id| NewHostResult {
                bk_host_id: id,
                bk_cloud_id: 0,
                ip: format!("10.0.{}.{}", id / 256, id % 256),
                status,
            })
            .collect(),
    }
}

/// Returns once a session of the test's PostgreSQL database waits for a lock (within 20 s, else
/// the test fails saying `what` did not happen).
#[cfg(test)]
pub(crate) async fn until_a_lock_is_waited_for(store: &Store, what: &str) {
    let waited = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .fetch_one(&store.pool)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(20), waited)
        .await
        .is_err()
    {
        panic!("{what}: no session waited for a lock within 20 s");
    }
}

#[cfg(test)]
mod upsert_row_tests {
    #[test]
    fn every_column_but_the_key_takes_its_new_value() {
        assert_eq!(
            super::upsert_row("t", &[("k", "$1"), ("a", "$2"), ("b", "now()")]),
            "INSERT INTO t (k, a, b) VALUES ($1, $2, now()) \
             ON CONFLICT (k) DO UPDATE SET a = excluded.a, b = excluded.b"
        );
    }
}

#[cfg(test)]
mod log_chunk_tests {
    use super::*;

    async fn store_with_logs() -> (scratch::TestDatabase, Store) {
        let (db, store) = crate::test_store().await;
        for (host, offset, data) in [(1, 0, "hello "), (1, 6, "world\n"), (2, 0, "abc")] {
            store
                .record(Write::HostLog {
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: 7,
                    bk_host_id: host,
                    offset,
                    data: data.as_bytes().to_vec(),
                })
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        (db, store)
    }

    fn offsets(chunks: &[LogChunk]) -> Vec<(i64, i64)> {
        chunks.iter().map(|c| (c.bk_host_id, c.offset)).collect()
    }

    #[tokio::test]
    async fn log_chunks_from_returns_what_follows_each_position() {
        let (_dir, store) = store_with_logs().await;
        let all = store
            .log_chunks_from(7, &[(2, 0), (1, 0)], 10)
            .await
            .unwrap();
        assert_eq!(offsets(&all), [(1, 0), (1, 6), (2, 0)]);
        assert_eq!(all[1].data, b"world\n");
        // A position inside a chunk returns that chunk, a position at its end does not.
        let mid = store.log_chunks_from(7, &[(1, 3)], 10).await.unwrap();
        assert_eq!(offsets(&mid), [(1, 0), (1, 6)]);
        let next = store
            .log_chunks_from(7, &[(1, 6), (2, 3)], 10)
            .await
            .unwrap();
        assert_eq!(offsets(&next), [(1, 6)]);
        assert!(
            store
                .log_chunks_from(7, &[(1, 12)], 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .log_chunks_from(8, &[(1, 0)], 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.log_chunks_from(7, &[], 10).await.unwrap().is_empty());
        let first = store.log_chunks_from(7, &[(1, 0)], 1).await.unwrap();
        assert_eq!(offsets(&first), [(1, 0)]);
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    fn registration(now: i64) -> AgentRegistration {
        AgentRegistration {
            agent_id: "a".into(),
            bk_cloud_id: 0,
            ip: "10.0.0.1".into(),
            hostname: "h".into(),
            os_type: "linux".into(),
            agent_version: "1".into(),
            now,
        }
    }

    #[tokio::test]
    async fn an_old_connections_end_does_not_mark_a_reconnected_agent_offline() {
        let (_db, store) = crate::test_store().await;
        let first = store.register_agent(&registration(100)).await.unwrap();
        let again = store.register_agent(&registration(200)).await.unwrap();
        assert_eq!(first.bk_host_id, again.bk_host_id);
        // The first connection ends after the second registered: the host stays online.
        store.set_offline(first.bk_host_id, 100, 250).await.unwrap();
        assert!(store.hosts().await.unwrap()[0].online);
        store.set_offline(first.bk_host_id, 200, 300).await.unwrap();
        let host = &store.hosts().await.unwrap()[0];
        assert!(!host.online);
        assert_eq!(host.last_seen, 300);
    }
}
