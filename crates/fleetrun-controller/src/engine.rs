//! The job engine: sends each host its task, follows it to a final state, and records everything.
//!
//! **Architecture invariant:** every (job, host) the engine starts reaches a final host status:
//! a result from the agent, or 310 when the agent is offline or its connection is lost, or 303
//! when the agent stays silent past the task's timeout plus a grace period.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fleetrun_net::{FramedRecv, describe_connection_error, send_frame};
use fleetrun_proto::{SharedTaskRequest, TaskDown, TaskRequest, TaskUp};
use fleetrun_store::{HostOutcome, Store, Write};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    callback::Callbacks,
    gateway::Agents,
    host_run::{Action, Event, HostTask, Limits, Outcome},
    status::{host, job},
};

/// The engine's clock, in milliseconds since the epoch: the system clock as it read when the
/// engine first asked, advanced since by the monotonic clock. Deadlines are kept in these
/// milliseconds, so a step of the system clock (an NTP correction, an operator's `date`) neither
/// times tasks out early nor holds them past their deadline.
fn now_ms() -> i64 {
    static ANCHOR: LazyLock<(i64, Instant)> = LazyLock::new(|| (crate::now_ms(), Instant::now()));
    let elapsed = i64::try_from(ANCHOR.1.elapsed().as_millis()).unwrap_or(i64::MAX);
    ANCHOR.0.saturating_add(elapsed)
}

