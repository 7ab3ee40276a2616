//! Job status and log queries.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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

/// fleetrun's host list: the hosts of the businesses the app may use (every host, unassigned
/// ones included, for an unrestricted app).
pub async fn list_hosts(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    let registered = shared.store.hosts().await?;
    let inventory = shared.inventory.current().await?;
    let conflicted: std::collections::HashSet<i64> = inventory
        .conflicts()
        .iter()
        .flat_map(|c| c.claimed_by.iter().copied())
        .collect();
    let by_agent: std::collections::HashMap<&str, &fleetrun_store::HostRecord> = registered
        .iter()
        .map(|r| (r.agent_id.as_str(), r))
        .collect();
    // With controllers sharing the database, a host connected to any live one is online.
    let elsewhere = match shared.engine.membership() {
        Some(membership) => {
            let ids: Vec<i64> = registered.iter().map(|r| r.bk_host_id).collect();
            let alive_since = membership.alive_since().await?;
            shared
                .store
                .connected_elsewhere(&ids, membership.name(), alive_since)
                .await?
        }
        None => Default::default(),
    };
    let online = |bk_host_id: i64| {
        shared.agents.get(bk_host_id).is_some() || elsewhere.contains_key(&bk_host_id)
    };
    let mut hosts: Vec<Value> = inventory
        .hosts()
        .iter()
        .filter(|h| caller.may_see_business(&inventory, h.bk_biz_id))
        .map(|h| {
            let agent = h
                .agent_id
                .as_deref()
                .and_then(|id| by_agent.get(id).copied());
            json!({
                "bk_host_id": h.bk_host_id,
                "agent_id": h.agent_id,
                "bk_cloud_id": h.bk_cloud_id,
                "ip": h.ips.first().map(|ip| ip.to_string()),
                "ips": h.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "hostname": h.hostname,
                "os_type": h.os_type,
                "agent_version": agent.map(|a| a.agent_version.clone()),
                "bk_biz_id": h.bk_biz_id,
                "modules": h.modules,
                "address_conflict": conflicted.contains(&h.bk_host_id),
                "online": online(h.bk_host_id),
                "last_seen": agent.map(|a| a.last_seen),
            })
        })
        .collect();
    // Agents the inventory refused (an id collision) are still listed, unplaced.
    for r in registered.iter().filter(|_| caller.is_unrestricted()) {
        if inventory.host(r.bk_host_id).is_none() {
            hosts.push(json!({
                "bk_host_id": r.bk_host_id,
                "agent_id": r.agent_id,
                "bk_cloud_id": r.bk_cloud_id,
                "ip": r.ip,
                "ips": [r.ip],
                "hostname": r.hostname,
                "os_type": r.os_type,
                "agent_version": r.agent_version,
                "bk_biz_id": null,
                "modules": [],
                "address_conflict": false,
                "online": online(r.bk_host_id),
                "last_seen": r.last_seen,
            }));
        }
    }
    Ok(Value::Array(hosts))
}

/// fleetrun's topology view: every business with its nodes and the hosts below each, and the
/// dynamic groups with the hosts they match now.
pub async fn get_topology(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    let inventory = shared.inventory.current().await?;
    let hosts_below = |scope: fleetrun_inventory::Scope, node: (&str, i64)| -> Vec<i64> {
        let targets = fleetrun_inventory::Targets {
            topo_nodes: vec![(node.0.to_owned(), node.1)],
            ..Default::default()
        };
        inventory
            .resolve(&scope, &targets)
            .map(|r| r.hosts.iter().map(|h| h.bk_host_id).collect())
            .unwrap_or_default()
    };
    let businesses: Vec<Value> = inventory
        .businesses()
        .iter()
        .filter(|b| caller.may_see_business(&inventory, Some(b.bk_biz_id)))
        .map(|b| {
            let scope = fleetrun_inventory::Scope::Biz(b.bk_biz_id);
            let nodes: Vec<Value> = inventory
                .topology()
                .iter()
                .filter(|n| inventory.business_of_node(&n.bk_obj_id, n.bk_inst_id) == Some(b.bk_biz_id))
                .map(|n| {
                    json!({
                        "bk_obj_id": n.bk_obj_id,
                        "bk_inst_id": n.bk_inst_id,
                        "name": n.name,
                        "parent": match &n.parent {
                            fleetrun_inventory::Parent::Business(id) => json!({"bk_obj_id": "biz", "bk_inst_id": id}),
                            fleetrun_inventory::Parent::Node { bk_obj_id, bk_inst_id } => json!({"bk_obj_id": bk_obj_id, "bk_inst_id": bk_inst_id}),
                        },
                        "host_ids": hosts_below(scope, (&n.bk_obj_id, n.bk_inst_id)),
                    })
                })
                .collect();
            json!({
                "bk_biz_id": b.bk_biz_id,
                "name": b.name,
                "host_ids": hosts_below(scope, ("biz", b.bk_biz_id)),
                "nodes": nodes,
            })
        })
        .collect();
    // A business set names its members: it is shown only to an app that may use the set itself
    // (and so every member), or not otherwise learn of them.
    let business_sets: Vec<Value> = inventory
        .business_sets()
        .iter()
        .filter(|s| {
            caller.is_unrestricted() || caller.may_use("biz_set", &s.bk_biz_set_id.to_string())
        })
        .map(|s| json!({"bk_biz_set_id": s.bk_biz_set_id, "name": s.name, "members": s.members}))
        .collect();
    let groups: Vec<Value> = inventory
        .dynamic_groups()
        .iter()
        .filter(|g| caller.may_see_business(&inventory, Some(g.bk_biz_id)))
        .map(|g| {
            let targets = fleetrun_inventory::Targets {
                dynamic_groups: vec![g.id.clone()],
                ..Default::default()
            };
            let host_ids: Vec<i64> = inventory
                .resolve(&fleetrun_inventory::Scope::Biz(g.bk_biz_id), &targets)
                .map(|r| r.hosts.iter().map(|h| h.bk_host_id).collect())
                .unwrap_or_default();
            json!({"id": g.id, "name": g.name, "bk_biz_id": g.bk_biz_id, "host_ids": host_ids})
        })
        .collect();
    Ok(
        json!({ "businesses": businesses, "business_sets": business_sets, "dynamic_groups": groups }),
    )
}

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

