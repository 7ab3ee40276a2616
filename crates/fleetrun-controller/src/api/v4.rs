//! bk-job's v4 script-execution APIs under `/api/v4/`: `fast_execute_script`,
//! `get_job_instance_status`, `get_job_instance_list` and
//! `batch_get_job_instance_execute_object_log`, for execute objects of type host.
//!
//! v4 speaks BlueKing's newer HTTP protocol: a success is `{"data": ...}` with a 2xx status, a
//! failure `{"error": {"code": "<NAME>", "message": ..., "data": ...}}` with the matching HTTP
//! status. The work is the v3 APIs'; this module translates requests and replies.

use std::sync::Arc;

use axum::{
    Extension,
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    ApiError,
    auth::Caller,
    error::code,
    execute, intake, job_list,
    params::Params,
    params::lenient,
    query, reply,
    request::{self, ApiRequest},
};
use crate::Shared;

/// The v4 APIs fleetrun serves.
pub const APIS: &[&str] = &[
    "fast_execute_script",
    "get_job_instance_status",
    "get_job_instance_list",
    "batch_get_job_instance_execute_object_log",
];

/// bk-job's execute-object type of a host (2 is a container, which fleetrun does not run in).
const EXECUTE_OBJECT_HOST: i32 = 1;

/// Hosts one v4 batch log request may name (100 in bk-job's v4 document).
const MAX_V4_LOG_HOSTS: usize = 100;

/// A v4 failure: bk-job's `V4ErrorCodeEnum` name and its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V4Code {
    InvalidArgument,
    FailedPrecondition,
    Unauthenticated,
    NoPermission,
    NotFound,
    Internal,
}

impl V4Code {
    fn name(self) -> &'static str {
        match self {
            V4Code::InvalidArgument => "INVALID_ARGUMENT",
            V4Code::FailedPrecondition => "FAILED_PRECONDITION",
            V4Code::Unauthenticated => "UNAUTHENTICATED",
            V4Code::NoPermission => "NO_PERMISSION",
            V4Code::NotFound => "NOT_FOUND",
            V4Code::Internal => "INTERNAL",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            V4Code::InvalidArgument | V4Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            V4Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            V4Code::NoPermission => StatusCode::FORBIDDEN,
            V4Code::NotFound => StatusCode::NOT_FOUND,
            V4Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The v4 code for one of bk-job's v3 codes.
    fn of(v3: i64) -> Self {
        match v3 {
            code::GATEWAY_INVALID_ARGS => V4Code::Unauthenticated,
            code::NO_PERMISSION => V4Code::NoPermission,
            code::JOB_NOT_FOUND
            | code::SCRIPT_NOT_FOUND
            | code::ACCOUNT_NOT_FOUND
            | code::GATEWAY_API_NOT_FOUND => V4Code::NotFound,
            code::UNSUPPORTED_OPERATION
            | code::REPEAT_START_JOB
            | code::SCRIPT_NOT_RUNNABLE
            | code::ACCOUNT_NOT_ALLOWED => V4Code::FailedPrecondition,
            code::INTERNAL | code::DATABASE_UNWRITABLE => V4Code::Internal,
            _ => V4Code::InvalidArgument,
        }
    }
}

#[derive(Serialize)]
struct V4Success<T> {
    data: T,
}

#[derive(Serialize)]
struct V4Failure<'a> {
    error: V4Error<'a>,
}

#[derive(Serialize)]
struct V4Error<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

fn respond(request_id: &str, result: Result<Value, ApiError>) -> Response {
    let mut response = match &result {
        Ok(data) => (StatusCode::OK, axum::Json(V4Success { data })).into_response(),
        Err(e) => {
            let v4 = V4Code::of(e.code);
            // The HTTP layer's own refusals (a body too large, too busy) keep their status.
            let status = if e.http_status.is_success() {
                v4.status()
            } else {
                e.http_status
            };
            let body = V4Failure {
                error: V4Error {
                    code: v4.name(),
                    message: &e.message,
                    data: e.permission.as_ref(),
                },
            };
            (status, axum::Json(body)).into_response()
        }
    };
    request::tag(&mut response, request_id);
    response
}

/// Serves `/api/v4/<api>`.
pub async fn dispatch(
    State(shared): State<Arc<Shared>>,
    Extension(gate): Extension<Arc<intake::Gate>>,
    Path(api): Path<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    if !APIS.contains(&api.as_str()) {
        return super::not_found().await;
    }
    let api_request = ApiRequest::begin(&format!("v4/{api}"));
    let result = api_request
        .run(async {
            let intake::Admitted {
                params,
                caller,
                turn: _turn,
            } = intake::read(&shared, &gate, &method, &headers, query.as_deref(), body).await?;
            match api.as_str() {
                "fast_execute_script" => fast_execute_script(&shared, &caller, &params).await,
                "get_job_instance_status" => {
                    get_job_instance_status(&shared, &caller, &params).await
                }
                "get_job_instance_list" => get_job_instance_list(&shared, &caller, &params).await,
                _ => batch_get_job_instance_execute_object_log(&shared, &caller, &params).await,
            }
        })
        .await;
    api_request.log_outcome(&result);
    respond(api_request.id(), result)
}

