//! Rolling steps through the API: the `rolling_config` hook of `fast_execute_script`, starting a
//! step (rolling or not), and `operate_step_instance` (go on with the next batch, ignore the
//! failures so far, end a job waiting for a confirmation).

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
use crate::{
    Shared,
    engine::{JobSpec, RollingStart, TaskTemplate},
    rolling::{ConfigError, RollingConfig},
    status,
};

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError::new(e.code, e.message)
    }
}

/// A submitted step's rolling plan: the checked configuration and its batches.
#[derive(Debug)]
pub(super) struct Plan {
    config: RollingConfig,
    batches: Vec<Vec<i64>>,
}

/// Checks `rolling_config` (null or absent: no rolling) and cuts `hosts` into its batches.
pub(super) fn plan(
    rolling_config: Option<&Value>,
    hosts: &[i64],
) -> Result<Option<Plan>, ApiError> {
    let Some(value) = rolling_config.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let config = RollingConfig::from_json(value)?;
    let batches = config.batches(hosts)?;
    Ok(Some(Plan { config, batches }))
}

/// Checks `rolling_config` alone, before the targets are resolved: bk-job refuses a bad
/// configuration before it looks at the hosts.
pub(super) fn check(rolling_config: Option<&Value>) -> Result<(), ApiError> {
    match rolling_config.filter(|v| !v.is_null()) {
        None => Ok(()),
        Some(value) => RollingConfig::from_json(value)
            .map(|_| ())
            .map_err(Into::into),
    }
}

impl Plan {
    /// The plan as the store keeps it, written with the job.
    pub(super) fn stored(&self) -> Result<fleetrun_store::NewRolling, ApiError> {
        Ok(fleetrun_store::NewRolling {
            config: serde_json::to_string(&self.config)
                .map_err(|e| ApiError::internal("rolling", e))?,
            batches: self.batches.clone(),
        })
    }
}

/// Starts a new job if asked to: by batches if it rolls (its plan was stored with it).
pub(super) async fn save_and_start(
    shared: &Shared,
    plan: Option<Plan>,
    spec: JobSpec,
    start: bool,
) -> Result<(), ApiError> {
    if !start {
        return Ok(());
    }
    match plan {
        None => {
            shared.engine.start(spec);
        }
        Some(Plan { config, batches }) => {
            shared.engine.start_rolling(
                spec,
                RollingStart {
                    config,
                    batches,
                    next_batch: 1,
                    earlier_failures: 0,
                    started: None,
                },
            );
        }
    }
    Ok(())
}

/// Starts a job created with `start_task=false`: by batches if it rolls. False if it is running
/// already.
pub(super) async fn start_created(shared: &Shared, spec: JobSpec) -> Result<bool, ApiError> {
    match shared.store.rolling(spec.step_instance_id).await? {
        None => Ok(shared.engine.start(spec)),
        Some(record) => {
            let config = stored_config(&record.config)?;
            let batches = shared.store.rolling_batches(spec.step_instance_id).await?;
            Ok(shared.engine.start_rolling(
                spec,
                RollingStart {
                    config,
                    batches,
                    next_batch: 1,
                    earlier_failures: 0,
                    started: None,
                },
            ))
        }
    }
}

fn stored_config(text: &str) -> Result<RollingConfig, ApiError> {
    serde_json::from_str(text).map_err(|e| ApiError::internal("stored rolling_config", e))
}

#[derive(Debug, Deserialize)]
struct OperateStepRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    step_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    operation_code: i64,
}

#[derive(Debug, Serialize)]
struct OperateStepReply {
    job_instance_id: i64,
    step_instance_id: i64,
}

/// bk-job's step operation codes (`StepOperationEnum`).
pub mod operation {
    pub const RETRY_FAILED: i64 = 2;
    pub const IGNORE_ERROR: i64 = 3;
    pub const CONFIRM_CONTINUE: i64 = 6;
    pub const RETRY_ALL: i64 = 8;
    pub const CONFIRM_TERMINATE: i64 = 9;
    pub const CONFIRM_RESTART: i64 = 10;
    pub const NEXT_STEP: i64 = 11;
    pub const SKIP: i64 = 12;
    pub const ROLLING_CONTINUE: i64 = 13;
}

