//! The replies of the job APIs: `fast_execute_script`, `get_job_instance_status`,
//! `get_job_instance_ip_log`, `batch_get_job_instance_ip_log` and `get_job_instance_list`, field
//! for field as bk-job names them.
//!
//! Every reply derives both directions: the controller serializes it, the clients read it back.
//! A field bk-job leaves out when empty is left out here too, and read as absent.

use serde::{Deserialize, Serialize};

use crate::{HostStatus, JobStatus, ScriptCheckItem, StepStatus};

/// bk-job's page of a list API: `{start, length, total, data}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    pub start: i64,
    pub length: i64,
    pub total: i64,
    pub data: Vec<T>,
}

/// `fast_execute_script`'s `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastExecuteScriptReply {
    pub job_instance_id: i64,
    pub job_instance_name: String,
    pub step_instance_id: i64,
    /// fleetrun's: what scanning dangerous rules found in the script (it runs nevertheless);
    /// absent when nothing matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dangerous_script_check: Vec<ScriptCheckItem>,
}

/// `get_job_instance_status`'s `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInstanceStatus {
    pub finished: bool,
    pub job_instance: JobInstance,
    pub step_instance_list: Vec<StepInstance>,
}

/// The job in `get_job_instance_status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInstance {
    pub job_instance_id: i64,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub bk_biz_id: Option<i64>,
    pub name: String,
    pub status: JobStatus,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
}

/// A step in `get_job_instance_status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepInstance {
    pub step_instance_id: i64,
    /// 1 script, 2 file.
    #[serde(rename = "type")]
    pub step_type: i32,
    pub name: String,
    pub status: StepStatus,
    /// Retries: 0 for a step run once.
    pub execute_count: i64,
    pub create_time: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
    /// Present when the request asked for `return_ip_result`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_ip_result_list: Option<Vec<HostResult>>,
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

/// The `error_code` for a host result: what was recorded, else what its status says of the
/// agent layer.
pub fn agent_error_code(status: HostStatus, recorded: i32) -> i32 {
    if recorded != 0 {
        return recorded;
    }
    match status {
        HostStatus::Running => agent_error::RUNNING,
        HostStatus::TerminateSuccess => agent_error::TERMINATED,
        HostStatus::AgentTimeout
        | HostStatus::AgentAbnormal
        | HostStatus::UserNotExist
        | HostStatus::AgentTaskError => agent_error::OTHER,
        _ => agent_error::NONE,
    }
}

/// One host's result in `get_job_instance_status` (`step_ip_result_list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostResult {
    pub bk_host_id: i64,
    /// IPv4, or empty for a host known by an IPv6 address (then in `ipv6`).
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub bk_cloud_id: i64,
    pub status: HostStatus,
    pub tag: String,
    /// Null while the script has not ended, or when it never ran.
    pub exit_code: Option<i32>,
    /// See [`agent_error_code`].
    pub error_code: i32,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub total_time: Option<i64>,
}

/// bk-job's log type of a script step's log.
pub const LOG_TYPE_SCRIPT: i32 = 1;

/// bk-job's log type of a file step's log.
pub const LOG_TYPE_FILE: i32 = 2;

/// `get_job_instance_ip_log`'s `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLog {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// [`LOG_TYPE_SCRIPT`] or [`LOG_TYPE_FILE`].
    pub log_type: i32,
    pub log_content: String,
    /// A file step's logs; null for a script step.
    pub file_logs: Option<Vec<FileLog>>,
}

/// A host as a file log names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLogHost {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
}

/// One file's log on one host (`file_logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLog {
    /// 0 upload (source side), 1 download (target side).
    pub mode: i32,
    pub src_ip: FileLogHost,
    pub src_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_ip: Option<FileLogHost>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_path: Option<String>,
    /// 1 waiting, 2 uploading, 3 downloading, 4 success, 5 failure.
    pub status: i32,
    pub log_content: String,
    pub size: String,
    pub speed: String,
    pub process: String,
}

/// One host's file logs in `batch_get_job_instance_ip_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTaskLog {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub file_logs: Vec<FileLog>,
}

/// One host's log in `batch_get_job_instance_ip_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptTaskLog {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    pub log_content: String,
}

/// `batch_get_job_instance_ip_log`'s `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLogs {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// [`LOG_TYPE_SCRIPT`] or [`LOG_TYPE_FILE`].
    pub log_type: i32,
    pub script_task_logs: Vec<ScriptTaskLog>,
    /// A file step's logs; null for a script step.
    pub file_task_logs: Option<Vec<FileTaskLog>>,
}

/// bk-job's plan and template id of a job not made from a plan: a fast job.
pub const NO_PLAN: i64 = -1;

