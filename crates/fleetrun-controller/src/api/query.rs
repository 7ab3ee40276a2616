//! Job status and log queries.

use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient},
    reply, scope,
};
use crate::{Shared, status};

const MAX_LOG_HOSTS: usize = 500;

#[derive(Debug, Deserialize)]
struct StatusRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    return_ip_result: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    execute_count: Option<i64>,
}

/// The job, if it exists in the request's scope (a job of another scope is not found, as in bk-job).
pub(super) async fn load_job(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    job_instance_id: i64,
) -> Result<fleetrun_store::JobRecord, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    shared
        .store
        .job(job_instance_id)
        .await?
        .filter(|job| scope.owns(&job.bk_scope_type, &job.bk_scope_id))
        .ok_or_else(|| {
            ApiError::new(
                code::JOB_NOT_FOUND,
                format!(
                    "job_instance_id: no job {job_instance_id} in {} {}",
                    scope.scope_type, scope.scope_id
                ),
            )
        })
}

/// The job and its step `step_instance_id`, if the job exists in the request's scope (bk-job
/// answers a step of another job as it answers an unknown job).
pub(super) async fn load_step(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    job_instance_id: i64,
    step_instance_id: i64,
) -> Result<(fleetrun_store::JobRecord, fleetrun_store::StepRecord), ApiError> {
    let job = load_job(shared, caller, params, job_instance_id).await?;
    let step = job
        .steps
        .iter()
        .find(|s| s.step_instance_id == step_instance_id)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                code::STEP_NOT_FOUND,
                format!("step_instance_id: job {job_instance_id} has no step {step_instance_id}"),
            )
        })?;
    Ok((job, step))
}

/// The execute_count a query asks for, checked against the step's: None for the latest (not
/// given, or the step's current count), else an earlier one.
pub(super) fn asked_count(
    step: &fleetrun_store::StepRecord,
    asked: Option<i64>,
) -> Result<Option<i64>, ApiError> {
    let latest = reply::retries(step.execute_count);
    match asked {
        None => Ok(None),
        Some(n) if n == latest => Ok(None),
        Some(n) if (0..latest).contains(&n) => Ok(Some(n)),
        Some(n) => Err(ApiError::invalid(
            "execute_count",
            format!(
                "step {} has execute_count 0 to {latest}, not {n}",
                step.step_instance_id
            ),
        )),
    }
}

/// A step's host results at `execute_count` (None: the latest).
pub(super) async fn results_at(
    shared: &Shared,
    step_instance_id: i64,
    execute_count: Option<i64>,
) -> Result<Vec<fleetrun_store::HostResultRecord>, ApiError> {
    Ok(match execute_count {
        None => shared.store.host_results(step_instance_id).await?,
        Some(n) => shared.store.host_results_at(step_instance_id, n).await?,
    })
}

pub async fn get_job_instance_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: StatusRequest = params.parse()?;
    let mut status = job_instance_status(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.return_ip_result.unwrap_or(false),
    )
    .await?;
    // An earlier execute_count: its results replace the latest ones.
    if let Some(asked) = req.execute_count {
        let job = load_job(shared, caller, params, req.job_instance_id).await?;
        for (reply_step, step) in status.step_instance_list.iter_mut().zip(&job.steps) {
            let Some(n) = asked_count(step, Some(asked))? else {
                continue;
            };
            reply_step.execute_count = n;
            if reply_step.step_ip_result_list.is_some() {
                let results = results_at(shared, step.step_instance_id, Some(n)).await?;
                reply_step.step_ip_result_list =
                    Some(results.iter().map(reply::host_result).collect());
            }
        }
    }
    reply::data(status)
}

/// A job's status, with each host's result when `with_hosts`: `get_job_instance_status` in v3
/// and v4 alike.
pub(super) async fn job_instance_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    job_instance_id: i64,
    with_hosts: bool,
) -> Result<reply::JobInstanceStatus, ApiError> {
    let job = load_job(shared, caller, params, job_instance_id).await?;
    let mut steps = Vec::with_capacity(job.steps.len());
    for step in &job.steps {
        let hosts = if with_hosts {
            let results = shared.store.host_results(step.step_instance_id).await?;
            Some(results.iter().map(reply::host_result).collect())
        } else {
            None
        };
        steps.push(reply::step_instance(step, hosts));
    }
    Ok(reply::JobInstanceStatus {
        finished: status::job::is_finished(job.status),
        job_instance: reply::job_instance(&job),
        step_instance_list: steps,
    })
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
    #[serde(default, deserialize_with = "lenient::opt_int")]
    execute_count: Option<i64>,
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
    #[serde(default, deserialize_with = "lenient::opt_int")]
    execute_count: Option<i64>,
}

