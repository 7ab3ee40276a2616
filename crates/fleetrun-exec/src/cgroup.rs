//! One cgroup v2 per task, under `<cgroup2 mount>/<cgroup name>/`.
//!
//! A cgroup holds every process the script forks, whatever it does with
//! sessions, process groups or double forks, and `cgroup.kill` kills them
//! all at once. Only the core interface files are used, so no controller
//! needs to be enabled.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::sys;

/// How long `Executor::new` waits for a leftover cgroup to empty.
const LEFTOVER_WAIT: Duration = Duration::from_secs(2);

/// Why a task cgroup could not be created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    /// mkdir under the parent cgroup failed.
    #[error("cannot create the cgroup {path}: {source}")]
    Create {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The new cgroup's `cgroup.procs` could not be opened for writing.
    #[error("cannot open {path}: {source}")]
    Procs {
        /// The file concerned.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The parent cgroup of all tasks.
#[derive(Debug)]
pub(crate) struct CgroupRoot {
    /// Directory of the parent cgroup.
    dir: PathBuf,
    /// The parent's path as `/proc/<pid>/cgroup` spells it.
    path: String,
}

impl CgroupRoot {
    /// Finds the cgroup2 mount and creates the parent cgroup there; `None`
    /// (with a warning) when there is no cgroup2 or it is not writable.
    pub(crate) fn open(name: &str) -> Option<Self> {
        let Some((mount, mount_root)) = fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|text| find_cgroup2(&text))
        else {
            tracing::warn!("no cgroup2 mount: tracking script processes through /proc");
            return None;
        };
        let dir = mount.join(name);
        let usable = match fs::create_dir(&dir) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => Err(err),
            // The parent may be left from a previous run; only creating a
            // child proves the agent may use it.
            _ => probe(&dir),
        };
        if let Err(err) = usable {
            tracing::warn!(dir = %dir.display(), %err, "cgroup v2 not writable: tracking script processes through /proc");
            return None;
        }
        let path = format!("{}/{name}", mount_root.trim_end_matches('/'));
        Some(Self { dir, path })
    }

    /// Kills and removes the task cgroups of an agent that died.
    pub(crate) fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let cgroup = self.task(&name);
            let deadline = Instant::now() + LEFTOVER_WAIT;
            while cgroup.populated() && Instant::now() < deadline {
                cgroup.kill_all();
                thread::sleep(Duration::from_millis(10));
            }
            match cgroup.remove() {
                Ok(()) => {
                    tracing::info!(cgroup = %cgroup.dir.display(), "removed a leftover task cgroup")
                }
                Err(err) => {
                    tracing::warn!(cgroup = %cgroup.dir.display(), %err, "cannot remove a leftover task cgroup")
                }
            }
        }
    }

    /// Creates the task's cgroup and opens its `cgroup.procs` for the child.
    pub(crate) fn create(&self, task_id: &str) -> Result<(TaskCgroup, OwnedFd), CgroupError> {
        let cgroup = self.task(task_id);
        fs::create_dir(&cgroup.dir).map_err(|source| CgroupError::Create {
            path: cgroup.dir.clone(),
            source,
        })?;
        let procs_path = cgroup.dir.join("cgroup.procs");
        // std opens with O_CLOEXEC: the script never sees this descriptor.
        match OpenOptions::new().write(true).open(&procs_path) {
            Ok(file) => Ok((cgroup, file.into())),
            Err(source) => {
                let _ = fs::remove_dir(&cgroup.dir);
                Err(CgroupError::Procs {
                    path: procs_path,
                    source,
                })
            }
        }
    }

    /// Removes the parent cgroup if no task cgroup is left in it.
    pub(crate) fn remove_if_empty(&self) {
        let _ = fs::remove_dir(&self.dir);
    }

    fn task(&self, task_id: &str) -> TaskCgroup {
        TaskCgroup {
            dir: self.dir.join(task_id),
            path: format!("{}/{task_id}", self.path),
        }
    }
}