/// v4's execute target: hosts, dynamic groups and topology nodes; containers are refused.
#[derive(Debug, Deserialize, Default)]
struct ExecuteTarget {
    #[serde(default)]
    host_list: Vec<TargetHost>,
    #[serde(default)]
    dynamic_group_list: Vec<Value>,
    #[serde(default)]
    topo_node_list: Vec<Value>,
    #[serde(default)]
    kube_container_filters: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct TargetHost {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_host_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_cloud_id: Option<i64>,
    ip: Option<String>,
}

/// v4's `fast_execute_script`, run as v3's: `execute_target` becomes `target_server`,
/// `param_sensitive` becomes `is_param_sensitive`.
async fn fast_execute_script(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let mut fields: Map<String, Value> = params.0.clone();
    let target = fields.remove("execute_target");
    let target: ExecuteTarget = match target {
        None | Some(Value::Null) => return Err(ApiError::missing("execute_target")),
        Some(value) => serde_path_to_error::deserialize(value).map_err(|e| {
            ApiError::invalid(&format!("execute_target.{}", e.path()), e.into_inner())
        })?,
    };
    if !target.kube_container_filters.is_empty() {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            "execute_target.kube_container_filters: fleetrun runs scripts on hosts, not in containers",
        ));
    }
    let mut host_ids = Vec::new();
    let mut ips = Vec::new();
    for (i, host) in target.host_list.iter().enumerate() {
        match (host.bk_host_id, host.bk_cloud_id, host.ip.as_deref()) {
            (Some(id), _, _) => host_ids.push(id),
            (None, Some(cloud), Some(ip)) => ips.push(json!({"bk_cloud_id": cloud, "ip": ip})),
            _ => {
                return Err(ApiError::missing(&format!(
                    "execute_target.host_list[{i}].bk_host_id (or bk_cloud_id and ip)"
                )));
            }
        }
    }
    if !host_ids.is_empty() && !ips.is_empty() {
        return Err(ApiError::invalid(
            "execute_target.host_list",
            "name every host by bk_host_id, or every host by bk_cloud_id and ip, not both in one list",
        ));
    }
    fields.insert(
        "target_server".to_owned(),
        json!({
            "host_id_list": host_ids,
            "ip_list": ips,
            "dynamic_group_list": target.dynamic_group_list,
            "topo_node_list": target.topo_node_list,
        }),
    );
    if let Some(sensitive) = fields.remove("param_sensitive") {
        let sensitive: Option<bool> =
            lenient::opt_bool(sensitive).map_err(|e| ApiError::invalid("param_sensitive", e))?;
        fields.insert(
            "is_param_sensitive".to_owned(),
            json!(i32::from(sensitive.unwrap_or(false))),
        );
    }
    execute::fast_execute_script(shared, caller, &Params(fields))
        .await
        .map_err(|mut e| {
            if let Some(rest) = e.message.strip_prefix("target_server") {
                e.message = format!("execute_target{rest}");
            }
            e
        })
}

#[derive(Debug, Deserialize)]
struct StatusRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    /// bk-job's v4 gateway name (`v4_get_job_instance_status.md`); the execute-object name of
    /// its design notes is taken too.
    #[serde(
        default,
        alias = "return_execute_object_result",
        deserialize_with = "lenient::opt_bool"
    )]
    return_ip_result: Option<bool>,
}

/// A host as an execute object.
#[derive(Debug, Serialize)]
struct ExecuteObject {
    #[serde(rename = "type")]
    object_type: i32,
    resource_id: String,
    host: ObjectHost,
}

#[derive(Debug, Serialize)]
struct ObjectHost {
    bk_host_id: i64,
    bk_cloud_id: i64,
    ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
}

