//! Hosts whose agents are connected to another controller sharing the database.
//!
//! The controller holding a job's lease dispatches to the agents connected to it and hands each
//! other target to the controller its agent is connected to (`Store::hand_over`, announced): that
//! controller takes it ([`Engine::take_handed`]) and runs the host as one of its own, a *part* of
//! the job, recording output and status in the store as for its own hosts. The lease holder
//! follows handed hosts through the store ([`Engine::follow_handed`], woken by the committing
//! controller's `NOTIFY`) and ends the job once every host is final.
//!
//! When the controller holding a handed host stops renewing, its agent reconnects elsewhere and
//! claims the task there, which takes the host over (`Engine::take_up_handed`); a task that was
//! never delivered is handed again to wherever its agent is now; a host whose agent never comes
//! back ends 310 at its deadline, written by the lease holder.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use fleetrun_proto::HeldTask;
use fleetrun_store::{HostOutcome, Write};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Claimant, Engine, RunOf, TaskTemplate, follow::HostRun, now_ms};
use crate::{host_run::Limits, status::host};

/// How often a follower of handed hosts reads their statuses without news, and looks whether
/// the controllers holding them still renew.
const HANDED_POLL: Duration = Duration::from_secs(1);
/// The shortest time between two reads of handed hosts' statuses (each commit wakes them).
const HANDED_MIN_READ: Duration = Duration::from_millis(100);

/// The parts of jobs this controller runs for other controllers' leases: each job's cancel
/// token and the (step, host) of each of its runs here, until its end is queued.
pub(super) type Parts = std::sync::Mutex<HashMap<i64, (CancellationToken, Vec<(i64, i64)>)>>;

impl Engine {
    /// The cluster membership, with controllers sharing the database.
    pub(crate) fn membership(&self) -> Option<&crate::cluster::Membership> {
        self.membership.as_ref()
    }

    /// Hands the hosts of `away` (not connected here) whose agents are connected to another
    /// live controller over to it; returns them, each with the epoch it was handed at. Nothing
    /// without a membership. An agent that connected here meanwhile is recorded as this
    /// controller's, so its host is not handed.
    pub(super) async fn hand_over_remote(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        away: &[i64],
    ) -> HashMap<i64, i64> {
        let Some(membership) = &self.membership else {
            return HashMap::new();
        };
        let alive_since = match membership.alive_since().await {
            Ok(alive_since) => alive_since,
            Err(e) => {
                // Not handed: followed here, they end 310 (offline here), as without a cluster.
                tracing::error!(
                    job = job_instance_id,
                    "cannot read the database's clock: {e}"
                );
                return HashMap::new();
            }
        };
        let elsewhere = match self
            .store
            .connected_elsewhere(away, membership.name(), alive_since)
            .await
        {
            Ok(elsewhere) => elsewhere,
            Err(e) => {
                tracing::error!(
                    job = job_instance_id,
                    "cannot look up which controllers hold the agents: {e}"
                );
                return HashMap::new();
            }
        };
        if elsewhere.is_empty() {
            return HashMap::new();
        }
        let mut handed: Vec<(i64, String)> = elsewhere.into_iter().collect();
        handed.sort_unstable();
        let epochs = match self
            .store
            .hand_over(job_instance_id, step_instance_id, &handed)
            .await
        {
            Ok(epochs) => epochs,
            Err(e) => {
                // Not handed: followed here, they end 310 (offline here), as without a cluster.
                tracing::error!(
                    job = job_instance_id,
                    "cannot hand hosts over to the controllers holding their agents: {e}"
                );
                return HashMap::new();
            }
        };
        tracing::info!(
            job = job_instance_id,
            hosts = handed.len(),
            "hosts handed to the controllers holding their agents"
        );
        epochs
    }

