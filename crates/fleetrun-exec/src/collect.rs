//! Reads files on a source host as an OS account: the source half of a file transfer.
//!
//! The paths are bk-job's: an absolute file; a directory ending in `/`, sent whole; a last
//! component with `*` and `?` wildcards; a last component `REGEX:<pattern>` matched against the
//! names in its directory. The work runs on a thread that acts as the account towards the file
//! systems (as [`crate::place`] does), so the kernel checks the account's right to read. Every
//! path is walked from `/` one component at a time with `O_NOFOLLOW`, directories sent whole
//! are walked through descriptors too, and a file is opened with `O_NOFOLLOW | O_NONBLOCK` and
//! must be a regular file: a symbolic link anywhere is reported and never followed, so nothing
//! outside what was asked is read. Each file is read in [`CHUNK`]-byte chunks, each hashed, the
//! whole hashed too; its size and change time are compared before and after, so a file
//! changing while it is read is reported [`CollectEnding::Changed`] rather than sent torn.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};

pub use fleetrun_proto::source_path::{
    NamePattern, SourcePath, SourcePathError, parse_source_path, wildcard_matches,
};

use crate::place::{MAX_DEPTH, PlaceError, as_account};

/// Bytes in one chunk (the last of a file may be shorter).
pub const CHUNK: usize = fleetrun_proto::FILE_CHUNK;
/// Most files one path may give (a directory or a pattern).
pub const MAX_FILES_PER_PATH: usize = 10_000;

/// Files to read, as an account.
#[derive(Debug, Clone)]
pub struct Collection {
    pub account: String,
    pub paths: Vec<String>,
    /// As [`crate::ExecConfig::refuse_root`].
    pub refuse_root: Option<String>,
}

/// The SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    hash
}

/// What the reading thread reports, in order.
#[derive(Debug)]
pub enum Collected {
    /// A file found; its chunks follow, then its [`Collected::End`].
    File(FoundFile),
    /// The next chunk of the file last found.
    Chunk { sha256: [u8; 32], data: Vec<u8> },
    /// A file ended, or a path that gave no file.
    End(CollectEnd),
}

#[derive(Debug, Clone)]
pub struct FoundFile {
    pub index: usize,
    pub path_index: usize,
    pub path: PathBuf,
    /// Its place below the target: its name, or `dir/inner/path` for a directory sent whole.
    pub relative: String,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone)]
pub struct CollectEnd {
    pub index: Option<usize>,
    pub path_index: usize,
    pub ending: CollectEnding,
    pub sha256: [u8; 32],
    pub bytes: u64,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectEnding {
    Read,
    NotFound,
    Denied,
    BadPath,
    Changed,
    Skipped,
    Failed,
}

/// Reads `collection`'s files, handing each event to `emit`, which returns false when nobody
/// listens any more (then reading stops). Blocks: call it from a blocking thread. `emit` may
/// block (a bounded channel), which is what bounds the memory a transfer takes here.
pub fn collect(
    collection: Collection,
    cancel: Arc<AtomicBool>,
    emit: impl FnMut(Collected) -> bool + Send + 'static,
) -> Result<(), PlaceError> {
    let account = collection.account.clone();
    let refuse_root = collection.refuse_root.clone();
    as_account(&account, refuse_root.as_deref(), move || {
        let mut reader = Reader {
            emit,
            cancel,
            next_index: 0,
            stopped: false,
        };
        for (path_index, path) in collection.paths.iter().enumerate() {
            if reader.stopped {
                break;
            }
            reader.path(path_index, path);
        }
    })
}

type Failure = (CollectEnding, String);

fn errno_failure(what: &str, errno: Errno) -> Failure {
    let ending = match errno {
        Errno::ENOENT => CollectEnding::NotFound,
        Errno::EACCES | Errno::EPERM => CollectEnding::Denied,
        Errno::ELOOP | Errno::ENOTDIR => CollectEnding::BadPath,
        _ => CollectEnding::Failed,
    };
    let why = match ending {
        CollectEnding::NotFound => "no such file or directory".to_owned(),
        CollectEnding::Denied => "permission denied for the account".to_owned(),
        CollectEnding::BadPath => "a symbolic link or not a directory in the way".to_owned(),
        _ => errno.desc().to_owned(),
    };
    (ending, format!("{what}: {why}"))
}

fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

const PATH_FLAGS: OFlag = OFlag::O_PATH
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens `dir` from `/`, never following a link.
fn open_dir(dir: &Path) -> Result<OwnedFd, Failure> {
    let mut current = openat(nix::fcntl::AT_FDCWD, "/", PATH_FLAGS, Mode::empty())
        .map_err(|e| errno_failure("cannot open /", e))?;
    let mut walked = PathBuf::from("/");
    for component in dir.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        walked.push(name);
        current = openat(current.as_fd(), name, PATH_FLAGS, Mode::empty())
            .map_err(|e| errno_failure(&format!("cannot open {}", walked.display()), e))?;
    }
    Ok(current)
}

