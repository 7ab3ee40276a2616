//! Job status and log queries.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError,
    error::code,
    params::{Params, lenient},
};
use crate::{Shared, status};

const MAX_LOG_HOSTS: usize = 500;

#[derive(Debug, Deserialize)]
struct StatusRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    return_ip_result: Option<bool>,
}

async fn load_job(
    shared: &Shared,
    job_instance_id: i64,
) -> Result<fleetrun_store::JobRecord, ApiError> {
    shared.store.job(job_instance_id).await?.ok_or_else(|| {
        ApiError::new(
            code::JOB_NOT_FOUND,
            format!("job_instance_id: no job {job_instance_id}"),
        )
    })
}

fn total_time(start: Option<i64>, end: Option<i64>) -> Option<i64> {
    Some(end? - start?)
}

pub async fn get_job_instance_status(shared: &Shared, params: &Params) -> Result<Value, ApiError> {
    let req: StatusRequest = params.parse()?;
    let job = load_job(shared, req.job_instance_id).await?;
    let mut steps = Vec::with_capacity(job.steps.len());
    for step in &job.steps {
        let mut entry = json!({
            "step_instance_id": step.step_instance_id,
            "type": step.step_type,
            "name": step.name,
            "status": step.status,
            "execute_count": step.execute_count,
            "create_time": step.create_time,
            "start_time": step.start_time,
            "end_time": step.end_time,
            "total_time": total_time(step.start_time, step.end_time),
        });
        if req.return_ip_result.unwrap_or(false) {
            let results = shared.store.host_results(step.step_instance_id).await?;
            entry["step_ip_result_list"] = results
                .iter()
                .map(|r| {
                    json!({
                        "bk_host_id": r.bk_host_id,
                        "ip": r.ip,
                        "bk_cloud_id": r.bk_cloud_id,
                        "status": r.status,
                        "tag": r.tag,
                        "exit_code": r.exit_code.unwrap_or(0),
                        "error_code": r.error_code,
                        "start_time": r.start_time,
                        "end_time": r.end_time,
                        "total_time": total_time(r.start_time, r.end_time),
                    })
                })
                .collect();
        }
        steps.push(entry);
    }
    Ok(json!({
        "finished": status::job::is_finished(job.status),
        "job_instance": {
            "job_instance_id": job.job_instance_id,
            "bk_scope_type": job.bk_scope_type,
            "bk_scope_id": job.bk_scope_id,
            "bk_biz_id": job.bk_scope_id.parse::<i64>().ok(),
            "name": job.name,
            "status": job.status,
            "create_time": job.create_time,
            "start_time": job.start_time,
            "end_time": job.end_time,
            "total_time": total_time(job.start_time, job.end_time),
        },
        "step_instance_list": steps,
    }))
}

#[derive(Debug, Deserialize)]
struct IpTarget {
    #[serde(deserialize_with = "lenient::int")]
    bk_cloud_id: i64,
    ip: String,
}

#[derive(Debug, Deserialize)]
struct LogRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    step_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_host_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_cloud_id: Option<i64>,
    ip: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BatchLogRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    step_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    host_id_list: Option<Vec<i64>>,
    ip_list: Option<Vec<IpTarget>>,
}

/// The step's per-host results, after checking that the step belongs to the job.
async fn step_results(
    shared: &Shared,
    job_instance_id: i64,
    step_instance_id: i64,
) -> Result<Vec<fleetrun_store::HostResultRecord>, ApiError> {
    let job = load_job(shared, job_instance_id).await?;
    if !job
        .steps
        .iter()
        .any(|s| s.step_instance_id == step_instance_id)
    {
        return Err(ApiError::new(
            code::STEP_NOT_FOUND,
            format!("step_instance_id: job {job_instance_id} has no step {step_instance_id}"),
        ));
    }
    Ok(shared.store.host_results(step_instance_id).await?)
}

fn same_ip(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
        _ => a == b,
    }
}

pub async fn get_job_instance_ip_log(shared: &Shared, params: &Params) -> Result<Value, ApiError> {
    let req: LogRequest = params.parse()?;
    let results = step_results(shared, req.job_instance_id, req.step_instance_id).await?;
    let result = match (req.bk_host_id, req.bk_cloud_id, req.ip.as_deref()) {
        (Some(id), _, _) => results.iter().find(|r| r.bk_host_id == id),
        (None, Some(cloud), Some(ip)) => results
            .iter()
            .find(|r| r.bk_cloud_id == cloud && same_ip(&r.ip, ip)),
        _ => return Err(ApiError::missing("bk_host_id (or bk_cloud_id and ip)")),
    }
    .ok_or_else(|| ApiError::new(code::HOST_NOT_FOUND, "the step has no such host"))?;
    let log = shared
        .store
        .host_log(req.step_instance_id, result.bk_host_id)
        .await?;
    Ok(json!({
        "bk_host_id": result.bk_host_id,
        "bk_cloud_id": result.bk_cloud_id,
        "ip": result.ip,
        "log_type": 1,
        "log_content": String::from_utf8_lossy(&log),
        "file_logs": null,
    }))
}

