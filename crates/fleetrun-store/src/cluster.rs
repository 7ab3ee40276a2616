//! Several controllers on one PostgreSQL database (migration 0016): each registers under its
//! name and renews a heartbeat; each running job's bookkeeping (ending it, firing its callback,
//! rolling its batches) is held by one of them through a lease row, taken by one conditional
//! statement (free, expired, or the taker's already), renewed with the heartbeat, released when
//! the job's end is committed. A dead controller's leases expire and another takes them.
//!
//! The statements run on SQLite too (the tests run them on both), where one controller holds
//! the file and leases are not used.

use sqlx::Row;

use crate::{Store, StoreError};

/// A controller registered in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRecord {
    pub name: String,
    /// Where its bk-job API answers.
    pub api_url: String,
    /// Where agents reach its gateway.
    pub agent_addr: String,
    pub started_at: i64,
    /// When it last renewed; older than a lease's length, it is taken for dead.
    pub heartbeat_at: i64,
}

impl Store {
    /// Registers the controller `name` (again, after a restart) with its addresses.
    pub async fn register_controller(
        &self,
        name: &str,
        api_url: &str,
        agent_addr: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let result = sqlx::query(&crate::upsert_row(
            "controller",
            &[
                ("name", "$1"),
                ("api_url", "$2"),
                ("agent_addr", "$3"),
                ("started_at", "$4"),
                ("heartbeat_at", "$4"),
            ],
        ))
        .bind(name)
        .bind(api_url)
        .bind(agent_addr)
        .bind(now)
        .execute(&self.pool)
        .await;
        self.noting_write_failure(result)?;
        Ok(())
    }

