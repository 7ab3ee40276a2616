//! The process-level system calls: what the child does between fork and exec
//! (the crate's only `unsafe`), the subreaper bit, signals and reaping.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Gid, Pid, Uid, setgid, setgroups, setsid, setuid, write};

/// The identity the child takes on.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups plus the primary one.
    pub groups: Vec<Gid>,
}

/// What the child does to itself before it executes the interpreter. Built
/// entirely in the parent: after fork only async-signal-safe calls are
/// allowed, so nothing here allocates, locks or looks anything up.
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

impl ChildSetup {
    fn apply(&self) -> io::Result<()> {
        // Its own session and process group, so the tree can be signalled
        // as one and never shares the agent's terminal.
        setsid()?;
        if let Some(procs) = &self.cgroup_procs {
            // "0" is the writing process. Joining before exec means
            // everything the script forks is born inside.
            write(procs, b"0")?;
        }
        if let Some(credentials) = &self.credentials {
            // std's Command::uid would drop the supplementary groups; this
            // order is the only one that works: groups and gid need root.
            setgroups(&credentials.groups)?;
            setgid(credentials.gid)?;
            setuid(credentials.uid)?;
        }
        if let Some(pipe) = &self.args_pipe {
            // After the cgroup write: ARGS_FD may have been cgroup.procs.
            give_as(pipe, ARGS_FD)?;
        }
        Ok(())
    }
}

/// Makes `fd` available as `target` across exec (std opened it, like every
/// descriptor, close-on-exec).
fn give_as(fd: &OwnedFd, target: i32) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: dup2 and fcntl only act on the descriptor table, are
    // async-signal-safe, and `raw` is open (owned by `fd`). Whatever
    // `target` held before (a close-on-exec descriptor of the agent's) is
    // closed by dup2, which is what the child wants.
    let result = unsafe {
        if raw == target {
            libc::fcntl(raw, libc::F_SETFD, 0)
        } else {
            libc::dup2(raw, target)
        }
    };
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Arranges for `setup` to run in the child right before exec. std has by
/// then redirected stdio and changed directory, as root.
pub(crate) fn prepare_child(command: &mut tokio::process::Command, setup: ChildSetup) {
    // SAFETY: the closure runs in the forked child of a multi-threaded
    // process, where only async-signal-safe functions may be called. It only
    // calls setsid, write, setgroups, setgid, setuid, dup2 and fcntl (thin
    // wrappers over the system calls) on data prepared before the fork, allocates nothing
    // (errors are raw errno values), and touches no lock.
    unsafe {
        command.pre_exec(move || setup.apply());
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
/// Only called for pids known to belong to a task and not spawned by tokio,
/// so no other part of the agent loses a child's status.
pub(crate) fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// The agent's own pid, which parents re-parented orphans.
pub(crate) fn agent_pid() -> i32 {
    std::process::id() as i32
}

/// Makes the calling thread, and only it, the account: its supplementary groups, then its group,
/// then its user, all three ids (real, effective, saved), so the thread can never take root's
/// rights back. The raw system calls are used on purpose: glibc's `setuid` and friends change
/// every thread of the process. The thread must end after its work (never go back to a pool).
pub(crate) fn become_on_this_thread(credentials: &Credentials) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = credentials.groups.iter().map(|g| g.as_raw()).collect();
    let gid = credentials.gid.as_raw();
    let uid = credentials.uid.as_raw();
    // SAFETY: plain system calls on integers and on a pointer to `groups`, which lives across
    // the call and holds `groups.len()` elements. They change only this thread's credentials
    // (the kernel keeps credentials per thread; the raw calls skip glibc's broadcast to the
    // other threads), which is what the caller asks for.
    let failed = unsafe {
        libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == -1
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) == -1
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) == -1
    };
    if failed {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