impl ExecuteObject {
    fn host(bk_host_id: i64, bk_cloud_id: i64, ip: String, ipv6: Option<String>) -> Self {
        Self {
            object_type: EXECUTE_OBJECT_HOST,
            resource_id: bk_host_id.to_string(),
            host: ObjectHost {
                bk_host_id,
                bk_cloud_id,
                ip,
                ipv6,
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct StepStatusV4 {
    step_instance_id: i64,
    #[serde(rename = "type")]
    step_type: i32,
    name: String,
    status: fleetrun_api::StepStatus,
    execute_count: i64,
    create_time: i64,
    start_time: Option<i64>,
    end_time: Option<i64>,
    total_time: Option<i64>,
    /// Each host's result, as v3 reports it, when `return_ip_result` is true.
    #[serde(skip_serializing_if = "Option::is_none")]
    step_ip_result_list: Option<Vec<reply::HostResult>>,
}

#[derive(Debug, Serialize)]
struct JobInstanceStatusV4 {
    finished: bool,
    job_instance: reply::JobInstance,
    step_instance_list: Vec<StepStatusV4>,
}

async fn get_job_instance_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: StatusRequest = params.parse()?;
    let status = query::job_instance_status(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.return_ip_result.unwrap_or(false),
    )
    .await?;
    let steps = status
        .step_instance_list
        .into_iter()
        .map(|step| StepStatusV4 {
            step_instance_id: step.step_instance_id,
            step_type: step.step_type,
            name: step.name,
            status: step.status,
            execute_count: step.execute_count,
            create_time: step.create_time,
            start_time: step.start_time,
            end_time: step.end_time,
            total_time: step.total_time,
            step_ip_result_list: step.step_ip_result_list,
        })
        .collect();
    reply::data(JobInstanceStatusV4 {
        finished: status.finished,
        job_instance: status.job_instance,
        step_instance_list: steps,
    })
}

#[derive(Debug, Serialize)]
struct JobListV4 {
    job_instance_list: Vec<reply::JobListItem>,
}

async fn get_job_instance_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    reply::data(JobListV4 {
        job_instance_list: job_list::job_list_v4(shared, caller, params).await?,
    })
}

#[derive(Debug, Deserialize)]
struct LogRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    step_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    host_id_list: Option<Vec<i64>>,
    ip_list: Option<Vec<CloudIp>>,
    container_id_list: Option<Vec<Value>>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    execute_count: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct CloudIp {
    #[serde(deserialize_with = "lenient::int")]
    bk_cloud_id: i64,
    ip: String,
}

#[derive(Debug, Serialize)]
struct ObjectLog {
    execute_object: ExecuteObject,
    log_content: String,
}

#[derive(Debug, Serialize)]
struct BatchLogsV4 {
    job_instance_id: i64,
    step_instance_id: i64,
    log_type: i32,
    script_step_execute_object_logs: Vec<ObjectLog>,
    file_step_execute_object_logs: Option<()>,
}

async fn batch_get_job_instance_execute_object_log(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: LogRequest = params.parse()?;
    let no_hosts = req.host_id_list.as_ref().is_none_or(Vec::is_empty)
        && req.ip_list.as_ref().is_none_or(Vec::is_empty);
    if no_hosts
        && req
            .container_id_list
            .as_ref()
            .is_some_and(|c| !c.is_empty())
    {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            "container_id_list: fleetrun runs scripts on hosts, not in containers",
        ));
    }
    let hosts = query::LogHosts::of_v4(
        req.host_id_list,
        req.ip_list
            .map(|ips| ips.into_iter().map(|t| (t.bk_cloud_id, t.ip)).collect()),
        MAX_V4_LOG_HOSTS,
    )?;
    let logs = query::step_logs(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.step_instance_id,
        &hosts,
        req.execute_count,
    )
    .await?;
    reply::data(BatchLogsV4 {
        job_instance_id: req.job_instance_id,
        step_instance_id: req.step_instance_id,
        log_type: reply::LOG_TYPE_SCRIPT,
        script_step_execute_object_logs: logs
            .into_iter()
            .map(|(result, log_content)| {
                let (ip, ipv6) = reply::split_address(&result.ip);
                ObjectLog {
                    execute_object: ExecuteObject::host(
                        result.bk_host_id,
                        result.bk_cloud_id,
                        ip,
                        ipv6,
                    ),
                    log_content,
                }
            })
            .collect(),
        file_step_execute_object_logs: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_v4_names_and_statuses() {
        for (v3, name, status) in [
            (code::GATEWAY_INVALID_ARGS, "UNAUTHENTICATED", 401),
            (code::NO_PERMISSION, "NO_PERMISSION", 403),
            (code::JOB_NOT_FOUND, "NOT_FOUND", 404),
            (code::MISSING_PARAM, "INVALID_ARGUMENT", 400),
            (code::BAD_REQUEST, "INVALID_ARGUMENT", 400),
            (code::REPEAT_START_JOB, "FAILED_PRECONDITION", 400),
            (code::INTERNAL, "INTERNAL", 500),
        ] {
            let v4 = V4Code::of(v3);
            assert_eq!(v4.name(), name, "{v3}");
            assert_eq!(v4.status().as_u16(), status, "{v3}");
        }
    }
}
