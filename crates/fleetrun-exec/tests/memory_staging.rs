//! Staging on a memory file system ([`Staging::Memory`]): where scripts go, and the directory
//! another account plants there beforehand.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{MemoryBase, TEST_USER, collect, shell, task, task_id, test_user, wait_for};
use fleetrun_exec::{DEFAULT_MEMORY_STAGING_BUDGET, ExecConfig, Executor, Language, Staging};

fn executor(work_dir: &Path, base: &MemoryBase) -> Executor {
    executor_on(
        work_dir,
        vec![base.0.clone()],
        DEFAULT_MEMORY_STAGING_BUDGET,
    )
}

fn executor_on(work_dir: &Path, bases: Vec<PathBuf>, budget: u64) -> Executor {
    let mut config = ExecConfig::new(work_dir);
    config.use_cgroup = false;
    config.cgroup_name = format!("fleetrun-{}", task_id());
    config.staging = Staging::Memory { bases, budget };
    Executor::new(config).unwrap()
}

/// Whether `text` (a script's `$0`) is below `dir`.
fn staged_in(text: &str, dir: &Path) -> bool {
    text.starts_with(&format!("{}/", dir.display()))
}

fn work_dir() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    work
}

#[tokio::test]
async fn small_scripts_run_from_the_memory_file_system_and_large_ones_from_the_work_dir() {
    let Some(base) = MemoryBase::new(0o755) else {
        return;
    };
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
    let Some(base) = MemoryBase::new(0o755) else {
        return;
    };
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
    let Some(base) = MemoryBase::new(0o755) else {
        return;
    };
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

/// The memory file system's directory removed under a running agent (by hand, or a cleaner of
/// `/dev/shm`): every later task still runs, from the work directory.
#[tokio::test]
async fn a_vanished_memory_root_falls_back_to_the_work_dir() {
    let Some(base) = MemoryBase::new(0o755) else {
        return;
    };
    let work = work_dir();
    let executor = executor(work.path(), &base);
    let root = executor.memory_staging_root().unwrap().to_owned();
    std::fs::remove_dir_all(root.parent().unwrap()).unwrap();
    for _ in 0..2 {
        let collected = collect(executor.start(shell("echo \"$0\""), Default::default())).await;
        assert!(
            staged_in(&collected.text(), &work.path().join("tasks")),
            "{} {:?}",
            collected.text(),
            collected.outcome
        );
    }
}

/// The scripts staged in memory at once stay within the budget; the others go to the work
/// directory, and a finished task's share is given back.
#[tokio::test]
async fn scripts_beyond_the_memory_budget_are_staged_under_the_work_dir() {
    let Some(base) = MemoryBase::new(0o755) else {
        return;
    };
    let work = work_dir();
    // One page: one small script at a time.
    let executor = executor_on(work.path(), vec![base.0.clone()], 4096);
    let root = executor.memory_staging_root().unwrap().to_owned();
    let holding = executor.start(shell("echo \"$0\"; sleep 1"), Default::default());
    wait_for(
        "the first script staged",
        std::time::Duration::from_secs(10),
        || std::fs::read_dir(&root).is_ok_and(|d| d.count() == 1),
    )
    .await;
    let beyond = collect(executor.start(shell("echo \"$0\""), Default::default())).await;
    assert!(
        staged_in(&beyond.text(), &work.path().join("tasks")),
        "{}",
        beyond.text()
    );
    let first = collect(holding).await;
    assert!(staged_in(&first.text(), &root), "{}", first.text());
    let after = collect(executor.start(shell("echo \"$0\""), Default::default())).await;
    assert!(staged_in(&after.text(), &root), "{}", after.text());
    // A budget smaller than a page takes nothing.
    drop(executor);
    let none = executor_on(work.path(), vec![base.0.clone()], 100);
    let collected = collect(none.start(shell("echo \"$0\""), Default::default())).await;
    assert!(
        staged_in(&collected.text(), &work.path().join("tasks")),
        "{}",
        collected.text()
    );
}

/// A tmpfs mounted `noexec` is passed over for the next base.
#[tokio::test]
async fn a_base_mounted_noexec_is_passed_over() {
    let Some(base) = MemoryBase::new(0o755) else {
        return;
    };
    let noexec = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "noexec,size=1m", "tmpfs"])
        .arg(noexec.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let work = work_dir();
    let executor = executor_on(
        work.path(),
        vec![noexec.path().to_owned(), base.0.clone()],
        DEFAULT_MEMORY_STAGING_BUDGET,
    );
    let root = executor.memory_staging_root().map(Path::to_owned);
    drop(executor);
    let _ = std::process::Command::new("umount")
        .arg(noexec.path())
        .status();
    let root = root.expect("a staging root on the other base");
    assert!(root.starts_with(&base.0), "{}", root.display());
}
