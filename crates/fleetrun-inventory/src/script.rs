//! The script library: scripts owned by a scope, each with versions of which at most one is
//! online, and bk-job's rules for which version a job runs.

use std::collections::HashMap;

use crate::model::Scope;

/// A script in the library (bk-job's script id is a string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub id: String,
    pub name: String,
    /// bk-job `script_language`: 1 shell, 2 bat, 3 Perl, 4 Python, 5 PowerShell.
    pub script_language: i32,
    /// The business or business set that owns the script; other scopes cannot see it.
    pub scope: Scope,
    pub versions: Vec<ScriptVersion>,
}

impl Script {
    /// The version jobs naming only the script run.
    pub fn online_version(&self) -> Option<&ScriptVersion> {
        self.versions
            .iter()
            .find(|v| v.status == VersionStatus::Online)
    }
}

/// One version of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptVersion {
    /// Unique across the library (bk-job's `script_version_id`).
    pub id: i64,
    pub script_id: String,
    /// The label operators give the version, e.g. `"v1.2"`.
    pub version: String,
    pub content: Vec<u8>,
    pub status: VersionStatus,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// bk-job script version status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionStatus {
    Draft = 0,
    Online = 1,
    Offline = 2,
    Disabled = 3,
}

impl VersionStatus {
    /// Only online and offline versions may run.
    pub fn runnable(self) -> bool {
        matches!(self, VersionStatus::Online | VersionStatus::Offline)
    }
}

/// A job's script reference could not be turned into a version to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// Neither a script version id nor a script id was given.
    #[error("no script_version_id or script_id")]
    Missing,
    /// The script or version does not exist, or belongs to another scope.
    #[error("script {0} not found")]
    NotFound(String),
    /// The version is a draft or disabled.
    #[error("script version {0} is neither online nor offline")]
    NotRunnable(i64),
    /// The script exists but none of its versions is online.
    #[error("script {0:?} has no online version")]
    NoOnlineVersion(String),
}

impl ScriptError {
    /// The bk-job error code.
    pub fn code(&self) -> i32 {
        match self {
            ScriptError::Missing => 1241004,
            ScriptError::NotFound(_) => 1243001,
            ScriptError::NotRunnable(_) | ScriptError::NoOnlineVersion(_) => 1244018,
        }
    }
}

/// A change to the script library was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptEditError {
    /// A script with this id already exists.
    #[error("script {0:?} already exists")]
    DuplicateScript(String),
    /// The script's scope is not a business or business set of the inventory.
    #[error("scope {0} does not exist")]
    UnknownScope(Scope),
    /// `script_language` is outside 1 to 5.
    #[error("script_language {0} is not 1 to 5")]
    BadLanguage(i32),
    /// No script with this id.
    #[error("script {0:?} does not exist")]
    UnknownScript(String),
    /// No version with this id.
    #[error("script version {0} does not exist")]
    UnknownVersion(i64),
    /// Disabled versions stay disabled.
    #[error("script version {0} is disabled")]
    Disabled(i64),
}

/// All scripts, indexed by script id and by version id.
#[derive(Debug, Clone, Default)]
pub struct ScriptLibrary {
    scripts: Vec<Script>,
    by_id: HashMap<String, usize>,
    /// Version id to (script index, version index).
    by_version: HashMap<i64, (usize, usize)>,
    next_version_id: i64,
}

impl ScriptLibrary {
    /// Indexes scripts that [`crate::Inventory::build`] has validated.
    pub(crate) fn new(scripts: Vec<Script>) -> Self {
        let mut library = Self {
            scripts,
            ..Self::default()
        };
        for (s, script) in library.scripts.iter().enumerate() {
            library.by_id.insert(script.id.clone(), s);
            for (v, version) in script.versions.iter().enumerate() {
                library.by_version.insert(version.id, (s, v));
                library.next_version_id = library.next_version_id.max(version.id + 1);
            }
        }
        library.next_version_id = library.next_version_id.max(1);
        library
    }

    pub fn scripts(&self) -> &[Script] {
        &self.scripts
    }

