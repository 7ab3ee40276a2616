//! The job engine: sends each host its task, follows it to a final state, and records everything.
//!
//! **Architecture invariant:** every (job, host) the engine starts reaches a final host status:
//! a result from the agent, or 310 when the agent is offline or its connection is lost, or 303
//! when the agent stays silent past the task's timeout plus a grace period.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetrun_net::{FramedRecv, describe_connection_error, send_frame};
use fleetrun_proto::{Ending, TaskDown, TaskRequest, TaskResult, TaskUp};
use fleetrun_store::{HostOutcome, Store, Write};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    callback::Callbacks,
    gateway::Agents,
    now_ms,
    status::{host, job},
};

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
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&spec.job_instance_id) {
                return false;
            }
            running.insert(spec.job_instance_id, cancel.clone());
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let job_instance_id = spec.job_instance_id;
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
        let started = now_ms();
        self.write(Write::JobStarted {
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            status: job::RUNNING,
            at: started,
        })
        .await;
        let mut hosts = JoinSet::new();
        let mut host_of_task = HashMap::with_capacity(spec.hosts.len());
        for bk_host_id in spec.hosts.iter().copied() {
            let run = HostRun {
                engine: self.clone(),
                job_instance_id: spec.job_instance_id,
                step_instance_id: spec.step_instance_id,
                bk_host_id,
                task: spec.task.clone(),
                cancel: cancel.clone(),
            };
            let handle = hosts.spawn(run.run());
            host_of_task.insert(handle.id(), bk_host_id);
        }
        let mut all_succeeded = true;
        while let Some(joined) = hosts.join_next_with_id().await {
            match joined {
                Ok((_, status)) => all_succeeded &= host::is_success(status),
                Err(e) => {
                    // The host's run died before recording a final status: record one for it,
                    // so no host stays waiting or running forever.
                    all_succeeded = false;
                    let bk_host_id = host_of_task.get(&e.id()).copied().unwrap_or_default();
                    tracing::error!(
                        job = spec.job_instance_id,
                        bk_host_id,
                        "host task failed: {e}"
                    );
                    self.write(Write::HostFinished {
                        step_instance_id: spec.step_instance_id,
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
            step_instance_id: spec.step_instance_id,
            status,
            at,
        })
        .await;
        self.write(Write::JobFinished {
            job_instance_id: spec.job_instance_id,
            status,
            at,
        })
        .await;
        if let Some(callbacks) = &self.callbacks {
            callbacks.job_ended(spec.job_instance_id);
        }
        tracing::info!(
            job = spec.job_instance_id,
            hosts = spec.hosts.len(),
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

/// One host's part of a job.
struct HostRun {
    engine: Engine,
    job_instance_id: i64,
    step_instance_id: i64,
    bk_host_id: i64,
    task: TaskTemplate,
    cancel: CancellationToken,
}

/// What the engine learned about a host's task, beyond the agent's result.
#[derive(Default)]
struct HostLog {
    /// Bytes stored so far in the host's log.
    stored: i64,
    /// Bytes of the agent's output received so far.
    received: u64,
    started_at: Option<i64>,
    dropped_bytes: u64,
    dropped_lines: u64,
}

impl HostRun {
    /// Runs the host's task to a final status and returns it.
    async fn run(self) -> i32 {
        let mut log = HostLog::default();
        let outcome = match self.engine.agents.get(self.bk_host_id) {
            None => self.abnormal("agent offline when the task was dispatched"),
            Some(link) => self.exchange(&link.connection, &mut log).await,
        };
        let mut outcome = outcome;
        outcome.start_time = outcome.start_time.or(log.started_at);
        if !outcome.tag.is_empty() {
            let line = format!("[fleetrun] {}\n", outcome.tag);
            self.append(&mut log, line.into_bytes()).await;
        }
        let status = outcome.status;
        self.engine
            .write(Write::HostFinished {
                step_instance_id: self.step_instance_id,
                bk_host_id: self.bk_host_id,
                outcome,
            })
            .await;
        status
    }

    fn abnormal(&self, why: impl Into<String>) -> HostOutcome {
        HostOutcome {
            status: host::AGENT_ABNORMAL,
            tag: why.into(),
            end_time: now_ms(),
            ..HostOutcome::default()
        }
    }

    async fn exchange(&self, connection: &quinn::Connection, log: &mut HostLog) -> HostOutcome {
        let (mut send, recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                return self.abnormal(format!(
                    "agent unreachable: {}",
                    describe_connection_error(&e)
                ));
            }
        };
        let request = TaskDown::Run(TaskRequest {
            task_id: Uuid::new_v4(),
            job_instance_id: self.job_instance_id,
            step_instance_id: self.step_instance_id,
            script_language: self.task.script_language,
            script: self.task.script.as_ref().clone(),
            script_param: self.task.script_param.clone(),
            is_param_sensitive: self.task.is_param_sensitive,
            account: self.task.account.clone(),
            timeout_secs: self.task.timeout_secs,
            output_limit: self.engine.output_limit,
            windows_interpreter: None,
        });
        if let Err(e) = send_frame(&mut send, &request).await {
            return self.abnormal(format!("cannot send the task to the agent: {e}"));
        }
        let mut recv = FramedRecv::new(recv);
        let deadline = tokio::time::sleep(
            Duration::from_secs(u64::from(self.task.timeout_secs)) + self.engine.agent_grace,
        );
        tokio::pin!(deadline);
        let mut cancel_sent = false;
        loop {
            let msg = tokio::select! {
                msg = recv.recv::<TaskUp>() => msg,
                () = self.cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    if let Err(e) = send_frame(&mut send, &TaskDown::Cancel).await {
                        return self.abnormal(format!("cannot send the termination to the agent: {e}"));
                    }
                    continue;
                }
                () = &mut deadline => {
                    let _ = send_frame(&mut send, &TaskDown::Cancel).await;
                    return HostOutcome {
                        status: host::AGENT_TIMEOUT,
                        tag: "the agent sent no result within the task's timeout plus the grace period".into(),
                        end_time: now_ms(),
                        ..HostOutcome::default()
                    };
                }
            };
            match msg {
                Ok(Some(TaskUp::Started { started_at_ms })) => {
                    log.started_at = Some(started_at_ms);
                    self.engine
                        .write(Write::HostStatus {
                            step_instance_id: self.step_instance_id,
                            bk_host_id: self.bk_host_id,
                            status: host::RUNNING,
                            start_time: Some(started_at_ms),
                        })
                        .await;
                }
                Ok(Some(TaskUp::Output { offset, data })) => self.output(log, offset, data).await,
                Ok(Some(TaskUp::Truncated {
                    dropped_bytes,
                    dropped_lines,
                })) => {
                    log.dropped_bytes += dropped_bytes;
                    log.dropped_lines += dropped_lines;
                    let marker = format!(
                        "\n[fleetrun] output truncated here: {dropped_bytes} bytes in {dropped_lines} lines dropped\n"
                    );
                    self.append(log, marker.into_bytes()).await;
                }
                Ok(Some(TaskUp::Finished(result))) => return host_outcome(result, log),
                Ok(None) => {
                    return self.abnormal("the agent closed the task stream without a result");
                }
                Err(e) => {
                    let why = match e.connection_error() {
                        Some(conn) => {
                            format!("agent connection lost: {}", describe_connection_error(conn))
                        }
                        None => format!("agent task stream failed: {e}"),
                    };
                    return self.abnormal(why);
                }
            }
        }
    }

    /// Stores a chunk of output, dropping whatever the agent sends twice.
    async fn output(&self, log: &mut HostLog, offset: u64, data: Vec<u8>) {
        let end = offset + data.len() as u64;
        if end <= log.received {
            return;
        }
        let data = if offset < log.received {
            data[(log.received - offset) as usize..].to_vec()
        } else {
            if offset > log.received {
                let gap = format!(
                    "\n[fleetrun] {} bytes of output lost in transit\n",
                    offset - log.received
                );
                self.append(log, gap.into_bytes()).await;
            }
            data
        };
        log.received = end;
        self.append(log, data).await;
    }

    async fn append(&self, log: &mut HostLog, data: Vec<u8>) {
        let offset = log.stored;
        log.stored += data.len() as i64;
        self.engine
            .write(Write::HostLog {
                step_instance_id: self.step_instance_id,
                bk_host_id: self.bk_host_id,
                offset,
                data,
            })
            .await;
    }
}

/// Maps the agent's result to bk-job's host status.
fn host_outcome(result: TaskResult, log: &HostLog) -> HostOutcome {
    let (status, exit_code) = match result.ending {
        Ending::Exited { code: 0 } => (host::SUCCESS, Some(0)),
        Ending::Exited { code } => (host::NON_ZERO_EXIT, Some(code)),
        // Shells report a death by signal N as 128 + N; so do we.
        Ending::Signaled { signal } => (host::SCRIPT_FAILED, Some(128 + signal)),
        Ending::TimedOut => (host::SCRIPT_TIMEOUT, None),
        Ending::Cancelled => (host::TERMINATE_SUCCESS, None),
        Ending::UserNotFound => (host::USER_NOT_EXIST, None),
        Ending::InterpreterMissing => (host::SCRIPT_FAILED, None),
        Ending::Failed => (host::AGENT_TASK_ERROR, None),
    };
    HostOutcome {
        status,
        tag: result.message.unwrap_or_default(),
        exit_code,
        error_code: 0,
        start_time: Some(result.started_at_ms).or(log.started_at),
        end_time: result.finished_at_ms,
        output_bytes: result.output_bytes as i64,
        dropped_bytes: log.dropped_bytes as i64,
        dropped_lines: log.dropped_lines as i64,
        survivors: i64::from(result.survivors),
    }
}
