//! The process-level system calls: starting a script (a child that shares the agent's memory
//! until it executes when it runs as the agent's user, a copy of it when it switches account,
//! and a pidfd to wait for it; the crate's only `unsafe`), the subreaper
//! bit, signals and reaping.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The identity the child takes on.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups plus the primary one.
    pub groups: Vec<Gid>,
}

/// What the child does to itself before it executes the interpreter. Built
/// entirely in the parent: the child only makes system calls, so nothing here
/// allocates, locks or looks anything up.
#[derive(Debug)]
pub(crate) struct ChildSetup {
    /// `None` when the agent already is the account.
    pub credentials: Option<Credentials>,
    /// The task cgroup's `cgroup.procs`, opened (close-on-exec) by the
    /// agent, so the child can join while it still has the agent's rights.
    pub cgroup_procs: Option<OwnedFd>,
    /// Read end of the pipe that carries the script's arguments when they
    /// must stay off its command line; the child gets it as [`ARGS_FD`].
    pub args_pipe: Option<OwnedFd>,
}

/// The descriptor the interpreter reads hidden arguments from.
pub(crate) const ARGS_FD: i32 = 3;

/// The raw system calls that change ids: glibc's `setgid`/`setuid` wrappers ask every other
/// thread of the process to change too, which a child sharing the agent's memory must never do
/// (see [`spawn`]). The `*32` calls take full ids on 32-bit x86 and ARM.
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
use libc::{SYS_setresgid as SYS_SETRESGID, SYS_setresuid as SYS_SETRESUID};
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
use libc::{SYS_setresgid32 as SYS_SETRESGID, SYS_setresuid32 as SYS_SETRESUID};

/// What the child needs to become the script: every string, descriptor and id prepared in the
/// parent, so that the child, which may share the agent's memory until it executes, only makes
/// system calls (no allocation, no lock, no lookup).
#[derive(Debug)]
pub(crate) struct SpawnPlan {
    program: CString,
    /// `argv` and `envp` point into these.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    /// `/dev/null`, for stdin.
    stdin: OwnedFd,
    /// Write end of the output pipe, for stdout and stderr.
    output: OwnedFd,
    setup: ChildSetup,
    groups: Vec<libc::gid_t>,
}

// SAFETY: the raw pointers point into `_strings`, which the plan owns and never changes; they are
// only read, by the child, while the parent thread that holds the plan waits.
unsafe impl Send for SpawnPlan {}
// SAFETY: as above; nothing mutates through a shared plan.
unsafe impl Sync for SpawnPlan {}

