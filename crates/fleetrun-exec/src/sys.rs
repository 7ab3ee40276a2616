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
