//! What an agent that crashed left behind is cleaned up at the next start.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{cgroup2_mount, task_id};
use fleetrun_exec::{ExecConfig, Executor};

#[test]
fn new_removes_leftover_staging_dirs_and_cgroups() {
    let work = tempfile::tempdir().unwrap();
    let stale = work.path().join("tasks/stale-task");
    std::fs::create_dir_all(stale.join("nested")).unwrap();
    std::fs::write(stale.join("script.sh"), "echo old").unwrap();
    std::fs::set_permissions(
        stale.join("script.sh"),
        std::fs::Permissions::from_mode(0o500),
    )
    .unwrap();

    let mut config = ExecConfig::new(work.path());
    config.cgroup_name = format!("fleetrun-{}", task_id());
    // A task cgroup with a script still running in it.
    let mount = cgroup2_mount().expect("this host has cgroup v2");
    let stale_cgroup = mount.join(&config.cgroup_name).join("stale-task");
    std::fs::create_dir_all(&stale_cgroup).unwrap();
    let mut orphan = Command::new("sleep").arg("300").spawn().unwrap();
    std::fs::write(stale_cgroup.join("cgroup.procs"), orphan.id().to_string()).unwrap();

    let executor = Executor::new(config).unwrap();
    assert!(executor.uses_cgroup());
    assert!(!stale.exists(), "staging leftover still there");
    assert_eq!(
        std::fs::read_dir(work.path().join("tasks"))
            .unwrap()
            .count(),
        0
    );
    assert!(!stale_cgroup.exists(), "cgroup leftover still there");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = orphan.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the leftover process survived");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(9));
    drop(executor);
}

#[test]
fn without_cgroup_nothing_is_created_under_the_mount() {
    let work = tempfile::tempdir().unwrap();
    let mut config = ExecConfig::new(work.path());
    config.use_cgroup = false;
    config.cgroup_name = format!("fleetrun-{}", task_id());
    let name = config.cgroup_name.clone();
    let executor = Executor::new(config).unwrap();
    assert!(!executor.uses_cgroup());
    if let Some(mount) = cgroup2_mount() {
        assert!(!mount.join(name).exists());
    }
}
