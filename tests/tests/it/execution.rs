//! What a script experiences on a real agent, and what the API reports about it: languages,
//! parameters, accounts, timeouts and termination of whole process trees, exit codes and signals,
//! output order, binary and huge output, sensitive parameters, and concurrency.

use std::{
    path::Path,
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, b64, eventually, host_results, start_cluster};
use serde_json::{Value, json};

/// The PATH the agent looks interpreters up on.
const SANE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const TEST_USER: &str = "fleetrun-user";
const TEST_GROUP: &str = "fleetrun-extra";

/// A string no other test (or earlier run) uses.
fn unique() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000_000
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn getent(db: &str, key: &str) -> Option<String> {
    let out = Command::new("getent").args([db, key]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn run_cmd(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// Makes sure `fleetrun-user` exists with the supplementary group `fleetrun-extra` (as `.ci/run`
/// does), once per test binary.
fn ensure_test_user_and_group() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if getent("group", TEST_GROUP).is_none() {
            run_cmd("groupadd", &["-f", TEST_GROUP]);
        }
        if getent("passwd", TEST_USER).is_none() {
            run_cmd("useradd", &["-m", "-s", "/bin/bash", TEST_USER]);
        }
        run_cmd("usermod", &["-aG", TEST_GROUP, TEST_USER]);
    });
}

/// (home, shell) of a user, from passwd.
fn passwd_home_shell(user: &str) -> (String, String) {
    let entry = getent("passwd", user).unwrap_or_else(|| panic!("no passwd entry for {user}"));
    let fields: Vec<&str> = entry.split(':').collect();
    (fields[5].to_owned(), fields[6].to_owned())
}

fn installed(name: &str) -> bool {
    SANE_PATH
        .split(':')
        .any(|dir| Path::new(dir).join(name).is_file())
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z" | "X"))
    })
}

/// Whether `/proc/<pid>` still exists (a zombie nobody reaped counts).
fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Live processes (not this one) whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let text: String = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                text.contains(needle)
            })
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// The one process whose command line names `config`.
fn pid_of(config: &Path) -> Result<i32> {
    let pids = processes_with(&config.display().to_string());
    ensure!(
        pids.len() == 1,
        "processes for {}: {pids:?}",
        config.display()
    );
    Ok(pids[0])
}

/// Peak resident set size of a process, in KiB.
fn vm_hwm_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

/// Submits a job; returns (job, step).
async fn submit(cluster: &TestCluster, request: Value) -> Result<(i64, i64)> {
    let accepted = cluster
        .client()
        .call("fast_execute_script", request)
        .await?;
    Ok((
        accepted["job_instance_id"]
            .as_i64()
            .context("job_instance_id")?,
        accepted["step_instance_id"]
            .as_i64()
            .context("step_instance_id")?,
    ))
}

/// Waits for a job to finish; returns its status data.
async fn finish(cluster: &TestCluster, job: i64, limit: Duration) -> Result<Value> {
    cluster
        .client()
        .wait_job(&cluster.info.scope(), job, limit)
        .await
}

/// The job's status data, with host results, now.
async fn job_status(cluster: &TestCluster, job: i64) -> Result<Value> {
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    cluster
        .client()
        .call("get_job_instance_status", query)
        .await
}

/// One host's log of a step.
async fn host_log(cluster: &TestCluster, job: i64, step: i64, host: i64) -> Result<String> {
    let logs = cluster.logs(job, step).await?;
    logs.into_iter()
        .find(|(id, _)| *id == host)
        .map(|(_, log)| log)
        .with_context(|| format!("no log for host {host}"))
}

/// A job's single host result.
fn only_host(status: &Value) -> Value {
    let results = host_results(status);
    assert_eq!(results.len(), 1, "{status}");
    results[0].clone()
}