fn probe(parent: &Path) -> io::Result<()> {
    let probe = parent.join(format!(".probe-{}", std::process::id()));
    fs::create_dir(&probe)?;
    File::open(probe.join("cgroup.procs"))?;
    fs::remove_dir(&probe)
}

/// The cgroup of one task.
#[derive(Debug)]
pub(crate) struct TaskCgroup {
    dir: PathBuf,
    /// As `/proc/<pid>/cgroup` spells it.
    path: String,
}

impl TaskCgroup {
    /// Live processes in the cgroup and any cgroups the script created below
    /// it (zombies are not listed).
    pub(crate) fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.subtree() {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    text.lines()
                        .filter_map(|line| line.trim().parse::<i32>().ok()),
                );
            }
        }
        pids
    }

    /// Whether any live process is left anywhere in the subtree.
    pub(crate) fn populated(&self) -> bool {
        match fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => events.lines().any(|line| line == "populated 1"),
            Err(_) => !self.pids().is_empty(),
        }
    }

    pub(crate) fn signal_all(&self, signal: Signal) {
        for pid in self.pids() {
            sys::signal(pid, signal);
        }
    }

    /// SIGKILLs the whole subtree: atomically through `cgroup.kill` (Linux
    /// 5.14+), else pid by pid (callers repeat this until the cgroup is
    /// empty, which catches processes forked meanwhile).
    pub(crate) fn kill_all(&self) {
        if fs::write(self.dir.join("cgroup.kill"), "1").is_err() {
            self.signal_all(Signal::SIGKILL);
        }
    }

    /// Whether `/proc/<pid>/cgroup` places `pid` in this subtree; zombies
    /// still show the cgroup they died in. One read of the file, not
    /// `procfs`'s `Process::cgroups`, which first opens and checks a handle
    /// on the process's directory: this runs for each dead child at every
    /// reaping round of a kill.
    pub(crate) fn holds(&self, pid: i32) -> bool {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        text.lines()
            .filter_map(|line| line.strip_prefix("0::"))
            .any(|path| {
                path.strip_prefix(&self.path)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }

    /// Removes the cgroup, children first. Fails while a process is inside.
    pub(crate) fn remove(&self) -> io::Result<()> {
        let mut dirs = self.subtree();
        // Deepest first: a cgroup with children cannot be removed.
        dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
        for dir in dirs {
            match fs::remove_dir(&dir) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }

    /// This cgroup's directory and all the directories below it.
    fn subtree(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.dir.clone()];
        let mut next = 0;
        while next < dirs.len() {
            if let Ok(entries) = fs::read_dir(&dirs[next]) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(entry.path());
                    }
                }
            }
            next += 1;
        }
        dirs
    }
}

/// The first cgroup2 mount in a mountinfo text: where it is mounted, and
/// which cgroup path it shows. Parsed here rather than with the `procfs`
/// crate, whose `MountInfo` keeps the root and mount point with their octal
/// escapes (`\040` for a space) undone by nothing: a cgroup2 mounted under a
/// path with a space would not be found.
fn find_cgroup2(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        let root = unescape(fields.get(3)?);
        let mount_point = unescape(fields.get(4)?);
        Some((PathBuf::from(mount_point), root))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_the_unified_mount_of_a_hybrid_host() {
        let (mount, root) = find_cgroup2(HYBRID).unwrap();
        assert_eq!(mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(root, "/");
    }

    #[test]
    fn finds_a_pure_v2_mount_with_an_escaped_path() {
        let info = "25 1 0:22 /sub\\040dir /sys/fs/my\\040cg rw - cgroup2 none rw\n";
        let (mount, root) = find_cgroup2(info).unwrap();
        assert_eq!(mount, PathBuf::from("/sys/fs/my cg"));
        assert_eq!(root, "/sub dir");
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(
            find_cgroup2("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn unescape_leaves_other_backslashes() {
        assert_eq!(unescape(r"a\134b\x"), r"a\b\x");
        assert_eq!(unescape(r"end\04"), r"end\04");
    }
}
