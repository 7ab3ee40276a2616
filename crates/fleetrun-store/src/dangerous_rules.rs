//! Dangerous-command rules (`dangerous_rule`, migration 0011): regular expressions the controller
//! checks scripts against before they run. The store keeps them; compiling and matching belong
//! to the controller.

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError};

/// A rule as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DangerousRule {
    pub id: i64,
    pub expression: String,
    /// bk-job's script language numbers, ascending, without repeats.
    pub script_languages: Vec<i32>,
    pub description: String,
    /// 1 scan, 2 intercept.
    pub action: i32,
    /// 1 enabled, 0 disabled.
    pub status: i32,
    pub creator: String,
    pub create_time: i64,
    pub last_modify_user: String,
    pub last_modify_time: i64,
}

/// What a rule is made of, for [`Store::create_dangerous_rule`] and
/// [`Store::update_dangerous_rule`].
#[derive(Debug, Clone)]
pub struct DangerousRuleFields {
    pub expression: String,
    pub script_languages: Vec<i32>,
    pub description: String,
    pub action: i32,
}

/// A change of the rules was refused.
#[derive(Debug, thiserror::Error)]
pub enum DangerousRuleError {
    /// No rule has this id.
    #[error("no dangerous rule {0}")]
    NotFound(i64),
    /// Another rule has the same expression for the same languages.
    #[error("a rule with this expression and these languages exists already (id {0})")]
    Duplicate(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for DangerousRuleError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

fn languages_text(languages: &[i32]) -> String {
    let mut sorted = languages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn rule(row: &AnyRow) -> DangerousRule {
    let languages: String = row.get("script_languages");
    DangerousRule {
        id: row.get("id"),
        expression: row.get("expression"),
        script_languages: languages
            .split(',')
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        description: row.get("description"),
        action: row.get("action"),
        status: row.get("status"),
        creator: row.get("creator"),
        create_time: row.get("create_time"),
        last_modify_user: row.get("last_modify_user"),
        last_modify_time: row.get("last_modify_time"),
    }
}

impl Store {
    /// Every rule, by id.
    pub async fn dangerous_rules(&self) -> Result<Vec<DangerousRule>, StoreError> {
        let rows = sqlx::query("SELECT * FROM dangerous_rule ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(rule).collect())
    }

    /// One rule.
    pub async fn dangerous_rule(&self, id: i64) -> Result<Option<DangerousRule>, StoreError> {
        let row = sqlx::query("SELECT * FROM dangerous_rule WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(rule))
    }

    /// The rule other than `except` with the same expression and languages, if any.
    async fn same_rule(
        &self,
        fields: &DangerousRuleFields,
        except: i64,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT id FROM dangerous_rule
             WHERE expression = $1 AND script_languages = $2 AND id != $3",
        )
        .bind(&fields.expression)
        .bind(languages_text(&fields.script_languages))
        .bind(except)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get("id")))
    }

    /// Stores a new rule, disabled (as bk-job creates them), by `operator` at `now`.
    pub async fn create_dangerous_rule(
        &self,
        fields: &DangerousRuleFields,
        operator: &str,
        now: i64,
    ) -> Result<DangerousRule, DangerousRuleError> {
        if let Some(id) = self.same_rule(fields, 0).await? {
            return Err(DangerousRuleError::Duplicate(id));
        }
        let row = sqlx::query(
            "INSERT INTO dangerous_rule
                 (expression, script_languages, description, action, status, creator,
                  create_time, last_modify_user, last_modify_time)
             VALUES ($1, $2, $3, $4, 0, $5, $6, $5, $6)
             RETURNING *",
        )
        .bind(&fields.expression)
        .bind(languages_text(&fields.script_languages))
        .bind(&fields.description)
        .bind(fields.action)
        .bind(operator)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.unique_violation(e))?;
        Ok(rule(&row))
    }

    /// Replaces a rule's expression, languages, description and action; its status stays.
    pub async fn update_dangerous_rule(
        &self,
        id: i64,
        fields: &DangerousRuleFields,
        operator: &str,
        now: i64,
    ) -> Result<DangerousRule, DangerousRuleError> {
        if let Some(other) = self.same_rule(fields, id).await? {
            return Err(DangerousRuleError::Duplicate(other));
        }
        let row = sqlx::query(
            "UPDATE dangerous_rule
             SET expression = $1, script_languages = $2, description = $3, action = $4,
                 last_modify_user = $5, last_modify_time = $6
             WHERE id = $7
             RETURNING *",
        )
        .bind(&fields.expression)
        .bind(languages_text(&fields.script_languages))
        .bind(&fields.description)
        .bind(fields.action)
        .bind(operator)
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.unique_violation(e))?;
        row.as_ref()
            .map(rule)
            .ok_or(DangerousRuleError::NotFound(id))
    }

    /// Enables (1) or disables (0) a rule.
    pub async fn set_dangerous_rule_status(
        &self,
        id: i64,
        status: i32,
        operator: &str,
        now: i64,
    ) -> Result<DangerousRule, DangerousRuleError> {
        let row = sqlx::query(
            "UPDATE dangerous_rule SET status = $1, last_modify_user = $2, last_modify_time = $3
             WHERE id = $4 RETURNING *",
        )
        .bind(status)
        .bind(operator)
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(rule)
            .ok_or(DangerousRuleError::NotFound(id))
    }

