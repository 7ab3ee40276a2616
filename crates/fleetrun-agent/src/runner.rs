//! What runs a task's script: on a host, the executor ([`fleetrun_exec::Executor`]); in
//! `fleetrun-swarm`, an emulated runner that forks nothing. Everything else a task does (its
//! stream, spooling, delivery, reattach) is the same session code for both, so an emulated
//! fleet exercises the agent's own protocol code.

use fleetrun_exec::{Executor, Running, Task};
use tokio_util::sync::CancellationToken;

/// Starts tasks and reports their output and outcome.
pub trait Runner: Send + Sync + std::fmt::Debug + 'static {
    /// Starts `task` and returns at once; its output events and outcome come through the
    /// [`Running`]. Cancelling `cancel` ends it as [`fleetrun_exec::Ending::Cancelled`].
    fn start(&self, task: Task, cancel: CancellationToken) -> Running;

    /// What file tasks get: `None` when this runner writes files on the host; else why it
    /// refuses to (an emulated runner must never write to the host it runs on).
    fn refuses_files(&self) -> Option<&'static str> {
        None
    }
}

impl Runner for Executor {
    fn start(&self, task: Task, cancel: CancellationToken) -> Running {
        Executor::start(self, task, cancel)
    }
}
