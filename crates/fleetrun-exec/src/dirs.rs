//! Directories reached through held descriptors rather than paths.
//!
//! The agent writes scripts that run as root below its work directory, so
//! whoever can rename or replace a directory on the way there can make root
//! run something else. [`open_trusted`] walks the work directory down from
//! `/` one component at a time (`openat` with `O_NOFOLLOW`), checks every
//! directory on the way through the descriptor it opened, and hands back the
//! last descriptor, so nothing checked can be swapped before it is used.
//! [`remove_at`] deletes trees that another account could fill with
//! symlinks, without ever following one.
//!
//! A directory is trusted when it is owned by root or by the agent's own
//! account, and no one else can write to it: neither its group nor everyone
//! (an ACL that grants writes to anyone shows up as group write permission,
//! the ACL mask). A directory others may write to with the sticky bit set
//! (`/tmp`) is accepted above the work directory, never as the work
//! directory itself: there others can create entries but cannot rename or
//! remove ours, and the next component, like every other, must be ours or
//! root's. A symlink on the way is followed only if it is ours or root's
//! too; where it points to is then checked like the rest.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Uid, UnlinkatFlags, unlinkat};

/// Symlinks followed on the way before giving up, as the kernel does.
const MAX_SYMLINKS: usize = 40;

/// Removal attempts for a directory that keeps changing under the agent.
const REMOVE_ATTEMPTS: usize = 5;

/// A directory (or a link to one) that another account could replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Untrusted {
    pub dir: PathBuf,
    pub owner: u32,
    /// Permission bits, with set-id and sticky bits.
    pub mode: u32,
    pub problem: Problem,
}

/// What is wrong with an [`Untrusted`] directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    Owner,
    GroupWritable,
    WorldWritable,
    NotADirectory,
    LinkOwner,
    TooManyLinks,
}

impl Problem {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Owner => "is owned by another account",
            Self::GroupWritable => "is writable by its group",
            Self::WorldWritable => "is writable by every account",
            Self::NotADirectory => "is not a directory",
            Self::LinkOwner => "is a symbolic link owned by another account",
            Self::TooManyLinks => "has too many levels of symbolic links",
        }
    }
}

/// Why [`open_trusted`] failed.
#[derive(Debug)]
pub(crate) enum WalkError {
    Untrusted(Untrusted),
    Io { path: PathBuf, source: io::Error },
}

/// Opens the directory `path` (relative paths start at the current
/// directory), creating what is missing of it with mode 0755, after checking
/// it and every directory above it. Returns a descriptor (`O_PATH` for
/// directories the agent did not create, which it may only be able to
/// search) and the path with symlinks resolved.
pub(crate) fn open_trusted(path: &Path, agent: Uid) -> Result<(OwnedFd, PathBuf), WalkError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source: Errno| WalkError::Io {
            path,
            source: source.into(),
        }
    };
    let absolute = std::path::absolute(path).map_err(|source| WalkError::Io {
        path: path.to_owned(),
        source,
    })?;
    // Still to walk, last component first.
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, &absolute);
    let root = PathBuf::from("/");
    let root_fd =
        openat(AT_FDCWD, "/", dir_flags(OFlag::O_PATH), Mode::empty()).map_err(io_error(&root))?;
    check(
        &fstat(&root_fd).map_err(io_error(&root))?,
        &root,
        agent,
        false,
    )?;
    // The directories walked so far, each checked; `..` goes back up this
    // list, never through the file system.
    let mut walked: Vec<(OwnedFd, PathBuf)> = vec![(root_fd, root)];
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == "." {
            continue;
        }
        if name == ".." {
            if walked.len() > 1 {
                walked.pop();
            }
            continue;
        }
        let (parent, parent_path) = walked.last().expect("the root is never popped");
        let here = parent_path.join(&name);
        let (fd, created) = match fstatat(parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) if file_type(&stat) == SFlag::S_IFLNK => {
                if !trusted_owner(stat.st_uid, agent) {
                    return Err(untrusted(&here, &stat, Problem::LinkOwner));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(untrusted(&here, &stat, Problem::TooManyLinks));
                }
                let target = readlinkat(parent, name.as_os_str()).map_err(io_error(&here))?;
                let target = Path::new(&target);
                if target.is_absolute() {
                    walked.truncate(1);
                }
                push_components(&mut pending, target);
                continue;
            }
            Ok(_) => (
                openat(
                    parent,
                    name.as_os_str(),
                    dir_flags(OFlag::O_PATH),
                    Mode::empty(),
                ),
                false,
            ),
            Err(Errno::ENOENT) => {
                match mkdirat(parent, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(err) => return Err(io_error(&here)(err)),
                }
                (
                    openat(
                        parent,
                        name.as_os_str(),
                        dir_flags(OFlag::O_RDONLY),
                        Mode::empty(),
                    ),
                    true,
                )
            }
            Err(err) => return Err(io_error(&here)(err)),
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(Errno::ENOTDIR | Errno::ELOOP) => {
                let stat = fstatat(parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(io_error(&here))?;
                return Err(untrusted(&here, &stat, Problem::NotADirectory));
            }
            Err(err) => return Err(io_error(&here)(err)),
        };
        if created {
            // Whatever the umask: the directory must not be writable by
            // others, and others must be able to walk through it to their
            // staging directories.
            fchmod(&fd, Mode::from_bits_truncate(0o755)).map_err(io_error(&here))?;
        }
        let stat = fstat(&fd).map_err(io_error(&here))?;
        check(&stat, &here, agent, false)?;
        walked.push((fd, here));
    }
    let (fd, path) = walked.pop().expect("the root is never popped");
    check(&fstat(&fd).map_err(io_error(&path))?, &path, agent, true)?;
    Ok((fd, path))
}

fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let start = pending.len();
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {}
            Component::CurDir => pending.push(".".into()),
            Component::ParentDir => pending.push("..".into()),
            Component::Normal(name) => pending.push(name.to_owned()),
        }
    }
    pending[start..].reverse();
}

fn dir_flags(access: OFlag) -> OFlag {
    access | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn file_type(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

pub(crate) fn trusted_owner(uid: u32, agent: Uid) -> bool {
    uid == 0 || uid == agent.as_raw()
}

fn untrusted(dir: &Path, stat: &FileStat, problem: Problem) -> WalkError {
    WalkError::Untrusted(Untrusted {
        dir: dir.to_owned(),
        owner: stat.st_uid,
        mode: stat.st_mode & 0o7777,
        problem,
    })
}

/// Checks one directory on the way; `last` is the work directory itself,
/// where even a sticky directory writable by all will not do.
fn check(stat: &FileStat, dir: &Path, agent: Uid, last: bool) -> Result<(), WalkError> {
    let mode = stat.st_mode;
    let problem = if file_type(stat) != SFlag::S_IFDIR {
        Some(Problem::NotADirectory)
    } else if !trusted_owner(stat.st_uid, agent) {
        Some(Problem::Owner)
    } else if mode & 0o022 == 0 || (mode & 0o1000 != 0 && !last) {
        None
    } else if mode & 0o002 != 0 {
        Some(Problem::WorldWritable)
    } else {
        Some(Problem::GroupWritable)
    };
    match problem {
        Some(problem) => Err(untrusted(dir, stat, problem)),
        None => Ok(()),
    }
}

/// Opens the directory `name` in `parent` for reading, refusing a symlink.
pub(crate) fn open_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(parent, name, dir_flags(OFlag::O_RDONLY), Mode::empty())
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    // A fresh open file description, so listing does not move the offset of
    // the caller's descriptor.
    let mut list = Dir::openat(dir, ".", dir_flags(OFlag::O_RDONLY), Mode::empty())?;
    let mut names = Vec::new();
    for entry in list.iter() {
        let name = entry?.file_name().to_bytes().to_owned();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_owned());
        }
    }
    Ok(names)
}

