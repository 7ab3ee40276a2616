//! Runs one script on this host for the fleetrun agent.
//!
//! A [`Task`] names a script, its language, its arguments, the OS account to
//! run it as, a timeout and an output limit. [`Executor::start`] stages the
//! script in a private directory, starts it under that account in its own
//! session and (where the host allows it) its own cgroup v2, and streams its
//! output through an [`OutputReceiver`]. The task is over when the script's
//! main process has exited *and* its output pipe is closed, when the timeout
//! expires, or when the operator cancels it; in every case whatever is left
//! of the script's process tree is then killed (SIGTERM, a grace period,
//! SIGKILL) and the staging directory removed. The [`Outcome`] says how it
//! ended.
//!
//! Only Linux is supported. The crate does no networking and knows nothing
//! about the wire format: the agent translates to and from the protocol.

mod account;
mod cgroup;
pub mod collect;
mod dirs;
mod kill;
mod language;
mod outcome;
mod output;
mod params;
pub mod place;
mod run;
mod stage;
mod sys;
mod tree;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use language::Language;
pub use outcome::{Ending, Outcome};
pub use output::{OutputEvent, OutputReceiver, OutputSender};
pub use params::{ParamError, split_params};

/// Removes `name` from the directory `parent` (a file or link itself, a directory with
/// everything below it) without ever following a symbolic link: `parent` is opened with
/// `O_NOFOLLOW`, and each directory below it relative to its parent's descriptor. Gone already
/// is fine. For trees under the agent's work directory that something else may have changed.
pub fn remove_without_following(
    parent: &std::path::Path,
    name: &std::ffi::OsStr,
) -> std::io::Result<()> {
    use std::os::fd::AsFd as _;
    let dir = nix::fcntl::openat(
        nix::fcntl::AT_FDCWD,
        parent,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    dirs::remove_at(dir.as_fd(), name)
}

/// How long a script's process tree gets between SIGTERM and SIGKILL unless
/// configured otherwise.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Bytes of output kept per task unless the task says otherwise (head + tail).
pub const DEFAULT_OUTPUT_LIMIT: usize = 5 * 1024 * 1024;

/// Name of the cgroup, directly under the cgroup2 mount, that holds one child
/// cgroup per running task.
pub const DEFAULT_CGROUP_NAME: &str = "fleetrun";

/// How the executor behaves on this host.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Scripts are staged under `work_dir/tasks/<task id>/`.
    pub work_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a process tree is killed.
    pub kill_grace: Duration,
    /// Put each task in its own cgroup v2 when the host allows it; otherwise
    /// (or when false) track the tree through process groups, sessions and
    /// `/proc`.
    pub use_cgroup: bool,
    /// Name of the parent cgroup under the cgroup2 mount
    /// ([`DEFAULT_CGROUP_NAME`]). Two executors on one host must not share
    /// it: `Executor::new` kills whatever it finds there.
    pub cgroup_name: String,
    /// `Some(why)`: a task whose account resolves to uid 0, under whatever name, is refused
    /// (ending [`Ending::Failed`] with `account "<name>" is root (uid 0): <why>`) before
    /// anything is staged. Checked on the account the task would run as, from the one lookup
    /// that resolves it; a lookup that fails refuses the task as well.
    pub refuse_root: Option<String>,
    /// Where scripts are staged ([`Staging::WorkDir`] unless set).
    pub staging: Staging,
}

/// Where an executor stages scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staging {
    /// In `work_dir/tasks` only.
    WorkDir,
    /// Scripts up to 1 MiB on the first of `bases` that is a memory file system (tmpfs) mounted
    /// without `noexec` and where the agent has, or can make, a directory checked as the work
    /// directory is (see [`Staging::memory_bases`]), as long as the scripts staged there at once
    /// stay within `budget`; larger ones, every one when there is no such base, those beyond
    /// the budget and any that fails to stage there, in `work_dir/tasks`. A script staged there
    /// spares the disk its writes, but holds the host's memory while it runs, and tmpfs pages
    /// may still reach a swap device. The task's directory there is the account's, so an
    /// account may fill that file system up to its size: choose bases whose filling harms
    /// nothing else (`/dev/shm`, writable by every account anyway, rather than `/run`).
    Memory {
        /// Directories that may be on a memory file system, in order of preference.
        bases: Vec<PathBuf>,
        /// Bytes (counted in whole 4 KiB pages per script) the scripts staged on the memory file
        /// system may take at once, across the executor's tasks.
        budget: u64,
    },
}

/// The default of [`Staging::Memory`]'s `budget`: 64 MiB.
pub const DEFAULT_MEMORY_STAGING_BUDGET: u64 = 64 * 1024 * 1024;

