//! The job engine: sends each host its task, follows it to a final state, and records everything.
//!
//! **Architecture invariant:** every (job, host) the engine starts reaches a final host status:
//! a result from the agent, or 310 when the agent is offline, its connection is lost (an agent
//! of protocol version 1), or it does not come back before the task's deadline (an agent that
//! owns its tasks), or 16 when the agent stays silent past the task's timeout plus a grace
//! period.

mod follow;
mod rolling;

pub use rolling::RollingStart;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fleetrun_proto::{HeldTask, SharedTaskRequest, TaskRequest};
use fleetrun_store::{HostCheckpoint, HostOutcome, ResumableJob, Store, Write};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    callback::Callbacks,
    gateway::Agents,
    host_run::{Claim, Limits},
    status::{host, job},
};
use follow::HostRun;

/// Each task's checkpoint by (step, host), and whether it changed since it was last saved.
type Checkpoints = Mutex<HashMap<(i64, i64), (HostCheckpoint, bool)>>;

/// What the end of a job needs to know.
#[derive(Debug, Clone, Copy)]
struct Finishing {
    job_instance_id: i64,
    step_instance_id: i64,
    hosts: usize,
    started: i64,
    /// Whether every host final before these runs succeeded.
    all_succeeded: bool,
}

/// What a reconnected agent said of a task, on its way to the host's run.
#[derive(Debug)]
enum Reattach {
    /// It holds the task and claims it.
    Claim {
        connection: quinn::Connection,
        claim: Claim,
    },
    /// Its report of the tasks it holds leaves this one out: it never received it, or lost it.
    NotHeld,
}

/// Who may claim a task that is out on an agent, and where the claim goes.
#[derive(Debug)]
struct Claimant {
    bk_host_id: i64,
    agent_id: String,
    tx: mpsc::UnboundedSender<Reattach>,
}

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
    /// Tasks out on agents that own them, by task id, while their host's run follows them.
    claims: Arc<Mutex<HashMap<Uuid, Claimant>>>,
    /// Where each such task stands, by (step, host), and whether that changed since it was
    /// last saved.
    checkpoints: Arc<Checkpoints>,
    /// Claims to the tasks of jobs taken up at start, registered before the gateway accepts an
    /// agent and kept here until the host's run picks them up: an agent that reconnects first
    /// finds its claim waiting, not refused.
    prepared: Arc<Mutex<HashMap<Uuid, mpsc::UnboundedReceiver<Reattach>>>>,
    /// Runs waiting for their checkpoint to be saved now rather than at the next tick.
    save_now: Arc<SaveNow>,
    /// With controllers sharing the database: the leases on jobs' bookkeeping.
    membership: Option<crate::cluster::Membership>,
    /// Jobs whose lease a handler took for a run about to start here (before the job's status
    /// says it runs): the lease is not given up meanwhile.
    starting: Arc<Mutex<HashSet<i64>>>,
    /// Runs here whose job another controller took up (this one lost the lease): they go on
    /// following the agents' tasks but record nothing and end nothing.
    abandoned: Arc<Mutex<HashSet<i64>>>,
}

/// Asks the checkpoint saver for a save at once; each waiter hears when a save that includes
/// what it noted before asking is done.
#[derive(Debug, Default)]
struct SaveNow {
    wake: tokio::sync::Notify,
    waiters: Mutex<Vec<tokio::sync::oneshot::Sender<()>>>,
}

/// How long a dispatch waits for its checkpoint to be saved before it goes ahead regardless.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(5);

impl Engine {
    pub fn new(store: Store, agents: Agents, output_limit: u64, agent_grace: Duration) -> Self {
        Self {
            store,
            agents,
            output_limit,
            agent_grace,
            running: Arc::default(),
            callbacks: None,
            claims: Arc::default(),
            checkpoints: Arc::default(),
            prepared: Arc::default(),
            save_now: Arc::default(),
            membership: None,
            starting: Arc::default(),
            abandoned: Arc::default(),
        }
    }

