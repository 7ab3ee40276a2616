//! bk-job's status numbers, named.

/// Job and step status.
pub mod job {
    pub const PENDING: i32 = 1;
    pub const RUNNING: i32 = 2;
    pub const SUCCESS: i32 = 3;
    pub const FAILED: i32 = 4;
    /// A step whose failures an operator (or a rolling mode) chose to ignore.
    pub const IGNORE_ERROR: i32 = 6;
    /// Waiting for a user's confirmation (bk-job's confirm steps; fleetrun has none).
    pub const WAITING_USER: i32 = 7;
    pub const TERMINATED: i32 = 8;
    pub const ABNORMAL: i32 = 9;
    pub const TERMINATING: i32 = 10;
    pub const TERMINATE_SUCCESS: i32 = 11;
    /// An operator ended a job that waited for a confirmation.
    pub const CONFIRM_TERMINATED: i32 = 13;

    /// Statuses after which nothing changes any more.
    pub fn is_finished(status: i32) -> bool {
        matches!(status, 3 | 4 | 5 | 6 | 8 | 9 | 11 | 13 | 14)
    }

    /// Statuses of a job the engine was following. A pending job (created with
    /// `start_task=false`) is not among them: it waits for its start, also across restarts.
    pub const UNFINISHED: &[i32] = &[RUNNING, WAITING_USER, 10, 15];
}

/// Per-host status (`step_ip_result.status`).
pub mod host {
    pub const WAITING: i32 = 5;
    pub const RUNNING: i32 = 7;
    pub const SUCCESS: i32 = 9;
    pub const SCRIPT_FAILED: i32 = 101;
    pub const SCRIPT_TIMEOUT: i32 = 102;
    pub const NON_ZERO_EXIT: i32 = 104;
    /// bk-job's GSE_SCRIPT_TIMEOUT: the agent layer gave no result of a script task in time.
    /// (bk-job's 303 is a file task's timeout.)
    pub const AGENT_TIMEOUT: i32 = 16;
    /// bk-job's GSE_TIMEOUT: a file task gave no result in time.
    pub const FILE_TIMEOUT: i32 = 303;
    pub const AGENT_ABNORMAL: i32 = 310;
    /// bk-job's GSE_FILE_TASK_ERROR: a file could not be written on the host.
    pub const FILE_TASK_ERROR: i32 = 329;
    pub const USER_NOT_EXIST: i32 = 311;
    pub const AGENT_TASK_ERROR: i32 = 399;
    pub const TERMINATE_SUCCESS: i32 = 403;

    /// 3 (last success) and 9 count as success.
    pub fn is_success(status: i32) -> bool {
        matches!(status, 3 | 9)
    }

    /// Statuses a host result has before its task ended.
    pub const UNFINISHED: &[i32] = &[0, WAITING, RUNNING];
}
