//! One task from start to finish: account, interpreter, staging, spawn,
//! supervision, kill, cleanup.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::fcntl::OFlag;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use crate::account::{self, Account, AccountError};
use crate::cgroup::TaskCgroup;
use crate::kill::{self, Tree};
use crate::language::{self, CommandLine, SANE_PATH};
use crate::output::{self, OutputSender, Totals};
use crate::stage::{self, StageError, Staging, StagingRoot};
use crate::sys::{self, Child, ChildSetup, Credentials, SpawnPlan};
use crate::tree::ProcessTree;
use crate::{Ending, Inner, Outcome, Task};

/// tokio timers cannot sleep much longer than two years.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often the tree is walked when there is no cgroup: often enough to see
/// the links of a quick double fork most of the time (the output pipe
/// catches most of the rest at kill time).
const SCAN_EVERY: Duration = Duration::from_millis(100);

/// How long to wait, after the kill, for the output pipe to close. It stays
/// open only when a process outside the tracked tree still holds it.
const READER_WAIT: Duration = Duration::from_secs(1);

/// Runs the task; the returned outcome's `finished_at` is after cleanup.
pub(crate) async fn run(
    inner: Arc<Inner>,
    mut task: Task,
    cancel: CancellationToken,
    tx: OutputSender,
) -> Outcome {
    let refused_at = SystemTime::now();
    let refused = |ending| Outcome {
        ending,
        started_at: refused_at,
        finished_at: SystemTime::now(),
        output_bytes: 0,
        dropped_bytes: 0,
        dropped_lines: 0,
        survivors: 0,
    };
    if let Err(err) = stage::validate_task_id(&task.id) {
        return refused(Ending::Failed(err.to_string()));
    }
    if cancel.is_cancelled() {
        return refused(Ending::Cancelled);
    }
    let account = match blocking({
        let (name, agent) = (task.account.clone(), inner.agent.clone());
        move || account::resolve(&name, &agent)
    })
    .await
    {
        Ok(account) => account,
        Err(AccountError::NotFound(name)) => return refused(Ending::UserNotFound(name)),
        Err(err) => return refused(Ending::Failed(err.to_string())),
    };
    if let Some(why) = &inner.config.refuse_root
        && account.uid.is_root()
    {
        return refused(Ending::Failed(format!(
            "account {:?} is root (uid 0): {why}",
            task.account
        )));
    }
    // Hidden arguments are NUL-separated. As arguments, such a word would
    // make the spawn fail.
    if task.sensitive_args && task.args.iter().any(|arg| arg.contains('\0')) {
        return refused(Ending::Failed(
            "a parameter contains a nul byte, which no script can receive".to_owned(),
        ));
    }
    let script = std::mem::take(&mut task.script);
    let (mut root, mut reservation) = inner.staging_root_for(script.len());
    let mut line = match command_line(&task, &root) {
        Ok(line) => line,
        Err(name) => return refused(Ending::InterpreterMissing(name.to_owned())),
    };
    let script = Arc::new(script);
    let mut staging = stage_script(&root, &task, &script, &account).await;
    if let Err(err) = &staging
        && err.is_about_the_place()
        && reservation.is_some()
    {
        // The memory file system is full, gone or otherwise unusable: the work directory
        // may still serve.
        tracing::warn!(task = %task.id, %err, "staging the script under the work directory");
        reservation = None;
        root = inner.staging_root.clone();
        line = match command_line(&task, &root) {
            Ok(line) => line,
            Err(name) => return refused(Ending::InterpreterMissing(name.to_owned())),
        };
        staging = stage_script(&root, &task, &script, &account).await;
    }
    drop(script);
    let staging = match staging {
        Ok(staging) => staging,
        Err(err) => return refused(Ending::Failed(err.to_string())),
    };
    if cancel.is_cancelled() {
        blocking(move || drop(staging)).await;
        return refused(Ending::Cancelled);
    }
    let mut outcome = execute(&inner, &task, &account, line, cancel, tx).await;
    blocking(move || drop(staging)).await;
    drop(reservation);
    outcome.finished_at = SystemTime::now();
    outcome
}

/// The interpreter's command line for the task's script staged under `root`; `Err` names the
/// interpreter when it is missing.
fn command_line(task: &Task, root: &StagingRoot) -> Result<CommandLine, &'static str> {
    let script = root
        .path()
        .join(&task.id)
        .join(task.language.script_file_name());
    language::command_line(task.language, &script, &task.args, task.sensitive_args)
}