impl SpawnPlan {
    /// `program` run with `argv[0]` its own path, then `args`; exactly `env` as environment;
    /// working directory `cwd`; stdin `/dev/null`; stdout and stderr on `output`. Fails on a
    /// NUL byte in any of them, as `execve` could not take it.
    pub(crate) fn new(
        program: &Path,
        args: &[OsString],
        env: &BTreeMap<OsString, OsString>,
        cwd: &Path,
        output: OwnedFd,
        setup: ChildSetup,
    ) -> io::Result<Self> {
        let c = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "nul byte found in provided data",
                )
            })
        };
        let program_c = c(program.as_os_str().as_bytes())?;
        let mut strings = Vec::with_capacity(1 + args.len() + env.len());
        strings.push(program_c.clone());
        for arg in args {
            strings.push(c(arg.as_bytes())?);
        }
        let argc = strings.len();
        for (key, value) in env {
            let mut pair = Vec::with_capacity(key.len() + 1 + value.len());
            pair.extend_from_slice(key.as_bytes());
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            strings.push(c(&pair)?);
        }
        let pointers = |range: std::ops::Range<usize>| {
            let mut list: Vec<*const libc::c_char> =
                strings[range].iter().map(|s| s.as_ptr()).collect();
            list.push(std::ptr::null());
            list
        };
        let argv = pointers(0..argc);
        let envp = pointers(argc..strings.len());
        let stdin = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let groups = setup
            .credentials
            .as_ref()
            .map(|c| c.groups.iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Ok(Self {
            program: program_c,
            _strings: strings,
            argv,
            envp,
            cwd: c(cwd.as_os_str().as_bytes())?,
            stdin,
            output,
            setup,
            groups,
        })
    }

    /// In the child: becomes the script. Returns only on failure, with the errno.
    fn exec(&self) -> libc::c_int {
        macro_rules! check {
            ($call:expr) => {
                if $call == -1 {
                    return errno();
                }
            };
        }
        // SAFETY: every call below is a system call (or glibc's thin wrapper over one, which
        // neither allocates nor locks) on descriptors the plan owns, on integers, or on
        // NUL-terminated strings and NULL-terminated pointer arrays the plan owns.
        unsafe {
            // The agent's handlers live in the memory the child shares (or a copy of it): none
            // may run here, and the script starts with default dispositions; SIGPIPE, which
            // Rust ignores, too.
            // Other ignored signals stay ignored, as across any exec.
            for signal in 1..=64 {
                if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                    continue;
                }
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && (old.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
                {
                    let mut default: libc::sigaction = std::mem::zeroed();
                    default.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(signal, &default, std::ptr::null_mut());
                }
            }
            check!(give_raw(self.stdin.as_raw_fd(), 0));
            check!(give_raw(self.output.as_raw_fd(), 1));
            check!(give_raw(self.output.as_raw_fd(), 2));
            check!(libc::chdir(self.cwd.as_ptr()));
            // Its own session and process group, so the tree can be signalled as one and never
            // shares the agent's terminal.
            check!(libc::setsid());
            if let Some(procs) = &self.setup.cgroup_procs {
                // "0" is the writing process. Joining before exec means everything the
                // script forks is born inside.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return errno();
                }
            }
            if let Some(credentials) = &self.setup.credentials {
                // This order is the only one that works: groups and gid need root.
                let (gid, uid) = (credentials.gid.as_raw(), credentials.uid.as_raw());
                check!(libc::syscall(
                    SYS_SETGROUPS,
                    self.groups.len(),
                    self.groups.as_ptr()
                ));
                check!(libc::syscall(SYS_SETRESGID, gid, gid, gid));
                check!(libc::syscall(SYS_SETRESUID, uid, uid, uid));
            }
            if let Some(pipe) = &self.setup.args_pipe {
                // After the cgroup write: ARGS_FD may have been cgroup.procs.
                check!(give_raw(pipe.as_raw_fd(), ARGS_FD));
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execve(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
            errno()
        }
    }
}

fn errno() -> libc::c_int {
    // SAFETY: reads the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Makes `raw` available as `target` across exec (everything the agent opens is
/// close-on-exec). Whatever `target` held before is closed by dup2, as the child wants.
fn give_raw(raw: RawFd, target: RawFd) -> libc::c_int {
    // SAFETY: dup2 and fcntl only act on the descriptor table and are async-signal-safe.
    unsafe {
        if raw == target {
            libc::fcntl(raw, libc::F_SETFD, 0)
        } else {
            libc::dup2(raw, target)
        }
    }
}

/// The child's stack: `exec` needs a few frames.
const CHILD_STACK: usize = 64 * 1024;

/// Whether the child shares the agent's memory until it executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Memory {
    /// `CLONE_VM`: nothing is copied. Only for a script that runs as the agent's own user.
    Shared,
    /// A copy, as `fork` makes: for a script that switches account. Once the child has taken the
    /// account's ids, a process of that account may write into the child's memory
    /// (`process_vm_writev`, or `ptrace` where `suid_dumpable` and `ptrace_scope` allow); with
    /// shared memory that is the live root agent's. The change of ids would also clear the
    /// dumpable flag of the shared memory, the agent's. std spawns this way whenever a uid is
    /// set, for the same reasons.
    Copied,
}

impl Memory {
    fn for_plan(plan: &SpawnPlan) -> Self {
        if plan.setup.credentials.is_some() {
            Self::Copied
        } else {
            Self::Shared
        }
    }
}