    pub fn script(&self, id: &str) -> Option<&Script> {
        self.by_id.get(id).map(|&s| &self.scripts[s])
    }

    pub fn version(&self, id: i64) -> Option<&ScriptVersion> {
        self.by_version
            .get(&id)
            .map(|&(s, v)| &self.scripts[s].versions[v])
    }

    /// bk-job's rule: `script_version_id` wins; `script_id` alone runs the script's online
    /// version. Scripts of other scopes are as good as missing.
    pub fn runnable_version(
        &self,
        scope: &Scope,
        script_version_id: Option<i64>,
        script_id: Option<&str>,
    ) -> Result<&ScriptVersion, ScriptError> {
        if let Some(id) = script_version_id {
            let &(s, v) = self
                .by_version
                .get(&id)
                .filter(|&&(s, _)| self.scripts[s].scope == *scope)
                .ok_or_else(|| ScriptError::NotFound(format!("version {id}")))?;
            let version = &self.scripts[s].versions[v];
            return if version.status.runnable() {
                Ok(version)
            } else {
                Err(ScriptError::NotRunnable(id))
            };
        }
        let id = script_id.ok_or(ScriptError::Missing)?;
        let script = self
            .script(id)
            .filter(|s| s.scope == *scope)
            .ok_or_else(|| ScriptError::NotFound(format!("{id:?}")))?;
        script
            .online_version()
            .ok_or_else(|| ScriptError::NoOnlineVersion(id.to_owned()))
    }

    pub(crate) fn create_script(
        &mut self,
        id: &str,
        name: &str,
        script_language: i32,
        scope: Scope,
    ) -> Result<&Script, ScriptEditError> {
        if self.by_id.contains_key(id) {
            return Err(ScriptEditError::DuplicateScript(id.to_owned()));
        }
        if !(1..=5).contains(&script_language) {
            return Err(ScriptEditError::BadLanguage(script_language));
        }
        self.by_id.insert(id.to_owned(), self.scripts.len());
        self.scripts.push(Script {
            id: id.to_owned(),
            name: name.to_owned(),
            script_language,
            scope,
            versions: Vec::new(),
        });
        Ok(self.scripts.last().unwrap())
    }

    pub(crate) fn create_version(
        &mut self,
        script_id: &str,
        version: &str,
        content: Vec<u8>,
        created_at: i64,
    ) -> Result<&ScriptVersion, ScriptEditError> {
        let &s = self
            .by_id
            .get(script_id)
            .ok_or_else(|| ScriptEditError::UnknownScript(script_id.to_owned()))?;
        let id = self.next_version_id;
        self.next_version_id += 1;
        let script = &mut self.scripts[s];
        self.by_version.insert(id, (s, script.versions.len()));
        script.versions.push(ScriptVersion {
            id,
            script_id: script_id.to_owned(),
            version: version.to_owned(),
            content,
            status: VersionStatus::Draft,
            created_at,
        });
        Ok(script.versions.last().unwrap())
    }

    pub(crate) fn publish(&mut self, script_version_id: i64) -> Result<(), ScriptEditError> {
        let (s, v) = self.locate(script_version_id)?;
        let versions = &mut self.scripts[s].versions;
        if versions[v].status == VersionStatus::Disabled {
            return Err(ScriptEditError::Disabled(script_version_id));
        }
        for version in versions.iter_mut() {
            if version.status == VersionStatus::Online {
                version.status = VersionStatus::Offline;
            }
        }
        versions[v].status = VersionStatus::Online;
        Ok(())
    }

    pub(crate) fn disable(&mut self, script_version_id: i64) -> Result<(), ScriptEditError> {
        let (s, v) = self.locate(script_version_id)?;
        self.scripts[s].versions[v].status = VersionStatus::Disabled;
        Ok(())
    }

    fn locate(&self, script_version_id: i64) -> Result<(usize, usize), ScriptEditError> {
        self.by_version
            .get(&script_version_id)
            .copied()
            .ok_or(ScriptEditError::UnknownVersion(script_version_id))
    }
}
