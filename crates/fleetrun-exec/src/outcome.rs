//! How a task ended.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::SystemTime;

use nix::sys::signal::Signal;

use crate::language::SANE_PATH;

/// The result of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub ending: Ending,
    /// When the script was started (when the task was refused, for an
    /// ending before that).
    pub started_at: SystemTime,
    /// When the task was over: tree killed, staging directory removed.
    pub finished_at: SystemTime,
    /// Total bytes the script wrote, kept or not.
    pub output_bytes: u64,
    /// Bytes cut from the middle of the output.
    pub dropped_bytes: u64,
    /// Newlines in the bytes cut.
    pub dropped_lines: u64,
    /// Processes of the task's tree still alive after the final SIGKILL
    /// (should be 0).
    pub survivors: u32,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The script exited with this status.
    Exited(i32),
    /// The script's main process was killed by a signal the agent did not
    /// send.
    Signaled {
        /// Signal number.
        signal: i32,
        /// Signal name, e.g. "SIGKILL".
        name: String,
    },
    /// The timeout expired; the tree was killed.
    TimedOut,
    /// The cancellation token fired (the operator terminated the job); the
    /// tree was killed.
    Cancelled,
    /// The account does not exist on this host.
    UserNotFound(String),
    /// The interpreter is not installed, e.g. "pwsh" or "cmd.exe".
    InterpreterMissing(String),
    /// Staging or spawning failed, for the reason given.
    Failed(String),
}

impl Ending {
    pub(crate) fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Exited(code),
            (None, Some(signal)) => Self::Signaled {
                signal,
                name: signal_name(signal),
            },
            (None, None) => Self::Failed(format!("unexpected wait status {status}")),
        }
    }
}

fn signal_name(signal: i32) -> String {
    Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

impl Outcome {
    /// A line for the host's log when the ending deserves one: a signal, a
    /// timeout, a missing account or interpreter, a failure, or processes
    /// that survived the kill. `None` for a plain exit or a cancellation.
    pub fn log_line(&self) -> Option<String> {
        let ending = match &self.ending {
            Ending::Exited(_) | Ending::Cancelled => None,
            Ending::Signaled { signal, name } => {
                Some(format!("the script was killed by {name} (signal {signal})"))
            }
            Ending::TimedOut => {
                Some("the script timed out and its process tree was killed".to_owned())
            }
            Ending::UserNotFound(account) => {
                Some(format!("the account {account} does not exist on this host"))
            }
            Ending::InterpreterMissing(name) => Some(format!(
                "the interpreter {name} is not installed (searched {SANE_PATH})"
            )),
            Ending::Failed(reason) => Some(format!("the script could not run: {reason}")),
        };
        let survivors = (self.survivors > 0).then(|| {
            format!(
                "{} process(es) of the task survived SIGKILL",
                self.survivors
            )
        });
        match (ending, survivors) {
            (Some(ending), Some(survivors)) => Some(format!("{ending}; {survivors}")),
            (ending, survivors) => ending.or(survivors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ending: Ending, survivors: u32) -> Outcome {
        Outcome {
            ending,
            started_at: SystemTime::UNIX_EPOCH,
            finished_at: SystemTime::UNIX_EPOCH,
            output_bytes: 0,
            dropped_bytes: 0,
            dropped_lines: 0,
            survivors,
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(
            Ending::from_status(ExitStatus::from_raw(0)),
            Ending::Exited(0)
        );
        assert_eq!(
            Ending::from_status(ExitStatus::from_raw(3 << 8)),
            Ending::Exited(3)
        );
        assert_eq!(
            Ending::from_status(ExitStatus::from_raw(9)),
            Ending::Signaled {
                signal: 9,
                name: "SIGKILL".into()
            }
        );
        // 0x80: the core-dump bit.
        assert_eq!(
            Ending::from_status(ExitStatus::from_raw(11 | 0x80)),
            Ending::Signaled {
                signal: 11,
                name: "SIGSEGV".into()
            }
        );
    }

    #[test]
    fn log_lines() {
        assert_eq!(outcome(Ending::Exited(0), 0).log_line(), None);
        assert_eq!(outcome(Ending::Exited(3), 0).log_line(), None);
        assert_eq!(outcome(Ending::Cancelled, 0).log_line(), None);
        let signaled = Ending::Signaled {
            signal: 9,
            name: "SIGKILL".into(),
        };
        assert_eq!(
            outcome(signaled, 0).log_line().unwrap(),
            "the script was killed by SIGKILL (signal 9)"
        );
        assert!(
            outcome(Ending::TimedOut, 0)
                .log_line()
                .unwrap()
                .contains("timed out")
        );
        assert!(
            outcome(Ending::UserNotFound("bob".into()), 0)
                .log_line()
                .unwrap()
                .contains("account bob does not exist")
        );
        assert!(
            outcome(Ending::InterpreterMissing("pwsh".into()), 0)
                .log_line()
                .unwrap()
                .contains("interpreter pwsh is not installed")
        );
        assert_eq!(
            outcome(Ending::Exited(0), 2).log_line().unwrap(),
            "2 process(es) of the task survived SIGKILL"
        );
        assert_eq!(
            outcome(Ending::TimedOut, 1).log_line().unwrap(),
            "the script timed out and its process tree was killed; 1 process(es) of the task survived SIGKILL"
        );
    }
}
