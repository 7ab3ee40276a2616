//! The job engine: sends each host its task, follows it to a final state, and records everything.
//!
//! **Architecture invariant:** every (job, host) the engine starts reaches a final host status:
//! a result from the agent, or 310 when the agent is offline, its connection is lost (an agent
//! of protocol version 1), or it does not come back before the task's deadline (an agent that
//! owns its tasks), or 16 when the agent stays silent past the task's timeout plus a grace
//! period.

mod files;
mod follow;
mod handover;
mod rolling;
pub mod target_path;
mod transfer;

pub use files::{
    FileJobSpec, FileTarget, MODE_DOWNLOAD, MODE_UPLOAD, StepFile, file_status, human_size,
    human_speed,
};
pub use rolling::{FileStep, RollingStart, Work};
pub use transfer::{LocalFile, SourceSpec, TransferSpec};

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

/// The host a joinable run follows, and the epoch it writes the host at: a run that dies has
/// its host's end recorded at that epoch.
#[derive(Debug, Clone, Copy)]
struct RunOf {
    bk_host_id: i64,
    epoch: i64,
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
    /// It reconnected to another controller, which took the task over: the run here records
    /// nothing more and waits for the store to show the host's end.
    Moved,
    /// Another controller took the host over while this one could not reach the store (its
    /// writes of the host were refused, `fleetrun_store::Store::fenced_hosts`): as `Moved`, even
    /// while a stream is attached.
    Fenced,
}

/// Who may claim a task that is out on an agent, and where the claim goes.
#[derive(Debug)]
struct Claimant {
    step_instance_id: i64,
    bk_host_id: i64,
    /// The host's epoch the run that follows the task took it at.
    epoch: i64,
    agent_id: String,
    tx: mpsc::UnboundedSender<Reattach>,
}

/// Tasks out on agents that own them, by task id, and the same tasks by host: an agent that
/// reconnects has its own tasks looked up, not every task of every host.
#[derive(Debug, Default)]
struct Claims {
    by_task: HashMap<Uuid, Claimant>,
    by_host: HashMap<i64, HashSet<Uuid>>,
}

impl Claims {
    fn insert(&mut self, task_id: Uuid, claimant: Claimant) {
        let host = claimant.bk_host_id;
        if let Some(old) = self.by_task.insert(task_id, claimant) {
            self.unindex(old.bk_host_id, task_id);
        }
        self.by_host.entry(host).or_default().insert(task_id);
    }

    fn remove(&mut self, task_id: &Uuid) -> Option<Claimant> {
        let claimant = self.by_task.remove(task_id)?;
        self.unindex(claimant.bk_host_id, *task_id);
        Some(claimant)
    }

    fn unindex(&mut self, bk_host_id: i64, task_id: Uuid) {
        if let Some(tasks) = self.by_host.get_mut(&bk_host_id) {
            tasks.remove(&task_id);
            if tasks.is_empty() {
                self.by_host.remove(&bk_host_id);
            }
        }
    }

    fn get(&self, task_id: &Uuid) -> Option<&Claimant> {
        self.by_task.get(task_id)
    }

    /// The tasks out on `bk_host_id`, whichever agent they were sent to.
    fn of_host(&self, bk_host_id: i64) -> impl Iterator<Item = (&Uuid, &Claimant)> {
        self.by_host
            .get(&bk_host_id)
            .into_iter()
            .flatten()
            .filter_map(|task_id| Some((task_id, self.by_task.get(task_id)?)))
    }

