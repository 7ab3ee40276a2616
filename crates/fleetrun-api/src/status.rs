//! Job, step and host statuses: bk-job's `RunStatusEnum` and `AgentTaskStatusEnum`, with the
//! questions fleetrun asks of them (finished? succeeded?) answered in one place.

use crate::codes::codes;

codes! {
    /// A job's or a step's status (`status` of `job_instance` and of each step).
    pub enum JobStatus {
        /// Created and not started (`start_task=false`, or a rolling batch not reached).
        Pending = 1 => "pending",
        Running = 2 => "running",
        Success = 3 => "success",
        Failed = 4 => "failed",
        Skipped = 5 => "skipped",
        /// A step whose failures an operator (or a rolling mode) chose to ignore.
        IgnoreError = 6 => "ignore error",
        /// Waiting for a user's decision: a rolling job paused between batches or on a failure.
        WaitingUser = 7 => "waiting for user",
        Terminated = 8 => "terminated",
        /// Ended without a known result (the controller stopped while it ran, for one).
        Abnormal = 9 => "abnormal",
        /// An operator's termination is on its way to the hosts.
        Terminating = 10 => "terminating",
        TerminateSuccess = 11 => "terminate success",
        /// An operator ended a job that waited for a confirmation.
        ConfirmTerminated = 13 => "termination confirmed",
        Abandoned = 14 => "abandoned",
        /// A rolling job between two batches.
        RollingWaiting = 15 => "rolling waiting",
    }
}

/// A step's status uses the job's numbers.
pub type StepStatus = JobStatus;

impl JobStatus {
    /// Statuses of a job the engine follows. A pending job (created with `start_task=false`) is
    /// not among them: it waits for its start, also across restarts.
    pub const UNFINISHED: &'static [Self] = &[
        Self::Running,
        Self::WaitingUser,
        Self::Terminating,
        Self::RollingWaiting,
    ];

    /// Whether nothing changes any more.
    pub const fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Success
                | Self::Failed
                | Self::Skipped
                | Self::IgnoreError
                | Self::Terminated
                | Self::Abnormal
                | Self::TerminateSuccess
                | Self::ConfirmTerminated
                | Self::Abandoned
        )
    }

    /// The status from its name (`failed`, `terminate-success`, `Terminate_Success`) or its
    /// number.
    pub fn parse(text: &str) -> Option<Self> {
        if let Ok(code) = text.parse() {
            return Some(Self::from_code(code));
        }
        let wanted = text.to_ascii_lowercase().replace(['-', '_'], " ");
        Self::NAMED
            .iter()
            .copied()
            .find(|s| s.name() == Some(wanted.as_str()))
    }
}

codes! {
    /// One host's status in a step (`step_ip_result_list[].status`).
    pub enum HostStatus {
        /// No status yet: a result row before the engine gave it one.
        Unknown = 0 => "unknown",
        AgentError = 1 => "agent error",
        InvalidHost = 2 => "invalid host",
        /// Succeeded in an earlier run of the step (a retry runs only the failed hosts).
        LastSuccess = 3 => "last success",
        Waiting = 5 => "waiting",
        Running = 7 => "running",
        Success = 9 => "success",
        Failed = 11 => "failed",
        SubmitFailed = 12 => "submit failed",
        TaskTimeout = 13 => "task timeout",
        LogError = 15 => "log error",
        /// bk-job's GSE_SCRIPT_TIMEOUT: the agent layer gave no result of a script task in time.
        AgentTimeout = 16 => "agent timeout",
        FileLogTimeout = 17 => "file log timeout",
        AgentNotInstalled = 18 => "agent not installed",
        ScriptFailed = 101 => "script failed",
        ScriptTimeout = 102 => "script timeout",
        ScriptTerminated = 103 => "script terminated",
        NonZeroExit = 104 => "non-zero exit code",
        CopyFileFailed = 202 => "file error",
        SourceFileMissing = 203 => "file error",
        /// bk-job's GSE_TIMEOUT: a file task gave no result in time.
        FileTimeout = 303 => "file task timeout",
        /// The agent was or went offline, or the controller lost the task.
        AgentAbnormal = 310 => "agent abnormal",
        UserNotExist = 311 => "user does not exist",
        BadPassword = 312 => "bad password",
        /// bk-job's GSE_FILE_TASK_ERROR: a file could not be written on the host.
        FileTaskError = 329 => "file task error",
        /// The agent could not run the task (staging, spawning, a refused request).
        AgentTaskError = 399 => "agent task error",
        /// Terminated by an operator.
        TerminateSuccess = 403 => "terminated",
        TerminateFailed = 404 => "terminate failed",
    }
}

