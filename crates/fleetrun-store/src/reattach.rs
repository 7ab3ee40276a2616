//! What a restarted controller needs to take up tasks that outlived it on their agents: a
//! checkpoint per (step, host) (`host_task`, migration 0007), the running jobs to resume, and the
//! end of jobs that cannot be.
//!
//! A checkpoint is written only after the log it describes was committed (the engine flushes
//! first), so it never runs ahead of the log; log chunks past it are removed when the task is
//! taken up, and the agent sends that output again from the checkpoint's offset.

use sqlx::Row;

use crate::{Dialect, Statement, Store, StoreError};

/// Where one (step, host) stands with the agent that owns its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCheckpoint {
    pub step_instance_id: i64,
    pub bk_host_id: i64,
    pub task_id: String,
    pub agent_id: String,
    /// The agent's output offset the log holds.
    pub received: i64,
    /// Bytes in the host's log.
    pub stored: i64,
    pub dropped_bytes: i64,
    pub dropped_lines: i64,
    /// Whether the agent's truncation marker is in the log.
    pub truncated: bool,
    pub started_at: Option<i64>,
    pub deadline: Option<i64>,
    /// The host's epoch its writer holds it at ([`crate::fence`]): saved only while the host is
    /// still there; as read from the store, the host's epoch then.
    pub epoch: i64,
}

/// A host of a job being resumed: its checkpoint, if its task is out on an agent that owns it.
#[derive(Debug, Clone)]
pub struct ResumableHost {
    pub bk_host_id: i64,
    pub checkpoint: Option<HostCheckpoint>,
    /// The controller the host was handed to (`task_handover`): that one records it, so its
    /// log is left as it is and no checkpoint is given.
    pub handed_to: Option<String>,
    /// The host's epoch, advanced by the take-up for a host not handed (its writes are now
    /// the taker's; those of whoever ran it before are refused).
    pub epoch: i64,
}

/// What the store holds of a task by its id: its checkpoint, and where its job and host stand.
#[derive(Debug, Clone)]
pub struct StoredTask {
    pub job_instance_id: i64,
    pub job_status: i32,
    pub host_status: i32,
    pub checkpoint: HostCheckpoint,
}

/// A job that was running when the controller stopped.
#[derive(Debug, Clone)]
pub struct ResumableJob {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub status: i32,
    pub start_time: Option<i64>,
    pub timeout_secs: i64,
    /// Hosts without a final status.
    pub hosts: Vec<ResumableHost>,
    /// Whether every host already final ended with the success status asked about.
    pub finished_hosts_succeeded: bool,
}

/// Upserts `checkpoints` (one per (step, host), at most `max_parameters / 12` of them) in one
/// statement, each only while its host is at the checkpoint's epoch; returns how many were
/// applied. Checkpoints are written by the store's writer ([`crate::Write::Checkpoints`]), in
/// the group commit that also holds the log they describe, or a later one.
pub(crate) async fn upsert_checkpoints(
    connection: &mut sqlx::AnyConnection,
    dialect: Dialect,
    checkpoints: &[&HostCheckpoint],
) -> Result<u64, sqlx::Error> {
    if checkpoints.is_empty() {
        return Ok(0);
    }
    let mut insert = Statement::new(
        dialect,
        "INSERT INTO host_task (step_instance_id, bk_host_id, task_id, agent_id, received,
             stored, dropped_bytes, dropped_lines, truncated, started_at, deadline)
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7,
             v.column8, v.column9, v.column10, v.column11 FROM (",
    );
    insert.push_values(checkpoints.iter().copied(), |row, c| {
        row.push_bind(c.step_instance_id)
            .push_bind(c.bk_host_id)
            .push_bind(c.task_id.as_str())
            .push_bind(c.agent_id.as_str())
            .push_bind(c.received)
            .push_bind(c.stored)
            .push_bind(c.dropped_bytes)
            .push_bind(c.dropped_lines)
            .push_bind(i64::from(c.truncated))
            .push_bind(c.started_at)
            .push_bind(c.deadline)
            .push_bind(c.epoch);
    });
    insert.push(") AS v WHERE ");
    insert.push(&crate::fence::not_fenced_out("column12"));
    insert.push(
        " ON CONFLICT (step_instance_id, bk_host_id) DO UPDATE SET
             task_id = excluded.task_id, agent_id = excluded.agent_id,
             received = excluded.received, stored = excluded.stored,
             dropped_bytes = excluded.dropped_bytes, dropped_lines = excluded.dropped_lines,
             truncated = excluded.truncated, started_at = excluded.started_at,
             deadline = excluded.deadline",
    );
    Ok(insert.build().execute(connection).await?.rows_affected())
}

