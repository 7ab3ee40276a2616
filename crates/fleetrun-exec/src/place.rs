//! Writes files into a directory as an OS account: the file task's half on the host.
//!
//! The work runs on a thread of its own that acts as the account towards the file systems
//! (`sys::become_on_this_thread`: the account's groups and file-system ids, no capabilities, so
//! nothing it does has root's rights over files; its real, effective and saved ids stay root's,
//! so the account cannot signal, limit or trace the agent meanwhile) and ends afterwards. The target
//! directory is reached from `/` one component at a time with `O_NOFOLLOW` and each descriptor
//! checked to be a directory, so a symbolic link planted anywhere in the path is refused rather
//! than followed; a missing directory is created by the account. Each file is written to a fresh
//! temporary name in the target directory (`O_CREAT | O_EXCL | O_NOFOLLOW`, 0600), synced, read
//! back and hashed; only a file whose SHA-256 matches gets its mode and is renamed over the final
//! name (`rename` replaces a link planted there, it never writes through it). Whatever fails
//! leaves nothing under the final name and removes the temporary file.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Seek as _, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::account::{self, AccountError, AgentIdentity};
use crate::sys::{self, Credentials};

/// The deepest target directory accepted, in components.
pub const MAX_DEPTH: usize = 64;

// A source the agent reads as deep as the parser lets a path be asked for, no deeper.
const _: () = assert!(fleetrun_proto::source_path::MAX_SOURCE_DEPTH == MAX_DEPTH);

/// Files to write into one directory.
#[derive(Clone)]
pub struct Placement {
    /// Makes the temporary names unique to the task.
    pub task_tag: String,
    /// Set for pulled files that may be resumed after a cut: each is written to a name made of
    /// this tag, the file's name and its SHA-256 (`.fleetrun-<tag>-<16 hex>.part`), kept there
    /// when the pull is interrupted ([`Pull::interrupted`]), and continued by a later placement
    /// with the same tag from the chunks it holds that hash right (the rest is cut off).
    pub resume_tag: Option<String>,
    /// The account the files are written as and owned by.
    pub account: String,
    /// Absolute, without `.` or `..`.
    pub target_dir: PathBuf,
    /// The first file that fails ends the placement; the rest are [`PlaceEnding::Skipped`].
    pub strict: bool,
    pub files: Vec<FileToPlace>,
    /// As [`crate::ExecConfig::refuse_root`]: `Some(why)` refuses an account that is uid 0.
    pub refuse_root: Option<String>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("account", &self.account)
            .field("target_dir", &self.target_dir)
            .field("strict", &self.strict)
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

/// One file of a [`Placement`].
#[derive(Clone)]
pub struct FileToPlace {
    /// One path component; for [`Content::Pulled`], plain components separated by `/`, the
    /// directories among them created as the account.
    pub name: String,
    /// Where it lands instead of [`Placement::target_dir`] (absolute, checked as it is).
    pub dir: Option<PathBuf>,
    /// Permission bits; anything above `0o777` is dropped.
    pub mode: u32,
    pub sha256: [u8; 32],
    pub content: Content,
}

/// Where a file's bytes come from.
#[derive(Clone)]
pub enum Content {
    /// Given whole.
    Inline(Arc<Vec<u8>>),
    /// Pulled chunk by chunk through the [`Pull`] given to [`place_pulling`]; this many bytes.
    Pulled { size: u64 },
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Inline(bytes) => write!(f, "Inline({} bytes)", bytes.len()),
            Content::Pulled { size } => write!(f, "Pulled({size} bytes)"),
        }
    }
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Inline(bytes) => bytes.len() as u64,
            Content::Pulled { size } => *size,
        }
    }
}