/// A script as the API holds it, lent to the task's encoding without a copy.
struct SharedScript(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedScript {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// A job ready to run, as created by the API.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub hosts: Vec<i64>,
    pub task: TaskTemplate,
}

/// What every host of a step runs.
#[derive(Clone)]
pub struct TaskTemplate {
    pub script_language: i32,
    pub script: Arc<Vec<u8>>,
    pub script_param: String,
    pub is_param_sensitive: bool,
    pub account: String,
    pub timeout_secs: u32,
}

impl std::fmt::Debug for TaskTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskTemplate")
            .field("script_language", &self.script_language)
            .field("account", &self.account)
            .field("timeout_secs", &self.timeout_secs)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Engine {
    store: Store,
    agents: Agents,
    output_limit: u64,
    agent_grace: Duration,
    running: Arc<Mutex<HashMap<i64, CancellationToken>>>,
    /// Told of every job's end, for its callback.
    callbacks: Option<Callbacks>,
}

impl Engine {
    pub fn new(store: Store, agents: Agents, output_limit: u64, agent_grace: Duration) -> Self {
        Self {
            store,
            agents,
            output_limit,
            agent_grace,
            running: Arc::default(),
            callbacks: None,
        }
    }

    /// Reports every job's end to the callback dispatcher.
    pub fn with_callbacks(mut self, callbacks: Callbacks) -> Self {
        self.callbacks = Some(callbacks);
        self
    }

    /// Starts the job in the background; false if it is running already.
    pub fn start(&self, spec: JobSpec) -> bool {
        let cancel = CancellationToken::new();
        let job_instance_id = spec.job_instance_id;
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job_instance_id) {
                return false;
            }
            running.insert(job_instance_id, cancel.clone());
        }
        let engine = self.clone();
        tokio::spawn(async move {
            engine.run_job(spec, cancel).await;
            // The job leaves the running set only once its final state is committed, so nobody
            // sees it neither running nor finished.
            if let Err(e) = engine.store.flush().await {
                tracing::error!(job = job_instance_id, "cannot commit the job's end: {e}");
            }
            engine.running.lock().unwrap().remove(&job_instance_id);
        });
        true
    }

    /// Asks a running job to stop: every host's process tree is killed. The job shows
    /// "terminating" until every host has reported. False if the job is not running here.
    pub async fn terminate(&self, job_instance_id: i64) -> bool {
        let cancel = self.running.lock().unwrap().get(&job_instance_id).cloned();
        let Some(cancel) = cancel else { return false };
        if !cancel.is_cancelled() {
            cancel.cancel();
            self.write(Write::JobStatus {
                job_instance_id,
                status: job::TERMINATING,
            })
            .await;
        }
        true
    }

    async fn run_job(&self, spec: JobSpec, cancel: CancellationToken) {
        let JobSpec {
            job_instance_id,
            step_instance_id,
            hosts: targets,
            task,
        } = spec;
        let started = now_ms();
        self.write(Write::JobStarted {
            job_instance_id,
            step_instance_id,
            status: job::RUNNING,
            at: started,
        })
        .await;
        let TaskTemplate {
            script_language,
            script,
            script_param,
            is_param_sensitive,
            account,
            timeout_secs,
        } = task;
        let limits = Limits {
            output_limit: self.output_limit,
            timeout_ms: i64::from(timeout_secs) * 1000,
            grace_ms: i64::try_from(self.agent_grace.as_millis()).unwrap_or(i64::MAX),
        };
        // Encoded once for all the hosts: each host's run holds a reference to it until its
        // request is sent, so the script's memory does not grow with the number of hosts.
        let request = SharedTaskRequest::new(
            TaskRequest {
                task_id: Uuid::nil(),
                job_instance_id,
                step_instance_id,
                script_language,
                script: Vec::new(),
                script_param,
                is_param_sensitive,
                account,
                timeout_secs,
                output_limit: self.output_limit,
                windows_interpreter: None,
            },
            Bytes::from_owner(SharedScript(script)),
        );
        let request = match request {
            Ok(request) => Some(request),
            Err(e) => {
                tracing::error!(job = job_instance_id, "cannot encode the task: {e}");
                None
            }
        };
        let mut hosts = JoinSet::new();
        let mut host_of_task = HashMap::with_capacity(targets.len());
        for bk_host_id in targets.iter().copied() {
            let run = HostRun {
                engine: self.clone(),
                step_instance_id,
                bk_host_id,
                request: request.clone(),
                limits,
                cancel: cancel.clone(),
            };
            let handle = hosts.spawn(run.run());
            host_of_task.insert(handle.id(), bk_host_id);
        }
        drop(request);
        let mut all_succeeded = true;
        while let Some(joined) = hosts.join_next_with_id().await {
            match joined {
                Ok((_, status)) => all_succeeded &= host::is_success(status),
                Err(e) => {
                    // The host's run died before recording a final status: record one for it,
                    // so no host stays waiting or running forever.
                    all_succeeded = false;
                    let bk_host_id = host_of_task.get(&e.id()).copied().unwrap_or_default();
                    tracing::error!(job = job_instance_id, bk_host_id, "host task failed: {e}");
                    self.write(Write::HostFinished {
                        step_instance_id,
                        bk_host_id,
                        outcome: HostOutcome {
                            status: host::AGENT_TASK_ERROR,
                            tag: "internal error in the controller while following this host"
                                .into(),
                            end_time: now_ms(),
                            ..HostOutcome::default()
                        },
                    })
                    .await;
                }
            }
        }
        let status = if cancel.is_cancelled() {
            job::TERMINATE_SUCCESS
        } else if all_succeeded {
            job::SUCCESS
        } else {
            job::FAILED
        };
        let at = now_ms();
        self.write(Write::StepFinished {
            step_instance_id,
            status,
            at,
        })
        .await;
        self.write(Write::JobFinished {
            job_instance_id,
            status,
            at,
        })
        .await;
        crate::metrics::job_finished(status, at - started);
        if let Some(callbacks) = &self.callbacks {
            callbacks.job_ended(job_instance_id);
        }
        tracing::info!(
            job = job_instance_id,
            hosts = targets.len(),
            status,
            elapsed_ms = at - started,
            "job finished"
        );
    }

    async fn write(&self, write: Write) {
        if let Err(e) = self.store.record(write).await {
            tracing::error!("cannot record job progress: {e}");
        }
    }
}

/// How long a cancel for a task that already has its final status may wait for room on the
/// stream: the agent is told if it reads, and the host's result is not held up if it does not.
const CANCEL_SEND_WAIT: Duration = Duration::from_secs(1);

/// The time until the machine's deadline; a year, standing for never, when it has none.
fn until_deadline(machine: &HostTask) -> Duration {
    match machine.deadline() {
        Some(deadline) => Duration::from_millis(u64::try_from(deadline - now_ms()).unwrap_or(0)),
        None => Duration::from_secs(365 * 24 * 3600),
    }
}

/// One host's part of a job: moves frames between the task stream and the host's [`HostTask`],
/// and does what it says.
struct HostRun {
    engine: Engine,
    step_instance_id: i64,
    bk_host_id: i64,
    /// The step's request; taken once sent, so the script lives only while hosts still need it.
    request: Option<SharedTaskRequest>,
    limits: Limits,
    cancel: CancellationToken,
}