impl Store {
    /// The task out on (step, host) as the store has it: its checkpoint (the last saved), its
    /// job's and its host's status; `None` if the host has no checkpoint.
    pub async fn stored_task(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
    ) -> Result<Option<StoredTask>, StoreError> {
        let row = sqlx::query(
            "SELECT t.step_instance_id, t.bk_host_id, t.task_id, t.agent_id, t.received, t.stored,
                    t.dropped_bytes, t.dropped_lines, t.truncated, t.started_at, t.deadline,
                    j.job_instance_id, j.status, r.status, r.epoch
             FROM host_task t
             JOIN step_instance s ON s.step_instance_id = t.step_instance_id
             JOIN job_instance j ON j.job_instance_id = s.job_instance_id
             JOIN host_result r
                 ON r.step_instance_id = t.step_instance_id AND r.bk_host_id = t.bk_host_id
             WHERE t.step_instance_id = $1 AND t.bk_host_id = $2",
        )
        .bind(step_instance_id)
        .bind(bk_host_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| StoredTask {
            job_instance_id: row.get(11),
            job_status: row.get(12),
            host_status: row.get(13),
            checkpoint: HostCheckpoint {
                step_instance_id: row.get(0),
                bk_host_id: row.get(1),
                task_id: row.get(2),
                agent_id: row.get(3),
                received: row.get(4),
                stored: row.get(5),
                dropped_bytes: row.get(6),
                dropped_lines: row.get(7),
                truncated: row.get::<i64, _>(8) != 0,
                started_at: row.get(9),
                deadline: row.get(10),
                epoch: row.get(14),
            },
        }))
    }

    /// The jobs in `unfinished_job_statuses`, each with its hosts in `unfinished_host_statuses`
    /// and their checkpoints; the log past each checkpoint is removed (it was committed after
    /// the checkpoint and the agent sends it again).
    pub async fn resumable_jobs(
        &self,
        unfinished_job_statuses: &[i32],
        unfinished_host_statuses: &[i32],
        success_host_status: i32,
    ) -> Result<Vec<ResumableJob>, StoreError> {
        self.resumable_jobs_among(
            None,
            unfinished_job_statuses,
            unfinished_host_statuses,
            success_host_status,
        )
        .await
    }

    /// [`Store::resumable_jobs`] for the one job `job_instance_id`: `None` unless it is
    /// unfinished. For a job no run of the engine follows (its hosts' logs past their
    /// checkpoints are removed).
    pub async fn resumable_job(
        &self,
        job_instance_id: i64,
        unfinished_job_statuses: &[i32],
        unfinished_host_statuses: &[i32],
        success_host_status: i32,
    ) -> Result<Option<ResumableJob>, StoreError> {
        let mut jobs = self
            .resumable_jobs_among(
                Some(&[job_instance_id]),
                unfinished_job_statuses,
                unfinished_host_statuses,
                success_host_status,
            )
            .await?;
        Ok(jobs.pop())
    }

    /// [`Store::resumable_jobs`], among the jobs `only` lists when given (those whose lease a
    /// controller took: the log of another controller's job is left alone).
    pub async fn resumable_jobs_among(
        &self,
        only: Option<&[i64]>,
        unfinished_job_statuses: &[i32],
        unfinished_host_statuses: &[i32],
        success_host_status: i32,
    ) -> Result<Vec<ResumableJob>, StoreError> {
        if only.is_some_and(<[i64]>::is_empty) {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let job_list = crate::join_ints(unfinished_job_statuses);
        let host_list = crate::join_ints(unfinished_host_statuses);
        let among = only.map_or_else(String::new, |ids| {
            format!(" AND j.job_instance_id IN ({})", crate::join_ids(ids))
        });
        let rows = sqlx::query(&format!(
            "SELECT j.job_instance_id, s.step_instance_id, j.status, j.start_time, s.timeout
             FROM job_instance j JOIN step_instance s ON s.job_instance_id = j.job_instance_id
             WHERE j.status IN ({job_list}){among} ORDER BY j.job_instance_id"
        ))
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let step_instance_id: i64 = row.get(1);
            // The hosts this take-up runs itself pass to it: whoever ran them before (a
            // controller that stalled rather than died) has its late writes refused.
            sqlx::query(&format!(
                "UPDATE host_result SET epoch = epoch + 1
                 WHERE step_instance_id = $1 AND status IN ({host_list})
                   AND NOT EXISTS (SELECT 1 FROM task_handover h
                       WHERE h.step_instance_id = host_result.step_instance_id
                         AND h.bk_host_id = host_result.bk_host_id)"
            ))
            .bind(step_instance_id)
            .execute(&mut *tx)
            .await?;
            let hosts = sqlx::query(&format!(
                "SELECT r.bk_host_id, t.task_id, t.agent_id, t.received, t.stored, t.dropped_bytes,
                        t.dropped_lines, t.truncated, t.started_at, t.deadline, h.controller,
                        r.epoch
                 FROM host_result r LEFT JOIN host_task t
                     ON t.step_instance_id = r.step_instance_id AND t.bk_host_id = r.bk_host_id
                 LEFT JOIN task_handover h
                     ON h.step_instance_id = r.step_instance_id AND h.bk_host_id = r.bk_host_id
                 WHERE r.step_instance_id = $1 AND r.status IN ({host_list})
                 ORDER BY r.bk_host_id"
            ))
            .bind(step_instance_id)
            .fetch_all(&mut *tx)
            .await?;
            let failed: i64 = sqlx::query(&format!(
                "SELECT COUNT(*) FROM host_result
                 WHERE step_instance_id = $1 AND status NOT IN ({host_list}) AND status <> $2"
            ))
            .bind(step_instance_id)
            .bind(success_host_status)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
            let mut resumable = Vec::with_capacity(hosts.len());
            for h in hosts {
                let bk_host_id: i64 = h.get(0);
                let handed_to: Option<String> = h.get(10);
                let epoch: i64 = h.get(11);
                let task_id = h
                    .get::<Option<String>, _>(1)
                    .filter(|_| handed_to.is_none());
                let checkpoint = match task_id {
                    None => None,
                    Some(task_id) => {
                        let checkpoint = HostCheckpoint {
                            step_instance_id,
                            bk_host_id,
                            task_id,
                            agent_id: h.get(2),
                            received: h.get(3),
                            stored: h.get(4),
                            dropped_bytes: h.get(5),
                            dropped_lines: h.get(6),
                            truncated: h.get::<i64, _>(7) != 0,
                            started_at: h.get(8),
                            deadline: h.get(9),
                            epoch,
                        };
                        sqlx::query(
                            "DELETE FROM host_log
                             WHERE step_instance_id = $1 AND bk_host_id = $2 AND \"offset\" >= $3",
                        )
                        .bind(step_instance_id)
                        .bind(bk_host_id)
                        .bind(checkpoint.stored)
                        .execute(&mut *tx)
                        .await?;
                        Some(checkpoint)
                    }
                };
                resumable.push(ResumableHost {
                    bk_host_id,
                    checkpoint,
                    handed_to,
                    epoch,
                });
            }
            jobs.push(ResumableJob {
                job_instance_id: row.get(0),
                step_instance_id,
                status: row.get(2),
                start_time: row.get(3),
                timeout_secs: row.get(4),
                hosts: resumable,
                finished_hosts_succeeded: failed == 0,
            });
        }
        tx.commit().await?;
        Ok(jobs)
    }
}

