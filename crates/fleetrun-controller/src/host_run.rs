//! What happens to one host's task, apart from I/O: a state machine fed what the agent sends,
//! the timer and the operator's termination, returning what to store and send.
//!
//! It does no I/O and reads no clock: every event comes with the controller's time. The engine's
//! async code only moves frames between the task stream and this machine, and executes its
//! [`Action`]s in order.
//!
//! Nothing an agent reports is taken as is. Every number that crossed the wire is checked before
//! it reaches the store: output offsets may not overflow, the stored log never grows past the
//! output limit plus [`LOG_OVERHEAD`], agent times outside the window the task could have run in
//! are replaced by the controller's, and counts are saturated into the store's `i64`.
//!
//! Deadlines: a task waits on its agent, unbounded while the connection lives, until the agent
//! says it started (a busy agent queues it behind `max_concurrent_tasks`); from then on it has
//! its timeout plus the grace period. A termination gives the agent the grace period to confirm.
//!
//! Reattach (agents of protocol version 2 own their tasks): a lost connection *detaches* the task
//! instead of ending it. It waits for the agent to come back until the task's deadline (its
//! timeout plus the grace period from its start, or from the loss for a task that had not started)
//! and then ends 310 with the reason. The agent's claim to the task when it reconnects is checked
//! against what the controller has ([`Claim`]; an acknowledged offset beyond what the controller
//! holds now is no contradiction: a restarted controller holds what it had saved, which may be
//! less than it had said): a consistent one *reattaches* the task, which
//! resumes from the controller's offset ([`Action::Resume`]), so every byte is stored once; any
//! other is refused ([`Action::Discard`]) and nothing of it is stored.

use fleetrun_proto::{Ending, HeldTask, TaskResult, TaskUp};
use fleetrun_store::HostOutcome;

use crate::status::host;

/// How far an agent's clock may be from the controller's before its times are replaced.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Bytes the controller may add to a host's log beyond the output limit: its markers for gaps and
/// truncations, the note on output beyond the limit and the line naming the ending.
pub const LOG_OVERHEAD: u64 = 16 * 1024;

/// Part of [`LOG_OVERHEAD`] for markers between pieces of output; the rest is kept for the
/// closing lines, so they are always stored.
const MARKER_ALLOWANCE: u64 = 8 * 1024;

/// Longest ending message from an agent that is stored; longer ones are cut.
const MAX_MESSAGE_LEN: usize = 4 * 1024;

/// The bounds a task runs within, as the controller sent them to the agent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of output the agent may send (`TaskRequest::output_limit`).
    pub output_limit: u64,
    /// The task's own timeout, in milliseconds.
    pub timeout_ms: i64,
    /// How long past the timeout, or past a termination, the agent has to report.
    pub grace_ms: i64,
}

/// Something that happened to the task.
#[derive(Debug)]
pub enum Event {
    /// A frame from the agent.
    Up(TaskUp),
    /// The timer set to [`HostTask::deadline`] fired (possibly late, or early: it is checked).
    Timer,
    /// The operator terminated the job.
    Cancel,
    /// The agent cannot be reached or the task stream ended without a result; says why.
    Lost(String),
    /// The connection to an agent that owns its tasks was lost; says why. The task goes on there.
    Detached(String),
    /// The agent reconnected and claims the task.
    Reattach(Claim),
    /// The agent reconnected and reported the tasks it holds, without this one: it never
    /// received it (the connection was lost as it was sent) or lost it (its spool).
    NotHeld,
    /// The controller did not send the task, for the reason given (it could not record it, so
    /// a restart could not have taken it up): the host ends with an error of the controller.
    Unsent(String),
}

/// What an agent reports of a task it holds, as the controller checks it against its own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub execute_count: u32,
    pub acked_offset: u64,
    pub produced: u64,
    pub started_at_ms: Option<i64>,
}

