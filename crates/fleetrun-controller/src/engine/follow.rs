//! One host's part of a job: moves frames between the task stream and the host's [`HostTask`],
//! and does what it says. With an agent that owns its tasks (protocol version 2) the task
//! survives its connection: the run registers the task's id so that the agent's claim, when it
//! reconnects, reaches it ([`Reattach`]), and resumes on a new stream.

use std::{collections::VecDeque, time::Duration};

use fleetrun_net::{FramedRecv, StreamError, describe_connection_error, send_frame};
use fleetrun_proto::{SharedTaskRequest, TaskDown, TaskUp};
use fleetrun_store::{HostCheckpoint, Write};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Claimant, Engine, Reattach, now_ms};
use crate::{
    host_run::{Action, Checkpoint, Event, HostTask, Limits, Outcome, TaskIdentity},
    status::host,
};

/// How long a cancel for a task that already has its final status may wait for room on the
/// stream: the agent is told if it reads, and the host's result is not held up if it does not.
const CANCEL_SEND_WAIT: Duration = Duration::from_secs(1);

/// How long the acknowledgement of a stored result may take to leave.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// How long resuming a task on a reconnected agent may take (opening the stream waits while
/// the agent has all the streams it allows open) before the task counts as detached again; never
/// past the task's deadline.
const RESUME_WAIT: Duration = Duration::from_secs(30);

/// The time until the machine's deadline; a year, standing for never, when it has none.
fn until_deadline(machine: &HostTask) -> Duration {
    match machine.deadline() {
        Some(deadline) => Duration::from_millis(u64::try_from(deadline - now_ms()).unwrap_or(0)),
        None => Duration::from_secs(365 * 24 * 3600),
    }
}

/// A task stream the run is attached to.
struct Attached {
    send: quinn::SendStream,
    recv: FramedRecv,
    /// The agent's connection the stream is on.
    connection: quinn::Connection,
}

/// Reads the next report of the attached stream; never, while detached.
async fn next_up(stream: &mut Option<Attached>) -> Result<Option<TaskUp>, StreamError> {
    match stream {
        Some(attached) => attached.recv.recv::<TaskUp>().await,
        None => std::future::pending().await,
    }
}