/// `operate_step_instance`.
///
/// - 6 (confirm continue) and 13 (continue rolling): a rolling job waiting for the user (7)
///   dispatches its next batch.
/// - 3 (ignore error): a rolling job paused on a failed batch (4) dispatches its next batch;
///   the failures so far no longer count against it.
/// - 9 (confirm terminate): a job waiting for the user ends "termination confirmed" (13).
pub async fn operate_step_instance(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: OperateStepRequest = params.parse()?;
    let job = load_job(shared, caller, params, req.job_instance_id).await?;
    let step = job
        .steps
        .iter()
        .find(|s| s.step_instance_id == req.step_instance_id)
        .ok_or_else(|| {
            ApiError::new(
                code::STEP_NOT_FOUND,
                format!(
                    "step_instance_id: job {} has no step {}",
                    job.job_instance_id, req.step_instance_id
                ),
            )
        })?
        .clone();
    let rolling = shared.store.rolling(step.step_instance_id).await?;
    let refuse = |what: &str| {
        ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!(
                "operation_code: {} {what} (job {} has status {}, step {} status {})",
                req.operation_code,
                job.job_instance_id,
                job.status,
                step.step_instance_id,
                step.status
            ),
        )
    };
    match req.operation_code {
        operation::CONFIRM_CONTINUE | operation::ROLLING_CONTINUE => {
            let Some(record) = rolling else {
                return Err(refuse("applies to a rolling step"));
            };
            if job.status != status::job::WAITING_USER {
                return Err(refuse(
                    "applies to a rolling job waiting for a confirmation (7)",
                ));
            }
            go_on(shared, &job, &step, record, false).await?;
        }
        operation::IGNORE_ERROR => {
            let Some(record) = rolling else {
                return Err(refuse(
                    "applies to a rolling step paused on a failed batch; fleetrun's other steps end with the job",
                ));
            };
            if job.status != status::job::FAILED
                || !paused_on_failure(shared, &step, &record).await?
            {
                return Err(refuse("applies to a rolling job paused on a failed batch"));
            }
            go_on(shared, &job, &step, record, true).await?;
        }
        operation::CONFIRM_TERMINATE => {
            if job.status != status::job::WAITING_USER
                || !shared
                    .store
                    .end_rolling_job(
                        job.job_instance_id,
                        step.step_instance_id,
                        status::job::WAITING_USER,
                        status::job::CONFIRM_TERMINATED,
                        crate::now_ms(),
                    )
                    .await?
            {
                return Err(refuse("applies to a job waiting for a confirmation (7)"));
            }
            if let Some(callbacks) = shared.engine.callbacks() {
                callbacks.job_ended(job.job_instance_id);
            }
        }
        operation::RETRY_FAILED
        | operation::RETRY_ALL
        | operation::CONFIRM_RESTART
        | operation::NEXT_STEP
        | operation::SKIP => {
            return Err(ApiError::new(
                code::NOT_SUPPORTED,
                format!(
                    "operation_code: {} is not carried out by fleetrun (it serves 3 ignore error, 6 confirm continue, 9 confirm terminate and 13 continue rolling)",
                    req.operation_code
                ),
            ));
        }
        other => {
            return Err(ApiError::new(
                code::ILLEGAL_PARAM,
                format!("operation_code: {other} is not a step operation"),
            ));
        }
    }
    reply::data(OperateStepReply {
        job_instance_id: job.job_instance_id,
        step_instance_id: step.step_instance_id,
    })
}

/// Whether a rolling job at 4 stopped on a failed batch to wait for an operator (not at its end,
/// not stopped by its failure limit).
async fn paused_on_failure(
    shared: &Shared,
    step: &fleetrun_store::StepRecord,
    record: &fleetrun_store::RollingRecord,
) -> Result<bool, ApiError> {
    let config = stored_config(&record.config)?;
    if record.current_batch >= record.total_batches {
        return Ok(false);
    }
    let hosts = shared
        .store
        .rolling_batches(step.step_instance_id)
        .await?
        .concat()
        .len();
    let failed = shared
        .store
        .failed_hosts(
            step.step_instance_id,
            status::host::UNFINISHED,
            &[3, status::host::SUCCESS],
        )
        .await?;
    let counted = failed.saturating_sub(usize::try_from(record.failures_ignored).unwrap_or(0));
    Ok(config
        .failure_limit(hosts)
        .is_none_or(|limit| counted < limit))
}

/// `operate_job_instance` 1 for a job with no run on this controller: a rolling job paused for
/// an operator (7, or 4 on a failed batch) ends "terminated" (11), as bk-job ends it. False if
/// the job is no such job.
pub(super) async fn terminate_paused(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
) -> Result<bool, ApiError> {
    let Some(step) = job.steps.first() else {
        return Ok(false);
    };
    let Some(record) = shared.store.rolling(step.step_instance_id).await? else {
        return Ok(false);
    };
    // A run that just paused has its pause queued: let it reach the store first.
    shared.store.flush().await?;
    let job_instance_id = job.job_instance_id;
    let paused = match load_paused(shared, job_instance_id).await? {
        Some(status::job::WAITING_USER) => status::job::WAITING_USER,
        Some(status::job::FAILED) if paused_on_failure(shared, step, &record).await? => {
            status::job::FAILED
        }
        _ => return Ok(false),
    };
    let ended = shared
        .store
        .end_rolling_job(
            job_instance_id,
            step.step_instance_id,
            paused,
            status::job::TERMINATE_SUCCESS,
            crate::now_ms(),
        )
        .await?;
    if ended && let Some(callbacks) = shared.engine.callbacks() {
        callbacks.job_ended(job_instance_id);
    }
    Ok(ended)
}