#[derive(Debug, Deserialize)]
struct JobListRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    create_time_start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    create_time_end: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    job_instance_id: Option<i64>,
    operator: Option<String>,
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    launch_mode: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int", rename = "type")]
    job_type: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    status: Option<i64>,
    ip: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    job_cron_id: Option<i64>,
    /// v4's name for `start`.
    #[serde(default, deserialize_with = "lenient::opt_int")]
    offset: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    length: Option<i64>,
}

const THIRTY_DAYS_MS: i64 = 30 * 24 * 3600 * 1000;

/// Reads paging fields: `start` from 0, `length` 1 to 1000 (default 20).
pub(super) fn paging(start: Option<i64>, length: Option<i64>) -> Result<(i64, i64), ApiError> {
    let start = start.unwrap_or(0);
    if start < 0 {
        return Err(ApiError::invalid("start", format!("{start} is negative")));
    }
    let length = length.unwrap_or(20);
    if !(1..=1000).contains(&length) {
        return Err(ApiError::invalid(
            "length",
            format!("{length} is outside [1, 1000]"),
        ));
    }
    Ok((start, length))
}

fn small_enum(field: &str, value: Option<i64>, allowed: &[i64]) -> Result<Option<i32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if allowed.contains(&v) => Ok(Some(v as i32)),
        Some(v) => Err(ApiError::invalid(
            field,
            format!("{v} is not one of {allowed:?}"),
        )),
    }
}

/// A job's type as `get_job_instance_list` filters it: bk-job refuses an unknown one with
/// ILLEGAL_PARAM.
fn job_type_filter(value: Option<i64>) -> Result<Option<i32>, ApiError> {
    small_enum("type", value, &[0, 1, 2]).map_err(|e| ApiError::new(code::ILLEGAL_PARAM, e.message))
}

/// `get_job_instance_list`: the scope's jobs created in a window of at most 30 days.
pub async fn get_job_instance_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: JobListRequest = params.parse()?;
    let window = job_list_window(req.create_time_start, req.create_time_end)?;
    let (start, length) = paging(req.start, req.length)?;
    let (total, data) = job_list(shared, &scope, &req, window, start, length).await?;
    reply::data(reply::Page {
        start,
        length,
        total,
        data,
    })
}

/// bk-job's checks of the job list's window, in its order and with its codes: each time present
/// and after 1970, the end after the start, the window at most 30 days.
fn job_list_window(start: Option<i64>, end: Option<i64>) -> Result<(i64, i64), ApiError> {
    let time = |field: &str, value: Option<i64>| match value {
        Some(t) if t >= 1 => Ok(t),
        Some(t) => Err(ApiError::new(
            code::MISSING_OR_ILLEGAL_PARAM,
            format!("{field}: {t} is not a time (milliseconds since 1970, at least 1)"),
        )),
        None => Err(ApiError::new(
            code::MISSING_OR_ILLEGAL_PARAM,
            format!("{field} is required"),
        )),
    };
    let begin = time("create_time_start", start)?;
    let end = time("create_time_end", end)?;
    // Both are at least 1, so the difference cannot overflow.
    let period = end - begin;
    if period <= 0 {
        return Err(ApiError::new(
            code::MISSING_OR_ILLEGAL_PARAM,
            "create_time_start|create_time_end: the end must be after the start",
        ));
    }
    if period > THIRTY_DAYS_MS {
        return Err(ApiError::new(
            code::ILLEGAL_PARAM,
            "create_time_start|create_time_end: the time range is longer than 30 days",
        ));
    }
    Ok((begin, end))
}