/// Writes the script under `root`, on the blocking pool.
async fn stage_script(
    root: &Arc<StagingRoot>,
    task: &Task,
    script: &Arc<Vec<u8>>,
    account: &Account,
) -> Result<Staging, StageError> {
    let (root, id, language) = (root.clone(), task.id.clone(), task.language);
    let (script, account) = (script.clone(), account.clone());
    blocking(move || Staging::create(&root, &id, language, &script, &account)).await
}

/// Spawns the staged script, supervises it and kills what is left of it.
async fn execute(
    inner: &Inner,
    task: &Task,
    account: &Account,
    line: CommandLine,
    cancel: CancellationToken,
    tx: OutputSender,
) -> Outcome {
    let Spawned {
        mut child,
        started_at,
        pipe,
        pipe_inode,
        cgroup,
    } = match spawn(inner, task, account, &line).await {
        Ok(spawned) => spawned,
        Err(reason) => {
            let now = SystemTime::now();
            return Outcome {
                ending: Ending::Failed(reason),
                started_at: now,
                finished_at: now,
                output_bytes: 0,
                dropped_bytes: 0,
                dropped_lines: 0,
                survivors: 0,
            };
        }
    };
    let leader = child.id();
    let eof = CancellationToken::new();
    let stop = CancellationToken::new();
    let reader = output::spawn_reader(pipe, task.output_limit, tx, eof.clone(), stop.clone());
    let tree = match cgroup {
        Some(cgroup) => Tree::Cgroup { cgroup, leader },
        None => Tree::Procs(blocking(move || ProcessTree::new(leader, pipe_inode)).await),
    };

    let (ending, tree) = supervise(&mut child, tree, &eof, task.timeout, &cancel).await;

    // The task is over (exit + EOF, timeout or cancel); nothing it started
    // may outlive it.
    let grace = inner.config.kill_grace;
    let survivors = blocking(move || {
        let mut tree = tree;
        let survivors = kill::terminate(&mut tree, grace);
        tree.remove();
        survivors
    })
    .await;
    if survivors == 0 {
        // Collected by now unless it survived; if so, dropping it collects it when it ends.
        let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
    }
    let totals = finish_reading(reader, &stop).await;
    Outcome {
        ending,
        started_at,
        finished_at: SystemTime::now(),
        output_bytes: totals.output_bytes,
        dropped_bytes: totals.dropped_bytes,
        dropped_lines: totals.dropped_lines,
        survivors,
    }
}

/// A script that has just been started.
struct Spawned {
    child: Child,
    started_at: SystemTime,
    /// Read end of the output pipe.
    pipe: pipe::Receiver,
    pipe_inode: u64,
    /// `None` when the processes are tracked through /proc.
    cgroup: Option<TaskCgroup>,
}

/// Starts `line` as the account, in its own session and (when possible) its
/// own cgroup, writing to a fresh pipe.
async fn spawn(
    inner: &Inner,
    task: &Task,
    account: &Account,
    line: &CommandLine,
) -> Result<Spawned, String> {
    let (pipe_read, pipe_write) =
        open_pipe().map_err(|err| format!("cannot create the output pipe: {err}"))?;
    let pipe_inode = nix::sys::stat::fstat(&pipe_read)
        .map_err(|err| format!("cannot inspect the output pipe: {err}"))?
        .st_ino;
    let pipe = pipe::Receiver::from_owned_fd(pipe_read)
        .map_err(|err| format!("cannot watch the output pipe: {err}"))?;
    let args_pipe = match &line.hidden_args {
        Some(words) => Some(
            args_pipe(words, account)
                .map_err(|err| format!("cannot pass the parameters: {err}"))?,
        ),
        None => None,
    };
    // Created last: a failure below removes it.
    let (cgroup, cgroup_procs) = match inner.cgroups.as_ref().map(|root| root.create(&task.id)) {
        Some(Ok((cgroup, procs))) => (Some(cgroup), Some(procs)),
        Some(Err(err)) => {
            tracing::warn!(task = %task.id, %err, "no cgroup for this task: tracking its processes through /proc");
            (None, None)
        }
        None => (None, None),
    };
    let credentials = account.switch.then(|| Credentials {
        uid: account.uid,
        gid: account.gid,
        groups: account.groups.clone(),
    });
    let setup = ChildSetup {
        credentials,
        cgroup_procs,
        args_pipe,
    };
    let started_at = SystemTime::now();
    // The plan holds the parent's copies of the pipe's write end and of
    // cgroup.procs: dropped after the spawn, or the pipe would never reach EOF.
    let spawned = plan(line, account, pipe_write, setup).and_then(|plan| sys::spawn(&plan));
    match spawned {
        Ok(child) => Ok(Spawned {
            child,
            started_at,
            pipe,
            pipe_inode,
            cgroup,
        }),
        Err(err) => {
            if let Some(cgroup) = cgroup {
                let tree = Tree::Cgroup { cgroup, leader: 0 };
                blocking(move || tree.remove()).await;
            }
            Err(format!("cannot start {}: {err}", line.program.display()))
        }
    }
}

