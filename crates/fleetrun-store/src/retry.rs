//! Retries and execute counts (migration 0014): `operate_step_instance` 2 (failed hosts) and 8
//! (all hosts) run a finished step's hosts again under the next execute_count, bk-job's count of
//! runs (0 for the first).
//!
//! `host_result` and `host_log` always hold each host's latest result and log, so everything
//! that writes them (the writer, checkpoints, a restart's take-up) knows nothing of retries. A
//! retry, in one transaction: copies every host's result into `host_result_history` under the
//! count that ends; moves the retried hosts' logs into `host_log_history` under the count they
//! were written in (`actual_execute_count`); resets the retried hosts to waiting; bumps the
//! step's count; and forgets the job's callback delivery, so its next end is reported again.
//! A host left out keeps its result and log, and its `actual_execute_count`, as bk-job keeps
//! them.

use std::ops::RangeInclusive;

use sqlx::Row;

use crate::{
    HostResultRecord, Store, StoreError,
    job_end::{AlsoWrite, JobEnd, resume_job},
    join_ints,
};

/// Which of a step's hosts a retry runs again.
#[derive(Debug, Clone, Default)]
pub struct RetryScope {
    /// Host statuses that stay as they are (success, for "retry failed"); empty: every host.
    pub keep: Vec<i32>,
    /// Only hosts of these rolling batches; None for every host of the step.
    pub batches: Option<RangeInclusive<i32>>,
}

/// What a retry started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried {
    /// The step's execute_count (bk-job's: 0 for the first run) the retried hosts run under.
    pub execute_count: i64,
    /// The hosts to run again, by id; empty if the scope held none (nothing was changed).
    pub hosts: Vec<i64>,
    /// The tasks the retried hosts' agents were last given, as their checkpoints saved them:
    /// (host, task id, agent id). One whose end was not confirmed may still run there.
    pub earlier_tasks: Vec<(i64, String, String)>,
}

/// The columns `host_result` and `host_result_history` share.
const RESULT_COLUMNS: &str = "bk_host_id, bk_cloud_id, ip, status, tag, exit_code, error_code, \
     start_time, end_time, output_bytes, dropped_bytes, dropped_lines, survivors, actual_execute_count";

impl RetryScope {
    /// The condition on `host_result` rows of the step bound at `$step`.
    fn condition(&self, step: &str) -> String {
        let mut sql = format!("step_instance_id = {step}");
        if !self.keep.is_empty() {
            sql.push_str(&format!(" AND status NOT IN ({})", join_ints(&self.keep)));
        }
        if let Some(batches) = &self.batches {
            // Our own numbers, not a caller's: written into the statement.
            sql.push_str(&format!(
                " AND bk_host_id IN (SELECT bk_host_id FROM rolling_host WHERE step_instance_id = {step} \
                 AND batch >= {} AND batch <= {})",
                batches.start(),
                batches.end()
            ));
        }
        sql
    }
}

