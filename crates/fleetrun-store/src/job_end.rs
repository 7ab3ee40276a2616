//! A job's conditional end: the job and its step ended together, only while the job is still
//! in the status the caller saw (retry's and rolling's operations end jobs this way, so that an
//! operator or controller that moved the job first wins); and, as conditionally, a paused job
//! put back to running.

use crate::{Store, StoreError, retry};

/// A job's end that holds only while the job is in `only_from`: what [`end_job_and_step`] writes.
pub(crate) struct JobEnd {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// The status the job must still be in.
    pub only_from: i32,
    pub job_status: i32,
    pub step_status: i32,
    pub at: i64,
}

/// In `tx`: if the job is still in `end.only_from`, gives it `end.job_status` and its step
/// `end.step_status`, both ended at `end.at`. False, with nothing written, if the job is not in
/// that status any more (another operator or controller moved it first).
async fn end_job_and_step(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    end: &JobEnd,
) -> Result<bool, sqlx::Error> {
    let ended = sqlx::query(
        "UPDATE job_instance SET status = $1, end_time = $2
         WHERE job_instance_id = $3 AND status = $4",
    )
    .bind(end.job_status)
    .bind(end.at)
    .bind(end.job_instance_id)
    .bind(end.only_from)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if ended {
        sqlx::query(
            "UPDATE step_instance SET status = $1, end_time = $2 WHERE step_instance_id = $3",
        )
        .bind(end.step_status)
        .bind(end.at)
        .bind(end.step_instance_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(ended)
}

/// In `tx`: if the job is still in `only_from` (paused), puts it back in `running` with no end
/// time. False, with nothing written, if it is not in that status any more (another operator or
/// controller took it up first).
pub(crate) async fn resume_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job_instance_id: i64,
    only_from: i32,
    running: i32,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE job_instance SET status = $1, end_time = NULL
         WHERE job_instance_id = $2 AND status = $3",
    )
    .bind(running)
    .bind(job_instance_id)
    .bind(only_from)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// What a job's end writes besides the job and its step, in the same transaction.
pub(crate) enum AlsoWrite {
    Nothing,
    /// The step's hosts still waiting get this status, ended at the end's time.
    WaitingHosts(i32),
    /// The job's callback delivery is forgotten, so that its new end is reported.
    ForgetCallback,
}

impl Store {
    /// Ends the job and its step as `end` says, and writes `also`, in one transaction. False,
    /// with nothing written, if the job is not in `end.only_from` any more.
    pub(crate) async fn end_job(&self, end: &JobEnd, also: AlsoWrite) -> Result<bool, StoreError> {
        let ended = async {
            let mut tx = self.pool.begin().await?;
            if !end_job_and_step(&mut tx, end).await? {
                return Ok(false);
            }
            match also {
                AlsoWrite::Nothing => {}
                AlsoWrite::WaitingHosts(host_status) => {
                    sqlx::query(
                        "UPDATE host_result SET status = $1, end_time = $2
                         WHERE step_instance_id = $3 AND status = $4",
                    )
                    .bind(host_status)
                    .bind(end.at)
                    .bind(end.step_instance_id)
                    .bind(retry::WAITING)
                    .execute(&mut *tx)
                    .await?;
                }
                AlsoWrite::ForgetCallback => {
                    retry::forget_callback(&mut tx, end.job_instance_id).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(true)
        }
        .await;
        self.noting_write_failure(ended)
    }
}