    /// Renews `name`'s heartbeat and every lease it holds until `until`, in one transaction.
    /// Returns the jobs whose leases it holds.
    pub async fn renew_controller(
        &self,
        name: &str,
        now: i64,
        until: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let renewed = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("UPDATE controller SET heartbeat_at = $1 WHERE name = $2")
                .bind(now)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let jobs: Vec<i64> = sqlx::query(
                "UPDATE job_lease SET expires_at = $1 WHERE controller = $2
                 RETURNING job_instance_id",
            )
            .bind(until)
            .bind(name)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
            tx.commit().await?;
            Ok::<_, sqlx::Error>(jobs)
        }
        .await;
        self.noting_write_failure(renewed)
    }

    /// Every registered controller, by name.
    pub async fn controllers(&self) -> Result<Vec<ControllerRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, api_url, agent_addr, started_at, heartbeat_at FROM controller
             ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ControllerRecord {
                name: r.get(0),
                api_url: r.get(1),
                agent_addr: r.get(2),
                started_at: r.get(3),
                heartbeat_at: r.get(4),
            })
            .collect())
    }

    /// Takes a job's lease for `name` until `until`, if it is free, expired at `now`, or
    /// `name`'s already: one conditional statement, so of several controllers asking at once
    /// exactly one gets `true`.
    pub async fn take_job_lease(
        &self,
        job_instance_id: i64,
        name: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let taken = sqlx::query(
            "INSERT INTO job_lease (job_instance_id, controller, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (job_instance_id) DO UPDATE SET controller = excluded.controller,
                 expires_at = excluded.expires_at
             WHERE job_lease.controller = excluded.controller OR job_lease.expires_at < $4
             RETURNING job_instance_id",
        )
        .bind(job_instance_id)
        .bind(name)
        .bind(until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await;
        Ok(self.noting_write_failure(taken)?.is_some())
    }

    /// Whether `name` holds the job's lease, unexpired at `now`.
    pub async fn holds_job_lease(
        &self,
        job_instance_id: i64,
        name: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "SELECT 1 FROM job_lease
             WHERE job_instance_id = $1 AND controller = $2 AND expires_at >= $3",
        )
        .bind(job_instance_id)
        .bind(name)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?
        .is_some())
    }

    /// The controller holding a job's lease and until when, if anyone does.
    pub async fn job_lease(
        &self,
        job_instance_id: i64,
    ) -> Result<Option<(String, i64)>, StoreError> {
        Ok(
            sqlx::query("SELECT controller, expires_at FROM job_lease WHERE job_instance_id = $1")
                .bind(job_instance_id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| (r.get(0), r.get(1))),
        )
    }

    /// Gives a job's lease up, if `name` holds it (its end is committed, or it paused).
    pub async fn release_job_lease(
        &self,
        job_instance_id: i64,
        name: &str,
    ) -> Result<(), StoreError> {
        let result =
            sqlx::query("DELETE FROM job_lease WHERE job_instance_id = $1 AND controller = $2")
                .bind(job_instance_id)
                .bind(name)
                .execute(&self.pool)
                .await;
        self.noting_write_failure(result)?;
        Ok(())
    }

    /// Takes, for `name` until `until`, the lease of every job in `statuses` that nobody holds:
    /// its lease expired at `now`, or (with `own`, at a restart) is `name`'s already, or it has
    /// none and was created before `created_before` (a job is leased by the controller that
    /// starts it right after it is stored; one without a lease for longer was left by a
    /// controller that died in between, or by a release before leases). One statement; returns
    /// the jobs taken.
    pub async fn take_orphaned_jobs(
        &self,
        name: &str,
        statuses: &[i32],
        now: i64,
        until: i64,
        created_before: i64,
        own: bool,
    ) -> Result<Vec<i64>, StoreError> {
        let list = crate::join_ints(statuses);
        let own = if own {
            "job_lease.controller = excluded.controller OR "
        } else {
            ""
        };
        let taken = sqlx::query(&format!(
            "INSERT INTO job_lease (job_instance_id, controller, expires_at)
             SELECT j.job_instance_id, $1, $2 FROM job_instance j
             WHERE j.status IN ({list})
               AND (j.create_time < $3
                    OR EXISTS (SELECT 1 FROM job_lease l WHERE l.job_instance_id = j.job_instance_id))
             ON CONFLICT (job_instance_id) DO UPDATE SET controller = excluded.controller,
                 expires_at = excluded.expires_at
             WHERE {own}job_lease.expires_at < $4
             RETURNING job_instance_id"
        ))
        .bind(name)
        .bind(until)
        .bind(created_before)
        .bind(now)
        .fetch_all(&self.pool)
        .await;
        let mut jobs: Vec<i64> = self
            .noting_write_failure(taken)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        jobs.sort_unstable();
        Ok(jobs)
    }

    /// Claims a pending callback delivery's attempt due at `due_at` for the controller about to
    /// make it, by moving its next attempt to `until` (past the attempt's timeout): of several
    /// controllers seeing the delivery due, one gets `true`. A controller that dies during the
    /// attempt leaves it to be made again after `until`.
    pub async fn claim_callback_attempt(
        &self,
        delivery_id: i64,
        due_at: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let claimed = sqlx::query(
            "UPDATE callback_delivery SET next_attempt_at = $1
             WHERE id = $2 AND status = 'pending' AND next_attempt_at = $3",
        )
        .bind(until)
        .bind(delivery_id)
        .bind(due_at)
        .execute(&self.pool)
        .await;
        Ok(self.noting_write_failure(claimed)?.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use crate::NewJob;

    use super::*;

    async fn job(store: &Store, create_time: i64, status: i32) -> i64 {
        store
            .create_job(&NewJob {
                status,
                create_time,
                ..crate::test_job([1], 5)
            })
            .await
            .unwrap()
            .job_instance_id
    }

    #[tokio::test]
    async fn a_lease_is_held_by_one_controller_until_it_expires() {
        let (_db, store) = crate::test_store().await;
        let j = job(&store, 0, 2).await;
        assert!(store.take_job_lease(j, "a", 100, 200).await.unwrap());
        // Held by a: b is refused, a takes it again (renews).
        assert!(!store.take_job_lease(j, "b", 150, 250).await.unwrap());
        assert!(store.take_job_lease(j, "a", 150, 300).await.unwrap());
        assert_eq!(store.job_lease(j).await.unwrap(), Some(("a".into(), 300)));
        assert!(store.holds_job_lease(j, "a", 300).await.unwrap());
        assert!(!store.holds_job_lease(j, "b", 300).await.unwrap());
        // a stops renewing: past its expiry, b takes it, and a no longer holds it.
        assert!(!store.take_job_lease(j, "b", 300, 400).await.unwrap());
        assert!(store.take_job_lease(j, "b", 301, 400).await.unwrap());
        assert!(!store.holds_job_lease(j, "a", 301).await.unwrap());
        // a's renewal leaves b's lease alone; a release by a does nothing.
        store
            .register_controller("a", "http://a", "a:1", 0)
            .await
            .unwrap();
        assert!(
            store
                .renew_controller("a", 310, 999)
                .await
                .unwrap()
                .is_empty()
        );
        store.release_job_lease(j, "a").await.unwrap();
        assert_eq!(store.job_lease(j).await.unwrap(), Some(("b".into(), 400)));
        assert_eq!(store.renew_controller("b", 310, 500).await.unwrap(), [j]);
        store.release_job_lease(j, "b").await.unwrap();
        assert_eq!(store.job_lease(j).await.unwrap(), None);
    }

    #[tokio::test]
    async fn concurrent_takers_of_one_lease_get_it_once() {
        let (_db, store) = crate::test_store().await;
        let j = job(&store, 0, 2).await;
        let takers = (0..8).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .take_job_lease(j, &format!("c{i}"), 100, 200)
                    .await
                    .unwrap()
            })
        });
        let mut won = 0;
        for taker in takers {
            won += usize::from(taker.await.unwrap());
        }
        assert_eq!(won, 1);
    }

    #[tokio::test]
    async fn orphaned_jobs_are_the_expired_the_own_and_the_old_unleased() {
        let (_db, store) = crate::test_store().await;
        let held = job(&store, 0, 2).await;
        let expired = job(&store, 0, 2).await;
        let own = job(&store, 0, 2).await;
        let unleased_old = job(&store, 10, 2).await;
        let unleased_new = job(&store, 1_000, 2).await;
        let paused = job(&store, 0, 7).await;
        let ended = job(&store, 0, 3).await;
        assert!(store.take_job_lease(held, "live", 0, 5_000).await.unwrap());
        assert!(store.take_job_lease(expired, "dead", 0, 100).await.unwrap());
        assert!(store.take_job_lease(own, "me", 0, 100).await.unwrap());
        // Without its own (while it runs them): the expired and the old unleased.
        let taken = store
            .take_orphaned_jobs("me", &[2, 10], 50, 60, 100, false)
            .await
            .unwrap();
        assert_eq!(taken, [unleased_old]);
        let taken = store
            .take_orphaned_jobs("me", &[2, 10], 500, 900, 100, true)
            .await
            .unwrap();
        assert_eq!(taken, [expired, own, unleased_old]);
        let _ = (unleased_new, paused, ended);
        assert_eq!(
            store.job_lease(held).await.unwrap(),
            Some(("live".into(), 5_000))
        );
        assert_eq!(
            store.job_lease(expired).await.unwrap(),
            Some(("me".into(), 900))
        );
        // Taken again by another: nothing is free now.
        assert!(
            store
                .take_orphaned_jobs("other", &[2, 10], 600, 900, 100, false)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn controllers_register_and_renew() {
        let (_db, store) = crate::test_store().await;
        store
            .register_controller("b", "http://b", "127.0.0.1:2", 10)
            .await
            .unwrap();
        store
            .register_controller("a", "http://a", "127.0.0.1:1", 10)
            .await
            .unwrap();
        store.renew_controller("a", 20, 30).await.unwrap();
        let all = store.controllers().await.unwrap();
        assert_eq!(
            all.iter()
                .map(|c| (c.name.as_str(), c.heartbeat_at))
                .collect::<Vec<_>>(),
            [("a", 20), ("b", 10)]
        );
        // Registered again after a restart: new addresses, new start.
        store
            .register_controller("a", "http://a2", "127.0.0.1:3", 40)
            .await
            .unwrap();
        let a = &store.controllers().await.unwrap()[0];
        assert_eq!(
            (a.api_url.as_str(), a.started_at, a.heartbeat_at),
            ("http://a2", 40, 40)
        );
    }
}
