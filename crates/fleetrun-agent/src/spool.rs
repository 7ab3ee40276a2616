//! The agent's spool: each task's output and result on disk under `work_dir/spool`, so that a
//! task outlives its connection (the output waits there for the controller to come back) and the
//! agent's own restart (the next start finds what the task left and reports it).
//!
//! A task's directory `spool/<task id>/` holds `output` (the bytes at the offsets the controller
//! sees: the executor already bounds them to the output limit's head and tail) and `meta` (who
//! the task is, where the output was cut or lost, and the result once there is one). Everything
//! is 0700/0600 and owned by the agent's account, made below a `work_dir` the executor checked.
//! A write that fails (disk full) loses that piece of output, never the task: the loss is kept
//! as a [`Mark::Lost`] and reported like a truncation. Nothing here follows a symbolic link:
//! files are opened with `O_NOFOLLOW`, an entry of the spool that is not a plain directory is
//! not loaded, and removal goes through the executor's descriptor-relative
//! [`fleetrun_exec::remove_without_following`].

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use fleetrun_proto::TaskResult;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A point in a task's output where something other than output happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mark {
    /// The executor cut the middle of the output here (the output limit).
    Truncated {
        offset: u64,
        dropped_bytes: u64,
        dropped_lines: u64,
    },
    /// These bytes could not be spooled (disk full) and are gone.
    Lost { offset: u64, bytes: u64 },
}

impl Mark {
    pub(crate) fn offset(&self) -> u64 {
        match self {
            Mark::Truncated { offset, .. } | Mark::Lost { offset, .. } => *offset,
        }
    }
}

/// What the agent knows of a task besides its output bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub task_id: Uuid,
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub bk_host_id: i64,
    pub execute_count: u32,
    pub started_at_ms: Option<i64>,
    /// Bytes of output so far, spooled or lost (the next offset).
    pub produced: u64,
    /// In offset order.
    pub marks: Vec<Mark>,
    pub acked_offset: u64,
    pub result: Option<TaskResult>,
    /// The controller (`host:port` as configured) the task came from: the agent goes back to
    /// it while it holds the task, as another controller may not know the task and discard it.
    #[serde(default)]
    pub controller: Option<String>,
    /// Until when that controller waits for the task (received + timeout + its usual grace);
    /// past it the task no longer keeps the agent on that controller.
    #[serde(default)]
    pub hold_until_ms: Option<i64>,
}

impl Meta {
    /// Records `bytes` lost at `offset`, joined to a loss just before it.
    pub(crate) fn lose(&mut self, offset: u64, bytes: u64) {
        if let Some(Mark::Lost {
            offset: last,
            bytes: lost,
        }) = self.marks.last_mut()
            && *last + *lost == offset
        {
            *lost += bytes;
            return;
        }
        self.marks.push(Mark::Lost { offset, bytes });
    }

    /// Bytes of output kept for the controller beyond what it acknowledged: produced, not
    /// acknowledged, not lost.
    pub(crate) fn unacknowledged(&self) -> u64 {
        let lost: u64 = self
            .marks
            .iter()
            .map(|m| match m {
                Mark::Lost { offset, bytes } if *offset >= self.acked_offset => *bytes,
                _ => 0,
            })
            .sum();
        self.produced
            .saturating_sub(self.acked_offset)
            .saturating_sub(lost)
    }

    /// Bytes of output lost to the spool.
    pub(crate) fn lost_bytes(&self) -> u64 {
        self.marks
            .iter()
            .map(|m| match m {
                Mark::Lost { bytes, .. } => *bytes,
                Mark::Truncated { .. } => 0,
            })
            .sum()
    }
}

/// The spool directory, `work_dir/spool`.
#[derive(Debug)]
pub(crate) struct Spool {
    root: PathBuf,
}

/// One task's files.
#[derive(Debug)]
pub(crate) struct TaskSpool {
    /// The spool directory, and the task's directory in it.
    root: PathBuf,
    name: String,
    output: File,
    /// Whether the task's directory was removed; held by every save of the meta and by the
    /// removal, so that a save never runs beside the removal (its file would keep the
    /// directory) nor after it (it would find no directory).
    removed: std::sync::Mutex<bool>,
}

const OUTPUT: &str = "output";
const META: &str = "meta";