/// Brings pulled files' chunks to the writing thread. Blocking calls: the thread waits.
pub trait Pull: Send {
    /// Asks for the chunks of file `index` of the placement, from chunk `from` (0: its start).
    fn want(&mut self, index: usize, from: usize) -> Result<(), String>;
    /// The next chunk of the file last wanted, already checked against its hash; `None` after
    /// its last.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String>;
    /// The SHA-256 of chunk `chunk` of file `index`: what a partial file's bytes are checked
    /// against before a resume trusts them.
    fn chunk_hash(&self, index: usize, chunk: usize) -> Option<[u8; 32]>;
    /// Whether the chunks stopped coming because the link they come over was cut (not because
    /// the task was cancelled): a resumable file is then kept for the next try.
    fn interrupted(&self) -> bool {
        false
    }
}

impl std::fmt::Debug for FileToPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileToPlace")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("len", &self.content.len())
            .finish_non_exhaustive()
    }
}

/// How one file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceEnding {
    Placed,
    Denied,
    NoSpace,
    BadPath,
    HashMismatch,
    Skipped,
    Failed,
}

/// The report of one file.
#[derive(Debug, Clone)]
pub struct PlacedFile {
    pub index: usize,
    pub ending: PlaceEnding,
    pub bytes: u64,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub message: String,
}

/// Why nothing could be placed at all.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The account does not exist on this host.
    #[error("the account {0} does not exist on this host")]
    UserNotFound(String),
    /// The account exists but may not be used (lookup failure, unprivileged agent, root refused).
    #[error("{0}")]
    Account(String),
    /// The worker thread could not be started or died.
    #[error("cannot run the file task: {0}")]
    Thread(String),
}

/// Whether `name` is one plain path component a file may be given.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(is_control)
}

/// C0 controls (NUL, newline, escape, ...) and DEL: in a name they would forge lines in the
/// file logs and the agent's log.
fn is_control(c: char) -> bool {
    c < ' ' || c == '\u{7f}'
}

/// Whether `name` is a relative path of plain components (each a [`valid_file_name`]) separated
/// by single `/`, at most [`MAX_DEPTH`] of them.
pub fn valid_relative_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 4096
        && name.split('/').count() <= MAX_DEPTH
        && name.split('/').all(valid_file_name)
}

/// Whether `dir` is an absolute path without `.`, `..`, NUL or another control character, of at
/// most [`MAX_DEPTH`] components.
pub fn valid_target_dir(dir: &str) -> bool {
    let path = Path::new(dir);
    dir.starts_with('/')
        && !dir.chars().any(is_control)
        && dir.len() <= 4096
        && path.components().count() <= MAX_DEPTH + 1
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        // `components` folds away `/./`; refuse it as written.
        && !dir.split('/').any(|part| part == "." || part == "..")
}

/// Writes `placement`'s files, calling `report` once per file in order. Blocks (account lookup
/// through NSS, file I/O): call it from a blocking thread. `cancel` stops it between files and
/// between writes; files not yet placed are then reported [`PlaceEnding::Skipped`].
pub fn place(
    placement: Placement,
    cancel: Arc<AtomicBool>,
    report: impl FnMut(PlacedFile) + Send + 'static,
) -> Result<(), PlaceError> {
    place_pulling(placement, None, cancel, report)
}

/// As [`place`], with `pull` bringing the bytes of [`Content::Pulled`] files (a pulled file
/// without one fails).
pub fn place_pulling(
    placement: Placement,
    mut pull: Option<Box<dyn Pull>>,
    cancel: Arc<AtomicBool>,
    report: impl FnMut(PlacedFile) + Send + 'static,
) -> Result<(), PlaceError> {
    let account = placement.account.clone();
    let refuse_root = placement.refuse_root.clone();
    as_account(&account, refuse_root.as_deref(), move || {
        write_all(&placement, &mut pull, &cancel, report);
    })
}