impl Store {
    /// Starts the next execute_count of a step whose job is in `paused` (its status now): the
    /// job and step go to `running` with no end time, and the hosts in `scope` wait to run
    /// again. None if the job is not in `paused` any more (someone else took it up).
    pub async fn retry_step(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        paused: i32,
        running: i32,
        scope: &RetryScope,
    ) -> Result<Option<Retried>, StoreError> {
        let retried = async {
            let mut tx = self.pool.begin().await?;
            let claimed = resume_job(&mut tx, job_instance_id, paused, running).await?;
            if !claimed {
                return Ok(None);
            }
            // The store counts runs (a start adds one); bk-job counts retries.
            let runs: i64 = sqlx::query(
                "SELECT execute_count FROM step_instance WHERE step_instance_id = $1",
            )
            .bind(step_instance_id)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
            let ended = (runs - 1).max(0);
            let next = ended + 1;
            let condition = scope.condition("$1");
            let hosts: Vec<i64> = sqlx::query(&format!(
                "SELECT bk_host_id FROM host_result WHERE {condition} ORDER BY bk_host_id"
            ))
            .bind(step_instance_id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
            if hosts.is_empty() {
                // Dropped without a commit: nothing changes.
                return Ok(Some(Retried {
                    execute_count: ended,
                    hosts,
                    earlier_tasks: Vec::new(),
                }));
            }
            sqlx::query(&format!(
                "INSERT INTO host_result_history (step_instance_id, execute_count, {RESULT_COLUMNS})
                 SELECT step_instance_id, $1, {RESULT_COLUMNS} FROM host_result
                 WHERE step_instance_id = $2
                 ON CONFLICT (step_instance_id, execute_count, bk_host_id) DO NOTHING"
            ))
            .bind(ended)
            .bind(step_instance_id)
            .execute(&mut *tx)
            .await?;
            let retried = format!("SELECT bk_host_id FROM host_result WHERE {}", scope.condition("$2"));
            sqlx::query(&format!(
                "INSERT INTO host_log_history (step_instance_id, execute_count, bk_host_id, \"offset\", data)
                 SELECT l.step_instance_id, r.actual_execute_count, l.bk_host_id, l.\"offset\", l.data
                 FROM host_log l JOIN host_result r
                   ON r.step_instance_id = l.step_instance_id AND r.bk_host_id = l.bk_host_id
                 WHERE l.step_instance_id = $1 AND l.bk_host_id IN ({retried})
                 ON CONFLICT (step_instance_id, execute_count, bk_host_id, \"offset\") DO NOTHING"
            ))
            .bind(step_instance_id)
            .bind(step_instance_id)
            .execute(&mut *tx)
            .await?;
            let earlier_tasks: Vec<(i64, String, String)> = sqlx::query(&format!(
                "SELECT bk_host_id, task_id, agent_id FROM host_task
                 WHERE step_instance_id = $1 AND bk_host_id IN ({retried}) ORDER BY bk_host_id"
            ))
            .bind(step_instance_id)
            .bind(step_instance_id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
            for table in ["host_log", "host_task"] {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE step_instance_id = $1 AND bk_host_id IN ({retried})"
                ))
                .bind(step_instance_id)
                .bind(step_instance_id)
                .execute(&mut *tx)
                .await?;
            }
            // The retried hosts pass to the retry's run: a late write of the earlier run's is
            // refused (their epoch advances, `fence`).
            sqlx::query(&format!(
                "UPDATE host_result SET status = $1, tag = '', exit_code = NULL, error_code = 0,
                     start_time = NULL, end_time = NULL, output_bytes = 0, dropped_bytes = 0,
                     dropped_lines = 0, survivors = 0, actual_execute_count = $2,
                     epoch = epoch + 1
                 WHERE {}",
                scope.condition("$3")
            ))
            .bind(WAITING)
            .bind(next)
            .bind(step_instance_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE step_instance SET status = $1, end_time = NULL, execute_count = $2
                 WHERE step_instance_id = $3",
            )
            .bind(running)
            .bind(next + 1)
            .bind(step_instance_id)
            .execute(&mut *tx)
            .await?;
            forget_callback(&mut tx, job_instance_id).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(Retried {
                execute_count: next,
                hosts,
                earlier_tasks,
            }))
        }
        .await;
        self.noting_write_failure(retried)
    }

    /// Ends a retried job in `running` whose run could not be started: the job and step get
    /// `status` and an end time, and the hosts still waiting `host_status`. False if the job is
    /// not in `running` any more.
    pub async fn end_unstarted_retry(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        running: i32,
        status: i32,
        host_status: i32,
        now: i64,
    ) -> Result<bool, StoreError> {
        let end = JobEnd {
            job_instance_id,
            step_instance_id,
            only_from: running,
            job_status: status,
            step_status: status,
            at: now,
        };
        self.end_job(&end, AlsoWrite::WaitingHosts(host_status))
            .await
    }

    /// Ends a job in `failed` whose step's error an operator ignored: the step gets
    /// `step_status`, the job `job_status`, both a new end time, and the job's callback delivery
    /// is forgotten so the new end is reported. False if the job is not in `failed` any more.
    pub async fn ignore_step_error(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        failed: i32,
        step_status: i32,
        job_status: i32,
        now: i64,
    ) -> Result<bool, StoreError> {
        let end = JobEnd {
            job_instance_id,
            step_instance_id,
            only_from: failed,
            job_status,
            step_status,
            at: now,
        };
        self.end_job(&end, AlsoWrite::ForgetCallback).await
    }

