//! Finding a script's processes through `/proc`, for hosts without a usable
//! cgroup v2.
//!
//! The script leads its own session and process group (its pid is both ids),
//! and the agent is a child subreaper, so orphans come back to it. A process
//! belongs to the tree when it is in that session or group, descends from a
//! member, was a member at an earlier scan (same pid *and* start time, so a
//! recycled pid is not mistaken for it), or holds the write end of the
//! task's output pipe. Periodic scans keep the ancestry links before
//! intermediate processes exit; the pipe catches a double-forked daemon that
//! was never seen and still writes to the log. What none of this can find is
//! a process that left the session, was never seen by a scan, and closed
//! the output: cgroups exist for that.
//!
//! `/proc` is read here directly rather than through the `procfs` crate:
//! its `FDInfo` carries the link's permission bits but not `fdinfo`'s
//! `flags`, so the close-on-exec test below needs our own read anyway, and
//! its `Process` opens and checks a directory handle per process before
//! reading `stat`, which a scan of every process on the host pays on the
//! kill path for the five fields the tree uses.

use std::collections::{HashMap, HashSet};
use std::fs;

use nix::sys::signal::Signal;

use crate::sys;

/// The fields of `/proc/<pid>/stat` the tree needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Exited but not yet reaped (or being reaped).
    pub dead: bool,
    /// Clock ticks after boot; with the pid, identifies a process.
    pub start: u64,
}

/// Parses one `/proc/<pid>/stat` line; the command name may contain spaces
/// and parentheses, so fields are counted from its last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let state = fields.first()?;
    Some(ProcStat {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        dead: matches!(*state, "Z" | "X" | "x"),
        start: fields.get(19)?.parse().ok()?,
    })
}

pub(crate) fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The agent's children (its orphans come back to it), from
/// `/proc/self/task/*/children`: a few small reads instead of one per process
/// on the host. `None` when the kernel does not offer the list.
pub(crate) fn agent_children() -> Option<Vec<ProcStat>> {
    let mut pids = HashSet::new();
    for task in fs::read_dir("/proc/self/task").ok()?.flatten() {
        let text = fs::read_to_string(task.path().join("children")).ok()?;
        pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    Some(pids.into_iter().filter_map(read_stat).collect())
}

/// Every process on the host (those that vanish mid-scan are skipped).
pub(crate) fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// A script's process tree, tracked without cgroups.
#[derive(Debug)]
pub(crate) struct ProcessTree {
    /// The script's main process: session id and process group id.
    leader: i32,
    /// Inode of the task's output pipe.
    pipe_inode: u64,
    /// Every member seen so far: pid -> start time.
    known: HashMap<i32, u64>,
    agent: i32,
}

impl ProcessTree {
    pub(crate) fn new(leader: i32, pipe_inode: u64) -> Self {
        let mut known = HashMap::new();
        if let Some(stat) = read_stat(leader) {
            known.insert(leader, stat.start);
        }
        let mut tree = Self {
            leader,
            pipe_inode,
            known,
            agent: sys::agent_pid(),
        };
        tree.scan(false);
        tree
    }

    /// Walks `/proc` and returns the members now, dead or alive. `deep` also
    /// looks for holders of the output pipe, which reads every process's fd
    /// table: done when killing, not on every periodic scan.
    pub(crate) fn scan(&mut self, deep: bool) -> Vec<ProcStat> {
        let all = all_processes();
        let mut members: HashSet<i32> = all
            .iter()
            .filter(|p| self.is_eligible(p))
            .filter(|p| {
                (self.leader > 1 && (p.session == self.leader || p.pgrp == self.leader))
                    || self.known.get(&p.pid) == Some(&p.start)
                    || (deep && holds_write_end(p.pid, self.pipe_inode))
            })
            .map(|p| p.pid)
            .collect();
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for p in all.iter().filter(|p| self.is_eligible(p)) {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        let mut queue: Vec<i32> = members.iter().copied().collect();
        while let Some(pid) = queue.pop() {
            for &child in children.get(&pid).into_iter().flatten() {
                if members.insert(child) {
                    queue.push(child);
                }
            }
        }
        let found: Vec<ProcStat> = all
            .into_iter()
            .filter(|p| members.contains(&p.pid))
            .collect();
        for p in &found {
            self.known.insert(p.pid, p.start);
        }
        found
    }

    /// Never the agent itself (it holds the read end of the pipe) nor init.
    fn is_eligible(&self, p: &ProcStat) -> bool {
        p.pid != self.agent && p.pid > 1
    }

    /// Signals the process group and every live member (found by a quick
    /// scan: a deep one has already added the pipe holders to the members).
    pub(crate) fn signal_all(&mut self, signal: Signal) {
        sys::signal_group(self.leader, signal);
        for p in self.scan(false).into_iter().filter(|p| !p.dead) {
            sys::signal(p.pid, signal);
        }
    }

    /// Reaps the members that died after being re-parented to the agent.
    /// The main process is left to tokio, which waits for it.
    pub(crate) fn reap(&mut self) {
        for p in self.scan(false) {
            if p.dead && p.ppid == self.agent && p.pid != self.leader {
                sys::reap(p.pid);
            }
        }
    }
}

/// Whether `pid` has the pipe's write end open as an inherited descriptor.
/// Close-on-exec copies are skipped: those are other tasks' children caught
/// between fork and exec, not members of this tree.
fn holds_write_end(pid: i32, pipe_inode: u64) -> bool {
    let target = format!("pipe:[{pipe_inode}]");
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            && fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()
            .and_then(|info| fd_flags(&info))
            .is_some_and(|flags| {
                flags & libc::O_ACCMODE == libc::O_WRONLY && flags & libc::O_CLOEXEC == 0
            })
    })
}

/// The `flags:` line of `/proc/<pid>/fdinfo/<fd>` (octal).
fn fd_flags(fdinfo: &str) -> Option<i32> {
    let line = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))?;
    i32::from_str_radix(line.trim(), 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_children_include_a_just_started_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let children = agent_children().expect("the kernel lists children");
        child.kill().unwrap();
        child.wait().unwrap();
        let found = children
            .iter()
            .find(|p| p.pid == pid)
            .expect("child listed");
        assert_eq!(found.ppid, std::process::id() as i32);
    }

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let line = "4242 (evil) S 1 2 3 (x) R 100 200 300 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.pid, 4242);
        assert_eq!((stat.ppid, stat.pgrp, stat.session), (100, 200, 300));
        assert!(!stat.dead);
        assert_eq!(stat.start, 987654);
    }

    #[test]
    fn zombies_are_dead() {
        let line = "7 (sh) Z 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert!(parse_stat(line).unwrap().dead);
    }

    #[test]
    fn reads_this_process() {
        let me = read_stat(sys::agent_pid()).unwrap();
        assert_eq!(me.pid, sys::agent_pid());
        assert!(
            all_processes()
                .iter()
                .any(|p| p.pid == me.pid && p.start == me.start)
        );
    }

    #[test]
    fn fdinfo_flags() {
        assert_eq!(
            fd_flags("pos:\t0\nflags:\t02000001\nmnt_id:\t15\n"),
            Some(0o2000001)
        );
        assert_eq!(fd_flags("pos:\t0\n"), None);
    }
}