    /// The epochs of the step's hosts, for the runs that take them here: read again after a
    /// failure (the database is away; its writes wait too) until it succeeds, a cancelled run
    /// included. A host taken over before (a retried step's) is past the first epoch: a run
    /// that assumed the first would have even its end refused, and the host would stay
    /// unfinished.
    pub(super) async fn dispatch_epochs(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
    ) -> HashMap<i64, i64> {
        loop {
            match self.store.host_epochs(step_instance_id).await {
                Ok(epochs) => return epochs,
                Err(e) => tracing::warn!(
                    job = job_instance_id,
                    "cannot read the hosts' epochs before dispatching them: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Follows handed hosts through the store until each is final: their statuses, written by
    /// whichever controller runs them, and the liveness of those controllers (a host handed to
    /// one that stopped renewing is handed again where its agent is now, or ends 310 at its
    /// deadline). Returns each host's final status as it comes.
    pub(super) fn follow_handed(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        hosts: &[i64],
        limits: Limits,
    ) -> Vec<(i64, oneshot::Receiver<i32>)> {
        let mut senders = HashMap::with_capacity(hosts.len());
        let mut receivers = Vec::with_capacity(hosts.len());
        for bk_host_id in hosts.iter().copied() {
            let (tx, rx) = oneshot::channel();
            senders.insert(bk_host_id, tx);
            receivers.push((bk_host_id, rx));
        }
        let engine = self.clone();
        tokio::spawn(async move {
            engine
                .follow_handed_hosts(job_instance_id, step_instance_id, senders, limits)
                .await;
        });
        receivers
    }

    async fn follow_handed_hosts(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        mut pending: HashMap<i64, oneshot::Sender<i32>>,
        limits: Limits,
    ) {
        let watch = self.store.watch_job(job_instance_id, step_instance_id);
        // Hosts whose controller stopped renewing: when that was first seen.
        let mut orphaned: HashMap<i64, i64> = HashMap::new();
        let mut last_liveness = Instant::now();
        while !pending.is_empty() {
            if self.is_abandoned(job_instance_id) {
                return;
            }
            let hosts: Vec<i64> = pending.keys().copied().collect();
            match self
                .store
                .final_host_statuses(step_instance_id, &hosts, host::UNFINISHED)
                .await
            {
                Ok(statuses) => {
                    for (bk_host_id, status) in statuses {
                        if let Some(tx) = pending.remove(&bk_host_id) {
                            let _ = tx.send(status);
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    job = job_instance_id,
                    "cannot read the statuses of hosts run by other controllers: {e}"
                ),
            }
            if pending.is_empty() {
                return;
            }
            if last_liveness.elapsed() >= HANDED_POLL {
                last_liveness = Instant::now();
                self.look_after_orphans(
                    job_instance_id,
                    step_instance_id,
                    &mut pending,
                    &mut orphaned,
                    limits,
                )
                .await;
            }
            tokio::select! {
                () = watch.changed() => {}
                () = tokio::time::sleep(HANDED_POLL) => {}
            }
            tokio::time::sleep(HANDED_MIN_READ).await;
        }
    }

    /// Handed hosts whose controller stopped renewing: a task never delivered is handed again
    /// to the controller its agent is connected to now (this one included); a delivered one
    /// waits for its agent to claim it somewhere; either ends 310 at its deadline.
    async fn look_after_orphans(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        pending: &mut HashMap<i64, oneshot::Sender<i32>>,
        orphaned: &mut HashMap<i64, i64>,
        limits: Limits,
    ) {
        let Some(membership) = &self.membership else {
            return;
        };
        let alive_since = match membership.alive_since().await {
            Ok(alive_since) => alive_since,
            Err(e) => {
                tracing::warn!(
                    job = job_instance_id,
                    "cannot read the database's clock: {e}"
                );
                return;
            }
        };
        let handovers = match self
            .store
            .handovers_of_step(step_instance_id, alive_since)
            .await
        {
            Ok(handovers) => handovers,
            Err(e) => {
                tracing::warn!(job = job_instance_id, "cannot read the handovers: {e}");
                return;
            }
        };
        let me = membership.name();
        for (bk_host_id, handover) in &handovers {
            if !pending.contains_key(bk_host_id) {
                continue;
            }
            // This controller's own part is as alive as this controller, while it runs.
            let alive = if handover.controller == me {
                !handover.taken
                    || self.runs_part_host(job_instance_id, step_instance_id, *bk_host_id)
            } else {
                handover.alive
            };
            let now = now_ms();
            if alive {
                orphaned.remove(bk_host_id);
                // A live holder ends the host by its deadline itself; one that does not (stalled,
                // or its run lost) has it ended here later, whatever its heartbeat says. The task
                // started after it was handed: nothing to read before this.
                let backstop = handover
                    .handed_at
                    .saturating_add(limits.timeout_ms)
                    .saturating_add(limits.grace_ms.saturating_mul(2));
                if now < backstop {
                    continue;
                }
                let stored = self
                    .store
                    .stored_task(step_instance_id, *bk_host_id)
                    .await
                    .ok()
                    .flatten();
                // A task not started (queued behind the agent's other tasks) has no deadline:
                // no bound on its wait while its holder lives, as for a host run here.
                let Some(deadline) = stored.and_then(|s| s.checkpoint.deadline) else {
                    continue;
                };
                if now < deadline.saturating_add(limits.grace_ms.saturating_mul(2)) {
                    continue;
                }
                let tag = format!(
                    "controller {} holding the host did not record its end by the task's deadline",
                    handover.controller
                );
                self.end_handed_host(
                    job_instance_id,
                    step_instance_id,
                    *bk_host_id,
                    handover,
                    tag,
                    pending,
                )
                .await;
                continue;
            }
            let first_seen = *orphaned.entry(*bk_host_id).or_insert(now);
            let stored = self
                .store
                .stored_task(step_instance_id, *bk_host_id)
                .await
                .ok()
                .flatten();
            let delivered = handover.taken && stored.is_some();
            if !delivered {
                // Never delivered: where is its agent now?
                if let Ok(Some(holder)) =
                    self.store.connection_holder(*bk_host_id, alive_since).await
                    && (holder != handover.controller)
                {
                    match self
                        .store
                        .hand_over_again(
                            step_instance_id,
                            *bk_host_id,
                            &handover.controller,
                            &holder,
                        )
                        .await
                    {
                        Ok(true) => {
                            tracing::warn!(
                                job = job_instance_id,
                                bk_host_id,
                                from = handover.controller,
                                to = holder,
                                "a host handed to a controller that stopped is handed again"
                            );
                            orphaned.remove(bk_host_id);
                            continue;
                        }
                        Ok(false) => continue,
                        Err(e) => tracing::warn!(job = job_instance_id, "cannot hand over: {e}"),
                    }
                }
            }
            // An agent goes back to the controller that sent it a task until the task's
            // deadline (its timeout plus the grace), and only then to another: it is waited for
            // a grace beyond that.
            let deadline = match stored.as_ref().and_then(|s| s.checkpoint.deadline) {
                Some(deadline) if delivered => deadline.max(first_seen),
                _ => first_seen.saturating_add(limits.timeout_ms),
            }
            .saturating_add(limits.grace_ms.saturating_mul(2));
            if now < deadline {
                continue;
            }
            // Its agent did not come back: the host ends here, once.
            let tag = format!(
                "controller {} holding the agent's connection stopped, and the agent did not come \
                 back before the task's deadline",
                handover.controller
            );
            self.end_handed_host(
                job_instance_id,
                step_instance_id,
                *bk_host_id,
                handover,
                tag,
                pending,
            )
            .await;
        }
    }

    /// Ends a handed host 310 here, once: only if its holder still holds it and it is
    /// unfinished (one conditional take-over, so neither another controller nor its holder's
    /// late end is written over).
    async fn end_handed_host(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        bk_host_id: i64,
        handover: &fleetrun_store::Handover,
        tag: String,
        pending: &mut HashMap<i64, oneshot::Sender<i32>>,
    ) {
        let Some(membership) = &self.membership else {
            return;
        };
        let epoch = match self
            .store
            .take_over_handover(
                job_instance_id,
                step_instance_id,
                bk_host_id,
                membership.name(),
                Some(&handover.controller),
                host::UNFINISHED,
            )
            .await
        {
            Ok(Some(epoch)) => epoch,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(job = job_instance_id, "cannot take the host over: {e}");
                return;
            }
        };
        tracing::warn!(job = job_instance_id, bk_host_id, "{tag}");
        // At the epoch of the take-over: should the holder only have stalled, its late end is
        // refused, and this one stands.
        self.write_for(
            job_instance_id,
            Write::HostFinished {
                stored: None,
                step_instance_id,
                bk_host_id,
                outcome: HostOutcome {
                    status: host::AGENT_ABNORMAL,
                    tag,
                    end_time: now_ms(),
                    ..HostOutcome::default()
                },
                epoch,
            },
        )
        .await;
        if let Some(tx) = pending.remove(&bk_host_id) {
            let _ = tx.send(host::AGENT_ABNORMAL);
        }
    }

    /// The final status of a host whose task another controller took over, once the store
    /// shows it (followed as a handed host).
    pub(super) async fn moved_host_end(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        bk_host_id: i64,
        limits: Limits,
    ) -> i32 {
        let mut followed =
            self.follow_handed(job_instance_id, step_instance_id, &[bk_host_id], limits);
        match followed.pop() {
            Some((_, rx)) => rx.await.unwrap_or(host::AGENT_ABNORMAL),
            None => host::AGENT_ABNORMAL,
        }
    }

    /// Whether another controller took the (step, host) over (its agent claimed the task there).
    pub(super) async fn taken_elsewhere(&self, step_instance_id: i64, bk_host_id: i64) -> bool {
        let Some(membership) = &self.membership else {
            return false;
        };
        matches!(
            self.store.handover(step_instance_id, bk_host_id, 0).await,
            Ok(Some(h)) if h.taken && h.controller != membership.name()
        )
    }

    /// Whether a run of the (step, host) as a part of the job is under way here (its end not
    /// queued yet, though it may have let its claim go).
    pub(super) fn runs_part_host(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        bk_host_id: i64,
    ) -> bool {
        self.parts
            .lock()
            .unwrap()
            .get(&job_instance_id)
            .is_some_and(|(_, hosts)| hosts.contains(&(step_instance_id, bk_host_id)))
    }

    /// A place among the job's parts here, for one host; its cancel token.
    fn enter_part(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        bk_host_id: i64,
    ) -> CancellationToken {
        let mut parts = self.parts.lock().unwrap();
        let (cancel, hosts) = parts.entry(job_instance_id).or_default();
        hosts.push((step_instance_id, bk_host_id));
        cancel.clone()
    }

    fn leave_part(&self, job_instance_id: i64, step_instance_id: i64, bk_host_id: i64) {
        let mut parts = self.parts.lock().unwrap();
        if let Some((_, hosts)) = parts.get_mut(&job_instance_id) {
            if let Some(at) = hosts
                .iter()
                .position(|h| *h == (step_instance_id, bk_host_id))
            {
                hosts.swap_remove(at);
            }
            if hosts.is_empty() {
                parts.remove(&job_instance_id);
            }
        }
    }

    /// Runs one host of a part in the background, and gives its place up once it ended. A run
    /// that dies before recording a final status has one recorded for it, so the lease holder
    /// following the host through the store is not left waiting.
    fn spawn_part(&self, run: HostRun) {
        let engine = self.clone();
        let (job_instance_id, step_instance_id, bk_host_id, epoch) = (
            run.job_instance_id,
            run.step_instance_id,
            run.bk_host_id,
            run.epoch,
        );
        tokio::spawn(async move {
            if let Err(e) = tokio::spawn(run.run()).await {
                tracing::error!(job = job_instance_id, bk_host_id, "host task failed: {e}");
                engine
                    .record_part(
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
            }
            engine.leave_part(job_instance_id, step_instance_id, bk_host_id);
        });
    }

    /// Takes the hosts handed to this controller and runs each as a part of its job: the task
    /// as the store has the step (the lease holder checked it before it handed it over).
    pub(crate) async fn take_handed(&self) {
        let Some(membership) = &self.membership else {
            return;
        };
        let handed = match self.store.take_handovers(membership.name()).await {
            Ok(handed) => handed,
            Err(e) => {
                tracing::warn!("cannot take the hosts handed to this controller: {e}");
                return;
            }
        };
        if handed.is_empty() {
            return;
        }
        // Each host with the epoch it was handed at, which its writes here carry.
        let mut by_step: HashMap<(i64, i64), Vec<(i64, i64)>> = HashMap::new();
        for handover in handed {
            by_step
                .entry((handover.job_instance_id, handover.step_instance_id))
                .or_default()
                .push((handover.bk_host_id, handover.epoch));
        }
        let cancelled: HashSet<i64> = self
            .store
            .cancel_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        for ((job_instance_id, step_instance_id), hosts) in by_step {
            tracing::info!(
                job = job_instance_id,
                hosts = hosts.len(),
                "running hosts handed over by the controller holding the job"
            );
            let task = match self
                .stored_template(job_instance_id, step_instance_id)
                .await
            {
                Ok(task) => task,
                Err(why) => {
                    for (bk_host_id, epoch) in hosts {
                        self.write_for(
                            job_instance_id,
                            Write::HostFinished {
                                stored: None,
                                step_instance_id,
                                bk_host_id,
                                outcome: HostOutcome {
                                    status: host::AGENT_TASK_ERROR,
                                    tag: format!("the controller holding the agent cannot run the task: {why}"),
                                    end_time: now_ms(),
                                    ..HostOutcome::default()
                                },
                                epoch,
                            },
                        )
                        .await;
                    }
                    continue;
                }
            };
            let limits = self.limits(task.timeout_secs);
            let request = self.encode_request(job_instance_id, step_instance_id, task);
            for (bk_host_id, epoch) in hosts {
                let cancel = self.enter_part(job_instance_id, step_instance_id, bk_host_id);
                if cancelled.contains(&job_instance_id) {
                    cancel.cancel();
                }
                self.spawn_part(HostRun {
                    engine: self.clone(),
                    job_instance_id,
                    step_instance_id,
                    bk_host_id,
                    request: request.clone(),
                    resume: None,
                    limits,
                    cancel,
                    moved: false,
                    epoch,
                });
            }
        }
    }

    /// The step's task as the store has it, its sealed parameter opened.
    async fn stored_template(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
    ) -> Result<TaskTemplate, String> {
        let job = self
            .store
            .job(job_instance_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("its job is gone")?;
        let step = job
            .steps
            .iter()
            .find(|s| s.step_instance_id == step_instance_id)
            .ok_or("its step is gone")?;
        let (script, param) = self
            .store
            .step_payload(step_instance_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("its step is gone")?;
        let param = if step.is_param_sensitive {
            let cipher = self
                .cipher
                .as_ref()
                .ok_or("no key to open its sealed parameter")?;
            cipher
                .open(&param, job_instance_id, step_instance_id)
                .map_err(|e| e.to_string())?
        } else {
            param
        };
        Ok(TaskTemplate {
            script_language: step.script_language,
            script: std::sync::Arc::new(script),
            script_param: param,
            is_param_sensitive: step.is_param_sensitive,
            account: step.account.clone(),
            timeout_secs: u32::try_from(step.timeout).unwrap_or(u32::MAX),
        })
    }

    /// Terminations asked through other controllers: each job running here (its lease, or a
    /// part) is terminated.
    pub(crate) async fn act_on_cancels(&self) {
        let asked = match self.store.cancel_requests().await {
            Ok(asked) => asked,
            Err(e) => {
                tracing::warn!("cannot read the terminations asked: {e}");
                return;
            }
        };
        for job_instance_id in asked {
            if let Some((cancel, _)) = self.parts.lock().unwrap().get(&job_instance_id) {
                cancel.cancel();
            }
            if self.is_running(job_instance_id) {
                self.terminate_here(job_instance_id).await;
            }
        }
    }

    /// Runs followed here whose (step, host) another controller took over (their agent claimed
    /// the task there): told so, they stop and wait for the store to show the host's end.
    pub(crate) async fn release_moved(&self) {
        let Some(membership) = &self.membership else {
            return;
        };
        let hosts: Vec<i64> = self
            .claims
            .lock()
            .unwrap()
            .by_host
            .keys()
            .copied()
            .collect();
        if hosts.is_empty() {
            return;
        }
        let moved = match self
            .store
            .tasks_taken_elsewhere(&hosts, membership.name())
            .await
        {
            Ok(moved) => moved,
            Err(e) => {
                tracing::warn!("cannot read the tasks other controllers took over: {e}");
                return;
            }
        };
        let claims = self.claims.lock().unwrap();
        for task_id in moved {
            let Ok(task_id) = task_id.parse::<Uuid>() else {
                continue;
            };
            if let Some(claimant) = claims.get(&task_id) {
                let _ = claimant.tx.send(super::Reattach::Moved);
            }
        }
    }

    /// Runs here of (step, host) pairs whose writes the store refused because another
    /// controller took them over (this one stalled meanwhile), each with the epoch the host is
    /// at now: the runs below it are told so, stop recording and wait for the store to show the
    /// host's end, which is the taker's.
    pub(crate) fn stop_fenced(&self, fenced: &[(i64, i64, i64)]) {
        let claims = self.claims.lock().unwrap();
        for (step_instance_id, bk_host_id, epoch) in fenced {
            for (task_id, claimant) in claims.fenced_out(*step_instance_id, *bk_host_id, *epoch) {
                tracing::warn!(
                    step = step_instance_id,
                    bk_host_id,
                    %task_id,
                    "another controller took this host over: its run here stops"
                );
                let _ = claimant.tx.send(super::Reattach::Fenced);
            }
        }
    }

    /// The handover of the claimed task's step on the claiming agent's host, if it was handed
    /// over.
    pub(super) async fn current_handover(
        &self,
        bk_host_id: i64,
        held: &HeldTask,
    ) -> Result<Option<fleetrun_store::Handover>, String> {
        self.store
            .handover(held.step_instance_id, bk_host_id, 0)
            .await
            .map_err(|e| format!("the store cannot say who holds the host: {e}"))
    }

    /// A claim to a task of a job whose lease another controller holds, or of a job run here
    /// whose task this controller does not follow (handed to another controller): its agent is
    /// connected here now, so the host is taken over from `previous` (its handover as read, none
    /// if never handed) and run here as a part of the job. The take-over is one conditional
    /// statement: it fails if another controller took the host meanwhile or the host ended;
    /// a take-up that fails after it gives the host back. True once the claim can be routed.
    /// The caller holds `taking_up`, so that two claims to one task take it up once.
    pub(super) async fn take_up_handed(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        held: &HeldTask,
        previous: Option<fleetrun_store::Handover>,
    ) -> Result<bool, String> {
        let Some(membership) = &self.membership else {
            return Err(format!(
                "another controller holds the lease of its job {}",
                held.job_instance_id
            ));
        };
        let me = membership.name();
        let job_instance_id = held.job_instance_id;
        let step_instance_id = held.step_instance_id;
        if self.claims.lock().unwrap().get(&held.task_id).is_some() {
            return Ok(true);
        }
        if previous.as_ref().is_some_and(|h| h.controller == me)
            && self.runs_part_host(job_instance_id, step_instance_id, bk_host_id)
        {
            // Its run here let its claim go and is recording its end: not run twice.
            return Ok(true);
        }
        let job = self
            .store
            .job(job_instance_id)
            .await
            .map_err(|e| format!("the store cannot give its job: {e}"))?
            .ok_or("its job is gone")?;
        let step = job
            .steps
            .iter()
            .find(|s| s.step_instance_id == step_instance_id)
            .ok_or("its step is gone")?;
        let epoch = self
            .store
            .take_over_handover(
                job_instance_id,
                step_instance_id,
                bk_host_id,
                me,
                previous.as_ref().map(|h| h.controller.as_str()),
                host::UNFINISHED,
            )
            .await
            .map_err(|e| format!("cannot take the host over: {e}"))?
            .ok_or("its host ended, or another controller took it over, meanwhile")?;
        let taken_up = async {
            let checkpoint = self
                .store
                .take_up_host(step_instance_id, bk_host_id, host::UNFINISHED)
                .await
                .map_err(|e| format!("the store cannot give the task: {e}"))?
                .ok_or("its host ended meanwhile")?;
            if checkpoint.task_id != held.task_id.to_string() || checkpoint.agent_id != agent_id {
                return Err("the store has another task out on this host".to_owned());
            }
            Ok(checkpoint)
        }
        .await;
        let mut checkpoint = match taken_up {
            Ok(checkpoint) => checkpoint,
            Err(why) => {
                if let Err(e) = self
                    .store
                    .give_back_handover(step_instance_id, bk_host_id, me, previous.as_ref(), epoch)
                    .await
                {
                    tracing::warn!(
                        job = job_instance_id,
                        bk_host_id,
                        "cannot give back a host whose take-up failed: {e}"
                    );
                }
                return Err(why);
            }
        };
        let limits = self.limits(u32::try_from(step.timeout).unwrap_or(u32::MAX));
        // The agent went back to the controller that sent the task until the task's deadline,
        // and only then came here: it has a grace from now to deliver what it holds.
        if let Some(deadline) = &mut checkpoint.deadline {
            *deadline = (*deadline).max(now_ms().saturating_add(limits.grace_ms));
        }
        tracing::info!(
            job = job_instance_id,
            bk_host_id,
            agent_id,
            task_id = %held.task_id,
            "an agent claims a task of a job another controller holds: following it here"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        self.claims.lock().unwrap().insert(
            held.task_id,
            Claimant {
                step_instance_id,
                bk_host_id,
                epoch,
                agent_id: agent_id.to_owned(),
                tx,
            },
        );
        self.prepared.lock().unwrap().insert(held.task_id, rx);
        let cancel = self.enter_part(job_instance_id, step_instance_id, bk_host_id);
        if [crate::status::job::TERMINATING].contains(&job.status) {
            cancel.cancel();
        }
        self.spawn_part(HostRun {
            engine: self.clone(),
            job_instance_id,
            step_instance_id,
            bk_host_id,
            request: None,
            resume: Some(checkpoint),
            limits,
            cancel,
            moved: false,
            epoch,
        });
        Ok(true)
    }

    /// Spawns the runs of `targets`: a [`HostRun`] for each host connected here or nowhere, a
    /// follower through the store for each host handed to the controller holding its agent.
    /// The hosts connected here go first: handing the others over takes a few statements
    /// (hundreds of milliseconds for thousands of hosts on a busy database), which they need
    /// not wait for. Their epochs are read before the handover, which advances only the epochs
    /// of the hosts it hands.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn spawn_hosts(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        targets: &[i64],
        request: Option<&fleetrun_proto::SharedTaskRequest>,
        limits: Limits,
        cancel: &CancellationToken,
        hosts: &mut tokio::task::JoinSet<i32>,
        host_of_task: &mut HashMap<tokio::task::Id, RunOf>,
    ) {
        let epochs = self
            .dispatch_epochs(job_instance_id, step_instance_id)
            .await;
        let (here, away): (Vec<i64>, Vec<i64>) = targets
            .iter()
            .copied()
            .partition(|h| self.membership.is_none() || self.agents.get(*h).is_some());
        let mut spawn = |bk_host_id: i64| {
            let epoch = epochs
                .get(&bk_host_id)
                .copied()
                .unwrap_or(fleetrun_store::FIRST_EPOCH);
            let run = HostRun {
                engine: self.clone(),
                job_instance_id,
                step_instance_id,
                bk_host_id,
                request: request.cloned(),
                resume: None,
                limits,
                cancel: cancel.clone(),
                moved: false,
                epoch,
            };
            let handle = hosts.spawn(run.run());
            host_of_task.insert(handle.id(), RunOf { bk_host_id, epoch });
        };
        here.into_iter().for_each(&mut spawn);
        if away.is_empty() {
            return;
        }
        let handed = self
            .hand_over_remote(job_instance_id, step_instance_id, &away)
            .await;
        away.iter()
            .copied()
            .filter(|h| !handed.contains_key(h))
            .for_each(&mut spawn);
        if handed.is_empty() {
            return;
        }
        let mut handed: Vec<(i64, i64)> = handed.into_iter().collect();
        handed.sort_unstable();
        self.spawn_followers(
            job_instance_id,
            step_instance_id,
            &handed,
            limits,
            hosts,
            host_of_task,
        );
    }

    /// Follows `handed` (each host with the epoch it was handed at) through the store, one
    /// joinable entry per host.
    pub(super) fn spawn_followers(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        handed: &[(i64, i64)],
        limits: Limits,
        hosts: &mut tokio::task::JoinSet<i32>,
        host_of_task: &mut HashMap<tokio::task::Id, RunOf>,
    ) {
        let epochs: HashMap<i64, i64> = handed.iter().copied().collect();
        let ids: Vec<i64> = handed.iter().map(|(h, _)| *h).collect();
        for (bk_host_id, rx) in self.follow_handed(job_instance_id, step_instance_id, &ids, limits)
        {
            // A follower that stops (the run was abandoned) leaves the host to the new holder.
            let handle = hosts.spawn(async move { rx.await.unwrap_or(host::AGENT_ABNORMAL) });
            let epoch = epochs[&bk_host_id];
            host_of_task.insert(handle.id(), RunOf { bk_host_id, epoch });
        }
    }
}