/// The names in a directory, sorted, without `.` and `..`.
fn names(dir: BorrowedFd<'_>, shown: &Path) -> Result<Vec<Vec<u8>>, Failure> {
    let mut listing = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_failure(&format!("cannot list {}", shown.display()), e))?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry =
            entry.map_err(|e| errno_failure(&format!("cannot list {}", shown.display()), e))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

struct Reader<E> {
    emit: E,
    cancel: Arc<AtomicBool>,
    next_index: usize,
    stopped: bool,
}

impl<E: FnMut(Collected) -> bool> Reader<E> {
    fn send(&mut self, event: Collected) {
        if !self.stopped && !(self.emit)(event) {
            self.stopped = true;
        }
    }

    fn cancelled(&self) -> bool {
        self.stopped || self.cancel.load(Ordering::Relaxed)
    }

    /// A path that gave no file.
    fn path_failed(&mut self, path_index: usize, (ending, message): Failure) {
        let now = SystemTime::now();
        self.send(Collected::End(CollectEnd {
            index: None,
            path_index,
            ending,
            sha256: [0; 32],
            bytes: 0,
            started: now,
            finished: now,
            message,
        }));
    }

    fn path(&mut self, path_index: usize, path: &str) {
        let parsed = match parse_source_path(path) {
            Ok(parsed) => parsed,
            Err(e) => return self.path_failed(path_index, (CollectEnding::BadPath, e.to_string())),
        };
        match parsed {
            SourcePath::File { dir, name } => {
                let fd = match open_dir(&dir) {
                    Ok(fd) => fd,
                    Err(f) => return self.path_failed(path_index, f),
                };
                let shown = dir.join(&name);
                if let Some(failure) =
                    self.file(fd.as_fd(), path_index, &shown, name.as_bytes(), &name)
                {
                    self.path_failed(path_index, failure);
                }
            }
            SourcePath::Dir { parent, name } => {
                let top = open_dir(&parent).and_then(|parent_fd| {
                    openat(parent_fd.as_fd(), name.as_str(), PATH_FLAGS, Mode::empty()).map_err(
                        |e| {
                            errno_failure(
                                &format!("cannot open {}", parent.join(&name).display()),
                                e,
                            )
                        },
                    )
                });
                match top {
                    Ok(fd) => self.tree(path_index, fd, parent.join(&name), name),
                    Err(f) => self.path_failed(path_index, f),
                }
            }
            SourcePath::Matching { dir, pattern } => {
                let fd = match open_dir(&dir) {
                    Ok(fd) => fd,
                    Err(f) => return self.path_failed(path_index, f),
                };
                let listed = match names(fd.as_fd(), &dir) {
                    Ok(names) => names,
                    Err(f) => return self.path_failed(path_index, f),
                };
                let mut found = 0usize;
                for name in listed {
                    let Ok(text) = std::str::from_utf8(&name) else {
                        continue;
                    };
                    if !pattern.matches(text) {
                        continue;
                    }
                    // Only regular files match; directories are sent whole only when named.
                    match fstatat(fd.as_fd(), name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                        Ok(stat) if kind(&stat) == SFlag::S_IFREG => {}
                        _ => continue,
                    }
                    if self.cancelled() {
                        break;
                    }
                    if found == MAX_FILES_PER_PATH {
                        return self.too_many(path_index, path);
                    }
                    found += 1;
                    let shown = dir.join(text);
                    if let Some(failure) = self.file(fd.as_fd(), path_index, &shown, &name, text) {
                        self.file_failed(path_index, &shown, text, failure);
                    }
                }
                if found == 0 {
                    self.path_failed(
                        path_index,
                        (CollectEnding::NotFound, format!("no file matches {path}")),
                    );
                }
            }
        }
    }

    /// A path that gives more than [`MAX_FILES_PER_PATH`] files: the rest are not read, and the
    /// path fails rather than seeming whole.
    fn too_many(&mut self, path_index: usize, path: &str) {
        self.path_failed(
            path_index,
            (
                CollectEnding::Skipped,
                format!(
                    "{path} gives more than {MAX_FILES_PER_PATH} files; the rest were not read"
                ),
            ),
        );
    }

