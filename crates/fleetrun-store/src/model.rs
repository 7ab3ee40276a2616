//! Rows as the rest of the controller sees them. Status values are bk-job's integers; their
//! meaning belongs to the controller.

use sqlx::{Row, any::AnyRow};

/// What an agent says about itself when it registers.
#[derive(Debug, Clone)]
pub struct AgentRegistration {
    pub agent_id: String,
    pub bk_cloud_id: i64,
    pub ip: String,
    pub hostname: String,
    pub os_type: String,
    pub agent_version: String,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub bk_host_id: i64,
    pub agent_id: String,
    pub bk_cloud_id: i64,
    pub ip: String,
    pub hostname: String,
    pub os_type: String,
    pub agent_version: String,
    pub online: bool,
    pub last_seen: i64,
    /// When the host began claiming its current address (Unix ms).
    pub address_since: i64,
}

impl HostRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Self {
        Self {
            bk_host_id: row.get("bk_host_id"),
            agent_id: row.get("agent_id"),
            bk_cloud_id: row.get("bk_cloud_id"),
            ip: row.get("ip"),
            hostname: row.get("hostname"),
            os_type: row.get("os_type"),
            agent_version: row.get("agent_version"),
            online: row.get::<i64, _>("online") != 0,
            last_seen: row.get("last_seen"),
            address_since: row.get("address_since"),
        }
    }
}

/// A job to create: one step, one pending result per target host.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    pub operator: String,
    pub app_code: String,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub status: i32,
    pub job_type: i32,
    pub launch_mode: i32,
    pub callback_url: Option<String>,
    pub create_time: i64,
    pub step: NewStep,
    pub hosts: Vec<NewHostResult>,
}

#[derive(Debug, Clone)]
pub struct NewStep {
    pub name: String,
    pub step_type: i32,
    pub script_language: i32,
    pub script_content: Vec<u8>,
    pub script_param: String,
    pub is_param_sensitive: bool,
    pub timeout: i64,
    pub account_id: i64,
    pub account: String,
}

#[derive(Debug, Clone)]
pub struct NewHostResult {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    pub status: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatedJob {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
}

#[derive(Debug, Clone)]
pub struct JobRecord {
    pub job_instance_id: i64,
    pub name: String,
    pub operator: String,
    pub app_code: String,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub status: i32,
    pub job_type: i32,
    pub launch_mode: i32,
    pub callback_url: Option<String>,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub steps: Vec<StepRecord>,
}

#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step_instance_id: i64,
    pub name: String,
    pub step_type: i32,
    pub status: i32,
    pub execute_count: i64,
    pub script_language: i32,
    pub is_param_sensitive: bool,
    pub timeout: i64,
    pub account_id: i64,
    pub account: String,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
}

impl JobRecord {
    pub(crate) fn from_rows(job: &AnyRow, steps: &[AnyRow]) -> Self {
        Self {
            job_instance_id: job.get("job_instance_id"),
            name: job.get("name"),
            operator: job.get("operator"),
            app_code: job.get("app_code"),
            bk_scope_type: job.get("bk_scope_type"),
            bk_scope_id: job.get("bk_scope_id"),
            status: job.get("status"),
            job_type: job.get("type"),
            launch_mode: job.get("launch_mode"),
            callback_url: job.get("callback_url"),
            create_time: job.get("create_time"),
            start_time: job.get("start_time"),
            end_time: job.get("end_time"),
            steps: steps
                .iter()
                .map(|s| StepRecord {
                    step_instance_id: s.get("step_instance_id"),
                    name: s.get("name"),
                    step_type: s.get("type"),
                    status: s.get("status"),
                    execute_count: s.get("execute_count"),
                    script_language: s.get("script_language"),
                    is_param_sensitive: s.get::<i64, _>("is_param_sensitive") != 0,
                    timeout: s.get("timeout"),
                    account_id: s.get("account_id"),
                    account: s.get("account"),
                    create_time: s.get("create_time"),
                    start_time: s.get("start_time"),
                    end_time: s.get("end_time"),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostResultRecord {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    pub status: i32,
    pub tag: String,
    pub exit_code: Option<i32>,
    pub error_code: i32,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub output_bytes: i64,
    pub dropped_bytes: i64,
    pub dropped_lines: i64,
    pub survivors: i64,
}

impl HostResultRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Self {
        Self {
            bk_host_id: row.get("bk_host_id"),
            bk_cloud_id: row.get("bk_cloud_id"),
            ip: row.get("ip"),
            status: row.get("status"),
            tag: row.get("tag"),
            exit_code: row.get("exit_code"),
            error_code: row.get("error_code"),
            start_time: row.get("start_time"),
            end_time: row.get("end_time"),
            output_bytes: row.get("output_bytes"),
            dropped_bytes: row.get("dropped_bytes"),
            dropped_lines: row.get("dropped_lines"),
            survivors: row.get("survivors"),
        }
    }
}

/// How a host's task ended, as stored.
#[derive(Debug, Clone, Default)]
pub struct HostOutcome {
    pub status: i32,
    pub tag: String,
    pub exit_code: Option<i32>,
    pub error_code: i32,
    pub start_time: Option<i64>,
    pub end_time: i64,
    pub output_bytes: i64,
    pub dropped_bytes: i64,
    pub dropped_lines: i64,
    pub survivors: i64,
}

/// Which jobs [`crate::Store::list_jobs`] returns.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub create_time_start: i64,
    pub create_time_end: i64,
    pub job_instance_id: Option<i64>,
    pub operator: Option<String>,
    /// Part of the name.
    pub name: Option<String>,
    pub launch_mode: Option<i32>,
    pub job_type: Option<i32>,
    pub status: Option<i32>,
    /// Jobs that targeted a host with this IP.
    pub ip: Option<String>,
    pub start: i64,
    pub length: i64,
}
