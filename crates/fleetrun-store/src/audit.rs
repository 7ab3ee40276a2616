//! The audit trail's rows: appended in order, each linked to the one before it by a hash.
//!
//! The store numbers the rows and keeps the chain; what the hash is made of is the caller's
//! ([`AuditHasher`]), so that the digest lives with the rest of the controller's cryptography.

use sqlx::Row;

use crate::backend::Dialect;
use crate::{Store, StoreError};

/// An entry to append: who did what, from where, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewAuditEntry {
    /// Unix time in milliseconds.
    pub at: i64,
    pub app_code: String,
    pub operator: String,
    /// The client's address as the controller saw it.
    pub source: String,
    pub request_id: String,
    pub api: String,
    /// What was asked, as JSON, with secrets masked.
    pub change: String,
    /// bk-job's code of the reply, 0 for success.
    pub outcome_code: i64,
    /// "ok", or the reply's message.
    pub outcome: String,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    pub entry: NewAuditEntry,
    pub prev_hash: String,
    pub hash: String,
}

/// Computes an entry's hash from its number, its fields and the previous entry's hash.
pub type AuditHasher = dyn Fn(i64, &NewAuditEntry, &str) -> String + Send + Sync;

/// Which entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Entries numbered above this.
    pub after_seq: Option<i64>,
    /// From this time (ms), inclusive.
    pub since: Option<i64>,
    /// Before this time (ms), exclusive.
    pub until: Option<i64>,
    pub app_code: Option<String>,
    pub operator: Option<String>,
    pub api: Option<String>,
    /// Only refused calls (`Some(false)`) or only successful ones (`Some(true)`).
    pub succeeded: Option<bool>,
    /// At most this many, in order.
    pub limit: i64,
}

fn record(row: &sqlx::any::AnyRow) -> AuditRecord {
    AuditRecord {
        seq: row.get("seq"),
        entry: NewAuditEntry {
            at: row.get("at"),
            app_code: row.get("app_code"),
            operator: row.get("operator"),
            source: row.get("source"),
            request_id: row.get("request_id"),
            api: row.get("api"),
            change: row.get("change"),
            outcome_code: row.get("outcome_code"),
            outcome: row.get("outcome"),
        },
        prev_hash: row.get("prev_hash"),
        hash: row.get("hash"),
    }
}

impl Store {
    /// Appends `entries` in order in one transaction, each chained to the last stored one;
    /// returns the last entry's number and hash.
    pub async fn append_audit(
        &self,
        entries: &[NewAuditEntry],
        hasher: &AuditHasher,
    ) -> Result<(i64, String), StoreError> {
        // The write lock is taken before the chain's head is read, so two appenders (another
        // process on the same database, an administrator's tool) cannot fork it: SQLite's
        // IMMEDIATE transaction, PostgreSQL's exclusive table lock.
        let mut tx = match self.dialect {
            Dialect::Sqlite => {
                self.noting_write_failure(self.pool.begin_with("BEGIN IMMEDIATE").await)?
            }
            Dialect::Postgres => {
                let mut tx = self.noting_write_failure(self.pool.begin().await)?;
                sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        let head = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
        let (mut seq, mut prev) = head.map_or((0, String::new()), |row| {
            (row.get::<i64, _>(0), row.get::<String, _>(1))
        });
        for entry in entries {
            seq += 1;
            let hash = hasher(seq, entry, &prev);
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, at, app_code, operator, source, request_id, api, \
                 change, outcome_code, outcome, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(seq)
            .bind(entry.at)
            .bind(&entry.app_code)
            .bind(&entry.operator)
            .bind(&entry.source)
            .bind(&entry.request_id)
            .bind(&entry.api)
            .bind(&entry.change)
            .bind(entry.outcome_code)
            .bind(&entry.outcome)
            .bind(&prev)
            .bind(&hash)
            .execute(&mut *tx)
            .await;
            self.noting_write_failure(inserted)?;
            prev = hash;
        }
        self.noting_write_failure(tx.commit().await)?;
        Ok((seq, prev))
    }

    /// Entries matching `filter`, by number.
    pub async fn audit_entries(
        &self,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM audit_log \
             WHERE seq > $1 AND at >= $2 AND at < $3 \
             AND ($4 IS NULL OR app_code = $4) \
             AND ($5 IS NULL OR operator = $5) \
             AND ($6 IS NULL OR api = $6) \
             AND ($7 IS NULL OR (outcome_code = 0) = $7) \
             ORDER BY seq LIMIT $8",
        )
        .bind(filter.after_seq.unwrap_or(0))
        .bind(filter.since.unwrap_or(i64::MIN))
        .bind(filter.until.unwrap_or(i64::MAX))
        .bind(filter.app_code.as_deref())
        .bind(filter.operator.as_deref())
        .bind(filter.api.as_deref())
        .bind(filter.succeeded)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record).collect())
    }

    /// The last entry's number and hash; `None` while the log is empty.
    pub async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }
}
