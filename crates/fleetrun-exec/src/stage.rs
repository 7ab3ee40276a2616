//! The private directory a script is written to before it runs.
//!
//! Layout: `work_dir/tasks/` (0711, owned by the agent: others may pass
//! through but not list it) holds one `<task id>/` per running task (0700,
//! owned by the target user) with the script in it (0500, same owner).

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, chown, fchown};
use std::path::{Path, PathBuf};

use crate::SetupError;
use crate::account::Account;
use crate::language::Language;

/// Why a script could not be staged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StageError {
    /// The id would not make a safe directory or cgroup name.
    #[error("invalid task id {0:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.'")]
    InvalidId(String),
    /// Another task with this id is running.
    #[error("a task with id {0} is already running")]
    AlreadyRunning(String),
    /// The task directory could not be created.
    #[error("cannot create the staging directory {path}: {source}")]
    CreateDir {
        /// The directory concerned.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The script file could not be written.
    #[error("cannot write the script {path}: {source}")]
    WriteScript {
        /// The file concerned.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The directory or script could not be handed to the target user.
    #[error("cannot give {path} to the account: {source}")]
    Chown {
        /// The file or directory concerned.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Rejects ids that could escape the staging root or the cgroup parent.
pub(crate) fn validate_task_id(id: &str) -> Result<(), StageError> {
    let safe_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if (1..=128).contains(&id.len()) && safe_chars && !id.starts_with('.') {
        Ok(())
    } else {
        Err(StageError::InvalidId(id.to_owned()))
    }
}

/// Creates `work_dir/tasks` (0711) and empties it: anything in it was left
/// by an agent that died before it could clean up.
pub(crate) fn prepare_root(work_dir: &Path) -> Result<PathBuf, SetupError> {
    let root = work_dir.join("tasks");
    let root_error = |source| SetupError::StagingRoot {
        path: root.clone(),
        source,
    };
    fs::create_dir_all(work_dir).map_err(root_error)?;
    match DirBuilder::new().mode(0o711).create(&root) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(root_error(err)),
        _ => {}
    }
    let meta = fs::symlink_metadata(&root).map_err(root_error)?;
    if !meta.is_dir() {
        return Err(root_error(io::Error::other("not a directory")));
    }
    // An existing directory may carry another owner or mode; the agent's
    // scripts must not be listable by others.
    chown(&root, Some(nix::unistd::geteuid().as_raw()), None).map_err(root_error)?;
    fs::set_permissions(&root, Permissions::from_mode(0o711)).map_err(root_error)?;
    warn_if_unreachable(&root);
    for entry in fs::read_dir(&root).map_err(root_error)? {
        let path = entry.map_err(root_error)?.path();
        remove_any(&path).map_err(|source| SetupError::Leftover {
            path: path.clone(),
            source,
        })?;
        tracing::info!(path = %path.display(), "removed a leftover staging directory");
    }
    Ok(root)
}

/// Scripts run as other accounts must be able to walk down to their staging
/// directory; a 0700 ancestor (a fresh temp dir, /root) makes every such
/// task fail with "permission denied", so say so once, at start.
fn warn_if_unreachable(root: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let Ok(root) = root.canonicalize() else {
        return;
    };
    if let Some(closed) = root
        .ancestors()
        .find(|dir| fs::metadata(dir).is_ok_and(|meta| meta.permissions().mode() & 0o001 == 0))
    {
        tracing::warn!(
            dir = %closed.display(),
            "other users cannot search this directory: scripts run as accounts other than root will fail to read their staging directory"
        );
    }
}

/// A staged script. Dropping it removes the task directory.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: PathBuf,
    script: PathBuf,
}

impl Staging {
    /// Writes the script into `root/<task id>/`, readable by the account
    /// only. Blocking file I/O.
    pub(crate) fn create(
        root: &Path,
        task_id: &str,
        language: Language,
        content: &[u8],
        account: &Account,
    ) -> Result<Self, StageError> {
        let dir = root.join(task_id);
        if let Err(source) = DirBuilder::new().mode(0o700).create(&dir) {
            return Err(if source.kind() == io::ErrorKind::AlreadyExists {
                StageError::AlreadyRunning(task_id.to_owned())
            } else {
                StageError::CreateDir { path: dir, source }
            });
        }
        let staging = Self {
            script: dir.join(language.script_file_name()),
            dir,
        };
        staging.write_script(content, account)?;
        if account.switch {
            // Last, so the user never holds the directory before the script
            // is in place.
            chown(
                &staging.dir,
                Some(account.uid.as_raw()),
                Some(account.gid.as_raw()),
            )
            .map_err(|source| StageError::Chown {
                path: staging.dir.clone(),
                source,
            })?;
        }
        Ok(staging)
    }

    fn write_script(&self, content: &[u8], account: &Account) -> Result<(), StageError> {
        let path = &self.script;
        let write_error = |source| StageError::WriteScript {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o500)
            .open(path)
            .map_err(write_error)?;
        file.write_all(content).map_err(write_error)?;
        file.set_permissions(Permissions::from_mode(0o500))
            .map_err(write_error)?;
        if account.switch {
            fchown(
                &file,
                Some(account.uid.as_raw()),
                Some(account.gid.as_raw()),
            )
            .map_err(|source| StageError::Chown {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    pub(crate) fn script(&self) -> &Path {
        &self.script
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(err) = remove_any(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %err, "cannot remove a staging directory");
        }
    }
}

/// Removes a file or a directory tree (std's `remove_dir_all` does not
/// follow symlinks a script may have planted); gone already is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) => Err(err),
    };
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids() {
        for ok in ["3f2b1c9e-0d7a-4b8e-9a51-2c6f0e1d4a77", "a", "job_1.2"] {
            validate_task_id(ok).unwrap();
        }
        let long = "x".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "é",
            ".hidden",
            long.as_str(),
        ] {
            assert!(validate_task_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn root_is_0711_and_emptied() {
        let work = tempfile::tempdir().unwrap();
        let root = prepare_root(work.path()).unwrap();
        fs::create_dir_all(root.join("old/sub")).unwrap();
        fs::write(root.join("old/sub/script.sh"), "x").unwrap();
        fs::write(root.join("stray-file"), "x").unwrap();
        fs::set_permissions(&root, Permissions::from_mode(0o777)).unwrap();
        let again = prepare_root(work.path()).unwrap();
        assert_eq!(again, root);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        let mode = fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o711);
    }
}