impl From<&HeldTask> for Claim {
    fn from(held: &HeldTask) -> Self {
        Self {
            job_instance_id: held.job_instance_id,
            step_instance_id: held.step_instance_id,
            execute_count: held.execute_count,
            acked_offset: held.acked_offset,
            produced: held.produced,
            started_at_ms: held.started_at_ms,
        }
    }
}

/// What the controller keeps of a task out on an agent that owns it, to take it up again after
/// a restart ([`HostTask::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub received: u64,
    pub stored: u64,
    pub dropped_bytes: u64,
    pub dropped_lines: u64,
    pub truncated: bool,
    pub started_at: Option<i64>,
    pub deadline: Option<i64>,
}

/// Who the task is, to check a claim against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskIdentity {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub execute_count: u32,
}

/// What the engine must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Store `data` at `offset` in the host's log.
    Log { offset: i64, data: Vec<u8> },
    /// Record the host as running since `start_time`.
    Running { start_time: i64 },
    /// Send the agent a cancel on the task stream.
    SendCancel,
    /// Open a new task stream on the claiming connection and resume the task there from this
    /// offset of the agent's output.
    Resume { from_offset: u64 },
    /// Refuse the claim (the reason is logged): tell the agent to kill and forget the task.
    Discard { reason: String },
    /// The task reached its final status; nothing follows.
    Finish(Outcome),
}

/// A host's final result; [`HostOutcome`] with equality, for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub status: i32,
    pub tag: String,
    pub exit_code: Option<i32>,
    pub start_time: Option<i64>,
    pub end_time: i64,
    pub output_bytes: i64,
    pub dropped_bytes: i64,
    pub dropped_lines: i64,
    pub survivors: i64,
}