/// How the child's exit is to be waited for; the later sources are what an older kernel leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PidfdSource {
    /// `CLONE_PIDFD` (Linux 5.2), else `pidfd_open` (5.3), else a waiting thread.
    Clone,
    /// As a kernel that ignores `CLONE_PIDFD`: `pidfd_open`, else a waiting thread.
    #[cfg(test)]
    Open,
    /// As a kernel without pidfds: a waiting thread.
    #[cfg(test)]
    Thread,
}

/// What the parent and the child share during the spawn (with [`Memory::Shared`]; a child with
/// copied memory reports through `error_pipe` instead).
struct Shared<'a> {
    plan: &'a SpawnPlan,
    /// The errno of the step that failed in the child; 0 when it reached the script.
    error: AtomicI32,
    /// Write end (close-on-exec) of the pipe a child with copied memory reports its errno on.
    error_pipe: RawFd,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Shared` that `spawn` keeps alive, and its thread suspended, until
    // this child executes or exits (CLONE_VFORK); with copied memory, the child's own copy.
    let shared = unsafe { &*(arg as *const Shared<'_>) };
    let error = shared.plan.exec().max(1);
    shared.error.store(error, Ordering::Relaxed);
    if shared.error_pipe >= 0 {
        let bytes = error.to_ne_bytes();
        // SAFETY: writes 4 bytes the child owns to a descriptor it holds.
        unsafe { libc::write(shared.error_pipe, bytes.as_ptr().cast(), bytes.len()) };
    }
    // SAFETY: ends the child without running anything of the parent's (no atexit, no flush).
    unsafe { libc::_exit(127) }
}

/// A started script: its pid, and how to wait for it.
#[derive(Debug)]
pub(crate) struct Child {
    pid: i32,
    /// `None` once its status is collected.
    exit: Option<Exit>,
}

/// How the exit of a child is waited for.
#[derive(Debug)]
enum Exit {
    /// Its pidfd becomes readable when it exits (Linux 5.3 and later).
    Pidfd(AsyncFd<OwnedFd>),
    /// Older kernels: a blocking thread waits for it.
    Thread(tokio::sync::oneshot::Receiver<io::Result<ExitStatus>>),
}

/// Starts the script as `plan` says, with a pidfd to wait on. A script that runs as the agent's
/// own user starts with `clone(CLONE_VM | CLONE_VFORK)`, so nothing of the agent's memory is
/// copied (a fork of the multi-threaded agent costs page-table copies and copy-on-write
/// faults); one that switches account starts in a copy of the agent's memory, never in the
/// agent's own (see [`Memory::Copied`]). The calling thread waits until the child has executed
/// the script or failed; every signal is blocked meanwhile, so no handler of the agent runs in
/// the child. Must run on a tokio runtime (the wait is registered with it).
pub(crate) fn spawn(plan: &SpawnPlan) -> io::Result<Child> {
    spawn_with(plan, PidfdSource::Clone)
}

fn spawn_with(plan: &SpawnPlan, source: PidfdSource) -> io::Result<Child> {
    let memory = Memory::for_plan(plan);
    // A child with its own memory reports a failure before exec on a pipe; exec closes it.
    let error_pipe = match memory {
        Memory::Shared => None,
        Memory::Copied => Some(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?),
    };
    // Not zeroed: the child writes its frames before it reads them (zeroing 64 KiB was the
    // spawn's largest cost).
    let words = CHILD_STACK / std::mem::size_of::<u128>();
    let mut stack: Vec<std::mem::MaybeUninit<u128>> = Vec::with_capacity(words);
    let top = stack
        .as_mut_ptr()
        .wrapping_add(words)
        .cast::<libc::c_void>();
    let shared = Shared {
        plan,
        error: AtomicI32::new(0),
        error_pipe: error_pipe
            .as_ref()
            .map_or(-1, |(_, write)| write.as_raw_fd()),
    };
    let flags = match memory {
        Memory::Shared => libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
        // Still CLONE_VFORK: the parent resumes once the child has executed or failed, so its
        // report is in the pipe by then.
        Memory::Copied => libc::CLONE_VFORK | libc::SIGCHLD,
    };
    let clone = |flags: libc::c_int, pidfd: &mut libc::c_int| {
        // SAFETY: `child_main` runs on `stack`, which outlives the child's use of it (this
        // thread is suspended until the child executes or exits), with `shared`, likewise
        // alive (or, without CLONE_VM, copies of both); with CLONE_PIDFD the kernel writes the
        // pidfd into `pidfd`. All signals are blocked around the call and restored after.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top,
                flags,
                (&raw const shared).cast_mut().cast(),
                std::ptr::from_mut(pidfd),
            );
            let error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid == -1 { Err(error) } else { Ok(pid) }
        }
    };
    let mut raw_pidfd: libc::c_int = -1;
    let clone_flags = match source {
        PidfdSource::Clone => flags | libc::CLONE_PIDFD,
        #[cfg(test)]
        PidfdSource::Open | PidfdSource::Thread => flags,
    };
    let pid = match clone(clone_flags, &mut raw_pidfd) {
        Ok(pid) => pid,
        // A kernel that knows CLONE_PIDFD but refuses it here.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && clone_flags != flags => {
            raw_pidfd = -1;
            clone(flags, &mut raw_pidfd)?
        }
        Err(e) => return Err(e),
    };
    drop(stack);
    let pidfd = if raw_pidfd >= 0 {
        // SAFETY: the kernel just made this descriptor for us.
        Some(unsafe { OwnedFd::from_raw_fd(raw_pidfd) })
    } else {
        // A kernel before 5.2 ignores CLONE_PIDFD and leaves `raw_pidfd` as it was.
        match source {
            PidfdSource::Clone => pidfd_open(pid),
            #[cfg(test)]
            PidfdSource::Open => pidfd_open(pid),
            #[cfg(test)]
            PidfdSource::Thread => None,
        }
    };
    let mut error = shared.error.load(Ordering::Relaxed);
    if let Some((read, write)) = error_pipe {
        drop(write);
        error = read_child_error(&read);
    }
    if error != 0 {
        // The child ended without becoming the script: collect it now.
        let _ = wait_blocking(pid);
        return Err(io::Error::from_raw_os_error(error));
    }
    // SAFETY: an `OwnedFd` is open and stays the same descriptor until the `AsyncFd` that owns
    // it is dropped.
    let registered =
        pidfd.map(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) });
    let exit = match registered {
        Some(Ok(fd)) => Exit::Pidfd(fd),
        _ => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let _ = tx.send(wait_blocking(pid));
            });
            Exit::Thread(rx)
        }
    };
    Ok(Child {
        pid,
        exit: Some(exit),
    })
}

/// The errno a child with copied memory reported, 0 when it executed the script (exec closed
/// its end of the pipe unwritten). The child has executed or exited when this runs
/// (CLONE_VFORK), so the read does not wait.
fn read_child_error(read: &OwnedFd) -> libc::c_int {
    let mut bytes = [0u8; 4];
    loop {
        match nix::unistd::read(read, &mut bytes) {
            Ok(4) => return libc::c_int::from_ne_bytes(bytes),
            Ok(_) => return 0,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return e as libc::c_int,
        }
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: a system call on integers; a descriptor it returns is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: as above.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Collects the exit status of our child `pid`; `None` while it runs (with `WNOHANG`).
fn try_reap(pid: i32, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` lives across the call.
    match unsafe { libc::waitpid(pid, &mut status, flags) } {
        0 => Ok(None),
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(Some(ExitStatus::from_raw(status))),
    }
}

