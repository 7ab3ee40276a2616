//! Rolling steps: the hosts go out batch by batch, as the step's `rolling_config` says.
//!
//! Serial execution runs a batch, waits for all of its hosts, then looks at the mode: 2 goes
//! on; 1 pauses when the batch had a failed host (step and job failed, 4, as bk-job reports it);
//! 3 pauses after every batch but the last (waiting for the user, 7), and after a failed one as
//! 1 does. A pause ends this run: what remains is in the store (the plan, the batch that went
//! out last, the statuses), and an operator's decision starts a new run from the next batch
//! (`operate_step_instance`), on this controller or on one restarted since.
//!
//! Staggered execution starts batch k `fixed + random(min, max)` ms after batch k-1 without
//! waiting for it; the mode is ignored and any failed host fails the step.
//!
//! File steps roll the same way: a transfer reads its sources once per run (before its first
//! batch, into the content store, pinned until the run ends), and each batch's targets pull the
//! files from there; a `push_config_file` step's files are encoded once per run. A run that goes
//! on after a pause starts from the step as the store keeps it (the files a job holds, the
//! sources read again).
//!
//! Either way, once as many hosts failed as `max_failures` / `max_failure_percent` allow, no
//! further batch goes out and the job fails. Hosts of batches that never went out keep their
//! waiting status (5), as bk-job leaves them.

use std::{collections::HashMap, time::Duration};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::files::FileDispatch;
use super::{Engine, FileJobSpec, Finishing, JobSpec, RunOf, TransferSpec, now_ms};
use crate::{
    host_run::Limits,
    rolling::{Execution, Mode, RollingConfig},
    status::job,
};
use fleetrun_store::ResumableJob;
use fleetrun_store::Write;

/// Where a rolling run starts.
#[derive(Debug, Clone)]
pub struct RollingStart {
    pub config: RollingConfig,
    /// Every batch's hosts; `batches[0]` is batch 1.
    pub batches: Vec<Vec<i64>>,
    /// The batch to dispatch first (from 1).
    pub next_batch: usize,
    /// Hosts of earlier batches that failed, less those an operator chose to ignore.
    pub earlier_failures: usize,
    /// When the job first started; None for a job that starts now.
    pub started: Option<i64>,
}

/// What a step's hosts are sent: a script, or files.
#[derive(Debug, Clone)]
pub enum Work {
    Script(JobSpec),
    Files(FileStep),
}

/// A file step ready to run.
#[derive(Debug, Clone)]
pub enum FileStep {
    /// `push_config_file`.
    Push(FileJobSpec),
    /// `fast_transfer_file`.
    Transfer(TransferSpec),
}

impl Work {
    fn job_instance_id(&self) -> i64 {
        match self {
            Work::Script(spec) => spec.job_instance_id,
            Work::Files(FileStep::Push(spec)) => spec.job_instance_id,
            Work::Files(FileStep::Transfer(spec)) => spec.job_instance_id,
        }
    }
}

/// What a rolling run's batches dispatch to their hosts.
enum Dispatch<'a> {
    Script {
        request: Option<&'a fleetrun_proto::SharedTaskRequest>,
        limits: Limits,
    },
    Files(&'a FileDispatch),
}

/// A rolling job a restarted controller took up mid-way.
pub(super) struct ResumedRolling {
    config: RollingConfig,
    /// Hosts in the plan.
    hosts: usize,
    /// Failed hosts operators chose to ignore.
    failures_ignored: usize,
}

/// How a run of batches ended.
enum Ending {
    /// Every batch went out (or the job was terminated).
    Done,
    /// The failure limit was reached; later batches stay out.
    FailureLimit,
    /// Waiting for an operator: `step` and `job` statuses to show meanwhile.
    Paused { status: i32 },
}