/// Waits until the main process has exited and the output pipe is closed,
/// or the timeout expires, or the token fires. Returns the ending and hands
/// the tree back for the kill.
async fn supervise(
    child: &mut Child,
    mut tree: Tree,
    eof: &CancellationToken,
    timeout: Duration,
    cancel: &CancellationToken,
) -> (Ending, Tree) {
    let deadline = tokio::time::sleep(timeout.min(MAX_TIMEOUT));
    tokio::pin!(deadline);
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tracking = matches!(tree, Tree::Procs(_));
    let mut status = None;
    let mut output_closed = false;
    loop {
        if output_closed && let Some(status) = status.take() {
            let ending = match status {
                Ok(status) => Ending::from_status(status),
                Err(err) => Ending::Failed(format!("cannot wait for the script: {err}")),
            };
            return (ending, tree);
        }
        tokio::select! {
            biased;
            result = child.wait(), if status.is_none() => status = Some(result),
            () = eof.cancelled(), if !output_closed => output_closed = true,
            () = cancel.cancelled() => return (Ending::Cancelled, tree),
            () = &mut deadline => return (Ending::TimedOut, tree),
            _ = scan.tick(), if tracking => {
                tree = blocking(move || {
                    if let Tree::Procs(procs) = &mut tree {
                        procs.scan(false);
                    }
                    tree
                })
                .await;
            }
        }
    }
}

/// Lets the reader reach EOF, or makes it stop if something outside the
/// tree keeps the pipe open.
async fn finish_reading(
    mut reader: tokio::task::JoinHandle<Totals>,
    stop: &CancellationToken,
) -> Totals {
    if let Ok(totals) = tokio::time::timeout(READER_WAIT, &mut reader).await {
        return totals.unwrap_or_default();
    }
    tracing::warn!("a script's output pipe is still open after its tree was killed");
    stop.cancel();
    reader.await.unwrap_or_default()
}

/// `interpreter args...` as the account: clean environment, the account's
/// home as working directory, stdin from /dev/null, stdout and stderr on
/// the same pipe so the log keeps the order of writes.
fn plan(
    line: &CommandLine,
    account: &Account,
    pipe_write: OwnedFd,
    setup: ChildSetup,
) -> std::io::Result<SpawnPlan> {
    let cwd = if account.home.is_dir() {
        account.home.as_path()
    } else {
        Path::new("/")
    };
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    env.insert("HOME".into(), account.home.clone().into());
    env.insert("USER".into(), account.name.clone().into());
    env.insert("LOGNAME".into(), account.name.clone().into());
    env.insert("SHELL".into(), account.shell.clone().into());
    env.insert("PATH".into(), SANE_PATH.into());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.extend(line.env.iter().cloned());
    SpawnPlan::new(&line.program, &line.args, &env, cwd, pipe_write, setup)
}

/// A pipe already holding `content` and closed for writing; the read end
/// is for the child. Filled before the spawn so no thread has to feed it:
/// the pipe is grown when `content` exceeds the default 64 KiB (parameters
/// are far smaller). It belongs to the account, which bash needs to reopen
/// it as `/dev/fd/3`.
fn args_pipe(content: &[u8], account: &Account) -> std::io::Result<OwnedFd> {
    let (read, write) = open_pipe()?;
    if account.switch {
        nix::unistd::fchown(&read, Some(account.uid), Some(account.gid))?;
    }
    let capacity = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_GETPIPE_SZ)?;
    if content.len() > capacity as usize {
        let wanted = i32::try_from(content.len()).map_err(std::io::Error::other)?;
        nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(wanted))?;
    }
    std::fs::File::from(write).write_all(content)?;
    Ok(read)
}

/// Both ends close-on-exec: the child gets the write end only through its
/// stdout and stderr, and no other task's child inherits either.
fn open_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

/// Runs blocking work (NSS, files, /proc, waits) off the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}