impl HostRun {
    /// Runs the host's task to a final status and returns it.
    async fn run(mut self) -> i32 {
        let mut machine = HostTask::new(self.limits, now_ms());
        let link = self.engine.agents.get(self.bk_host_id);
        let outcome = match link {
            None => {
                self.request = None;
                let event = Event::Lost("agent offline when the task was dispatched".into());
                let actions = machine.handle(now_ms(), event);
                self.execute(&mut machine, actions, None).await
            }
            Some(link) => self.exchange(&link.connection, &mut machine).await,
        };
        // The machine always finishes on a lost agent; a missing outcome would be a bug in it.
        let outcome = outcome.unwrap_or_else(|| Outcome {
            status: host::AGENT_TASK_ERROR,
            tag: "internal error in the controller while following this host".into(),
            end_time: now_ms(),
            ..Outcome::default()
        });
        let status = outcome.status;
        crate::metrics::host_finished(status);
        self.engine
            .write(Write::HostFinished {
                step_instance_id: self.step_instance_id,
                bk_host_id: self.bk_host_id,
                outcome: outcome.into(),
            })
            .await;
        status
    }

    async fn exchange(
        &mut self,
        connection: &quinn::Connection,
        machine: &mut HostTask,
    ) -> Option<Outcome> {
        let request = self.request.take()?;
        let dispatch_started = std::time::Instant::now();
        // Opening a stream waits while the agent has all the task streams it allows open, and
        // writing the request waits while the agent reads none of it: a termination still ends
        // the host within the grace period, so both steps follow the machine's events.
        let mut cancel_seen = false;
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
                return self.execute(machine, actions, None).await;
            }
        };
        let sent = match request.frame(Uuid::new_v4()) {
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
        if let Err(e) = sent {
            let why = format!("cannot send the task to the agent: {e}");
            let actions = machine.handle(now_ms(), Event::Lost(why));
            return self.execute(machine, actions, Some(&mut send)).await;
        }
        metrics::histogram!("fleetrun_dispatch_seconds").record(dispatch_started.elapsed());
        if cancel_seen {
            // Terminated while the request was on its way: the agent hears of it now.
            let actions = vec![Action::SendCancel];
            if let Some(outcome) = self.execute(machine, actions, Some(&mut send)).await {
                return Some(outcome);
            }
        }
        let mut recv = FramedRecv::new(recv);
        let mut cancel_seen = false;
        loop {
            let wait = until_deadline(machine);
            let event = tokio::select! {
                msg = recv.recv::<TaskUp>() => match msg {
                    Ok(Some(up)) => Event::Up(up),
                    Ok(None) => Event::Lost("the agent closed the task stream without a result".into()),
                    Err(e) => Event::Lost(match e.connection_error() {
                        Some(conn) => {
                            format!("agent connection lost: {}", describe_connection_error(conn))
                        }
                        None => format!("agent task stream failed: {e}"),
                    }),
                },
                () = self.cancel.cancelled(), if !cancel_seen => {
                    cancel_seen = true;
                    Event::Cancel
                }
                () = tokio::time::sleep(wait) => Event::Timer,
            };
            let actions = machine.handle(now_ms(), event);
            if let Some(outcome) = self.execute(machine, actions, Some(&mut send)).await {
                return Some(outcome);
            }
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
            if let Some(outcome) = self.execute(machine, actions, None).await {
                return Err(outcome);
            }
        }
    }

    /// Does what the machine asked, in order; the outcome once it finished.
    async fn execute(
        &self,
        machine: &mut HostTask,
        actions: Vec<Action>,
        mut send: Option<&mut quinn::SendStream>,
    ) -> Option<Outcome> {
        let mut actions = std::collections::VecDeque::from(actions);
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Log { offset, data } => {
                    metrics::counter!("fleetrun_output_bytes_total").increment(data.len() as u64);
                    self.engine
                        .write(Write::HostLog {
                            step_instance_id: self.step_instance_id,
                            bk_host_id: self.bk_host_id,
                            offset,
                            data,
                        })
                        .await;
                }
                Action::Running { start_time } => {
                    self.engine
                        .write(Write::HostStatus {
                            step_instance_id: self.step_instance_id,
                            bk_host_id: self.bk_host_id,
                            status: host::RUNNING,
                            start_time: Some(start_time),
                        })
                        .await;
                }
                Action::SendCancel => {
                    let Some(send) = send.as_deref_mut() else {
                        continue;
                    };
                    // An agent that reads nothing of its stream leaves no room for the frame: the
                    // wait ends at the machine's deadline, which then passes as it would have.
                    let bound = match machine.deadline() {
                        Some(_) => until_deadline(machine),
                        None => CANCEL_SEND_WAIT,
                    };
                    match tokio::time::timeout(bound, send_frame(send, &TaskDown::Cancel)).await {
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
