//! The private directory a script is written to before it runs.
//!
//! Layout: `work_dir/tasks/` (0711, owned by the agent: others may pass
//! through but not list it) holds one `<task id>/` per running task (0700,
//! owned by the target user) with the script in it (0500, same owner).
//!
//! `work_dir` and every directory above it must be out of reach of other
//! accounts (see [`crate::dirs`]); the agent refuses to start otherwise.
//! Below it everything is created and handed over through descriptors
//! (`mkdirat`, `openat` with `O_NOFOLLOW`, `fchown`, `fchmod`): no path is
//! looked up twice, so nothing can be swapped between a check and a use.
//! The interpreter still opens the script by its path (the script's `$0`
//! is that path); every directory on it is the agent's or root's and not
//! writable by others, except the task directory, which by then belongs to
//! the account the script runs as anyway.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod, fstat, mkdirat};
use nix::unistd::{Uid, User, fchown};

use crate::SetupError;
use crate::account::Account;
use crate::dirs::{self, WalkError};
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

impl StageError {
    /// Whether the failure is the place's (full, vanished, unwritable), not the task's: another
    /// place may still take the script. A bad or duplicate id would fail anywhere.
    pub(crate) fn is_about_the_place(&self) -> bool {
        match self {
            Self::InvalidId(_) | Self::AlreadyRunning(_) => false,
            Self::CreateDir { .. } | Self::WriteScript { .. } | Self::Chown { .. } => true,
        }
    }
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

/// `work_dir/tasks`, held open.
#[derive(Debug)]
pub(crate) struct StagingRoot {
    /// Where the interpreters find it (symlinks in `work_dir` resolved).
    path: PathBuf,
    dir: OwnedFd,
    /// Device and inode of `dir`, to tell whether `path` still leads to it.
    id: (u64, u64),
}

impl StagingRoot {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names the directory held: scripts are run by
    /// path, so staging into a directory moved away since would run
    /// whatever is at the path now.
    fn in_place(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id)
    }
}

/// Checks `work_dir` and everything above it, creates `work_dir/tasks`
/// (0711) and empties it: anything in it was left by an agent that died
/// before it could clean up.
pub(crate) fn prepare_root(work_dir: &Path) -> Result<StagingRoot, SetupError> {
    let agent = nix::unistd::geteuid();
    let (work, work_path) = dirs::open_trusted(work_dir, agent).map_err(|err| match err {
        WalkError::Untrusted(untrusted) => untrusted_work_dir(untrusted),
        WalkError::Io { path, source } => SetupError::StagingRoot { path, source },
    })?;
    let path = work_path.join("tasks");
    let root_error = |source: Errno| SetupError::StagingRoot {
        path: path.clone(),
        source: source.into(),
    };
    match mkdirat(&work, "tasks", Mode::from_bits_truncate(0o711)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(err) => return Err(root_error(err)),
    }
    let dir = dirs::open_dir_at(work.as_fd(), OsStr::new("tasks")).map_err(|err| match err {
        Errno::ENOTDIR | Errno::ELOOP => {
            let meta = std::fs::symlink_metadata(&path);
            untrusted_work_dir(dirs::Untrusted {
                dir: path.clone(),
                owner: meta.as_ref().map_or(0, |m| m.uid()),
                mode: meta.as_ref().map_or(0, |m| m.mode() & 0o7777),
                problem: dirs::Problem::NotADirectory,
            })
        }
        err => root_error(err),
    })?;
    let stat = fstat(&dir).map_err(root_error)?;
    if !dirs::trusted_owner(stat.st_uid, agent) {
        return Err(untrusted_work_dir(dirs::Untrusted {
            dir: path,
            owner: stat.st_uid,
            mode: stat.st_mode & 0o7777,
            problem: dirs::Problem::Owner,
        }));
    }
    // Root's directory under an unprivileged agent, or a mode changed by
    // hand: the agent's scripts must not be listable by others.
    if stat.st_uid != agent.as_raw() {
        fchown(&dir, Some(agent), None).map_err(root_error)?;
    }
    fchmod(&dir, Mode::from_bits_truncate(0o711)).map_err(root_error)?;
    warn_if_unreachable(&path);
    let leftovers = dirs::entries(dir.as_fd()).map_err(|source| SetupError::StagingRoot {
        path: path.clone(),
        source,
    })?;
    for name in leftovers {
        let leftover = path.join(&name);
        dirs::remove_at(dir.as_fd(), &name).map_err(|source| SetupError::Leftover {
            path: leftover.clone(),
            source,
        })?;
        tracing::info!(path = %leftover.display(), "removed a leftover staging directory");
    }
    Ok(StagingRoot {
        path,
        id: (stat.st_dev, stat.st_ino),
        dir,
    })
}

/// Scripts up to this size are staged on a memory file system when the agent has one; larger
/// ones, which would hold that much of the host's memory while they run, under `work_dir`.
pub(crate) const MEMORY_SCRIPT_MAX: usize = 1024 * 1024;

/// Where the agent may stage on a memory file system (tmpfs) unless told otherwise:
/// `$XDG_RUNTIME_DIR` (the account's own) for an agent of another account, and `/dev/shm`
/// (sticky, like `/tmp`) for either. Not root's `/run`: a task's directory is its account's,
/// and an account filling `/run` would starve the host's services of it.
pub(crate) fn memory_bases() -> Vec<PathBuf> {
    let mut bases = Vec::new();
    if !nix::unistd::geteuid().is_root()
        && let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty())
    {
        bases.push(PathBuf::from(dir));
    }
    bases.push(PathBuf::from("/dev/shm"));
    bases
}