fn wait_blocking(pid: i32) -> io::Result<ExitStatus> {
    loop {
        match try_reap(pid, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
            Ok(status) => return status.ok_or_else(|| io::Error::other("no status")),
        }
    }
}

impl Child {
    pub(crate) fn id(&self) -> i32 {
        self.pid
    }

    /// Waits for the script's main process to exit and collects its status. Cancel-safe: a
    /// wait dropped before the exit can be started again.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = match self.exit.as_mut() {
            None => return Err(io::Error::other("already waited for")),
            Some(Exit::Pidfd(fd)) => loop {
                let mut ready = fd.readable().await?;
                match try_reap(self.pid, libc::WNOHANG)? {
                    Some(status) => break status,
                    None => ready.clear_ready(),
                }
            },
            Some(Exit::Thread(rx)) => rx
                .await
                .unwrap_or_else(|_| Err(io::Error::other("the waiting thread ended")))?,
        };
        self.exit = None;
        Ok(status)
    }
}

impl Drop for Child {
    /// A script whose main process outlived the kill is still collected when it ends, so the
    /// agent keeps no zombie.
    fn drop(&mut self) {
        let Some(exit) = self.exit.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pid = self.pid;
        // The `Child` is made inside the task, not before: a runtime that is shutting down drops
        // a task it is given without polling it, and a `Child` dropped there would spawn again,
        // without end. Dropped unpolled, the task drops only the exit handle (the agent is
        // ending; its children are reaped with it).
        runtime.spawn(async move {
            let mut child = Child {
                pid,
                exit: Some(exit),
            };
            let _ = child.wait().await;
        });
    }
}

