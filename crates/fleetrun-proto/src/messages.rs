//! Wire messages. These types are the compatibility surface between controller and agent:
//! change them only together with [`crate::PROTOCOL_VERSION`] (or [`crate::ALPN`]).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// First frame on the control stream, agent to controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// The id the agent believes it has. The controller checks it against the certificate and
    /// refuses a mismatch; it is here so the refusal can name both.
    pub agent_id: String,
    pub agent_version: String,
    pub hostname: String,
    pub os_type: OsType,
    /// Cloud area (`bk_cloud_id`) from the agent's configuration.
    pub bk_cloud_id: i64,
    /// The host's inner addresses, the first being the one operators target it by.
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsType {
    Linux,
    Windows,
    Other,
}

/// The controller's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome {
        bk_host_id: i64,
        /// How often the agent sends [`ControlUp::Heartbeat`].
        heartbeat_interval_ms: u64,
    },
    /// The connection is closed right after; `reason` says why, for the agent's log.
    Refused { reason: String },
    /// The answer to an agent of protocol version 2 or later: the version both sides speak from
    /// now on (the lower of the two), then what [`HelloReply::Welcome`] says. The agent answers
    /// with [`ControlUp::Holding`] before its first heartbeat. An agent of version 1 gets
    /// [`HelloReply::Welcome`] instead, and the old behaviour.
    Negotiated {
        protocol_version: u32,
        bk_host_id: i64,
        heartbeat_interval_ms: u64,
    },
    /// Version 6: the answer to an agent of version 6 or later instead of
    /// [`HelloReply::Negotiated`], saying as much and whether the controller is one of a cluster
    /// (`clustered`: it shares its database with other controllers). Only a clustered
    /// controller's tasks may be taken to another controller of the agent's list while it stays
    /// unreachable: another controller sharing its database takes them over, where a standalone
    /// controller's would be unknown and killed. A controller that said `Negotiated` is taken
    /// for a standalone one.
    Joined {
        protocol_version: u32,
        bk_host_id: i64,
        heartbeat_interval_ms: u64,
        clustered: bool,
    },
}

/// Control stream, agent to controller, after the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlUp {
    Heartbeat {
        running_tasks: u32,
    },
    /// Version 2: the tasks the agent holds (running, or finished with a result the controller
    /// has not acknowledged), sent once, right after [`HelloReply::Negotiated`].
    Holding {
        tasks: Vec<HeldTask>,
    },
    /// Version 3: a certificate signing request (DER) over the agent's enrolled key, sent when
    /// two thirds of its certificate's life have passed; answered with a [`ControlDown`].
    Renew {
        #[serde(with = "serde_bytes")]
        csr: Vec<u8>,
    },
}

/// Version 3: control stream, controller to agent, after the hello: answers to
/// [`ControlUp::Renew`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlDown {
    /// The renewed certificate chain (PEM) and its end (Unix milliseconds); the agent presents
    /// it from its next connection on, the current one goes on.
    Renewed {
        certificate_pem: String,
        not_after_ms: i64,
    },
    /// Nothing was issued; the agent keeps its certificate and says why in its log.
    RenewRefused { reason: String },
}

/// A task an agent holds across connections, as it reports it when it reconnects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldTask {
    pub task_id: Uuid,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// The host the controller sent the task to (its `bk_host_id` at the time).
    pub bk_host_id: i64,
    /// Which run of the step this is; 0 for the first.
    pub execute_count: u32,
    /// The offset the controller last said it holds the output up to ([`TaskDown::Resume`]).
    pub acked_offset: u64,
    /// Bytes of output the agent has for the task (its next offset).
    pub produced: u64,
    /// When the process started, on the agent's clock; `None` while it waits for a slot.
    pub started_at_ms: Option<i64>,
    /// Whether the task has its result.
    pub finished: bool,
}

