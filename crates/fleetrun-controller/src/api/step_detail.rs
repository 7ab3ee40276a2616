//! `get_step_instance_detail`: a step as it was submitted, in bk-job's reply shape
//! (`script_step_info`: the script in base64, its language, parameter, timeout and account), a
//! sensitive parameter masked; fleetrun adds the step's job, status, execute_count, rolling
//! configuration and the hosts it targets.

use base64::Engine as _;
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
use crate::{Shared, rolling::Execution};

/// What a sensitive parameter is shown as, as bk-job shows it.
const MASKED: &str = "******";

#[derive(Debug, Deserialize)]
struct DetailRequest {
    #[serde(deserialize_with = "lenient::int")]
    step_instance_id: i64,
}

#[derive(Debug, Serialize)]
struct StepDetail {
    id: i64,
    #[serde(rename = "type")]
    step_type: i32,
    name: String,
    script_step_info: ScriptStepInfo,
    job_instance_id: i64,
    status: i32,
    execute_count: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rolling_config: Option<RollingDetail>,
    target_server: Targets,
}

#[derive(Debug, Serialize)]
struct ScriptStepInfo {
    /// 1: a script given with the step (fleetrun keeps a library script's content with the step).
    script_source: i32,
    content: String,
    script_language: i32,
    script_param: String,
    timeout: i64,
    account_id: i64,
    account_name: String,
    secure_param: i32,
}

#[derive(Debug, Serialize)]
struct RollingDetail {
    expression: String,
    mode: i64,
    execution_mode: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_start_wait_fixed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_start_wait_random_min_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_start_wait_random_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_failure_percent: Option<u32>,
    total_batch: i32,
    current_batch: i32,
}

/// The hosts the step targets, as resolved when it was submitted.
#[derive(Debug, Serialize)]
struct Targets {
    host_id_list: Vec<i64>,
    ip_list: Vec<Address>,
}

#[derive(Debug, Serialize)]
struct Address {
    bk_host_id: i64,
    bk_cloud_id: i64,
    ip: String,
}

pub async fn get_step_instance_detail(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: DetailRequest = params.parse()?;
    let not_found = || {
        ApiError::new(
            code::STEP_NOT_FOUND,
            format!("step_instance_id: no step {}", req.step_instance_id),
        )
    };
    let job_instance_id = shared
        .store
        .step_job(req.step_instance_id)
        .await?
        .ok_or_else(not_found)?;
    // A step of another scope is answered as one that does not exist.
    let (job, step) = load_step(
        shared,
        caller,
        params,
        job_instance_id,
        req.step_instance_id,
    )
    .await
    .map_err(|e| {
        if e.code == code::STEP_NOT_FOUND {
            not_found()
        } else {
            e
        }
    })?;
    let (script, param) = shared
        .store
        .step_payload(step.step_instance_id)
        .await?
        .ok_or_else(not_found)?;
    let rolling = match shared.store.rolling(step.step_instance_id).await? {
        None => None,
        Some(record) => {
            let config: crate::rolling::RollingConfig = serde_json::from_str(&record.config)
                .map_err(|e| ApiError::internal("stored rolling_config", e))?;
            let (execution_mode, fixed, min, max) = match config.execution {
                Execution::Serial => (1, None, None, None),
                Execution::Staggered {
                    fixed_ms,
                    random_min_ms,
                    random_max_ms,
                } => (2, Some(fixed_ms), Some(random_min_ms), Some(random_max_ms)),
            };
            Some(RollingDetail {
                expression: config.expression,
                mode: config.mode.into(),
                execution_mode,
                batch_start_wait_fixed_ms: fixed,
                batch_start_wait_random_min_ms: min,
                batch_start_wait_random_max_ms: max,
                max_failures: config.max_failures,
                max_failure_percent: config.max_failure_percent,
                total_batch: record.total_batches,
                current_batch: record.current_batch,
            })
        }
    };
    let hosts = shared.store.host_results(step.step_instance_id).await?;
    reply::data(StepDetail {
        id: step.step_instance_id,
        step_type: step.step_type,
        name: step.name.clone(),
        script_step_info: ScriptStepInfo {
            script_source: 1,
            content: base64::engine::general_purpose::STANDARD.encode(&script),
            script_language: step.script_language,
            // A sensitive parameter is stored sealed and never opened for a reader.
            script_param: if step.is_param_sensitive {
                MASKED.to_owned()
            } else {
                param
            },
            timeout: step.timeout,
            account_id: step.account_id,
            account_name: step.account.clone(),
            secure_param: i32::from(step.is_param_sensitive),
        },
        job_instance_id: job.job_instance_id,
        status: step.status,
        execute_count: reply::retries(step.execute_count),
        rolling_config: rolling,
        target_server: Targets {
            host_id_list: hosts.iter().map(|h| h.bk_host_id).collect(),
            ip_list: hosts
                .into_iter()
                .map(|h| Address {
                    bk_host_id: h.bk_host_id,
                    bk_cloud_id: h.bk_cloud_id,
                    ip: h.ip,
                })
                .collect(),
        },
    })
}
