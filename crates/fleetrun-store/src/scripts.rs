//! The script library: scripts and their versions, with bk-job's status rules
//! (0 draft, 1 online, 2 offline, 3 disabled; one online version per script).

use fleetrun_api::VersionStatus;
use sqlx::{Row, any::AnyRow};

use crate::{Statement, Store, StoreError};

/// A script library operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScriptsError {
    /// No such script (or version) in the scope.
    #[error("no such script or version")]
    NotFound,
    /// The script already has a version with this label.
    #[error("version {0:?} exists already")]
    DuplicateVersion(String),
    /// The version's status does not allow the operation.
    #[error("version is {0}, which does not allow this")]
    WrongStatus(&'static str),
    /// The version is the script's online one, which jobs run by `script_id`: it is disabled
    /// (or replaced by publishing another) before it can be deleted, as in bk-job.
    #[error("the online version cannot be deleted")]
    DeleteOnline,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ScriptsError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// `%text%` for LIKE, with `%`, `_` and the escape character in `text` matched literally.
fn like_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

// Version statuses as the `status` column holds them.
const DRAFT: i32 = VersionStatus::Draft.code();
const ONLINE: i32 = VersionStatus::Online.code();
const OFFLINE: i32 = VersionStatus::Offline.code();
const DISABLED: i32 = VersionStatus::Disabled.code();

/// bk-job's name for a version status.
fn status_name(status: i32) -> &'static str {
    VersionStatus::from_code(status).name().unwrap_or("unknown")
}

#[derive(Debug, Clone)]
pub struct NewScript {
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub name: String,
    pub description: String,
    pub script_language: i32,
    pub content: Vec<u8>,
    pub version: String,
    pub version_desc: String,
    pub operator: String,
    pub now: i64,
}

#[derive(Debug, Clone)]
pub struct ScriptRecord {
    pub script_id: String,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub name: String,
    pub description: String,
    pub script_language: i32,
    pub creator: String,
    pub create_time: i64,
    pub last_modify_user: String,
    pub last_modify_time: i64,
    /// The online version, if any.
    pub online_script_version_id: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ScriptVersionRecord {
    pub id: i64,
    pub script_id: String,
    pub version: String,
    pub content: Vec<u8>,
    pub status: i32,
    pub version_desc: String,
    pub creator: String,
    pub create_time: i64,
    pub last_modify_user: String,
    pub last_modify_time: i64,
    /// From the script.
    pub script_language: i32,
    pub name: String,
    /// The script's description.
    pub description: String,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
}

/// Which scripts [`Store::list_scripts`] returns.
#[derive(Debug, Clone, Default)]
pub struct ScriptFilter {
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    /// Part of the name.
    pub name: Option<String>,
    /// 0 or `None` for every language.
    pub script_language: Option<i32>,
    pub start: i64,
    pub length: i64,
}

const SCRIPT_COLUMNS: &str = "s.*, (SELECT v.id FROM script_version v WHERE v.script_id = s.script_id AND v.status = 1) AS online_script_version_id";
const VERSION_COLUMNS: &str =
    "v.*, s.script_language, s.name, s.description, s.bk_scope_type, s.bk_scope_id";

fn script_row(r: &AnyRow) -> ScriptRecord {
    ScriptRecord {
        script_id: r.get("script_id"),
        bk_scope_type: r.get("bk_scope_type"),
        bk_scope_id: r.get("bk_scope_id"),
        name: r.get("name"),
        description: r.get("description"),
        script_language: r.get("script_language"),
        creator: r.get("creator"),
        create_time: r.get("create_time"),
        last_modify_user: r.get("last_modify_user"),
        last_modify_time: r.get("last_modify_time"),
        online_script_version_id: r.get("online_script_version_id"),
    }
}

fn version_row(r: &AnyRow) -> ScriptVersionRecord {
    ScriptVersionRecord {
        id: r.get("id"),
        script_id: r.get("script_id"),
        version: r.get("version"),
        content: r.get("content"),
        status: r.get("status"),
        version_desc: r.get("version_desc"),
        creator: r.get("creator"),
        create_time: r.get("create_time"),
        last_modify_user: r.get("last_modify_user"),
        last_modify_time: r.get("last_modify_time"),
        script_language: r.get("script_language"),
        name: r.get("name"),
        description: r.get("description"),
        bk_scope_type: r.get("bk_scope_type"),
        bk_scope_id: r.get("bk_scope_id"),
    }
}

/// What [`Store::update_script_basic`] changes: `None` leaves a field as it is.
#[derive(Debug, Clone)]
pub struct ScriptBasics {
    pub name: String,
    pub description: Option<String>,
    pub operator: String,
    pub now: i64,
}

impl Store {
    /// Creates a script with its first version, a draft, in one transaction.
    pub async fn create_script(
        &self,
        new: &NewScript,
        script_id: &str,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO script (script_id, bk_scope_type, bk_scope_id, name, description, script_language, creator, create_time, last_modify_user, last_modify_time)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(script_id)
        .bind(&new.bk_scope_type)
        .bind(&new.bk_scope_id)
        .bind(&new.name)
        .bind(&new.description)
        .bind(new.script_language)
        .bind(&new.operator)
        .bind(new.now)
        .bind(&new.operator)
        .bind(new.now)
        .execute(&mut *tx)
        .await?;
        let id = insert_version(&mut tx, script_id, new).await?;
        tx.commit().await?;
        self.script_version(&new.bk_scope_type, &new.bk_scope_id, id)
            .await
    }