impl Staging {
    /// `$XDG_RUNTIME_DIR` for an agent that is not root, then `/dev/shm`. Never root's `/run`,
    /// whose filling by an account would harm the host's services; an operator may still
    /// choose it.
    pub fn memory_bases() -> Vec<PathBuf> {
        stage::memory_bases()
    }
}

impl ExecConfig {
    /// The defaults: 2 s kill grace, cgroup v2 when available, under
    /// `<cgroup2 mount>/fleetrun`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
            kill_grace: DEFAULT_KILL_GRACE,
            use_cgroup: true,
            cgroup_name: DEFAULT_CGROUP_NAME.to_owned(),
            refuse_root: None,
            staging: Staging::WorkDir,
        }
    }
}

/// One script to run.
#[derive(Debug, Clone)]
pub struct Task {
    /// Unique task id (a uuid string). Names the staging directory and the
    /// cgroup, so only ASCII letters, digits, `-`, `_` and `.` are accepted.
    pub id: String,
    /// The script's language, which picks the interpreter.
    pub language: Language,
    /// The decoded script content.
    pub script: Vec<u8>,
    /// Already split parameters (see [`split_params`]).
    pub args: Vec<String>,
    /// Keep `args` off the interpreter's command line, which every local
    /// account can read (`ps`, `/proc/<pid>/cmdline`): shell, Perl and
    /// Python scripts then get them through an inherited pipe, with the same
    /// `$0` and arguments as otherwise. PowerShell and batch scripts still
    /// get them as arguments.
    pub sensitive_args: bool,
    /// OS user name to run as.
    pub account: String,
    /// Time the script may run before its process tree is killed.
    pub timeout: Duration,
    /// Bytes of output kept: the first half as it arrives, the last half at
    /// the end ([`DEFAULT_OUTPUT_LIMIT`]).
    pub output_limit: usize,
    /// Custom interpreter for Windows hosts. Like bk-job, ignored on Linux.
    pub windows_interpreter: Option<String>,
}

/// A failure to prepare the host in [`Executor::new`].
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `work_dir` or a directory above it could be replaced by another
    /// account, which could then swap the scripts the agent stages there
    /// (and runs as root). A configuration error: nothing was changed.
    #[error(
        "refusing the work directory: {} (owner {owner}, mode {mode:04o}) {problem}; whoever can replace it can swap the scripts staged below it, which may run as root. Use a directory owned by root (or the agent's account) that only its owner can write to, below directories that are the same (or sticky, like /tmp)",
        .dir.display()
    )]
    UntrustedWorkDir {
        /// The offending directory (or symlink).
        dir: PathBuf,
        /// Its owner, as "name (uid N)".
        owner: String,
        /// Its permission bits.
        mode: u32,
        /// What is wrong, e.g. "is writable by its group".
        problem: &'static str,
    },
    /// The staging root `work_dir/tasks` could not be created or given its
    /// owner and mode.
    #[error("cannot prepare the staging directory {path}: {source}")]
    StagingRoot {
        /// The directory concerned.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A staging directory left by a previous run could not be removed.
    #[error("cannot remove the leftover staging directory {path}: {source}")]
    Leftover {
        /// The directory concerned.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The agent could not become a child subreaper, so orphaned processes of
    /// a script would escape to init.
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(nix::Error),
}

/// Runs tasks. Cheap to clone; clones share the same configuration.
#[derive(Debug, Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

/// What every task of an executor shares.
#[derive(Debug)]
struct Inner {
    config: ExecConfig,
    /// `work_dir/tasks`, held open.
    staging_root: Arc<stage::StagingRoot>,
    /// A staging root on a memory file system, for scripts up to
    /// [`stage::MEMORY_SCRIPT_MAX`].
    memory_root: Option<Arc<stage::StagingRoot>>,
    /// [`Staging::Memory`]'s budget, and the bytes of it the running tasks' scripts take.
    memory_budget: u64,
    memory_in_use: AtomicU64,
    /// `<cgroup2 mount>/<cgroup_name>` when cgroups are usable.
    cgroups: Option<cgroup::CgroupRoot>,
    /// Who the agent runs as, to decide whether it may switch accounts.
    agent: account::AgentIdentity,
}

impl Executor {
    /// Prepares the host: checks that no other account can replace
    /// `work_dir` or a directory above it ([`SetupError::UntrustedWorkDir`]
    /// otherwise), creates `work_dir/tasks` (0711, owned by the agent),
    /// removes staging directories and kills and removes task cgroups left
    /// by a previous crash, and makes the agent a child subreaper so the
    /// orphans of a script come back to it instead of init.
    pub fn new(config: ExecConfig) -> Result<Self, SetupError> {
        sys::become_subreaper().map_err(SetupError::Subreaper)?;
        let staging_root = Arc::new(stage::prepare_root(&config.work_dir)?);
        let (memory_root, memory_budget) = match &config.staging {
            Staging::WorkDir => (None, 0),
            Staging::Memory { bases, budget } => (
                stage::prepare_memory_root(bases, &config.work_dir).map(Arc::new),
                *budget,
            ),
        };
        let cgroups = if config.use_cgroup {
            cgroup::CgroupRoot::open(&config.cgroup_name)
        } else {
            None
        };
        if let Some(root) = &cgroups {
            root.remove_leftovers();
        }
        let agent = account::AgentIdentity::current();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                staging_root,
                memory_root,
                memory_budget,
                memory_in_use: AtomicU64::new(0),
                cgroups,
                agent,
            }),
        })
    }

    /// Whether tasks get their own cgroup (false: process groups and `/proc`
    /// tracking).
    pub fn uses_cgroup(&self) -> bool {
        self.inner.cgroups.is_some()
    }

    /// The directory under `work_dir` a task is staged in while it runs (with
    /// [`Staging::Memory`], that of a script too large for the memory file system).
    pub fn staging_dir(&self, task_id: &str) -> PathBuf {
        self.inner.staging_root.path().join(task_id)
    }

    /// The staging root on a memory file system, when the executor has one.
    pub fn memory_staging_root(&self) -> Option<&std::path::Path> {
        self.inner
            .memory_root
            .as_deref()
            .map(stage::StagingRoot::path)
    }

    /// Starts the task and returns at once; the work happens on the current
    /// tokio runtime (this panics outside one). Output is read continuously
    /// whether or not anyone consumes it. Cancelling `cancel` kills the
    /// task's process tree and ends it as [`Ending::Cancelled`].
    pub fn start(&self, task: Task, cancel: CancellationToken) -> Running {
        let (tx, output) = output::channel();
        let outcome = tokio::spawn(run::run(self.inner.clone(), task, cancel, tx));
        Running { output, outcome }
    }
}