/// Task stream, controller to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskDown {
    Run(TaskRequest),
    /// Stop the task: kill its whole process tree. The agent still answers with a result.
    Cancel,
    /// Version 2, first frame of a stream: continue a task the agent holds on this new stream,
    /// sending its output from `from_offset` (what the controller has), then its result.
    Resume {
        task_id: Uuid,
        from_offset: u64,
    },
    /// Version 2, first frame of a stream: the controller does not want this task (terminated,
    /// job gone, never sent to this agent): kill it if it runs and forget it. Nothing answers.
    Discard {
        task_id: Uuid,
    },
    /// Version 2, after [`TaskUp::Finished`]: the result and the output are stored; the agent
    /// forgets the task.
    ResultStored,
    /// Version 4, first frame of a stream: write files on the host as an account. Answered with
    /// [`TaskUp::Started`], one [`TaskUp::FilePlaced`] per file, then [`TaskUp::Finished`]. The
    /// agent does not hold it across connections: a lost stream loses its reports, and files
    /// already renamed into place stay.
    Place(PlaceRequest),
    /// Version 5, first frame of a stream to a source host: list the files matching the
    /// request's paths as its account and send each one's contents in chunks
    /// ([`TaskUp::SourceFile`], [`TaskUp::SourceChunk`], [`TaskUp::SourceFileEnd`]), then the
    /// result. Not held across connections.
    Collect(CollectRequest),
    /// Version 5, first frame of a stream to a target host: write the request's files as its
    /// account, each pulled from the controller ([`TaskUp::Want`], answered by
    /// [`TaskDown::Chunk`]s), reported as [`TaskUp::FilePlaced`], then the result.
    Fetch(FetchRequest),
    /// Version 5, on a [`TaskDown::Fetch`] stream: the next chunk of file `index` (the one last
    /// wanted), in order. Its SHA-256 is the request's for that place in the file; chunks of a
    /// file wanted before are dropped.
    Chunk {
        index: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// Version 5: files to read on a source host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectRequest {
    pub task_id: Uuid,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// The OS user the files are read as.
    pub account: String,
    /// Absolute paths as bk-job writes them: a file, a directory (ending in `/`, sent whole),
    /// a last component with `*` and `?` wildcards, or a last component `REGEX:<pattern>`.
    pub paths: Vec<String>,
    /// Bytes a second the host may send, 0 for no limit.
    pub upload_bytes_per_sec: u64,
    pub timeout_secs: u32,
}

/// Version 5: one file of a [`TaskDown::Collect`] found on the source host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Numbers the host's files from 0, in the order they are sent.
    pub index: u32,
    /// Which of [`CollectRequest::paths`] it matched.
    pub path_index: u32,
    /// Its absolute path on the source host.
    pub path: String,
    /// Where it lands below the target directory: its name, or for a directory sent whole the
    /// directory's name and the path inside it.
    pub relative: String,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// Version 5: how reading one source file, or one requested path, ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEnd {
    /// The file's [`SourceFile::index`], or for a path that gave no file, `None`.
    pub index: Option<u32>,
    pub path_index: u32,
    pub ending: SourceEnding,
    /// SHA-256 of all the file's chunks, in order.
    pub sha256: [u8; 32],
    pub bytes: u64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub message: String,
}

/// Version 5: the end of one source file's (or path's) reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceEnding {
    /// Read whole and unchanged.
    Read,
    /// Nothing matches the path.
    NotFound,
    /// The account may not read it.
    Denied,
    /// A symbolic link or something other than a regular file or directory is in the way.
    BadPath,
    /// The file changed while it was read.
    Changed,
    /// Not read: the task was cancelled or timed out.
    Skipped,
    Failed,
}

/// Version 5: files to write on a target host, pulled from the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub task_id: Uuid,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// The OS user the files are written as (and owned by).
    pub account: String,
    /// As [`PlaceRequest::strict`].
    pub strict: bool,
    pub timeout_secs: u32,
    pub files: Vec<FetchFile>,
}

/// Version 5: one file of a [`FetchRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchFile {
    /// Absolute directory it lands in, created as the account where missing.
    pub dir: String,
    /// Its path below `dir`: plain components separated by `/`.
    pub name: String,
    pub mode: u32,
    pub size: u64,
    /// SHA-256 of the whole file, checked on what was written before the rename.
    pub sha256: [u8; 32],
    /// SHA-256 of each chunk, in order; each chunk is checked as it arrives.
    pub chunks: Vec<[u8; 32]>,
}

/// Version 4: files to write into one directory on one host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceRequest {
    pub task_id: Uuid,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// The OS user the files are written as (and owned by).
    pub account: String,
    /// Absolute directory the files land in; created as the account where missing.
    pub target_dir: String,
    /// Strict: the first file that fails ends the task, the rest are not written. Force: every
    /// file is tried.
    pub strict: bool,
    pub timeout_secs: u32,
    pub files: Vec<PlaceFile>,
}

/// Version 4: one file of a [`PlaceRequest`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceFile {
    /// A single path component: no `/`, not `.` or `..`, no NUL.
    pub name: String,
    /// Permission bits (at most `0o777`) the file gets.
    pub mode: u32,
    /// SHA-256 of `content`; checked against what was written before the rename.
    pub sha256: [u8; 32],
    #[serde(with = "serde_bytes")]
    pub content: Vec<u8>,
}