    /// Deletes a rule; returns it.
    pub async fn delete_dangerous_rule(
        &self,
        id: i64,
    ) -> Result<DangerousRule, DangerousRuleError> {
        let row = sqlx::query("DELETE FROM dangerous_rule WHERE id = $1 RETURNING *")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(rule)
            .ok_or(DangerousRuleError::NotFound(id))
    }

    /// A concurrent create or update that made the same rule first loses to the unique index:
    /// it is answered as a duplicate, not as a database failure.
    fn unique_violation(&self, e: sqlx::Error) -> DangerousRuleError {
        match e {
            // The other rule's id is not known here; 0 says so.
            sqlx::Error::Database(ref db) if db.is_unique_violation() => {
                DangerousRuleError::Duplicate(0)
            }
            other => other.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(expression: &str, languages: &[i32], action: i32) -> DangerousRuleFields {
        DangerousRuleFields {
            expression: expression.into(),
            script_languages: languages.to_vec(),
            description: format!("about {expression}"),
            action,
        }
    }

    #[tokio::test]
    async fn the_default_rules_are_there_enabled_and_intercepting() {
        let (_db, store) = crate::test_store().await;
        let rules = store.dangerous_rules().await.unwrap();
        assert_eq!(rules.len(), 4, "{rules:?}");
        for rule in &rules {
            assert_eq!((rule.status, rule.action), (1, 2), "{rule:?}");
            assert_eq!(rule.script_languages, vec![1, 3, 4]);
            assert!(rule.create_time > 1_600_000_000_000, "{rule:?}");
        }
        assert!(rules[0].expression.starts_with(r"\brm\s+"));
        assert!(rules[0].expression.ends_with(r#"(?:[\s;&|)`"']|$))"#));
    }

    #[tokio::test]
    async fn the_longest_expression_the_api_accepts_fits_the_unique_index() {
        let (_db, store) = crate::test_store().await;
        // 2,000 bytes that do not compress: what the controller's byte limit lets through.
        let mut seed: u32 = 7;
        let expression: String = (0..666)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from_u32(0x4e00 + (seed >> 8) % 0x5000).unwrap()
            })
            .chain("ab".chars())
            .collect();
        assert_eq!(expression.len(), 2000);
        let made = store
            .create_dangerous_rule(&fields(&expression, &[1, 2, 3, 4, 5, 6], 2), "a", 1)
            .await
            .unwrap();
        assert_eq!(made.expression, expression);
    }

    #[tokio::test]
    async fn rules_are_created_disabled_changed_and_deleted() {
        let (_db, store) = crate::test_store().await;
        let made = store
            .create_dangerous_rule(&fields("shutdown", &[4, 1, 1], 1), "alice", 10)
            .await
            .unwrap();
        assert_eq!(made.script_languages, vec![1, 4]);
        assert_eq!((made.status, made.action), (0, 1));
        assert_eq!((made.creator.as_str(), made.create_time), ("alice", 10));
        assert!(matches!(
            store
                .create_dangerous_rule(&fields("shutdown", &[1, 4], 2), "bob", 11)
                .await,
            Err(DangerousRuleError::Duplicate(id)) if id == made.id
        ));
        // The same expression for other languages is another rule.
        let other = store
            .create_dangerous_rule(&fields("shutdown", &[3], 2), "bob", 11)
            .await
            .unwrap();
        assert!(matches!(
            store
                .update_dangerous_rule(other.id, &fields("shutdown", &[1, 4], 2), "bob", 12)
                .await,
            Err(DangerousRuleError::Duplicate(id)) if id == made.id
        ));
        let enabled = store
            .set_dangerous_rule_status(made.id, 1, "carol", 13)
            .await
            .unwrap();
        assert_eq!(
            (enabled.status, enabled.last_modify_user.as_str()),
            (1, "carol")
        );
        let changed = store
            .update_dangerous_rule(made.id, &fields("reboot", &[1], 2), "dave", 14)
            .await
            .unwrap();
        assert_eq!(changed.status, 1, "an update keeps the status");
        assert_eq!(
            (
                changed.expression.as_str(),
                changed.action,
                changed.creator.as_str()
            ),
            ("reboot", 2, "alice")
        );
        assert_eq!(store.dangerous_rule(made.id).await.unwrap(), Some(changed));
        store.delete_dangerous_rule(made.id).await.unwrap();
        assert!(matches!(
            store.delete_dangerous_rule(made.id).await,
            Err(DangerousRuleError::NotFound(_))
        ));
        assert!(matches!(
            store.set_dangerous_rule_status(made.id, 1, "x", 1).await,
            Err(DangerousRuleError::NotFound(_))
        ));
        assert!(matches!(
            store
                .update_dangerous_rule(made.id, &fields("x", &[1], 1), "x", 1)
                .await,
            Err(DangerousRuleError::NotFound(_))
        ));
        assert_eq!(store.dangerous_rules().await.unwrap().len(), 5);
    }
}