    /// A file that failed after it was listed: reported as a file of its own.
    fn file_failed(&mut self, path_index: usize, shown: &Path, relative: &str, failure: Failure) {
        let index = self.next_index;
        self.next_index += 1;
        self.send(Collected::File(FoundFile {
            index,
            path_index,
            path: shown.to_path_buf(),
            relative: relative.to_owned(),
            size: 0,
            mode: 0,
        }));
        let now = SystemTime::now();
        self.send(Collected::End(CollectEnd {
            index: Some(index),
            path_index,
            ending: failure.0,
            sha256: [0; 32],
            bytes: 0,
            started: now,
            finished: now,
            message: failure.1,
        }));
    }

    /// A directory sent whole, walked breadth first through descriptors.
    fn tree(&mut self, path_index: usize, top: OwnedFd, shown: PathBuf, name: String) {
        let is_directory = fstat(top.as_fd()).map(|s| kind(&s) == SFlag::S_IFDIR);
        if !matches!(is_directory, Ok(true)) {
            return self.path_failed(
                path_index,
                (
                    CollectEnding::BadPath,
                    format!("{} is not a directory", shown.display()),
                ),
            );
        }
        let shown_top = shown.display().to_string();
        let mut queue = VecDeque::from([(top, shown, name, 0usize)]);
        let mut found = 0usize;
        while let Some((fd, shown, relative, depth)) = queue.pop_front() {
            let listed = match names(fd.as_fd(), &shown) {
                Ok(names) => names,
                Err(f) => {
                    self.file_failed(path_index, &shown, &relative, f);
                    continue;
                }
            };
            for name in listed {
                if self.cancelled() {
                    return;
                }
                let text = String::from_utf8_lossy(&name).into_owned();
                let inner_shown = shown.join(OsStr::from_bytes(&name));
                let inner_relative = format!("{relative}/{text}");
                let stat = match fstatat(fd.as_fd(), name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                {
                    Ok(stat) => stat,
                    Err(e) => {
                        let f =
                            errno_failure(&format!("cannot inspect {}", inner_shown.display()), e);
                        self.file_failed(path_index, &inner_shown, &inner_relative, f);
                        continue;
                    }
                };
                match kind(&stat) {
                    SFlag::S_IFDIR if depth + 1 < MAX_DEPTH => {
                        match openat(fd.as_fd(), name.as_slice(), PATH_FLAGS, Mode::empty()) {
                            Ok(sub) => {
                                queue.push_back((sub, inner_shown, inner_relative, depth + 1))
                            }
                            Err(e) => {
                                let f = errno_failure(
                                    &format!("cannot open {}", inner_shown.display()),
                                    e,
                                );
                                self.file_failed(path_index, &inner_shown, &inner_relative, f);
                            }
                        }
                    }
                    SFlag::S_IFREG => {
                        if found == MAX_FILES_PER_PATH {
                            let path = shown_top.clone();
                            return self.too_many(path_index, &path);
                        }
                        found += 1;
                        if name.contains(&b'\n') || std::str::from_utf8(&name).is_err() {
                            let f = (
                                CollectEnding::BadPath,
                                format!(
                                    "{} has a name that is not plain UTF-8",
                                    inner_shown.display()
                                ),
                            );
                            self.file_failed(path_index, &inner_shown, &inner_relative, f);
                            continue;
                        }
                        if let Some(f) =
                            self.file(fd.as_fd(), path_index, &inner_shown, &name, &inner_relative)
                        {
                            self.file_failed(path_index, &inner_shown, &inner_relative, f);
                        }
                    }
                    other => {
                        let what = if other == SFlag::S_IFLNK {
                            "a symbolic link, not followed"
                        } else if other == SFlag::S_IFDIR {
                            "more than 64 directories deep"
                        } else {
                            "not a regular file"
                        };
                        let f = (
                            CollectEnding::BadPath,
                            format!("{} is {what}", inner_shown.display()),
                        );
                        self.file_failed(path_index, &inner_shown, &inner_relative, f);
                    }
                }
            }
        }
    }

    /// Reads one file of `dir`; a failure before it was announced is returned.
    fn file(
        &mut self,
        dir: BorrowedFd<'_>,
        path_index: usize,
        shown: &Path,
        name: &[u8],
        relative: &str,
    ) -> Option<Failure> {
        let started = SystemTime::now();
        let fd = match openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => {
                return Some((
                    CollectEnding::BadPath,
                    format!("{} is a symbolic link, not followed", shown.display()),
                ));
            }
            Err(e) => {
                return Some(errno_failure(
                    &format!("cannot open {}", shown.display()),
                    e,
                ));
            }
        };
        let before = match fstat(fd.as_fd()) {
            Ok(stat) => stat,
            Err(e) => {
                return Some(errno_failure(
                    &format!("cannot inspect {}", shown.display()),
                    e,
                ));
            }
        };
        match kind(&before) {
            SFlag::S_IFREG => {}
            SFlag::S_IFDIR => {
                return Some((
                    CollectEnding::BadPath,
                    format!(
                        "{} is a directory: end the path with / to send it whole",
                        shown.display()
                    ),
                ));
            }
            _ => {
                return Some((
                    CollectEnding::BadPath,
                    format!("{} is not a regular file", shown.display()),
                ));
            }
        }
        let index = self.next_index;
        self.next_index += 1;
        let size = u64::try_from(before.st_size).unwrap_or(0);
        self.send(Collected::File(FoundFile {
            index,
            path_index,
            path: shown.to_path_buf(),
            relative: relative.to_owned(),
            size,
            mode: before.st_mode & 0o777,
        }));
        let file = std::fs::File::from(fd);
        let (ending, sha256, bytes, message) = self.read(&file, shown, &before, size);
        self.send(Collected::End(CollectEnd {
            index: Some(index),
            path_index,
            ending,
            sha256,
            bytes,
            started,
            finished: SystemTime::now(),
            message,
        }));
        None
    }

