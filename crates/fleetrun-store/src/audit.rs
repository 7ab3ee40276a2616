//! The audit trail's rows: appended in order, each linked to the one before it by a hash.
//!
//! The store numbers the rows and keeps the chain; what the hash is made of is the caller's
//! ([`AuditHasher`]), so that the digest lives with the rest of the controller's cryptography.
//! Entries are appended by the writer ([`crate::Write::Audit`]), in the group commit that
//! carries the job engine's writes: one writer for the database, one transaction for both.

use sqlx::Row;

use crate::backend::{Dialect, Statement};
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

/// An [`AuditHasher`] the writer holds while the entry it hashes waits for its group commit.
#[derive(Clone)]
pub struct SharedAuditHasher(pub std::sync::Arc<AuditHasher>);

impl std::fmt::Debug for SharedAuditHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditHasher")
    }
}

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

/// What the store records about the audit trail's key (migration 0015): never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditKeyMarker {
    /// A fingerprint of the key the chain is made with.
    pub key_fingerprint: String,
    /// The first entry that key signs (1, or the entry recording a replaced key).
    pub since_seq: i64,
    /// Whether the head anchor file beside the key has been written.
    pub anchored: bool,
}

/// Rows per `INSERT` on PostgreSQL: 12 parameters each, well under its limit of 65,535.
const ROWS_PER_INSERT: usize = 128;

