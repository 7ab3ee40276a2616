//! Timeouts, cancellation and leftovers: nothing a script starts outlives
//! its task, with cgroups and without.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fixture, TEST_USER, alive, collect, read_pids, shared_dir, shell, task, test_user};
use fleetrun_exec::{Ending, Language, Task};
use tokio_util::sync::CancellationToken;

/// Background children, a grandchild under a child, and a `setsid`
/// double-forked daemon; every pid goes to the file named by `$1`.
const TREE: &str = r#"pids=$1
sleep 300 & echo $! >> "$pids"
bash -c 'sleep 301 & echo $! >> "$0"; wait' "$pids" & echo $! >> "$pids"
( setsid bash -c 'sleep 302 & echo $! >> "$0"; echo $$ >> "$0"; wait' "$pids" & )
echo $$ >> "$pids"
echo started
wait
"#;
const TREE_PIDS: usize = 6;

fn tree_task(pid_file: &Path, timeout: Duration) -> Task {
    test_user();
    let mut t = task(Language::Shell, TREE, TEST_USER);
    t.args = vec![pid_file.display().to_string()];
    t.timeout = timeout;
    t
}

/// Every pid is gone from /proc: dead and reaped, not a zombie.
async fn assert_all_gone(pids: &[i32]) {
    common::wait_for(
        "the tree's zombies to be reaped",
        Duration::from_secs(2),
        || {
            pids.iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        },
    )
    .await;
}

async fn timeout_kills_the_whole_tree(use_cgroup: bool) {
    let fixture = Fixture::new(use_cgroup);
    let dir = shared_dir();
    let pid_file = dir.path().join("pids");
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    let running = fixture.start(tree_task(&pid_file, timeout));
    common::wait_for("the tree to start", timeout, || {
        read_pids(&pid_file).len() == TREE_PIDS
    })
    .await;
    let pids = read_pids(&pid_file);
    assert!(pids.iter().all(|&pid| alive(pid)));

    let run = collect(running).await;
    let expiry = start + timeout;
    let to_outcome = expiry.elapsed();
    assert_eq!(run.outcome.ending, Ending::TimedOut, "{}", run.text());
    assert_eq!(run.outcome.survivors, 0);
    assert_eq!(run.text(), "started\n");
    let alive_now: Vec<i32> = pids.iter().copied().filter(|&pid| alive(pid)).collect();
    assert!(alive_now.is_empty(), "still alive: {alive_now:?}");
    let to_gone = expiry.elapsed();
    assert_all_gone(&pids).await;
    println!(
        "cgroup={use_cgroup}: timeout expiry -> outcome {to_outcome:?}, -> last process confirmed gone {to_gone:?}, reaped {:?}",
        expiry.elapsed()
    );
    assert!(
        to_outcome < Duration::from_secs(2),
        "kill took {to_outcome:?}"
    );
    fixture.assert_no_staging();
}

#[tokio::test]
async fn timeout_kills_the_whole_tree_with_cgroup() {
    timeout_kills_the_whole_tree(true).await;
}

#[tokio::test]
async fn timeout_kills_the_whole_tree_without_cgroup() {
    timeout_kills_the_whole_tree(false).await;
}

#[tokio::test]
async fn cancel_kills_the_whole_tree() {
    let fixture = Fixture::new(true);
    let dir = shared_dir();
    let pid_file = dir.path().join("pids");
    let cancel = CancellationToken::new();
    let running = fixture.executor.start(
        tree_task(&pid_file, Duration::from_secs(30)),
        cancel.clone(),
    );
    common::wait_for("the tree to start", Duration::from_secs(10), || {
        read_pids(&pid_file).len() == TREE_PIDS
    })
    .await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let run = collect(running).await;
    println!("cancel -> outcome {:?}", cancelled_at.elapsed());
    assert_eq!(run.outcome.ending, Ending::Cancelled);
    assert_eq!(run.outcome.survivors, 0);
    assert_eq!(run.outcome.log_line(), None);
    assert_all_gone(&read_pids(&pid_file)).await;
    fixture.assert_no_staging();
}

