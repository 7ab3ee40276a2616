//! Another local account attacks the staging of scripts that run as root:
//! it takes over the task directories, swaps them while tasks are staged,
//! and plants symlinks where the agent will write. It must get nowhere.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{MemoryBase, PLACES, Place, TEST_USER, collect, task, task_id, test_user};
use fleetrun_exec::{Ending, ExecConfig, Executor, Language, SetupError};
use tokio_util::sync::CancellationToken;

/// The attacker, run as `fleetrun-user`: takes over `work/tasks` if the
/// work directory lets it, plants a symlink to the victim directory for
/// every other known task id, then, until told to stop, renames every task
/// directory it sees and puts its own script in its place. Logs each step
/// that succeeded.
const ATTACKER: &str = r#"
use strict;
my ($work, $victim, $log, $stop, @ids) = @ARGV;
my $tasks = "$work/tasks";
open(my $L, '>>', $log) or die "log: $!";
select((select($L), $| = 1)[0]);
print $L "moved tasks\n" if rename($tasks, "$work/tasks.moved");
print $L "made tasks\n" if mkdir($tasks, 0777) && chmod(0777, $tasks);
for my $i (0 .. $#ids) {
    next if $i % 2;
    print $L "planted $ids[$i]\n" if symlink($victim, "$tasks/$ids[$i]");
}
print $L "ready\n";
my %seen;
until (-e $stop) {
    opendir(my $d, $tasks) or next;
    for my $id (readdir $d) {
        next if $id =~ /^\./ || $id =~ /\.orig$/ || $seen{$id}++ || -l "$tasks/$id";
        next unless rename("$tasks/$id", "$tasks/$id.orig");
        print $L "swapped $id\n";
        mkdir("$tasks/$id", 0755);
        if (open(my $s, '>', "$tasks/$id/script.sh")) {
            print $s "echo PWNED; touch $victim/pwned\n";
            close($s);
            chmod(0755, "$tasks/$id/script.sh");
        }
    }
}
"#;

struct Attacker {
    child: Child,
    log: PathBuf,
    stop: PathBuf,
}

impl Attacker {
    /// Starts the attacker and waits until it has done its preparations.
    async fn start(scratch: &Path, work: &Path, victim: &Path, ids: &[String]) -> Self {
        let log = scratch.join("attacker.log");
        let stop = scratch.join("stop");
        let child = Command::new("runuser")
            .args(["-u", TEST_USER, "--", "perl", "-e", ATTACKER])
            .arg(work)
            .arg(victim)
            .arg(&log)
            .arg(&stop)
            .args(ids)
            .spawn()
            .unwrap();
        common::wait_for("the attacker", Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ready"))
        })
        .await;
        Self { child, log, stop }
    }

    /// Stops it and returns what it managed to do.
    fn stop(mut self) -> Vec<String> {
        std::fs::write(&self.stop, "").unwrap();
        self.child.wait().unwrap();
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| *l != "ready")
            .map(str::to_owned)
            .collect()
    }
}

/// A scratch directory the attacker can write its log to, and a victim
/// directory (root's) it would like the agent to write into or give away.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let scratch = tempfile::tempdir().unwrap();
    // Sticky, like /tmp: the attacker may add its own files only.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = scratch.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    (scratch, victim)
}

fn config(work: &Path) -> ExecConfig {
    let mut config = ExecConfig::new(work);
    config.cgroup_name = format!("fleetrun-{}", task_id());
    config
}

/// Runs eight root tasks while the attacker works on `work`: each must run
/// the script it was given, as root, and nothing may land in the victim
/// directory or change its owner.
async fn stage_under_attack(executor: &Executor, scratch: &Path, work: &Path, victim: &Path) {
    let ids: Vec<String> = (0..8).map(|_| task_id()).collect();
    let attacker = Attacker::start(scratch, work, victim, &ids).await;
    let mut results = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let mut t = task(Language::Shell, "echo \"task $1 ran as $(id -u)\"", "root");
        t.id = id.clone();
        t.args = vec![n.to_string()];
        let run = collect(executor.start(t, CancellationToken::new())).await;
        let text = run.text();
        results.push((n, run.outcome.ending, text));
    }
    let done = attacker.stop();
    for (n, ending, text) in results {
        assert_eq!(
            (ending, text.as_str()),
            (Ending::Exited(0), format!("task {n} ran as 0\n").as_str()),
            "task {n}; the attacker did: {done:?}"
        );
    }
    let meta = std::fs::symlink_metadata(victim).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o755));
    let planted: Vec<_> = std::fs::read_dir(victim).unwrap().collect();
    assert!(planted.is_empty(), "{planted:?}");
    assert!(done.is_empty(), "the attacker got somewhere: {done:?}");
}

/// The account owns the work directory: the executor refuses it, naming
/// it. (Accepting it, as the agent used to, lets the attacker win.)
#[tokio::test(flavor = "multi_thread")]
async fn a_work_dir_owned_by_another_account_is_refused() {
    test_user();
    let (scratch, victim) = scratch();
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let status = Command::new("chown")
        .arg(TEST_USER)
        .arg(&work)
        .status()
        .unwrap();
    assert!(status.success());
    match Executor::new(config(&work)) {
        Err(err @ SetupError::UntrustedWorkDir { .. }) => {
            let SetupError::UntrustedWorkDir {
                ref dir,
                ref owner,
                mode,
                problem,
            } = err
            else {
                unreachable!()
            };
            assert_eq!(dir, &work);
            assert!(owner.starts_with(TEST_USER), "{owner}");
            assert_eq!(mode, 0o755);
            assert_eq!(problem, "is owned by another account");
            let message = err.to_string();
            assert!(message.contains(&work.display().to_string()), "{message}");
            assert!(message.contains("0755"), "{message}");
        }
        Err(other) => panic!("{other}"),
        Ok(executor) => {
            stage_under_attack(&executor, scratch.path(), &work, &victim).await;
            panic!("the executor accepted a work directory owned by {TEST_USER}");
        }
    }
}

