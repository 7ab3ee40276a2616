//! Join tokens and the agents that enrolled with them (migration 0012).
//!
//! A token is kept as its SHA-256 only. Spending a use is one conditional update, so two hosts
//! enrolling at once with the last use of a token cannot both get it, on either backend or
//! across controllers sharing a database.

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError};

/// A join token as stored (its secret is not: only its digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The public part of the token, shown by `tokens list` and named by `tokens revoke`.
    pub token_id: String,
    /// Hex SHA-256 of the whole token.
    pub token_sha256: String,
    pub bk_biz_id: i64,
    pub bk_module_id: Option<i64>,
    pub bk_cloud_id: i64,
    pub max_uses: i64,
    pub uses: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds; the token is refused from then on.
    pub expires_at: i64,
    pub created_by: String,
    pub description: String,
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<String>,
}

fn join_token(row: &AnyRow) -> JoinToken {
    JoinToken {
        token_id: row.get("token_id"),
        token_sha256: row.get("token_sha256"),
        bk_biz_id: row.get("bk_biz_id"),
        bk_module_id: row.get("bk_module_id"),
        bk_cloud_id: row.get("bk_cloud_id"),
        max_uses: row.get("max_uses"),
        uses: row.get("uses"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        created_by: row.get("created_by"),
        description: row.get("description"),
        revoked_at: row.get("revoked_at"),
        revoked_by: row.get("revoked_by"),
    }
}

/// An agent's enrollment: its key, the identity the controller gave it, and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// Hex SHA-256 of the agent key's SubjectPublicKeyInfo.
    pub key_sha256: String,
    pub agent_id: String,
    /// The token it last enrolled with.
    pub token_id: String,
    pub bk_cloud_id: i64,
    /// The host's addresses, the one the controller saw first.
    pub ips: Vec<String>,
    /// Unix milliseconds.
    pub enrolled_at: i64,
    /// The end of the certificate issued last, Unix milliseconds.
    pub cert_not_after: i64,
    pub renewed_at: Option<i64>,
}

fn enrollment(row: &AnyRow) -> Enrollment {
    let ips: String = row.get("ips");
    Enrollment {
        key_sha256: row.get("key_sha256"),
        agent_id: row.get("agent_id"),
        token_id: row.get("token_id"),
        bk_cloud_id: row.get("bk_cloud_id"),
        ips: ips
            .split(',')
            .filter(|ip| !ip.is_empty())
            .map(str::to_owned)
            .collect(),
        enrolled_at: row.get("enrolled_at"),
        cert_not_after: row.get("cert_not_after"),
        renewed_at: row.get("renewed_at"),
    }
}

