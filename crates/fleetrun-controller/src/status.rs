//! bk-job's status numbers as the store keeps them (`i32` columns), named after
//! [`fleetrun_api`]'s enums, which own the numbers and what they mean.

/// The numbers of a list of statuses. A length other than the one given fails the build, so
/// the store's list cannot lose or gain a status the enum's list has not.
macro_rules! codes {
    ($n:literal, $set:expr) => {{
        let set = $set;
        assert!(set.len() == $n, "the enum's list changed length");
        let mut out = [0; $n];
        let mut i = 0;
        while i < $n {
            out[i] = set[i].code();
            i += 1;
        }
        out
    }};
}

/// Job and step status ([`fleetrun_api::JobStatus`]).
pub mod job {
    use fleetrun_api::JobStatus;

    pub const PENDING: i32 = JobStatus::Pending.code();
    pub const RUNNING: i32 = JobStatus::Running.code();
    pub const SUCCESS: i32 = JobStatus::Success.code();
    pub const FAILED: i32 = JobStatus::Failed.code();
    /// A step whose failures an operator (or a rolling mode) chose to ignore.
    pub const IGNORE_ERROR: i32 = JobStatus::IgnoreError.code();
    /// Waiting for a user's decision (a paused rolling job).
    pub const WAITING_USER: i32 = JobStatus::WaitingUser.code();
    pub const TERMINATED: i32 = JobStatus::Terminated.code();
    pub const ABNORMAL: i32 = JobStatus::Abnormal.code();
    pub const TERMINATING: i32 = JobStatus::Terminating.code();
    pub const TERMINATE_SUCCESS: i32 = JobStatus::TerminateSuccess.code();
    /// An operator ended a job that waited for a confirmation.
    pub const CONFIRM_TERMINATED: i32 = JobStatus::ConfirmTerminated.code();

    /// Statuses after which nothing changes any more.
    pub fn is_finished(status: i32) -> bool {
        JobStatus::from_code(status).is_finished()
    }

    /// Statuses of a job the engine was following ([`JobStatus::UNFINISHED`]).
    pub const UNFINISHED: &[i32] = &codes!(4, JobStatus::UNFINISHED);
}

/// Per-host status (`step_ip_result.status`, [`fleetrun_api::HostStatus`]).
pub mod host {
    use fleetrun_api::HostStatus;

    /// Succeeded in an earlier run of the step; counts as success.
    pub const LAST_SUCCESS: i32 = HostStatus::LastSuccess.code();
    pub const WAITING: i32 = HostStatus::Waiting.code();
    pub const RUNNING: i32 = HostStatus::Running.code();
    pub const SUCCESS: i32 = HostStatus::Success.code();
    pub const SCRIPT_FAILED: i32 = HostStatus::ScriptFailed.code();
    pub const SCRIPT_TIMEOUT: i32 = HostStatus::ScriptTimeout.code();
    pub const NON_ZERO_EXIT: i32 = HostStatus::NonZeroExit.code();
    /// bk-job's GSE_SCRIPT_TIMEOUT: the agent layer gave no result of a script task in time.
    /// (bk-job's 303 is a file task's timeout.)
    pub const AGENT_TIMEOUT: i32 = HostStatus::AgentTimeout.code();
    /// bk-job's GSE_TIMEOUT: a file task gave no result in time.
    pub const FILE_TIMEOUT: i32 = HostStatus::FileTimeout.code();
    pub const AGENT_ABNORMAL: i32 = HostStatus::AgentAbnormal.code();
    /// bk-job's GSE_FILE_TASK_ERROR: a file could not be written on the host.
    pub const FILE_TASK_ERROR: i32 = HostStatus::FileTaskError.code();
    pub const USER_NOT_EXIST: i32 = HostStatus::UserNotExist.code();
    pub const AGENT_TASK_ERROR: i32 = HostStatus::AgentTaskError.code();
    pub const TERMINATE_SUCCESS: i32 = HostStatus::TerminateSuccess.code();

    /// This run's and an earlier run's success ([`HostStatus::is_success`]).
    pub fn is_success(status: i32) -> bool {
        HostStatus::from_code(status).is_success()
    }

    /// The statuses that count as success, as the store's queries take them
    /// ([`HostStatus::SUCCEEDED`]).
    pub const SUCCEEDED: &[i32] = &codes!(2, HostStatus::SUCCEEDED);

    /// Statuses a host result has before its task ended ([`HostStatus::UNFINISHED`]).
    pub const UNFINISHED: &[i32] = &codes!(3, HostStatus::UNFINISHED);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use fleetrun_api::{HostStatus, JobStatus};

    #[test]
    fn the_store_lists_follow_the_enums() {
        let set = |codes: &[i32]| codes.iter().copied().collect::<BTreeSet<i32>>();
        let unfinished_jobs: Vec<i32> = JobStatus::UNFINISHED.iter().map(|s| s.code()).collect();
        assert_eq!(super::job::UNFINISHED, unfinished_jobs);
        let succeeded = (0..500).filter(|c| super::host::is_success(*c));
        assert_eq!(set(super::host::SUCCEEDED), succeeded.collect());
        let unfinished = (0..500).filter(|c| !HostStatus::from_code(*c).is_finished());
        assert_eq!(set(super::host::UNFINISHED), unfinished.collect());
    }
}