async fn load_paused(shared: &Shared, job_instance_id: i64) -> Result<Option<i32>, ApiError> {
    Ok(shared.store.job(job_instance_id).await?.map(|j| j.status))
}

/// Dispatches a paused rolling job's next batch. With `ignore`, the failed hosts so far stop
/// counting against the job.
async fn go_on(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    record: fleetrun_store::RollingRecord,
    ignore: bool,
) -> Result<(), ApiError> {
    super::execute::refuse_while_unwritable(shared)?;
    let config = stored_config(&record.config)?;
    let batches = shared.store.rolling_batches(step.step_instance_id).await?;
    let task = stored_task(shared, job, step).await?;
    let failed = shared
        .store
        .failed_hosts(
            step.step_instance_id,
            status::host::UNFINISHED,
            &[3, status::host::SUCCESS],
        )
        .await?;
    let failed = i64::try_from(failed).unwrap_or(i64::MAX);
    let ignored = if ignore {
        failed
    } else {
        record.failures_ignored
    };
    // The lease first: once the job shows running, a controller looking for jobs nobody holds
    // must find this one held.
    if !shared.engine.lease_for_start(job.job_instance_id).await {
        return Err(ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!(
                "job_instance_id: job {} is running on another controller",
                job.job_instance_id
            ),
        ));
    }
    let claimed = shared
        .store
        .resume_rolling(
            job.job_instance_id,
            step.step_instance_id,
            job.status,
            status::job::RUNNING,
            ignore.then_some(ignored),
        )
        .await;
    if !matches!(claimed, Ok(true)) {
        shared.engine.lease_unused(job.job_instance_id).await;
        claimed?;
        return Err(ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!(
                "job_instance_id: job {} is not paused any more",
                job.job_instance_id
            ),
        ));
    }
    let spec = JobSpec {
        job_instance_id: job.job_instance_id,
        step_instance_id: step.step_instance_id,
        hosts: batches.concat(),
        task,
    };
    let rolling = RollingStart {
        config,
        batches,
        next_batch: usize::try_from(record.current_batch).unwrap_or(0) + 1,
        earlier_failures: usize::try_from(failed - ignored).unwrap_or(0),
        started: job.start_time,
    };
    // The paused run leaves the running set just after its pause is queued: a confirmation
    // that saw the pause committed may come a moment before that.
    let mut started = false;
    for _ in 0..100 {
        if shared.engine.start_rolling(spec.clone(), rolling.clone()) {
            started = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if !started {
        // Give the pause back rather than leave the job running with no run.
        let _ = shared
            .store
            .resume_rolling(
                job.job_instance_id,
                step.step_instance_id,
                status::job::RUNNING,
                job.status,
                None,
            )
            .await;
        shared.engine.lease_unused(job.job_instance_id).await;
        return Err(ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!("job_instance_id: job {} is running", job.job_instance_id),
        ));
    }
    tracing::info!(
        job = job.job_instance_id,
        batch = record.current_batch + 1,
        ignore,
        "rolling goes on"
    );
    Ok(())
}

/// What the step's hosts run, from the store: the script, the parameter (opened if sealed) and
/// the account, which must still run as it did when the job was created.
async fn stored_task(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
) -> Result<TaskTemplate, ApiError> {
    let scope: fleetrun_inventory::Scope = format!("{}:{}", job.bk_scope_type, job.bk_scope_id)
        .parse()
        .map_err(|e| ApiError::internal("rolling", format!("stored scope: {e}")))?;
    let inventory = shared.inventory.current().await?;
    let account = inventory
        .account_for(&scope, Some(step.account_id), None)
        .map_err(|e| ApiError::new(i64::from(e.code()), format!("account_id: {e}")))?;
    if account.account != step.account {
        return Err(ApiError::invalid(
            "job_instance_id",
            format!(
                "account {} now runs as {:?}, not {:?} as when job {} was created; submit it again",
                step.account_id, account.account, step.account, job.job_instance_id
            ),
        ));
    }
    let (script, param) = shared
        .store
        .step_payload(step.step_instance_id)
        .await?
        .ok_or_else(|| ApiError::internal("rolling", "step vanished"))?;
    let param = if step.is_param_sensitive {
        shared
            .cipher
            .open(&param, job.job_instance_id, step.step_instance_id)
            .map_err(|e| ApiError::internal("rolling", e))?
    } else {
        param
    };
    Ok(TaskTemplate {
        script_language: step.script_language,
        script: std::sync::Arc::new(script),
        script_param: param,
        is_param_sensitive: step.is_param_sensitive,
        account: account.account.clone(),
        timeout_secs: u32::try_from(step.timeout).unwrap_or(u32::MAX),
    })
}