pub async fn batch_get_job_instance_ip_log(
    shared: &Shared,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: BatchLogRequest = params.parse()?;
    let results = step_results(shared, req.job_instance_id, req.step_instance_id).await?;
    // host_id_list wins; ip_list is the deprecated alternative.
    let wanted: Vec<&fleetrun_store::HostResultRecord> = match (&req.host_id_list, &req.ip_list) {
        (Some(ids), _) if !ids.is_empty() => {
            if ids.len() > MAX_LOG_HOSTS {
                return Err(ApiError::new(
                    code::TOO_MANY_LOG_HOSTS,
                    format!("host_id_list: {} hosts, at most {MAX_LOG_HOSTS}", ids.len()),
                ));
            }
            results
                .iter()
                .filter(|r| ids.contains(&r.bk_host_id))
                .collect()
        }
        (_, Some(ips)) if !ips.is_empty() => {
            if ips.len() > MAX_LOG_HOSTS {
                return Err(ApiError::new(
                    code::TOO_MANY_LOG_HOSTS,
                    format!("ip_list: {} hosts, at most {MAX_LOG_HOSTS}", ips.len()),
                ));
            }
            results
                .iter()
                .filter(|r| {
                    ips.iter()
                        .any(|t| t.bk_cloud_id == r.bk_cloud_id && same_ip(&r.ip, &t.ip))
                })
                .collect()
        }
        _ => return Err(ApiError::missing("host_id_list (or ip_list)")),
    };
    let mut logs = Vec::with_capacity(wanted.len());
    for result in wanted {
        let log = shared
            .store
            .host_log(req.step_instance_id, result.bk_host_id)
            .await?;
        logs.push(json!({
            "bk_host_id": result.bk_host_id,
            "bk_cloud_id": result.bk_cloud_id,
            "ip": result.ip,
            "log_content": String::from_utf8_lossy(&log),
        }));
    }
    Ok(json!({
        "job_instance_id": req.job_instance_id,
        "step_instance_id": req.step_instance_id,
        "log_type": 1,
        "script_task_logs": logs,
        "file_task_logs": null,
    }))
}

/// fleetrun's host list: every registered host and whether its agent is connected now.
pub async fn list_hosts(shared: &Shared) -> Result<Value, ApiError> {
    let hosts = shared.store.hosts().await?;
    Ok(hosts
        .iter()
        .map(|h| {
            json!({
                "bk_host_id": h.bk_host_id,
                "agent_id": h.agent_id,
                "bk_cloud_id": h.bk_cloud_id,
                "ip": h.ip,
                "hostname": h.hostname,
                "os_type": h.os_type,
                "agent_version": h.agent_version,
                "bk_biz_id": h.bk_biz_id,
                "online": shared.agents.get(h.bk_host_id).is_some(),
                "last_seen": h.last_seen,
            })
        })
        .collect())
}

#[derive(Debug, Deserialize)]
struct OperateJobRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    operation_code: i64,
}

/// `operate_job_instance`: 1 terminates a running job.
pub async fn operate_job_instance(shared: &Shared, params: &Params) -> Result<Value, ApiError> {
    let req: OperateJobRequest = params.parse()?;
    let job = load_job(shared, req.job_instance_id).await?;
    match req.operation_code {
        1 => {
            if status::job::is_finished(job.status) || !shared.engine.terminate(job.job_instance_id).await {
                return Err(ApiError::invalid(
                    "job_instance_id",
                    format!("job {} is not running (status {})", job.job_instance_id, job.status),
                ));
            }
        }
        2 => {
            return Err(ApiError::invalid(
                "operation_code",
                format!("job {} was started when it was created; there is nothing to start", job.job_instance_id),
            ));
        }
        other => {
            return Err(ApiError::invalid(
                "operation_code",
                format!("{other} is not 1 (terminate) or 2 (start)"),
            ));
        }
    }
    Ok(json!({ "job_instance_id": job.job_instance_id }))
}
