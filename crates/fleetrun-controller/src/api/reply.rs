//! The shapes of bk-job's replies that more than one API sends, typed once: job and step status,
//! host results and logs, and the page every list API wraps its items in.

use serde::Serialize;

use crate::status;

/// bk-job's page of a list API: `{start, length, total, data}`.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub start: i64,
    pub length: i64,
    pub total: i64,
    pub data: Vec<T>,
}

/// Saturating: times come from agents and, however they are checked on the way in, a read must
/// never fail on them.
pub fn total_time(start: Option<i64>, end: Option<i64>) -> Option<i64> {
    Some(end?.saturating_sub(start?))
}

/// A host's address as bk-job reports it: IPv4 in `ip`; an IPv6 address in `ipv6`, with `ip`
/// empty (bk-job's `ip` is never null).
pub fn split_address(ip: &str) -> (String, Option<String>) {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            (String::new(), Some(v6.to_string()))
        }
        Ok(addr) => (addr.to_canonical().to_string(), None),
        Err(_) => (ip.to_owned(), None),
    }
}

/// bk-job's agent-layer error code of a host result (`error_code`): 0 when the agent layer
/// finished the task (whatever the script did), 115 while it runs, 126 when it was terminated,
/// -1 for any other failure of the agent layer.
pub mod agent_error {
    pub const NONE: i32 = 0;
    pub const RUNNING: i32 = 115;
    pub const TERMINATED: i32 = 126;
    pub const OTHER: i32 = -1;
}

/// The `error_code` for a host result: what the store recorded, else what its status says of
/// the agent layer.
pub fn agent_error_code(status_code: i32, stored: i32) -> i32 {
    if stored != 0 {
        return stored;
    }
    match status_code {
        status::host::RUNNING => agent_error::RUNNING,
        status::host::TERMINATE_SUCCESS => agent_error::TERMINATED,
        status::host::AGENT_TIMEOUT
        | status::host::AGENT_ABNORMAL
        | status::host::USER_NOT_EXIST
        | status::host::AGENT_TASK_ERROR => agent_error::OTHER,
        _ => agent_error::NONE,
    }
}

/// bk-job's `execute_count` counts retries: 0 for a step run once. The store counts runs.
pub fn retries(runs: i64) -> i64 {
    runs.saturating_sub(1).max(0)
}

/// One host's result in `get_job_instance_status` (`step_ip_result_list`).
#[derive(Debug, Serialize)]
pub struct HostResult {
    pub bk_host_id: i64,
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub bk_cloud_id: i64,
    pub status: i32,
    pub tag: String,
    /// Null while the script has not ended, or when it never ran.
    pub exit_code: Option<i32>,
    pub error_code: i32,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
}

impl From<&fleetrun_store::HostResultRecord> for HostResult {
    fn from(r: &fleetrun_store::HostResultRecord) -> Self {
        let (ip, ipv6) = split_address(&r.ip);
        Self {
            bk_host_id: r.bk_host_id,
            ip,
            ipv6,
            bk_cloud_id: r.bk_cloud_id,
            status: r.status,
            tag: r.tag.clone(),
            exit_code: r.exit_code,
            error_code: agent_error_code(r.status, r.error_code),
            start_time: r.start_time,
            end_time: r.end_time,
            total_time: total_time(r.start_time, r.end_time),
        }
    }
}

/// A step in `get_job_instance_status`.
#[derive(Debug, Serialize)]
pub struct StepStatus {
    pub step_instance_id: i64,
    #[serde(rename = "type")]
    pub step_type: i32,
    pub name: String,
    pub status: i32,
    pub execute_count: i64,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ip_result_list: Option<Vec<HostResult>>,
}

impl StepStatus {
    pub fn new(step: &fleetrun_store::StepRecord, hosts: Option<Vec<HostResult>>) -> Self {
        Self {
            step_instance_id: step.step_instance_id,
            step_type: step.step_type,
            name: step.name.clone(),
            status: step.status,
            execute_count: retries(step.execute_count),
            create_time: step.create_time,
            start_time: step.start_time,
            end_time: step.end_time,
            total_time: total_time(step.start_time, step.end_time),
            step_ip_result_list: hosts,
        }
    }
}

/// The job in `get_job_instance_status`.
#[derive(Debug, Serialize)]
pub struct JobStatus {
    pub job_instance_id: i64,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub bk_biz_id: Option<i64>,
    pub name: String,
    pub status: i32,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
}

impl From<&fleetrun_store::JobRecord> for JobStatus {
    fn from(job: &fleetrun_store::JobRecord) -> Self {
        Self {
            job_instance_id: job.job_instance_id,
            bk_scope_type: job.bk_scope_type.clone(),
            bk_scope_id: job.bk_scope_id.clone(),
            bk_biz_id: job.bk_scope_id.parse().ok(),
            name: job.name.clone(),
            status: job.status,
            create_time: job.create_time,
            start_time: job.start_time,
            end_time: job.end_time,
            total_time: total_time(job.start_time, job.end_time),
        }
    }
}

