//! Staging on a memory file system ([`Staging::Memory`]): where scripts go, and the directory
//! another account plants there beforehand.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{TEST_USER, collect, shell, task, task_id, test_user};
use fleetrun_exec::{ExecConfig, Executor, Language, Staging};

/// A base directory of its own on /dev/shm (a tmpfs), root's and 0755 as /run is.
struct Base(PathBuf);

impl Base {
    fn new() -> Option<Self> {
        let fs = nix::sys::statfs::statfs("/dev/shm").ok()?;
        if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
            eprintln!("skipped: /dev/shm is not a tmpfs here");
            return None;
        }
        let dir = PathBuf::from(format!("/dev/shm/fleetrun-test-{}", task_id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Self(dir))
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn executor(work_dir: &Path, base: &Base) -> Executor {
    let mut config = ExecConfig::new(work_dir);
    config.use_cgroup = false;
    config.cgroup_name = format!("fleetrun-{}", task_id());
    config.staging = Staging::Memory {
        bases: vec![base.0.clone()],
    };
    Executor::new(config).unwrap()
}

fn work_dir() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    work
}

#[tokio::test]
async fn small_scripts_run_from_the_memory_file_system_and_large_ones_from_the_work_dir() {
    let Some(base) = Base::new() else { return };
    test_user();
    let work = work_dir();
    let executor = executor(work.path(), &base);
    let root = executor
        .memory_staging_root()
        .expect("a staging root on the tmpfs")
        .to_owned();
    assert!(root.starts_with(&base.0), "{}", root.display());
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o711));

    // The account reads its script there as it does under the work directory.
    for account in ["root", TEST_USER] {
        let mut t = task(Language::Shell, "echo \"$0\"; id -un", account);
        t.id = task_id();
        let collected = collect(executor.start(t, Default::default())).await;
        let text = collected.text();
        assert!(
            text.starts_with(&format!("{}/", root.display()))
                && text.ends_with(&format!("{account}\n")),
            "{account}: {text} {:?}",
            collected.outcome
        );
    }
    // A script of more than 1 MiB stays off the host's memory.
    let large = format!("echo \"$0\"\n#{}\n", "x".repeat(1024 * 1024));
    let collected = collect(executor.start(shell(&large), Default::default())).await;
    let text = collected.text();
    assert!(
        text.starts_with(&format!("{}/", work.path().join("tasks").display())),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "staging left behind"
    );
    // The executor's last clone gone, its directory on the tmpfs goes too.
    drop(executor);
    assert!(!root.exists(), "{} left", root.display());
}

/// The attack: another account makes the agent's directory on the shared memory file system
/// first, to swap the scripts staged in it. The agent stages under its work directory instead.
#[tokio::test]
async fn a_directory_another_account_planted_on_the_memory_file_system_is_not_used() {
    let Some(base) = Base::new() else { return };
    test_user();
    let work = work_dir();
    let first = executor(work.path(), &base);
    let root = first.memory_staging_root().unwrap().to_owned();
    let dir = root.parent().unwrap().to_owned();
    drop(first);
    assert!(!dir.exists());
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let status = std::process::Command::new("chown")
        .arg(TEST_USER)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());

    let executor = executor(work.path(), &base);
    assert_eq!(executor.memory_staging_root(), None);
    let collected = collect(executor.start(shell("echo \"$0\""), Default::default())).await;
    assert!(
        collected
            .text()
            .starts_with(&format!("{}/", work.path().join("tasks").display())),
        "{}",
        collected.text()
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the agent wrote into it"
    );
}

/// What a crashed agent left on the memory file system is removed at the next start.
#[tokio::test]
async fn leftovers_on_the_memory_file_system_are_removed() {
    let Some(base) = Base::new() else { return };
    let work = work_dir();
    let first = executor(work.path(), &base);
    let root = first.memory_staging_root().unwrap().to_owned();
    std::fs::create_dir_all(root.join("crashed-task")).unwrap();
    std::fs::write(root.join("crashed-task/script.sh"), "x").unwrap();
    let second = executor(work.path(), &base);
    assert_eq!(second.memory_staging_root(), Some(root.as_path()));
    assert!(!root.join("crashed-task").exists());
    drop((first, second));
}