/// Runs `work` on a thread of its own that acts as `account` towards the file systems (its
/// groups and file-system ids, no capabilities), and waits for it. The thread ends with the work.
pub(crate) fn as_account(
    account_name: &str,
    refuse_root: Option<&str>,
    work: impl FnOnce() + Send + 'static,
) -> Result<(), PlaceError> {
    let agent = AgentIdentity::current();
    let account = match account::resolve(account_name, &agent) {
        Ok(account) => account,
        Err(AccountError::NotFound(name)) => return Err(PlaceError::UserNotFound(name)),
        Err(e) => return Err(PlaceError::Account(e.to_string())),
    };
    if let Some(why) = refuse_root
        && account.uid.is_root()
    {
        return Err(PlaceError::Account(format!(
            "account {account_name:?} is root (uid 0): {why}"
        )));
    }
    let credentials = account.switch.then(|| Credentials {
        uid: account.uid,
        gid: account.gid,
        groups: account.groups.clone(),
    });
    let was_dumpable = sys::dumpable();
    let name = account_name.to_owned();
    let worker = std::thread::Builder::new()
        .name("fleetrun-files".into())
        .spawn(move || -> Result<(), PlaceError> {
            if let Some(credentials) = &credentials {
                sys::become_on_this_thread(credentials).map_err(|e| {
                    PlaceError::Account(format!("cannot act as the account {name}: {e}"))
                })?;
            }
            work();
            Ok(())
        })
        .map_err(|e| PlaceError::Thread(e.to_string()))?;
    let ended = worker
        .join()
        .map_err(|_| PlaceError::Thread("the worker thread panicked".into()));
    // The thread's change of file-system ids cleared the process's dumpable flag; the thread is
    // gone, the agent is what it was.
    if was_dumpable && !sys::dumpable() {
        sys::restore_dumpable();
    }
    ended?
}

fn write_all(
    placement: &Placement,
    pull: &mut Option<Box<dyn Pull>>,
    cancel: &AtomicBool,
    mut report: impl FnMut(PlacedFile),
) {
    let started = SystemTime::now();
    let mut dirs: std::collections::HashMap<PathBuf, Result<OwnedFd, Failure>> =
        std::collections::HashMap::new();
    let mut stop: Option<String> = None;
    for (index, file) in placement.files.iter().enumerate() {
        if stop.is_none() && pull.as_ref().is_some_and(|p| p.interrupted()) {
            stop = Some("the connection to the controller was lost before this file".into());
        }
        if stop.is_none() && cancel.load(Ordering::Relaxed) {
            stop = Some("the task was cancelled or timed out before this file".into());
        }
        if let Some(why) = &stop {
            let now = SystemTime::now();
            report(PlacedFile {
                index,
                ending: PlaceEnding::Skipped,
                bytes: 0,
                started: now,
                finished: now,
                message: why.clone(),
            });
            continue;
        }
        let file_started = SystemTime::now();
        let target_dir = file.dir.as_ref().unwrap_or(&placement.target_dir);
        let dir = dirs.entry(target_dir.clone()).or_insert_with(|| {
            if valid_target_dir(&target_dir.to_string_lossy()) {
                open_target(target_dir)
            } else {
                Err((
                    PlaceEnding::BadPath,
                    format!(
                        "{} is not an absolute path without . or ..",
                        target_dir.display()
                    ),
                ))
            }
        });
        let (ending, bytes, message) = match dir {
            Err((ending, message)) => (*ending, 0, message.clone()),
            Ok(dir) => match place_one(
                dir.as_fd(),
                target_dir,
                placement,
                index,
                file,
                pull,
                cancel,
            ) {
                Ok(bytes) => (
                    PlaceEnding::Placed,
                    bytes,
                    format!(
                        "written to {} ({bytes} bytes, SHA-256 verified, mode {:o})",
                        target_dir.join(&file.name).display(),
                        file.mode & 0o777
                    ),
                ),
                Err((ending, message)) => (ending, 0, message),
            },
        };
        if placement.strict && ending != PlaceEnding::Placed {
            stop = Some(format!(
                "not written: {:?} failed before it in strict mode",
                file.name
            ));
        }
        report(PlacedFile {
            index,
            ending,
            bytes,
            started: file_started.max(started),
            finished: SystemTime::now(),
            message,
        });
    }
}

type Failure = (PlaceEnding, String);