/// Runs each request at once on the cluster, waits for all, and returns (status, log of the
/// first host) per request, in order.
async fn run_all(
    cluster: &TestCluster,
    requests: Vec<Value>,
    limit: Duration,
) -> Result<Vec<(Value, String)>> {
    let host = cluster.host_ids()[0];
    let mut submitted = Vec::new();
    for request in requests {
        submitted.push(submit(cluster, request).await?);
    }
    let mut done = Vec::new();
    for (job, step) in submitted {
        let status = finish(cluster, job, limit).await?;
        let log = host_log(cluster, job, step, host).await?;
        done.push((status, log));
    }
    Ok(done)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_language_runs_with_its_interpreter_or_names_the_missing_one() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let pwsh = installed("pwsh");
    let cases: [(i64, &str, &str); 5] = [
        (
            1,
            "arr=(a b c); echo \"shell says ${#arr[@]} $((6*7))\"\n",
            "shell says 3 42\n",
        ),
        (2, "@echo off\r\necho bat\r\n", ""),
        (
            3,
            "my @a = map { $_ * 2 } (1..3);\nprintf(\"perl %s says %d\\n\", join(\",\", @a), 6*7);\n",
            "perl 2,4,6 says 42\n",
        ),
        (
            4,
            "import sys\nprint(f\"python {sys.version_info.major} says {6*7}\", [x * 2 for x in range(1, 4)])\n",
            "python 3 says 42 [2, 4, 6]\n",
        ),
        (5, "Write-Output \"pwsh says $(6*7)\"\n", "pwsh says 42\n"),
    ];
    let requests = cases
        .iter()
        .map(|(language, script, _)| {
            cluster.script_request(script, &hosts, json!({"script_language": language}))
        })
        .collect();
    // Missing interpreters must end quickly, never hang.
    let results = run_all(&cluster, requests, Duration::from_secs(20)).await?;
    for ((language, _, expected), (status, log)) in cases.iter().zip(&results) {
        let result = only_host(status);
        let missing = match language {
            2 => Some("cmd.exe"),
            5 if !pwsh => Some("pwsh"),
            _ => None,
        };
        match missing {
            None => {
                assert_eq!(result["status"], 9, "language {language}: {result}");
                assert_eq!(status["job_instance"]["status"], 3, "language {language}");
                assert_eq!(log, expected, "language {language}");
            }
            Some(interpreter) => {
                assert_eq!(result["status"], 101, "language {language}: {result}");
                assert_eq!(status["job_instance"]["status"], 4, "language {language}");
                assert!(
                    log.lines()
                        .any(|l| l.starts_with("[fleetrun] ") && l.contains(interpreter)),
                    "language {language}: the log must name {interpreter}: {log:?}"
                );
                assert_eq!(log.lines().count(), 1, "language {language}: {log:?}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn parameters_arrive_literally_and_nothing_is_expanded() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let pwned = format!("/tmp/fleetrun-pwned-{}", unique());
    let param = format!("'a b' \"c d\" $(touch {pwned}) $HOME *");
    let expected = format!("[a b]\n[c d]\n[$(touch]\n[{pwned})]\n[$HOME]\n[*]\n");
    let scripts = [
        (1, "printf '[%s]\\n' \"$@\"\n"),
        (3, "print \"[$_]\\n\" for @ARGV;\n"),
        (
            4,
            "import sys\nfor a in sys.argv[1:]:\n    print(f\"[{a}]\")\n",
        ),
    ];
    let requests = scripts
        .iter()
        .map(|(language, script)| {
            cluster.script_request(
                script,
                &hosts,
                json!({"script_language": language, "script_param": b64(&param)}),
            )
        })
        .collect();
    let results = run_all(&cluster, requests, Duration::from_secs(20)).await?;
    for ((language, _), (status, log)) in scripts.iter().zip(&results) {
        assert_eq!(only_host(status)["status"], 9, "language {language}");
        assert_eq!(log, &expected, "language {language}");
    }
    assert!(
        !Path::new(&pwned).exists(),
        "{pwned} was created: a parameter was executed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_run_as_the_accounts_user_with_its_groups_environment_and_home() -> Result<()> {
    ensure_test_user_and_group();
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let script = "whoami\nid -Gn\necho \"$HOME $USER $LOGNAME $SHELL\"\npwd\n";
    let as_user = cluster.script_request(script, &hosts, json!({"account_alias": "user"}));
    let mut as_root_by_id = cluster.script_request(script, &hosts, json!({"account_id": 1}));
    as_root_by_id
        .as_object_mut()
        .unwrap()
        .remove("account_alias");
    // bk-job: account_id wins over account_alias.
    let id_wins = cluster.script_request(
        script,
        &hosts,
        json!({"account_id": 1, "account_alias": "user"}),
    );
    let results = run_all(
        &cluster,
        vec![as_user, as_root_by_id, id_wins],
        Duration::from_secs(20),
    )
    .await?;

    let (home, shell) = passwd_home_shell(TEST_USER);
    assert_eq!(home, "/home/fleetrun-user");
    let (status, log) = &results[0];
    assert_eq!(only_host(status)["status"], 9, "{status}\n{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log:?}");
    assert_eq!(lines[0], TEST_USER);
    let groups: Vec<&str> = lines[1].split_whitespace().collect();
    assert!(groups.contains(&TEST_GROUP), "groups: {groups:?}");
    assert!(groups.contains(&TEST_USER), "groups: {groups:?}");
    assert!(!groups.contains(&"root"), "groups: {groups:?}");
    assert_eq!(lines[2], format!("{home} {TEST_USER} {TEST_USER} {shell}"));
    assert_eq!(lines[3], home, "the working directory is the home");

    let (root_home, root_shell) = passwd_home_shell("root");
    for (status, log) in &results[1..] {
        assert_eq!(only_host(status)["status"], 9, "{status}\n{log}");
        assert_eq!(
            log,
            &format!("root\nroot\n{root_home} root root {root_shell}\n{root_home}\n")
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_missing_on_the_host_ends_311_naming_the_user() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    // The account exists in the inventory (reloaded while the controller runs), not on the host.
    let inventory = cluster.dir().join("inventory.toml");
    let mut text = std::fs::read_to_string(&inventory)?;
    text.push_str(
        "\n[[account]]\nid = 9\nalias = \"ghost\"\naccount = \"fleetrun-no-such-user\"\nscopes = [\"biz:2\"]\n",
    );
    std::fs::write(&inventory, text)?;
    cluster.client().fleetrun("reload_inventory").await?;
    assert!(
        getent("passwd", "fleetrun-no-such-user").is_none(),
        "the ghost account must not exist on this machine"
    );

    let request = cluster.script_request(
        "echo must not run",
        &hosts,
        json!({"account_alias": "ghost"}),
    );
    let (job, step) = submit(&cluster, request).await?;
    let status = finish(&cluster, job, Duration::from_secs(20)).await?;
    let result = only_host(&status);
    assert_eq!(result["status"], 311, "{result}");
    assert_eq!(status["job_instance"]["status"], 4);
    let log = host_log(&cluster, job, step, hosts[0]).await?;
    assert!(!log.contains("must not run"), "{log:?}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("[fleetrun] ") && l.contains("fleetrun-no-such-user")),
        "the log must name the user: {log:?}"
    );
    // By id too.
    let mut request = cluster.script_request("echo must not run", &hosts, json!({"account_id": 9}));
    request.as_object_mut().unwrap().remove("account_alias");
    let (job, _) = submit(&cluster, request).await?;
    let status = finish(&cluster, job, Duration::from_secs(20)).await?;
    assert_eq!(only_host(&status)["status"], 311, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_kills_the_whole_process_tree_including_double_forked_grandchildren() -> Result<()>
{
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let marker = format!("fleetrun-timeout-{}", unique());
    let dir = cluster.dir().join("timeout-pids");
    std::fs::create_dir_all(&dir)?;
    let pids_file = dir.join("pids");
    // Five processes, each recording its pid: a background child, a grandchild in a new session
    // whose parent exits at once (so it is re-parented) and its own child, the script itself, and
    // a foreground child.
    let script = format!(
        r#"d='{dir}'
(exec -a {marker} sleep 300) &
echo $! >> "$d/pids"
(setsid bash -c 'echo $$ >> "$0/pids"; (exec -a {marker} sleep 300) & echo $! >> "$0/pids"; exec -a {marker} sleep 300' "$d" &)
echo $$ >> "$d/pids"
while [ "$(wc -l < "$d/pids")" -lt 4 ]; do sleep 0.05; done
(exec -a {marker} sleep 300) &
echo $! >> "$d/pids"
echo started
wait
"#,
        dir = dir.display()
    );
    let request = cluster.script_request(&script, &hosts, json!({"timeout": 2}));
    let (job, step) = submit(&cluster, request).await?;
    let status = finish(&cluster, job, Duration::from_secs(30)).await?;
    let finished_seen = Instant::now();
    let result = only_host(&status);
    assert_eq!(result["status"], 102, "{result}");
    assert_eq!(status["job_instance"]["status"], 4, "{status}");
    let log = host_log(&cluster, job, step, hosts[0]).await?;
    assert_eq!(
        log,
        "started\n[fleetrun] the script timed out and its process tree was killed\n"
    );

    let pids: Vec<i32> = std::fs::read_to_string(&pids_file)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 5, "recorded pids: {pids:?}");
    let gone = eventually(
        Duration::from_secs(5),
        "every process of the timed-out script is gone",
        || {
            let left: Vec<i32> = pids.iter().copied().filter(|&p| exists(p)).collect();
            let marked = processes_with(&marker);
            async move { (left.is_empty() && marked.is_empty()).then(Instant::now) }
        },
    )
    .await;
    if gone.is_err() {
        let left: Vec<(i32, String)> = pids
            .iter()
            .copied()
            .filter(|&p| exists(p))
            .map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                (p, stat)
            })
            .collect();
        let marked = processes_with(&marker);
        // Do not leave them running for the rest of the machine's life.
        for pid in left.iter().map(|(p, _)| p).chain(&marked) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        panic!("survivors of the timeout: recorded {left:?}, marked {marked:?}");
    }
    let gone = gone?;

    let start = result["start_time"].as_i64().context("host start_time")?;
    let expiry = start + 2000;
    let host_end = result["end_time"].as_i64().context("host end_time")?;
    let job_end = status["job_instance"]["end_time"]
        .as_i64()
        .context("job end_time")?;
    println!(
        "timeout: expiry -> host end {} ms, expiry -> job finished {} ms; all pids gone {} ms after the test saw the job finished",
        host_end - expiry,
        job_end - expiry,
        gone.duration_since(finished_seen).as_millis()
    );
    assert!(
        host_end >= expiry,
        "the host ended before its timeout: {result}"
    );
    // sleep dies on SIGTERM, so the kill grace period is not needed.
    assert!(
        job_end - expiry < 3000,
        "the job took {} ms after the timeout to finish",
        job_end - expiry
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_a_running_job_kills_its_scripts_on_every_host() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let marker = format!("fleetrun-marker-{}", unique());
    let request = cluster.script_request(
        &format!("echo started\nexec -a {marker} sleep 300\n"),
        &hosts,
        json!({"timeout": 120}),
    );
    let (job, step) = submit(&cluster, request).await?;
    let scripts = eventually(
        Duration::from_secs(15),
        "both hosts running (7) and both scripts started",
        || async {
            let status = job_status(&cluster, job).await.ok()?;
            let running = host_results(&status)
                .iter()
                .filter(|r| r["status"] == 7)
                .count();
            let scripts = processes_with(&marker);
            (running == 2 && scripts.len() == 2).then_some(scripts)
        },
    )
    .await?;

    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["operation_code"] = json!(1);
    let asked = Instant::now();
    let reply = cluster
        .client()
        .call("operate_job_instance", body.clone())
        .await?;
    assert_eq!(reply["job_instance_id"], job, "{reply}");
    let status = finish(&cluster, job, Duration::from_secs(20)).await?;
    println!(
        "termination: job finished {} ms after operate_job_instance",
        asked.elapsed().as_millis()
    );
    assert_eq!(status["job_instance"]["status"], 11, "{status}");
    let results = host_results(&status);
    assert_eq!(results.len(), 2);
    for result in &results {
        assert_eq!(result["status"], 403, "{result}");
    }
    let survivors = eventually(
        Duration::from_secs(5),
        "no script of the terminated job survives",
        || {
            let left = processes_with(&marker);
            let unreaped = scripts.iter().any(|&p| exists(p));
            async move { (left.is_empty() && !unreaped).then_some(()) }
        },
    )
    .await;
    if survivors.is_err() {
        let left = processes_with(&marker);
        for pid in &left {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let unreaped: Vec<i32> = scripts.iter().copied().filter(|&p| exists(p)).collect();
        panic!("scripts of the terminated job survived: {left:?}; not reaped: {unreaped:?}");
    }
    for (host, log) in cluster.logs(job, step).await? {
        assert!(log.starts_with("started\n"), "host {host}: {log:?}");
    }
    // Terminating it again changes nothing.
    let _ = cluster
        .client()
        .call_raw("operate_job_instance", body)
        .await?;
    let again = job_status(&cluster, job).await?;
    assert_eq!(again["job_instance"]["status"], 11, "{again}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_and_signals_map_to_bk_job_statuses() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let requests = vec![
        cluster.script_request("echo before; exit 3", &hosts, json!({})),
        cluster.script_request("echo before; ulimit -c 0; kill -SEGV $$", &hosts, json!({})),
    ];
    let results = run_all(&cluster, requests, Duration::from_secs(20)).await?;

    let (status, log) = &results[0];
    let result = only_host(status);
    assert_eq!(result["status"], 104, "{result}");
    assert_eq!(result["exit_code"], 3, "{result}");
    assert_eq!(status["job_instance"]["status"], 4);
    assert_eq!(log, "before\n");

    let (status, log) = &results[1];
    let result = only_host(status);
    assert_eq!(result["status"], 101, "{result}");
    assert_eq!(result["exit_code"], 139, "{result}");
    assert_eq!(status["job_instance"]["status"], 4);
    assert!(log.starts_with("before\n"), "{log:?}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("[fleetrun] ") && l.contains("SIGSEGV")),
        "the log must name SIGSEGV: {log:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_and_stderr_interleave_in_the_order_written() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let requests = vec![
        cluster.script_request("echo 1; echo 2 >&2; echo 3; echo 4 >&2", &hosts, json!({})),
        cluster.script_request(
            "for i in $(seq 1 300); do if [ $((i % 2)) = 0 ]; then echo $i >&2; else echo $i; fi; done",
            &hosts,
            json!({}),
        ),
    ];
    let results = run_all(&cluster, requests, Duration::from_secs(20)).await?;
    assert_eq!(only_host(&results[0].0)["status"], 9);
    assert_eq!(results[0].1, "1\n2\n3\n4\n");
    assert_eq!(only_host(&results[1].0)["status"], 9);
    let expected: String = (1..=300).map(|i| format!("{i}\n")).collect();
    assert_eq!(results[1].1, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_output_is_stored_and_served_with_replacement_characters() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let request = cluster.script_request("printf '\\xff\\xfeok\\n'", &hosts, json!({}));
    let results = run_all(&cluster, vec![request], Duration::from_secs(20)).await?;
    let (status, log) = &results[0];
    assert_eq!(only_host(status)["status"], 9, "{status}");
    assert_eq!(status["job_instance"]["status"], 3);
    assert!(log.contains("ok"), "{log:?}");
    assert_eq!(log, "\u{FFFD}\u{FFFD}ok\n");
    Ok(())
}

/// Line `n` (1-based) of the big-output script: its number, zero-padded to 39 digits.
fn numbered_line(n: u64) -> String {
    format!("{n:039}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn output_of_200_mib_keeps_head_and_tail_with_bounded_memory() -> Result<()> {
    const TOTAL: u64 = 200 * 1024 * 1024;
    const LINE: u64 = 40;
    const LINES: u64 = TOTAL / LINE; // 5_242_880
    const LIMIT: u64 = 5 * 1024 * 1024;
    const KEPT_LINES: u64 = LIMIT / 2 / LINE; // 65_536 at each end
    const NUMBERED: u64 = 70_000; // numbered lines at each end; `x` lines between
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let agent_pid = pid_of(&cluster.agents[0].config)?;
    let controller_pid = pid_of(&cluster.controller_config)?;
    // 40-byte lines: numbered at both ends (checkable), `yes` in the middle (fast).
    let script = format!(
        "seq -f '%039.0f' 1 {NUMBERED}\nyes {x} | head -n {middle}\nseq -f '%039.0f' {tail_from} {LINES}\n",
        x = "x".repeat(39),
        middle = LINES - 2 * NUMBERED,
        tail_from = LINES - NUMBERED + 1,
    );
    let started = Instant::now();
    let request = cluster.script_request(&script, &hosts, json!({"timeout": 120}));
    let (job, step) = submit(&cluster, request).await?;
    let status = finish(&cluster, job, Duration::from_secs(90)).await?;
    let elapsed = started.elapsed();
    let agent_hwm = vm_hwm_kib(agent_pid)?;
    let controller_hwm = vm_hwm_kib(controller_pid)?;
    println!(
        "200 MiB output: job took {elapsed:?}; agent VmHWM {} KiB ({:.1} MiB), controller VmHWM {} KiB ({:.1} MiB)",
        agent_hwm,
        agent_hwm as f64 / 1024.0,
        controller_hwm,
        controller_hwm as f64 / 1024.0
    );
    assert_eq!(only_host(&status)["status"], 9, "{status}");
    assert_eq!(status["job_instance"]["status"], 3);

    let log = host_log(&cluster, job, step, hosts[0]).await?;
    let head: String = (1..=KEPT_LINES).map(numbered_line).collect();
    let tail: String = (LINES - KEPT_LINES + 1..=LINES)
        .map(numbered_line)
        .collect();
    let dropped_bytes = TOTAL - LIMIT;
    let dropped_lines = LINES - 2 * KEPT_LINES;
    let marker = format!(
        "[fleetrun] output truncated here: {dropped_bytes} bytes in {dropped_lines} lines dropped"
    );
    assert!(
        log.len() as u64 <= LIMIT + 300,
        "stored log is {} bytes",
        log.len()
    );
    assert!(
        log.starts_with(&head),
        "the log must start with the first bytes"
    );
    assert!(log.ends_with(&tail), "the log must end with the last bytes");
    let middle = &log[head.len()..log.len() - tail.len()];
    assert_eq!(
        middle.trim_matches('\n'),
        marker,
        "between head and tail only the marker"
    );
    assert_eq!(dropped_bytes, 204_472_320);
    assert!(
        agent_hwm < 64 * 1024,
        "the agent's peak RSS is {agent_hwm} KiB"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sensitive_parameter_never_reaches_the_logs() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let secret = format!("s3cr3t-{}", unique());
    let plain = format!("plain-{}", unique());
    // The script proves it got the value without printing it.
    let script = "printf '%s' \"$1\" | rev; echo";
    let requests = vec![
        cluster.script_request(
            script,
            &hosts,
            json!({"script_param": b64(&secret), "is_param_sensitive": 1}),
        ),
        cluster.script_request(script, &hosts, json!({"script_param": b64(&plain)})),
    ];
    let results = run_all(&cluster, requests, Duration::from_secs(20)).await?;
    for ((status, log), value) in results.iter().zip([&secret, &plain]) {
        assert_eq!(only_host(status)["status"], 9, "{status}");
        assert_eq!(status["job_instance"]["status"], 3);
        let reversed: String = value.chars().rev().collect();
        assert_eq!(log, &format!("{reversed}\n"));
    }
    // Stopping flushes whatever the processes still had to write.
    cluster.stop();
    let controller_log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        !controller_log.contains(&secret),
        "the controller log holds the sensitive parameter"
    );
    let mut agent_logs = String::new();
    for agent in &cluster.agents {
        let text = std::fs::read_to_string(&agent.log)?;
        assert!(
            !text.contains(&secret),
            "{}'s log holds the sensitive parameter",
            agent.agent_id
        );
        agent_logs.push_str(&text);
    }
    // The same check finds a parameter that is not sensitive: the agent logs those.
    assert!(
        agent_logs.contains(&plain) || controller_log.contains(&plain),
        "the check cannot find even a non-sensitive parameter in the logs"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_jobs_on_one_agent_run_in_parallel() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let started = Instant::now();
    let requests = (0..5)
        .map(|_| cluster.script_request("sleep 1; echo done", &hosts, json!({})))
        .collect();
    let submitted_at = now_ms();
    let results = run_all(&cluster, requests, Duration::from_secs(20)).await?;
    let wall = started.elapsed();
    println!("5 concurrent 1 s jobs: {wall:?} wall time");
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for (status, log) in &results {
        let result = only_host(status);
        assert_eq!(result["status"], 9, "{result}");
        assert_eq!(status["job_instance"]["status"], 3);
        assert_eq!(log, "done\n");
        starts.push(result["start_time"].as_i64().context("start_time")?);
        ends.push(result["end_time"].as_i64().context("end_time")?);
    }
    assert!(
        starts.iter().all(|&s| s >= submitted_at - 1000),
        "{starts:?}"
    );
    // Every script started before any finished: they overlapped.
    let last_start = *starts.iter().max().unwrap();
    let first_end = *ends.iter().min().unwrap();
    assert!(
        last_start < first_end,
        "the scripts did not overlap: starts {starts:?}, ends {ends:?}"
    );
    assert!(
        wall < Duration::from_millis(3500),
        "5 parallel 1 s jobs took {wall:?}"
    );
    Ok(())
}
