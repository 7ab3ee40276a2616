//! Killing what is left of a script's process tree.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::cgroup::TaskCgroup;
use crate::sys;
use crate::tree::{ProcessTree, agent_children, all_processes};

/// How long SIGKILLed processes get to disappear before they are counted as
/// survivors (a process stuck in uninterruptible sleep can outlast this).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The processes of one task, however they are tracked.
#[derive(Debug)]
pub(crate) enum Tree {
    /// Everything in the task's cgroup; `leader` is the main process.
    Cgroup { cgroup: TaskCgroup, leader: i32 },
    /// Found through sessions, ancestry and the output pipe.
    Procs(ProcessTree),
}

impl Tree {
    /// Pids still alive; `deep` does the thorough (slower) search.
    fn alive(&mut self, deep: bool) -> Vec<i32> {
        match self {
            Self::Cgroup { cgroup, .. } => cgroup.pids(),
            Self::Procs(tree) => tree
                .scan(deep)
                .into_iter()
                .filter(|p| !p.dead)
                .map(|p| p.pid)
                .collect(),
        }
    }

    fn is_empty(&mut self) -> bool {
        match self {
            Self::Cgroup { cgroup, .. } => !cgroup.populated(),
            Self::Procs(_) => self.alive(false).is_empty(),
        }
    }

    fn signal_all(&mut self, signal: Signal) {
        match self {
            Self::Cgroup { cgroup, .. } => cgroup.signal_all(signal),
            Self::Procs(tree) => tree.signal_all(signal),
        }
    }

    fn kill_all(&mut self) {
        match self {
            Self::Cgroup { cgroup, .. } => cgroup.kill_all(),
            Self::Procs(tree) => tree.signal_all(Signal::SIGKILL),
        }
    }

    /// Reaps members that were re-parented to the agent and died, so the
    /// agent does not collect zombies.
    fn reap(&mut self) {
        match self {
            Self::Cgroup { cgroup, leader } => {
                let agent = sys::agent_pid();
                let candidates = agent_children().unwrap_or_else(all_processes);
                for p in candidates {
                    if p.dead && p.ppid == agent && p.pid != *leader && cgroup.holds(p.pid) {
                        sys::reap(p.pid);
                    }
                }
            }
            Self::Procs(tree) => tree.reap(),
        }
    }

    /// Removes the task's cgroup, if it has one.
    pub(crate) fn remove(&self) {
        if let Self::Cgroup { cgroup, .. } = self {
            // A just-emptied cgroup can stay busy for a moment.
            let mut result = Ok(());
            poll_until(
                Duration::from_millis(500),
                Duration::from_millis(10),
                || {
                    result = cgroup.remove();
                    result.is_ok()
                },
            );
            if let Err(err) = result {
                tracing::warn!(?cgroup, %err, "cannot remove a task cgroup");
            }
        }
    }
}

/// Kills every remaining process of the tree: SIGTERM (and SIGCONT, so
/// stopped ones can act on it), up to `grace` for them to exit, then SIGKILL
/// until the tree is empty or [`KILL_WAIT`] has passed. Reaps what was
/// re-parented to the agent and returns how many processes survived.
/// Blocking: run it on a blocking thread.
pub(crate) fn terminate(tree: &mut Tree, grace: Duration) -> u32 {
    let poll = match tree {
        Tree::Cgroup { .. } => Duration::from_millis(10),
        Tree::Procs(_) => Duration::from_millis(25),
    };
    // The deep search first: it adds the pipe holders to the members, so
    // the quick scans below keep signalling them.
    if !tree.alive(true).is_empty() {
        tree.signal_all(Signal::SIGTERM);
        tree.signal_all(Signal::SIGCONT);
        if !poll_until(grace, poll, || tree.is_empty()) {
            tree.kill_all();
            poll_until(KILL_WAIT, poll, || {
                // Again each time: catches what forked during the kill.
                tree.kill_all();
                tree.is_empty()
            });
        }
    }
    tree.reap();
    let survivors = tree.alive(true);
    if !survivors.is_empty() {
        tracing::warn!(?survivors, "processes of a task survived SIGKILL");
    }
    survivors.len() as u32
}

/// Calls `done` every `every` until it returns true or `limit` has passed;
/// returns its last answer.
fn poll_until(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(every);
    }
}
