//! Why a command failed, and the exit status that says so.

/// Exit statuses, as `fleetrun --help` documents them.
pub mod exit {
    pub const OK: u8 = 0;
    /// A host failed, timed out, was offline or was terminated.
    pub const HOSTS_FAILED: u8 = 1;
    /// Bad flags or settings (clap uses 2 for its own usage errors too).
    pub const USAGE: u8 = 2;
    /// The controller refused the request.
    pub const REFUSED: u8 = 3;
    /// The controller cannot be reached, or did not answer like one.
    pub const UNREACHABLE: u8 = 4;
    /// Standard output was closed under us (`fleetrun logs 5 | head`), as a shell reports SIGPIPE.
    pub const OUTPUT_CLOSED: u8 = 141;
    /// Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

/// A command that could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The invocation cannot work: a missing setting, an unreadable script, a malformed value.
    #[error("{0}")]
    Usage(String),
    /// The controller answered with an error envelope.
    #[error("the controller refused {api}: code {code}: {message}")]
    Refused {
        api: String,
        code: i64,
        message: String,
    },
    /// `--ip` names hosts the controller does not know (found out before submitting).
    #[error("no registered host has the IP {0} (`fleetrun hosts` lists them)")]
    UnknownHosts(String),
    /// No usable answer: connection refused, timeout, not HTTP 200, not a bk-job envelope.
    #[error("cannot reach the controller at {url}: {why}")]
    Unreachable { url: String, why: String },
    /// Standard output cannot be written (closed by a pipe's reader, or a full disk).
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    /// A failed write to standard output.
    pub fn output(error: std::io::Error) -> Self {
        Self::Output(error)
    }

    /// Whether to tell the user: a reader that closed the pipe knows already.
    pub fn worth_printing(&self) -> bool {
        !matches!(self, Self::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::Refused { .. } | Self::UnknownHosts(_) => exit::REFUSED,
            Self::Unreachable { .. } => exit::UNREACHABLE,
            Self::Output(_) => exit::OUTPUT_CLOSED,
        }
    }
}