#[tokio::test]
async fn cancelled_before_start_never_runs() {
    let fixture = Fixture::new(true);
    let cancel = CancellationToken::new();
    cancel.cancel();
    let marker = fixture.work_dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    let run = collect(fixture.executor.start(shell(&script), cancel)).await;
    assert_eq!(run.outcome.ending, Ending::Cancelled);
    assert!(!marker.exists());
    fixture.assert_no_staging();
}

/// A daemon that let go of the output does not keep the task open, and is
/// killed when the script exits.
async fn leftovers_are_killed_after_a_normal_exit(use_cgroup: bool) {
    let fixture = Fixture::new(use_cgroup);
    let dir = shared_dir();
    let pid_file = dir.path().join("pids");
    let mut script = String::from("sleep 300 >/dev/null 2>&1 & echo $! >> \"$1\"\n");
    if use_cgroup {
        // Only a cgroup can find a daemon that left the session, was never
        // seen by a scan and closed the output.
        script += "( setsid sleep 301 >/dev/null 2>&1 & echo $! >> \"$1\" )\n";
    }
    script += "echo done\n";
    let mut t = shell(&script);
    t.args = vec![pid_file.display().to_string()];
    let start = Instant::now();
    let run = fixture.run(t).await;
    assert_eq!(run.outcome.ending, Ending::Exited(0));
    assert_eq!(run.outcome.survivors, 0);
    assert_eq!(run.text(), "done\n");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    let pids = read_pids(&pid_file);
    assert_eq!(pids.len(), if use_cgroup { 2 } else { 1 });
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn leftovers_are_killed_after_a_normal_exit_with_cgroup() {
    leftovers_are_killed_after_a_normal_exit(true).await;
}

#[tokio::test]
async fn leftovers_are_killed_after_a_normal_exit_without_cgroup() {
    leftovers_are_killed_after_a_normal_exit(false).await;
}

/// The task lasts until the output pipe closes, not just until the main
/// process exits.
#[tokio::test]
async fn waits_for_a_child_still_writing() {
    let fixture = Fixture::new(true);
    let start = Instant::now();
    let run = fixture
        .run(shell("(sleep 1; echo late; exit 7) & echo early"))
        .await;
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert_eq!(run.text(), "early\nlate\n");
    assert_eq!(run.outcome.ending, Ending::Exited(0));
}

#[tokio::test]
async fn a_stopped_process_is_still_killed() {
    let fixture = Fixture::new(true);
    let mut t = shell("sleep 300 & kill -STOP $!; echo stopped; wait");
    t.timeout = Duration::from_millis(300);
    let run = fixture.run(t).await;
    assert_eq!(run.outcome.ending, Ending::TimedOut);
    assert_eq!(run.outcome.survivors, 0);
}

#[tokio::test]
async fn a_process_ignoring_sigterm_gets_sigkill_after_the_grace() {
    let fixture = Fixture::new(true);
    let mut t = shell("trap '' TERM; echo ready; while :; do sleep 0.05; done");
    t.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let run = fixture.run(t).await;
    let took = start.elapsed();
    assert_eq!(run.outcome.ending, Ending::TimedOut);
    assert_eq!(run.outcome.survivors, 0);
    // 0.3 s timeout + 2 s grace, then SIGKILL.
    assert!(took >= Duration::from_millis(2300), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test]
async fn many_tasks_at_once_stay_apart() {
    test_user();
    let fixture = Fixture::new(true);
    let running: Vec<_> = (0..8)
        .map(|n| {
            let account = if n % 2 == 0 { "root" } else { TEST_USER };
            let script = "for i in $(seq 1 300); do echo \"$1 $i\"; done; sleep 0.2";
            let mut t = task(Language::Shell, script, account);
            t.args = vec![format!("task{n}")];
            fixture.start(t)
        })
        .collect();
    let mut handles = Vec::new();
    for r in running {
        handles.push(tokio::spawn(collect(r)));
    }
    for (n, handle) in handles.into_iter().enumerate() {
        let run = handle.await.unwrap();
        let expected: String = (1..=300).map(|i| format!("task{n} {i}\n")).collect();
        assert_eq!(run.text(), expected);
        assert_eq!(run.outcome.ending, Ending::Exited(0));
    }
    fixture.assert_no_staging();
}