    /// A step's host results as they stood at the end of `execute_count` (bk-job's count), or
    /// the latest for the step's current count (or a count it never had).
    pub async fn host_results_at(
        &self,
        step_instance_id: i64,
        execute_count: i64,
    ) -> Result<Vec<HostResultRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM host_result_history WHERE step_instance_id = $1 AND execute_count = $2
             ORDER BY bk_host_id",
        )
        .bind(step_instance_id)
        .bind(execute_count)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return self.host_results(step_instance_id).await;
        }
        Ok(rows.iter().map(HostResultRecord::from_row).collect())
    }

    /// A host's log as it stood at the end of `execute_count` (bk-job's count); None: the
    /// latest. A host left out of a retry shows the log of the run it last ran in.
    pub async fn host_log_at(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        execute_count: Option<i64>,
    ) -> Result<Vec<u8>, StoreError> {
        let Some(execute_count) = execute_count else {
            return self.host_log(step_instance_id, bk_host_id).await;
        };
        let ran_in: Option<i64> = sqlx::query(
            "SELECT actual_execute_count FROM host_result_history
             WHERE step_instance_id = $1 AND execute_count = $2 AND bk_host_id = $3",
        )
        .bind(step_instance_id)
        .bind(execute_count)
        .bind(bk_host_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.get(0));
        // No row: the step's current count, whose logs are the latest.
        let Some(ran_in) = ran_in else {
            return self.host_log(step_instance_id, bk_host_id).await;
        };
        let latest: Option<i64> = sqlx::query(
            "SELECT actual_execute_count FROM host_result WHERE step_instance_id = $1 AND bk_host_id = $2",
        )
        .bind(step_instance_id)
        .bind(bk_host_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.get(0));
        if latest == Some(ran_in) {
            return self.host_log(step_instance_id, bk_host_id).await;
        }
        let rows = sqlx::query(
            "SELECT data FROM host_log_history
             WHERE step_instance_id = $1 AND execute_count = $2 AND bk_host_id = $3
             ORDER BY \"offset\"",
        )
        .bind(step_instance_id)
        .bind(ran_in)
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

/// bk-job's "waiting for execution" host status, which a retried host starts from.
pub(crate) const WAITING: i32 = 5;

/// Forgets a job's callback delivery and its attempts, so that the job's next end is queued
/// and delivered again (a delivery is one per job).
pub(crate) async fn forget_callback(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job_instance_id: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM callback_attempt WHERE delivery_id IN
         (SELECT id FROM callback_delivery WHERE job_instance_id = $1)",
    )
    .bind(job_instance_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM callback_delivery WHERE job_instance_id = $1")
        .bind(job_instance_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{HostOutcome, Write};

    /// Runs every host to `statuses[i]` with the log `logs[i]`, and ends the job `job_status`.
    async fn run(
        store: &crate::Store,
        created: &crate::CreatedJob,
        outcomes: &[(i64, i32, &str)],
        job_status: i32,
    ) {
        let step = created.step_instance_id;
        store
            .record(Write::JobStarted {
                job_instance_id: created.job_instance_id,
                step_instance_id: step,
                status: 2,
                at: 2,
            })
            .await
            .unwrap();
        for &(host, status, log) in outcomes {
            store
                .record(Write::HostLog {
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: step,
                    bk_host_id: host,
                    offset: 0,
                    data: log.as_bytes().to_vec(),
                })
                .await
                .unwrap();
            store
                .record(Write::HostFinished {
                    stored: None,
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: step,
                    bk_host_id: host,
                    outcome: HostOutcome {
                        status,
                        end_time: 3,
                        ..Default::default()
                    },
                })
                .await
                .unwrap();
        }
        for write in [
            Write::StepFinished {
                step_instance_id: step,
                status: job_status,
                at: 4,
            },
            Write::JobFinished {
                job_instance_id: created.job_instance_id,
                status: job_status,
                at: 4,
            },
        ] {
            store.record(write).await.unwrap();
        }
        store.flush().await.unwrap();
    }

    fn statuses(results: &[crate::HostResultRecord]) -> Vec<(i64, i32)> {
        results.iter().map(|r| (r.bk_host_id, r.status)).collect()
    }

    #[tokio::test]
    async fn a_retry_keeps_each_execute_counts_results_and_logs() {
        let (_db, store) = crate::test_store().await;
        let created = store.create_job(&crate::test_job(1..=3, 5)).await.unwrap();
        let (job, step) = (created.job_instance_id, created.step_instance_id);
        run(
            &store,
            &created,
            &[(1, 9, "one ok"), (2, 104, "two failed"), (3, 9, "three ok")],
            4,
        )
        .await;
        // The tasks the agents were given, as their checkpoints saved them.
        let checkpoints: Vec<crate::HostCheckpoint> = [1, 2]
            .into_iter()
            .map(|host| crate::HostCheckpoint {
                epoch: crate::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: host,
                task_id: format!("task-{host}"),
                agent_id: format!("agent-{host}"),
                received: 0,
                stored: 0,
                dropped_bytes: 0,
                dropped_lines: 0,
                truncated: false,
                started_at: None,
                deadline: None,
            })
            .collect();
        store
            .record(crate::Write::Checkpoints {
                checkpoints,
                saved: None,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        let failed_only = super::RetryScope {
            keep: vec![3, 9],
            batches: None,
        };
        // Only from the status the job is in.
        assert_eq!(
            store
                .retry_step(job, step, 3, 2, &failed_only)
                .await
                .unwrap(),
            None
        );
        let retried = store
            .retry_step(job, step, 4, 2, &failed_only)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(retried.execute_count, 1);
        assert_eq!(retried.hosts, [2]);
        // The retried host's earlier task, to discard before the new one goes out.
        assert_eq!(
            retried.earlier_tasks,
            [(2, "task-2".to_owned(), "agent-2".to_owned())]
        );
        let record = store.job(job).await.unwrap().unwrap();
        assert_eq!((record.status, record.end_time), (2, None));
        assert_eq!(record.steps[0].execute_count, 2, "the store counts runs");
        assert_eq!(
            statuses(&store.host_results(step).await.unwrap()),
            [(1, 9), (2, 5), (3, 9)]
        );
        assert!(store.host_log(step, 2).await.unwrap().is_empty());
        // Count 0 as it ended.
        assert_eq!(
            statuses(&store.host_results_at(step, 0).await.unwrap()),
            [(1, 9), (2, 104), (3, 9)]
        );
        assert_eq!(
            store.host_log_at(step, 2, Some(0)).await.unwrap(),
            b"two failed"
        );
        assert_eq!(
            store.host_log_at(step, 1, Some(0)).await.unwrap(),
            b"one ok"
        );

        // Count 1: host 2 runs again and fails again, written at the epoch the retry gave it
        // (the first run's late writes are refused); retry all.
        let epoch = store.host_epochs(step).await.unwrap()[&2];
        assert_eq!(epoch, crate::FIRST_EPOCH + 1);
        store
            .record(Write::HostLog {
                epoch,
                step_instance_id: step,
                bk_host_id: 2,
                offset: 0,
                data: b"two again".to_vec(),
            })
            .await
            .unwrap();
        store
            .record(Write::HostFinished {
                stored: None,
                epoch,
                step_instance_id: step,
                bk_host_id: 2,
                outcome: HostOutcome {
                    status: 104,
                    end_time: 5,
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        store
            .record(Write::JobFinished {
                job_instance_id: job,
                status: 4,
                at: 6,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        let all = store
            .retry_step(job, step, 4, 2, &super::RetryScope::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((all.execute_count, all.hosts), (2, vec![1, 2, 3]));
        // Every count's log is where it was written: host 1 ran in count 0 only, so its log at
        // count 1 is that one; host 2 has one per count.
        for (count, host, log) in [
            (0, 2, &b"two failed"[..]),
            (1, 2, b"two again"),
            (0, 1, b"one ok"),
            (1, 1, b"one ok"),
            (1, 3, b"three ok"),
        ] {
            assert_eq!(
                store.host_log_at(step, host, Some(count)).await.unwrap(),
                log,
                "count {count} host {host}"
            );
        }
        assert_eq!(
            statuses(&store.host_results_at(step, 1).await.unwrap()),
            [(1, 9), (2, 104), (3, 9)]
        );
        assert_eq!(
            statuses(&store.host_results_at(step, 2).await.unwrap()),
            [(1, 5), (2, 5), (3, 5)]
        );

        // Retention removes every count's rows with the job.
        store
            .record(Write::JobFinished {
                job_instance_id: job,
                status: 3,
                at: 10,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.prune_finished_jobs(100, &[3], 10).await.unwrap(), 1);
        use sqlx::Row;
        for table in ["host_result_history", "host_log_history"] {
            let left: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&store.pool)
                .await
                .unwrap()
                .get(0);
            assert_eq!(left, 0, "{table}");
        }
    }

    #[tokio::test]
    async fn a_retry_with_no_host_in_its_scope_changes_nothing() {
        let (_db, store) = crate::test_store().await;
        let created = store.create_job(&crate::test_job(1..=2, 5)).await.unwrap();
        let (job, step) = (created.job_instance_id, created.step_instance_id);
        run(&store, &created, &[(1, 9, "a"), (2, 9, "b")], 11).await;
        let failed_only = super::RetryScope {
            keep: vec![3, 9],
            batches: None,
        };
        let retried = store
            .retry_step(job, step, 11, 2, &failed_only)
            .await
            .unwrap()
            .unwrap();
        assert!(retried.hosts.is_empty());
        let record = store.job(job).await.unwrap().unwrap();
        assert_eq!(record.status, 11);
        assert_eq!(record.steps[0].execute_count, 1);
        // A rolling batch scope: only that batch's hosts.
        store
            .save_rolling(step, "{}", &[vec![1], vec![2]])
            .await
            .unwrap();
        let batch_2 = super::RetryScope {
            keep: Vec::new(),
            batches: Some(2..=2),
        };
        let retried = store
            .retry_step(job, step, 11, 2, &batch_2)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(retried.hosts, [2]);
        assert_eq!(
            statuses(&store.host_results(step).await.unwrap()),
            [(1, 9), (2, 5)]
        );
    }

    /// The job's and its step's (status, end time).
    async fn ends(store: &crate::Store, job: i64) -> [(i32, Option<i64>); 2] {
        let record = store.job(job).await.unwrap().unwrap();
        [
            (record.status, record.end_time),
            (record.steps[0].status, record.steps[0].end_time),
        ]
    }

    #[tokio::test]
    async fn a_job_ends_only_from_the_status_it_is_expected_in() {
        let (_db, store) = crate::test_store().await;
        let created = store.create_job(&crate::test_job(1..=2, 5)).await.unwrap();
        let (job, step) = (created.job_instance_id, created.step_instance_id);
        run(&store, &created, &[(1, 9, "a"), (2, 104, "b")], 11).await;

        // Ignoring the error of a job that is not in `failed` changes nothing.
        assert!(
            !store
                .ignore_step_error(job, step, 2, 12, 3, 20)
                .await
                .unwrap()
        );
        assert_eq!(ends(&store, job).await, [(11, Some(4)), (11, Some(4))]);
        // From `failed`: the job and the step get their own statuses, one end time.
        assert!(
            store
                .ignore_step_error(job, step, 11, 12, 3, 20)
                .await
                .unwrap()
        );
        assert_eq!(ends(&store, job).await, [(3, Some(20)), (12, Some(20))]);
        assert!(
            !store
                .ignore_step_error(job, step, 11, 12, 3, 21)
                .await
                .unwrap()
        );

        // A retry that could not start ends from `running` only; the hosts still waiting get
        // the host status, the others keep theirs.
        let failed_only = super::RetryScope {
            keep: vec![9],
            batches: None,
        };
        let retried = store
            .retry_step(job, step, 3, 2, &failed_only)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(retried.hosts, [2]);
        assert!(
            !store
                .end_unstarted_retry(job, step, 7, 4, 403, 30)
                .await
                .unwrap()
        );
        assert_eq!(ends(&store, job).await, [(2, None), (2, None)]);
        assert!(
            store
                .end_unstarted_retry(job, step, 2, 4, 403, 30)
                .await
                .unwrap()
        );
        assert_eq!(ends(&store, job).await, [(4, Some(30)), (4, Some(30))]);
        assert_eq!(
            statuses(&store.host_results(step).await.unwrap()),
            [(1, 9), (2, 403)]
        );
    }
}
