//! Helpers shared by the integration tests. They run as root and create the
//! users they need.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fleetrun_exec::{
    DEFAULT_MEMORY_STAGING_BUDGET, DEFAULT_OUTPUT_LIMIT, ExecConfig, Executor, Language, Outcome,
    OutputEvent, Running, Staging, Task,
};
use tokio_util::sync::CancellationToken;

pub const TEST_USER: &str = "fleetrun-user";
pub const TEST_GROUP: &str = "fleetrun-extra";

/// Creates `fleetrun-user` with the supplementary group `fleetrun-extra`,
/// once per test binary; returns the group's gid.
pub fn test_user() -> u32 {
    static GID: OnceLock<u32> = OnceLock::new();
    *GID.get_or_init(|| {
        assert!(nix::unistd::geteuid().is_root(), "the tests run as root");
        if getent("group", TEST_GROUP).is_none() {
            run("groupadd", &["-f", TEST_GROUP]);
        }
        if getent("passwd", TEST_USER).is_none() {
            run("useradd", &["-m", "-s", "/bin/bash", TEST_USER]);
        }
        run("usermod", &["-aG", TEST_GROUP, TEST_USER]);
        let group = getent("group", TEST_GROUP).unwrap();
        group.split(':').nth(2).unwrap().parse().unwrap()
    })
}

fn getent(db: &str, key: &str) -> Option<String> {
    let out = Command::new("getent").args([db, key]).output().unwrap();
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).unwrap())
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// A fresh, unique task id.
pub fn task_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "test-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .unwrap()
            .subsec_nanos()
    )
}

/// Where a test's executor stages scripts: the attacks on staging run against both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    WorkDir,
    /// A directory of the test's own on `/dev/shm`.
    Memory,
}

pub const PLACES: [Place; 2] = [Place::WorkDir, Place::Memory];

/// A base directory of its own on /dev/shm (a tmpfs), root's and with `mode`: 0755 as /run
/// is, 1777 as /dev/shm is.
pub struct MemoryBase(pub PathBuf);

impl MemoryBase {
    pub fn new(mode: u32) -> Option<Self> {
        let fs = nix::sys::statfs::statfs("/dev/shm").ok()?;
        if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
            eprintln!("skipped: /dev/shm is not a tmpfs here");
            return None;
        }
        let dir = PathBuf::from(format!("/dev/shm/fleetrun-test-{}", task_id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        Some(Self(dir))
    }

    /// `config` staging on this base.
    pub fn stage_on(&self, config: &mut ExecConfig) {
        config.staging = Staging::Memory {
            bases: vec![self.0.clone()],
            budget: DEFAULT_MEMORY_STAGING_BUDGET,
        };
    }
}

impl Drop for MemoryBase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An executor over its own work dir and its own parent cgroup, so tests
/// running at the same time never clean up each other's tasks.
pub struct Fixture {
    pub executor: Executor,
    pub work_dir: tempfile::TempDir,
    /// Dropped after the executor, which removes its directory there first.
    pub memory: Option<MemoryBase>,
}

impl Fixture {
    pub fn new(use_cgroup: bool) -> Self {
        Self::staging_in(use_cgroup, Place::WorkDir).unwrap()
    }

    /// `None` when the host has no memory file system to stage on.
    pub fn staging_in(use_cgroup: bool, place: Place) -> Option<Self> {
        let work_dir = tempfile::tempdir().unwrap();
        // Other accounts must be able to walk to their staging directory.
        std::fs::set_permissions(work_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = ExecConfig::new(work_dir.path());
        config.use_cgroup = use_cgroup;
        config.cgroup_name = format!("fleetrun-{}", task_id());
        let memory = match place {
            Place::WorkDir => None,
            Place::Memory => Some(MemoryBase::new(0o755)?),
        };
        if let Some(base) = &memory {
            base.stage_on(&mut config);
        }
        let executor = Executor::new(config).unwrap();
        assert_eq!(
            executor.uses_cgroup(),
            use_cgroup && cgroup2_mount().is_some()
        );
        assert_eq!(executor.memory_staging_root().is_some(), memory.is_some());
        Some(Self {
            executor,
            work_dir,
            memory,
        })
    }

    /// Where small scripts are staged.
    pub fn tasks_dir(&self) -> PathBuf {
        match self.executor.memory_staging_root() {
            Some(root) => root.to_owned(),
            None => self.work_dir.path().join("tasks"),
        }
    }

    /// Asserts that no staging directory is left.
    pub fn assert_no_staging(&self) {
        let left: Vec<_> = std::fs::read_dir(self.tasks_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "staging left behind: {left:?}");
    }

    pub fn start(&self, task: Task) -> Running {
        self.executor.start(task, CancellationToken::new())
    }

    pub async fn run(&self, task: Task) -> Collected {
        let collected = collect(self.start(task)).await;
        self.assert_no_staging();
        collected
    }
}

pub fn task(language: Language, script: &str, account: &str) -> Task {
    Task {
        id: task_id(),
        language,
        script: script.as_bytes().to_vec(),
        args: Vec::new(),
        sensitive_args: false,
        account: account.to_owned(),
        timeout: Duration::from_secs(20),
        output_limit: DEFAULT_OUTPUT_LIMIT,
        windows_interpreter: None,
    }
}

pub fn shell(script: &str) -> Task {
    task(Language::Shell, script, "root")
}

/// Everything a task produced.
#[derive(Debug)]
pub struct Collected {
    pub output: Vec<u8>,
    /// Where a `Truncated` event came in `output`, and what it said.
    pub truncated: Option<(usize, u64, u64)>,
    pub outcome: Outcome,
}

impl Collected {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

pub async fn collect(running: Running) -> Collected {
    let Running {
        mut output,
        outcome,
    } = running;
    let mut bytes = Vec::new();
    let mut truncated = None;
    while let Some(event) = output.next().await {
        match event {
            OutputEvent::Data(data) => bytes.extend_from_slice(&data),
            OutputEvent::Truncated {
                dropped_bytes,
                dropped_lines,
            } => {
                assert!(truncated.is_none(), "Truncated sent twice");
                truncated = Some((bytes.len(), dropped_bytes, dropped_lines));
            }
        }
    }
    Collected {
        output: bytes,
        truncated,
        outcome: outcome.await.unwrap(),
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').unwrap().1.split_whitespace().next();
        !matches!(state, Some("Z" | "X"))
    })
}

/// Polls `done` every 10 ms until it holds; panics after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The pids a script wrote to `file`, one per line.
pub fn read_pids(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A directory any account may write pid files into.
pub fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// The cgroup2 mount point, as the tests see it.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(mount.split(' ').nth(4)?))
    })
}

/// Where an interpreter is on the executor's PATH.
pub fn installed(name: &str) -> Option<PathBuf> {
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}
