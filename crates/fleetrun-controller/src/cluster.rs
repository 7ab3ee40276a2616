//! Several controllers on one PostgreSQL database.
//!
//! Each controller has a name (`[cluster] name`, one live controller per name and database: the
//! store refuses a second), registers itself with its addresses, and renews a heartbeat and its
//! leases every third of `[cluster] lease_secs`. Each running job's bookkeeping (ending it,
//! reporting it to the callback dispatcher, rolling its batches) belongs to the controller
//! holding its lease (`job_lease`): the engine takes it when it starts a job, checks it before it
//! ends one, and gives it up once the end is committed. A controller that stops renewing (dead,
//! or cut off from the database) loses its leases when they expire; another controller takes them
//! (one conditional statement, so one taker) and takes their jobs up exactly as a restart does
//! (`crate::take_up_unfinished`): hosts whose task is out on an agent that owns it wait for it
//! to come back and claim it, the others end 310.
//!
//! A job reaches every target host whichever controller holds its agent's connection: the
//! gateway records each connection in the store (`agent_connection`, counted only while its
//! controller renews), the lease holder hands the hosts connected elsewhere to their
//! controllers (`engine/handover.rs`), which run them and record them; news of handovers and
//! terminations wakes the task [`Membership::run`] follows it in (apart from the renewals, which
//! never wait behind it), news of revocations and rule changes wakes [`follow_trust`].
//! Heartbeats, leases and handovers read the database's clock, never a controller's own.
//!
//! Only with a `[cluster]` section (PostgreSQL only): without one, a controller is alone on its
//! database, holds it exclusively and takes no leases, as on SQLite.

use std::time::Duration;

use fleetrun_store::{Database, Store};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{engine::Engine, status};

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This controller's name, unique among the controllers sharing the database (letters,
    /// digits, `.`, `_`, `-`; at most 64). Kept across restarts: a restarted controller takes its
    /// own leases back at once.
    pub name: String,
    /// How long a lease lasts without renewal (renewed every third of it): how long a dead
    /// controller's jobs wait before another takes them up.
    pub lease_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: fleetrun_store::DEFAULT_CONTROLLER.to_owned(),
            lease_secs: 15,
        }
    }
}

impl ClusterConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "name {:?}: 1 to 64 letters, digits, '.', '_' or '-'",
                self.name
            ));
        }
        if !(3..=600).contains(&self.lease_secs) {
            return Err(format!("lease_secs {}: between 3 and 600", self.lease_secs));
        }
        Ok(())
    }
}

/// The job statuses whose bookkeeping is leased: a run of the job is in some controller's
/// memory. A rolling job waiting for an operator (7) has none; it is leased again by the
/// controller its confirmation reaches.
pub(crate) fn leased_statuses() -> Vec<i32> {
    status::job::UNFINISHED
        .iter()
        .copied()
        .filter(|s| *s != status::job::WAITING_USER)
        .collect()
}

/// This controller's part in a cluster: its name, its leases' length, and the store they are
/// kept in. Only on PostgreSQL.
#[derive(Debug, Clone)]
pub struct Membership {
    store: Store,
    name: String,
    lease: Duration,
    /// Serialises taking and giving up leases: a release checks that no new run of the job
    /// started here before it deletes the row that run may have just taken.
    ops: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The jobs whose lease this controller took and has not given up: one missing from a
    /// renewal was taken by another controller.
    held: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
}