impl From<Outcome> for HostOutcome {
    fn from(o: Outcome) -> Self {
        HostOutcome {
            status: o.status,
            tag: o.tag,
            exit_code: o.exit_code,
            error_code: 0,
            start_time: o.start_time,
            end_time: o.end_time,
            output_bytes: o.output_bytes,
            dropped_bytes: o.dropped_bytes,
            dropped_lines: o.dropped_lines,
            survivors: o.survivors,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sent; the agent has not said it started (it may be queued behind other tasks).
    Waiting,
    /// The agent said it started.
    Running,
    /// Finished; every further event is ignored.
    Done,
}

/// One host's task, from dispatch to final status.
#[derive(Debug)]
pub struct HostTask {
    limits: Limits,
    identity: TaskIdentity,
    /// Why the connection was lost, while the task waits for its agent to come back.
    detached: Option<String>,
    /// Claims refused so far, for the final line should the agent never come back properly.
    refused_claims: u64,
    truncated_seen: bool,
    dispatched_at: i64,
    phase: Phase,
    /// When the controller gives up waiting, in its clock.
    deadline: Option<i64>,
    cancelled: bool,
    started_at: Option<i64>,
    /// End of the agent's output received so far (its offsets).
    received: u64,
    /// Bytes in the host's log.
    stored: u64,
    /// Bytes the agent sent past what the log holds.
    over_limit: u64,
    /// Output chunks whose offset plus length overflowed.
    impossible_chunks: u64,
    dropped_bytes: u64,
    dropped_lines: u64,
}

impl HostTask {
    /// A task sent to its agent at `now`.
    pub fn new(limits: Limits, now: i64) -> Self {
        Self::for_task(
            limits,
            TaskIdentity {
                job_instance_id: 0,
                step_instance_id: 0,
                execute_count: 0,
            },
            now,
        )
    }

    /// A task of `identity` sent to its agent at `now`; claims are checked against `identity`.
    pub fn for_task(limits: Limits, identity: TaskIdentity, now: i64) -> Self {
        Self {
            limits,
            identity,
            detached: None,
            refused_claims: 0,
            truncated_seen: false,
            dispatched_at: now,
            phase: Phase::Waiting,
            deadline: None,
            cancelled: false,
            started_at: None,
            received: 0,
            stored: 0,
            over_limit: 0,
            impossible_chunks: 0,
            dropped_bytes: 0,
            dropped_lines: 0,
        }
    }

    /// When [`Event::Timer`] should fire; `None` for no timer.
    pub fn deadline(&self) -> Option<i64> {
        self.deadline
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the operator's termination reached the task.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// What a restarted controller needs to take the task up again.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            received: self.received,
            stored: self.stored,
            dropped_bytes: self.dropped_bytes,
            dropped_lines: self.dropped_lines,
            truncated: self.truncated_seen,
            started_at: self.started_at,
            deadline: self.deadline,
        }
    }

    /// A task taken up by a restarted controller from its checkpoint: detached, waiting for its
    /// agent to come back until the deadline it had (or, not started, its whole time from now).
    pub fn restore(
        limits: Limits,
        identity: TaskIdentity,
        checkpoint: &Checkpoint,
        dispatched_at: i64,
        now: i64,
    ) -> Self {
        let mut task = Self::for_task(limits, identity, dispatched_at);
        task.received = checkpoint.received;
        task.stored = checkpoint.stored;
        task.dropped_bytes = checkpoint.dropped_bytes;
        task.dropped_lines = checkpoint.dropped_lines;
        task.truncated_seen = checkpoint.truncated;
        task.started_at = checkpoint.started_at;
        if checkpoint.started_at.is_some() {
            task.phase = Phase::Running;
        }
        task.deadline = checkpoint.deadline;
        task.handle(now, Event::Detached("the controller restarted".into()));
        task
    }

    /// Whether the task waits for its agent to come back.
    pub fn is_detached(&self) -> bool {
        self.detached.is_some() && self.phase != Phase::Done
    }

    /// End of the agent's output received so far (its offsets).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes in the host's log so far.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Bytes of output the agent sent beyond what the log holds.
    pub fn over_limit(&self) -> u64 {
        self.over_limit
    }

    /// The most a host's log can hold.
    pub fn log_capacity(&self) -> u64 {
        self.limits.output_limit.saturating_add(LOG_OVERHEAD)
    }

    /// Feeds one event that happened at `now` (the controller's clock, Unix milliseconds).
    pub fn handle(&mut self, now: i64, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.phase == Phase::Done {
            return actions;
        }
        match event {
            Event::Up(TaskUp::Started { started_at_ms }) => {
                if self.phase == Phase::Waiting {
                    self.phase = Phase::Running;
                    let start = self.agent_time(started_at_ms, self.dispatched_at, now, now);
                    self.started_at = Some(start);
                    // The agent's clock decides nothing here: the timeout runs from when the
                    // controller hears of the start.
                    let deadline = now
                        .saturating_add(self.limits.timeout_ms)
                        .saturating_add(self.limits.grace_ms);
                    self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
                    actions.push(Action::Running { start_time: start });
                }
            }
            Event::Up(TaskUp::Output { offset, data }) => self.output(offset, data, &mut actions),
            // At most one truncation per task: a repeat is the agent resending it after a reattach.
            Event::Up(TaskUp::Truncated { .. }) if self.truncated_seen => {}
            Event::Up(TaskUp::Truncated {
                dropped_bytes,
                dropped_lines,
            }) => {
                self.truncated_seen = true;
                self.dropped_bytes = self.dropped_bytes.saturating_add(dropped_bytes);
                self.dropped_lines = self.dropped_lines.saturating_add(dropped_lines);
                let marker = format!(
                    "\n[fleetrun] output truncated here: {dropped_bytes} bytes in {dropped_lines} lines dropped\n"
                );
                self.append_output(marker.into_bytes(), &mut actions);
            }
            Event::Up(TaskUp::SpoolLost { offset, bytes }) => {
                self.spool_lost(offset, bytes, &mut actions)
            }
            // Only file tasks report files; from a script's agent it means nothing.
            Event::Up(
                TaskUp::FilePlaced(_)
                | TaskUp::Want { .. }
                | TaskUp::WantFrom { .. }
                | TaskUp::SourceFile(_)
                | TaskUp::SourceChunk { .. }
                | TaskUp::SourceFileEnd(_),
            ) => {}
            Event::Up(TaskUp::Finished(result)) => {
                let outcome = self.result_outcome(result, now);
                self.finish(outcome, &mut actions);
            }
            Event::Timer => match self.deadline {
                Some(deadline) if now >= deadline && self.detached.is_some() => {
                    let why = self.detached.take().unwrap_or_default();
                    let mut tag = format!(
                        "the agent did not come back before the task's deadline (its timeout plus \
                         the grace period); the connection was lost: {why}"
                    );
                    if self.refused_claims > 0 {
                        tag.push_str(&format!(
                            "; {} claims of the task by the agent were refused",
                            self.refused_claims
                        ));
                    }
                    let outcome = self.controller_outcome(host::AGENT_ABNORMAL, tag, now);
                    self.finish(outcome, &mut actions);
                }
                Some(deadline) if now >= deadline => {
                    let tag = if self.cancelled {
                        "the agent did not confirm the termination within the grace period"
                    } else {
                        actions.push(Action::SendCancel);
                        "the agent sent no result within the task's timeout plus the grace period"
                    };
                    let outcome = self.controller_outcome(host::AGENT_TIMEOUT, tag.into(), now);
                    self.finish(outcome, &mut actions);
                }
                _ => {}
            },
            Event::Cancel => {
                if !self.cancelled {
                    self.cancelled = true;
                    // A detached task hears of it when its agent comes back.
                    if self.detached.is_none() {
                        actions.push(Action::SendCancel);
                    }
                    let deadline = now.saturating_add(self.limits.grace_ms);
                    self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
                }
            }
            Event::Lost(why) => {
                let outcome = self.controller_outcome(host::AGENT_ABNORMAL, why, now);
                self.finish(outcome, &mut actions);
            }
            Event::Unsent(why) => {
                let outcome = self.controller_outcome(host::AGENT_TASK_ERROR, why, now);
                self.finish(outcome, &mut actions);
            }
            Event::Detached(why) => {
                if self.detached.is_none() {
                    // A task that had not started gets its whole time from now.
                    let deadline = now
                        .saturating_add(self.limits.timeout_ms)
                        .saturating_add(self.limits.grace_ms);
                    self.deadline = Some(self.deadline.unwrap_or(deadline));
                    self.detached = Some(why);
                }
            }
            Event::Reattach(claim) => self.reattach(claim, now, &mut actions),
            Event::NotHeld => {
                let mut tag = "the agent came back without the task: it never received it, or \
                               lost it"
                    .to_owned();
                if let Some(why) = self.detached.take() {
                    tag.push_str(&format!("; the connection was lost: {why}"));
                }
                let outcome = self.controller_outcome(host::AGENT_ABNORMAL, tag, now);
                self.finish(outcome, &mut actions);
            }
        }
        actions
    }

    /// Checks an agent's claim to the task; resumes it if the claim agrees with what the
    /// controller has, else refuses it.
    fn reattach(&mut self, claim: Claim, now: i64, actions: &mut Vec<Action>) {
        let refusal = if claim.job_instance_id != self.identity.job_instance_id
            || claim.step_instance_id != self.identity.step_instance_id
            || claim.execute_count != self.identity.execute_count
        {
            Some(format!(
                "the claim names job {} step {} run {}, the task is job {} step {} run {}",
                claim.job_instance_id,
                claim.step_instance_id,
                claim.execute_count,
                self.identity.job_instance_id,
                self.identity.step_instance_id,
                self.identity.execute_count
            ))
        } else if claim.acked_offset > claim.produced {
            Some(format!(
                "the claim says {} bytes were acknowledged of {} produced",
                claim.acked_offset, claim.produced
            ))
        } else if claim.produced < self.received {
            Some(format!(
                "the claim says {} bytes were produced, the controller received {} already",
                claim.produced, self.received
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.refused_claims = self.refused_claims.saturating_add(1);
            actions.push(Action::Discard { reason });
            return;
        }
        self.detached = None;
        if self.phase == Phase::Waiting && !self.cancelled {
            // Back on a live connection, a task not started yet waits unbounded again.
            self.deadline = None;
        }
        if let (Phase::Waiting, Some(at)) = (self.phase, claim.started_at_ms) {
            // Started while the controller could not hear it: its time runs from the agent's
            // start, as far as the controller can believe the agent's clock.
            self.phase = Phase::Running;
            let start = self.agent_time(at, self.dispatched_at, now, now);
            self.started_at = Some(start);
            let deadline = start
                .saturating_add(self.limits.timeout_ms)
                .saturating_add(self.limits.grace_ms);
            self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
            actions.push(Action::Running { start_time: start });
        }
        actions.push(Action::Resume {
            from_offset: self.received,
        });
        if self.cancelled {
            actions.push(Action::SendCancel);
        }
    }

    /// Output the agent could not spool: counted as dropped, marked in the log.
    fn spool_lost(&mut self, offset: u64, bytes: u64, actions: &mut Vec<Action>) {
        let Some(end) = offset.checked_add(bytes) else {
            self.impossible_chunks = self.impossible_chunks.saturating_add(1);
            return;
        };
        if end <= self.received {
            return;
        }
        let lost = end - self.received.max(offset);
        if offset > self.received {
            let gap = format!(
                "\n[fleetrun] {} bytes of output lost in transit\n",
                offset - self.received
            );
            self.append_output(gap.into_bytes(), actions);
        }
        self.received = end;
        self.dropped_bytes = self.dropped_bytes.saturating_add(lost);
        let marker = format!(
            "\n[fleetrun] output lost here: {lost} bytes the agent could not spool (its disk is full)\n"
        );
        self.append_output(marker.into_bytes(), actions);
    }

    /// Stores a chunk of output, dropping whatever the agent sends twice.
    fn output(&mut self, offset: u64, data: Vec<u8>, actions: &mut Vec<Action>) {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            self.impossible_chunks = self.impossible_chunks.saturating_add(1);
            return;
        };
        if end <= self.received {
            return;
        }
        let data = if offset < self.received {
            // Less than `data.len()`, since `end > received`.
            data[(self.received - offset) as usize..].to_vec()
        } else {
            if offset > self.received {
                let gap = format!(
                    "\n[fleetrun] {} bytes of output lost in transit\n",
                    offset - self.received
                );
                self.append_output(gap.into_bytes(), actions);
            }
            data
        };
        self.received = end;
        self.append_output(data, actions);
    }

    /// Appends output or a marker between pieces of it, within the output limit plus the
    /// markers' allowance; what does not fit is counted, not stored.
    fn append_output(&mut self, mut data: Vec<u8>, actions: &mut Vec<Action>) {
        let budget = self.limits.output_limit.saturating_add(MARKER_ALLOWANCE);
        let room = budget.saturating_sub(self.stored);
        if data.len() as u64 > room {
            self.over_limit = self.over_limit.saturating_add(data.len() as u64 - room);
            data.truncate(room as usize);
        }
        self.append(data, actions);
    }

    fn append(&mut self, data: Vec<u8>, actions: &mut Vec<Action>) {
        if data.is_empty() {
            return;
        }
        let offset = i64::try_from(self.stored).unwrap_or(i64::MAX);
        self.stored = self.stored.saturating_add(data.len() as u64);
        actions.push(Action::Log { offset, data });
    }

    /// Ends the task: the controller's closing lines, then the outcome.
    fn finish(&mut self, mut outcome: Outcome, actions: &mut Vec<Action>) {
        self.phase = Phase::Done;
        self.deadline = None;
        let mut closing = String::new();
        if self.over_limit > 0 {
            closing.push_str(&format!(
                "\n[fleetrun] the agent sent {} bytes beyond the output limit of {} bytes; they were dropped\n",
                self.over_limit, self.limits.output_limit
            ));
        }
        if self.impossible_chunks > 0 {
            closing.push_str(&format!(
                "[fleetrun] {} output chunks at impossible offsets were dropped\n",
                self.impossible_chunks
            ));
        }
        outcome.tag = cut(std::mem::take(&mut outcome.tag), MAX_MESSAGE_LEN);
        if !outcome.tag.is_empty() {
            closing.push_str(&format!("[fleetrun] {}\n", outcome.tag));
        }
        self.append(closing.into_bytes(), actions);
        actions.push(Action::Finish(outcome));
    }

    /// An ending the controller decided (timeout, lost agent).
    fn controller_outcome(&self, status: i32, tag: String, now: i64) -> Outcome {
        Outcome {
            status,
            tag,
            start_time: self.started_at,
            // An agent's start time may lie ahead of the controller's clock by the skew.
            end_time: self.started_at.map_or(now, |start| now.max(start)),
            dropped_bytes: saturate(self.dropped_bytes),
            dropped_lines: saturate(self.dropped_lines),
            ..Outcome::default()
        }
    }

    /// Maps the agent's result to bk-job's host status, checking every number in it.
    fn result_outcome(&self, result: TaskResult, now: i64) -> Outcome {
        let (status, exit_code) = match result.ending {
            Ending::Exited { code: 0 } => (host::SUCCESS, Some(0)),
            Ending::Exited { code } => (host::NON_ZERO_EXIT, Some(code)),
            // Shells report a death by signal N as 128 + N; so do we, for signals a shell can
            // report (a real signal number is below 128).
            Ending::Signaled { signal } => match signal {
                1..128 => (host::SCRIPT_FAILED, Some(128 + signal)),
                _ => (host::SCRIPT_FAILED, None),
            },
            Ending::TimedOut => (host::SCRIPT_TIMEOUT, None),
            Ending::Cancelled => (host::TERMINATE_SUCCESS, None),
            Ending::UserNotFound => (host::USER_NOT_EXIST, None),
            Ending::InterpreterMissing => (host::SCRIPT_FAILED, None),
            Ending::Failed => (host::AGENT_TASK_ERROR, None),
        };
        let start = self.agent_time(
            result.started_at_ms,
            self.dispatched_at,
            now,
            self.started_at.unwrap_or(now),
        );
        let end = self
            .agent_time(result.finished_at_ms, start, now, now)
            .max(start);
        // The script wrote at least what arrived and what the agent says it dropped.
        let seen = self.received.saturating_add(self.dropped_bytes);
        Outcome {
            status,
            tag: result.message.unwrap_or_default(),
            exit_code,
            start_time: Some(start),
            end_time: end,
            output_bytes: saturate(result.output_bytes.max(seen)),
            dropped_bytes: saturate(self.dropped_bytes),
            dropped_lines: saturate(self.dropped_lines),
            survivors: i64::from(result.survivors),
        }
    }

    /// An agent's time if it lies between `earliest` and `now`, give or take the clock skew;
    /// else `fallback` from the controller's clock.
    fn agent_time(&self, t: i64, earliest: i64, now: i64, fallback: i64) -> i64 {
        let lo = earliest.saturating_sub(MAX_CLOCK_SKEW_MS);
        let hi = now.saturating_add(MAX_CLOCK_SKEW_MS);
        if (lo..=hi).contains(&t) { t } else { fallback }
    }
}

fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub(crate) fn cut(mut text: String, max: usize) -> String {
    // An agent's text goes into TEXT columns, which PostgreSQL refuses with a NUL in them: the
    // whole group commit would fail with it.
    if text.contains('\0') {
        text = text.replace('\0', "\u{FFFD}");
    }
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

#[cfg(test)]
mod tests;