    /// Adds a draft version to a script of the scope.
    pub async fn create_script_version(
        &self,
        scope: (&str, &str),
        script_id: &str,
        new: &NewScript,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        let script = self.script(scope.0, scope.1, script_id).await?;
        let mut tx = self.pool.begin().await?;
        let id = insert_version(&mut tx, &script.script_id, new).await?;
        sqlx::query(
            "UPDATE script SET last_modify_user = $1, last_modify_time = $2 WHERE script_id = $3",
        )
        .bind(&new.operator)
        .bind(new.now)
        .bind(&script.script_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.script_version(scope.0, scope.1, id).await
    }

    /// Puts a version online; the script's previous online version goes offline.
    pub async fn publish_script_version(
        &self,
        scope: (&str, &str),
        script_id: &str,
        version_id: i64,
        operator: &str,
        now: i64,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        self.change_status(scope, script_id, version_id, ONLINE, operator, now)
            .await
    }

    /// Disables a version: it can no longer run.
    pub async fn disable_script_version(
        &self,
        scope: (&str, &str),
        script_id: &str,
        version_id: i64,
        operator: &str,
        now: i64,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        self.change_status(scope, script_id, version_id, DISABLED, operator, now)
            .await
    }

    async fn change_status(
        &self,
        scope: (&str, &str),
        script_id: &str,
        version_id: i64,
        status: i32,
        operator: &str,
        now: i64,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        let version = self.script_version(scope.0, scope.1, version_id).await?;
        if version.script_id != script_id {
            return Err(ScriptsError::NotFound);
        }
        // bk-job publishes anything but a disabled version, and disables only versions that
        // have been online.
        let allowed = match status {
            ONLINE => version.status != DISABLED,
            DISABLED => matches!(version.status, ONLINE | OFFLINE),
            _ => true,
        };
        if !allowed {
            return Err(ScriptsError::WrongStatus(status_name(version.status)));
        }
        let mut tx = self.pool.begin().await?;
        if status == ONLINE {
            sqlx::query(
                "UPDATE script_version SET status = $1, last_modify_user = $2, last_modify_time = $3 WHERE script_id = $4 AND status = $5",
            )
            .bind(OFFLINE)
            .bind(operator)
            .bind(now)
            .bind(script_id)
            .bind(ONLINE)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE script_version SET status = $1, last_modify_user = $2, last_modify_time = $3 WHERE id = $4")
            .bind(status)
            .bind(operator)
            .bind(now)
            .bind(version_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.script_version(scope.0, scope.1, version_id).await
    }

    // The lookups below look alike and stay apart: each spells out its statement beside the
    // values it binds, and they differ in what they join and which columns they match.

    /// A script of the scope.
    pub async fn script(
        &self,
        scope_type: &str,
        scope_id: &str,
        script_id: &str,
    ) -> Result<ScriptRecord, ScriptsError> {
        let row = sqlx::query(&format!(
            "SELECT {SCRIPT_COLUMNS} FROM script s WHERE s.script_id = $1 AND s.bk_scope_type = $2 AND s.bk_scope_id = $3"
        ))
        .bind(script_id)
        .bind(scope_type)
        .bind(scope_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(ScriptsError::NotFound)?;
        Ok(script_row(&row))
    }

    /// A version of a script of the scope.
    pub async fn script_version(
        &self,
        scope_type: &str,
        scope_id: &str,
        id: i64,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM script_version v JOIN script s ON s.script_id = v.script_id
             WHERE v.id = $1 AND s.bk_scope_type = $2 AND s.bk_scope_id = $3"
        ))
        .bind(id)
        .bind(scope_type)
        .bind(scope_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(ScriptsError::NotFound)?;
        Ok(version_row(&row))
    }

    /// A version by its label.
    pub async fn script_version_by_label(
        &self,
        scope: (&str, &str),
        script_id: &str,
        version: &str,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM script_version v JOIN script s ON s.script_id = v.script_id
             WHERE v.script_id = $1 AND v.version = $2 AND s.bk_scope_type = $3 AND s.bk_scope_id = $4"
        ))
        .bind(script_id)
        .bind(version)
        .bind(scope.0)
        .bind(scope.1)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(ScriptsError::NotFound)?;
        Ok(version_row(&row))
    }

    /// The online version of a script of the scope, if it has one.
    pub async fn online_script_version(
        &self,
        scope: (&str, &str),
        script_id: &str,
    ) -> Result<Option<ScriptVersionRecord>, ScriptsError> {
        let script = self.script(scope.0, scope.1, script_id).await?;
        match script.online_script_version_id {
            Some(id) => self.script_version(scope.0, scope.1, id).await.map(Some),
            None => Ok(None),
        }
    }

    /// Scripts of a scope, newest first, and the count before paging.
    pub async fn list_scripts(
        &self,
        f: &ScriptFilter,
    ) -> Result<(i64, Vec<ScriptRecord>), ScriptsError> {
        fn conditions<'a>(q: &mut Statement<'a>, f: &'a ScriptFilter) {
            q.push(" WHERE s.bk_scope_type = ")
                .push_bind(&f.bk_scope_type);
            q.push(" AND s.bk_scope_id = ").push_bind(&f.bk_scope_id);
            if let Some(name) = &f.name {
                // Portable substring match: LIKE with the pattern's own wildcards escaped,
                // case-insensitive in both SQLite and PostgreSQL.
                q.push(" AND LOWER(s.name) LIKE LOWER(")
                    .push_bind(like_pattern(name))
                    .push(") ESCAPE '\\'");
            }
            if let Some(language) = f.script_language.filter(|l| *l != 0) {
                q.push(" AND s.script_language = ").push_bind(language);
            }
        }
        let mut count = Statement::new(self.dialect, "SELECT COUNT(*) FROM script s");
        conditions(&mut count, f);
        let total: i64 = count.build().fetch_one(&self.pool).await?.get(0);
        let mut page = Statement::new(
            self.dialect,
            format!("SELECT {SCRIPT_COLUMNS} FROM script s"),
        );
        conditions(&mut page, f);
        page.push(" ORDER BY s.create_time DESC, s.script_id LIMIT ")
            .push_bind(f.length)
            .push(" OFFSET ")
            .push_bind(f.start);
        let rows = page.build().fetch_all(&self.pool).await?;
        Ok((total, rows.iter().map(script_row).collect()))
    }