impl Store {
    /// Ends every job left pending or running when the controller last stopped, except those in
    /// `keep` (taken up again by the engine): their unfinished hosts get `host_status` with
    /// `tag`, the job and its unfinished steps `job_status`. Returns the jobs ended.
    #[allow(clippy::too_many_arguments)]
    pub async fn end_interrupted_jobs_except(
        &self,
        keep: &[i64],
        host_status: i32,
        tag: &str,
        job_status: i32,
        unfinished_host_statuses: &[i32],
        unfinished_job_statuses: &[i32],
        now: i64,
    ) -> Result<Vec<i64>, StoreError> {
        self.end_interrupted_jobs_among(
            None,
            keep,
            host_status,
            tag,
            job_status,
            unfinished_host_statuses,
            unfinished_job_statuses,
            now,
        )
        .await
    }

    /// [`Store::end_interrupted_jobs_except`], among the jobs `only` lists when given (those
    /// whose lease a controller took: another controller's jobs are left alone).
    #[allow(clippy::too_many_arguments)]
    pub async fn end_interrupted_jobs_among(
        &self,
        only: Option<&[i64]>,
        keep: &[i64],
        host_status: i32,
        tag: &str,
        job_status: i32,
        unfinished_host_statuses: &[i32],
        unfinished_job_statuses: &[i32],
        now: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let job_list = crate::join_ints(unfinished_job_statuses);
        let host_list = crate::join_ints(unfinished_host_statuses);
        let jobs: Vec<i64> = sqlx::query(&format!(
            "SELECT job_instance_id FROM job_instance WHERE status IN ({job_list})"
        ))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get::<i64, _>(0))
        .filter(|job| !keep.contains(job) && only.is_none_or(|only| only.contains(job)))
        .collect();
        for job in &jobs {
            sqlx::query(&format!(
                "UPDATE host_result SET status = $1, tag = $2, end_time = $3, epoch = epoch + 1
                 WHERE status IN ({host_list}) AND step_instance_id IN
                     (SELECT step_instance_id FROM step_instance WHERE job_instance_id = $4)"
            ))
            .bind(host_status)
            .bind(tag)
            .bind(now)
            .bind(job)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "UPDATE step_instance SET status = $1, end_time = $2
                 WHERE job_instance_id = $3 AND status IN ({job_list})"
            ))
            .bind(job_status)
            .bind(now)
            .bind(job)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE job_instance SET status = $1, end_time = $2 WHERE job_instance_id = $3",
            )
            .bind(job_status)
            .bind(now)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Write;

    fn checkpoint(step: i64, host: i64, received: i64) -> HostCheckpoint {
        HostCheckpoint {
            epoch: crate::FIRST_EPOCH,
            step_instance_id: step,
            bk_host_id: host,
            task_id: format!("task-{host}"),
            agent_id: format!("agent-{host}"),
            received,
            stored: received,
            dropped_bytes: 0,
            dropped_lines: 0,
            truncated: false,
            started_at: Some(1_000),
            deadline: Some(2_000),
        }
    }

    #[tokio::test]
    async fn checkpoints_commit_with_the_writes_last_one_standing_and_say_so() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&crate::test_job(1..=3, 5)).await.unwrap();
        let step = job.step_instance_id;
        // Host 1 twice in one batch (the last stands), host 2 in a later one.
        let (saved_tx, saved) = tokio::sync::oneshot::channel();
        store
            .record(Write::Checkpoints {
                checkpoints: vec![checkpoint(step, 1, 5), checkpoint(step, 1, 9)],
                saved: Some(saved_tx),
            })
            .await
            .unwrap();
        store
            .record(Write::Checkpoints {
                checkpoints: vec![checkpoint(step, 2, 3)],
                saved: None,
            })
            .await
            .unwrap();
        saved.await.expect("answered once committed");
        store.flush().await.unwrap();

        let stored = store.stored_task(step, 1).await.unwrap().unwrap();
        assert_eq!(stored.checkpoint, checkpoint(step, 1, 9));
        assert_eq!(
            (
                stored.job_instance_id,
                stored.job_status,
                stored.host_status
            ),
            (job.job_instance_id, 2, 5)
        );
        assert!(store.stored_task(step, 3).await.unwrap().is_none());

        let resumable = store
            .resumable_job(job.job_instance_id, &[2], &[5], 9)
            .await
            .unwrap()
            .unwrap();
        let with: Vec<(i64, Option<i64>)> = resumable
            .hosts
            .iter()
            .map(|h| (h.bk_host_id, h.checkpoint.as_ref().map(|c| c.received)))
            .collect();
        assert_eq!(with, vec![(1, Some(9)), (2, Some(3)), (3, None)]);
        assert!(
            store
                .resumable_job(job.job_instance_id, &[10], &[5], 9)
                .await
                .unwrap()
                .is_none(),
            "a job in no status asked about is not resumable"
        );
    }
}