    /// The tasks of (step, host) followed by runs that took the host below `epoch`: a write at
    /// `epoch` refused theirs, so another writer holds the host. A run at `epoch` holds it.
    fn fenced_out(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        epoch: i64,
    ) -> impl Iterator<Item = (&Uuid, &Claimant)> {
        self.of_host(bk_host_id)
            .filter(move |(_, c)| c.step_instance_id == step_instance_id && c.epoch < epoch)
    }
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
    /// Jobs in `running` held by a [`Reservation`]: a run is about to start, none is under way.
    reserved: Arc<Mutex<HashSet<i64>>>,
    /// Told of every job's end, for its callback.
    callbacks: Callbacks,
    /// Tasks out on agents that own them, by task id, while their host's run follows them.
    claims: Arc<Mutex<Claims>>,
    /// Where each such task stands, by (step, host), and whether that changed since it was
    /// last saved.
    checkpoints: Arc<Checkpoints>,
    /// Claims to the tasks of jobs taken up at start, registered before the gateway accepts an
    /// agent and kept here until the host's run picks them up: an agent that reconnects first
    /// finds its claim waiting, not refused.
    prepared: Arc<Mutex<HashMap<Uuid, mpsc::UnboundedReceiver<Reattach>>>>,
    /// Runs waiting for their checkpoint to be saved now rather than at the next tick.
    save_now: Arc<SaveNow>,
    /// Held while a job is looked up in the store to be taken up for an agent's claim, so
    /// that two claims to one job take it up once (taking it up cuts its logs back to their
    /// checkpoints, which must happen before any of its runs writes).
    taking_up: Arc<tokio::sync::Mutex<()>>,
    /// Jobs whose run here ended or paused lately: an agent's claim never takes one of them up
    /// again from the store (their last writes may be lost or not read yet).
    left_here: Arc<Mutex<LeftHere>>,
    /// Claims being looked up in the store, by task id and per connection.
    looking_up: Arc<Mutex<LookUps>>,
    /// With controllers sharing the database: the leases on jobs' bookkeeping.
    membership: Option<crate::cluster::Membership>,
    /// Jobs whose lease a handler took for a run about to start here (before the job's status
    /// says it runs): the lease is not given up meanwhile.
    starting: Arc<Mutex<HashSet<i64>>>,
    /// Runs here whose job another controller took up (this one lost the lease): they go on
    /// following the agents' tasks but record nothing and end nothing.
    abandoned: Arc<Mutex<HashSet<i64>>>,
    /// Hosts run here for jobs whose lease another controller holds (handed over, or claimed
    /// here by their agent), by job.
    parts: Arc<handover::Parts>,
    /// Opens the sealed parameters of handed-over steps (the key shared by the controllers).
    cipher: Option<Arc<crate::secrets::ParamCipher>>,
}

/// The last [`LeftHere::KEPT`] jobs whose run here ended or paused.
#[derive(Debug, Default)]
struct LeftHere {
    order: std::collections::VecDeque<i64>,
    jobs: HashSet<i64>,
}

impl LeftHere {
    const KEPT: usize = 4_096;

    fn note(&mut self, job_instance_id: i64) {
        if self.jobs.insert(job_instance_id) {
            self.order.push_back(job_instance_id);
            if self.order.len() > Self::KEPT
                && let Some(oldest) = self.order.pop_front()
            {
                self.jobs.remove(&oldest);
            }
        }
    }
}

/// Claims looked up in the store now: each task once per connection (a connection that closes
/// drops its lookups, so a reconnected agent's claim is not held up behind a dead one's), at
/// most [`MAX_LOOKUPS_PER_CONNECTION`] per connection.
#[derive(Debug, Default)]
struct LookUps {
    tasks: HashSet<(Uuid, usize)>,
    per_connection: HashMap<usize, usize>,
}

/// Claims of one connection looked up in the store at once, at most; the rest are left on the
/// agent (neither followed nor discarded) until it reconnects.
const MAX_LOOKUPS_PER_CONNECTION: usize = 64;

/// Asks the checkpoint saver for a save at once; each waiter hears when a save that includes
/// what it noted before asking is done.
#[derive(Debug, Default)]
struct SaveNow {
    wake: tokio::sync::Notify,
    waiters: Mutex<Vec<SaveWaiter>>,
}

/// A run waiting for a save that includes its (step, host) checkpoint.
type SaveWaiter = ((i64, i64), tokio::sync::oneshot::Sender<()>);

/// How often a dispatch waiting for its checkpoint to be saved looks whether the database still
/// takes writes; a task whose checkpoint was lost, or is unsaved while the database refuses
/// writes, is not sent (a controller restarted after it could not take it up).
const CHECKPOINT_WAIT: Duration = Duration::from_secs(5);

/// A job's place in the running set, held from before a retry commits until its run starts
/// ([`Engine::reserve`]).
#[derive(Debug)]
pub struct Reservation {
    engine: Engine,
    job_instance_id: i64,
    cancel: Option<CancellationToken>,
}

impl Reservation {
    /// The run's cancel token; the place is the run's from now on.
    fn take(mut self) -> CancellationToken {
        self.engine
            .reserved
            .lock()
            .unwrap()
            .remove(&self.job_instance_id);
        self.cancel.take().expect("taken once")
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.cancel.is_some() {
            let mut running = self.engine.running.lock().unwrap();
            running.remove(&self.job_instance_id);
            self.engine
                .reserved
                .lock()
                .unwrap()
                .remove(&self.job_instance_id);
        }
    }
}

impl Engine {
    /// An engine that reports every job's end to `callbacks`.
    pub fn new(
        store: Store,
        agents: Agents,
        output_limit: u64,
        agent_grace: Duration,
        callbacks: Callbacks,
    ) -> Self {
        Self {
            store,
            agents,
            output_limit,
            agent_grace,
            running: Arc::default(),
            reserved: Arc::default(),
            callbacks,
            claims: Arc::default(),
            checkpoints: Arc::default(),
            prepared: Arc::default(),
            save_now: Arc::default(),
            taking_up: Arc::default(),
            left_here: Arc::default(),
            looking_up: Arc::default(),
            membership: None,
            starting: Arc::default(),
            abandoned: Arc::default(),
            parts: Arc::default(),
            cipher: None,
        }
    }