impl HostStatus {
    /// Statuses a host result has before its task ended.
    pub const UNFINISHED: &'static [Self] = &[Self::Unknown, Self::Waiting, Self::Running];

    /// Statuses that count as success: this run's, and an earlier run's.
    pub const SUCCEEDED: &'static [Self] = &[Self::LastSuccess, Self::Success];

    /// Whether the host's task ended: not one of [`Self::UNFINISHED`].
    pub const fn is_finished(self) -> bool {
        !self.is_in(Self::UNFINISHED)
    }

    /// Whether the host succeeded, in this run of the step or an earlier one: one of
    /// [`Self::SUCCEEDED`].
    pub const fn is_success(self) -> bool {
        self.is_in(Self::SUCCEEDED)
    }

    /// Whether `set` holds it, by number.
    const fn is_in(self, set: &[Self]) -> bool {
        let mut i = 0;
        while i < set.len() {
            if set[i].code() == self.code() {
                return true;
            }
            i += 1;
        }
        false
    }

    /// bk-job's English description (`ExecuteObjectTaskStatusEnum`), as `status_desc` and
    /// `result_type_desc` carry it.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Unknown => "Unknown error",
            Self::AgentError | Self::AgentAbnormal => "Agent exception",
            Self::InvalidHost => "Invalid host",
            Self::LastSuccess => "Last successful",
            Self::Waiting => "Waiting for execution",
            Self::Running => "Executing",
            Self::Success => "Execution successful",
            Self::Failed => "Execution failed",
            Self::SubmitFailed => "Task issuance failed",
            Self::TaskTimeout => "Task timeout",
            Self::LogError => "Task log error",
            Self::AgentTimeout => "GSE script log timeout",
            Self::ScriptFailed => "Script execution failed",
            Self::ScriptTimeout => "Script execution timeout",
            Self::ScriptTerminated => "Script execution terminated",
            Self::NonZeroExit => "Script return code non-zero",
            Self::UserNotExist => "Username does not exist",
            Self::BadPassword => "User password error",
            Self::AgentTaskError => "Task execution error",
            Self::TerminateSuccess => "Task forced termination successful",
            Self::TerminateFailed => "Task forced termination failed",
            Self::FileLogTimeout
            | Self::AgentNotInstalled
            | Self::CopyFileFailed
            | Self::SourceFileMissing
            | Self::FileTimeout
            | Self::FileTaskError
            | Self::Other(_) => "Unknown status",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bk-job's numbers: the API's compatibility rests on them, so each is pinned here.
    #[test]
    fn job_status_numbers_are_bk_jobs() {
        let pinned = [
            (JobStatus::Pending, 1),
            (JobStatus::Running, 2),
            (JobStatus::Success, 3),
            (JobStatus::Failed, 4),
            (JobStatus::Skipped, 5),
            (JobStatus::IgnoreError, 6),
            (JobStatus::WaitingUser, 7),
            (JobStatus::Terminated, 8),
            (JobStatus::Abnormal, 9),
            (JobStatus::Terminating, 10),
            (JobStatus::TerminateSuccess, 11),
            (JobStatus::ConfirmTerminated, 13),
            (JobStatus::Abandoned, 14),
            (JobStatus::RollingWaiting, 15),
        ];
        assert_eq!(pinned.len(), JobStatus::NAMED.len());
        for (status, code) in pinned {
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(JobStatus::from_code(code), status);
            assert!(matches!(JobStatus::from_code(code), s if s.is_named()));
            assert_eq!(serde_json::to_string(&status).unwrap(), code.to_string());
            assert_eq!(
                serde_json::from_str::<JobStatus>(&code.to_string()).unwrap(),
                status
            );
        }
        let finished: Vec<i32> = (0..20)
            .filter(|c| JobStatus::from_code(*c).is_finished())
            .collect();
        assert_eq!(finished, [3, 4, 5, 6, 8, 9, 11, 13, 14]);
        let unfinished: Vec<i32> = JobStatus::UNFINISHED.iter().map(|s| s.code()).collect();
        assert_eq!(unfinished, [2, 7, 10, 15]);
    }