impl Membership {
    /// The membership of a controller configured with `config`: only with a `[cluster]`
    /// section on PostgreSQL; without one the controller is alone on its database.
    pub fn new(store: Store, database: &Database, config: Option<&ClusterConfig>) -> Option<Self> {
        let config = config?;
        match database {
            Database::Postgres(_) => Some(Self {
                store,
                name: config.name.clone(),
                lease: Duration::from_secs(config.lease_secs),
                ops: Default::default(),
                held: Default::default(),
            }),
            Database::Sqlite(_) => None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// The database's clock: every controller reads the same one, so heartbeats, leases and
    /// handovers compare across machines whatever their own clocks say. A database that cannot
    /// say fails the caller: this machine's clock is never put in its place.
    pub(crate) async fn now(&self) -> Result<i64, fleetrun_store::StoreError> {
        self.store.database_now_ms().await
    }

    /// A controller that renewed at or after this (the database's clock) is alive.
    pub(crate) async fn alive_since(&self) -> Result<i64, fleetrun_store::StoreError> {
        Ok(self.now().await? - self.lease_ms())
    }

    /// Registers this controller with its addresses.
    pub async fn register(&self, api_url: &str, agent_addr: &str) -> anyhow::Result<()> {
        self.store
            .register_controller(&self.name, api_url, agent_addr, self.now().await?)
            .await?;
        // Nothing is connected to this controller yet, whatever an earlier run recorded.
        self.store.forget_agent_connections_of(&self.name).await?;
        Ok(())
    }

    /// Whether another controller renewed within a lease's length.
    pub async fn others_alive(&self) -> anyhow::Result<bool> {
        let now = self.now().await?;
        Ok(self
            .store
            .controllers()
            .await?
            .iter()
            .any(|c| c.name != self.name && c.heartbeat_at + self.lease_ms() >= now))
    }

    /// Takes the job's lease (free, expired, or this controller's already: then renewed); false
    /// if another controller holds it. A database that fails is retried a few times, then the
    /// error is returned: the caller decides (a run is not started unleased).
    pub async fn take(&self, job_instance_id: i64) -> anyhow::Result<bool> {
        let _ops = self.ops.lock().await;
        let mut attempt = 0u64;
        loop {
            let taken = async {
                let now = self.now().await?;
                self.store
                    .take_job_lease(job_instance_id, &self.name, now, now + self.lease_ms())
                    .await
            };
            match taken.await {
                Ok(taken) => {
                    if taken {
                        self.held.lock().unwrap().insert(job_instance_id);
                    }
                    return Ok(taken);
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(job = job_instance_id, "cannot take the job's lease: {e}");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether this controller may end the job: its lease is taken again (ours, even expired
    /// unrenewed, or free, is kept; false only if another controller took it). A database that
    /// cannot say counts as yes: the end is queued to the writer like every other write.
    pub async fn keeps(&self, job_instance_id: i64) -> bool {
        match self.take(job_instance_id).await {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(job = job_instance_id, "cannot take the job's lease: {e:#}");
                true
            }
        }
    }

    /// Gives up the lease of a job taken up here that ended at its take-up (nothing left to
    /// run): its handovers and termination request are forgotten first, so that none outlives
    /// the job into a retry of it.
    pub async fn release_ended(&self, job_instance_id: i64) {
        if let Err(e) = self.store.forget_handovers(job_instance_id).await {
            tracing::warn!(
                job = job_instance_id,
                "cannot forget the job's handovers: {e}"
            );
        }
        self.release(job_instance_id, || false).await;
    }

    /// Gives the job's lease up once its end (or pause) is committed, unless a new run of it
    /// started here meanwhile (`running_here`, asked under the lease lock).
    pub async fn release(&self, job_instance_id: i64, running_here: impl Fn() -> bool) {
        let _ops = self.ops.lock().await;
        if running_here() {
            return;
        }
        self.held.lock().unwrap().remove(&job_instance_id);
        if let Err(e) = self
            .store
            .release_job_lease(job_instance_id, &self.name)
            .await
        {
            // It expires unrenewed… unless renewed: renewal skips nothing, so say so.
            tracing::warn!(job = job_instance_id, "cannot give the job's lease up: {e}");
        }
    }

    /// Takes the leases of the jobs nobody holds (with `own`, at start, this name's too);
    /// returns them.
    pub async fn take_orphans(&self, own: bool) -> anyhow::Result<Vec<i64>> {
        let now = self.now().await?;
        let _ops = self.ops.lock().await;
        let taken = self
            .store
            .take_orphaned_jobs(
                &self.name,
                &leased_statuses(),
                now,
                now + self.lease_ms(),
                now - self.lease_ms(),
                own,
            )
            .await?;
        self.held.lock().unwrap().extend(taken.iter().copied());
        Ok(taken)
    }

    /// Renews the heartbeat and the leases; returns the jobs whose lease this controller took
    /// and no longer holds (another controller took them after they expired).
    async fn renew(&self) -> Result<Vec<i64>, fleetrun_store::StoreError> {
        let _ops = self.ops.lock().await;
        let now = self.now().await?;
        let renewed: std::collections::HashSet<i64> = self
            .store
            .renew_controller(&self.name, now, now + self.lease_ms())
            .await?
            .into_iter()
            .collect();
        let mut held = self.held.lock().unwrap();
        let lost: Vec<i64> = held
            .iter()
            .copied()
            .filter(|job| !renewed.contains(job))
            .collect();
        for job in &lost {
            held.remove(job);
        }
        Ok(lost)
    }

    /// Renews the heartbeat and the leases, and takes up the jobs of controllers that stopped
    /// renewing, every third of a lease, until `shutdown`. News is acted on in a task of its
    /// own (`Membership::follow_news`): however slow that work, renewal does not wait behind
    /// it and lets no lease expire.
    pub async fn run(self, engine: Engine, shutdown: CancellationToken) {
        let period = self.lease / 3;
        let news = tokio::spawn(Self::follow_news(
            self.store.clone(),
            engine.clone(),
            period,
            shutdown.clone(),
        ));
        let fenced = tokio::spawn(Self::stop_fenced(
            self.store.clone(),
            engine.clone(),
            shutdown.clone(),
        ));
        self.renew_until(engine, period, shutdown).await;
        let _ = news.await;
        let _ = fenced.await;
    }

    /// Stops the runs here of hosts another controller took over while this one could not
    /// reach the store, as their refused writes show them, until `shutdown`.
    async fn stop_fenced(store: Store, engine: Engine, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                fenced = store.fenced_hosts() => engine.stop_fenced(&fenced),
            }
        }
    }

    /// Hosts handed here, terminations asked elsewhere, tasks taken over elsewhere: acted on at
    /// once on news, and every `period` for news lost while the listener reconnected.
    async fn follow_news(
        store: Store,
        engine: Engine,
        period: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
                () = store.cluster_news() => {}
            }
            engine.take_handed().await;
            engine.act_on_cancels().await;
            engine.release_moved().await;
        }
    }

    async fn renew_until(&self, engine: Engine, period: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let lost = match self.renew().await {
                Ok(lost) => lost,
                Err(e) => {
                    tracing::warn!("cannot renew this controller's leases: {e}");
                    continue;
                }
            };
            for job in lost {
                // Another controller took the job up: this one stops recording its run (and
                // leaves the agents' tasks alone, the other controller's now).
                engine.abandon(job);
            }
            let orphans = match self.take_orphans(false).await {
                Ok(orphans) => orphans,
                Err(e) => {
                    tracing::warn!("cannot look for jobs left by other controllers: {e:#}");
                    continue;
                }
            };
            // A job running here whose lease expired unrenewed is this controller's still.
            let orphans: Vec<i64> = orphans
                .into_iter()
                .filter(|job| !engine.is_running(*job))
                .collect();
            if orphans.is_empty() {
                continue;
            }
            tracing::warn!(
                jobs = ?orphans,
                "taking up jobs whose controller stopped renewing their leases"
            );
            match crate::take_up_unfinished(&self.store, Some(&orphans)).await {
                Ok((resumable, ended)) => {
                    for job in resumable {
                        engine.resume(job);
                    }
                    for job in ended {
                        engine.callbacks().job_ended(job);
                        self.release_ended(job).await;
                    }
                }
                Err(e) => tracing::error!("cannot take up jobs: {e:#}"),
            }
        }
    }
}

/// Keeps the hosts placed in this controller's inventory equal to those registered through
/// any controller: an agent registered through another one makes the merged inventory here
/// stale, and its news says so. A news lost with the listening connection is made up for: the
/// listener's loss wakes every follower.
pub async fn follow_hosts(shared: std::sync::Arc<crate::Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = shared.store.host_news() => shared.inventory.invalidate(),
        }
    }
}

