//! The inventory's revisions: each change to the inventory document is stored whole, in one
//! transaction with the host registrations it forgets, and only on top of the revision it was
//! made from.

use sqlx::{Row, any::AnyRow};

use crate::{Dialect, Store, StoreError};

/// Revisions kept; older ones are pruned when a new one is stored.
pub const KEPT_INVENTORY_REVISIONS: i64 = 100;

/// What is known of a revision besides its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionInfo {
    pub revision: i64,
    /// `file`, `config` or `api`.
    pub source: String,
    /// Digest of the file (or configuration) text imported last.
    pub source_digest: String,
    pub operator: String,
    pub summary: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// A stored revision of the inventory document.
#[derive(Debug, Clone)]
pub struct InventoryRevision {
    pub info: RevisionInfo,
    pub text: String,
}

/// A revision to store.
#[derive(Debug, Clone)]
pub struct NewInventoryRevision {
    /// The revision the change was made from; `None` for the first one.
    pub based_on: Option<i64>,
    pub text: String,
    pub source: String,
    pub source_digest: String,
    pub operator: String,
    pub summary: String,
    pub created_at: i64,
    /// Agents' hosts whose registration goes with this revision.
    pub forget_hosts: Vec<i64>,
}

/// A revision could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InventoryCommitError {
    /// Another revision was stored since the one the change was made from.
    #[error("the inventory is at revision {current:?}, not {based_on:?}")]
    Conflict {
        based_on: Option<i64>,
        current: Option<i64>,
    },
    /// A host to forget has its agent connected.
    #[error("host {0}'s agent is connected")]
    HostOnline(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for InventoryCommitError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

const INFO_COLUMNS: &str = "revision, source, source_digest, operator, summary, created_at";

fn info(row: &AnyRow) -> RevisionInfo {
    RevisionInfo {
        revision: row.get("revision"),
        source: row.get("source"),
        source_digest: row.get("source_digest"),
        operator: row.get("operator"),
        summary: row.get("summary"),
        created_at: row.get("created_at"),
    }
}

impl Store {
    /// The current (latest) revision, if any was ever stored.
    pub async fn latest_inventory(&self) -> Result<Option<InventoryRevision>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {INFO_COLUMNS}, text FROM inventory_revision ORDER BY revision DESC LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| InventoryRevision {
            info: info(&row),
            text: row.get("text"),
        }))
    }

    /// One revision, if still kept.
    pub async fn inventory_revision(
        &self,
        revision: i64,
    ) -> Result<Option<InventoryRevision>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {INFO_COLUMNS}, text FROM inventory_revision WHERE revision = $1"
        ))
        .bind(revision)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| InventoryRevision {
            info: info(&row),
            text: row.get("text"),
        }))
    }

    /// The latest `limit` revisions, newest first.
    pub async fn inventory_history(&self, limit: i64) -> Result<Vec<RevisionInfo>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {INFO_COLUMNS} FROM inventory_revision ORDER BY revision DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(info).collect())
    }

    /// Stores the next revision, if the current one is still `based_on`, and forgets the hosts
    /// it names, all in one transaction. Returns the new revision's number.
    pub async fn commit_inventory(
        &self,
        new: &NewInventoryRevision,
    ) -> Result<i64, InventoryCommitError> {
        // Take the write lock before reading the current revision, so no other writer (in this
        // process or another sharing the database) can slip in between.
        let mut tx = match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("LOCK TABLE inventory_revision IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        let current: Option<i64> = sqlx::query("SELECT MAX(revision) FROM inventory_revision")
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        if current != new.based_on {
            return Err(InventoryCommitError::Conflict {
                based_on: new.based_on,
                current,
            });
        }
        for &bk_host_id in &new.forget_hosts {
            let online: Option<i64> = sqlx::query("SELECT online FROM host WHERE bk_host_id = $1")
                .bind(bk_host_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.get(0));
            if online.is_some_and(|online| online != 0) {
                return Err(InventoryCommitError::HostOnline(bk_host_id));
            }
            sqlx::query("DELETE FROM host WHERE bk_host_id = $1")
                .bind(bk_host_id)
                .execute(&mut *tx)
                .await?;
        }
        let revision = current.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO inventory_revision
                 (revision, text, source, source_digest, operator, summary, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(revision)
        .bind(&new.text)
        .bind(&new.source)
        .bind(&new.source_digest)
        .bind(&new.operator)
        .bind(&new.summary)
        .bind(new.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM inventory_revision WHERE revision <= $1")
            .bind(revision - KEPT_INVENTORY_REVISIONS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(based_on: Option<i64>, text: &str) -> NewInventoryRevision {
        NewInventoryRevision {
            based_on,
            text: text.into(),
            source: "api".into(),
            source_digest: "d".into(),
            operator: "alice".into(),
            summary: "s".into(),
            created_at: 1,
            forget_hosts: Vec::new(),
        }
    }

    #[tokio::test]
    async fn revisions_follow_each_other_and_stale_ones_are_refused() {
        let (_db, store) = crate::test_store().await;
        assert!(store.latest_inventory().await.unwrap().is_none());
        assert_eq!(
            store.commit_inventory(&revision(None, "a")).await.unwrap(),
            1
        );
        assert_eq!(
            store
                .commit_inventory(&revision(Some(1), "b"))
                .await
                .unwrap(),
            2
        );
        let err = store
            .commit_inventory(&revision(Some(1), "c"))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            InventoryCommitError::Conflict {
                based_on: Some(1),
                current: Some(2)
            }
        ));
        let latest = store.latest_inventory().await.unwrap().unwrap();
        assert_eq!((latest.info.revision, latest.text.as_str()), (2, "b"));
        assert_eq!(
            store.inventory_revision(1).await.unwrap().unwrap().text,
            "a"
        );
        let history = store.inventory_history(10).await.unwrap();
        assert_eq!(
            history.iter().map(|r| r.revision).collect::<Vec<_>>(),
            [2, 1]
        );
    }

    #[tokio::test]
    async fn old_revisions_are_pruned() {
        let (_db, store) = crate::test_store().await;
        let mut based_on = None;
        for i in 0..KEPT_INVENTORY_REVISIONS + 5 {
            based_on = Some(
                store
                    .commit_inventory(&revision(based_on, &i.to_string()))
                    .await
                    .unwrap(),
            );
        }
        let history = store.inventory_history(1_000).await.unwrap();
        assert_eq!(history.len() as i64, KEPT_INVENTORY_REVISIONS);
        assert!(store.inventory_revision(5).await.unwrap().is_none());
        assert!(store.inventory_revision(6).await.unwrap().is_some());
    }
}