/// Makes orphaned descendants of the agent's children re-parent to the agent
/// instead of init, so a double-forked daemon can still be found and reaped.
pub(crate) fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Sends `signal` to `pid`; false if it is gone (or not ours to signal).
/// Refuses 0 and negative pids, which would mean the agent's own group or
/// every process on the host.
pub(crate) fn signal(pid: i32, signal: Signal) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), signal).is_ok()
}

/// Sends `signal` to the process group `pgid` (never the agent's own, which
/// 0 would mean, nor init's).
pub(crate) fn signal_group(pgid: i32, signal: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// Collects the exit status of a zombie that was re-parented to the agent.
/// Only called for pids known to belong to a task and never for a script's main
/// process, which [`Child::wait`] collects, so no other part of the agent loses a
/// child's status.
pub(crate) fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// The agent's own pid, which parents re-parented orphans.
pub(crate) fn agent_pid() -> i32 {
    std::process::id() as i32
}

// The 16-bit-id system calls of 32-bit x86 and ARM would cut a uid or gid above 65535: there the
// `*32` calls are the ones that take full ids.
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
use libc::{
    SYS_setfsgid as SYS_SETFSGID, SYS_setfsuid as SYS_SETFSUID, SYS_setgroups as SYS_SETGROUPS,
};
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
use libc::{
    SYS_setfsgid32 as SYS_SETFSGID, SYS_setfsuid32 as SYS_SETFSUID,
    SYS_setgroups32 as SYS_SETGROUPS,
};

/// Makes the calling thread, and only it, act as the account towards the file systems: its
/// supplementary groups, its file-system group and user ids (`setfsgid`, `setfsuid`), then an
/// empty capability set, so no capability (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, `CAP_SYS_RESOURCE`
/// for reserved blocks, ...) lets it past a check the account would fail; files it creates
/// belong to the account. Its real, effective and saved user ids stay root's on purpose: the
/// kernel lets a process signal (`tgkill`), `prlimit` or trace a thread whose real or saved
/// uid is its own, so a thread carrying the account's ids would let the account kill, freeze
/// or limit the whole agent while it works. With the ids left at 0 the account owns nothing of
/// the agent. The raw system calls are used on purpose: glibc's wrappers change every thread
/// of the process. Without capabilities the thread cannot take root's rights back; it must end
/// after its work (never go back to a pool).
pub(crate) fn become_on_this_thread(credentials: &Credentials) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = credentials.groups.iter().map(|g| g.as_raw()).collect();
    let gid = credentials.gid.as_raw();
    let uid = credentials.uid.as_raw();
    // SAFETY: plain system calls on integers and on a pointer to `groups`, which lives across
    // the call and holds `groups.len()` elements. They change only this thread's credentials
    // (the kernel keeps credentials per thread; the raw calls skip glibc's broadcast to the
    // other threads), which is what the caller asks for.
    if unsafe { libc::syscall(SYS_SETGROUPS, groups.len(), groups.as_ptr()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // `setfsgid`/`setfsuid` return the previous id whether or not they succeed; asking again
    // with an invalid id (-1, which changes nothing) returns the id in force.
    // SAFETY: as above, integers only.
    let (fsgid, fsuid) = unsafe {
        libc::syscall(SYS_SETFSGID, gid);
        let fsgid = libc::syscall(SYS_SETFSGID, u32::MAX);
        libc::syscall(SYS_SETFSUID, uid);
        (fsgid, libc::syscall(SYS_SETFSUID, u32::MAX))
    };
    if fsgid != i64::from(gid) || fsuid != i64::from(uid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the file-system ids were not changed",
        ));
    }
    drop_capabilities()
}