/// The step's per-host results at `execute_count` (None: the latest), after checking that the
/// step belongs to the job; with the checked count.
async fn step_results(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    job_instance_id: i64,
    step_instance_id: i64,
    execute_count: Option<i64>,
) -> Result<(Vec<fleetrun_store::HostResultRecord>, Option<i64>), ApiError> {
    let (_, step) = load_step(shared, caller, params, job_instance_id, step_instance_id).await?;
    let execute_count = asked_count(&step, execute_count)?;
    Ok((
        results_at(shared, step_instance_id, execute_count).await?,
        execute_count,
    ))
}

fn same_ip(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
        _ => a == b,
    }
}

/// A missing or malformed host parameter of a log API, named as bk-job names it.
fn missing_host(field: &str) -> ApiError {
    ApiError::new(
        code::MISSING_OR_ILLEGAL_PARAM,
        format!("{field} is required (missing or invalid)"),
    )
}

pub async fn get_job_instance_ip_log(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: LogRequest = params.parse()?;
    // bk-job checks the host parameters before it looks for the job.
    let wanted = match (req.bk_host_id, req.bk_cloud_id, req.ip.as_deref()) {
        (Some(id), _, _) => HostKey::Id(id),
        (None, Some(cloud), Some(ip)) if !ip.is_empty() => HostKey::Address(cloud, ip.to_owned()),
        _ => return Err(missing_host("bk_host_id (or bk_cloud_id and ip)")),
    };
    let (results, execute_count) = step_results(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.step_instance_id,
        req.execute_count,
    )
    .await?;
    let found = results.iter().find(|r| match &wanted {
        HostKey::Id(id) => r.bk_host_id == *id,
        HostKey::Address(cloud, ip) => r.bk_cloud_id == *cloud && same_ip(&r.ip, ip),
    });
    // A host the step did not target has no log: bk-job answers it with an empty one, naming the
    // host as asked.
    let Some(result) = found else {
        let (bk_host_id, bk_cloud_id, ip) = match wanted {
            HostKey::Id(id) => (
                id,
                req.bk_cloud_id.unwrap_or_default(),
                req.ip.unwrap_or_default(),
            ),
            HostKey::Address(cloud, ip) => (req.bk_host_id.unwrap_or_default(), cloud, ip),
        };
        let (ip, ipv6) = reply::split_address(&ip);
        return reply::data(reply::HostLog {
            bk_host_id,
            bk_cloud_id,
            ip,
            ipv6,
            log_type: reply::LOG_TYPE_SCRIPT,
            log_content: String::new(),
            file_logs: None,
        });
    };
    if super::files::is_file_step(shared, req.job_instance_id, req.step_instance_id).await? {
        let file_logs = super::files::file_logs(shared, req.step_instance_id, result).await?;
        let (ip, ipv6) = reply::split_address(&result.ip);
        return reply::data(reply::HostLog {
            bk_host_id: result.bk_host_id,
            bk_cloud_id: result.bk_cloud_id,
            ip,
            ipv6,
            log_type: reply::LOG_TYPE_FILE,
            log_content: String::new(),
            file_logs: Some(file_logs),
        });
    }
    let log = shared
        .store
        .host_log_at(req.step_instance_id, result.bk_host_id, execute_count)
        .await?;
    let (ip, ipv6) = reply::split_address(&result.ip);
    reply::data(reply::HostLog {
        bk_host_id: result.bk_host_id,
        bk_cloud_id: result.bk_cloud_id,
        ip,
        ipv6,
        log_type: reply::LOG_TYPE_SCRIPT,
        log_content: String::from_utf8_lossy(&log).into_owned(),
        file_logs: None,
    })
}

/// How a log request names a host.
enum HostKey {
    Id(i64),
    Address(i64, String),
}

