//! Counts read when `/metrics` is scraped: what the database holds now, grouped for gauges.

use sqlx::Row;

use crate::{Store, StoreError};

/// Registered hosts grouped by whether their agent is connected and the version it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCount {
    pub online: bool,
    pub agent_version: String,
    pub count: i64,
}

impl Store {
    /// Jobs by bk-job status, as (status, count).
    pub async fn job_counts_by_status(&self) -> Result<Vec<(i32, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM job_instance GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<i64, _>(0) as i32, row.get::<i64, _>(1)))
            .collect())
    }

    /// Registered hosts by connection state and agent version.
    pub async fn agent_counts(&self) -> Result<Vec<AgentCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT online, agent_version, COUNT(*) AS n FROM host \
             GROUP BY online, agent_version ORDER BY online, agent_version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| AgentCount {
                online: row.get::<i64, _>(0) != 0,
                agent_version: row.get(1),
                count: row.get(2),
            })
            .collect())
    }
}