impl Engine {
    /// Starts (or goes on with) a rolling step of either kind in the background; false if its
    /// job is running already.
    pub fn start_rolling_work(&self, work: Work, rolling: RollingStart) -> bool {
        let cancel = CancellationToken::new();
        let job_instance_id = work.job_instance_id();
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job_instance_id) {
                return false;
            }
            running.insert(job_instance_id, cancel.clone());
        }
        self.spawn_rolling(work, rolling, cancel);
        true
    }

    /// Starts a step that does not roll, of either kind; false if its job is running already.
    pub fn start_work(&self, work: Work) -> bool {
        match work {
            Work::Script(spec) => self.start(spec),
            Work::Files(FileStep::Push(spec)) => self.start_files(spec),
            Work::Files(FileStep::Transfer(spec)) => self.start_transfer(spec),
        }
    }

    /// Rolls a retried step on in the place `reservation` holds (see [`Engine::reserve`]).
    pub fn start_rolling_reserved(
        &self,
        reservation: super::Reservation,
        spec: JobSpec,
        rolling: RollingStart,
    ) {
        self.spawn_rolling(Work::Script(spec), rolling, reservation.take());
    }

    fn spawn_rolling(&self, work: Work, rolling: RollingStart, cancel: CancellationToken) {
        let job_instance_id = work.job_instance_id();
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
            let registered = match work {
                Work::Script(spec) => engine.run_rolling(spec, rolling, cancel).await,
                Work::Files(step) => engine.run_rolling_files(step, rolling, cancel).await,
            };
            if let Err(e) = engine.store.flush().await {
                tracing::error!(
                    job = job_instance_id,
                    "cannot commit the job's progress: {e}"
                );
            }
            // A pause left the set already; the job may be running again under a new run.
            if registered {
                engine.forget_handovers(job_instance_id).await;
                engine.running.lock().unwrap().remove(&job_instance_id);
                engine.run_left(job_instance_id);
            }
            engine.left_here.lock().unwrap().note(job_instance_id);
            engine.release_lease(job_instance_id).await;
        });
    }

    /// Runs the batches; false if the run paused and so left the running set.
    async fn run_rolling(
        &self,
        spec: JobSpec,
        rolling: RollingStart,
        cancel: CancellationToken,
    ) -> bool {
        let JobSpec {
            job_instance_id,
            step_instance_id,
            hosts: all_hosts,
            task,
        } = spec;
        let started = self
            .rolling_started(job_instance_id, step_instance_id, rolling.started)
            .await;
        let limits = self.limits(task.timeout_secs);
        let request = self.encode_request(job_instance_id, step_instance_id, task);
        let dispatch = Dispatch::Script {
            request: request.as_ref(),
            limits,
        };
        let ids = (job_instance_id, step_instance_id);
        self.roll(ids, all_hosts.len(), started, rolling, &cancel, &dispatch)
            .await
    }

    /// Runs the batches of a file step; false if the run paused and so left the running set.
    async fn run_rolling_files(
        &self,
        step: FileStep,
        rolling: RollingStart,
        cancel: CancellationToken,
    ) -> bool {
        let (job_instance_id, step_instance_id, hosts) = match &step {
            FileStep::Push(spec) => (
                spec.job_instance_id,
                spec.step_instance_id,
                spec.hosts.len(),
            ),
            FileStep::Transfer(spec) => (
                spec.job_instance_id,
                spec.step_instance_id,
                spec.targets.len(),
            ),
        };
        let ids = (job_instance_id, step_instance_id);
        let started = self
            .rolling_started(job_instance_id, step_instance_id, rolling.started)
            .await;
        match step {
            FileStep::Push(spec) => {
                let files = self.place_dispatch(&spec);
                drop(spec);
                self.roll(
                    ids,
                    hosts,
                    started,
                    rolling,
                    &cancel,
                    &Dispatch::Files(&files),
                )
                .await
            }
            FileStep::Transfer(spec) => {
                // The sources are read once for every batch of this run.
                let prepared = self.prepare_transfer(spec, &cancel).await;
                let registered = self
                    .roll(
                        ids,
                        hosts,
                        started,
                        rolling,
                        &cancel,
                        &Dispatch::Files(&prepared.dispatch),
                    )
                    .await;
                prepared.end(hosts);
                registered
            }
        }
    }

    /// When the job started: now (recorded) for a job that starts with this run.
    async fn rolling_started(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        started: Option<i64>,
    ) -> i64 {
        if let Some(started) = started {
            return started;
        }
        self.job_started_now(job_instance_id, step_instance_id)
            .await
    }

    /// Sends one batch's hosts their work.
    #[allow(clippy::too_many_arguments)]
    async fn dispatch_batch(
        &self,
        dispatch: &Dispatch<'_>,
        job_instance_id: i64,
        step_instance_id: i64,
        batch_hosts: &[i64],
        cancel: &CancellationToken,
        hosts: &mut JoinSet<i32>,
        host_of_task: &mut HashMap<tokio::task::Id, RunOf>,
    ) {
        match dispatch {
            Dispatch::Script { request, limits } => {
                self.spawn_hosts(
                    job_instance_id,
                    step_instance_id,
                    batch_hosts,
                    *request,
                    *limits,
                    cancel,
                    hosts,
                    host_of_task,
                )
                .await;
            }
            Dispatch::Files(files) => {
                self.spawn_file_hosts(
                    files,
                    job_instance_id,
                    step_instance_id,
                    batch_hosts,
                    cancel,
                    hosts,
                    host_of_task,
                )
                .await;
            }
        }
    }

    /// Dispatches the batches from `rolling.next_batch` on and ends the run as the mode says;
    /// false if the run paused and so left the running set.
    async fn roll(
        &self,
        (job_instance_id, step_instance_id): (i64, i64),
        host_count: usize,
        started: i64,
        rolling: RollingStart,
        cancel: &CancellationToken,
        dispatch: &Dispatch<'_>,
    ) -> bool {
        let RollingStart {
            config,
            batches,
            next_batch,
            earlier_failures,
            ..
        } = rolling;
        let failure_limit = config.failure_limit(host_count);
        let total = batches.len();
        // Failed hosts that count: against the limit, and for the job's status.
        let mut failures = earlier_failures;
        let mut hosts = JoinSet::new();
        let mut host_of_task = HashMap::new();
        let mut ending = Ending::Done;
        // Whether the last batch to end had a failed host (serial).
        let mut last_batch_failed = false;
        for (index, batch_hosts) in batches.iter().enumerate().skip(next_batch.max(1) - 1) {
            let batch = index + 1;
            if cancel.is_cancelled() {
                break;
            }
            if self.is_abandoned(job_instance_id) {
                // Another controller took the job up: the batches are that one's to roll.
                return true;
            }
            // A retry of a staggered step leaves the batches without a retried host empty.
            if batch_hosts.is_empty() {
                continue;
            }
            if failure_limit.is_some_and(|limit| failures >= limit) {
                ending = Ending::FailureLimit;
                break;
            }
            let batch_no = i32::try_from(batch).unwrap_or(i32::MAX);
            if let Err(e) = self
                .store
                .set_rolling_batch(step_instance_id, batch_no)
                .await
            {
                tracing::error!(job = job_instance_id, batch, "cannot record the batch: {e}");
            }
            tracing::info!(
                job = job_instance_id,
                batch,
                of = total,
                hosts = batch_hosts.len(),
                "rolling batch out"
            );
            self.dispatch_batch(
                dispatch,
                job_instance_id,
                step_instance_id,
                batch_hosts,
                cancel,
                &mut hosts,
                &mut host_of_task,
            )
            .await;
            let last = batch == total;
            match config.execution {
                Execution::Serial => {
                    let failed = self
                        .join_hosts(job_instance_id, step_instance_id, &mut hosts, &host_of_task)
                        .await;
                    host_of_task.clear();
                    failures += failed;
                    last_batch_failed = failed > 0;
                    if last || cancel.is_cancelled() {
                        break;
                    }
                    if failure_limit.is_some_and(|limit| failures >= limit) {
                        ending = Ending::FailureLimit;
                        break;
                    }
                    match config.mode {
                        Mode::IgnoreFailure => {}
                        Mode::PauseOnFailure | Mode::Confirm if failed > 0 => {
                            ending = Ending::Paused {
                                status: job::FAILED,
                            };
                            break;
                        }
                        Mode::PauseOnFailure => {}
                        Mode::Confirm => {
                            ending = Ending::Paused {
                                status: job::WAITING_USER,
                            };
                            break;
                        }
                    }
                }
                Execution::Staggered {
                    fixed_ms,
                    random_min_ms,
                    random_max_ms,
                } => {
                    if !last {
                        let wait = fixed_ms + rand::random_range(random_min_ms..=random_max_ms);
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                            () = cancel.cancelled() => {}
                        }
                    }
                    // Hosts of earlier batches that ended meanwhile count against the limit.
                    while let Some(joined) = hosts.try_join_next_with_id() {
                        if self
                            .host_ended(job_instance_id, step_instance_id, joined, &host_of_task)
                            .await
                        {
                            failures += 1;
                        }
                    }
                }
            }
        }
        // Staggered batches still out, or a serial batch cut short.
        let failed = self
            .join_hosts(job_instance_id, step_instance_id, &mut hosts, &host_of_task)
            .await;
        failures += failed;
        let finishing = Finishing {
            job_instance_id,
            step_instance_id,
            hosts: host_count,
            started,
            all_succeeded: failures == 0,
        };
        match ending {
            Ending::Paused { status } => {
                if self.pause(&finishing, status, cancel).await {
                    return false;
                }
                self.end_job(&finishing, job::TERMINATE_SUCCESS, job::TERMINATE_SUCCESS)
                    .await;
            }
            _ if cancel.is_cancelled() => {
                self.end_job(&finishing, job::TERMINATE_SUCCESS, job::TERMINATE_SUCCESS)
                    .await;
            }
            Ending::FailureLimit => {
                tracing::warn!(
                    job = job_instance_id,
                    failures,
                    "rolling stopped: the failure limit is reached"
                );
                self.end_job(&finishing, job::FAILED, job::FAILED).await;
            }
            Ending::Done if failures == 0 => {
                self.end_job(&finishing, job::SUCCESS, job::SUCCESS).await;
            }
            Ending::Done => {
                // bk-job: a step that rolls on over failures follows its last batch: "ignore
                // error" (6) if that batch failed, success otherwise, and the job goes on to
                // success; failures in any other rolling fail the job.
                if config.execution == Execution::Serial && config.mode == Mode::IgnoreFailure {
                    let step = if last_batch_failed {
                        job::IGNORE_ERROR
                    } else {
                        job::SUCCESS
                    };
                    self.end_job(&finishing, step, job::SUCCESS).await;
                } else {
                    self.end_job(&finishing, job::FAILED, job::FAILED).await;
                }
            }
        }
        true
    }

    /// Leaves the job waiting for an operator: failed (4, with an end time, as bk-job shows a
    /// batch that failed) or waiting for the user (7). Nothing is reported to the callback: the
    /// job has not ended.
    ///
    /// The run leaves the running set as soon as the pause is queued, in one step with a last
    /// look at `cancel` under the set's lock: a terminate either cancelled the run before (false
    /// is returned, and the caller ends the job terminated over the queued pause) or finds no
    /// run and ends the paused job in the store; a confirmation that saw the pause committed
    /// finds the run gone and can start the next one.
    async fn pause(&self, finishing: &Finishing, status: i32, cancel: &CancellationToken) -> bool {
        if cancel.is_cancelled() {
            return false;
        }
        let at = now_ms();
        if status == job::FAILED {
            self.write_for(
                finishing.job_instance_id,
                Write::StepFinished {
                    step_instance_id: finishing.step_instance_id,
                    status,
                    at,
                },
            )
            .await;
            self.write_for(
                finishing.job_instance_id,
                Write::JobFinished {
                    job_instance_id: finishing.job_instance_id,
                    status,
                    at,
                },
            )
            .await;
        } else {
            self.write_for(
                finishing.job_instance_id,
                Write::JobStatus {
                    job_instance_id: finishing.job_instance_id,
                    status,
                },
            )
            .await;
        }
        {
            let mut running = self.running.lock().unwrap();
            if cancel.is_cancelled() {
                return false;
            }
            running.remove(&finishing.job_instance_id);
            self.abandoned
                .lock()
                .unwrap()
                .remove(&finishing.job_instance_id);
        }
        self.left_here
            .lock()
            .unwrap()
            .note(finishing.job_instance_id);
        tracing::info!(
            job = finishing.job_instance_id,
            status,
            "rolling paused, waiting for an operator"
        );
        true
    }

    /// For a job taken up after a restart: if it rolls with batches still to go, keeps only the
    /// hosts of the batches that went out (the later ones keep waiting) and answers its plan.
    pub(super) async fn rolling_in_flight(&self, job: &mut ResumableJob) -> Option<ResumedRolling> {
        let record = match self.store.rolling(job.step_instance_id).await {
            Ok(Some(record)) => record,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(
                    job = job.job_instance_id,
                    "cannot read the rolling plan: {e}"
                );
                return None;
            }
        };
        if record.current_batch >= record.total_batches {
            return None;
        }
        let (batches, config) = match (
            self.store.host_batches(job.step_instance_id).await,
            serde_json::from_str::<RollingConfig>(&record.config),
        ) {
            (Ok(batches), Ok(config)) => (batches, config),
            (Err(e), _) => {
                tracing::error!(
                    job = job.job_instance_id,
                    "cannot read the rolling plan: {e}"
                );
                return None;
            }
            (_, Err(e)) => {
                tracing::error!(
                    job = job.job_instance_id,
                    "cannot read the rolling plan: {e}"
                );
                return None;
            }
        };
        job.hosts.retain(|h| {
            batches
                .get(&h.bk_host_id)
                .is_none_or(|&batch| batch <= record.current_batch)
        });
        Some(ResumedRolling {
            config,
            hosts: batches.len(),
            failures_ignored: usize::try_from(record.failures_ignored).unwrap_or(0),
        })
    }

    /// Waits for the batch a restarted controller took up, then stops for an operator, as the
    /// mode says: the failure limit reached ends the job failed (4); failures that count (not
    /// ignored) pause it failed (4) unless the mode rolls on over them; otherwise it waits for a
    /// confirmation (7). The engine no longer holds the task to send later batches; the
    /// operator's decision starts a new run with it. False if the job paused and so left the
    /// running set.
    pub(super) async fn finish_resumed_batch(
        &self,
        finishing: Finishing,
        mut hosts: JoinSet<i32>,
        host_of_task: HashMap<tokio::task::Id, super::RunOf>,
        cancel: &CancellationToken,
        rolling: ResumedRolling,
    ) -> bool {
        self.join_hosts(
            finishing.job_instance_id,
            finishing.step_instance_id,
            &mut hosts,
            &host_of_task,
        )
        .await;
        if cancel.is_cancelled() {
            self.end_job(&finishing, job::TERMINATE_SUCCESS, job::TERMINATE_SUCCESS)
                .await;
            return true;
        }
        // Every host of the batches out has its result in the store once it is committed.
        if let Err(e) = self.store.flush().await {
            tracing::error!(job = finishing.job_instance_id, "cannot commit: {e}");
        }
        let failed = match self
            .store
            .failed_hosts(
                finishing.step_instance_id,
                crate::status::host::UNFINISHED,
                crate::status::host::SUCCEEDED,
            )
            .await
        {
            Ok(failed) => failed.saturating_sub(rolling.failures_ignored),
            Err(e) => {
                tracing::error!(
                    job = finishing.job_instance_id,
                    "cannot count failures: {e}"
                );
                usize::from(!finishing.all_succeeded)
            }
        };
        if rolling
            .config
            .failure_limit(rolling.hosts)
            .is_some_and(|limit| failed >= limit)
        {
            self.end_job(&finishing, job::FAILED, job::FAILED).await;
            return true;
        }
        let rolls_on = rolling.config.execution == Execution::Serial
            && rolling.config.mode == Mode::IgnoreFailure;
        let status = if failed > 0 && !rolls_on {
            job::FAILED
        } else {
            job::WAITING_USER
        };
        if self.pause(&finishing, status, cancel).await {
            return false;
        }
        self.end_job(&finishing, job::TERMINATE_SUCCESS, job::TERMINATE_SUCCESS)
            .await;
        true
    }
}