/// How often revocations and the dangerous-command rules are read again without news.
const TRUST_POLL: Duration = Duration::from_secs(5);

/// Keeps the revocations and the dangerous-command rules in force here equal to the store's,
/// which other controllers change: read again at their news, and every [`TRUST_POLL`] for news
/// lost. A newly revoked agent connected here is cut off.
pub async fn follow_trust(shared: std::sync::Arc<crate::Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TRUST_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = shared.store.trust_news() => {}
        }
        // Changes here after this are kept whatever the copy read next says.
        let seen = shared.agents.revocations_seen();
        match shared.store.revoked_agents().await {
            Ok(revoked) => {
                let revoked: std::collections::HashSet<String> =
                    revoked.into_iter().map(|r| r.agent_id).collect();
                for (agent_id, closed) in shared.agents.merge_revoked(&revoked, seen) {
                    tracing::warn!(agent_id, closed, "agent revoked through another controller");
                }
            }
            Err(e) => tracing::warn!("cannot read the revoked agents again: {e}"),
        }
        shared.dangerous_rules.reload().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lease_lengths_are_checked() {
        let ok = |name: &str, lease_secs| {
            ClusterConfig {
                name: name.into(),
                lease_secs,
            }
            .validate()
            .is_ok()
        };
        assert!(ok("default", 15));
        assert!(ok("ctl-1.eu_west", 3));
        assert!(!ok("", 15));
        assert!(!ok("a b", 15));
        assert!(!ok(&"x".repeat(65), 15));
        assert!(!ok("a", 2));
        assert!(!ok("a", 601));
    }
}