    /// Holds a lease on the bookkeeping of each job it runs (controllers sharing a database).
    pub fn with_membership(mut self, membership: Option<crate::cluster::Membership>) -> Self {
        self.membership = membership;
        self
    }

    /// Whether a run of the job is in this engine.
    pub fn is_running(&self, job_instance_id: i64) -> bool {
        self.running.lock().unwrap().contains_key(&job_instance_id)
    }

    /// Takes the job's lease for a run starting here; false (and the run is not made) if
    /// another controller holds it or the database cannot say.
    async fn take_lease(&self, job_instance_id: i64) -> bool {
        let Some(membership) = &self.membership else {
            return true;
        };
        match membership.take(job_instance_id).await {
            Ok(true) => return true,
            Ok(false) => tracing::warn!(
                job = job_instance_id,
                "another controller holds this job's lease: not run here"
            ),
            Err(e) => tracing::error!(
                job = job_instance_id,
                "cannot take this job's lease, not run here: {e:#}"
            ),
        }
        false
    }

    /// Takes the job's lease before a handler marks the job running and starts it, so that no
    /// controller takes a job up in between; false if another controller holds it. Followed by
    /// [`Engine::start`] / [`Engine::start_rolling`], or by [`Engine::lease_unused`].
    pub async fn lease_for_start(&self, job_instance_id: i64) -> bool {
        self.starting.lock().unwrap().insert(job_instance_id);
        if self.take_lease(job_instance_id).await {
            return true;
        }
        self.starting.lock().unwrap().remove(&job_instance_id);
        false
    }

    /// Gives up a lease taken by [`Engine::lease_for_start`] for a start that did not happen.
    pub async fn lease_unused(&self, job_instance_id: i64) {
        self.starting.lock().unwrap().remove(&job_instance_id);
        self.release_lease(job_instance_id).await;
    }

    /// Whether the run of the job here was abandoned to another controller.
    fn is_abandoned(&self, job_instance_id: i64) -> bool {
        self.abandoned.lock().unwrap().contains(&job_instance_id)
    }

    /// Abandons the run of the job here, if any, to the controller that took its lease: the
    /// run records nothing more, ends nothing, and starts no further batch. Its hosts' runs go
    /// on following the agents' tasks without cancelling them (the tasks are the other
    /// controller's now) until they end.
    pub(crate) fn abandon(&self, job_instance_id: i64) {
        let running = self.running.lock().unwrap();
        if running.contains_key(&job_instance_id) {
            self.abandoned.lock().unwrap().insert(job_instance_id);
            tracing::warn!(
                job = job_instance_id,
                "another controller took this job's lease: its run here records nothing more"
            );
        }
    }

    /// Called once a run of the job left the running set.
    fn run_left(&self, job_instance_id: i64) {
        self.abandoned.lock().unwrap().remove(&job_instance_id);
    }

    /// Gives the job's lease up once its run here left the running set (its end or pause
    /// committed).
    async fn release_lease(&self, job_instance_id: i64) {
        if let Some(membership) = &self.membership {
            membership
                .release(job_instance_id, || {
                    self.is_running(job_instance_id)
                        || self.starting.lock().unwrap().contains(&job_instance_id)
                })
                .await;
        }
    }

    /// Reports every job's end to the callback dispatcher.
    pub fn with_callbacks(mut self, callbacks: Callbacks) -> Self {
        self.callbacks = Some(callbacks);
        self
    }