fn errno_failure(what: &str, errno: Errno) -> Failure {
    let ending = match errno {
        Errno::EACCES | Errno::EPERM | Errno::EROFS => PlaceEnding::Denied,
        Errno::ENOSPC | Errno::EDQUOT => PlaceEnding::NoSpace,
        Errno::ELOOP | Errno::ENOTDIR | Errno::EISDIR => PlaceEnding::BadPath,
        _ => PlaceEnding::Failed,
    };
    let why = match ending {
        PlaceEnding::Denied => "permission denied for the account".to_owned(),
        PlaceEnding::NoSpace => "no space left on the file system".to_owned(),
        _ => errno.desc().to_owned(),
    };
    (ending, format!("{what}: {why}"))
}

fn is_dir(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
}

/// Removes the partial files a cut placement kept under its [`Placement::resume_tag`], as the
/// account: for each pulled file, its partial name, if it holds a plain file with one name that
/// the account owns, reached from `/` without following a link and without creating anything.
/// Anything else under the name is left alone. Returns how many were removed; a placement
/// without a resume tag kept none.
pub fn remove_partials(placement: Placement) -> Result<usize, PlaceError> {
    let Some(tag) = placement.resume_tag.clone() else {
        return Ok(0);
    };
    let removed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = removed.clone();
    let account = placement.account.clone();
    let refuse_root = placement.refuse_root.clone();
    as_account(&account, refuse_root.as_deref(), move || {
        for file in &placement.files {
            if !matches!(file.content, Content::Pulled { .. }) || !valid_relative_name(&file.name) {
                continue;
            }
            let target_dir = file.dir.as_ref().unwrap_or(&placement.target_dir);
            if !valid_target_dir(&target_dir.to_string_lossy()) {
                continue;
            }
            let dir = match file.name.rsplit_once('/') {
                Some((parents, _)) => target_dir.join(parents),
                None => target_dir.clone(),
            };
            let Some(dir) = open_existing_dir(&dir) else {
                continue;
            };
            let name = partial_name(&tag, file);
            if open_partial(dir.as_fd(), &name).is_some()
                && unlinkat(dir.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir).is_ok()
            {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    })?;
    Ok(removed.load(Ordering::Relaxed))
}

/// Opens an existing directory from `/`, never following a link; `None` if any part of the
/// path is missing, a link or not a directory.
fn open_existing_dir(dir: &Path) -> Option<OwnedFd> {
    let path_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current = openat(nix::fcntl::AT_FDCWD, "/", path_flags, Mode::empty()).ok()?;
    for component in dir.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        let next = openat(current.as_fd(), name, path_flags, Mode::empty()).ok()?;
        if !is_dir(&fstat(next.as_fd()).ok()?) {
            return None;
        }
        current = next;
    }
    Some(current)
}

/// Opens the target directory from `/`, never following a link, creating what is missing.
fn open_target(dir: &Path) -> Result<OwnedFd, Failure> {
    let path_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current = openat(nix::fcntl::AT_FDCWD, "/", path_flags, Mode::empty())
        .map_err(|e| errno_failure("cannot open /", e))?;
    let mut walked = PathBuf::from("/");
    for component in dir.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        walked.push(name);
        let next = match openat(current.as_fd(), name, path_flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => create_dir(current.as_fd(), name, &walked)?,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err((
                    PlaceEnding::BadPath,
                    format!(
                        "{} is a symbolic link or not a directory; the target path must name real directories",
                        walked.display()
                    ),
                ));
            }
            Err(e) => {
                return Err(errno_failure(
                    &format!("cannot open {}", walked.display()),
                    e,
                ));
            }
        };
        // O_PATH with O_NOFOLLOW opens a link itself; only a real directory goes on.
        let stat = fstat(next.as_fd())
            .map_err(|e| errno_failure(&format!("cannot inspect {}", walked.display()), e))?;
        if !is_dir(&stat) {
            return Err((
                PlaceEnding::BadPath,
                format!(
                    "{} is a symbolic link or not a directory; the target path must name real directories",
                    walked.display()
                ),
            ));
        }
        current = next;
    }
    Ok(current)
}