/// `get_job_instance_status`'s `data`.
#[derive(Debug, Serialize)]
pub struct JobInstanceStatus {
    pub finished: bool,
    pub job_instance: JobStatus,
    pub step_instance_list: Vec<StepStatus>,
}

/// bk-job's log type of a script step's log.
pub const LOG_TYPE_SCRIPT: i32 = 1;

/// `get_job_instance_ip_log`'s `data`.
#[derive(Debug, Serialize)]
pub struct HostLog {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub log_type: i32,
    pub log_content: String,
    pub file_logs: Option<Vec<FileLog>>,
}

/// bk-job's log type of a file step's log.
pub const LOG_TYPE_FILE: i32 = 2;

/// A host as a file log names it.
#[derive(Debug, Serialize)]
pub struct FileLogHost {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
}

/// One file's log on one host (`file_logs`).
#[derive(Debug, Serialize)]
pub struct FileLog {
    /// 0 upload (source side), 1 download (target side).
    pub mode: i32,
    pub src_ip: FileLogHost,
    pub src_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_ip: Option<FileLogHost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_path: Option<String>,
    /// 1 waiting, 2 uploading, 3 downloading, 4 success, 5 failure.
    pub status: i32,
    pub log_content: String,
    pub size: String,
    pub speed: String,
    pub process: String,
}

/// One host's file logs in `batch_get_job_instance_ip_log`.
#[derive(Debug, Serialize)]
pub struct FileTaskLog {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub file_logs: Vec<FileLog>,
}

/// One host's log in `batch_get_job_instance_ip_log`.
#[derive(Debug, Serialize)]
pub struct ScriptTaskLog {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub log_content: String,
}

/// `batch_get_job_instance_ip_log`'s `data`.
#[derive(Debug, Serialize)]
pub struct BatchLogs {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub log_type: i32,
    pub script_task_logs: Vec<ScriptTaskLog>,
    pub file_task_logs: Option<Vec<FileTaskLog>>,
}

/// bk-job's plan and template id of a job not made from a plan: a fast job.
pub const NO_PLAN: i64 = -1;

/// An item of `get_job_instance_list`.
#[derive(Debug, Serialize)]
pub struct JobListItem {
    /// fleetrun's, equal to `job_instance_id`.
    pub id: i64,
    pub job_instance_id: i64,
    pub job_plan_id: i64,
    pub job_template_id: i64,
    pub name: String,
    pub operator: String,
    pub status: i32,
    #[serde(rename = "type")]
    pub job_type: i32,
    pub launch_mode: i32,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub bk_biz_id: Option<i64>,
}

impl From<&fleetrun_store::JobRecord> for JobListItem {
    fn from(job: &fleetrun_store::JobRecord) -> Self {
        Self {
            id: job.job_instance_id,
            job_instance_id: job.job_instance_id,
            job_plan_id: NO_PLAN,
            job_template_id: NO_PLAN,
            name: job.name.clone(),
            operator: job.operator.clone(),
            status: job.status,
            job_type: job.job_type,
            launch_mode: job.launch_mode,
            create_time: job.create_time,
            start_time: job.start_time,
            end_time: job.end_time,
            total_time: total_time(job.start_time, job.end_time),
            bk_scope_type: job.bk_scope_type.clone(),
            bk_scope_id: job.bk_scope_id.clone(),
            bk_biz_id: job.bk_scope_id.parse().ok(),
        }
    }
}

/// Serializes a typed reply into the envelope's `data`.
pub fn data<T: Serialize>(reply: T) -> Result<serde_json::Value, super::ApiError> {
    serde_json::to_value(reply).map_err(|e| super::ApiError::internal("reply", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_by_family() {
        assert_eq!(split_address("10.0.0.1"), ("10.0.0.1".into(), None));
        assert_eq!(
            split_address("fd00::1"),
            (String::new(), Some("fd00::1".into()))
        );
        assert_eq!(split_address("::ffff:10.0.0.1"), ("10.0.0.1".into(), None));
    }

    #[test]
    fn error_codes_follow_the_status() {
        assert_eq!(
            agent_error_code(status::host::SUCCESS, 0),
            agent_error::NONE
        );
        assert_eq!(
            agent_error_code(status::host::NON_ZERO_EXIT, 0),
            agent_error::NONE
        );
        assert_eq!(
            agent_error_code(status::host::RUNNING, 0),
            agent_error::RUNNING
        );
        assert_eq!(
            agent_error_code(status::host::TERMINATE_SUCCESS, 0),
            agent_error::TERMINATED
        );
        assert_eq!(
            agent_error_code(status::host::AGENT_ABNORMAL, 0),
            agent_error::OTHER
        );
        assert_eq!(agent_error_code(status::host::AGENT_ABNORMAL, 117), 117);
        assert_eq!(retries(0), 0);
        assert_eq!(retries(1), 0);
        assert_eq!(retries(3), 2);
    }
}