    /// Versions of a script of the scope, newest first, and the count before paging.
    pub async fn list_script_versions(
        &self,
        scope: (&str, &str),
        script_id: &str,
        start: i64,
        length: i64,
    ) -> Result<(i64, Vec<ScriptVersionRecord>), ScriptsError> {
        self.script(scope.0, scope.1, script_id).await?;
        let total: i64 = sqlx::query("SELECT COUNT(*) FROM script_version WHERE script_id = $1")
            .bind(script_id)
            .fetch_one(&self.pool)
            .await?
            .get(0);
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM script_version v JOIN script s ON s.script_id = v.script_id
             WHERE v.script_id = $1 ORDER BY v.id DESC LIMIT $2 OFFSET $3"
        ))
        .bind(script_id)
        .bind(length)
        .bind(start)
        .fetch_all(&self.pool)
        .await?;
        Ok((total, rows.iter().map(version_row).collect()))
    }

    /// Renames a script of the scope or changes its description.
    pub async fn update_script_basic(
        &self,
        scope: (&str, &str),
        script_id: &str,
        basics: &ScriptBasics,
    ) -> Result<ScriptRecord, ScriptsError> {
        let script = self.script(scope.0, scope.1, script_id).await?;
        let description = basics
            .description
            .clone()
            .unwrap_or_else(|| script.description.clone());
        sqlx::query(
            "UPDATE script SET name = $1, description = $2, last_modify_user = $3, last_modify_time = $4
             WHERE script_id = $5",
        )
        .bind(&basics.name)
        .bind(&description)
        .bind(&basics.operator)
        .bind(basics.now)
        .bind(&script.script_id)
        .execute(&self.pool)
        .await?;
        self.script(scope.0, scope.1, script_id).await
    }

    /// Changes a draft version's content and description; other versions are fixed.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_script_version(
        &self,
        scope: (&str, &str),
        script_id: &str,
        version_id: i64,
        content: &[u8],
        version_desc: Option<&str>,
        operator: &str,
        now: i64,
    ) -> Result<ScriptVersionRecord, ScriptsError> {
        let version = self.script_version(scope.0, scope.1, version_id).await?;
        if version.script_id != script_id {
            return Err(ScriptsError::NotFound);
        }
        // Conditional on the status, so a version published meanwhile is never rewritten.
        let updated = sqlx::query(
            "UPDATE script_version SET content = $1, version_desc = $2, last_modify_user = $3, last_modify_time = $4
             WHERE id = $5 AND status = $6",
        )
        .bind(content)
        .bind(version_desc.unwrap_or(&version.version_desc))
        .bind(operator)
        .bind(now)
        .bind(version_id)
        .bind(DRAFT)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            let now_status = self.script_version(scope.0, scope.1, version_id).await?;
            return Err(ScriptsError::WrongStatus(status_name(now_status.status)));
        }
        self.script_version(scope.0, scope.1, version_id).await
    }

    /// Deletes a script of the scope with all its versions.
    pub async fn delete_script(
        &self,
        scope: (&str, &str),
        script_id: &str,
    ) -> Result<(), ScriptsError> {
        let script = self.script(scope.0, scope.1, script_id).await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM script_version WHERE script_id = $1")
            .bind(&script.script_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM script WHERE script_id = $1")
            .bind(&script.script_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes a version of a script of the scope; deleting its last version deletes the
    /// script, as bk-job does.
    pub async fn delete_script_version(
        &self,
        scope: (&str, &str),
        script_id: &str,
        version_id: i64,
    ) -> Result<(), ScriptsError> {
        let version = self.script_version(scope.0, scope.1, version_id).await?;
        if version.script_id != script_id {
            return Err(ScriptsError::NotFound);
        }
        let mut tx = self.pool.begin().await?;
        // Checked in the statement, so a publish that lands meanwhile is not undone.
        let deleted = sqlx::query("DELETE FROM script_version WHERE id = $1 AND status <> $2")
            .bind(version_id)
            .bind(ONLINE)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(ScriptsError::DeleteOnline);
        }
        let left: i64 = sqlx::query("SELECT COUNT(*) FROM script_version WHERE script_id = $1")
            .bind(script_id)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        if left == 0 {
            sqlx::query("DELETE FROM script WHERE script_id = $1")
                .bind(script_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    script_id: &str,
    new: &NewScript,
) -> Result<i64, ScriptsError> {
    let inserted = sqlx::query(
        "INSERT INTO script_version (script_id, version, content, status, version_desc, creator, create_time, last_modify_user, last_modify_time)
         VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(script_id)
    .bind(&new.version)
    .bind(&new.content)
    .bind(&new.version_desc)
    .bind(&new.operator)
    .bind(new.now)
    .bind(&new.operator)
    .bind(new.now)
    .fetch_one(&mut **tx)
    .await;
    match inserted {
        Ok(row) => Ok(row.get(0)),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(ScriptsError::DuplicateVersion(new.version.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(name: &str) -> NewScript {
        NewScript {
            bk_scope_type: "biz".into(),
            bk_scope_id: "2".into(),
            name: name.into(),
            description: String::new(),
            script_language: 1,
            content: b"echo".to_vec(),
            version: "1".into(),
            version_desc: String::new(),
            operator: "admin".into(),
            now: 1,
        }
    }

    #[tokio::test]
    async fn names_match_as_substrings_with_wildcards_taken_literally() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        for (i, name) in ["Deploy_web", "deployXweb", "100% clean", "1000 clean"]
            .iter()
            .enumerate()
        {
            store
                .create_script(&script(name), &format!("s{i}"))
                .await
                .unwrap();
        }
        let names = |filter: &str| {
            let store = store.clone();
            let filter = filter.to_owned();
            async move {
                let (total, scripts) = store
                    .list_scripts(&ScriptFilter {
                        bk_scope_type: "biz".into(),
                        bk_scope_id: "2".into(),
                        name: Some(filter),
                        script_language: None,
                        start: 0,
                        length: 10,
                    })
                    .await
                    .unwrap();
                let mut names: Vec<String> = scripts.into_iter().map(|s| s.name).collect();
                names.sort();
                assert_eq!(total as usize, names.len());
                names
            }
        };
        assert_eq!(names("deploy_").await, vec!["Deploy_web"]);
        assert_eq!(names("DEPLOY").await, vec!["Deploy_web", "deployXweb"]);
        assert_eq!(names("0%").await, vec!["100% clean"]);
        assert_eq!(names("\\").await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn only_drafts_change_and_the_last_version_takes_its_script_along() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let scope = ("biz", "2");
        let v1 = store.create_script(&script("s"), "s").await.unwrap();
        let changed = store
            .update_script_version(scope, "s", v1.id, b"echo 2", Some("two"), "bob", 2)
            .await
            .unwrap();
        assert_eq!(changed.content, b"echo 2");
        assert_eq!(changed.last_modify_user, "bob");
        store
            .publish_script_version(scope, "s", v1.id, "bob", 3)
            .await
            .unwrap();
        assert!(matches!(
            store
                .update_script_version(scope, "s", v1.id, b"x", None, "bob", 4)
                .await,
            Err(ScriptsError::WrongStatus("online"))
        ));
        // Another scope's script is not there.
        assert!(matches!(
            store.delete_script(("biz", "3"), "s").await,
            Err(ScriptsError::NotFound)
        ));
        // The online version, which jobs run, is not deleted; once disabled it is.
        assert!(matches!(
            store.delete_script_version(scope, "s", v1.id).await,
            Err(ScriptsError::DeleteOnline)
        ));
        store
            .disable_script_version(scope, "s", v1.id, "bob", 5)
            .await
            .unwrap();
        store
            .delete_script_version(scope, "s", v1.id)
            .await
            .unwrap();
        assert!(matches!(
            store.script("biz", "2", "s").await,
            Err(ScriptsError::NotFound)
        ));
    }
}