/// The calling thread's file-system user id: the owner of the files it creates.
pub(crate) fn fs_uid() -> u32 {
    // SAFETY: an integer argument; -1 is an invalid id, so nothing changes and the id in force
    // is returned.
    let id = unsafe { libc::syscall(SYS_SETFSUID, u32::MAX) };
    u32::try_from(id).unwrap_or(u32::MAX)
}

/// Empties the calling thread's effective, permitted and inheritable capability sets.
fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        // 0: the calling thread.
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: `capset` reads the header and two data words (version 3's 64 capability bits),
    // both live across the call; it changes only the calling thread's credentials.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process may be dumped and traced by its owner (`PR_GET_DUMPABLE`). A change of
/// any thread's file-system ids clears it for the whole process (the kernel's rule for set-id
/// changes), which would leave the agent undumpable for good.
pub(crate) fn dumpable() -> bool {
    // SAFETY: a query without pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE) == 1 }
}

/// Makes the process dumpable again, as [`dumpable`] found it before a thread switched.
pub(crate) fn restore_dumpable() {
    // SAFETY: sets one flag of the calling process.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 1);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    const NOBODY: u32 = 65534;

    /// Starts `sh -c script` with `env` in `/`, as the agent's own user; returns the child and
    /// the read end of its output.
    fn start_shell(script: &str, env: &[(&str, &str)]) -> (Child, OwnedFd) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let env: BTreeMap<OsString, OsString> = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let setup = ChildSetup {
            credentials: None,
            cgroup_procs: None,
            args_pipe: None,
        };
        let args = [OsString::from("-c"), OsString::from(script)];
        let plan = SpawnPlan::new(
            Path::new("/bin/sh"),
            &args,
            &env,
            Path::new("/"),
            write,
            setup,
        )
        .unwrap();
        (spawn(&plan).unwrap(), read)
    }

    /// Starts `sh -c script` with `env` in `/`, returns its exit status and output.
    async fn spawn_shell(script: &str, env: &[(&str, &str)]) -> (ExitStatus, String) {
        let (mut child, read) = start_shell(script, env);
        let status = child.wait().await.unwrap();
        let mut output = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut output).unwrap();
        (status, output)
    }

    /// A script still running when the agent's runtime shuts down is dropped there, mid-wait:
    /// its reaper is handed to a runtime that no longer polls anything, and the drop ends
    /// instead of spawning reapers without end until the stack overflows.
    #[test]
    fn a_child_dropped_while_the_runtime_shuts_down_does_not_recurse() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pid = runtime.block_on(async {
            let (mut child, _read) = start_shell("sleep 30", &[]);
            let pid = child.pid;
            let (started, waiting) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = started.send(());
                let _ = child.wait().await;
            });
            waiting.await.unwrap();
            pid
        });
        // The waiting task, and the `Child` in it, are dropped by the shutdown.
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        assert!(signal(pid, Signal::SIGKILL), "the script was already gone");
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }

    /// What the script sees of the agent: exactly the environment, directory and descriptors
    /// it is given (an agent descriptor, close-on-exec, is not among them), every signal
    /// unblocked and SIGPIPE not ignored, as `std::process::Command` leaves them. The masks are
    /// read by a command the shell started, of itself: read from the shell's own status, they
    /// could show the shell inside its fork of that command, every signal blocked for a moment.
    #[tokio::test]
    async fn the_script_gets_only_what_the_plan_gives() {
        let agent_file = std::fs::File::open("/proc/self/status").unwrap();
        let agent_fd = agent_file.as_raw_fd();
        let script = format!(
            "echo \"env=$(env | grep -v '^PWD=\\|^SHLVL=\\|^_=' | sort | tr '\\n' ' ')\"; \
             echo \"cwd=$(pwd)\"; \
             for fd in 0 1 2 {agent_fd}; do [ -e /proc/$$/fd/$fd ] && echo \"open=$fd\"; done; \
             grep -E '^Sig(Blk|Ign)' /proc/self/status; exit 7"
        );
        let (status, output) =
            spawn_shell(&script, &[("FOO", "bar baz"), ("PATH", "/usr/bin:/bin")]).await;
        drop(agent_file);
        assert_eq!(status.code(), Some(7), "{output}");
        assert!(
            output.contains("env=FOO=bar baz PATH=/usr/bin:/bin \n"),
            "{output}"
        );
        assert!(output.contains("cwd=/\n"), "{output}");
        assert!(output.contains("open=0\nopen=1\nopen=2\n"), "{output}");
        assert!(!output.contains(&format!("open={agent_fd}\n")), "{output}");
        assert!(output.contains("SigBlk:\t0000000000000000\n"), "{output}");
        let ignored = output
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .and_then(|mask| u64::from_str_radix(mask, 16).ok())
            .unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{output}");
    }

    #[tokio::test]
    async fn a_signalled_script_and_a_missing_program_are_reported() {
        let (status, _) = spawn_shell("kill -TERM $$", &[]).await;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        let (_, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let setup = ChildSetup {
            credentials: None,
            cgroup_procs: None,
            args_pipe: None,
        };
        let plan = SpawnPlan::new(
            Path::new("/nonexistent/interpreter"),
            &[],
            &BTreeMap::new(),
            Path::new("/"),
            write,
            setup,
        )
        .unwrap();
        let err = spawn(&plan).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    /// The wait is cancel-safe: a wait dropped before the exit, then started again, still gets
    /// the status.
    #[tokio::test]
    async fn a_dropped_wait_can_be_started_again() {
        let (_read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let setup = ChildSetup {
            credentials: None,
            cgroup_procs: None,
            args_pipe: None,
        };
        let args = [OsString::from("-c"), OsString::from("sleep 0.3; exit 3")];
        let plan = SpawnPlan::new(
            Path::new("/bin/sh"),
            &args,
            &BTreeMap::new(),
            Path::new("/"),
            write,
            setup,
        )
        .unwrap();
        let mut child = spawn(&plan).unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), child.wait()).await;
        assert!(early.is_err(), "{early:?}");
        assert_eq!(child.wait().await.unwrap().code(), Some(3));
    }

    fn shell_plan(script: &str, credentials: Option<Credentials>) -> (OwnedFd, SpawnPlan) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let setup = ChildSetup {
            credentials,
            cgroup_procs: None,
            args_pipe: None,
        };
        let args = [OsString::from("-c"), OsString::from(script)];
        let plan = SpawnPlan::new(
            Path::new("/bin/sh"),
            &args,
            &BTreeMap::new(),
            Path::new("/"),
            write,
            setup,
        )
        .unwrap();
        (read, plan)
    }

    /// A kernel before 5.2 ignores CLONE_PIDFD and leaves the descriptor at -1; one before 5.3
    /// has no pidfd_open either. The script still starts and its exit is still collected.
    #[tokio::test]
    async fn the_exit_is_collected_without_a_pidfd_from_clone() {
        for source in [PidfdSource::Open, PidfdSource::Thread] {
            let (_read, plan) = shell_plan("exit 5", None);
            let mut child = spawn_with(&plan, source).unwrap();
            let waiting = match child.exit.as_ref().unwrap() {
                Exit::Pidfd(_) => "pidfd",
                Exit::Thread(_) => "thread",
            };
            let expected = match source {
                PidfdSource::Open if pidfd_open(std::process::id() as i32).is_some() => "pidfd",
                PidfdSource::Clone | PidfdSource::Open | PidfdSource::Thread => "thread",
            };
            assert_eq!(waiting, expected, "{source:?}");
            assert_eq!(child.wait().await.unwrap().code(), Some(5), "{source:?}");
        }
    }

    /// A script that switches account never runs in the agent's memory: once it has the
    /// account's ids, a process of the account could write into it. Its failure before exec
    /// still reaches the agent (through the pipe, as nothing is shared), and its exit is
    /// collected as any other.
    #[tokio::test]
    async fn a_script_of_another_account_starts_in_a_copy_of_the_agents_memory() {
        let nobody = || {
            Some(Credentials {
                uid: Uid::from_raw(NOBODY),
                gid: Gid::from_raw(NOBODY),
                groups: vec![Gid::from_raw(NOBODY)],
            })
        };
        let (_read, own) = shell_plan("exit 0", None);
        assert_eq!(Memory::for_plan(&own), Memory::Shared);
        let (read, plan) = shell_plan("id -u; exit 4", nobody());
        assert_eq!(Memory::for_plan(&plan), Memory::Copied);
        if !Uid::effective().is_root() {
            eprintln!("skipped: switching identities needs root");
            return;
        }
        let mut child = spawn(&plan).unwrap();
        drop(plan);
        assert_eq!(child.wait().await.unwrap().code(), Some(4));
        let mut output = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut output).unwrap();
        assert_eq!(output, format!("{NOBODY}\n"));
        let (_, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let setup = ChildSetup {
            credentials: nobody(),
            cgroup_procs: None,
            args_pipe: None,
        };
        let missing = SpawnPlan::new(
            Path::new("/nonexistent/interpreter"),
            &[],
            &BTreeMap::new(),
            Path::new("/"),
            write,
            setup,
        )
        .unwrap();
        let err = spawn(&missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    /// The attack: a process of the account sends a signal (0, the bare permission check) to the
    /// thread that acts as the account. It must be refused, or the account could SIGKILL or
    /// SIGSTOP the whole agent for as long as a push runs.
    #[test]
    fn the_account_can_neither_signal_the_thread_nor_use_roots_rights() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: switching identities needs root");
            return;
        }
        let open = tempfile::tempdir().unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let closed = tempfile::tempdir().unwrap();
        std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let (open_path, closed_path) = (open.path().to_owned(), closed.path().to_owned());
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            become_on_this_thread(&Credentials {
                uid: Uid::from_raw(NOBODY),
                gid: Gid::from_raw(NOBODY),
                groups: vec![Gid::from_raw(NOBODY)],
            })
            .unwrap();
            let own = std::fs::write(open_path.join("mine"), b"x");
            let roots = std::fs::write(closed_path.join("not-mine"), b"x");
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = done_rx.recv();
            (own, roots)
        });
        let tid = tid_rx.recv().unwrap();
        let pid = agent_pid();
        // SAFETY: the child makes raw system calls on integers and exits; it neither allocates
        // nor locks, as after a fork of a threaded process it must not.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                let switched = libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) == 0
                    && libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) == 0;
                let refused = libc::syscall(libc::SYS_tgkill, pid, tid, 0) == -1
                    && *libc::__errno_location() == libc::EPERM;
                libc::_exit(match (switched, refused) {
                    (true, true) => 0,
                    (false, _) => 2,
                    (true, false) => 1,
                });
            }
        }
        assert!(child > 0, "fork: {}", io::Error::last_os_error());
        let status = waitpid(Pid::from_raw(child), None).unwrap();
        done_tx.send(()).unwrap();
        let (own, roots) = worker.join().unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(Pid::from_raw(child), 0),
            "exit 1: the account could signal the agent's thread; 2: the child could not switch"
        );
        own.unwrap();
        let owner = std::fs::metadata(open.path().join("mine")).unwrap();
        assert_eq!((owner.uid(), owner.gid()), (NOBODY, NOBODY));
        assert_eq!(
            roots.unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "the thread wrote into a directory only root may write to"
        );
        assert!(!closed.path().join("not-mine").exists());
    }
}
