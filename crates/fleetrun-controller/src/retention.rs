//! Retention: finished jobs older than `[retention] finished_jobs_days` are removed in the
//! background, a batch at a time with a pause between batches, so that the engine's writes and
//! new jobs keep going while an old backlog is pruned. The audit log is kept whatever this says.

use std::time::Duration;

use fleetrun_store::Store;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{now_ms, status};

/// `[retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days a finished job (its steps, results, logs and callbacks) is kept after it ended; 0
    /// keeps jobs forever.
    pub finished_jobs_days: u32,
    /// Seconds between two pruning rounds.
    pub interval_secs: u64,
    /// Jobs removed per transaction.
    pub batch_jobs: usize,
    /// Rows of logs, host results and checkpoints deleted per transaction: a 10,000-host job's
    /// rows go in several short transactions, not one long one that holds the writer.
    pub batch_rows: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            finished_jobs_days: 30,
            interval_secs: 3600,
            batch_jobs: 100,
            batch_rows: 5_000,
        }
    }
}

impl RetentionConfig {
    /// What is wrong with it, naming the key.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.finished_jobs_days > 36_500 {
            return Some((
                "finished_jobs_days",
                format!(
                    "retention.finished_jobs_days must be at most 36500 (0 keeps jobs forever), not {}",
                    self.finished_jobs_days
                ),
            ));
        }
        if !(1..=86_400).contains(&self.interval_secs) {
            return Some((
                "interval_secs",
                format!(
                    "retention.interval_secs must be between 1 and 86400, not {}",
                    self.interval_secs
                ),
            ));
        }
        if !(1..=10_000).contains(&self.batch_jobs) {
            return Some((
                "batch_jobs",
                format!(
                    "retention.batch_jobs must be between 1 and 10000, not {}",
                    self.batch_jobs
                ),
            ));
        }
        if !(100..=1_000_000).contains(&self.batch_rows) {
            return Some((
                "batch_rows",
                format!(
                    "retention.batch_rows must be between 100 and 1000000, not {}",
                    self.batch_rows
                ),
            ));
        }
        None
    }
}

/// A finished status: pruning never touches a job that may still change.
const FINISHED: &[i32] = &[3, 4, 5, 6, 8, 9, 11, 13, 14];

/// The pause between two batches of one round: room for the writer.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Removes what is due now, batch by batch; returns how many jobs went.
pub async fn prune_once(store: &Store, config: &RetentionConfig) -> usize {
    if config.finished_jobs_days == 0 {
        return 0;
    }
    let cutoff = now_ms() - i64::from(config.finished_jobs_days) * 86_400_000;
    let mut total = 0;
    loop {
        match prune_batch(store, config, cutoff).await {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                metrics::counter!("fleetrun_retention_pruned_jobs_total").increment(n as u64);
                tokio::time::sleep(BETWEEN_BATCHES).await;
            }
            Err(e) => {
                tracing::warn!("retention: cannot remove old jobs now, trying next round: {e}");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            jobs = total,
            days = config.finished_jobs_days,
            "retention: removed finished jobs older than the retention period"
        );
    }
    total
}

/// Removes one batch of due jobs: their per-host rows `batch_rows` at a time (a transaction
/// each, with a pause between), then the jobs themselves; returns how many jobs went.
async fn prune_batch(
    store: &Store,
    config: &RetentionConfig,
    cutoff: i64,
) -> Result<usize, fleetrun_store::StoreError> {
    let jobs = store
        .prunable_jobs(cutoff, FINISHED, config.batch_jobs)
        .await?;
    if jobs.is_empty() {
        return Ok(0);
    }
    while store
        .prune_host_rows(&jobs, cutoff, config.batch_rows)
        .await?
        > 0
    {
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
    store.remove_jobs(&jobs, cutoff).await
}

/// Prunes every `interval_secs` until `shutdown`.
pub async fn run(store: Store, config: RetentionConfig, shutdown: CancellationToken) {
    debug_assert!(FINISHED.iter().all(|s| status::job::is_finished(*s)));
    let mut every = tokio::time::interval(Duration::from_secs(config.interval_secs));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = prune_once(&store, &config) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finished_list_matches_the_status_module() {
        for s in 0..20 {
            assert_eq!(FINISHED.contains(&s), status::job::is_finished(s), "{s}");
        }
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let bad = RetentionConfig {
            interval_secs: 0,
            ..RetentionConfig::default()
        };
        assert_eq!(bad.problem().unwrap().0, "interval_secs");
        assert!(RetentionConfig::default().problem().is_none());
        let bad = RetentionConfig {
            batch_rows: 10,
            ..RetentionConfig::default()
        };
        assert_eq!(bad.problem().unwrap().0, "batch_rows");
    }
}