    /// Where job ends are reported, if anywhere.
    pub(crate) fn callbacks(&self) -> Option<&Callbacks> {
        self.callbacks.as_ref()
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
            let leased = engine.take_lease(job_instance_id).await;
            engine.starting.lock().unwrap().remove(&job_instance_id);
            if !leased {
                engine.running.lock().unwrap().remove(&job_instance_id);
                engine.run_left(job_instance_id);
                engine.release_lease(job_instance_id).await;
                return;
            }
            engine.run_job(spec, cancel).await;
            // The job leaves the running set only once its final state is committed, so nobody
            // sees it neither running nor finished.
            if let Err(e) = engine.store.flush().await {
                tracing::error!(job = job_instance_id, "cannot commit the job's end: {e}");
            }
            engine.running.lock().unwrap().remove(&job_instance_id);
            engine.run_left(job_instance_id);
            engine.release_lease(job_instance_id).await;
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
            self.write_for(
                job_instance_id,
                Write::JobStatus {
                    job_instance_id,
                    status: job::TERMINATING,
                },
            )
            .await;
        }
        true
    }

    /// Saves, every second, where each task out on an agent that owns it stands, once the log
    /// that describes is committed; a last time when `shutdown` fires.
    pub fn save_checkpoints(
        &self,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let engine = self.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    () = engine.save_now.wake.notified() => false,
                    () = shutdown.cancelled() => true,
                };
                // Taken before the batch: each of them noted its checkpoint before it asked.
                let waiters = std::mem::take(&mut *engine.save_now.waiters.lock().unwrap());
                let batch: Vec<HostCheckpoint> = {
                    let mut checkpoints = engine.checkpoints.lock().unwrap();
                    checkpoints
                        .values_mut()
                        .filter(|(_, dirty)| *dirty)
                        .map(|(checkpoint, dirty)| {
                            *dirty = false;
                            checkpoint.clone()
                        })
                        .collect()
                };
                if !batch.is_empty() {
                    // The log the checkpoints describe was queued before they were taken.
                    let saved = match engine.store.flush().await {
                        Ok(()) => engine.store.save_checkpoints(&batch).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = saved {
                        tracing::warn!("cannot save where running tasks stand: {e}");
                    }
                }
                for waiter in waiters {
                    let _ = waiter.send(());
                }
                if stopping {
                    return;
                }
            }
        }
    }

    fn note_checkpoint(&self, checkpoint: HostCheckpoint) {
        let key = (checkpoint.step_instance_id, checkpoint.bk_host_id);
        let mut checkpoints = self.checkpoints.lock().unwrap();
        match checkpoints.get_mut(&key) {
            Some((old, _)) if *old == checkpoint => {}
            _ => {
                checkpoints.insert(key, (checkpoint, true));
            }
        }
    }

    /// Notes `checkpoint` and returns once it is saved (with the checkpoints of other runs that
    /// asked meanwhile, in one transaction), or after [`CHECKPOINT_WAIT`] if the saver is slow.
    async fn save_checkpoint_now(&self, checkpoint: HostCheckpoint) {
        self.note_checkpoint(checkpoint);
        let (done, saved) = tokio::sync::oneshot::channel();
        self.save_now.waiters.lock().unwrap().push(done);
        self.save_now.wake.notify_one();
        if tokio::time::timeout(CHECKPOINT_WAIT, saved).await.is_err() {
            tracing::warn!(
                "the task's checkpoint was not saved within {CHECKPOINT_WAIT:?}; dispatching it \
                 all the same"
            );
        }
    }

    fn forget_checkpoint(&self, step_instance_id: i64, bk_host_id: i64) {
        self.checkpoints
            .lock()
            .unwrap()
            .remove(&(step_instance_id, bk_host_id));
    }

    /// Takes up a job that was running when the controller stopped: each host whose task is out
    /// on an agent that owns it waits for that agent to come back and claim it; any other ends
    /// 310, its result unknown. False if the job is running already.
    pub fn resume(&self, job: ResumableJob) -> bool {
        let cancel = CancellationToken::new();
        let job_instance_id = job.job_instance_id;
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job_instance_id) {
                return false;
            }
            running.insert(job_instance_id, cancel.clone());
        }
        if job.status == job::TERMINATING {
            cancel.cancel();
        }
        for checkpoint in job.hosts.iter().filter_map(|h| {
            h.checkpoint
                .as_ref()
                .map(|checkpoint| (h.bk_host_id, checkpoint))
        }) {
            let (bk_host_id, checkpoint) = checkpoint;
            let Ok(task_id) = checkpoint.task_id.parse::<Uuid>() else {
                continue;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            self.claims.lock().unwrap().insert(
                task_id,
                Claimant {
                    bk_host_id,
                    agent_id: checkpoint.agent_id.clone(),
                    tx,
                },
            );
            self.prepared.lock().unwrap().insert(task_id, rx);
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let registered = engine.resume_job(job, cancel).await;
            if let Err(e) = engine.store.flush().await {
                tracing::error!(job = job_instance_id, "cannot commit the job's end: {e}");
            }
            if registered {
                engine.running.lock().unwrap().remove(&job_instance_id);
                engine.run_left(job_instance_id);
            }
            engine.release_lease(job_instance_id).await;
        });
        true
    }

    /// False if the job paused (a rolling one) and so left the running set.
    async fn resume_job(&self, mut job: ResumableJob, cancel: CancellationToken) -> bool {
        // A rolling job takes up the batch that was out; later batches wait for an operator.
        let rolling = self.rolling_in_flight(&mut job).await;
        let limits = Limits {
            output_limit: self.output_limit,
            timeout_ms: job.timeout_secs.saturating_mul(1000),
            grace_ms: i64::try_from(self.agent_grace.as_millis()).unwrap_or(i64::MAX),
        };
        let mut hosts = JoinSet::new();
        let mut host_of_task = HashMap::with_capacity(job.hosts.len());
        let host_count = job.hosts.len();
        for host in job.hosts {
            let Some(checkpoint) = host.checkpoint else {
                self.write_for(
                    job.job_instance_id,
                    Write::HostFinished {
                        step_instance_id: job.step_instance_id,
                        bk_host_id: host.bk_host_id,
                        outcome: HostOutcome {
                            status: host::AGENT_ABNORMAL,
                            tag:
                                "the controller stopped while this task ran; its result is unknown"
                                    .into(),
                            end_time: now_ms(),
                            ..HostOutcome::default()
                        },
                    },
                )
                .await;
                continue;
            };
            tracing::info!(
                job = job.job_instance_id,
                bk_host_id = host.bk_host_id,
                agent_id = checkpoint.agent_id,
                "waiting for the agent to come back with its task"
            );
            let run = HostRun {
                engine: self.clone(),
                job_instance_id: job.job_instance_id,
                step_instance_id: job.step_instance_id,
                bk_host_id: host.bk_host_id,
                request: None,
                resume: Some(checkpoint),
                limits,
                cancel: cancel.clone(),
            };
            let handle = hosts.spawn(run.run());
            host_of_task.insert(handle.id(), host.bk_host_id);
        }
        let finishing = Finishing {
            job_instance_id: job.job_instance_id,
            step_instance_id: job.step_instance_id,
            hosts: host_count,
            started: job.start_time.unwrap_or_else(now_ms),
            all_succeeded: job.finished_hosts_succeeded && host_count == host_of_task.len(),
        };
        if let Some(rolling) = rolling {
            return self
                .finish_resumed_batch(finishing, hosts, host_of_task, &cancel, rolling)
                .await;
        }
        self.finish_job(finishing, hosts, host_of_task, &cancel)
            .await;
        true
    }

    /// An agent of `bk_host_id` reconnected and reported it holds `held`: every task out on
    /// that host and agent that the report leaves out is told so, and ends without waiting for
    /// its deadline. Called before the new connection is in use, so a task sent on it cannot be
    /// told it is missing.
    pub fn not_held(&self, bk_host_id: i64, agent_id: &str, held: &[HeldTask]) {
        let held: std::collections::HashSet<Uuid> = held.iter().map(|t| t.task_id).collect();
        let claims = self.claims.lock().unwrap();
        for (task_id, claimant) in claims.iter() {
            if claimant.bk_host_id == bk_host_id
                && claimant.agent_id == agent_id
                && !held.contains(task_id)
            {
                tracing::warn!(
                    bk_host_id,
                    agent_id,
                    %task_id,
                    "the agent came back without a task it was sent"
                );
                let _ = claimant.tx.send(Reattach::NotHeld);
            }
        }
    }

    /// An agent reconnected on `connection` as host `bk_host_id` and claims `held`: the claim
    /// goes to the run following the task, if it follows one sent to that host and agent. Any
    /// other is refused (logged, nothing stored) and the agent told to kill and forget the task.
    pub fn claim(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        connection: &quinn::Connection,
        held: &HeldTask,
    ) {
        let task_id = held.task_id;
        let refusal = {
            let claims = self.claims.lock().unwrap();
            match claims.get(&task_id) {
                None => Some(
                    "no run follows it here (it ended, its job is gone, or it was never sent to \
                     this agent)"
                        .to_owned(),
                ),
                Some(c) if c.bk_host_id != bk_host_id || c.agent_id != agent_id => Some(format!(
                    "it was sent to host {} (agent {:?}), not to this one",
                    c.bk_host_id, c.agent_id
                )),
                Some(c) => {
                    let reattach = Reattach::Claim {
                        connection: connection.clone(),
                        claim: Claim::from(held),
                    };
                    match c.tx.send(reattach) {
                        Ok(()) => None,
                        Err(_) => Some("its run has just ended".to_owned()),
                    }
                }
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(
                bk_host_id,
                agent_id,
                %task_id,
                job = held.job_instance_id,
                "refused the agent's claim to a task, it is discarded there: {reason}"
            );
            follow::discard(connection.clone(), task_id);
        }
    }

    async fn run_job(&self, spec: JobSpec, cancel: CancellationToken) {
        let JobSpec {
            job_instance_id,
            step_instance_id,
            hosts: targets,
            task,
        } = spec;
        let started = now_ms();
        self.write_for(
            job_instance_id,
            Write::JobStarted {
                job_instance_id,
                step_instance_id,
                status: job::RUNNING,
                at: started,
            },
        )
        .await;
        let limits = self.limits(task.timeout_secs);
        let request = self.encode_request(job_instance_id, step_instance_id, task);
        let mut hosts = JoinSet::new();
        let mut host_of_task = HashMap::with_capacity(targets.len());
        self.spawn_hosts(
            job_instance_id,
            step_instance_id,
            &targets,
            request.as_ref(),
            limits,
            &cancel,
            &mut hosts,
            &mut host_of_task,
        );
        drop(request);
        let finishing = Finishing {
            job_instance_id,
            step_instance_id,
            hosts: targets.len(),
            started,
            all_succeeded: true,
        };
        self.finish_job(finishing, hosts, host_of_task, &cancel)
            .await;
    }

    /// The limits every host's run of a step follows.
    fn limits(&self, timeout_secs: u32) -> Limits {
        Limits {
            output_limit: self.output_limit,
            timeout_ms: i64::from(timeout_secs) * 1000,
            grace_ms: i64::try_from(self.agent_grace.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// The task request, encoded once for all the hosts: each host's run holds a reference to
    /// it until its request is sent, so the script's memory does not grow with the number of
    /// hosts. None if it cannot be encoded (each host's run then records the failure).
    fn encode_request(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        task: TaskTemplate,
    ) -> Option<SharedTaskRequest> {
        let TaskTemplate {
            script_language,
            script,
            script_param,
            is_param_sensitive,
            account,
            timeout_secs,
        } = task;
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
        match request {
            Ok(request) => Some(request),
            Err(e) => {
                tracing::error!(job = job_instance_id, "cannot encode the task: {e}");
                None
            }
        }
    }

    /// Starts one host's run for each of `targets`.
    #[allow(clippy::too_many_arguments)]
    fn spawn_hosts(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        targets: &[i64],
        request: Option<&SharedTaskRequest>,
        limits: Limits,
        cancel: &CancellationToken,
        hosts: &mut JoinSet<i32>,
        host_of_task: &mut HashMap<tokio::task::Id, i64>,
    ) {
        for bk_host_id in targets.iter().copied() {
            let run = HostRun {
                engine: self.clone(),
                job_instance_id,
                step_instance_id,
                bk_host_id,
                request: request.cloned(),
                resume: None,
                limits,
                cancel: cancel.clone(),
            };
            let handle = hosts.spawn(run.run());
            host_of_task.insert(handle.id(), bk_host_id);
        }
    }

    /// Waits for every host's run, then records the step's and the job's end and reports it.
    async fn finish_job(
        &self,
        finishing: Finishing,
        mut hosts: JoinSet<i32>,
        host_of_task: HashMap<tokio::task::Id, i64>,
        cancel: &CancellationToken,
    ) {
        let failed = self
            .join_hosts(
                finishing.job_instance_id,
                finishing.step_instance_id,
                &mut hosts,
                &host_of_task,
            )
            .await;
        let status = if cancel.is_cancelled() {
            job::TERMINATE_SUCCESS
        } else if finishing.all_succeeded && failed == 0 {
            job::SUCCESS
        } else {
            job::FAILED
        };
        self.end_job(&finishing, status, status).await;
    }

    /// Waits for every host's run in `hosts`; returns how many ended without success.
    async fn join_hosts(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        hosts: &mut JoinSet<i32>,
        host_of_task: &HashMap<tokio::task::Id, i64>,
    ) -> usize {
        let mut failed = 0;
        while let Some(joined) = hosts.join_next_with_id().await {
            if self
                .host_ended(job_instance_id, step_instance_id, joined, host_of_task)
                .await
            {
                failed += 1;
            }
        }
        failed
    }

    /// Takes note of one host's run that ended; true if the host did not succeed.
    async fn host_ended(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        joined: Result<(tokio::task::Id, i32), tokio::task::JoinError>,
        host_of_task: &HashMap<tokio::task::Id, i64>,
    ) -> bool {
        match joined {
            Ok((_, status)) => !host::is_success(status),
            Err(e) => {
                // The host's run died before recording a final status: record one for it, so
                // no host stays waiting or running forever.
                let bk_host_id = host_of_task.get(&e.id()).copied().unwrap_or_default();
                tracing::error!(job = job_instance_id, bk_host_id, "host task failed: {e}");
                self.write_for(
                    job_instance_id,
                    Write::HostFinished {
                        step_instance_id,
                        bk_host_id,
                        outcome: HostOutcome {
                            status: host::AGENT_TASK_ERROR,
                            tag: "internal error in the controller while following this host"
                                .into(),
                            end_time: now_ms(),
                            ..HostOutcome::default()
                        },
                    },
                )
                .await;
                true
            }
        }
    }

    /// Records the step's and the job's final statuses and reports the job's end.
    async fn end_job(&self, finishing: &Finishing, step_status: i32, job_status: i32) {
        let Finishing {
            job_instance_id,
            step_instance_id,
            hosts: host_count,
            started,
            ..
        } = *finishing;
        if self.is_abandoned(job_instance_id) {
            return;
        }
        if let Some(membership) = &self.membership
            && !membership.keeps(job_instance_id).await
        {
            // Another controller took the job up (this one could not renew its lease): the end
            // and the callback are that one's.
            tracing::warn!(
                job = job_instance_id,
                "this controller lost the job's lease: its end is left to the holder"
            );
            return;
        }
        let at = now_ms();
        self.write_for(
            job_instance_id,
            Write::StepFinished {
                step_instance_id,
                status: step_status,
                at,
            },
        )
        .await;
        self.write_for(
            job_instance_id,
            Write::JobFinished {
                job_instance_id,
                status: job_status,
                at,
            },
        )
        .await;
        crate::metrics::job_finished(job_status, at - started);
        if let Some(callbacks) = &self.callbacks {
            callbacks.job_ended(job_instance_id);
        }
        tracing::info!(
            job = job_instance_id,
            hosts = host_count,
            status = job_status,
            elapsed_ms = at - started,
            "job finished"
        );
    }

    /// Records a write of the job's run, unless the run was abandoned (another controller took
    /// the job's lease: its progress is that one's to record).
    async fn write_for(&self, job_instance_id: i64, write: Write) {
        if self.is_abandoned(job_instance_id) {
            return;
        }
        if let Err(e) = self.store.record(write).await {
            tracing::error!("cannot record job progress: {e}");
        }
    }
}