impl Store {
    /// Stores a new join token.
    pub async fn create_join_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_token (token_id, token_sha256, bk_biz_id, bk_module_id, bk_cloud_id,
                 max_uses, uses, created_at, expires_at, created_by, description)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&token.token_id)
        .bind(&token.token_sha256)
        .bind(token.bk_biz_id)
        .bind(token.bk_module_id)
        .bind(token.bk_cloud_id)
        .bind(token.max_uses)
        .bind(token.uses)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(&token.created_by)
        .bind(&token.description)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every join token, newest first.
    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        let rows = sqlx::query("SELECT * FROM join_token ORDER BY created_at DESC, token_id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(join_token).collect())
    }

    pub async fn join_token(&self, token_id: &str) -> Result<Option<JoinToken>, StoreError> {
        let row = sqlx::query("SELECT * FROM join_token WHERE token_id = $1")
            .bind(token_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(join_token))
    }

    /// Revokes a token; returns it as it stands after (revoked by the first revocation), or
    /// `None` when there is no such token.
    pub async fn revoke_join_token(
        &self,
        token_id: &str,
        operator: &str,
        at: i64,
    ) -> Result<Option<JoinToken>, StoreError> {
        sqlx::query(
            "UPDATE join_token SET revoked_at = $2, revoked_by = $3
             WHERE token_id = $1 AND revoked_at IS NULL",
        )
        .bind(token_id)
        .bind(at)
        .bind(operator)
        .execute(&self.pool)
        .await?;
        self.join_token(token_id).await
    }

    /// Takes one use of a token that is live at `now` (not revoked, not expired, not used up);
    /// returns it after, or `None` when it could not be spent (read it to say why).
    pub async fn spend_join_token(
        &self,
        token_id: &str,
        now: i64,
    ) -> Result<Option<JoinToken>, StoreError> {
        let row = sqlx::query(
            "UPDATE join_token SET uses = uses + 1
             WHERE token_id = $1 AND revoked_at IS NULL AND expires_at > $2 AND uses < max_uses
             RETURNING *",
        )
        .bind(token_id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(join_token))
    }

    /// Gives back a use spent by an enrollment that then failed.
    pub async fn refund_join_token(&self, token_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE join_token SET uses = uses - 1 WHERE token_id = $1 AND uses > 0")
            .bind(token_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The enrollment of an agent key, if it enrolled before.
    pub async fn enrollment_by_key(
        &self,
        key_sha256: &str,
    ) -> Result<Option<Enrollment>, StoreError> {
        let row = sqlx::query("SELECT * FROM agent_enrollment WHERE key_sha256 = $1")
            .bind(key_sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(enrollment))
    }

    /// The enrollment of an agent, if it enrolled.
    pub async fn enrollment_of_agent(
        &self,
        agent_id: &str,
    ) -> Result<Option<Enrollment>, StoreError> {
        let row = sqlx::query("SELECT * FROM agent_enrollment WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(enrollment))
    }

    /// The agents that enrolled with a token.
    pub async fn agents_enrolled_with(&self, token_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT agent_id FROM agent_enrollment WHERE token_id = $1")
            .bind(token_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("agent_id").map_err(Into::into))
            .collect()
    }

    /// Records an enrollment, replacing the key's earlier one (same key, same agent).
    pub async fn record_enrollment(&self, e: &Enrollment) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agent_enrollment (key_sha256, agent_id, token_id, bk_cloud_id, ips,
                 enrolled_at, cert_not_after, renewed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (key_sha256) DO UPDATE SET token_id = excluded.token_id,
                 bk_cloud_id = excluded.bk_cloud_id, ips = excluded.ips,
                 enrolled_at = excluded.enrolled_at, cert_not_after = excluded.cert_not_after,
                 renewed_at = excluded.renewed_at",
        )
        .bind(&e.key_sha256)
        .bind(&e.agent_id)
        .bind(&e.token_id)
        .bind(e.bk_cloud_id)
        .bind(e.ips.join(","))
        .bind(e.enrolled_at)
        .bind(e.cert_not_after)
        .bind(e.renewed_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Notes a renewed certificate of an enrolled agent; false when the agent did not enroll.
    pub async fn record_renewal(
        &self,
        agent_id: &str,
        at: i64,
        cert_not_after: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE agent_enrollment SET renewed_at = $2, cert_not_after = $3 WHERE agent_id = $1",
        )
        .bind(agent_id)
        .bind(at)
        .bind(cert_not_after)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, max_uses: i64, expires_at: i64) -> JoinToken {
        JoinToken {
            token_id: id.into(),
            token_sha256: format!("digest-{id}"),
            bk_biz_id: 2,
            bk_module_id: Some(120),
            bk_cloud_id: 0,
            max_uses,
            uses: 0,
            created_at: 10,
            expires_at,
            created_by: "alice".into(),
            description: String::new(),
            revoked_at: None,
            revoked_by: None,
        }
    }

    #[tokio::test]
    async fn concurrent_spends_take_exactly_the_uses_there_are_and_a_refund_gives_one_back() {
        let (_db, store) = crate::test_store().await;
        store
            .create_join_token(&token("k", 3, 1_000))
            .await
            .unwrap();
        let spends: Vec<_> = (0..12)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.spend_join_token("k", 100).await })
            })
            .collect();
        let mut spent = 0;
        for spend in spends {
            if spend.await.unwrap().unwrap().is_some() {
                spent += 1;
            }
        }
        assert_eq!(spent, 3);
        assert_eq!(store.join_token("k").await.unwrap().unwrap().uses, 3);
        store.refund_join_token("k").await.unwrap();
        assert_eq!(store.join_token("k").await.unwrap().unwrap().uses, 2);
        assert!(store.spend_join_token("k", 100).await.unwrap().is_some());
        assert_eq!(store.spend_join_token("k", 100).await.unwrap(), None);
        // Never below nothing spent.
        store
            .create_join_token(&token("z", 1, 1_000))
            .await
            .unwrap();
        store.refund_join_token("z").await.unwrap();
        assert_eq!(store.join_token("z").await.unwrap().unwrap().uses, 0);
    }

    #[tokio::test]
    async fn a_token_is_spent_once_per_use_and_never_after_its_end_or_revocation() {
        let (_db, store) = crate::test_store().await;
        store
            .create_join_token(&token("a", 2, 1_000))
            .await
            .unwrap();
        store
            .create_join_token(&token("b", 5, 1_000))
            .await
            .unwrap();
        store
            .create_join_token(&token("c", 5, 1_000))
            .await
            .unwrap();
        assert_eq!(
            store
                .spend_join_token("a", 100)
                .await
                .unwrap()
                .unwrap()
                .uses,
            1
        );
        assert_eq!(
            store
                .spend_join_token("a", 100)
                .await
                .unwrap()
                .unwrap()
                .uses,
            2
        );
        // Used up.
        assert_eq!(store.spend_join_token("a", 100).await.unwrap(), None);
        assert_eq!(store.join_token("a").await.unwrap().unwrap().uses, 2);
        // Expired: at its end and after.
        assert_eq!(store.spend_join_token("b", 1_000).await.unwrap(), None);
        // Revoked: the first revocation stays.
        let revoked = store
            .revoke_join_token("c", "bob", 50)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (revoked.revoked_at, revoked.revoked_by.as_deref()),
            (Some(50), Some("bob"))
        );
        let again = store
            .revoke_join_token("c", "eve", 60)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.revoked_at, Some(50));
        assert_eq!(store.spend_join_token("c", 100).await.unwrap(), None);
        assert_eq!(
            store.revoke_join_token("nope", "bob", 1).await.unwrap(),
            None
        );
        assert_eq!(store.spend_join_token("nope", 1).await.unwrap(), None);
        let ids: Vec<String> = store
            .join_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.token_id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn an_enrollment_is_kept_per_key_and_renewals_are_noted() {
        let (_db, store) = crate::test_store().await;
        let mut e = Enrollment {
            key_sha256: "k1".into(),
            agent_id: "host-k1".into(),
            token_id: "a".into(),
            bk_cloud_id: 0,
            ips: vec!["10.0.0.5".into(), "192.0.2.7".into()],
            enrolled_at: 100,
            cert_not_after: 200,
            renewed_at: None,
        };
        store.record_enrollment(&e).await.unwrap();
        assert_eq!(
            store.enrollment_by_key("k1").await.unwrap(),
            Some(e.clone())
        );
        e.token_id = "b".into();
        e.enrolled_at = 300;
        store.record_enrollment(&e).await.unwrap();
        assert_eq!(
            store.enrollment_of_agent("host-k1").await.unwrap(),
            Some(e.clone())
        );
        assert!(store.record_renewal("host-k1", 400, 900).await.unwrap());
        assert!(!store.record_renewal("host-other", 400, 900).await.unwrap());
        let renewed = store.enrollment_by_key("k1").await.unwrap().unwrap();
        assert_eq!(
            (renewed.renewed_at, renewed.cert_not_after),
            (Some(400), 900)
        );
        assert_eq!(store.enrollment_by_key("k2").await.unwrap(), None);
    }
}