/// A work directory the account created first in a sticky directory
/// everyone may write to (it can, in /tmp) is refused too.
#[tokio::test(flavor = "multi_thread")]
async fn a_work_dir_planted_in_a_sticky_directory_is_refused() {
    test_user();
    let (scratch, _victim) = scratch();
    let tmp = scratch.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let work = tmp.join("fleetrun");
    let status = Command::new("runuser")
        .args(["-u", TEST_USER, "--", "mkdir", "-m", "0755"])
        .arg(&work)
        .status()
        .unwrap();
    assert!(status.success());
    match Executor::new(config(&work)) {
        Err(SetupError::UntrustedWorkDir { dir, .. }) => assert_eq!(dir, work),
        other => panic!("{other:?}"),
    }
    // Pointing to the agent's own directory through the account's symlink
    // does not do either.
    let own = scratch.path().join("own");
    std::fs::create_dir(&own).unwrap();
    let link = tmp.join("link");
    let status = Command::new("runuser")
        .args(["-u", TEST_USER, "--", "ln", "-s"])
        .arg(&own)
        .arg(&link)
        .status()
        .unwrap();
    assert!(status.success());
    match Executor::new(config(&link)) {
        Err(SetupError::UntrustedWorkDir { dir, problem, .. }) => {
            assert_eq!(dir, link);
            assert_eq!(problem, "is a symbolic link owned by another account");
        }
        other => panic!("{other:?}"),
    }
}

/// The accepted layout closest to the attacker: the work directory is
/// root's, in a sticky directory the attacker can write to (or, staging in
/// memory, the agent's directory is in one, as on /dev/shm). While tasks are
/// staged it tries to take over, swap and plant links, and fails at every
/// step; every task runs its own script.
#[tokio::test(flavor = "multi_thread")]
async fn racing_the_staging_of_root_tasks_gets_nowhere() {
    test_user();
    for place in PLACES {
        let (scratch, victim) = scratch();
        let tmp = scratch.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let work = tmp.join("fleetrun");
        let mut config = config(&work);
        let memory = match place {
            Place::WorkDir => None,
            Place::Memory => match MemoryBase::new(0o1777) {
                Some(base) => Some(base),
                None => continue,
            },
        };
        if let Some(base) = &memory {
            base.stage_on(&mut config);
        }
        let executor = Executor::new(config).unwrap();
        // The directory that holds `tasks`, where the attacker goes to work.
        let attacked = match executor.memory_staging_root() {
            Some(root) => root.parent().unwrap().to_owned(),
            None => work.clone(),
        };
        assert_eq!(memory.is_some(), attacked != work, "{place:?}");
        stage_under_attack(&executor, scratch.path(), &attacked, &victim).await;
        assert_eq!(
            std::fs::read_dir(attacked.join("tasks")).unwrap().count(),
            0,
            "{place:?}"
        );
        drop(executor);
    }
}

/// A script leaves links to root's files in its staging directory and in a
/// leftover one (as if the agent had crashed): removing them deletes the
/// links, never what they point to.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_never_follows_links_a_script_planted() {
    test_user();
    for place in PLACES {
        let (scratch, victim) = scratch();
        std::fs::write(victim.join("precious"), "keep").unwrap();
        let work = scratch.path().join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755)).unwrap();
        let memory = match place {
            Place::WorkDir => None,
            Place::Memory => match MemoryBase::new(0o755) {
                Some(base) => Some(base),
                None => continue,
            },
        };
        let config = || {
            let mut config = config(&work);
            if let Some(base) = &memory {
                base.stage_on(&mut config);
            }
            config
        };
        let executor = Executor::new(config()).unwrap();
        let tasks = match executor.memory_staging_root() {
            Some(root) => root.to_owned(),
            None => work.join("tasks"),
        };
        let plant = format!(
            "d=$(dirname \"$0\"); ln -s {v} \"$d/dir-link\"; ln -s {v}/precious \"$d/file-link\"; mkdir \"$d/sub\"; ln -s {v} \"$d/sub/deeper\"; echo planted",
            v = victim.display()
        );
        let run = collect(executor.start(
            task(Language::Shell, &plant, TEST_USER),
            CancellationToken::new(),
        ))
        .await;
        assert_eq!(run.text(), "planted\n", "{place:?}");
        assert_eq!(std::fs::read(victim.join("precious")).unwrap(), b"keep");

        // A crashed agent's leftover, links and all: the next executor starts while the first
        // still holds the directory on the memory file system, as a restarted agent finds it.
        let leftover = tasks.join("crashed-task");
        std::fs::create_dir_all(leftover.join("sub")).unwrap();
        std::os::unix::fs::symlink(&victim, leftover.join("dir-link")).unwrap();
        std::os::unix::fs::symlink(&victim, leftover.join("sub/deeper")).unwrap();
        let again = Executor::new(config()).unwrap();
        assert!(!leftover.exists(), "{place:?}");
        assert_eq!(std::fs::read(victim.join("precious")).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1);
        drop((executor, again));
    }
}
