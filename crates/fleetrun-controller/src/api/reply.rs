//! The replies more than one API sends, built from what the store holds: job and step status,
//! host results and logs, and the page every list API wraps its items in. Their shapes are
//! [`fleetrun_api::job`]'s, shared with the clients.

use serde::Serialize;

pub use fleetrun_api::job::{
    BatchLogs, FileLog, FileLogHost, FileTaskLog, HostLog, HostResult, JobInstance,
    JobInstanceStatus, JobListItem, LOG_TYPE_FILE, LOG_TYPE_SCRIPT, NO_PLAN, Page, ScriptTaskLog,
    StepInstance, agent_error_code,
};
use fleetrun_api::{HostStatus, JobStatus};

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

/// bk-job's `execute_count` counts retries: 0 for a step run once. The store counts runs.
pub fn retries(runs: i64) -> i64 {
    runs.saturating_sub(1).max(0)
}

/// One host's result in `get_job_instance_status` (`step_ip_result_list`).
pub fn host_result(r: &fleetrun_store::HostResultRecord) -> HostResult {
    let (ip, ipv6) = split_address(&r.ip);
    let status = HostStatus::from_code(r.status);
    HostResult {
        bk_host_id: r.bk_host_id,
        ip,
        ipv6,
        bk_cloud_id: r.bk_cloud_id,
        status,
        tag: r.tag.clone(),
        exit_code: r.exit_code,
        error_code: agent_error_code(status, r.error_code),
        start_time: r.start_time,
        end_time: r.end_time,
        total_time: total_time(r.start_time, r.end_time),
    }
}

/// A step in `get_job_instance_status`.
pub fn step_instance(
    step: &fleetrun_store::StepRecord,
    hosts: Option<Vec<HostResult>>,
) -> StepInstance {
    StepInstance {
        step_instance_id: step.step_instance_id,
        step_type: step.step_type,
        name: step.name.clone(),
        status: JobStatus::from_code(step.status),
        execute_count: retries(step.execute_count),
        create_time: step.create_time,
        start_time: step.start_time,
        end_time: step.end_time,
        total_time: total_time(step.start_time, step.end_time),
        step_ip_result_list: hosts,
    }
}

/// The job in `get_job_instance_status`.
pub fn job_instance(job: &fleetrun_store::JobRecord) -> JobInstance {
    JobInstance {
        job_instance_id: job.job_instance_id,
        bk_scope_type: job.bk_scope_type.clone(),
        bk_scope_id: job.bk_scope_id.clone(),
        bk_biz_id: job.bk_scope_id.parse().ok(),
        name: job.name.clone(),
        status: JobStatus::from_code(job.status),
        create_time: job.create_time,
        start_time: job.start_time,
        end_time: job.end_time,
        total_time: total_time(job.start_time, job.end_time),
    }
}

/// An item of `get_job_instance_list`.
pub fn job_list_item(job: &fleetrun_store::JobRecord) -> JobListItem {
    JobListItem {
        id: job.job_instance_id,
        job_instance_id: job.job_instance_id,
        job_plan_id: NO_PLAN,
        job_template_id: NO_PLAN,
        name: job.name.clone(),
        operator: job.operator.clone(),
        status: JobStatus::from_code(job.status),
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
    fn execute_count_counts_retries() {
        assert_eq!(retries(0), 0);
        assert_eq!(retries(1), 0);
        assert_eq!(retries(3), 2);
    }
}
