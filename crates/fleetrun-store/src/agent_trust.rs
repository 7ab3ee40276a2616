//! What the controller holds against agents: revoked identities, and who claimed an address first.

use sqlx::{Row, any::AnyRow};

use crate::{HostRecord, Store, StoreError};

/// An agent an operator revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub agent_id: String,
    pub reason: String,
    pub operator: String,
    /// Unix milliseconds.
    pub revoked_at: i64,
}

/// What revoking an agent found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// This call revoked it.
    Now(Revocation),
    /// It was revoked already; the first revocation stays.
    Already(Revocation),
}

impl Revoked {
    /// The revocation in force.
    pub fn revocation(&self) -> &Revocation {
        match self {
            Self::Now(r) | Self::Already(r) => r,
        }
    }
}

fn revocation(row: &AnyRow) -> Revocation {
    Revocation {
        agent_id: row.get("agent_id"),
        reason: row.get("reason"),
        operator: row.get("operator"),
        revoked_at: row.get("revoked_at"),
    }
}

/// Another host's claim on an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressClaim {
    pub bk_host_id: i64,
    pub agent_id: String,
    pub address_since: i64,
}

impl Store {
    /// The host an agent registered, if it has one.
    pub async fn host_of_agent(&self, agent_id: &str) -> Result<Option<HostRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM host WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(HostRecord::from_row))
    }

    /// The hosts that claimed `host`'s address before it did (earlier, or at the same time with
    /// a lower id): the ones that hold it against `host`.
    pub async fn earlier_claims(&self, host: &HostRecord) -> Result<Vec<AddressClaim>, StoreError> {
        let rows = sqlx::query(
            "SELECT bk_host_id, agent_id, address_since FROM host
             WHERE bk_cloud_id = $1 AND ip = $2 AND bk_host_id != $3
               AND (address_since < $4 OR (address_since = $4 AND bk_host_id < $3))
             ORDER BY address_since, bk_host_id",
        )
        .bind(host.bk_cloud_id)
        .bind(&host.ip)
        .bind(host.bk_host_id)
        .bind(host.address_since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| AddressClaim {
                bk_host_id: row.get("bk_host_id"),
                agent_id: row.get("agent_id"),
                address_since: row.get("address_since"),
            })
            .collect())
    }

    /// Revokes an agent. Returns the revocation in force, saying whether this call made it (an
    /// agent revoked already keeps its first revocation).
    pub async fn revoke_agent(&self, new: &Revocation) -> Result<Revoked, StoreError> {
        let made = sqlx::query(
            "INSERT INTO agent_revocation (agent_id, reason, operator, revoked_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (agent_id) DO NOTHING",
        )
        .bind(&new.agent_id)
        .bind(&new.reason)
        .bind(&new.operator)
        .bind(new.revoked_at)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let row = sqlx::query("SELECT * FROM agent_revocation WHERE agent_id = $1")
            .bind(&new.agent_id)
            .fetch_one(&self.pool)
            .await?;
        let revocation = revocation(&row);
        Ok(if made {
            Revoked::Now(revocation)
        } else {
            Revoked::Already(revocation)
        })
    }

    /// Lifts an agent's revocation; returns it, or `None` if the agent was not revoked.
    pub async fn unrevoke_agent(&self, agent_id: &str) -> Result<Option<Revocation>, StoreError> {
        let row = sqlx::query("DELETE FROM agent_revocation WHERE agent_id = $1 RETURNING *")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(revocation))
    }

    /// Every revoked agent, oldest revocation first.
    pub async fn revoked_agents(&self) -> Result<Vec<Revocation>, StoreError> {
        let rows = sqlx::query("SELECT * FROM agent_revocation ORDER BY revoked_at, agent_id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(revocation).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revoke(agent_id: &str, at: i64) -> Revocation {
        Revocation {
            agent_id: agent_id.into(),
            reason: format!("lost at {at}"),
            operator: "alice".into(),
            revoked_at: at,
        }
    }

    #[tokio::test]
    async fn a_revocation_stays_until_lifted_and_the_first_one_counts() {
        let (_db, store) = crate::test_store().await;
        assert_eq!(
            store.revoke_agent(&revoke("a", 10)).await.unwrap(),
            Revoked::Now(revoke("a", 10))
        );
        assert_eq!(
            store.revoke_agent(&revoke("a", 20)).await.unwrap(),
            Revoked::Already(revoke("a", 10))
        );
        store.revoke_agent(&revoke("b", 5)).await.unwrap();
        let ids: Vec<String> = store
            .revoked_agents()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.agent_id)
            .collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(
            store.unrevoke_agent("a").await.unwrap(),
            Some(revoke("a", 10))
        );
        assert_eq!(store.unrevoke_agent("a").await.unwrap(), None);
        assert_eq!(store.revoked_agents().await.unwrap().len(), 1);
    }
}

#[cfg(test)]
mod address_tests {
    use crate::AgentRegistration;

    fn registration(ip: &str, now: i64) -> AgentRegistration {
        AgentRegistration {
            agent_id: "a".into(),
            bk_cloud_id: 0,
            ip: ip.into(),
            hostname: "h".into(),
            os_type: "linux".into(),
            agent_version: "1".into(),
            now,
        }
    }

    #[tokio::test]
    async fn a_host_keeps_its_claim_time_until_its_address_changes() {
        let (_db, store) = crate::test_store().await;
        let first = store
            .register_agent(&registration("10.0.0.1", 100))
            .await
            .unwrap();
        assert_eq!(first.address_since, 100);
        let again = store
            .register_agent(&registration("10.0.0.1", 200))
            .await
            .unwrap();
        assert_eq!(again.address_since, 100);
        let moved = store
            .register_agent(&registration("10.0.0.2", 300))
            .await
            .unwrap();
        assert_eq!(moved.address_since, 300);
        assert_eq!(store.host_of_agent("a").await.unwrap(), Some(moved.clone()));
        assert_eq!(store.host_of_agent("b").await.unwrap(), None);

        // b claims 10.0.0.2 later: a holds it against b, nobody against a.
        let mut b = registration("10.0.0.2", 400);
        b.agent_id = "b".into();
        let b = store.register_agent(&b).await.unwrap();
        let against_b = store.earlier_claims(&b).await.unwrap();
        assert_eq!(
            against_b
                .iter()
                .map(|c| c.agent_id.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert!(store.earlier_claims(&moved).await.unwrap().is_empty());
    }
}