    #[test]
    fn host_status_numbers_are_bk_jobs() {
        let pinned = [
            (HostStatus::Unknown, 0),
            (HostStatus::AgentError, 1),
            (HostStatus::InvalidHost, 2),
            (HostStatus::LastSuccess, 3),
            (HostStatus::Waiting, 5),
            (HostStatus::Running, 7),
            (HostStatus::Success, 9),
            (HostStatus::Failed, 11),
            (HostStatus::SubmitFailed, 12),
            (HostStatus::TaskTimeout, 13),
            (HostStatus::LogError, 15),
            (HostStatus::AgentTimeout, 16),
            (HostStatus::FileLogTimeout, 17),
            (HostStatus::AgentNotInstalled, 18),
            (HostStatus::ScriptFailed, 101),
            (HostStatus::ScriptTimeout, 102),
            (HostStatus::ScriptTerminated, 103),
            (HostStatus::NonZeroExit, 104),
            (HostStatus::CopyFileFailed, 202),
            (HostStatus::SourceFileMissing, 203),
            (HostStatus::FileTimeout, 303),
            (HostStatus::AgentAbnormal, 310),
            (HostStatus::UserNotExist, 311),
            (HostStatus::BadPassword, 312),
            (HostStatus::FileTaskError, 329),
            (HostStatus::AgentTaskError, 399),
            (HostStatus::TerminateSuccess, 403),
            (HostStatus::TerminateFailed, 404),
        ];
        assert_eq!(pinned.len(), HostStatus::NAMED.len());
        for (status, code) in pinned {
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(HostStatus::from_code(code), status);
            assert_eq!(serde_json::to_string(&status).unwrap(), code.to_string());
            assert_eq!(
                serde_json::from_str::<HostStatus>(&code.to_string()).unwrap(),
                status
            );
        }
        let success: Vec<i32> = (0..500)
            .filter(|c| HostStatus::from_code(*c).is_success())
            .collect();
        assert_eq!(success, [3, 9]);
        let succeeded: Vec<i32> = HostStatus::SUCCEEDED.iter().map(|s| s.code()).collect();
        assert_eq!(succeeded, success);
        let unfinished: Vec<i32> = (0..500)
            .filter(|c| !HostStatus::from_code(*c).is_finished())
            .collect();
        assert_eq!(unfinished, [0, 5, 7]);
        let listed: Vec<i32> = HostStatus::UNFINISHED.iter().map(|s| s.code()).collect();
        assert_eq!(listed, unfinished);
    }

    #[test]
    fn unnamed_numbers_survive_a_round_trip() {
        let odd = HostStatus::from_code(12345);
        assert!(matches!(odd, HostStatus::Other(code) if code.get() == 12345));
        assert_eq!(odd.name(), None);
        assert_eq!(serde_json::to_string(&odd).unwrap(), "12345");
        assert_eq!(serde_json::from_str::<JobStatus>("-7").unwrap().code(), -7);
        assert!(serde_json::from_str::<JobStatus>("\"3\"").is_err());
        assert!(serde_json::from_str::<JobStatus>("3000000000").is_err());
    }

    /// `Other` never holds a named number, so a value equal to `Success` answers as `Success`
    /// does, whichever way it was made.
    #[test]
    fn other_holds_only_unnamed_numbers() {
        for code in -5..500 {
            let status = HostStatus::from_code(code);
            let named = HostStatus::NAMED.iter().find(|s| s.code() == code);
            assert_eq!(status.is_named(), named.is_some(), "{code}");
            match status {
                HostStatus::Other(unnamed) => {
                    assert_eq!(unnamed.get(), code);
                    assert!(named.is_none(), "{code} has a name but read as Other");
                }
                _ => assert_eq!(Some(&status), named),
            }
            let read: HostStatus = serde_json::from_str(&code.to_string()).unwrap();
            for other in [status, read] {
                assert_eq!(other.is_success(), status.is_success());
                assert_eq!(other.is_finished(), status.is_finished());
                assert_eq!(other.name(), status.name());
                assert_eq!(other.description(), status.description());
            }
        }
        assert!(HostStatus::from_code(9).is_success());
        assert!(!matches!(HostStatus::from_code(9), HostStatus::Other(_)));
        let job = JobStatus::from_code(3);
        assert!(job.is_finished() && job.is_named());
    }

    #[test]
    fn job_statuses_parse_from_names_and_numbers() {
        assert_eq!(
            JobStatus::parse("terminate-success"),
            Some(JobStatus::TerminateSuccess)
        );
        assert_eq!(JobStatus::parse("FAILED"), Some(JobStatus::Failed));
        assert_eq!(JobStatus::parse("7"), Some(JobStatus::WaitingUser));
        assert_eq!(JobStatus::parse("nope"), None);
        for status in JobStatus::NAMED {
            assert_eq!(JobStatus::parse(status.name().unwrap()), Some(*status));
        }
    }
}