/// Makes `path` a directory of this account at 0700, refusing anything else in its place.
fn private_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(path)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            path.display()
        )));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "{} is owned by uid {}, not by the agent",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Spool {
    /// Opens (creating) `work_dir/spool`. `work_dir` itself was checked by the executor.
    pub(crate) fn open(work_dir: &Path) -> io::Result<Self> {
        let root = work_dir.join("spool");
        private_dir(&root)?;
        Ok(Self { root })
    }

    /// The spool of a new task, with its first meta written.
    pub(crate) fn create(&self, meta: &Meta) -> io::Result<TaskSpool> {
        let name = meta.task_id.to_string();
        let dir = self.root.join(&name);
        private_dir(&dir)?;
        let output = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dir.join(OUTPUT))?;
        let spool = TaskSpool {
            root: self.root.clone(),
            name,
            output,
            removed: Default::default(),
        };
        spool.save(meta)?;
        Ok(spool)
    }

    /// Every task a previous run of the agent left, with its spool; directories that cannot be
    /// read are logged and removed.
    pub(crate) fn load_all(&self) -> Vec<(Meta, TaskSpool)> {
        let mut found = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!("cannot read the spool {}: {e}", self.root.display());
                return found;
            }
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name();
            // `file_type` does not follow a link: only a real directory is read.
            let loaded = match entry.file_type() {
                Ok(kind) if kind.is_dir() => load(&self.root, &name),
                Ok(_) => Err(io::Error::other("not a directory")),
                Err(e) => Err(e),
            };
            match loaded {
                Ok(task) => found.push(task),
                Err(e) => {
                    tracing::warn!("dropping unreadable spool {}: {e}", dir.display());
                    if let Err(e) = fleetrun_exec::remove_without_following(&self.root, &name) {
                        tracing::warn!("cannot remove {}: {e}", dir.display());
                    }
                }
            }
        }
        found
    }
}

impl Spool {
    /// Bytes of the regular files one level down in the task directories (output and state),
    /// for the metrics; links and anything else are not followed or counted.
    pub(crate) fn bytes(&self) -> u64 {
        let Ok(tasks) = fs::read_dir(&self.root) else {
            return 0;
        };
        tasks
            .flatten()
            .filter(|task| task.file_type().is_ok_and(|kind| kind.is_dir()))
            .filter_map(|task| fs::read_dir(task.path()).ok())
            .flat_map(|files| files.flatten())
            .filter_map(|file| file.metadata().ok())
            .filter(|meta| meta.file_type().is_file())
            .map(|meta| meta.len())
            .sum()
    }
}

fn load(root: &Path, name: &std::ffi::OsStr) -> io::Result<(Meta, TaskSpool)> {
    let dir = root.join(name);
    let mut text = Vec::new();
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(META))?
        .read_to_end(&mut text)?;
    let meta: Meta = serde_json::from_slice(&text).map_err(io::Error::other)?;
    let name = meta.task_id.to_string();
    if dir.file_name().and_then(|n| n.to_str()) != Some(name.as_str()) {
        return Err(io::Error::other("meta names another task"));
    }
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(OUTPUT))?;
    Ok((
        meta,
        TaskSpool {
            root: root.to_owned(),
            name,
            output,
            removed: Default::default(),
        },
    ))
}