/// The next claim; never, for an agent that cannot reattach.
async fn next_claim(claims: &mut Option<mpsc::UnboundedReceiver<Reattach>>) -> Reattach {
    match claims {
        Some(rx) => match rx.recv().await {
            Some(claim) => claim,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Why a stream ended, for the host's log.
fn stream_end(error: Option<StreamError>) -> String {
    match error {
        None => "the agent closed the task stream without a result".into(),
        Some(e) => match e.connection_error() {
            Some(conn) => format!("agent connection lost: {}", describe_connection_error(conn)),
            None => format!("agent task stream failed: {e}"),
        },
    }
}

/// Tells an agent to kill and forget a task; in the background, on a stream of its own.
pub(super) fn discard(connection: quinn::Connection, task_id: Uuid) {
    tokio::spawn(async move {
        let Ok((mut send, _recv)) = connection.open_bi().await else {
            return;
        };
        if send_frame(&mut send, &TaskDown::Discard { task_id })
            .await
            .is_ok()
        {
            let _ = send.finish();
            let _ = tokio::time::timeout(ACK_WAIT, send.stopped()).await;
        }
    });
}

/// Removes the task's registration for claims when the run ends, however it ends.
struct Registered {
    engine: Engine,
    task_id: Uuid,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.engine.claims.lock().unwrap().remove(&self.task_id);
    }
}

pub(super) struct HostRun {
    pub engine: Engine,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub bk_host_id: i64,
    /// The step's request; taken once sent, so the script lives only while hosts still need it.
    pub request: Option<SharedTaskRequest>,
    /// Where the task stood when the controller stopped, for a run that takes it up again.
    pub resume: Option<HostCheckpoint>,
    pub limits: Limits,
    pub cancel: CancellationToken,
    /// Set once another controller took the task over (its agent claimed it there): the host's
    /// end is that controller's to record.
    pub moved: bool,
    /// The host's epoch this run took it at, carried by every write of its output, status and
    /// checkpoint: once another controller takes the host over, they are refused.
    pub epoch: i64,
}

impl HostRun {
    /// Records one of the run's writes: a part's always (its lease holder follows the host
    /// through the store, whoever holds the job's lease now), a lease's own run's only while
    /// the job is not abandoned here.
    async fn record(&self, write: Write) {
        if self
            .engine
            .runs_part_host(self.job_instance_id, self.step_instance_id, self.bk_host_id)
        {
            self.engine.record_part(self.job_instance_id, write).await;
        } else {
            self.engine.write_for(self.job_instance_id, write).await;
        }
    }

    /// Runs the host's task to a final status and returns it.
    pub async fn run(mut self) -> i32 {
        let identity = TaskIdentity {
            job_instance_id: self.job_instance_id,
            step_instance_id: self.step_instance_id,
            execute_count: 0,
        };
        let mut machine = HostTask::for_task(self.limits, identity, now_ms());
        let link = self.engine.agents.get(self.bk_host_id);
        let mut last_stream = None;
        let resume = self.resume.take();
        let outcome = match (resume, link) {
            (Some(checkpoint), _) => {
                self.take_up(identity, checkpoint, &mut machine, &mut last_stream)
                    .await
            }
            (None, link) => match link {
                None => {
                    self.request = None;
                    let event = Event::Lost("agent offline when the task was dispatched".into());
                    let actions = machine.handle(now_ms(), event);
                    self.execute(&mut machine, actions, &mut None, None).await
                }
                Some(link) => {
                    let task_id = Uuid::new_v4();
                    let (claims, _registered) = if link.owns_tasks() {
                        let (tx, rx) = mpsc::unbounded_channel();
                        self.engine.claims.lock().unwrap().insert(
                            task_id,
                            Claimant {
                                step_instance_id: self.step_instance_id,
                                bk_host_id: self.bk_host_id,
                                epoch: self.epoch,
                                agent_id: link.agent_id.clone(),
                                tx,
                            },
                        );
                        let registered = Registered {
                            engine: self.engine.clone(),
                            task_id,
                        };
                        (Some(rx), Some(registered))
                    } else {
                        (None, None)
                    };
                    let mut claims = claims;
                    let outcome = self
                        .exchange(
                            &link.connection,
                            &link.agent_id,
                            task_id,
                            &mut machine,
                            &mut claims,
                            &mut last_stream,
                        )
                        .await;
                    // Taken before the registration ends, so that a late claim is discarded.
                    drop(claims);
                    outcome
                }
            },
        };
        self.engine
            .forget_checkpoint(self.step_instance_id, self.bk_host_id);
        if !self.moved
            && matches!(&outcome, Some(o) if o.status == host::AGENT_ABNORMAL)
            && self
                .engine
                .taken_elsewhere(self.step_instance_id, self.bk_host_id)
                .await
        {
            // Lost here, while its agent took it to another controller (news of which may not
            // have come yet): the end is that controller's to record.
            self.moved = true;
        }
        if self.moved {
            return self
                .engine
                .moved_host_end(
                    self.job_instance_id,
                    self.step_instance_id,
                    self.bk_host_id,
                    self.limits,
                )
                .await;
        }
        // The machine always finishes on a lost agent; a missing outcome would be a bug in it.
        let outcome = outcome.unwrap_or_else(|| Outcome {
            status: host::AGENT_TASK_ERROR,
            tag: "internal error in the controller while following this host".into(),
            end_time: now_ms(),
            ..Outcome::default()
        });
        let status = outcome.status;
        crate::metrics::host_finished(status);
        let (stored_tx, stored) = tokio::sync::oneshot::channel();
        self.record(Write::HostFinished {
            stored: Some(stored_tx),
            step_instance_id: self.step_instance_id,
            bk_host_id: self.bk_host_id,
            outcome: outcome.into(),
            epoch: self.epoch,
        })
        .await;
        if let Some(Attached {
            mut send,
            connection,
            ..
        }) = last_stream
        {
            // The agent forgets the task once the result is committed: until then it keeps it,
            // and a restarted controller could still take it. A result the store refused
            // (another controller took the host over meanwhile) or lost is not acknowledged:
            // the connection closes, saying so, and the agent claims the task again where the
            // host is held now, which records its result.
            let (job, bk_host_id) = (self.job_instance_id, self.bk_host_id);
            tokio::spawn(async move {
                if stored.await.is_ok() {
                    let sent = tokio::time::timeout(
                        ACK_WAIT,
                        send_frame(&mut send, &TaskDown::ResultStored),
                    )
                    .await;
                    if matches!(sent, Ok(Ok(()))) {
                        let _ = send.finish();
                    }
                } else {
                    tracing::warn!(
                        job,
                        bk_host_id,
                        "the host's end was not recorded (another controller holds it now, or \
                         the store lost it): the agent keeps the result and takes it elsewhere"
                    );
                    connection.close(
                        fleetrun_proto::close_code::SHUTDOWN.into(),
                        b"a result was not recorded here: claim the task again",
                    );
                }
            });
        }
        status
    }

    /// Takes up a task a previous run of the controller sent: waits, detached, for its agent to
    /// claim it.
    async fn take_up(
        &mut self,
        identity: TaskIdentity,
        checkpoint: HostCheckpoint,
        machine: &mut HostTask,
        last_stream: &mut Option<Attached>,
    ) -> Option<Outcome> {
        let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
        let restored = Checkpoint {
            received: unsigned(checkpoint.received),
            stored: unsigned(checkpoint.stored),
            dropped_bytes: unsigned(checkpoint.dropped_bytes),
            dropped_lines: unsigned(checkpoint.dropped_lines),
            truncated: checkpoint.truncated,
            started_at: checkpoint.started_at,
            deadline: checkpoint.deadline,
        };
        let now = now_ms();
        *machine = HostTask::restore(
            self.limits,
            identity,
            &restored,
            checkpoint.started_at.unwrap_or(now),
            now,
        );
        let Ok(task_id) = checkpoint.task_id.parse::<Uuid>() else {
            let why = format!("the stored task id {:?} is unreadable", checkpoint.task_id);
            let actions = machine.handle(now_ms(), Event::Lost(why));
            return self.execute(machine, actions, &mut None, None).await;
        };
        // Registered when the job was taken up, before any agent could reconnect.
        let prepared = self.engine.prepared.lock().unwrap().remove(&task_id);
        let rx = match prepared {
            Some(rx) => rx,
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.engine.claims.lock().unwrap().insert(
                    task_id,
                    Claimant {
                        step_instance_id: self.step_instance_id,
                        bk_host_id: self.bk_host_id,
                        epoch: self.epoch,
                        agent_id: checkpoint.agent_id.clone(),
                        tx,
                    },
                );
                rx
            }
        };
        let _registered = Registered {
            engine: self.engine.clone(),
            task_id,
        };
        let mut claims = Some(rx);
        let outcome = self
            .follow(
                &checkpoint.agent_id,
                task_id,
                machine,
                &mut claims,
                None,
                false,
                last_stream,
            )
            .await;
        drop(claims);
        outcome
    }

    async fn exchange(
        &mut self,
        connection: &quinn::Connection,
        agent_id: &str,
        task_id: Uuid,
        machine: &mut HostTask,
        claims: &mut Option<mpsc::UnboundedReceiver<Reattach>>,
        last_stream: &mut Option<Attached>,
    ) -> Option<Outcome> {
        let owns_tasks = claims.is_some();
        let request = self.request.take()?;
        let dispatch_started = std::time::Instant::now();
        // Opening a stream waits while the agent has all the task streams it allows open, and
        // writing the request waits while the agent reads none of it: a termination still ends
        // the host within the grace period, so both steps follow the machine's events.
        let mut cancel_seen = false;
        if owns_tasks {
            // The task's record is stored before the agent can have it: a controller that stops
            // right after the dispatch takes it up, and the agent's claim finds it. A task that
            // cannot be recorded is not sent: nothing could take it up after a restart.
            let checkpoint = self.checkpoint_of(agent_id, task_id, machine);
            let saved = self.engine.save_checkpoint_now(checkpoint);
            match self.until_done(machine, &mut cancel_seen, saved).await {
                Ok(true) => {}
                Ok(false) => {
                    drop(request);
                    let cause = match self.engine.store.health().write_error {
                        Some(error) => format!("the database refuses writes: {error}"),
                        None => "its record was lost in the store's backlog".to_owned(),
                    };
                    let why = format!(
                        "the task was not sent: the controller could not record it ({cause}), \
                         and a task it has not recorded could not be taken up after a restart"
                    );
                    tracing::error!(
                        job = self.job_instance_id,
                        bk_host_id = self.bk_host_id,
                        "{why}"
                    );
                    let actions = machine.handle(now_ms(), Event::Unsent(why));
                    return self.execute(machine, actions, &mut None, None).await;
                }
                Err(outcome) => return Some(outcome),
            }
        }
        let opened = match self
            .until_done(machine, &mut cancel_seen, connection.open_bi())
            .await
        {
            Ok(opened) => opened,
            Err(outcome) => return Some(outcome),
        };
        let (mut send, recv) = match opened {
            Ok(streams) => streams,
            Err(e) => {
                drop(request);
                let why = format!("agent unreachable: {}", describe_connection_error(&e));
                let actions = machine.handle(now_ms(), Event::Lost(why));
                return self.execute(machine, actions, &mut None, None).await;
            }
        };
        let sent = match request.frame(task_id) {
            Ok(mut frame) => {
                let write = send.write_all_chunks(&mut frame);
                match self.until_done(machine, &mut cancel_seen, write).await {
                    Ok(written) => written.map_err(|e| e.to_string()),
                    Err(outcome) => {
                        // Whatever of the request quinn still holds goes nowhere now.
                        let _ = send.reset(fleetrun_proto::close_code::SHUTDOWN.into());
                        return Some(outcome);
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        };
        // quinn keeps what it still has to (re)transmit; this host needs the request no more.
        drop(request);
        if sent.is_ok() {
            metrics::histogram!("fleetrun_dispatch_seconds").record(dispatch_started.elapsed());
        }
        let mut stream = Some(Attached {
            send,
            recv: FramedRecv::new(recv),
            connection: connection.clone(),
        });
        if let Err(e) = sent {
            let why = format!("cannot send the task to the agent: {e}");
            // An agent that owns its tasks may have it all the same: it says so if it comes back.
            let event = if owns_tasks {
                stream = None;
                Event::Detached(why)
            } else {
                Event::Lost(why)
            };
            let actions = machine.handle(now_ms(), event);
            if let Some(outcome) = self.execute(machine, actions, &mut stream, None).await {
                return Some(outcome);
            }
        }
        if cancel_seen {
            // Terminated while the request was on its way: the agent hears of it now.
            let actions = vec![Action::SendCancel];
            if let Some(outcome) = self.execute(machine, actions, &mut stream, None).await {
                return Some(outcome);
            }
        }
        self.follow(
            agent_id,
            task_id,
            machine,
            claims,
            stream,
            cancel_seen,
            last_stream,
        )
        .await
    }

    /// Follows the task to its end: reports from the attached stream, claims of the agent when
    /// it comes back, the termination and the timer.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &mut self,
        agent_id: &str,
        task_id: Uuid,
        machine: &mut HostTask,
        claims: &mut Option<mpsc::UnboundedReceiver<Reattach>>,
        mut stream: Option<Attached>,
        mut cancel_seen: bool,
        last_stream: &mut Option<Attached>,
    ) -> Option<Outcome> {
        let owns_tasks = claims.is_some();
        // What was last noted: the engine hears only of changes.
        let mut noted = None;
        if owns_tasks {
            self.note_checkpoint(agent_id, task_id, machine, &mut noted);
        }
        loop {
            let wait = until_deadline(machine);
            enum Next {
                Up(Result<Option<TaskUp>, StreamError>),
                Claim(Reattach),
                Cancel,
                Timer,
            }
            let next = tokio::select! {
                msg = next_up(&mut stream) => Next::Up(msg),
                claim = next_claim(claims) => Next::Claim(claim),
                () = self.cancel.cancelled(), if !cancel_seen => Next::Cancel,
                () = tokio::time::sleep(wait) => Next::Timer,
            };
            let mut claiming = None;
            let event = match next {
                Next::Up(Ok(Some(up))) => Event::Up(up),
                Next::Up(end) => {
                    let why = stream_end(end.err());
                    if owns_tasks {
                        stream = None;
                        tracing::info!(
                            job = self.job_instance_id,
                            bk_host_id = self.bk_host_id,
                            "task detached, waiting for the agent to come back: {why}"
                        );
                        Event::Detached(why)
                    } else {
                        Event::Lost(why)
                    }
                }
                Next::Claim(Reattach::Claim { connection, claim }) => {
                    claiming = Some(connection);
                    Event::Reattach(claim)
                }
                Next::Claim(Reattach::NotHeld) => {
                    stream = None;
                    Event::NotHeld
                }
                Next::Claim(Reattach::Fenced) => {
                    tracing::warn!(
                        job = self.job_instance_id,
                        bk_host_id = self.bk_host_id,
                        "another controller took the host over while this one could not reach \
                         the store: its writes are refused, and it stops following the task"
                    );
                    self.moved = true;
                    return None;
                }
                Next::Claim(Reattach::Moved) => {
                    if stream.is_some() {
                        // Attached here: the agent is still this controller's.
                        continue;
                    }
                    tracing::info!(
                        job = self.job_instance_id,
                        bk_host_id = self.bk_host_id,
                        "the agent took the task to another controller: followed there"
                    );
                    self.moved = true;
                    return None;
                }
                Next::Cancel => {
                    cancel_seen = true;
                    Event::Cancel
                }
                Next::Timer => Event::Timer,
            };
            let actions = machine.handle(now_ms(), event);
            if let Some(outcome) = self
                .execute(
                    machine,
                    actions,
                    &mut stream,
                    claiming.as_ref().map(|c| (c, task_id)),
                )
                .await
            {
                *last_stream = if owns_tasks { stream } else { None };
                return Some(outcome);
            }
            if owns_tasks {
                self.note_checkpoint(agent_id, task_id, machine, &mut noted);
            }
        }
    }

    /// Tells the engine where the task stands, if that changed since `noted`.
    fn note_checkpoint(
        &self,
        agent_id: &str,
        task_id: Uuid,
        machine: &HostTask,
        noted: &mut Option<Checkpoint>,
    ) {
        let now = machine.checkpoint();
        if noted.as_ref() == Some(&now) {
            return;
        }
        *noted = Some(now);
        self.engine
            .note_checkpoint(self.checkpoint_of(agent_id, task_id, machine));
    }

    fn checkpoint_of(&self, agent_id: &str, task_id: Uuid, machine: &HostTask) -> HostCheckpoint {
        let checkpoint = machine.checkpoint();
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        HostCheckpoint {
            step_instance_id: self.step_instance_id,
            bk_host_id: self.bk_host_id,
            task_id: task_id.to_string(),
            agent_id: agent_id.to_owned(),
            received: signed(checkpoint.received),
            stored: signed(checkpoint.stored),
            dropped_bytes: signed(checkpoint.dropped_bytes),
            dropped_lines: signed(checkpoint.dropped_lines),
            truncated: checkpoint.truncated,
            started_at: checkpoint.started_at,
            deadline: checkpoint.deadline,
            epoch: self.epoch,
        }
    }

    /// Runs `step` of the request's delivery while feeding the machine the termination and its
    /// timer; the step's output, or the outcome if the machine finished first.
    async fn until_done<T>(
        &self,
        machine: &mut HostTask,
        cancel_seen: &mut bool,
        step: impl Future<Output = T>,
    ) -> Result<T, Outcome> {
        let mut step = std::pin::pin!(step);
        loop {
            let wait = until_deadline(machine);
            let event = tokio::select! {
                done = &mut step => return Ok(done),
                () = self.cancel.cancelled(), if !*cancel_seen => {
                    *cancel_seen = true;
                    Event::Cancel
                }
                () = tokio::time::sleep(wait) => Event::Timer,
            };
            let actions = machine.handle(now_ms(), event);
            // No stream to send a cancel on yet: the caller sends it once the request is out.
            if let Some(outcome) = self.execute(machine, actions, &mut None, None).await {
                return Err(outcome);
            }
        }
    }

    /// Does what the machine asked, in order; the outcome once it finished. `claiming` is the
    /// connection of the agent whose claim the machine was just fed, with the task's id.
    async fn execute(
        &self,
        machine: &mut HostTask,
        actions: Vec<Action>,
        stream: &mut Option<Attached>,
        claiming: Option<(&quinn::Connection, Uuid)>,
    ) -> Option<Outcome> {
        let mut actions = VecDeque::from(actions);
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Log { offset, data } => {
                    metrics::counter!("fleetrun_output_bytes_total").increment(data.len() as u64);
                    self.record(Write::HostLog {
                        step_instance_id: self.step_instance_id,
                        bk_host_id: self.bk_host_id,
                        offset,
                        data,
                        epoch: self.epoch,
                    })
                    .await;
                }
                Action::Running { start_time } => {
                    self.record(Write::HostStatus {
                        step_instance_id: self.step_instance_id,
                        bk_host_id: self.bk_host_id,
                        status: host::RUNNING,
                        start_time: Some(start_time),
                        epoch: self.epoch,
                    })
                    .await;
                }
                Action::SendCancel => {
                    let Some(attached) = stream.as_mut() else {
                        continue;
                    };
                    // An agent that reads nothing of its stream leaves no room for the frame: the
                    // wait ends at the machine's deadline, which then passes as it would have.
                    let bound = match machine.deadline() {
                        Some(_) => until_deadline(machine),
                        None => CANCEL_SEND_WAIT,
                    };
                    let sending = send_frame(&mut attached.send, &TaskDown::Cancel);
                    match tokio::time::timeout(bound, sending).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            let why = format!("cannot send the termination to the agent: {e}");
                            actions.extend(machine.handle(now_ms(), Event::Lost(why)));
                        }
                        Err(_) => {
                            let at = machine.deadline().map_or(now_ms(), |d| d.max(now_ms()));
                            actions.extend(machine.handle(at, Event::Timer));
                        }
                    }
                }
                Action::Resume { from_offset } => {
                    let Some((connection, task_id)) = claiming else {
                        continue;
                    };
                    // The termination and the machine's deadline are followed meanwhile: an
                    // agent that takes no new stream holds up neither.
                    let (resumed, later) = self
                        .resume_until_done(machine, connection, task_id, from_offset)
                        .await;
                    if machine.is_done() {
                        actions.extend(later);
                        continue;
                    }
                    match resumed {
                        Ok(attached) => {
                            tracing::info!(
                                job = self.job_instance_id,
                                bk_host_id = self.bk_host_id,
                                from_offset,
                                "task reattached"
                            );
                            *stream = Some(attached);
                        }
                        Err(e) => {
                            *stream = None;
                            let why = format!("cannot resume the task on the agent: {e}");
                            actions.extend(machine.handle(now_ms(), Event::Detached(why)));
                        }
                    }
                    // A termination seen while resuming goes on the new stream.
                    actions.extend(later);
                }
                Action::Discard { reason } => {
                    tracing::warn!(
                        job = self.job_instance_id,
                        bk_host_id = self.bk_host_id,
                        "refused the agent's claim to the task, nothing of it is stored: {reason}"
                    );
                    if let Some((connection, task_id)) = claiming {
                        discard(connection.clone(), task_id);
                    }
                }
                Action::Finish(outcome) => {
                    if matches!(outcome.status, host::AGENT_TIMEOUT | host::AGENT_ABNORMAL) {
                        tracing::warn!(
                            step = self.step_instance_id,
                            bk_host_id = self.bk_host_id,
                            status = outcome.status,
                            "{}",
                            outcome.tag
                        );
                    }
                    if machine.over_limit() > 0 {
                        tracing::warn!(
                            step = self.step_instance_id,
                            bk_host_id = self.bk_host_id,
                            dropped = machine.over_limit(),
                            output_limit = self.limits.output_limit,
                            "the agent sent more output than the limit; the excess was dropped"
                        );
                    }
                    return Some(outcome);
                }
            }
        }
        None
    }
}