fn create_dir(parent: BorrowedFd<'_>, name: &OsStr, walked: &Path) -> Result<OwnedFd, Failure> {
    let created = match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) => true,
        // Made meanwhile by someone else: theirs, its mode stays as it is.
        Err(Errno::EEXIST) => false,
        Err(e) => {
            return Err(errno_failure(
                &format!("cannot create the directory {}", walked.display()),
                e,
            ));
        }
    };
    let dir = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_failure(&format!("cannot open {}", walked.display()), e))?;
    // The agent's umask is no business of the account's directory.
    if created {
        let _ = fchmod(dir.as_fd(), Mode::from_bits_truncate(0o755));
    }
    Ok(dir)
}

fn place_one(
    top: BorrowedFd<'_>,
    target_dir: &Path,
    placement: &Placement,
    index: usize,
    file: &FileToPlace,
    pull: &mut Option<Box<dyn Pull>>,
    cancel: &AtomicBool,
) -> Result<u64, Failure> {
    let pulled = matches!(file.content, Content::Pulled { .. });
    let valid = if pulled {
        valid_relative_name(&file.name)
    } else {
        valid_file_name(&file.name)
    };
    if !valid {
        return Err((
            PlaceEnding::BadPath,
            format!("{:?} is not a plain file name", file.name),
        ));
    }
    // A name with directories: they are walked (and made) below the target as the target was.
    let (parents, leaf) = match file.name.rsplit_once('/') {
        Some((parents, leaf)) => (Some(parents), leaf),
        None => (None, file.name.as_str()),
    };
    let sub = match parents {
        None => None,
        Some(parents) => Some(open_below(top, target_dir, parents)?),
    };
    let dir = sub.as_ref().map_or(top, |fd| fd.as_fd());
    let create = |name: &str| {
        openat(
            dir,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
    };
    let create_failure = |e| {
        errno_failure(
            &format!("cannot create a file in {}", target_dir.display()),
            e,
        )
    };
    let fresh = format!(".fleetrun-{}-{index}.tmp", placement.task_tag);
    // (temporary name, descriptor, whether it is kept after a cut, whether it holds an earlier try)
    let (temp, fd, resumable, resumed) = match &placement.resume_tag {
        Some(tag) if pulled => {
            let name = partial_name(tag, file);
            match open_partial(dir, &name) {
                Some(fd) => (name, fd, true, true),
                None => match create(&name) {
                    Ok(fd) => (name, fd, true, false),
                    // Something this placement may not continue holds the name: the file is
                    // written under a fresh one, and not resumed.
                    Err(Errno::EEXIST) => {
                        let fd = create(&fresh).map_err(create_failure)?;
                        (fresh, fd, false, false)
                    }
                    Err(e) => return Err(create_failure(e)),
                },
            }
        }
        _ => {
            let fd = create(&fresh).map_err(create_failure)?;
            (fresh, fd, false, false)
        }
    };
    let result = fill_and_check(
        File::from(fd),
        index,
        file,
        pull,
        cancel,
        target_dir,
        resumed,
    );
    let result = result.and_then(|bytes| {
        renameat(dir, temp.as_str(), dir, OsStr::from_bytes(leaf.as_bytes()))
            .map(|()| bytes)
            .map_err(|e| {
                let target = target_dir.join(&file.name);
                if e == Errno::EISDIR || e == Errno::ENOTEMPTY || e == Errno::EEXIST {
                    (
                        PlaceEnding::BadPath,
                        format!("{} is a directory", target.display()),
                    )
                } else {
                    errno_failure(&format!("cannot rename into {}", target.display()), e)
                }
            })
    });
    let keep = resumable && pull.as_ref().is_some_and(|p| p.interrupted());
    if result.is_err() && !keep {
        let _ = unlinkat(dir, temp.as_str(), UnlinkatFlags::NoRemoveDir);
    } else if result.is_ok() {
        sync_dir(dir);
    }
    result
}

/// Opens (creating what is missing) the directories `parents` below `top`, never following a link.
fn open_below(top: BorrowedFd<'_>, target_dir: &Path, parents: &str) -> Result<OwnedFd, Failure> {
    let path_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current = openat(top, ".", path_flags, Mode::empty())
        .map_err(|e| errno_failure(&format!("cannot open {}", target_dir.display()), e))?;
    let mut walked = target_dir.to_path_buf();
    for name in parents.split('/') {
        walked.push(name);
        let next = match openat(current.as_fd(), name, path_flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => create_dir(current.as_fd(), OsStr::new(name), &walked)?,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err((
                    PlaceEnding::BadPath,
                    format!("{} is a symbolic link or not a directory", walked.display()),
                ));
            }
            Err(e) => {
                return Err(errno_failure(
                    &format!("cannot open {}", walked.display()),
                    e,
                ));
            }
        };
        let stat = fstat(next.as_fd())
            .map_err(|e| errno_failure(&format!("cannot inspect {}", walked.display()), e))?;
        if !is_dir(&stat) {
            return Err((
                PlaceEnding::BadPath,
                format!("{} is a symbolic link or not a directory", walked.display()),
            ));
        }
        current = next;
    }
    Ok(current)
}

