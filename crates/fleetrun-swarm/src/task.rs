//! The emulated executor: the agent's [`Runner`] that forks nothing. The "script" runs for
//! `--task-ms`, then prints the configured output and exits 0; the agent's own task code
//! around it (stream, output kept in memory, delivery, acknowledgement) is the real one.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fleetrun_agent::Runner;
use fleetrun_exec::{Ending, Outcome, OutputEvent, Running, Task};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub(crate) struct EmulatedRunner {
    /// What every script prints.
    pub output: Bytes,
    /// How long every script runs.
    pub task_time: Duration,
}

impl Runner for EmulatedRunner {
    fn start(&self, task: Task, cancel: CancellationToken) -> Running {
        let output = self.output.clone();
        let task_time = self.task_time;
        let limit = task.output_limit;
        // The script is never run: it need not be held while the task lasts.
        drop(task);
        Running::spawn(move |tx| async move {
            let started_at = SystemTime::now();
            if !task_time.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(task_time) => {}
                    () = cancel.cancelled() => return outcome(Ending::Cancelled, started_at, 0, 0, 0),
                }
            }
            // As the executor delivers it: whole within the limit, else the first half of the
            // limit, then once ended one `Truncated` and the last half.
            if output.len() <= limit {
                if !output.is_empty() {
                    let _ = tx.send(OutputEvent::Data(output.clone()));
                }
                return outcome(Ending::Exited(0), started_at, output.len(), 0, 0);
            }
            let head = limit / 2;
            let tail = limit - head;
            let dropped = output.slice(head..output.len() - tail);
            let dropped_lines = dropped.iter().filter(|b| **b == b'\n').count() as u64;
            let _ = tx.send(OutputEvent::Data(output.slice(..head)));
            let _ = tx.send(OutputEvent::Truncated {
                dropped_bytes: dropped.len() as u64,
                dropped_lines,
            });
            let _ = tx.send(OutputEvent::Data(output.slice(output.len() - tail..)));
            outcome(
                Ending::Exited(0),
                started_at,
                output.len(),
                dropped.len() as u64,
                dropped_lines,
            )
        })
    }

    fn refuses_files(&self) -> Option<&'static str> {
        Some("the emulated executor writes no files")
    }
}

fn outcome(
    ending: Ending,
    started_at: SystemTime,
    output_bytes: usize,
    dropped_bytes: u64,
    dropped_lines: u64,
) -> Outcome {
    Outcome {
        ending,
        started_at,
        finished_at: SystemTime::now(),
        output_bytes: output_bytes as u64,
        dropped_bytes,
        dropped_lines,
        survivors: 0,
    }
}