/// A started task.
#[derive(Debug)]
pub struct Running {
    /// The script's output, in the order it was written.
    pub output: OutputReceiver,
    /// Resolves once the task is completely over: its tree killed, its
    /// staging directory and cgroup removed, and every output event queued
    /// on [`Running::output`]. Dropping it does not stop the task.
    pub outcome: JoinHandle<Outcome>,
}

impl Running {
    /// A task that something else than an [`Executor`] runs (an emulated executor): `run` gets
    /// the sender of the task's output events and returns its outcome; it runs on the current
    /// tokio runtime, and the output ends when it returns.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(OutputSender) -> Fut,
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let (tx, output) = output::channel();
        let outcome = tokio::spawn(run(tx));
        Self { output, outcome }
    }
}

impl Inner {
    /// Where a script of `len` bytes is staged first: the memory file system, with the share of
    /// its budget the script takes, when there is one, the script is small enough and the
    /// budget has room; `work_dir/tasks` otherwise.
    fn staging_root_for(
        self: &Arc<Self>,
        len: usize,
    ) -> (Arc<stage::StagingRoot>, Option<MemoryReservation>) {
        if let Some(memory) = &self.memory_root
            && len <= stage::MEMORY_SCRIPT_MAX
        {
            let bytes = (len as u64).div_ceil(PAGE) * PAGE;
            let reserved = self
                .memory_in_use
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_use| {
                    in_use
                        .checked_add(bytes)
                        .filter(|total| *total <= self.memory_budget)
                })
                .is_ok();
            if reserved {
                let reservation = MemoryReservation {
                    inner: self.clone(),
                    bytes,
                };
                return (memory.clone(), Some(reservation));
            }
        }
        (self.staging_root.clone(), None)
    }
}

/// What a tmpfs allocates a file's content in.
const PAGE: u64 = 4096;

/// A script's share of the memory staging budget, given back when dropped.
#[derive(Debug)]
struct MemoryReservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.inner
            .memory_in_use
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Drop for Inner {
    /// The last clone is gone and so is every task (each holds a clone):
    /// leave no empty parent cgroup behind.
    fn drop(&mut self) {
        if let Some(root) = &self.cgroups {
            root.remove_if_empty();
        }
        // Nor a directory on the memory file system, which only this executor would use.
        if let Some(root) = &self.memory_root
            && let Some(dir) = root.path().parent()
            && let (Some(base), Some(name)) = (dir.parent(), dir.file_name())
            && let Err(err) = remove_without_following(base, name)
        {
            tracing::warn!(dir = %dir.display(), %err, "cannot remove the staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handles_cross_threads() {
        fn shared<T: Clone + Send + Sync + 'static>() {}
        fn sent<T: Send + 'static>() {}
        shared::<super::Executor>();
        sent::<super::Running>();
        sent::<super::Outcome>();
    }
}
