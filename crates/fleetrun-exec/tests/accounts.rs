//! Running as another account: identity, groups, environment, and the
//! privacy of the staged script.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use common::{Fixture, TEST_USER, collect, task, test_user};
use fleetrun_exec::{Ending, Language, OutputEvent};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn runs_as_the_account_with_its_groups_home_and_a_clean_environment() {
    let extra_gid = test_user();
    let fixture = Fixture::new(true);
    let script = r#"whoami
id -G
echo "$HOME"
pwd
echo "$USER $LOGNAME $SHELL"
echo "$PATH"
echo "$LANG"
env | cut -d= -f1 | sort | tr '\n' ' '
"#;
    let run = fixture.run(task(Language::Shell, script, TEST_USER)).await;
    assert_eq!(run.outcome.ending, Ending::Exited(0), "{}", run.text());
    let text = run.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], TEST_USER);
    let groups: Vec<u32> = lines[1].split(' ').map(|g| g.parse().unwrap()).collect();
    assert!(
        groups.contains(&extra_gid),
        "supplementary group {extra_gid} missing from {groups:?}"
    );
    assert!(!groups.contains(&0), "kept root's group: {groups:?}");
    let home = format!("/home/{TEST_USER}");
    assert_eq!(lines[2], home);
    assert_eq!(lines[3], home);
    assert_eq!(lines[4], format!("{TEST_USER} {TEST_USER} /bin/bash"));
    assert_eq!(
        lines[5],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(lines[6], "C.UTF-8");
    // bash adds PWD, SHLVL and _ itself; nothing of the agent's leaks.
    assert_eq!(
        lines[7].trim(),
        "HOME LANG LOGNAME PATH PWD SHELL SHLVL USER _"
    );
}

#[tokio::test]
async fn root_gets_roots_groups_and_home() {
    let fixture = Fixture::new(true);
    let run = fixture
        .run(task(Language::Shell, "id -u; id -G; pwd", "root"))
        .await;
    let groups = Command::new("id").args(["-G", "root"]).output().unwrap();
    let expected = format!("0\n{}/root\n", String::from_utf8(groups.stdout).unwrap());
    assert_eq!(run.text(), expected);
}

#[tokio::test]
async fn staged_script_is_private_to_the_account() {
    test_user();
    let fixture = Fixture::new(true);
    let t = task(Language::Shell, "echo ready; exec sleep 30", TEST_USER);
    let id = t.id.clone();
    let cancel = CancellationToken::new();
    let mut running = fixture.executor.start(t, cancel.clone());
    let first = tokio::time::timeout(Duration::from_secs(10), running.output.next())
        .await
        .unwrap();
    assert_eq!(first, Some(OutputEvent::Data("ready\n".into())));

    let uid = nix::unistd::User::from_name(TEST_USER)
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let dir = fixture.executor.staging_dir(&id);
    let script = dir.join("script.sh");
    let root = std::fs::metadata(fixture.tasks_dir()).unwrap();
    assert_eq!((root.uid(), root.permissions().mode() & 0o7777), (0, 0o711));
    let dir_meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(
        (dir_meta.uid(), dir_meta.permissions().mode() & 0o7777),
        (uid, 0o700)
    );
    let file_meta = std::fs::metadata(&script).unwrap();
    assert_eq!(
        (file_meta.uid(), file_meta.permissions().mode() & 0o7777),
        (uid, 0o500)
    );

    let read_as = |user: &str| {
        Command::new("runuser")
            .args(["-u", user, "--", "cat"])
            .arg(&script)
            .output()
            .unwrap()
    };
    let by_nobody = read_as("nobody");
    assert!(!by_nobody.status.success(), "nobody could read the script");
    assert!(String::from_utf8_lossy(&by_nobody.stderr).contains("Permission denied"));
    let by_owner = read_as(TEST_USER);
    assert_eq!(by_owner.stdout, b"echo ready; exec sleep 30");

    cancel.cancel();
    let run = collect(running).await;
    assert_eq!(run.outcome.ending, Ending::Cancelled);
    assert_eq!(run.outcome.survivors, 0);
    assert!(!dir.exists());
    fixture.assert_no_staging();
}

#[tokio::test]
async fn a_missing_home_means_working_in_the_root_directory() {
    let fixture = Fixture::new(true);
    let home = nix::unistd::User::from_name("nobody").unwrap().unwrap().dir;
    assert!(!home.exists(), "nobody has a home here: {}", home.display());
    let run = fixture
        .run(task(
            Language::Shell,
            "whoami; pwd; echo \"$HOME\"",
            "nobody",
        ))
        .await;
    assert_eq!(run.text(), format!("nobody\n/\n{}\n", home.display()));
}

/// An account that is another name for uid 0, made once on this machine.
fn uid0_alias() -> &'static str {
    const ALIAS: &str = "fleetrun-toor";
    let exists = Command::new("getent")
        .args(["passwd", ALIAS])
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let made = Command::new("useradd")
            .args([
                "-o",
                "-u",
                "0",
                "-g",
                "0",
                "-M",
                "-N",
                "-s",
                "/usr/sbin/nologin",
            ])
            .arg(ALIAS)
            .status()
            .unwrap();
        // Another test may have made it meanwhile.
        assert!(
            made.success()
                || Command::new("getent")
                    .args(["passwd", ALIAS])
                    .status()
                    .unwrap()
                    .success()
        );
    }
    ALIAS
}

#[tokio::test]
async fn refuse_root_refuses_uid_0_under_any_name_and_runs_other_accounts() {
    test_user();
    let alias = uid0_alias();
    let work_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work_dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut config = fleetrun_exec::ExecConfig::new(work_dir.path());
    config.use_cgroup = false;
    config.cgroup_name = format!("fleetrun-{}", common::task_id());
    config.refuse_root = Some("no root here (limits.allow_root = false)".to_owned());
    let executor = fleetrun_exec::Executor::new(config).unwrap();
    let marker = work_dir.path().join("ran");
    for account in ["root", alias] {
        let script = format!("touch {}", marker.display());
        let run = collect(executor.start(
            task(Language::Shell, &script, account),
            CancellationToken::new(),
        ))
        .await;
        match &run.outcome.ending {
            Ending::Failed(why) => assert_eq!(
                why,
                &format!(
                    "account {account:?} is root (uid 0): no root here (limits.allow_root = false)"
                )
            ),
            other => panic!("{account}: {other:?}, {}", run.text()),
        }
        assert!(!marker.exists(), "{account}: the script ran");
    }
    let run = collect(executor.start(
        task(Language::Shell, "id -un", TEST_USER),
        CancellationToken::new(),
    ))
    .await;
    assert_eq!(run.outcome.ending, Ending::Exited(0), "{}", run.text());
    assert_eq!(run.text().trim(), TEST_USER);
}
