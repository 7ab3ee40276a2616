//! Rolling steps through the API: the `rolling_config` hook of `fast_execute_script`, starting a
//! step (rolling or not), and `operate_step_instance` (go on with the next batch, ignore the
//! failures so far, end a job waiting for a confirmation, retry failed or all hosts under a new
//! execute_count).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient},
    query::load_step,
    reply,
};
use crate::{
    Shared,
    engine::{FileStep, JobSpec, RollingStart, TaskTemplate, Work},
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
    work: Work,
    start: bool,
) -> Result<(), ApiError> {
    if !start {
        return Ok(());
    }
    match plan {
        None => {
            shared.engine.start_work(work);
        }
        Some(Plan { config, batches }) => {
            shared.engine.start_rolling_work(
                work,
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
pub(super) async fn start_created(
    shared: &Shared,
    step_instance_id: i64,
    work: Work,
) -> Result<bool, ApiError> {
    match shared.store.rolling(step_instance_id).await? {
        None => Ok(shared.engine.start_work(work)),
        Some(record) => {
            let config = stored_config(&record.config)?;
            let batches = shared.store.rolling_batches(step_instance_id).await?;
            Ok(shared.engine.start_rolling_work(
                work,
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

/// Step statuses a retry applies to, as bk-job's `isStepSupportRetry`: failed, abnormal,
/// terminated.
const RETRYABLE: [i32; 3] = [
    status::job::FAILED,
    status::job::ABNORMAL,
    status::job::TERMINATE_SUCCESS,
];

/// `operate_step_instance`.
///
/// - 2 (retry failed) and 8 (retry all): a step that failed (4), ended abnormally (9) or was
///   terminated (11) runs its failed hosts (or all of them) again under the next execute_count;
///   a rolling step, those of the batch it stopped at (of every batch that went out, when
///   staggered), then rolls on from there.
/// - 6 (confirm continue) and 13 (continue rolling): a rolling job waiting for the user (7)
///   dispatches its next batch.
/// - 3 (ignore error): a rolling job paused on a failed batch (4) dispatches its next batch;
///   the failures so far no longer count against it. A failed step with nothing left to
///   dispatch (not rolling, or its last batch failed) ends "ignore error" (6), its job
///   successful (3), as bk-job ends a job whose last step's error is ignored.
/// - 9 (confirm terminate): a job waiting for the user ends "termination confirmed" (13).
pub async fn operate_step_instance(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: OperateStepRequest = params.parse()?;
    let (job, step) = load_step(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.step_instance_id,
    )
    .await?;
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
            go_on(shared, caller, &job, &step, record, false).await?;
        }
        operation::IGNORE_ERROR => {
            if job.status != status::job::FAILED || step.status != status::job::FAILED {
                return Err(refuse("applies to a failed step (4)"));
            }
            match rolling {
                Some(record) if record.current_batch < record.total_batches => {
                    if !paused_on_failure(shared, &step, &record).await? {
                        return Err(refuse(
                            "applies to a rolling job paused on a failed batch, not one stopped by its failure limit (retry it instead)",
                        ));
                    }
                    go_on(shared, caller, &job, &step, record, true).await?;
                }
                // A step with nothing left to dispatch: bk-job marks it "ignore error" (6) and
                // the job, with no step after it, ends successful.
                _ => {
                    if !shared
                        .store
                        .ignore_step_error(
                            job.job_instance_id,
                            step.step_instance_id,
                            status::job::FAILED,
                            status::job::IGNORE_ERROR,
                            status::job::SUCCESS,
                            crate::now_ms(),
                        )
                        .await?
                    {
                        return Err(refuse("applies to a failed step (4)"));
                    }
                    shared.engine.callbacks().job_ended(job.job_instance_id);
                }
            }
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
            shared.engine.callbacks().job_ended(job.job_instance_id);
        }
        operation::RETRY_FAILED | operation::RETRY_ALL => {
            if !RETRYABLE.contains(&job.status) || !RETRYABLE.contains(&step.status) {
                return Err(refuse(
                    "applies to a step that failed (4), ended abnormally (9) or was terminated (11)",
                ));
            }
            retry(
                shared,
                caller,
                &job,
                &step,
                rolling,
                req.operation_code == operation::RETRY_ALL,
            )
            .await?;
        }
        operation::CONFIRM_RESTART | operation::NEXT_STEP | operation::SKIP => {
            return Err(ApiError::new(
                code::NOT_SUPPORTED,
                format!(
                    "operation_code: {} is not carried out by fleetrun (it serves 2 retry failed, 3 ignore error, 6 confirm continue, 8 retry all, 9 confirm terminate and 13 continue rolling)",
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
            status::host::SUCCEEDED,
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
    if ended {
        shared.engine.callbacks().job_ended(job_instance_id);
    }
    Ok(ended)
}

async fn load_paused(shared: &Shared, job_instance_id: i64) -> Result<Option<i32>, ApiError> {
    Ok(shared.store.job(job_instance_id).await?.map(|j| j.status))
}

/// Refuses, as a fresh submit to them would be, `hosts` of `job` that are no longer in its
/// business: a stored step's hosts are checked again before they are given its script again.
async fn refuse_hosts_out_of_scope(
    shared: &Shared,
    caller: &Caller,
    job: &fleetrun_store::JobRecord,
    hosts: Vec<i64>,
) -> Result<(), ApiError> {
    if hosts.is_empty() {
        return Ok(());
    }
    let job_scope: fleetrun_inventory::Scope = format!("{}:{}", job.bk_scope_type, job.bk_scope_id)
        .parse()
        .map_err(|e| ApiError::internal("stored step", format!("stored scope: {e}")))?;
    let inventory = shared.inventory.current().await?;
    let wanted = fleetrun_inventory::Targets {
        host_ids: Some(hosts),
        ..Default::default()
    };
    super::scope::refuse_unseen_hosts(caller, &inventory, &wanted)?;
    inventory
        .resolve(&job_scope, &wanted)
        .map_err(|e| ApiError::new(i64::from(e.code()), format!("target_server: {e}")))?;
    Ok(())
}

/// Dispatches a paused rolling job's next batch. With `ignore`, the failed hosts so far stop
/// counting against the job.
async fn go_on(
    shared: &Shared,
    caller: &Caller,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    record: fleetrun_store::RollingRecord,
    ignore: bool,
) -> Result<(), ApiError> {
    super::execute::refuse_while_unwritable(shared)?;
    let config = stored_config(&record.config)?;
    let batches = shared.store.rolling_batches(step.step_instance_id).await?;
    let work = stored_work(shared, caller, job, step, batches.concat()).await?;
    // The batches still to go out.
    let later: Vec<i64> = batches
        .iter()
        .skip(usize::try_from(record.current_batch).unwrap_or(0))
        .flatten()
        .copied()
        .collect();
    refuse_hosts_out_of_scope(shared, caller, job, later).await?;
    let failed = shared
        .store
        .failed_hosts(
            step.step_instance_id,
            status::host::UNFINISHED,
            status::host::SUCCEEDED,
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
        if shared
            .engine
            .start_rolling_work(work.clone(), rolling.clone())
        {
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

/// What a stored step sends `hosts` (a script step's; a file step goes to all of its own), from
/// the store, as a fresh submit would send it now: a script through [`stored_task`], a file
/// step's files through `files::created_push` or `transfer::created_transfer` (the files the
/// job keeps, its sources' hosts and accounts checked again). Every path that dispatches a
/// stored step (a created job's start, a rolling job going on) takes its work from here.
pub(super) async fn stored_work(
    shared: &Shared,
    caller: &Caller,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    hosts: Vec<i64>,
) -> Result<Work, ApiError> {
    if step.step_type != super::files::STEP_TYPE_FILE {
        return Ok(Work::Script(JobSpec {
            job_instance_id: job.job_instance_id,
            step_instance_id: step.step_instance_id,
            hosts,
            task: stored_task(shared, job, step).await?,
        }));
    }
    let targets = shared.store.host_results(step.step_instance_id).await?;
    let (payload, _) = shared
        .store
        .step_payload(step.step_instance_id)
        .await?
        .ok_or_else(|| ApiError::internal("stored step", "step vanished"))?;
    Ok(Work::Files(if super::files::is_push(&payload) {
        FileStep::Push(super::files::created_push(shared, job, step, &payload, &targets).await?)
    } else {
        FileStep::Transfer(
            super::transfer::created_transfer(shared, caller, job, step, &payload, &targets)
                .await?,
        )
    }))
}

/// What the step's hosts run, from the store: the script, the parameter (opened if sealed) and
/// the account, which must still run as it did when the job was created. The dangerous-command
/// rules in force now decide whether it may go out again, as for a fresh submit. Every path that
/// dispatches a stored step (a start of a created job, a rolling job going on, a retry) takes its
/// task from here.
pub(super) async fn stored_task(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
) -> Result<TaskTemplate, ApiError> {
    let inventory = shared.inventory.current().await?;
    let account = stored_account(&inventory, job, step.account_id, &step.account)?;
    let (script, param) = shared
        .store
        .step_payload(step.step_instance_id)
        .await?
        .ok_or_else(|| ApiError::internal("stored step", "step vanished"))?;
    let param = if step.is_param_sensitive {
        shared
            .cipher
            .open(&param, job.job_instance_id, step.step_instance_id)
            .map_err(|e| ApiError::internal("stored step", e))?
    } else {
        param
    };
    let script = std::sync::Arc::new(script);
    super::dangerous_rules::refuse_intercepted(
        shared,
        &step.name,
        step.script_language,
        script.clone(),
    )
    .await?;
    Ok(TaskTemplate {
        script_language: step.script_language,
        script,
        script_param: param,
        is_param_sensitive: step.is_param_sensitive,
        account: account.account.clone(),
        timeout_secs: u32::try_from(step.timeout).unwrap_or(u32::MAX),
    })
}

/// The scope a stored job was submitted in.
pub(super) fn stored_scope(
    job: &fleetrun_store::JobRecord,
) -> Result<fleetrun_inventory::Scope, ApiError> {
    format!("{}:{}", job.bk_scope_type, job.bk_scope_id)
        .parse()
        .map_err(|e| ApiError::internal("stored step", format!("stored scope: {e}")))
}

/// The account `account_id` as the job's scope allows it now, refused unless it still runs as
/// `user`, the user it ran as when the job was created.
pub(super) fn stored_account<'i>(
    inventory: &'i fleetrun_inventory::Inventory,
    job: &fleetrun_store::JobRecord,
    account_id: i64,
    user: &str,
) -> Result<&'i fleetrun_inventory::Account, ApiError> {
    let account = inventory
        .account_for(&stored_scope(job)?, Some(account_id), None)
        .map_err(|e| ApiError::new(i64::from(e.code()), format!("account_id: {e}")))?;
    if account.account != user {
        return Err(ApiError::invalid(
            "job_instance_id",
            format!(
                "account {account_id} now runs as {:?}, not {user:?} as when job {} was created; \
                 submit it again",
                account.account, job.job_instance_id
            ),
        ));
    }
    Ok(account)
}

/// Runs a finished step's hosts again (operations 2 and 8) under the next execute_count: the
/// store moves the count on and resets the hosts in one transaction, then the engine dispatches
/// them as it dispatches a created job; its end is reported to the callback again.
async fn retry(
    shared: &Shared,
    caller: &Caller,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    rolling: Option<fleetrun_store::RollingRecord>,
    all: bool,
) -> Result<(), ApiError> {
    // A file step's stored payload is not a script: sending it as one would run the step's
    // description on the hosts. Its files are sent again by submitting the step again.
    if step.step_type == super::files::STEP_TYPE_FILE {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            format!(
                "operation_code: step {} is a file step; fleetrun does not retry file steps: submit \
                 push_config_file or fast_transfer_file again",
                step.step_instance_id
            ),
        ));
    }
    super::execute::refuse_while_unwritable(shared)?;
    // Everything that can refuse comes before anything changes.
    let days = shared.config.retention.finished_jobs_days;
    if days > 0
        && job
            .end_time
            .is_some_and(|end| end < crate::now_ms() - i64::from(days) * 86_400_000)
    {
        // Retention may be removing its rows right now.
        return Err(ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!(
                "job_instance_id: job {} ended more than {days} days ago (retention.finished_jobs_days) and is not run again",
                job.job_instance_id
            ),
        ));
    }
    let task = stored_task(shared, job, step).await?;
    let plan = match &rolling {
        None => None,
        Some(record) => Some((
            stored_config(&record.config)?,
            shared.store.rolling_batches(step.step_instance_id).await?,
            record,
        )),
    };
    let scope = fleetrun_store::RetryScope {
        keep: if all {
            Vec::new()
        } else {
            status::host::SUCCEEDED.to_vec()
        },
        batches: plan.as_ref().map(|(config, _, record)| {
            let last = record.current_batch.max(1);
            match config.execution {
                crate::rolling::Execution::Serial => last..=last,
                crate::rolling::Execution::Staggered { .. } => 1..=last,
            }
        }),
    };
    // The hosts to run again must still be in the job's business, as for a created job's start:
    // a host moved out since is not given the script again.
    let in_batches: Option<Vec<i64>> =
        plan.as_ref()
            .zip(scope.batches.as_ref())
            .map(|((_, batches, _), range)| {
                batches
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| {
                        i32::try_from(*i + 1).is_ok_and(|batch| range.contains(&batch))
                    })
                    .flat_map(|(_, hosts)| hosts.iter().copied())
                    .collect()
            });
    let to_retry: Vec<i64> = shared
        .store
        .host_results(step.step_instance_id)
        .await?
        .iter()
        .filter(|h| !scope.keep.contains(&h.status))
        .filter(|h| {
            in_batches
                .as_ref()
                .is_none_or(|hosts| hosts.contains(&h.bk_host_id))
        })
        .map(|h| h.bk_host_id)
        .collect();
    refuse_hosts_out_of_scope(shared, caller, job, to_retry).await?;
    // The job's place in the running set is held before the retry commits: a run that just
    // ended leaves the set a moment after its end is committed, and a terminate in between must
    // not find that run's token and end the retried job with it.
    let mut reservation = None;
    for _ in 0..100 {
        reservation = shared.engine.reserve(job.job_instance_id);
        if reservation.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let Some(reservation) = reservation else {
        return Err(ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!(
                "job_instance_id: job {} is still ending its previous run; try again",
                job.job_instance_id
            ),
        ));
    };
    shared
        .engine
        .forget_earlier_run(job.job_instance_id)
        .await?;
    let retried = shared
        .store
        .retry_step(
            job.job_instance_id,
            step.step_instance_id,
            job.status,
            status::job::RUNNING,
            &scope,
        )
        .await?
        .ok_or_else(|| {
            ApiError::new(
                code::UNSUPPORTED_OPERATION,
                format!(
                    "job_instance_id: job {} changed status meanwhile",
                    job.job_instance_id
                ),
            )
        })?;
    if retried.hosts.is_empty() {
        return Err(ApiError::new(
            code::UNSUPPORTED_OPERATION,
            format!(
                "operation_code: step {} has no failed host to run again",
                step.step_instance_id
            ),
        ));
    }
    tracing::info!(
        job = job.job_instance_id,
        execute_count = retried.execute_count,
        hosts = retried.hosts.len(),
        all,
        "retry"
    );
    // Before the new task goes out: an earlier one may still be running there.
    shared.engine.discard_earlier(&retried.earlier_tasks);
    let spec = JobSpec {
        job_instance_id: job.job_instance_id,
        step_instance_id: step.step_instance_id,
        hosts: retried.hosts.clone(),
        task,
    };
    let rolling = match plan {
        None => None,
        Some((config, batches, record)) => {
            match retried_plan(shared, job, step, &retried.hosts, config, batches, record).await {
                Ok(plan) => Some(plan),
                Err(e) => {
                    // Committed already: the job ends rather than stay running with no run.
                    end_unstarted(shared, job, step).await;
                    return Err(e);
                }
            }
        }
    };
    match rolling {
        None => shared.engine.start_retry(reservation, spec),
        // The whole plan's hosts: the failure limit counts against all of them.
        Some((rolling, all_hosts)) => shared.engine.start_rolling_reserved(
            reservation,
            JobSpec {
                hosts: all_hosts,
                ..spec
            },
            rolling,
        ),
    }
    Ok(())
}

/// Ends a retried job whose run could not start: failed, its waiting hosts with a task error,
/// its end reported to the callback.
async fn end_unstarted(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
) {
    let ended = shared
        .store
        .end_unstarted_retry(
            job.job_instance_id,
            step.step_instance_id,
            status::job::RUNNING,
            status::job::FAILED,
            status::host::AGENT_TASK_ERROR,
            crate::now_ms(),
        )
        .await;
    match ended {
        Ok(true) => {
            shared.engine.callbacks().job_ended(job.job_instance_id);
        }
        Ok(false) => {}
        Err(e) => tracing::error!(
            job = job.job_instance_id,
            "a retry that could not start cannot be ended: {e}"
        ),
    }
}

/// The rolling plan a retry goes on with: the retried hosts in their own batches, then the
/// step's later batches, with the whole plan's hosts.
async fn retried_plan(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    retried: &[i64],
    config: RollingConfig,
    batches: Vec<Vec<i64>>,
    record: &fleetrun_store::RollingRecord,
) -> Result<(RollingStart, Vec<i64>), ApiError> {
    let first = match config.execution {
        crate::rolling::Execution::Serial => record.current_batch.max(1),
        crate::rolling::Execution::Staggered { .. } => 1,
    };
    let first = usize::try_from(first).unwrap_or(1);
    let last = usize::try_from(record.current_batch.max(1)).unwrap_or(1);
    let all_hosts = batches.concat();
    let batches: Vec<Vec<i64>> = batches
        .into_iter()
        .enumerate()
        .map(|(i, hosts)| {
            if (first..=last).contains(&(i + 1)) {
                hosts.into_iter().filter(|h| retried.contains(h)).collect()
            } else {
                hosts
            }
        })
        .collect();
    let failed = shared
        .store
        .failed_hosts(
            step.step_instance_id,
            status::host::UNFINISHED,
            status::host::SUCCEEDED,
        )
        .await?;
    let ignored = usize::try_from(record.failures_ignored).unwrap_or(0);
    Ok((
        RollingStart {
            config,
            next_batch: first,
            earlier_failures: failed.saturating_sub(ignored),
            started: job.start_time,
            batches,
        },
        all_hosts,
    ))
}