    /// Opens the sealed parameters of steps handed over by other controllers.
    pub fn with_cipher(mut self, cipher: Arc<crate::secrets::ParamCipher>) -> Self {
        self.cipher = Some(cipher);
        self
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
    /// [`Engine::start`] / [`Engine::start_rolling_work`], or by [`Engine::lease_unused`].
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

    /// Where job ends are reported.
    pub(crate) fn callbacks(&self) -> &Callbacks {
        &self.callbacks
    }

    /// Starts the job in the background; false if it is running already.
    pub fn start(&self, spec: JobSpec) -> bool {
        self.start_run(spec, true)
    }

    /// Holds the job's place in the running set for a run about to start, before the store is
    /// told it runs again; None while a run of it is under way (or still committing its end).
    /// While held, [`Self::terminate`] finds no run to cancel, so it cannot end the previous
    /// run a second time over the new one. Dropped unused, the place is given back.
    pub fn reserve(&self, job_instance_id: i64) -> Option<Reservation> {
        let mut running = self.running.lock().unwrap();
        if running.contains_key(&job_instance_id) {
            return None;
        }
        let cancel = CancellationToken::new();
        running.insert(job_instance_id, cancel.clone());
        self.reserved.lock().unwrap().insert(job_instance_id);
        Some(Reservation {
            engine: self.clone(),
            job_instance_id,
            cancel: Some(cancel),
        })
    }

    /// Runs a retried step's hosts in the background (the store moved the step to its next
    /// execute_count and the job to running already) in the place `reservation` holds.
    pub fn start_retry(&self, reservation: Reservation, spec: JobSpec) {
        debug_assert_eq!(reservation.job_instance_id, spec.job_instance_id);
        self.spawn_run(spec, reservation.take(), false);
    }

    fn start_run(&self, spec: JobSpec, first: bool) -> bool {
        let cancel = CancellationToken::new();
        let job_instance_id = spec.job_instance_id;
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job_instance_id) {
                return false;
            }
            running.insert(job_instance_id, cancel.clone());
        }
        self.spawn_run(spec, cancel, first);
        true
    }

    fn spawn_run(&self, spec: JobSpec, cancel: CancellationToken, first: bool) {
        let job_instance_id = spec.job_instance_id;
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
            engine.run_job(spec, cancel, first).await;
            // The job leaves the running set only once its final state is committed, so nobody
            // sees it neither running nor finished.
            if let Err(e) = engine.store.flush().await {
                tracing::error!(job = job_instance_id, "cannot commit the job's end: {e}");
            }
            engine.forget_handovers(job_instance_id).await;
            engine.running.lock().unwrap().remove(&job_instance_id);
            engine.left_here.lock().unwrap().note(job_instance_id);
            engine.run_left(job_instance_id);
            engine.release_lease(job_instance_id).await;
        });
    }

    /// Tells each agent still connected that was given one of `tasks` (host, task id, agent id)
    /// to kill and forget it: a retry sends a new task id, and a task whose end was never
    /// confirmed (no result within its timeout, a termination not confirmed) would otherwise
    /// run beside it. An agent not connected now has its claim to the task refused, and the
    /// task discarded, when it comes back.
    pub fn discard_earlier(&self, tasks: &[(i64, String, String)]) {
        for (bk_host_id, task_id, agent_id) in tasks {
            let Ok(task_id) = task_id.parse::<Uuid>() else {
                continue;
            };
            if let Some(link) = self.agents.get(*bk_host_id)
                && link.agent_id == *agent_id
            {
                tracing::info!(bk_host_id, %task_id, "discarding the host's earlier task before a retry");
                follow::discard(link.connection, task_id);
            }
        }
    }

    /// Asks a running job to stop: every host's process tree is killed. The job shows
    /// "terminating" until every host has reported. False if the job is not running here, nor
    /// (with controllers sharing the database) running in the store, run by another controller:
    /// then every controller running a part of it is asked through the store.
    pub async fn terminate(&self, job_instance_id: i64) -> bool {
        if self.membership.is_none() {
            return self.terminate_here(job_instance_id).await;
        }
        if self.reserved.lock().unwrap().contains(&job_instance_id) {
            return false;
        }
        let here = self.is_running(job_instance_id);
        if !here {
            match self.store.job_status(job_instance_id).await {
                Ok(Some(job::RUNNING | job::TERMINATING)) => {}
                Ok(_) => return false,
                Err(e) => {
                    tracing::error!(job = job_instance_id, "cannot read the job: {e}");
                    return false;
                }
            }
        }
        if let Err(e) = self.store.request_cancel(job_instance_id).await {
            tracing::error!(
                job = job_instance_id,
                "cannot ask the other controllers to terminate the job: {e}"
            );
            if !here {
                return false;
            }
        }
        if let Some((cancel, _)) = self.parts.lock().unwrap().get(&job_instance_id) {
            cancel.cancel();
        }
        if here {
            return self.terminate_here(job_instance_id).await;
        }
        true
    }

    /// Forgets whatever handovers and termination request an earlier run of the job left (an
    /// end that could not forget them, or was another controller's): before a retry commits,
    /// so a new run of the step is neither terminated by an old request nor has its hosts
    /// taken for the old run's.
    pub(crate) async fn forget_earlier_run(
        &self,
        job_instance_id: i64,
    ) -> Result<(), fleetrun_store::StoreError> {
        if self.membership.is_none() {
            return Ok(());
        }
        self.store.forget_handovers(job_instance_id).await
    }

    /// Forgets the job's handovers and termination request once its run here ended (unless
    /// another controller took it up meanwhile: they are that one's now).
    async fn forget_handovers(&self, job_instance_id: i64) {
        if self.membership.is_none() || self.is_abandoned(job_instance_id) {
            return;
        }
        if let Err(e) = self.store.forget_handovers(job_instance_id).await {
            tracing::warn!(
                job = job_instance_id,
                "cannot forget the job's handovers: {e}"
            );
        }
    }

    /// [`Engine::terminate`] for a run of the job in this engine.
    async fn terminate_here(&self, job_instance_id: i64) -> bool {
        let cancel = {
            let running = self.running.lock().unwrap();
            if self.reserved.lock().unwrap().contains(&job_instance_id) {
                return false;
            }
            running.get(&job_instance_id).cloned()
        };
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

    /// Saves, every second, where each task out on an agent that owns it stands; at once when a
    /// dispatch asks; a last time when `shutdown` fires (queued for the store's last flush). The checkpoints go through the store's
    /// writer, after the log they describe (queued before they were noted), so they commit with
    /// it or after it and never run ahead of it, and they take no database lock of their own
    /// beside the writer's.
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
                // Taken before the batch: each of them noted its checkpoint before it asked, and
                // its own checkpoint goes in this batch whether or not it is marked changed, so
                // the batch that answers it is the one that holds it.
                let waiters = std::mem::take(&mut *engine.save_now.waiters.lock().unwrap());
                let batch: Vec<HostCheckpoint> = {
                    let own: HashSet<(i64, i64)> = waiters.iter().map(|(key, _)| *key).collect();
                    let mut checkpoints = engine.checkpoints.lock().unwrap();
                    checkpoints
                        .iter_mut()
                        .filter(|(key, (_, dirty))| *dirty || own.contains(key))
                        .map(|(_, (checkpoint, dirty))| {
                            *dirty = false;
                            checkpoint.clone()
                        })
                        .collect()
                };
                if batch.is_empty() && waiters.is_empty() && !stopping {
                    continue;
                }
                let (saved_tx, saved) = tokio::sync::oneshot::channel();
                let write = Write::Checkpoints {
                    checkpoints: batch.clone(),
                    saved: Some(saved_tx),
                };
                if let Err(e) = engine.store.record(write).await {
                    tracing::warn!("cannot save where running tasks stand: {e}");
                }
                if stopping {
                    // Committed by the store's last flush, with what else the stop leaves.
                    return;
                }
                // No new batch while this one is unanswered: what changes meanwhile waits in
                // the map, one entry per host, so a database that refuses writes holds one
                // batch of checkpoints in the writer's backlog, not one a second.
                let answered = tokio::select! {
                    answered = saved => Some(answered.ok()),
                    () = shutdown.cancelled() => None,
                };
                if let Some(Some(refused)) = answered {
                    // A refused checkpoint's host is another controller's now: its waiter hears
                    // that it was not saved (its sender drops), and nothing retries it.
                    let refused: HashSet<(i64, i64)> = refused.into_iter().collect();
                    if !refused.is_empty() {
                        let mut checkpoints = engine.checkpoints.lock().unwrap();
                        for checkpoint in &batch {
                            let key = (checkpoint.step_instance_id, checkpoint.bk_host_id);
                            if refused.contains(&key)
                                && checkpoints.get(&key).is_some_and(|(c, _)| c == checkpoint)
                            {
                                checkpoints.remove(&key);
                            }
                        }
                    }
                    for (key, waiter) in waiters {
                        if !refused.contains(&key) {
                            let _ = waiter.send(());
                        }
                    }
                    continue;
                }
                // Lost (or the stop came first): what the batch held is marked changed again
                // where nothing newer replaced it, for the next batch; its waiters hear that it
                // was not saved (their senders drop).
                {
                    let mut checkpoints = engine.checkpoints.lock().unwrap();
                    for checkpoint in batch {
                        let key = (checkpoint.step_instance_id, checkpoint.bk_host_id);
                        if let Some((current, dirty)) = checkpoints.get_mut(&key)
                            && *current == checkpoint
                        {
                            *dirty = true;
                        }
                    }
                }
                if answered.is_none() {
                    let last: Vec<HostCheckpoint> = engine
                        .checkpoints
                        .lock()
                        .unwrap()
                        .values()
                        .filter(|(_, dirty)| *dirty)
                        .map(|(checkpoint, _)| checkpoint.clone())
                        .collect();
                    let write = Write::Checkpoints {
                        checkpoints: last,
                        saved: None,
                    };
                    if let Err(e) = engine.store.record(write).await {
                        tracing::warn!("cannot save where running tasks stand: {e}");
                    }
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

    /// Notes `checkpoint` and waits until it is saved (with the checkpoints of other runs that
    /// asked meanwhile, in one group commit): true once it is, false if it was lost or not
    /// while the database refuses writes (looked at every [`CHECKPOINT_WAIT`]).
    async fn save_checkpoint_now(&self, checkpoint: HostCheckpoint) -> bool {
        let key = (checkpoint.step_instance_id, checkpoint.bk_host_id);
        self.note_checkpoint(checkpoint);
        let (done, saved) = tokio::sync::oneshot::channel();
        self.save_now.waiters.lock().unwrap().push((key, done));
        self.save_now.wake.notify_one();
        tokio::pin!(saved);
        // A busy database that still commits is waited for (the caller follows termination
        // and the deadline meanwhile); one that refuses writes is not.
        loop {
            match tokio::time::timeout(CHECKPOINT_WAIT, &mut saved).await {
                Ok(answer) => return answer.is_ok(),
                Err(_) if !self.store.health().is_writable() => return false,
                Err(_) => {}
            }
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
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job.job_instance_id) {
                return false;
            }
            running.insert(job.job_instance_id, cancel.clone());
        }
        self.resume_reserved(job, cancel);
        true
    }

    /// [`Engine::resume`] for a job whose place in the running set is taken already, by
    /// `cancel`.
    fn resume_reserved(&self, job: ResumableJob, cancel: CancellationToken) {
        let job_instance_id = job.job_instance_id;
        if job.status == job::TERMINATING {
            cancel.cancel();
        }
        for checkpoint in job.hosts.iter().filter_map(|h| {
            h.checkpoint
                .as_ref()
                .map(|checkpoint| (h.bk_host_id, h.epoch, checkpoint))
        }) {
            let (bk_host_id, epoch, checkpoint) = checkpoint;
            let Ok(task_id) = checkpoint.task_id.parse::<Uuid>() else {
                continue;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            self.claims.lock().unwrap().insert(
                task_id,
                Claimant {
                    step_instance_id: job.step_instance_id,
                    bk_host_id,
                    epoch,
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
                engine.forget_handovers(job_instance_id).await;
                engine.running.lock().unwrap().remove(&job_instance_id);
                engine.run_left(job_instance_id);
            }
            engine.left_here.lock().unwrap().note(job_instance_id);
            engine.release_lease(job_instance_id).await;
        });
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
        let mut handed = Vec::new();
        for host in job.hosts {
            if host.handed_to.is_some() {
                // Recorded by the controller it was handed to (or by whichever its agent
                // reconnects to): followed through the store.
                handed.push((host.bk_host_id, host.epoch));
                continue;
            }
            let Some(checkpoint) = host.checkpoint else {
                self.write_for(
                    job.job_instance_id,
                    Write::HostFinished {
                        stored: None,
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
                        epoch: host.epoch,
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
                moved: false,
                epoch: host.epoch,
            };
            let handle = hosts.spawn(run.run());
            host_of_task.insert(
                handle.id(),
                RunOf {
                    bk_host_id: host.bk_host_id,
                    epoch: host.epoch,
                },
            );
        }
        if !handed.is_empty() {
            self.spawn_followers(
                job.job_instance_id,
                job.step_instance_id,
                &handed,
                limits,
                &mut hosts,
                &mut host_of_task,
            );
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
        let held: HashSet<Uuid> = held.iter().map(|t| t.task_id).collect();
        let claims = self.claims.lock().unwrap();
        for (task_id, claimant) in claims.of_host(bk_host_id) {
            if claimant.agent_id == agent_id && !held.contains(task_id) {
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
    /// goes to the run following the task, if it follows one sent to that host and agent. A task
    /// no run follows here is looked up in the store ([`Engine::claim_from_store`]): its job may
    /// be running there without this controller following it. Any other claim is refused
    /// (logged, nothing stored) and the agent told to kill and forget the task.
    pub fn claim(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        connection: &quinn::Connection,
        held: &HeldTask,
    ) {
        if !self.route_claim(bk_host_id, agent_id, connection, held, true) {
            return;
        }
        let task_id = held.task_id;
        let connection_id = connection.stable_id();
        {
            let mut looking_up = self.looking_up.lock().unwrap();
            if !looking_up.tasks.insert((task_id, connection_id)) {
                tracing::debug!(bk_host_id, %task_id, "a claim to this task is looked up already");
                return;
            }
            let of_connection = looking_up.per_connection.entry(connection_id).or_default();
            if *of_connection >= MAX_LOOKUPS_PER_CONNECTION {
                looking_up.tasks.remove(&(task_id, connection_id));
                // Not discarded: the store may want it, and the agent claims it again when it
                // reconnects.
                tracing::warn!(
                    bk_host_id,
                    agent_id,
                    %task_id,
                    "too many claims of this connection are looked up in the store: this one is \
                     left on the agent for now"
                );
                return;
            }
            *of_connection += 1;
        }
        let engine = self.clone();
        let (agent_id, connection, held) = (agent_id.to_owned(), connection.clone(), held.clone());
        tokio::spawn(async move {
            engine
                .claim_from_store(bk_host_id, &agent_id, &connection, &held)
                .await;
            let mut looking_up = engine.looking_up.lock().unwrap();
            looking_up.tasks.remove(&(task_id, connection_id));
            if let Some(n) = looking_up.per_connection.get_mut(&connection_id) {
                *n -= 1;
                if *n == 0 {
                    looking_up.per_connection.remove(&connection_id);
                }
            }
        });
    }

    /// Routes a claim to the run that follows its task, or refuses it; with `ask_store`, true
    /// (and nothing refused yet) when no run follows the task here.
    fn route_claim(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        connection: &quinn::Connection,
        held: &HeldTask,
        ask_store: bool,
    ) -> bool {
        let task_id = held.task_id;
        let refusal = {
            let claims = self.claims.lock().unwrap();
            match claims.get(&task_id) {
                None if ask_store => return true,
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
        false
    }

    /// A claim to a task no run follows here: taken up if the store says its (job, host) is
    /// running with this very task out on this host and agent, and the job is followed nowhere
    /// here (a job this controller did not dispatch: restored, or handed over); refused and
    /// discarded on the agent otherwise.
    async fn claim_from_store(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        connection: &quinn::Connection,
        held: &HeldTask,
    ) {
        match self
            .take_up_for(bk_host_id, agent_id, connection, held)
            .await
        {
            Ok(true) => {
                self.route_claim(bk_host_id, agent_id, connection, held, false);
            }
            // The connection closed while the store was asked: nobody to answer.
            Ok(false) => {}
            Err(reason) => {
                tracing::warn!(
                    bk_host_id,
                    agent_id,
                    task_id = %held.task_id,
                    job = held.job_instance_id,
                    "refused the agent's claim to a task, it is discarded there: {reason}"
                );
                follow::discard(connection.clone(), held.task_id);
            }
        }
    }

    /// Takes up the job of the claimed task `held` if the store wants the task and the job may
    /// be taken up here ([`Engine::may_take_up`]): true once the claim can be routed (the job
    /// is followed here), false if `connection` closed while the store was asked (nothing done),
    /// why not otherwise.
    ///
    /// The store is read only after the running set was looked at and everything queued before
    /// committed: a run that left the set (ended, or paused) queued its last writes before, so
    /// the store shows them. The job's place in the running set is taken before its logs are
    /// cut back to their checkpoints, so that never happens to a job followed here.
    async fn take_up_for(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        connection: &quinn::Connection,
        held: &HeldTask,
    ) -> Result<bool, String> {
        let job_instance_id = held.job_instance_id;
        if self.running.lock().unwrap().contains_key(&job_instance_id) {
            // A take-up under way holds the lock until it has registered the job's claims; held
            // across a host's take-up, so two claims to one task run it once.
            let taking_up = self.taking_up.lock().await;
            let Some(membership) = &self.membership else {
                return Ok(true);
            };
            if self.claims.lock().unwrap().get(&held.task_id).is_some() {
                return Ok(true);
            }
            // A task of a job run here that no run here follows. Only a host handed to another
            // controller (alive or not) whose agent came here is taken up; a host this
            // controller runs lets its claim go before its end is recorded, and a claim in
            // between is refused, not run a second time.
            let handover = self.current_handover(bk_host_id, held).await?;
            if handover
                .as_ref()
                .is_none_or(|h| h.controller == membership.name())
            {
                return Ok(true);
            }
            self.store_wants(bk_host_id, agent_id, held).await?;
            let taken = self
                .take_up_handed(bk_host_id, agent_id, held, handover)
                .await;
            drop(taking_up);
            return taken;
        }
        let looked_up = async {
            self.store
                .flush()
                .await
                .map_err(|e| format!("the store cannot say whether it wants it: {e}"))?;
            self.store_wants(bk_host_id, agent_id, held).await
        };
        tokio::select! {
            wanted = looked_up => wanted?,
            _ = connection.closed() => return Ok(false),
        }
        if !self.may_take_up(job_instance_id) {
            return Err(format!(
                "its job {job_instance_id} ended or paused here, or may not be taken up by this \
                 controller"
            ));
        }
        // One take-up at a time: a second claim to the job waits here until the first has
        // registered the job's claims, then finds the job running.
        let _taking_up = self.taking_up.lock().await;
        // A claim to the same task taken up as a part while this one waited.
        if self.claims.lock().unwrap().get(&held.task_id).is_some() {
            return Ok(true);
        }
        let cancel = CancellationToken::new();
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job_instance_id) {
                return Ok(true);
            }
            running.insert(job_instance_id, cancel.clone());
        }
        // With controllers sharing the database, only the holder of the job's lease may cut
        // its logs back and follow it; another controller's agent that came here has its host
        // taken over, and run here as a part of the job.
        if !self.take_lease(job_instance_id).await {
            self.running.lock().unwrap().remove(&job_instance_id);
            let handover = self.current_handover(bk_host_id, held).await?;
            return self
                .take_up_handed(bk_host_id, agent_id, held, handover)
                .await;
        }
        let job = self
            .store
            .resumable_job(
                job_instance_id,
                &[job::RUNNING, job::TERMINATING],
                host::UNFINISHED,
                host::SUCCESS,
            )
            .await;
        let job = match job {
            Ok(Some(job)) => job,
            failed => {
                self.running.lock().unwrap().remove(&job_instance_id);
                return Err(match failed {
                    Err(e) => format!("the store cannot give its job: {e}"),
                    _ => "its job ended meanwhile".to_owned(),
                });
            }
        };
        tracing::info!(
            job = job_instance_id,
            bk_host_id,
            agent_id,
            task_id = %held.task_id,
            "an agent claims a task of a job running in the store that no run follows here: \
             taking the job up"
        );
        // Registers the job's claims before its runs start.
        self.resume_reserved(job, cancel);
        Ok(true)
    }

    /// Whether an agent's claim may take up `job_instance_id` from the store, its job running
    /// there and followed nowhere here: not if its run here ended or paused lately. Whether
    /// another controller holds the job is asked after, by taking its lease.
    fn may_take_up(&self, job_instance_id: i64) -> bool {
        !self
            .left_here
            .lock()
            .unwrap()
            .jobs
            .contains(&job_instance_id)
    }

    /// Whether the store wants the task `held` claimed by `agent_id` on `bk_host_id`: its job
    /// running (2) or terminating (10), its host unfinished, with this very task out on this
    /// host and agent; why not otherwise.
    async fn store_wants(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        held: &HeldTask,
    ) -> Result<(), String> {
        let stored = self
            .store
            .stored_task(held.step_instance_id, bk_host_id)
            .await
            .map_err(|e| format!("the store cannot say whether it wants it: {e}"))?
            .ok_or("no run follows it here and the store has no such task out on this host")?;
        let checkpoint = &stored.checkpoint;
        if checkpoint.task_id != held.task_id.to_string()
            || checkpoint.agent_id != agent_id
            || stored.job_instance_id != held.job_instance_id
        {
            return Err(format!(
                "the store has task {} of agent {:?} out on this host for step {}, not this one",
                checkpoint.task_id, checkpoint.agent_id, held.step_instance_id
            ));
        }
        if ![job::RUNNING, job::TERMINATING].contains(&stored.job_status)
            || !host::UNFINISHED.contains(&stored.host_status)
        {
            return Err(format!(
                "the store has its job at status {} and its host at status {}: it wants nothing \
                 more of it",
                stored.job_status, stored.host_status
            ));
        }
        Ok(())
    }

    /// Runs a job's hosts to their ends; `first` for its first run, which records its start.
    async fn run_job(&self, spec: JobSpec, cancel: CancellationToken, first: bool) {
        let JobSpec {
            job_instance_id,
            step_instance_id,
            hosts: targets,
            task,
        } = spec;
        let started = if first {
            self.job_started_now(job_instance_id, step_instance_id)
                .await
        } else {
            now_ms()
        };
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
        )
        .await;
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

    /// Waits for every host's run, then records the step's and the job's end and reports it.
    async fn finish_job(
        &self,
        finishing: Finishing,
        mut hosts: JoinSet<i32>,
        host_of_task: HashMap<tokio::task::Id, RunOf>,
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
        host_of_task: &HashMap<tokio::task::Id, RunOf>,
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
        host_of_task: &HashMap<tokio::task::Id, RunOf>,
    ) -> bool {
        match joined {
            Ok((_, status)) => !host::is_success(status),
            Err(e) => {
                // The host's run died before recording a final status: record one for it, so
                // no host stays waiting or running forever.
                let Some(RunOf { bk_host_id, epoch }) = host_of_task.get(&e.id()).copied() else {
                    tracing::error!(job = job_instance_id, "a host task of no host failed: {e}");
                    return true;
                };
                tracing::error!(job = job_instance_id, bk_host_id, "host task failed: {e}");
                self.write_for(
                    job_instance_id,
                    Write::HostFinished {
                        stored: None,
                        step_instance_id,
                        bk_host_id,
                        outcome: HostOutcome {
                            status: host::AGENT_TASK_ERROR,
                            tag: "internal error in the controller while following this host"
                                .into(),
                            end_time: now_ms(),
                            ..HostOutcome::default()
                        },
                        epoch,
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
        self.callbacks.job_ended(job_instance_id);
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
        self.record_part(job_instance_id, write).await;
    }

    /// Records that a job (its one step) starts running now; returns when.
    async fn job_started_now(&self, job_instance_id: i64, step_instance_id: i64) -> i64 {
        let at = now_ms();
        self.write_for(
            job_instance_id,
            Write::JobStarted {
                job_instance_id,
                step_instance_id,
                status: job::RUNNING,
                at,
            },
        )
        .await;
        at
    }

    /// Records a write of a host run here as a part of the job, whoever holds its lease.
    async fn record_part(&self, job_instance_id: i64, write: Write) {
        if let Err(e) = self.store.record(write).await {
            tracing::error!(job = job_instance_id, "cannot record job progress: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimant(bk_host_id: i64, agent_id: &str) -> (Claimant, mpsc::UnboundedReceiver<Reattach>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let claimant = Claimant {
            step_instance_id: 1,
            bk_host_id,
            epoch: fleetrun_store::FIRST_EPOCH,
            agent_id: agent_id.into(),
            tx,
        };
        (claimant, rx)
    }

    fn of_host(claims: &Claims, bk_host_id: i64) -> HashSet<Uuid> {
        claims.of_host(bk_host_id).map(|(id, _)| *id).collect()
    }

    #[test]
    fn claims_are_found_by_host_and_leave_the_index_with_their_task() {
        let mut claims = Claims::default();
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let mut receivers = Vec::new();
        for (id, host) in ids.iter().zip([1, 1, 2, 3]) {
            let (claimant, rx) = claimant(host, "a");
            claims.insert(*id, claimant);
            receivers.push(rx);
        }
        assert_eq!(of_host(&claims, 1), [ids[0], ids[1]].into());
        assert_eq!(of_host(&claims, 2), [ids[2]].into());
        // A task registered again for another host moves there.
        let (claimant, _rx) = claimant(2, "b");
        claims.insert(ids[3], claimant);
        assert!(of_host(&claims, 3).is_empty());
        assert_eq!(of_host(&claims, 2), [ids[2], ids[3]].into());
        assert!(!claims.by_host.contains_key(&3), "an empty host is dropped");
        assert_eq!(claims.remove(&ids[0]).map(|c| c.bk_host_id), Some(1));
        assert!(claims.remove(&ids[0]).is_none());
        assert_eq!(of_host(&claims, 1), [ids[1]].into());
        claims.remove(&ids[1]);
        assert!(!claims.by_host.contains_key(&1));
        assert_eq!(claims.get(&ids[2]).map(|c| c.bk_host_id), Some(2));
    }

    /// A refusal at epoch 2 stops the run that took the host at 1, not the one at 2 (this
    /// controller took the host back), nor a run of another step.
    #[test]
    fn a_refusal_stops_only_the_runs_below_the_hosts_epoch() {
        let mut claims = Claims::default();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let mut receivers = Vec::new();
        for (id, (step, epoch)) in ids.iter().zip([(1, 1), (1, 2), (9, 0)]) {
            let (mut claimant, rx) = claimant(5, "a");
            claimant.step_instance_id = step;
            claimant.epoch = epoch;
            claims.insert(*id, claimant);
            receivers.push(rx);
        }
        let stopped: HashSet<Uuid> = claims.fenced_out(1, 5, 2).map(|(id, _)| *id).collect();
        assert_eq!(stopped, [ids[0]].into());
        assert_eq!(claims.fenced_out(1, 5, 1).count(), 0);
    }
}