impl std::fmt::Debug for PlaceRequest {
    // Contents stay out of debug output: configuration files hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaceRequest")
            .field("task_id", &self.task_id)
            .field("job_instance_id", &self.job_instance_id)
            .field("step_instance_id", &self.step_instance_id)
            .field("account", &self.account)
            .field("target_dir", &self.target_dir)
            .field("strict", &self.strict)
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PlaceFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaceFile")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("len", &self.content.len())
            .finish_non_exhaustive()
    }
}

/// Version 4: how one file of a [`PlaceRequest`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    /// Its index in [`PlaceRequest::files`].
    pub index: u32,
    pub ending: FileEnding,
    /// Bytes written.
    pub bytes: u64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// What happened, for the file's log.
    pub message: String,
}

/// Version 4: the end of one file's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileEnding {
    /// Written, verified and renamed into place.
    Placed,
    /// The account may not write there.
    Denied,
    /// The file system is full (or the account's quota).
    NoSpace,
    /// The path is refused: a symbolic link or a non-directory in the way, a bad name.
    BadPath,
    /// What was written does not hash to the request's SHA-256.
    HashMismatch,
    /// Not tried: an earlier file failed in strict mode, or the task was cancelled or timed out.
    Skipped,
    /// Any other failure; the message says which.
    Failed,
}

/// One script to run on one host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub task_id: Uuid,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    /// bk-job `script_language`: 1 shell, 2 bat, 3 Perl, 4 Python, 5 PowerShell.
    pub script_language: i32,
    #[serde(with = "serde_bytes")]
    pub script: Vec<u8>,
    /// Decoded `script_param`, still one string: the agent splits it into arguments.
    pub script_param: String,
    /// When set, the parameter is never written to any log.
    pub is_param_sensitive: bool,
    /// The OS user to run as.
    pub account: String,
    pub timeout_secs: u32,
    /// Bytes of output the agent keeps and sends for this task (first and last parts).
    pub output_limit: u64,
    pub windows_interpreter: Option<String>,
}

impl std::fmt::Debug for TaskRequest {
    // Script and parameter stay out of debug output: either may hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRequest")
            .field("task_id", &self.task_id)
            .field("job_instance_id", &self.job_instance_id)
            .field("step_instance_id", &self.step_instance_id)
            .field("script_language", &self.script_language)
            .field("script_len", &self.script.len())
            .field("account", &self.account)
            .field("timeout_secs", &self.timeout_secs)
            .finish_non_exhaustive()
    }
}

/// Task stream, agent to controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskUp {
    /// The process is running (or, for a task that failed before it could start, about to report).
    Started { started_at_ms: i64 },
    /// Output, stdout and stderr interleaved as produced. `offset` counts the bytes of this task's
    /// output sent before this chunk, so the receiver can tell a gap or a repeat.
    Output {
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Output between the kept first part and the kept last part was dropped.
    Truncated {
        dropped_bytes: u64,
        dropped_lines: u64,
    },
    /// The last message on the stream.
    Finished(TaskResult),
    /// Version 2: `bytes` of output from `offset` on were lost on the agent (its spool could not
    /// be written: disk full). The next output continues at `offset + bytes`.
    SpoolLost { offset: u64, bytes: u64 },
    /// Version 4: one file of a [`TaskDown::Place`] ended; version 5, also of a
    /// [`TaskDown::Fetch`].
    FilePlaced(FileReport),
    /// Version 5, on a [`TaskDown::Fetch`] stream: send the chunks of this file, in order.
    Want { index: u32 },
    /// Version 5, on a [`TaskDown::Collect`] stream: a file found; its chunks follow.
    SourceFile(SourceFile),
    /// Version 5: the next chunk of the file last announced.
    SourceChunk {
        sha256: [u8; 32],
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Version 5: a file (or a path that gave none) ended.
    SourceFileEnd(SourceEnd),
    /// Version 6, on a [`TaskDown::Fetch`] stream: send the chunks of this file from chunk
    /// `chunk` on, in order: the agent holds (and has checked) the ones before, from a try cut
    /// by a lost connection.
    WantFrom { index: u32, chunk: u32 },
}

/// How a task ended on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub ending: Ending,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Bytes the script wrote in all.
    pub output_bytes: u64,
    /// Processes of the task's tree found alive after the final kill; 0 unless something escaped.
    pub survivors: u32,
    /// A line for the host's log where the ending deserves one (signal, timeout, missing user).
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ending {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    UserNotFound,
    InterpreterMissing,
    /// The agent could not run the task (staging, spawn, bad request).
    Failed,
}
