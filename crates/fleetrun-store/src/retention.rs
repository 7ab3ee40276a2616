//! Retention: finished jobs older than the configured age removed with everything that hangs
//! off them (steps, host results, logs, callback deliveries and attempts), a few at a time.
//!
//! Each batch is one short transaction, so the engine's writer and new jobs wait at most for one
//! batch, never for the whole pruning. A job's per-host rows (logs, results, checkpoints), which
//! a 10,000-host job has tens of thousands of, go first in batches bounded by rows
//! ([`Store::prune_host_rows`]); the job itself and its few other rows go last
//! ([`Store::remove_jobs`]). The audit log is not touched.

use sqlx::Row;

use crate::{Store, StoreError};

/// `$1, $2, ... $n` after the first `offset` parameters.
fn placeholders(offset: usize, n: usize) -> String {
    (1..=n)
        .map(|i| format!("${}", offset + i))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Removes up to `batch` jobs whose status is one of `finished` and that ended before
    /// `ended_before` (ms), in one transaction; returns how many were removed.
    pub async fn prune_finished_jobs(
        &self,
        ended_before: i64,
        finished: &[i32],
        batch: usize,
    ) -> Result<usize, StoreError> {
        let jobs = self.prunable_jobs(ended_before, finished, batch).await?;
        self.remove_jobs(&jobs, ended_before).await
    }

    /// Up to `batch` jobs whose status is one of `finished` and that ended before
    /// `ended_before` (ms), the oldest first.
    pub async fn prunable_jobs(
        &self,
        ended_before: i64,
        finished: &[i32],
        batch: usize,
    ) -> Result<Vec<i64>, StoreError> {
        if finished.is_empty() || batch == 0 {
            return Ok(Vec::new());
        }
        let select = format!(
            "SELECT job_instance_id FROM job_instance \
             WHERE end_time IS NOT NULL AND end_time < $1 AND status IN ({}) \
             ORDER BY end_time LIMIT {batch}",
            placeholders(1, finished.len())
        );
        let mut query = sqlx::query(&select).bind(ended_before);
        for status in finished {
            query = query.bind(i64::from(*status));
        }
        Ok(query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// Deletes at most `max_rows` per-host rows of `jobs` (their logs first, then results, then
    /// task checkpoints) in one transaction; returns how many went, 0 once none is left. Only
    /// rows of jobs still finished before `ended_before` go: a job retried since
    /// [`Self::prunable_jobs`] picked it is running again, and its rows are left alone. The
    /// transaction first takes the write lock on the due jobs' rows, so a retry either committed
    /// before (and the job is not due) or waits for this chunk.
    pub async fn prune_host_rows(
        &self,
        jobs: &[i64],
        ended_before: i64,
        max_rows: usize,
    ) -> Result<usize, StoreError> {
        if jobs.is_empty() || max_rows == 0 {
            return Ok(0);
        }
        let (lock, due) = due_jobs(jobs.len());
        let steps =
            format!("SELECT step_instance_id FROM step_instance WHERE job_instance_id IN ({due})");
        let pruned = async {
            let mut tx = self.pool.begin().await?;
            bind_due(sqlx::query(&lock), jobs, ended_before)
                .execute(&mut *tx)
                .await?;
            for (table, key) in [
                ("host_log", r#"step_instance_id, bk_host_id, "offset""#),
                ("host_result", "step_instance_id, bk_host_id"),
                ("host_task", "step_instance_id, bk_host_id"),
                (
                    "host_log_history",
                    r#"step_instance_id, execute_count, bk_host_id, "offset""#,
                ),
                (
                    "host_result_history",
                    "step_instance_id, execute_count, bk_host_id",
                ),
                ("file_log", "step_instance_id, bk_host_id, mode, seq"),
            ] {
                let sql = format!(
                    "DELETE FROM {table} WHERE ({key}) IN \
                     (SELECT {key} FROM {table} WHERE step_instance_id IN ({steps}) LIMIT {max_rows})"
                );
                let done = bind_due(sqlx::query(&sql), jobs, ended_before)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() > 0 {
                    tx.commit().await?;
                    return Ok(done.rows_affected() as usize);
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(0)
        }
        .await;
        self.noting_write_failure(pruned)
    }

    /// Removes `jobs` with whatever is left under them, in one transaction, each only if it is
    /// still finished before `ended_before`; returns how many were removed. Every statement,
    /// not only the last, looks at that again: a job retried meanwhile keeps its steps and rows.
    pub async fn remove_jobs(&self, jobs: &[i64], ended_before: i64) -> Result<usize, StoreError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let (lock, due) = due_jobs(jobs.len());
        let steps =
            format!("SELECT step_instance_id FROM step_instance WHERE job_instance_id IN ({due})");
        let statements = [
            // The write lock on the due jobs first: a retry waits for this transaction.
            lock,
            format!("DELETE FROM host_log WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM host_result WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM host_task WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM host_log_history WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM host_result_history WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM file_log WHERE step_instance_id IN ({steps})"),
            format!(
                "DELETE FROM callback_attempt WHERE delivery_id IN \
                 (SELECT id FROM callback_delivery WHERE job_instance_id IN ({due}))"
            ),
            format!("DELETE FROM callback_delivery WHERE job_instance_id IN ({due})"),
            format!("DELETE FROM rolling_host WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM step_rolling WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM step_instance WHERE job_instance_id IN ({due})"),
            format!("DELETE FROM job_instance WHERE job_instance_id IN ({due})"),
        ];
        let mut tx = self.noting_write_failure(self.pool.begin().await)?;
        let mut removed = 0;
        for sql in &statements {
            let done = self.noting_write_failure(
                bind_due(sqlx::query(sql), jobs, ended_before)
                    .execute(&mut *tx)
                    .await,
            )?;
            removed = done.rows_affected() as usize;
        }
        self.noting_write_failure(tx.commit().await)?;
        Ok(removed)
    }
}

/// For `n` job ids bound at `$1..=$n` and the cutoff at `$n+1`: a statement that takes the
/// write lock on those still finished before the cutoff, and the query that selects them.
fn due_jobs(n: usize) -> (String, String) {
    let ids = placeholders(0, n);
    let condition = format!(
        "job_instance_id IN ({ids}) AND end_time IS NOT NULL AND end_time < ${}",
        n + 1
    );
    (
        format!("UPDATE job_instance SET end_time = end_time WHERE {condition}"),
        format!("SELECT job_instance_id FROM job_instance WHERE {condition}"),
    )
}

fn bind_due<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    jobs: &[i64],
    ended_before: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for id in jobs {
        query = query.bind(*id);
    }
    query.bind(ended_before)
}

#[cfg(test)]
mod tests {
    use super::placeholders;
    use crate::Write;

    #[tokio::test]
    async fn a_large_job_goes_in_transactions_bounded_by_rows() {
        let (_db, store) = crate::test_store().await;
        let old = store.create_job(&crate::test_job(1..=30, 5)).await.unwrap();
        let running = store.create_job(&crate::test_job(1..=2, 5)).await.unwrap();
        for host in 1..=30 {
            for chunk in 0..10 {
                store
                    .record(Write::HostLog {
                        epoch: crate::FIRST_EPOCH,
                        step_instance_id: old.step_instance_id,
                        bk_host_id: host,
                        offset: chunk * 4,
                        data: b"abc\n".to_vec(),
                    })
                    .await
                    .unwrap();
            }
        }
        store
            .record(Write::JobFinished {
                job_instance_id: old.job_instance_id,
                status: 3,
                at: 10,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();

        let jobs = store.prunable_jobs(100, &[3], 10).await.unwrap();
        assert_eq!(jobs, [old.job_instance_id], "only the finished job is due");
        let mut batches = Vec::new();
        loop {
            let n = store.prune_host_rows(&jobs, 100, 64).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= 64, "a batch of {n} rows");
            batches.push(n);
        }
        // 300 log chunks, then 30 host results.
        assert_eq!(batches, [64, 64, 64, 64, 44, 30]);
        assert!(
            store
                .host_results(old.step_instance_id)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.remove_jobs(&jobs, 100).await.unwrap(), 1);
        assert!(store.job(old.job_instance_id).await.unwrap().is_none());
        // The running job and its hosts are untouched.
        assert!(store.job(running.job_instance_id).await.unwrap().is_some());
        assert_eq!(
            store
                .host_results(running.step_instance_id)
                .await
                .unwrap()
                .len(),
            2
        );
    }

    /// A job retried after retention picked it is running again: neither its host rows nor
    /// its step nor the job go, though it was due when it was picked.
    #[tokio::test]
    async fn a_job_retried_after_it_was_picked_keeps_everything() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&crate::test_job(1..=3, 5)).await.unwrap();
        for host in 1..=3 {
            store
                .record(Write::HostLog {
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: job.step_instance_id,
                    bk_host_id: host,
                    offset: 0,
                    data: b"abc\n".to_vec(),
                })
                .await
                .unwrap();
        }
        store
            .record(Write::JobFinished {
                job_instance_id: job.job_instance_id,
                status: 4,
                at: 10,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        let jobs = store.prunable_jobs(100, &[4], 10).await.unwrap();
        assert_eq!(jobs, [job.job_instance_id]);

        let retried = store
            .retry_step(
                job.job_instance_id,
                job.step_instance_id,
                4,
                2,
                &crate::RetryScope::default(),
            )
            .await
            .unwrap()
            .expect("the failed job is retried");
        assert_eq!(retried.hosts, [1, 2, 3]);

        assert_eq!(store.prune_host_rows(&jobs, 100, 64).await.unwrap(), 0);
        assert_eq!(store.remove_jobs(&jobs, 100).await.unwrap(), 0);
        let kept = store.job(job.job_instance_id).await.unwrap().unwrap();
        assert_eq!(kept.status, 2);
        assert_eq!(
            store
                .host_results(job.step_instance_id)
                .await
                .unwrap()
                .len(),
            3,
            "the retried hosts still have their rows"
        );
        assert_eq!(kept.steps.len(), 1, "the retried job keeps its step");
    }

    #[test]
    fn placeholders_are_numbered_after_the_offset() {
        assert_eq!(placeholders(0, 3), "$1, $2, $3");
        assert_eq!(placeholders(1, 2), "$2, $3");
    }
}
