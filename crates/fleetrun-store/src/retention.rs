//! Retention: finished jobs older than the configured age removed with everything that hangs
//! off them (steps, host results, logs, callback deliveries and attempts), a few at a time.
//!
//! Each batch is one short transaction, so the engine's writer and new jobs wait at most for one
//! batch, never for the whole pruning. The audit log is not touched.

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
        if finished.is_empty() || batch == 0 {
            return Ok(0);
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
        let jobs: Vec<i64> = query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if jobs.is_empty() {
            return Ok(0);
        }
        let ids = placeholders(0, jobs.len());
        let steps =
            format!("SELECT step_instance_id FROM step_instance WHERE job_instance_id IN ({ids})");
        let statements = [
            format!("DELETE FROM host_log WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM host_result WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM host_task WHERE step_instance_id IN ({steps})"),
            format!(
                "DELETE FROM callback_attempt WHERE delivery_id IN \
                 (SELECT id FROM callback_delivery WHERE job_instance_id IN ({ids}))"
            ),
            format!("DELETE FROM callback_delivery WHERE job_instance_id IN ({ids})"),
            format!("DELETE FROM rolling_host WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM step_rolling WHERE step_instance_id IN ({steps})"),
            format!("DELETE FROM step_instance WHERE job_instance_id IN ({ids})"),
            // Checked again inside the transaction: a job is never removed unless finished.
            format!(
                "DELETE FROM job_instance WHERE job_instance_id IN ({ids}) \
                 AND end_time IS NOT NULL AND end_time < ${}",
                jobs.len() + 1
            ),
        ];
        let mut tx = self.noting_write_failure(self.pool.begin().await)?;
        let mut removed = 0;
        for (i, sql) in statements.iter().enumerate() {
            let mut query = sqlx::query(sql);
            for id in &jobs {
                query = query.bind(id);
            }
            if i == statements.len() - 1 {
                query = query.bind(ended_before);
            }
            let done = self.noting_write_failure(query.execute(&mut *tx).await)?;
            removed = done.rows_affected() as usize;
        }
        self.noting_write_failure(tx.commit().await)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::placeholders;

    #[test]
    fn placeholders_are_numbered_after_the_offset() {
        assert_eq!(placeholders(0, 3), "$1, $2, $3");
        assert_eq!(placeholders(1, 2), "$2, $3");
    }
}