impl HostRun {
    /// Resumes the task on the reconnected agent (see [`resume`]) within [`RESUME_WAIT`], while
    /// feeding the machine the termination and its timer: the resume's result (an error if the
    /// machine finished first) and the actions those events asked for, to follow it.
    async fn resume_until_done(
        &self,
        machine: &mut HostTask,
        connection: &quinn::Connection,
        task_id: Uuid,
        from_offset: u64,
    ) -> (Result<Attached, String>, Vec<Action>) {
        let mut later = Vec::new();
        let resuming = tokio::time::timeout(RESUME_WAIT, resume(connection, task_id, from_offset));
        let mut resuming = std::pin::pin!(resuming);
        loop {
            let wait = until_deadline(machine);
            let event = tokio::select! {
                resumed = &mut resuming => {
                    let resumed = resumed.unwrap_or_else(|_| {
                        Err(format!("the agent took no new stream within {RESUME_WAIT:?}"))
                    });
                    return (resumed, later);
                }
                () = self.cancel.cancelled(), if !machine.is_cancelled() => Event::Cancel,
                () = tokio::time::sleep(wait) => Event::Timer,
            };
            later.extend(machine.handle(now_ms(), event));
            if machine.is_done() {
                let why = "the task ended while it was being resumed".to_owned();
                return (Err(why), later);
            }
        }
    }
}

/// Opens a new task stream on the reconnected agent's connection and asks it to continue the
/// task from `from_offset`.
async fn resume(
    connection: &quinn::Connection,
    task_id: Uuid,
    from_offset: u64,
) -> Result<Attached, String> {
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| describe_connection_error(&e))?;
    send_frame(
        &mut send,
        &TaskDown::Resume {
            task_id,
            from_offset,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Attached {
        send,
        recv: FramedRecv::new(recv),
        connection: connection.clone(),
    })
}