    fn read(
        &mut self,
        file: &std::fs::File,
        shown: &Path,
        before: &FileStat,
        size: u64,
    ) -> (CollectEnding, [u8; 32], u64, String) {
        use std::os::unix::fs::FileExt as _;
        let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
        let mut offset = 0u64;
        loop {
            if self.cancelled() {
                return (
                    CollectEnding::Skipped,
                    [0; 32],
                    offset,
                    "the task was cancelled or timed out while the file was read".into(),
                );
            }
            let mut buffer = vec![0u8; CHUNK];
            let mut filled = 0;
            // Fill the chunk: a short read is not the end of a regular file.
            while filled < CHUNK {
                match file.read_at(&mut buffer[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let (ending, message) = match e.raw_os_error() {
                            Some(errno) => errno_failure(
                                &format!("cannot read {}", shown.display()),
                                Errno::from_raw(errno),
                            ),
                            None => (
                                CollectEnding::Failed,
                                format!("cannot read {}: {e}", shown.display()),
                            ),
                        };
                        return (ending, [0; 32], offset, message);
                    }
                }
            }
            if filled == 0 {
                break;
            }
            buffer.truncate(filled);
            whole.update(&buffer);
            offset += filled as u64;
            if offset > size {
                break;
            }
            self.send(Collected::Chunk {
                sha256: sha256(&buffer),
                data: buffer,
            });
            if filled < CHUNK {
                break;
            }
        }
        let after = fstat(file.as_fd());
        let unchanged = after.is_ok_and(|a| {
            a.st_size == before.st_size
                && a.st_mtime == before.st_mtime
                && a.st_mtime_nsec == before.st_mtime_nsec
                && a.st_ctime == before.st_ctime
                && a.st_ctime_nsec == before.st_ctime_nsec
        });
        if !unchanged || offset != size {
            return (
                CollectEnding::Changed,
                [0; 32],
                offset,
                format!(
                    "{} changed while it was read ({size} bytes when opened, {offset} read): not sent",
                    shown.display()
                ),
            );
        }
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(whole.finish().as_ref());
        (
            CollectEnding::Read,
            sha256,
            offset,
            format!("read {} ({offset} bytes)", shown.display()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_past_the_file_limit_fails_rather_than_seeming_whole() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        for i in 0..=MAX_FILES_PER_PATH {
            std::fs::write(tree.join(format!("f{i:05}.log")), b"").unwrap();
        }
        for path in [
            format!("{}/*.log", tree.display()),
            format!("{}/", tree.display()),
        ] {
            let (mut files, mut path_failures) = (0usize, Vec::new());
            let mut reader = Reader {
                emit: |event: Collected| {
                    match event {
                        Collected::File(_) => files += 1,
                        Collected::End(end) if end.index.is_none() => path_failures.push(end),
                        _ => {}
                    }
                    true
                },
                cancel: Arc::default(),
                next_index: 0,
                stopped: false,
            };
            reader.path(0, &path);
            assert_eq!(files, MAX_FILES_PER_PATH, "{path}");
            assert_eq!(path_failures.len(), 1, "{path}");
            assert!(
                path_failures[0].message.contains("more than"),
                "{path}: {}",
                path_failures[0].message
            );
        }
    }
}