impl TaskSpool {
    /// Writes output at its offset.
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.output.write_all_at(data, offset)
    }

    /// Reads output from `offset` into `buf`; the bytes read (fewer at the end of what is spooled).
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self
                .output
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// Drops the output from `offset` on.
    pub(crate) fn truncate(&self, offset: u64) -> io::Result<()> {
        let len = self.spooled();
        if offset < len {
            self.output.set_len(offset)?;
        }
        Ok(())
    }

    /// Bytes in the output file.
    pub(crate) fn spooled(&self) -> u64 {
        self.output.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }

    /// Replaces the meta file whole (written aside, then renamed over it); nothing once the
    /// task's directory is removed.
    pub(crate) fn save(&self, meta: &Meta) -> io::Result<()> {
        let text = serde_json::to_vec(meta).map_err(io::Error::other)?;
        let removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        if *removed {
            return Ok(());
        }
        let dir = self.dir();
        let aside = dir.join("meta.new");
        let _ = fs::remove_file(&aside);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&aside)?;
        file.write_all(&text)?;
        file.sync_data()?;
        fs::rename(&aside, dir.join(META))
    }

    /// Forgets the task on disk, once a save under way is done; no save writes after it.
    pub(crate) fn remove(&self) {
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        *removed = true;
        if let Err(e) =
            fleetrun_exec::remove_without_following(&self.root, std::ffi::OsStr::new(&self.name))
        {
            tracing::warn!("cannot remove the spool {}: {e}", self.dir().display());
        }
    }

    #[cfg(test)]
    pub(crate) fn with_output(dir: PathBuf, output: File) -> Self {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let root = dir.parent().map(Path::to_owned).unwrap_or_default();
        Self {
            root,
            name,
            output,
            removed: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(task_id: Uuid) -> Meta {
        Meta {
            task_id,
            job_instance_id: 1,
            step_instance_id: 2,
            bk_host_id: 3,
            execute_count: 0,
            started_at_ms: Some(5),
            produced: 0,
            marks: Vec::new(),
            acked_offset: 0,
            result: None,
            controller: None,
            hold_until_ms: None,
        }
    }

    #[test]
    fn a_task_is_found_again_as_it_was_left() {
        let work = tempfile::tempdir().unwrap();
        let spool = Spool::open(work.path()).unwrap();
        let root = fs::metadata(work.path().join("spool")).unwrap();
        assert_eq!(root.mode() & 0o777, 0o700);
        let mut m = meta(Uuid::new_v4());
        let task = spool.create(&m).unwrap();
        task.write_at(0, b"hello ").unwrap();
        task.write_at(6, b"world").unwrap();
        m.produced = 11;
        m.marks.push(Mark::Truncated {
            offset: 6,
            dropped_bytes: 100,
            dropped_lines: 3,
        });
        task.save(&m).unwrap();
        let file = fs::metadata(work.path().join(format!("spool/{}/output", m.task_id))).unwrap();
        assert_eq!(file.mode() & 0o777, 0o600);

        let found = spool.load_all();
        assert_eq!(found.len(), 1);
        let (loaded, again) = &found[0];
        assert_eq!(loaded, &m);
        let mut buf = [0u8; 32];
        let n = again.read_at(3, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"lo world");
        assert_eq!(again.spooled(), 11);
        again.remove();
        assert!(spool.load_all().is_empty());
    }

    #[test]
    fn garbage_in_the_spool_is_dropped_not_trusted() {
        let work = tempfile::tempdir().unwrap();
        let spool = Spool::open(work.path()).unwrap();
        let bad = work.path().join("spool").join(Uuid::new_v4().to_string());
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join(META), b"{not json").unwrap();
        // A meta that names another task than its directory is not believed either.
        let other = meta(Uuid::new_v4());
        let named = work.path().join("spool").join(Uuid::new_v4().to_string());
        fs::create_dir(&named).unwrap();
        fs::write(named.join(META), serde_json::to_vec(&other).unwrap()).unwrap();
        fs::write(named.join(OUTPUT), b"").unwrap();
        assert!(spool.load_all().is_empty());
        assert!(!bad.exists() && !named.exists());
    }

    #[test]
    fn links_planted_in_the_spool_are_removed_never_followed() {
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join(META), b"precious").unwrap();
        fs::write(outside.path().join("other"), b"precious").unwrap();
        let spool = Spool::open(work.path()).unwrap();
        // A link in place of a task's directory, pointing at a directory of files.
        let planted = work.path().join("spool").join(Uuid::new_v4().to_string());
        std::os::unix::fs::symlink(outside.path(), &planted).unwrap();
        // A task whose directory holds a link to a directory, and a meta that is a link.
        let m = meta(Uuid::new_v4());
        let task = spool.create(&m).unwrap();
        let dir = work.path().join("spool").join(m.task_id.to_string());
        std::os::unix::fs::symlink(outside.path(), dir.join("sub")).unwrap();
        let linked = meta(Uuid::new_v4());
        let linked_dir = work.path().join("spool").join(linked.task_id.to_string());
        fs::create_dir(&linked_dir).unwrap();
        std::os::unix::fs::symlink(outside.path().join(META), linked_dir.join(META)).unwrap();

        let found = spool.load_all();
        assert_eq!(found.len(), 1, "only the real task is loaded");
        assert!(fs::symlink_metadata(&planted).is_err(), "the link is gone");
        assert!(!linked_dir.exists());
        task.remove();
        assert!(!dir.exists());
        // Nothing the links pointed at was touched.
        assert_eq!(fs::read(outside.path().join(META)).unwrap(), b"precious");
        assert_eq!(fs::read(outside.path().join("other")).unwrap(), b"precious");
    }

    #[test]
    fn a_spool_root_someone_replaced_with_a_file_is_refused() {
        let work = tempfile::tempdir().unwrap();
        fs::write(work.path().join("spool"), b"").unwrap();
        assert!(Spool::open(work.path()).is_err());
    }

    #[test]
    fn losses_next_to_each_other_are_one_mark() {
        let mut m = meta(Uuid::nil());
        m.lose(10, 5);
        m.lose(15, 5);
        m.marks.push(Mark::Truncated {
            offset: 20,
            dropped_bytes: 1,
            dropped_lines: 0,
        });
        m.lose(20, 1);
        m.lose(30, 2);
        assert_eq!(
            m.marks,
            vec![
                Mark::Lost {
                    offset: 10,
                    bytes: 10
                },
                Mark::Truncated {
                    offset: 20,
                    dropped_bytes: 1,
                    dropped_lines: 0
                },
                Mark::Lost {
                    offset: 20,
                    bytes: 1
                },
                Mark::Lost {
                    offset: 30,
                    bytes: 2
                },
            ]
        );
        assert_eq!(m.lost_bytes(), 13);
    }

    #[test]
    fn a_removal_racing_the_last_saves_leaves_no_directory() {
        let work = tempfile::tempdir().unwrap();
        let spool = Spool::open(work.path()).unwrap();
        for _ in 0..200 {
            let mut m = meta(Uuid::new_v4());
            let task = std::sync::Arc::new(spool.create(&m).unwrap());
            let dir = work.path().join("spool").join(m.task_id.to_string());
            let saver = task.clone();
            let saves = std::thread::spawn(move || {
                for produced in 0..50 {
                    m.produced = produced;
                    // A save after the removal finds nothing to write to, and says nothing.
                    saver.save(&m).unwrap();
                }
            });
            task.remove();
            saves.join().unwrap();
            assert!(!dir.exists(), "{} was left behind", dir.display());
        }
        assert!(spool.load_all().is_empty());
    }

    #[test]
    fn a_full_disk_fails_the_write_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let task = TaskSpool::with_output(dir.path().to_owned(), full);
        let err = task.write_at(0, b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }
}