/// Makes the rename durable: the directory's entry is synced, not only the file. The descriptor
/// the walk holds may be `O_PATH`, which cannot be synced, so the directory is opened again. A
/// failure is not reported: the file is already in place under its name.
fn sync_dir(dir: BorrowedFd<'_>) {
    if let Ok(fd) = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        let _ = nix::unistd::fsync(fd);
    }
}

const CHUNK: usize = fleetrun_proto::FILE_CHUNK;

/// The name a resumable pulled file is written to: the same for every try of one placement's
/// file (its name and content), distinct for another.
pub fn partial_name(tag: &str, file: &FileToPlace) -> String {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    hasher.update(file.name.as_bytes());
    hasher.update(&[0]);
    hasher.update(&file.sha256);
    let digest = hasher.finish();
    let hex = hex::encode(&digest.as_ref()[..8]);
    format!(".fleetrun-{tag}-{hex}.part")
}

/// Opens a partial file an earlier try left, if it is one this placement may continue: a plain
/// file (never through a link), with no other name (a hard link to another file would make it
/// written through), owned by the account the thread writes as (the files it creates are; an
/// agent placing as itself keeps its capabilities, and `CAP_FOWNER` would let `fchmod` pass on
/// anyone's file), and whose mode it may set. Anything else there is left alone and the file
/// is not resumed.
fn open_partial(dir: BorrowedFd<'_>, name: &str) -> Option<OwnedFd> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let stat = fstat(fd.as_fd()).ok()?;
    let regular = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
    if !regular || stat.st_nlink != 1 || stat.st_uid != sys::fs_uid() {
        return None;
    }
    fchmod(fd.as_fd(), Mode::from_bits_truncate(0o600)).ok()?;
    // Back to blocking writes.
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).ok()?;
    Some(fd)
}

