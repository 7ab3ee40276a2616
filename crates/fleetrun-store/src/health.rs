//! Whether the database accepts writes, as the rest of the controller sees it.
//!
//! A failing write is reported once, when writes start failing, and once when they succeed again;
//! in between the writer keeps retrying quietly.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The store's ability to write, as [`crate::Store::health`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Why writes fail now (the database's last error); `None` while they succeed.
    pub write_error: Option<String>,
    /// Engine writes accepted and not committed yet.
    pub pending: usize,
    /// Bytes of host output among the pending writes.
    pub pending_output_bytes: usize,
    /// Engine writes (audit entries included) given up since the store opened: they arrived
    /// while writes failed and the writes kept in memory had reached their bound, or the
    /// database refused the write itself as a statement.
    pub lost: u64,
}

impl Health {
    /// Whether the last write succeeded.
    pub fn is_writable(&self) -> bool {
        self.write_error.is_none()
    }
}

/// Shared between the store's handles and its writer.
#[derive(Debug, Default)]
pub(crate) struct HealthState {
    health: Mutex<Health>,
    /// Wakes the writer when another path (creating a job) found the database unwritable, so
    /// that it probes until writes succeed again even with nothing of its own to write.
    pub(crate) failed_elsewhere: Notify,
}

impl HealthState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::default()
    }

    pub(crate) fn get(&self) -> Health {
        self.health.lock().unwrap().clone()
    }

    /// Records a failed write; logs only the first of a run of failures.
    pub(crate) fn failed(&self, error: &sqlx::Error) {
        let mut health = self.health.lock().unwrap();
        if health.write_error.is_none() {
            tracing::error!(
                %error,
                pending = health.pending,
                "the database refuses writes: new jobs are refused and accepted results are kept \
                 in memory and retried until it accepts them again"
            );
        }
        health.write_error = Some(error.to_string());
    }

    /// Records a successful write; logs the end of a run of failures.
    pub(crate) fn succeeded(&self) {
        let mut health = self.health.lock().unwrap();
        if let Some(error) = health.write_error.take() {
            tracing::warn!(
                last_error = %error,
                lost = health.lost,
                "the database accepts writes again"
            );
        }
    }

    pub(crate) fn set_pending(&self, pending: usize, output_bytes: usize) {
        let mut health = self.health.lock().unwrap();
        health.pending = pending;
        health.pending_output_bytes = output_bytes;
    }

    pub(crate) fn lost(&self, writes: u64) {
        self.health.lock().unwrap().lost += writes;
    }
}

/// Whether an error means the database cannot be written (a full disk, a read-only or failing
/// file, a PostgreSQL server that is down, full or read-only), as opposed to a bad statement or
/// a busy database.
pub(crate) fn is_write_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(e) => {
            if let Some(e) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return is_postgres_write_failure(e.code());
            }
            // SQLite's primary result codes: PERM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN,
            // NOTADB. The extended code sqlx reports carries the primary one in its low byte.
            let primary = e
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            matches!(primary, Some(3 | 8 | 10 | 11 | 13 | 14 | 26))
        }
        _ => false,
    }
}

/// Whether the database refused a statement because of the data it carries: PostgreSQL's data
/// exceptions (class 22, such as 22021 for a NUL in text), integrity constraint violations
/// (class 23) and program limits (class 54, such as a value too large); SQLite's TOOBIG,
/// CONSTRAINT, MISMATCH and RANGE.
pub(crate) fn is_refused_data(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = error else {
        return false;
    };
    if let Some(e) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = e.code();
        return ["22", "23", "54"]
            .iter()
            .any(|class| code.starts_with(class));
    }
    let primary = e
        .code()
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff);
    matches!(primary, Some(18 | 19 | 20 | 25))
}

/// Whether the database is busy for a while rather than refusing the statement: SQLite's
/// BUSY and LOCKED; PostgreSQL's transaction rollbacks (a deadlock, a serialization failure), a
/// lock wait that timed out (`lock_timeout`) and a cancelled statement (`statement_timeout`).
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = error else {
        return false;
    };
    if let Some(e) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = e.code();
        return code.starts_with("40") || code == "55P03" || code == "57014";
    }
    let primary = e
        .code()
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff);
    matches!(primary, Some(5 | 6))
}

/// PostgreSQL's SQLSTATEs for a server that cannot take writes: connection exceptions (08),
/// a read-only transaction (25006, a standby), missing privileges (42501), insufficient
/// resources such as a full disk (53), operator intervention such as a shutdown (57P), system
/// errors such as an I/O error (58) and internal errors such as corrupt data (XX).
fn is_postgres_write_failure(sqlstate: &str) -> bool {
    ["08", "53", "57P", "58", "XX"]
        .iter()
        .any(|class| sqlstate.starts_with(class))
        || matches!(sqlstate, "25006" | "42501")
}

/// Closes a connection whose write failed for want of a writable database instead of returning
/// it to the pool: SQLite can keep the failed transaction's lock on it, which would then block
/// every later write, even once the database is writable again.
pub(crate) fn discard_if_broken<T>(
    connection: &mut sqlx::pool::PoolConnection<sqlx::Any>,
    result: &Result<T, sqlx::Error>,
) {
    if let Err(error) = result
        && is_write_failure(error)
    {
        connection.close_on_drop();
    }
}