pub async fn batch_get_job_instance_ip_log(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: BatchLogRequest = params.parse()?;
    let hosts = LogHosts::of(req.host_id_list, req.ip_list, MAX_LOG_HOSTS)?;
    let logs = step_logs(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.step_instance_id,
        &hosts,
        req.execute_count,
    )
    .await?;
    if super::files::is_file_step(shared, req.job_instance_id, req.step_instance_id).await? {
        let mut file_task_logs = Vec::with_capacity(logs.len());
        for (result, _) in &logs {
            let (ip, ipv6) = reply::split_address(&result.ip);
            file_task_logs.push(reply::FileTaskLog {
                bk_host_id: result.bk_host_id,
                bk_cloud_id: result.bk_cloud_id,
                ip,
                ipv6,
                file_logs: super::files::file_logs(shared, req.step_instance_id, result).await?,
            });
        }
        return reply::data(reply::BatchLogs {
            job_instance_id: req.job_instance_id,
            step_instance_id: req.step_instance_id,
            log_type: reply::LOG_TYPE_FILE,
            script_task_logs: Vec::new(),
            file_task_logs: Some(file_task_logs),
        });
    }
    reply::data(reply::BatchLogs {
        job_instance_id: req.job_instance_id,
        step_instance_id: req.step_instance_id,
        log_type: reply::LOG_TYPE_SCRIPT,
        script_task_logs: logs
            .into_iter()
            .map(|(result, log_content)| {
                let (ip, ipv6) = reply::split_address(&result.ip);
                reply::ScriptTaskLog {
                    bk_host_id: result.bk_host_id,
                    bk_cloud_id: result.bk_cloud_id,
                    ip,
                    ipv6,
                    log_content,
                }
            })
            .collect(),
        file_task_logs: None,
    })
}

/// The hosts a batch log request names: by id (which wins), else by address.
pub(super) enum LogHosts {
    Ids(Vec<i64>),
    Addresses(Vec<(i64, String)>),
}

impl LogHosts {
    /// Reads the request's lists, at most `max` hosts; one of them is required.
    fn of(ids: Option<Vec<i64>>, ips: Option<Vec<IpTarget>>, max: usize) -> Result<Self, ApiError> {
        let ids = ids.filter(|ids| !ids.is_empty());
        let ips = ips.filter(|ips| !ips.is_empty());
        let (field, count, hosts) = match (ids, ips) {
            (Some(ids), _) => ("host_id_list", ids.len(), LogHosts::Ids(ids)),
            (None, Some(ips)) => (
                "ip_list",
                ips.len(),
                LogHosts::Addresses(ips.into_iter().map(|t| (t.bk_cloud_id, t.ip)).collect()),
            ),
            (None, None) => return Err(missing_host("host_id_list (or ip_list)")),
        };
        if count > max {
            return Err(ApiError::new(
                code::TOO_MANY_LOG_HOSTS,
                format!("{field}: {count} hosts, at most {max}"),
            ));
        }
        Ok(hosts)
    }

    /// Reads a v4 request's lists: the same, with v4's limit.
    pub(super) fn of_v4(
        ids: Option<Vec<i64>>,
        ips: Option<Vec<(i64, String)>>,
        max: usize,
    ) -> Result<Self, ApiError> {
        let ips = ips.map(|ips| {
            ips.into_iter()
                .map(|(bk_cloud_id, ip)| IpTarget { bk_cloud_id, ip })
                .collect()
        });
        Self::of(ids, ips, max)
    }
}

/// Each named host's result and log in the step, in the step's order. Hosts the step did not
/// target are left out, as bk-job leaves them out.
pub(super) async fn step_logs(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    job_instance_id: i64,
    step_instance_id: i64,
    hosts: &LogHosts,
    execute_count: Option<i64>,
) -> Result<Vec<(fleetrun_store::HostResultRecord, String)>, ApiError> {
    let (results, execute_count) = step_results(
        shared,
        caller,
        params,
        job_instance_id,
        step_instance_id,
        execute_count,
    )
    .await?;
    let mut logs = Vec::new();
    for result in results {
        let wanted = match hosts {
            LogHosts::Ids(ids) => ids.contains(&result.bk_host_id),
            LogHosts::Addresses(ips) => ips
                .iter()
                .any(|(cloud, ip)| *cloud == result.bk_cloud_id && same_ip(&result.ip, ip)),
        };
        if !wanted {
            continue;
        }
        let log = shared
            .store
            .host_log_at(step_instance_id, result.bk_host_id, execute_count)
            .await?;
        let text = String::from_utf8_lossy(&log).into_owned();
        logs.push((result, text));
    }
    Ok(logs)
}