/// Removes `name` from `parent`: a file or link itself, a directory with
/// everything below it. Never follows a symlink, wherever one was planted
/// (each directory is opened with `O_NOFOLLOW` relative to its parent's
/// descriptor); gone already is fine. The tree may belong to an account that
/// is still changing it: a directory refilled or replaced meanwhile is tried
/// again a few times.
pub(crate) fn remove_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    for _ in 0..REMOVE_ATTEMPTS {
        match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EISDIR) => {}
            Err(err) => return Err(err.into()),
        }
        let dir = match open_dir_at(parent, name) {
            Ok(dir) => dir,
            Err(Errno::ENOENT) => return Ok(()),
            // Replaced by a file or a link since: unlink that.
            Err(Errno::ENOTDIR | Errno::ELOOP) => continue,
            Err(err) => return Err(err.into()),
        };
        for entry in entries(dir.as_fd())? {
            remove_at(dir.as_fd(), &entry)?;
        }
        match unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::ENOTEMPTY) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Err(io::Error::other(
        "it kept changing while it was being removed",
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn agent() -> Uid {
        nix::unistd::geteuid()
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refused(path: &Path) -> Untrusted {
        match open_trusted(path, agent()) {
            Err(WalkError::Untrusted(untrusted)) => untrusted,
            other => panic!("{}: {other:?}", path.display()),
        }
    }

    #[test]
    fn creates_what_is_missing_with_0755() {
        let base = tempfile::tempdir().unwrap();
        let (fd, resolved) = open_trusted(&base.path().join("a/b/./c"), agent()).unwrap();
        let meta = std::fs::metadata(base.path().join("a/b/c")).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(resolved, base.path().join("a/b/c"));
        assert_eq!(fstat(&fd).unwrap().st_ino, {
            use std::os::unix::fs::MetadataExt;
            meta.ino()
        });
    }

    #[test]
    fn refuses_writable_directories_and_names_them() {
        let base = tempfile::tempdir().unwrap();
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o775);
        let found = refused(&shared.join("work"));
        assert_eq!(
            (found.dir, found.mode, found.problem),
            (shared.clone(), 0o775, Problem::GroupWritable)
        );
        set_mode(&shared, 0o757);
        assert_eq!(
            refused(&shared.join("work")).problem,
            Problem::WorldWritable
        );
        // Sticky like /tmp: fine above the work directory, not as it.
        set_mode(&shared, 0o1777);
        open_trusted(&shared.join("work"), agent()).unwrap();
        assert_eq!(refused(&shared).dir, shared);
        assert!(!base.path().join("shared/work/tasks").exists());
    }

    #[test]
    fn follows_trusted_links_and_checks_their_target() {
        let base = tempfile::tempdir().unwrap();
        let real = base.path().join("real");
        std::fs::create_dir(&real).unwrap();
        symlink(&real, base.path().join("link")).unwrap();
        symlink("../real/sub", base.path().join("real/rel")).unwrap();
        let (_, resolved) = open_trusted(&base.path().join("link/rel"), agent()).unwrap();
        assert_eq!(resolved, real.join("sub"));
        assert!(real.join("sub").is_dir());
        set_mode(&real, 0o777);
        assert_eq!(refused(&base.path().join("link/x")).dir, real);
        symlink("loop", base.path().join("loop")).unwrap();
        assert_eq!(
            refused(&base.path().join("loop")).problem,
            Problem::TooManyLinks
        );
        std::fs::write(base.path().join("file"), "").unwrap();
        assert_eq!(
            refused(&base.path().join("file")).problem,
            Problem::NotADirectory
        );
    }

    #[test]
    fn removal_never_follows_links() {
        let base = tempfile::tempdir().unwrap();
        let outside = base.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let tree = base.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        symlink(&outside, tree.join("a/to-dir")).unwrap();
        symlink(outside.join("keep"), tree.join("a/b/to-file")).unwrap();
        std::fs::write(tree.join("a/b/f"), "x").unwrap();
        let parent = open_dir_at(AT_FDCWD, base.path().as_os_str()).unwrap();
        remove_at(parent.as_fd(), OsStr::new("tree")).unwrap();
        assert!(!tree.exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"x");
        remove_at(parent.as_fd(), OsStr::new("tree")).unwrap();
        // A link itself is removed, not what it points to.
        symlink(&outside, base.path().join("link")).unwrap();
        remove_at(parent.as_fd(), OsStr::new("link")).unwrap();
        assert!(outside.join("keep").exists());
    }
}