/// Takes the audit trail's write lock within `tx`, so that the head read next is the chain's
/// head until the commit: PostgreSQL's exclusive table lock (SQLite's writers lock the whole
/// database, with `BEGIN IMMEDIATE`, before they read it). Several controllers sharing a
/// PostgreSQL database append to the one chain in turn.
pub(crate) async fn lock_audit(
    dialect: Dialect,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
) -> Result<(), sqlx::Error> {
    if dialect == Dialect::Postgres {
        sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE")
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Rows per `INSERT` on SQLite: each of these few shapes stays prepared ([`SQLITE_INSERTS`]).
pub(crate) const SQLITE_ROWS_PER_INSERT: usize = 4;

/// Numbers, hashes (each with its own hasher) and inserts `entries` after the chain's head, in
/// multi-row `INSERT`s ([`ROWS_PER_INSERT`] rows each on PostgreSQL,
/// [`SQLITE_ROWS_PER_INSERT`] on SQLite), under the lock [`lock_audit`] took; returns the last
/// entry's number and hash.
///
/// `known` is the head as the caller last committed it, if it knows it: the head is then not
/// read. Were it stale (another writer appended since), the first row's number is taken
/// already and the database refuses that first statement before it writes anything; the head
/// is then read and the entries numbered and hashed again after it. Only for SQLite, where a
/// refused statement leaves the transaction open.
pub(crate) async fn append_in(
    dialect: Dialect,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entries: &[(&NewAuditEntry, &AuditHasher)],
    known: Option<&(i64, String)>,
) -> Result<(i64, String), sqlx::Error> {
    if let Some(head) = known.filter(|_| dialect == Dialect::Sqlite) {
        // Only the first statement may meet a taken number and be retried: it wrote nothing.
        let first = entries.len().min(SQLITE_ROWS_PER_INSERT);
        match insert_after(dialect, tx, head.clone(), &entries[..first]).await {
            Err(error) if is_taken_number(&error) => {
                tracing::warn!(
                    seq = head.0,
                    "the audit trail grew past the head this writer last committed (another \
                     writer appended to it): its entries are numbered after the new head"
                );
            }
            Err(error) => return Err(error),
            Ok(after) => return insert_after(dialect, tx, after, &entries[first..]).await,
        }
    }
    let head = read_head(tx).await?;
    insert_after(dialect, tx, head, entries).await
}

/// The trail's last entry's number and hash; `(0, "")` while it is empty.
async fn read_head(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
) -> Result<(i64, String), sqlx::Error> {
    let head = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await?;
    Ok(head.map_or((0, String::new()), |row| {
        (row.get::<i64, _>(0), row.get::<String, _>(1))
    }))
}

/// Whether the database refused a row because its number is taken.
fn is_taken_number(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// Numbers and hashes `entries` after `head`, and inserts them.
async fn insert_after(
    dialect: Dialect,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    head: (i64, String),
    entries: &[(&NewAuditEntry, &AuditHasher)],
) -> Result<(i64, String), sqlx::Error> {
    let (mut seq, mut prev) = head;
    let per_insert = match dialect {
        Dialect::Sqlite => SQLITE_ROWS_PER_INSERT,
        Dialect::Postgres => ROWS_PER_INSERT,
    };
    for chunk in entries.chunks(per_insert) {
        let mut rows = Vec::with_capacity(chunk.len());
        for (entry, hasher) in chunk {
            seq += 1;
            let hash = hasher(seq, entry, &prev);
            rows.push((
                seq,
                *entry,
                std::mem::replace(&mut prev, hash.clone()),
                hash,
            ));
        }
        if dialect == Dialect::Sqlite {
            // The text of each of the few shapes is made once. The two chains of binds below
            // take the same values in the same order and stay apart: this one binds to a text
            // made beforehand, PostgreSQL's writes the placeholders as it binds.
            let mut insert = sqlx::query(&SQLITE_INSERTS[rows.len() - 1]);
            for (seq, entry, prev_hash, hash) in rows {
                insert = insert
                    .bind(seq)
                    .bind(entry.at)
                    .bind(entry.app_code.as_str())
                    .bind(entry.operator.as_str())
                    .bind(entry.source.as_str())
                    .bind(entry.request_id.as_str())
                    .bind(entry.api.as_str())
                    .bind(entry.change.as_str())
                    .bind(entry.outcome_code)
                    .bind(entry.outcome.as_str())
                    .bind(prev_hash)
                    .bind(hash);
            }
            insert.execute(&mut **tx).await?;
            continue;
        }
        let mut insert = Statement::new(dialect, INSERT_INTO);
        insert.push_values(rows, |row, (seq, entry, prev_hash, hash)| {
            row.push_bind(seq)
                .push_bind(entry.at)
                .push_bind(entry.app_code.as_str())
                .push_bind(entry.operator.as_str())
                .push_bind(entry.source.as_str())
                .push_bind(entry.request_id.as_str())
                .push_bind(entry.api.as_str())
                .push_bind(entry.change.as_str())
                .push_bind(entry.outcome_code)
                .push_bind(entry.outcome.as_str())
                .push_bind(prev_hash)
                .push_bind(hash);
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok((seq, prev))
}

const INSERT_INTO: &str = "INSERT INTO audit_log (seq, at, app_code, operator, source, \
     request_id, api, change, outcome_code, outcome, prev_hash, hash)";

/// SQLite's `INSERT` of 1 to [`SQLITE_ROWS_PER_INSERT`] entries (prepared once per connection:
/// `sqlx::query` keeps a statement by default).
static SQLITE_INSERTS: std::sync::LazyLock<[String; SQLITE_ROWS_PER_INSERT]> =
    std::sync::LazyLock::new(|| {
        std::array::from_fn(|i| {
            let row = format!("({})", ["?"; 12].join(", "));
            format!("{INSERT_INTO} VALUES {}", vec![row; i + 1].join(", "))
        })
    });

/// The trail's one query: a page of entries after a number, filtered. On SQLite it is planned
/// as a range of numbers read in order (migration 0021), whatever the filters' values.
const AUDIT_ENTRIES: &str = "SELECT * FROM audit_log \
     WHERE seq > $1 AND at >= $2 AND at < $3 \
     AND ($4 IS NULL OR app_code = $4) \
     AND ($5 IS NULL OR operator = $5) \
     AND ($6 IS NULL OR api = $6) \
     AND ($7 IS NULL OR (outcome_code = 0) = $7) \
     ORDER BY seq LIMIT $8";

impl Store {
    /// Appends `entry` (the record of a replaced key) and makes `key_fingerprint` the chain's
    /// key from that entry on, in one transaction; returns the entry's number and hash.
    pub async fn rekey_audit(
        &self,
        entry: &NewAuditEntry,
        hasher: &AuditHasher,
        key_fingerprint: &str,
        at: i64,
    ) -> Result<(i64, String), StoreError> {
        let mut tx = self.begin_audit().await?;
        let head = append_in(self.dialect, &mut tx, &[(entry, hasher)], None).await;
        let head = self.noting_write_failure(head)?;
        let marked = Self::upsert_marker(&mut tx, key_fingerprint, head.0, at).await;
        self.noting_write_failure(marked)?;
        self.noting_write_failure(tx.commit().await)?;
        Ok(head)
    }

    /// Takes the audit trail's write lock before its head is read, so two appenders (the
    /// writer's group commit, another process on the same database, an administrator's tool)
    /// cannot fork the chain: SQLite's IMMEDIATE transaction, PostgreSQL's exclusive table lock.
    async fn begin_audit(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let mut tx = match self.dialect {
            Dialect::Sqlite => {
                self.noting_write_failure(self.pool.begin_with("BEGIN IMMEDIATE").await)?
            }
            Dialect::Postgres => self.noting_write_failure(self.pool.begin().await)?,
        };
        self.noting_write_failure(lock_audit(self.dialect, &mut tx).await)?;
        Ok(tx)
    }

    async fn upsert_marker(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        key_fingerprint: &str,
        since_seq: i64,
        at: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit_key_marker (id, key_fingerprint, since_seq, anchored, recorded_at) \
             VALUES (1, $1, $2, 0, $3) \
             ON CONFLICT (id) DO UPDATE SET key_fingerprint = $1, since_seq = $2, recorded_at = $3",
        )
        .bind(key_fingerprint)
        .bind(since_seq)
        .bind(at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// What the store records about the chain's key; `None` before a key was recorded.
    pub async fn audit_key_marker(&self) -> Result<Option<AuditKeyMarker>, StoreError> {
        let row = sqlx::query(
            "SELECT key_fingerprint, since_seq, anchored FROM audit_key_marker WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| AuditKeyMarker {
            key_fingerprint: row.get(0),
            since_seq: row.get(1),
            anchored: row.get::<i64, _>(2) != 0,
        }))
    }

    /// Records the key a chain without a marker is made with (first start with a key).
    pub async fn record_audit_key(
        &self,
        key_fingerprint: &str,
        since_seq: i64,
        at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.noting_write_failure(self.pool.begin().await)?;
        let marked = Self::upsert_marker(&mut tx, key_fingerprint, since_seq, at).await;
        self.noting_write_failure(marked)?;
        self.noting_write_failure(tx.commit().await)
    }

    /// Records that the head anchor file has been written: from then on, a missing one is a
    /// break.
    pub async fn mark_audit_anchored(&self) -> Result<(), StoreError> {
        let marked = sqlx::query("UPDATE audit_key_marker SET anchored = 1 WHERE id = 1")
            .execute(&self.pool)
            .await;
        self.noting_write_failure(marked).map(drop)
    }

    /// The entry numbered `seq`.
    pub async fn audit_entry(&self, seq: i64) -> Result<Option<AuditRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM audit_log WHERE seq = $1")
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(record))
    }

    /// Entries matching `filter`, by number.
    pub async fn audit_entries(
        &self,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(AUDIT_ENTRIES)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{Database, Write};

    fn hasher() -> SharedAuditHasher {
        SharedAuditHasher(Arc::new(|seq: i64, entry: &NewAuditEntry, prev: &str| {
            format!("{seq}|{}|{}|{prev}", entry.api, entry.request_id)
        }))
    }

    fn entry(api: &str, request_id: String) -> NewAuditEntry {
        NewAuditEntry {
            at: 1,
            api: api.to_owned(),
            request_id,
            change: "{}".to_owned(),
            outcome: "ok".to_owned(),
            ..NewAuditEntry::default()
        }
    }

    /// Every entry once, numbered from 1 without a gap, each linking to the one before it, and
    /// its hash the hasher's.
    async fn assert_chain(store: &Store, expected: usize) -> Vec<AuditRecord> {
        let records = store
            .audit_entries(&AuditFilter {
                limit: 100_000,
                ..AuditFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(records.len(), expected);
        let hash = hasher();
        let mut prev = String::new();
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.seq, i as i64 + 1);
            assert_eq!(record.prev_hash, prev, "entry {}", record.seq);
            assert_eq!(record.hash, (hash.0)(record.seq, &record.entry, &prev));
            prev = record.hash.clone();
        }
        records
    }

    /// On SQLite a page of the trail is read as a range of numbers in order: neither a sort nor
    /// an index besides the rows' own b-tree, with a time window or without.
    #[tokio::test]
    async fn a_page_of_the_trail_is_a_range_of_numbers_on_sqlite() {
        let (_db, store) = crate::test_store().await;
        if store.dialect != crate::backend::Dialect::Sqlite {
            return;
        }
        for (since, until) in [(i64::MIN, i64::MAX), (1_700_000_000_000, 1_700_000_060_000)] {
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {AUDIT_ENTRIES}"))
                .bind(0_i64)
                .bind(since)
                .bind(until)
                .bind(Some("app"))
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<bool>)
                .bind(100_i64)
                .fetch_all(&store.pool)
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect();
            assert_eq!(
                plan,
                ["SEARCH audit_log USING INTEGER PRIMARY KEY (rowid>?)"],
                "{since}..{until}"
            );
        }
    }

    /// Entries queued among the job engine's writes are chained in the writer's group commit,
    /// the head it publishes is the chain's, and a key change recorded outside the writer
    /// (`rekey`) continues the same chain.
    #[tokio::test]
    async fn entries_are_chained_in_the_writers_group_commit() {
        let (_db, store) = crate::test_store().await;
        let mut head = store.committed_audit_head();
        assert_eq!(*head.borrow_and_update(), None);
        for i in 0..300 {
            store
                .record(Write::Audit {
                    entry: entry("fast_execute_script", i.to_string()),
                    hasher: hasher(),
                })
                .await
                .unwrap();
            store
                .record(Write::HostLog {
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: 7,
                    bk_host_id: 1,
                    offset: i,
                    data: b"x".to_vec(),
                })
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        let records = assert_chain(&store, 300).await;
        let last = records.last().unwrap();
        assert!(head.has_changed().unwrap());
        assert_eq!(
            *head.borrow_and_update(),
            Some((last.seq, last.hash.clone()))
        );
        assert_eq!(
            store.audit_head().await.unwrap(),
            Some((last.seq, last.hash.clone()))
        );
        assert_eq!(
            store.host_log(7, 1).await.unwrap().len(),
            300,
            "the job engine's writes of the same commits are stored"
        );
        let hash = hasher();
        let (seq, _) = store
            .rekey_audit(&entry("audit_rekey", "r".into()), &*hash.0, "fp", 2)
            .await
            .unwrap();
        assert_eq!(seq, 301);
        store
            .record(Write::Audit {
                entry: entry("create_script", "after".into()),
                hasher: hasher(),
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert_chain(&store, 302).await;
    }

    /// An entry alone in the writer's backlog, which waits a little for other writes to share
    /// its commit, is committed without any: nobody flushes, nothing else is written.
    #[tokio::test]
    async fn an_entry_alone_is_committed_without_a_flush() {
        let (_db, store) = crate::test_store().await;
        let mut head = store.committed_audit_head();
        store
            .record(Write::Audit {
                entry: entry("create_script", "alone".into()),
                hasher: hasher(),
            })
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), head.changed())
            .await
            .expect("the entry is committed")
            .unwrap();
        assert_eq!(head.borrow().as_ref().map(|h| h.0), Some(1));
    }

    /// Two stores on one database (two controllers sharing PostgreSQL, or a second process on a
    /// SQLite file) append at once: their writers take turns on the trail's lock, so the chain
    /// does not fork, no entry is lost, and no commit has its entries refused (without the
    /// lock, the loser of a race for the next number would be refused and retried).
    #[tokio::test]
    async fn two_writers_on_one_database_keep_one_chain() {
        use crate::writer::tests::{commit_unrefused, committed_head, harness};
        let db = crate::scratch::TestDatabase::create("fleetrun_store_unit")
            .await
            .unwrap();
        let (first, second) = match db.database() {
            Database::Postgres(_) => (
                Store::open_as(db.database(), "one").await.unwrap(),
                Store::open_as(db.database(), "two").await.unwrap(),
            ),
            Database::Sqlite(_) => (
                Store::open_database(db.database()).await.unwrap(),
                Store::open_database(db.database()).await.unwrap(),
            ),
        };
        let append = |store: Store, name: &'static str| async move {
            let mut writer = harness(&store);
            let mut writes = Vec::new();
            for i in 0..200 {
                writes.push(Write::Audit {
                    entry: entry(name, i.to_string()),
                    hasher: hasher(),
                });
                if i % 16 == 0 {
                    commit_unrefused(&mut writer, std::mem::take(&mut writes)).await;
                    tokio::task::yield_now().await;
                }
            }
            commit_unrefused(&mut writer, writes).await;
            committed_head(&writer)
        };
        let heads = tokio::join!(append(first.clone(), "one"), append(second.clone(), "two"));
        let records = assert_chain(&first, 400).await;
        for name in ["one", "two"] {
            let mut ids: Vec<i64> = records
                .iter()
                .filter(|r| r.entry.api == name)
                .map(|r| r.entry.request_id.parse().unwrap())
                .collect();
            assert_eq!(
                ids,
                (0..200).collect::<Vec<_>>(),
                "{name}'s entries in order"
            );
            ids.dedup();
            assert_eq!(ids.len(), 200);
        }
        // Each writer publishes the head it committed, which is in the chain.
        for head in [heads.0, heads.1] {
            let (seq, hash) = head.unwrap();
            assert_eq!(records[seq as usize - 1].hash, hash);
        }
    }
}