/// An item of `get_job_instance_list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobListItem {
    /// fleetrun's, equal to `job_instance_id`.
    pub id: i64,
    pub job_instance_id: i64,
    pub job_plan_id: i64,
    pub job_template_id: i64,
    pub name: String,
    pub operator: String,
    pub status: JobStatus,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn error_codes_follow_the_status() {
        let of = |s| agent_error_code(s, 0);
        assert_eq!(of(HostStatus::Success), agent_error::NONE);
        assert_eq!(of(HostStatus::NonZeroExit), agent_error::NONE);
        assert_eq!(of(HostStatus::Running), agent_error::RUNNING);
        assert_eq!(of(HostStatus::TerminateSuccess), agent_error::TERMINATED);
        assert_eq!(of(HostStatus::AgentAbnormal), agent_error::OTHER);
        assert_eq!(agent_error_code(HostStatus::AgentAbnormal, 117), 117);
    }

    #[test]
    fn a_host_result_reads_back_as_written() {
        let written = json!({
            "bk_host_id": 7, "ip": "", "ipv6": "fd00::7", "bk_cloud_id": 0, "status": 104,
            "tag": "", "exit_code": 3, "error_code": 0, "start_time": 1, "end_time": 5,
            "total_time": 4,
        });
        let host: HostResult = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(host.status, HostStatus::NonZeroExit);
        assert_eq!(serde_json::to_value(&host).unwrap(), written);
        let mut v4 = host.clone();
        v4.ipv6 = None;
        assert!(serde_json::to_value(&v4).unwrap().get("ipv6").is_none());
    }

    /// The text a reply is written as, through a `Value` (whose keys serde_json sorts, without
    /// its `preserve_order` feature), so the expected text pins every field, its name, and
    /// whether it is null or absent.
    fn written<T: Serialize>(reply: &T) -> String {
        serde_json::to_string(&serde_json::to_value(reply).unwrap()).unwrap()
    }

    #[test]
    fn a_step_without_host_results_leaves_the_list_out() {
        let step = StepInstance {
            step_instance_id: 5,
            step_type: 1,
            name: "run".into(),
            status: StepStatus::Running,
            execute_count: 0,
            create_time: 10,
            start_time: Some(11),
            end_time: None,
            total_time: None,
            step_ip_result_list: None,
        };
        assert_eq!(
            written(&step),
            r#"{"create_time":10,"end_time":null,"execute_count":0,"name":"run","start_time":11,"status":2,"step_instance_id":5,"total_time":null,"type":1}"#
        );
        let read: StepInstance = serde_json::from_str(&written(&step)).unwrap();
        assert_eq!(read, step);
        let with_hosts = StepInstance {
            step_ip_result_list: Some(Vec::new()),
            ..step
        };
        assert!(written(&with_hosts).contains(r#""step_ip_result_list":[]"#));
    }

    #[test]
    fn a_job_list_item_names_its_type_type() {
        let item = JobListItem {
            id: 8,
            job_instance_id: 8,
            job_plan_id: NO_PLAN,
            job_template_id: NO_PLAN,
            name: "fast".into(),
            operator: "admin".into(),
            status: JobStatus::Success,
            job_type: 2,
            launch_mode: 2,
            create_time: 1,
            start_time: Some(2),
            end_time: Some(3),
            total_time: Some(1),
            bk_scope_type: "biz".into(),
            bk_scope_id: "2".into(),
            bk_biz_id: Some(2),
        };
        assert_eq!(
            written(&item),
            r#"{"bk_biz_id":2,"bk_scope_id":"2","bk_scope_type":"biz","create_time":1,"end_time":3,"id":8,"job_instance_id":8,"job_plan_id":-1,"job_template_id":-1,"launch_mode":2,"name":"fast","operator":"admin","start_time":2,"status":3,"total_time":1,"type":2}"#
        );
        let read: JobListItem = serde_json::from_str(&written(&item)).unwrap();
        assert_eq!(read, item);
    }

    #[test]
    fn a_script_steps_host_log_has_null_file_logs() {
        let log = HostLog {
            bk_host_id: 7,
            bk_cloud_id: 0,
            ip: "10.0.0.7".into(),
            ipv6: None,
            log_type: LOG_TYPE_SCRIPT,
            log_content: "hi\n".into(),
            file_logs: None,
        };
        assert_eq!(
            written(&log),
            r#"{"bk_cloud_id":0,"bk_host_id":7,"file_logs":null,"ip":"10.0.0.7","log_content":"hi\n","log_type":1}"#
        );
        let read: HostLog = serde_json::from_str(&written(&log)).unwrap();
        assert_eq!(read, log);
    }

    #[test]
    fn a_script_steps_batch_logs_have_null_file_task_logs() {
        let logs = BatchLogs {
            job_instance_id: 8,
            step_instance_id: 5,
            log_type: LOG_TYPE_SCRIPT,
            script_task_logs: vec![ScriptTaskLog {
                bk_host_id: 7,
                bk_cloud_id: 0,
                ip: "10.0.0.7".into(),
                ipv6: None,
                log_content: "hi".into(),
            }],
            file_task_logs: None,
        };
        assert_eq!(
            written(&logs),
            r#"{"file_task_logs":null,"job_instance_id":8,"log_type":1,"script_task_logs":[{"bk_cloud_id":0,"bk_host_id":7,"ip":"10.0.0.7","log_content":"hi"}],"step_instance_id":5}"#
        );
        let read: BatchLogs = serde_json::from_str(&written(&logs)).unwrap();
        assert_eq!(read, logs);
    }

    #[test]
    fn a_clean_scripts_reply_leaves_the_check_out() {
        let reply = FastExecuteScriptReply {
            job_instance_id: 8,
            job_instance_name: "fast".into(),
            step_instance_id: 5,
            dangerous_script_check: Vec::new(),
        };
        assert_eq!(
            written(&reply),
            r#"{"job_instance_id":8,"job_instance_name":"fast","step_instance_id":5}"#
        );
        let read: FastExecuteScriptReply = serde_json::from_str(&written(&reply)).unwrap();
        assert_eq!(read, reply);
    }
}