/// How many whole chunks at the start of `out` hash to the file's chunks: read and checked
/// here, not trusted from whoever wrote them. The file is cut back to them.
fn verified_prefix(out: &File, index: usize, file_len: u64, pull: &dyn Pull) -> io::Result<usize> {
    let mut buffer = vec![0u8; CHUNK];
    let mut good = 0usize;
    loop {
        let offset = (good as u64) * CHUNK as u64;
        if offset >= file_len {
            break;
        }
        let Some(expected) = pull.chunk_hash(index, good) else {
            break;
        };
        let want = usize::try_from((file_len - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut filled = 0usize;
        while filled < want {
            let n = out.read_at(&mut buffer[filled..want], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled < want || crate::collect::sha256(&buffer[..want]) != expected {
            break;
        }
        good += 1;
    }
    let kept = ((good as u64) * CHUNK as u64).min(file_len);
    out.set_len(kept)?;
    Ok(good)
}

fn fill_and_check(
    mut out: File,
    index: usize,
    file: &FileToPlace,
    pull: &mut Option<Box<dyn Pull>>,
    cancel: &AtomicBool,
    dir: &Path,
    resumed: bool,
) -> Result<u64, Failure> {
    let io_failure = |what: &str, e: io::Error| match e.raw_os_error() {
        Some(errno) => errno_failure(what, Errno::from_raw(errno)),
        None => (PlaceEnding::Failed, format!("{what}: {e}")),
    };
    let what = format!("cannot write {}", dir.join(&file.name).display());
    let cancelled = || {
        (
            PlaceEnding::Skipped,
            "the task was cancelled or timed out while the file was written".to_owned(),
        )
    };
    match &file.content {
        Content::Inline(content) => {
            for chunk in content.chunks(CHUNK) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                out.write_all(chunk).map_err(|e| io_failure(&what, e))?;
            }
        }
        Content::Pulled { size } => {
            let Some(pull) = pull else {
                return Err((PlaceEnding::Failed, "nothing to pull the file from".into()));
            };
            let pull_failure =
                |e: String| (PlaceEnding::Failed, format!("cannot receive the file: {e}"));
            let from = if resumed {
                verified_prefix(&out, index, *size, pull.as_ref())
                    .map_err(|e| io_failure(&what, e))?
            } else {
                0
            };
            let mut written = ((from as u64) * CHUNK as u64).min(*size);
            out.seek(io::SeekFrom::Start(written))
                .map_err(|e| io_failure(&what, e))?;
            pull.want(index, from).map_err(pull_failure)?;
            while let Some(chunk) = pull.next_chunk().map_err(pull_failure)? {
                if cancel.load(Ordering::Relaxed) {
                    return Err(cancelled());
                }
                written = written.saturating_add(chunk.len() as u64);
                if written > *size {
                    return Err((
                        PlaceEnding::HashMismatch,
                        format!("more than the file's {size} bytes arrived"),
                    ));
                }
                out.write_all(&chunk).map_err(|e| io_failure(&what, e))?;
            }
        }
    }
    out.sync_all().map_err(|e| io_failure(&what, e))?;
    // Read back what the file system holds, and hash that.
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let n = out
            .read_at(&mut buffer, offset)
            .map_err(|e| io_failure(&what, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        offset += n as u64;
    }
    if offset != file.content.len() || hasher.finish().as_ref() != file.sha256 {
        return Err((
            PlaceEnding::HashMismatch,
            format!(
                "{} does not hash to the expected SHA-256 after writing",
                dir.join(&file.name).display()
            ),
        ));
    }
    fchmod(out.as_fd(), Mode::from_bits_truncate(file.mode & 0o777))
        .map_err(|e| errno_failure(&what, e))?;
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_another_account_owns_is_not_continued_by_a_writer_with_capabilities() {
        // This thread keeps root's capabilities, as an agent writing as itself does: with
        // `CAP_FOWNER` the mode of anyone's file may be set, so only ownership refuses it.
        assert!(nix::unistd::geteuid().is_root(), "the tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let top = File::open(dir.path()).unwrap();
        let name = ".fleetrun-7-9-0000000000000000.part";
        let planted = dir.path().join(name);
        std::fs::write(&planted, b"someone else's").unwrap();
        std::os::unix::fs::chown(&planted, Some(65_534), None).unwrap();
        assert!(open_partial(top.as_fd(), name).is_none());
        std::os::unix::fs::chown(&planted, Some(sys::fs_uid()), None).unwrap();
        assert!(
            open_partial(top.as_fd(), name).is_some(),
            "the writer's own partial"
        );
    }

    #[test]
    fn names_are_single_components() {
        for good in ["a.txt", ".hidden", "x..y", "名"] {
            assert!(valid_file_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "/etc/passwd",
            "a\0b",
            "a\nb",
            "a\rb",
            "\x1b[2J",
            "a\x7f",
        ] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
        assert!(!valid_file_name(&"x".repeat(256)));
    }

    #[test]
    fn target_dirs_are_absolute_and_plain() {
        for good in ["/", "/tmp", "/tmp/a/", "/data//x"] {
            assert!(valid_target_dir(good), "{good}");
        }
        for bad in [
            "tmp",
            "",
            "/tmp/../etc",
            "/tmp/./a",
            "/a/..",
            "./x",
            "/a\0",
            "/a\nb",
            "/a\x7f",
        ] {
            assert!(!valid_target_dir(bad), "{bad:?}");
        }
    }
}
