//! `operate_job_instance`: terminating a running job, and starting one created with
//! `start_task=false`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient},
    query::load_job,
    reply,
};
use crate::{Shared, status};

#[derive(Debug, Deserialize)]
struct OperateJobRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    operation_code: i64,
}

/// `operate_job_instance`: 1 terminates a running job.
pub async fn operate_job_instance(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: OperateJobRequest = params.parse()?;
    let job = load_job(shared, caller, params, req.job_instance_id).await?;
    match req.operation_code {
        OPERATION_TERMINATE => {
            // bk-job terminates a running job, or one waiting for a user's confirmation (a
            // rolling job paused, at 7 or at 4 on a failed batch, ends 11).
            let terminable = matches!(
                job.status,
                status::job::RUNNING | status::job::WAITING_USER | status::job::FAILED
            );
            if !terminable
                || !(shared.engine.terminate(job.job_instance_id).await
                    || super::steps::terminate_paused(shared, &job).await?)
            {
                return Err(ApiError::new(
                    code::UNSUPPORTED_OPERATION,
                    format!(
                        "job_instance_id: job {} is not running (status {}): only a running job can be terminated",
                        job.job_instance_id, job.status
                    ),
                ));
            }
        }
        OPERATION_START => start_created_job(shared, caller, &job).await?,
        other => {
            return Err(ApiError::new(
                code::ILLEGAL_PARAM,
                format!(
                    "operation_code: {other} is not {OPERATION_TERMINATE} (terminate) or {OPERATION_START} (start)"
                ),
            ));
        }
    }
    reply::data(OperateReply {
        job_instance_id: job.job_instance_id,
    })
}

/// `operate_job_instance`'s operation codes.
const OPERATION_TERMINATE: i64 = 1;
const OPERATION_START: i64 = 2;

#[derive(Debug, Serialize)]
struct OperateReply {
    job_instance_id: i64,
}

/// Starts a job created with `start_task=false`, as it would be submitted now: its hosts must
/// still be in its scope and its account still allowed there (the caller's permission on the
/// scope was checked when the job was looked up), else it is refused with the code a fresh
/// submit gets. Moving the job from pending to running is one conditional update in the store,
/// so of concurrent starts, even from controllers sharing the database, exactly one runs it.
async fn start_created_job(
    shared: &Shared,
    caller: &Caller,
    job: &fleetrun_store::JobRecord,
) -> Result<(), ApiError> {
    let not_startable = || {
        ApiError::new(
            code::REPEAT_START_JOB,
            format!(
                "job_instance_id: job {} was already started (status {})",
                job.job_instance_id, job.status
            ),
        )
    };
    if job.status != status::job::PENDING || job.start_time.is_some() {
        return Err(not_startable());
    }
    super::execute::refuse_while_unwritable(shared)?;
    let step = job
        .steps
        .first()
        .ok_or_else(|| ApiError::internal("start job", "job has no step"))?;
    let scope = super::steps::stored_scope(job)?;
    let inventory = shared.inventory.current().await?;
    let hosts = shared.store.host_results(step.step_instance_id).await?;
    let wanted = fleetrun_inventory::Targets {
        host_ids: Some(hosts.iter().map(|h| h.bk_host_id).collect()),
        ..Default::default()
    };
    // A host moved since to a business the caller cannot see is answered as a fresh submit
    // answers it: as not in the inventory, saying nothing of where it went.
    super::scope::refuse_unseen_hosts(caller, &inventory, &wanted)?;
    inventory
        .resolve(&scope, &wanted)
        .map_err(|e| ApiError::new(i64::from(e.code()), format!("target_server: {e}")))?;
    // The accounts, the rules in force and, for a file step, the files it kept decide, as for
    // a fresh submit.
    let work = super::steps::stored_work(
        shared,
        caller,
        job,
        step,
        hosts.iter().map(|h| h.bk_host_id).collect(),
    )
    .await?;
    // The lease first: once the job shows running, a controller looking for jobs nobody holds
    // must find this one held.
    if !shared.engine.lease_for_start(job.job_instance_id).await {
        return Err(not_startable());
    }
    let claimed = shared
        .store
        .claim_pending_job(
            job.job_instance_id,
            status::job::PENDING,
            status::job::RUNNING,
            crate::now_ms(),
        )
        .await;
    if !matches!(claimed, Ok(true)) {
        shared.engine.lease_unused(job.job_instance_id).await;
        claimed?;
        return Err(not_startable());
    }
    let started = super::steps::start_created(shared, step.step_instance_id, work).await;
    if !matches!(started, Ok(true)) {
        shared.engine.lease_unused(job.job_instance_id).await;
        started?;
        return Err(not_startable());
    }
    Ok(())
}