/// A staging root on the first of `bases` that is a memory file system and holds a directory
/// of this agent's, `fleetrun-stage-<digest of work_dir>` (one per work directory, so agents
/// sharing a host keep apart, and a restarted agent finds its leftovers), checked and prepared
/// exactly as `work_dir/tasks` is ([`prepare_root`]: walked from `/` without following links
/// it does not trust, owned by the agent, 0711, emptied). Bases mounted `noexec` are passed
/// over. `None` when none is; why is logged.
pub(crate) fn prepare_memory_root(bases: &[PathBuf], work_dir: &Path) -> Option<StagingRoot> {
    let work = std::path::absolute(work_dir).unwrap_or_else(|_| work_dir.to_owned());
    let digest = ring::digest::digest(&ring::digest::SHA256, work.as_os_str().as_encoded_bytes());
    let name = hex::encode(&digest.as_ref()[..8]);
    for base in bases {
        match nix::sys::statfs::statfs(base) {
            Ok(fs) if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => {}
            _ => continue,
        }
        // Interpreters that execute what they are given, and scripts that run files beside
        // themselves, would fail there.
        match nix::sys::statvfs::statvfs(base) {
            Ok(vfs) if !vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC) => {}
            Ok(_) => {
                tracing::info!(base = %base.display(), "not staging scripts on a file system mounted noexec");
                continue;
            }
            Err(_) => continue,
        }
        let dir = base.join(format!("fleetrun-stage-{name}"));
        match prepare_root(&dir) {
            Ok(root) => return Some(root),
            Err(err) => {
                tracing::warn!(dir = %dir.display(), %err, "not staging scripts on this memory file system");
            }
        }
    }
    None
}

fn untrusted_work_dir(untrusted: dirs::Untrusted) -> SetupError {
    let owner = match User::from_uid(Uid::from_raw(untrusted.owner)) {
        Ok(Some(user)) => format!("{} (uid {})", user.name, untrusted.owner),
        _ => format!("uid {}", untrusted.owner),
    };
    SetupError::UntrustedWorkDir {
        dir: untrusted.dir,
        owner,
        mode: untrusted.mode,
        problem: untrusted.problem.describe(),
    }
}

/// Scripts run as other accounts must be able to walk down to their staging
/// directory; a 0700 ancestor (a fresh temp dir, /root) makes every such
/// task fail with "permission denied", so say so once, at start.
fn warn_if_unreachable(root: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    if let Some(closed) = root
        .ancestors()
        .find(|dir| std::fs::metadata(dir).is_ok_and(|meta| meta.mode() & 0o001 == 0))
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
    root: Arc<StagingRoot>,
    task_id: String,
    script: PathBuf,
}

impl Staging {
    /// Writes the script into `root/<task id>/`, readable by the account
    /// only. Blocking file I/O.
    pub(crate) fn create(
        root: &Arc<StagingRoot>,
        task_id: &str,
        language: Language,
        content: &[u8],
        account: &Account,
    ) -> Result<Self, StageError> {
        let path = root.path.join(task_id);
        let dir_error = |source: Errno| StageError::CreateDir {
            path: path.clone(),
            source: source.into(),
        };
        if !root.in_place() {
            return Err(StageError::CreateDir {
                path: root.path.clone(),
                source: io::Error::other(
                    "the staging directory was moved or replaced since the agent started",
                ),
            });
        }
        match mkdirat(&root.dir, task_id, Mode::from_bits_truncate(0o700)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(StageError::AlreadyRunning(task_id.to_owned())),
            Err(err) => return Err(dir_error(err)),
        }
        let staging = Self {
            root: root.clone(),
            task_id: task_id.to_owned(),
            script: path.join(language.script_file_name()),
        };
        let dir = dirs::open_dir_at(root.dir.as_fd(), OsStr::new(task_id)).map_err(dir_error)?;
        fchmod(&dir, Mode::from_bits_truncate(0o700)).map_err(dir_error)?;
        staging.write_script(&dir, language, content, account)?;
        if account.switch {
            // Last, so the user never holds the directory before the script
            // is in place.
            fchown(&dir, Some(account.uid), Some(account.gid)).map_err(|source| {
                StageError::Chown {
                    path: path.clone(),
                    source: source.into(),
                }
            })?;
        }
        Ok(staging)
    }

    fn write_script(
        &self,
        dir: &OwnedFd,
        language: Language,
        content: &[u8],
        account: &Account,
    ) -> Result<(), StageError> {
        let path = &self.script;
        let write_error = |source: io::Error| StageError::WriteScript {
            path: path.clone(),
            source,
        };
        let file = openat(
            dir,
            language.script_file_name(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o500),
        )
        .map_err(|err| write_error(err.into()))?;
        let mut file = File::from(file);
        file.write_all(content).map_err(write_error)?;
        fchmod(&file, Mode::from_bits_truncate(0o500)).map_err(|err| write_error(err.into()))?;
        if account.switch {
            fchown(&file, Some(account.uid), Some(account.gid)).map_err(|source| {
                StageError::Chown {
                    path: path.clone(),
                    source: source.into(),
                }
            })?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(err) = dirs::remove_at(self.root.dir.as_fd(), OsStr::new(&self.task_id)) {
            let dir = self.root.path.join(&self.task_id);
            tracing::warn!(dir = %dir.display(), %err, "cannot remove a staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, Permissions};
    use std::os::unix::fs::PermissionsExt;

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
        let root = prepare_root(work.path()).unwrap().path().to_owned();
        fs::create_dir_all(root.join("old/sub")).unwrap();
        fs::write(root.join("old/sub/script.sh"), "x").unwrap();
        fs::write(root.join("stray-file"), "x").unwrap();
        fs::set_permissions(&root, Permissions::from_mode(0o777)).unwrap();
        let again = prepare_root(work.path()).unwrap();
        assert_eq!(again.path(), root);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        let mode = fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o711);
    }
}
