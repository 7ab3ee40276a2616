//! Rolling steps (migration 0010): the checked `rolling_config` as the API stored it, how many
//! batches it makes and which one went out last, and the batch of every host. The engine reads
//! this to go on with a rolling job after a pause, also after a restart: a paused job has no
//! run in memory, only these rows and its status.

use std::collections::HashMap;

use sqlx::Row;

use crate::{
    Store, StoreError,
    job_end::{AlsoWrite, JobEnd, resume_job},
};

/// A step's rolling plan and progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollingRecord {
    pub step_instance_id: i64,
    /// The checked configuration, as the controller serialised it.
    pub config: String,
    pub total_batches: i32,
    /// The batch dispatched last; 0 before the first.
    pub current_batch: i32,
    /// How many failed hosts operators chose to ignore (operation 3): they no longer count
    /// against the job.
    pub failures_ignored: i64,
}

/// A new job's rolling plan, written with the job ([`Store::create_job_sealing`]).
#[derive(Debug, Clone)]
pub struct NewRolling {
    /// The checked configuration, as the controller serialised it.
    pub config: String,
    /// Every batch's hosts; `batches[0]` is batch 1.
    pub batches: Vec<Vec<i64>>,
}

/// Writes a step's plan within `tx`.
pub(crate) async fn insert_rolling(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    dialect: crate::backend::Dialect,
    step_instance_id: i64,
    config: &str,
    batches: &[Vec<i64>],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO step_rolling (step_instance_id, config, total_batches) VALUES ($1, $2, $3)",
    )
    .bind(step_instance_id)
    .bind(config)
    .bind(i32::try_from(batches.len()).unwrap_or(i32::MAX))
    .execute(&mut **tx)
    .await?;
    let rows: Vec<(i64, i32)> = batches
        .iter()
        .enumerate()
        .flat_map(|(i, hosts)| {
            let batch = i32::try_from(i + 1).unwrap_or(i32::MAX);
            hosts.iter().map(move |&h| (h, batch))
        })
        .collect();
    for chunk in rows.chunks(dialect.max_parameters() / 3) {
        let mut insert = crate::backend::Statement::new(
            dialect,
            "INSERT INTO rolling_host (step_instance_id, bk_host_id, batch)",
        );
        insert.push_values(chunk, |row, (host, batch)| {
            row.push_bind(step_instance_id)
                .push_bind(*host)
                .push_bind(*batch);
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

impl Store {
    /// Records a step's rolling plan: its configuration and each host's batch (`batches[0]` is
    /// batch 1), in one transaction.
    pub async fn save_rolling(
        &self,
        step_instance_id: i64,
        config: &str,
        batches: &[Vec<i64>],
    ) -> Result<(), StoreError> {
        let saved = async {
            let mut tx = self.pool.begin().await?;
            insert_rolling(&mut tx, self.dialect, step_instance_id, config, batches).await?;
            tx.commit().await
        }
        .await;
        self.noting_write_failure(saved)
    }

    /// The job a step belongs to, or None if there is no such step.
    pub async fn step_job(&self, step_instance_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query("SELECT job_instance_id FROM step_instance WHERE step_instance_id = $1")
                .bind(step_instance_id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.get(0)),
        )
    }

    /// A step's rolling plan, or None for a step that does not roll.
    pub async fn rolling(
        &self,
        step_instance_id: i64,
    ) -> Result<Option<RollingRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT config, total_batches, current_batch, failures_ignored
             FROM step_rolling WHERE step_instance_id = $1",
        )
        .bind(step_instance_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| RollingRecord {
            step_instance_id,
            config: row.get(0),
            total_batches: row.get(1),
            current_batch: row.get(2),
            failures_ignored: row.get(3),
        }))
    }

    /// Notes that `batch` is going out.
    pub async fn set_rolling_batch(
        &self,
        step_instance_id: i64,
        batch: i32,
    ) -> Result<(), StoreError> {
        let set =
            sqlx::query("UPDATE step_rolling SET current_batch = $1 WHERE step_instance_id = $2")
                .bind(batch)
                .bind(step_instance_id)
                .execute(&self.pool)
                .await
                .map(|_| ());
        self.noting_write_failure(set)
    }

    /// The hosts of every batch, in order (`[0]` is batch 1), each batch's hosts in the order
    /// they were planned.
    pub async fn rolling_batches(
        &self,
        step_instance_id: i64,
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let rows = sqlx::query(
            "SELECT batch, bk_host_id FROM rolling_host WHERE step_instance_id = $1
             ORDER BY batch, bk_host_id",
        )
        .bind(step_instance_id)
        .fetch_all(&self.pool)
        .await?;
        let mut batches: Vec<Vec<i64>> = Vec::new();
        for row in rows {
            let batch = usize::try_from(row.get::<i32, _>(0)).unwrap_or(0).max(1);
            if batches.len() < batch {
                batches.resize_with(batch, Vec::new);
            }
            batches[batch - 1].push(row.get(1));
        }
        Ok(batches)
    }

    /// Each host's batch in a rolling step; empty for a step that does not roll.
    pub async fn host_batches(
        &self,
        step_instance_id: i64,
    ) -> Result<HashMap<i64, i32>, StoreError> {
        let rows =
            sqlx::query("SELECT bk_host_id, batch FROM rolling_host WHERE step_instance_id = $1")
                .bind(step_instance_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Takes a paused rolling job up again: from `paused` (its status now) to `running`, its
    /// step too, the end time cleared; with `ignore_failures`, that many failed hosts no longer
    /// count against the job. False if the job is not in `paused` any more (someone else took
    /// it up, or it was ended).
    pub async fn resume_rolling(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        paused: i32,
        running: i32,
        ignore_failures: Option<i64>,
    ) -> Result<bool, StoreError> {
        let claimed = async {
            let mut tx = self.pool.begin().await?;
            let claimed = resume_job(&mut tx, job_instance_id, paused, running).await?;
            if claimed {
                sqlx::query(
                    "UPDATE step_instance SET status = $1, end_time = NULL WHERE step_instance_id = $2",
                )
                .bind(running)
                .bind(step_instance_id)
                .execute(&mut *tx)
                .await?;
                if let Some(ignored) = ignore_failures {
                    sqlx::query(
                        "UPDATE step_rolling SET failures_ignored = $1 WHERE step_instance_id = $2",
                    )
                    .bind(ignored)
                    .bind(step_instance_id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok::<bool, sqlx::Error>(claimed)
        }
        .await;
        self.noting_write_failure(claimed)
    }

    /// Ends a rolling job that is in `paused` (an operator's decision, or a plan that could not
    /// be kept): job and step get `status` and an end time. False if the job is not in `paused`
    /// any more.
    pub async fn end_rolling_job(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        paused: i32,
        status: i32,
        now: i64,
    ) -> Result<bool, StoreError> {
        let end = JobEnd {
            job_instance_id,
            step_instance_id,
            only_from: paused,
            job_status: status,
            step_status: status,
            at: now,
        };
        self.end_job(&end, AlsoWrite::Nothing).await
    }

    /// Rolling jobs in one of `statuses` (those a pause leaves a job in that a restart must not
    /// end).
    pub async fn rolling_jobs_in(&self, statuses: &[i32]) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT DISTINCT s.job_instance_id FROM step_rolling r
             JOIN step_instance s ON s.step_instance_id = r.step_instance_id
             JOIN job_instance j ON j.job_instance_id = s.job_instance_id
             WHERE j.status IN ({}) ORDER BY s.job_instance_id",
            crate::join_ints(statuses)
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// How many of a step's hosts ended without success: not in `unfinished`, not in `success`.
    pub async fn failed_hosts(
        &self,
        step_instance_id: i64,
        unfinished: &[i32],
        success: &[i32],
    ) -> Result<usize, StoreError> {
        let count: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) FROM host_result WHERE step_instance_id = $1
             AND status NOT IN ({}) AND status NOT IN ({})",
            crate::join_ints(unfinished),
            crate::join_ints(success)
        ))
        .bind(step_instance_id)
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(usize::try_from(count).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use crate::Write;

    #[tokio::test]
    async fn a_plan_is_written_with_its_job_or_neither_is() {
        use sqlx::Row;
        let (_db, store) = crate::test_store().await;
        let plan = crate::NewRolling {
            config: "{}".into(),
            batches: vec![vec![2], vec![1, 3]],
        };
        let created = store
            .create_job_sealing(&crate::test_job(1..=3, 5), |p, _| p.to_owned(), Some(&plan))
            .await
            .unwrap();
        let record = store
            .rolling(created.step_instance_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.total_batches, 2);
        assert_eq!(
            store.host_batches(created.step_instance_id).await.unwrap()[&3],
            2
        );
        // A plan that cannot be written (a host twice) leaves no job behind to start later on
        // every host at once.
        let bad = crate::NewRolling {
            config: "{}".into(),
            batches: vec![vec![1], vec![1]],
        };
        let mut pending = crate::test_job(1..=3, 5);
        pending.status = 1;
        assert!(
            store
                .create_job_sealing(&pending, |p, _| p.to_owned(), Some(&bad))
                .await
                .is_err()
        );
        let jobs: i64 = sqlx::query("SELECT COUNT(*) FROM job_instance")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(jobs, 1);
    }

    #[tokio::test]
    async fn retention_removes_a_pruned_jobs_plan() {
        use sqlx::Row;
        let (_db, store) = crate::test_store().await;
        let plan = crate::NewRolling {
            config: "{}".into(),
            batches: vec![vec![1], vec![2]],
        };
        let mut kept = crate::test_job(1..=2, 5);
        kept.status = 3;
        let old = store
            .create_job_sealing(&kept, |p, _| p.to_owned(), Some(&plan))
            .await
            .unwrap();
        let young = store
            .create_job_sealing(&kept, |p, _| p.to_owned(), Some(&plan))
            .await
            .unwrap();
        for (created, at) in [(&old, 10), (&young, 1_000)] {
            store
                .record(Write::JobFinished {
                    job_instance_id: created.job_instance_id,
                    status: 3,
                    at,
                })
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!(store.prune_finished_jobs(100, &[3], 10).await.unwrap(), 1);
        assert_eq!(store.rolling(old.step_instance_id).await.unwrap(), None);
        assert!(
            store
                .rolling(young.step_instance_id)
                .await
                .unwrap()
                .is_some()
        );
        let left: i64 = sqlx::query("SELECT COUNT(*) FROM rolling_host")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 2);
    }

    #[tokio::test]
    async fn a_plan_is_kept_and_a_pause_is_taken_up_once() {
        let (_db, store) = crate::test_store().await;
        let created = store
            .create_job(&crate::test_job(1..=700, 5))
            .await
            .unwrap();
        let step = created.step_instance_id;
        assert_eq!(store.rolling(step).await.unwrap(), None);
        // More hosts than one insert takes.
        let batches: Vec<Vec<i64>> = vec![vec![3, 1], vec![2], (4..=700).collect()];
        store.save_rolling(step, "{}", &batches).await.unwrap();
        let mut sorted = batches.clone();
        sorted[0].sort_unstable();
        assert_eq!(store.rolling_batches(step).await.unwrap(), sorted);
        assert_eq!(store.host_batches(step).await.unwrap()[&2], 2);
        store.set_rolling_batch(step, 1).await.unwrap();
        let record = store.rolling(step).await.unwrap().unwrap();
        assert_eq!((record.total_batches, record.current_batch), (3, 1));
        assert_eq!(record.failures_ignored, 0);

        // Host 1 fails, the job pauses as failed.
        store
            .record(Write::HostFinished {
                stored: None,
                epoch: crate::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: 1,
                outcome: crate::HostOutcome {
                    status: 104,
                    end_time: 5,
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        for write in [
            Write::StepFinished {
                step_instance_id: step,
                status: 4,
                at: 6,
            },
            Write::JobFinished {
                job_instance_id: created.job_instance_id,
                status: 4,
                at: 6,
            },
        ] {
            store.record(write).await.unwrap();
        }
        store.flush().await.unwrap();
        assert_eq!(
            store.failed_hosts(step, &[0, 5, 7], &[3, 9]).await.unwrap(),
            1
        );
        assert_eq!(
            store.rolling_jobs_in(&[4]).await.unwrap(),
            [created.job_instance_id]
        );
        assert!(store.rolling_jobs_in(&[7]).await.unwrap().is_empty());

        let job = created.job_instance_id;
        assert!(
            store
                .resume_rolling(job, step, 4, 2, Some(1))
                .await
                .unwrap()
        );
        assert!(
            !store
                .resume_rolling(job, step, 4, 2, Some(1))
                .await
                .unwrap()
        );
        assert_eq!(
            store.rolling(step).await.unwrap().unwrap().failures_ignored,
            1
        );
        let record = store.job(job).await.unwrap().unwrap();
        assert_eq!((record.status, record.end_time), (2, None));
        assert_eq!(record.steps[0].status, 2);
        assert!(!store.end_rolling_job(job, step, 7, 13, 9).await.unwrap());
        assert!(store.end_rolling_job(job, step, 2, 13, 9).await.unwrap());
        let record = store.job(job).await.unwrap().unwrap();
        assert_eq!((record.status, record.end_time), (13, Some(9)));
    }
}