/// The scope's jobs a list request asks for, newest first, and how many there are.
async fn job_list(
    shared: &Shared,
    scope: &scope::Scope,
    req: &JobListRequest,
    (begin, end): (i64, i64),
    start: i64,
    length: i64,
) -> Result<(i64, Vec<reply::JobListItem>), ApiError> {
    let launch_mode = small_enum("launch_mode", req.launch_mode, &[1, 2, 3])?;
    let job_type = job_type_filter(req.job_type)?;
    let job_status = small_enum(
        "status",
        req.status,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15],
    )?;
    // A job instance id names one job: bk-job then ignores every other filter.
    if let Some(id) = req.job_instance_id {
        let found: Vec<reply::JobListItem> = shared
            .store
            .job(id)
            .await?
            .filter(|job| scope.owns(&job.bk_scope_type, &job.bk_scope_id))
            .iter()
            .map(reply::job_list_item)
            .collect();
        let total = found.len() as i64;
        return Ok((total, found.into_iter().skip(start as usize).collect()));
    }
    // Jobs of a cron job: fleetrun has no cron jobs, so none match.
    if req.job_cron_id.is_some() {
        return Ok((0, Vec::new()));
    }
    let filter = fleetrun_store::JobFilter {
        bk_scope_type: scope.scope_type.clone(),
        bk_scope_id: scope.scope_id.clone(),
        create_time_start: begin,
        create_time_end: end,
        job_instance_id: None,
        operator: req.operator.clone().filter(|o| !o.is_empty()),
        name: req.name.clone().filter(|n| !n.is_empty()),
        launch_mode,
        job_type,
        status: job_status,
        ip: req.ip.clone().filter(|ip| !ip.is_empty()),
        start,
        length,
    };
    let (total, jobs) = shared.store.list_jobs(&filter).await?;
    Ok((total, jobs.iter().map(reply::job_list_item).collect()))
}

/// `get_job_instance_list` in v4: `offset` (at most 10,000) and `length` (1–200, default 10)
/// in place of `start`, and the items under `job_instance_list`.
pub(super) async fn job_list_v4(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Vec<reply::JobListItem>, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: JobListRequest = params.parse()?;
    let window = job_list_window(req.create_time_start, req.create_time_end)?;
    let offset = req.offset.unwrap_or(0);
    if !(0..=V4_MAX_OFFSET).contains(&offset) {
        return Err(ApiError::invalid(
            "offset",
            format!("{offset} is outside [0, {V4_MAX_OFFSET}]"),
        ));
    }
    let length = req.length.unwrap_or(V4_DEFAULT_LENGTH);
    if !(1..=V4_MAX_LENGTH).contains(&length) {
        return Err(ApiError::invalid(
            "length",
            format!("{length} is outside [1, {V4_MAX_LENGTH}]"),
        ));
    }
    Ok(job_list(shared, &scope, &req, window, offset, length)
        .await?
        .1)
}

const V4_MAX_OFFSET: i64 = 10_000;
const V4_MAX_LENGTH: i64 = 200;
const V4_DEFAULT_LENGTH: i64 = 10;

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
    let scope: fleetrun_inventory::Scope = format!("{}:{}", job.bk_scope_type, job.bk_scope_id)
        .parse()
        .map_err(|e| ApiError::internal("start job", format!("stored scope: {e}")))?;
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
    // The account and the rules in force now decide, as for a fresh submit.
    let task = super::steps::stored_task(shared, job, step).await?;
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
    let started = super::steps::start_created(
        shared,
        crate::engine::JobSpec {
            job_instance_id: job.job_instance_id,
            step_instance_id: step.step_instance_id,
            hosts: hosts.iter().map(|h| h.bk_host_id).collect(),
            task,
        },
    )
    .await;
    if !matches!(started, Ok(true)) {
        shared.engine.lease_unused(job.job_instance_id).await;
        started?;
        return Err(not_startable());
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct CallbackStatusRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
}

/// `get_callback_status`: where a job's callback stands.
pub async fn get_callback_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: CallbackStatusRequest = params.parse()?;
    let id = req.job_instance_id;
    let job = load_job(shared, caller, params, id).await?;
    let Some(url) = job.callback_url.as_deref() else {
        return Ok(json!({
            "job_instance_id": id,
            "url": null,
            "status": "none",
            "message": format!("job {id} was submitted without a callback_url: no callback is sent"),
            "attempts": [],
        }));
    };
    let Some((delivery, attempts)) = shared.store.callback_delivery(id).await? else {
        return Ok(json!({
            "job_instance_id": id,
            "url": crate::callback::redact(url),
            "status": "waiting",
            "message": "the callback is sent when the job ends",
            "attempts": [],
        }));
    };
    let pending = delivery.status == fleetrun_store::CallbackStatus::Pending;
    Ok(json!({
        "job_instance_id": id,
        "url": crate::callback::redact(&delivery.url),
        "status": delivery.status.as_str(),
        "delivery_id": delivery.id,
        "last_error": delivery.last_error,
        "next_attempt_time": pending.then_some(delivery.next_attempt_at),
        "attempts": attempts
            .iter()
            .map(|a| json!({
                "attempt": a.attempt,
                "time": a.at,
                "http_status": a.http_status,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }))
            .collect::<Vec<_>>(),
    }))
}
