//! The `fleetrun` command line against a real cluster: exit statuses, JSON output, live
//! following, termination, a terminal session; and the `stream_job` endpoint it follows.

use std::{collections::HashMap, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_tests::{TestCluster, eventually, fleetrun_bin, host_results, start_cluster};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    time::{Instant, timeout},
};

/// `fleetrun ARGS` set up to use the cluster (through its cluster.json), with nothing from the
/// caller's environment that could change its settings.
fn fleetrun(cluster: &TestCluster, args: &[&str]) -> Command {
    let mut cmd = Command::new(fleetrun_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLEETRUN_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("FLEETRUN_CLUSTER", cluster.dir().join("cluster.json"))
        .env("XDG_CONFIG_HOME", cluster.dir())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

struct Finished {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn run_to_end(mut cmd: Command) -> Result<Finished> {
    let output = timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("fleetrun did not finish within 60 s")??;
    Ok(Finished {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

fn ids(cluster: &TestCluster) -> String {
    cluster
        .host_ids()
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Fails on one agent only: the script's path and working directory name the agent that runs it.
const FAIL_ON_AGENT_2: &str =
    "case \"$0 $(pwd) $(cat /proc/self/cgroup)\" in *agent-2*) echo bad; exit 3;; esac; echo fine";

#[tokio::test(flavor = "multi_thread")]
async fn exit_statuses_and_json_say_how_the_job_went() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = ids(&cluster);

    let ok = run_to_end(fleetrun(
        &cluster,
        &["run", "--host", &hosts, "-c", "echo ok"],
    ))
    .await?;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("succeeded on 2 hosts"), "{}", ok.stdout);
    assert!(
        ok.stdout.contains("2 hosts ("),
        "identical outputs fold: {}",
        ok.stdout
    );

    let failed = run_to_end(fleetrun(
        &cluster,
        &[
            "run",
            "--host",
            &hosts,
            "-c",
            FAIL_ON_AGENT_2,
            "--output",
            "json",
        ],
    ))
    .await?;
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    let doc: Value = serde_json::from_str(&failed.stdout)
        .with_context(|| format!("--output json is one JSON document: {}", failed.stdout))?;
    assert_eq!(doc["status"], 4, "{doc}");
    assert_eq!(doc["finished"], true);
    let by_ip: HashMap<&str, &Value> = doc["hosts"]
        .as_array()
        .context("hosts")?
        .iter()
        .map(|h| (h["ip"].as_str().unwrap_or(""), h))
        .collect();
    let agent = |name: &str| {
        let ip = cluster
            .agents
            .iter()
            .find(|a| a.agent_id == name)
            .unwrap()
            .ip
            .to_string();
        by_ip[ip.as_str()]
    };
    assert_eq!(agent("agent-2")["status"], 104, "{doc}");
    assert_eq!(agent("agent-2")["exit_code"], 3);
    assert_eq!(agent("agent-2")["output"], "bad\n");
    assert_eq!(agent("agent-2")["outcome"], "failed with exit code 3");
    assert_eq!(agent("agent-1")["status"], 9);
    assert_eq!(agent("agent-1")["exit_code"], 0);
    assert_eq!(agent("agent-1")["output"], "fine\n");

    // The other commands, on the failed job.
    let job = doc["job_instance_id"].to_string();
    let status = run_to_end(fleetrun(&cluster, &["status", &job])).await?;
    assert_eq!(status.code, 1, "{}{}", status.stdout, status.stderr);
    assert!(
        status.stdout.contains("failed with exit code 3"),
        "{}",
        status.stdout
    );
    let agent_2 = agent("agent-2")["bk_host_id"].to_string();
    let log = run_to_end(fleetrun(&cluster, &["logs", &job, "--host", &agent_2])).await?;
    assert_eq!(log.stdout, "bad\n", "one host's log as it is");
    let jobs = run_to_end(fleetrun(&cluster, &["jobs", "-o", "json"])).await?;
    let jobs: Value = serde_json::from_str(&jobs.stdout)?;
    assert_eq!(
        jobs["data"][0]["job_instance_id"].to_string(),
        job,
        "{jobs}"
    );
    let online = run_to_end(fleetrun(&cluster, &["hosts", "--online", "-o", "json"])).await?;
    let online: Value = serde_json::from_str(&online.stdout)?;
    assert_eq!(online.as_array().map(Vec::len), Some(2), "{online}");

    let refused = run_to_end(fleetrun(
        &cluster,
        &[
            "run",
            "--host",
            &hosts,
            "-c",
            "true",
            "--as",
            "no-such-account",
        ],
    ))
    .await?;
    assert_eq!(refused.code, 3, "{}", refused.stderr);
    assert!(refused.stderr.contains("1244003"), "{}", refused.stderr);

    let unreachable = run_to_end(fleetrun(
        &cluster,
        &[
            "run",
            "--url",
            "http://127.0.0.1:1",
            "--host",
            "1",
            "-c",
            "true",
        ],
    ))
    .await?;
    assert_eq!(unreachable.code, 4, "{}", unreachable.stderr);
    assert!(
        !unreachable.stderr.contains(&cluster.info.bk_app_secret),
        "the secret is never printed: {}",
        unreachable.stderr
    );

    let usage = run_to_end(fleetrun(&cluster, &["run", "-c", "true"])).await?;
    assert_eq!(
        usage.code, 2,
        "no target is a usage error: {}",
        usage.stderr
    );
    Ok(())
}

/// Reads lines of a child's stdout, each within what is left of a deadline.
struct LineReader {
    lines: Lines<BufReader<ChildStdout>>,
    deadline: Instant,
}

impl LineReader {
    fn new(child: &mut Child, limit: Duration) -> Self {
        let stdout = child.stdout.take().expect("stdout piped");
        Self {
            lines: BufReader::new(stdout).lines(),
            deadline: Instant::now() + limit,
        }
    }

    async fn next_event(&mut self) -> Result<Option<Value>> {
        let line = tokio::time::timeout_at(self.deadline, self.lines.next_line())
            .await
            .context("no line before the deadline")??;
        line.map(|l| serde_json::from_str(&l).with_context(|| format!("not JSON: {l}")))
            .transpose()
    }

    /// Events until one matches; returns every event read, the match last.
    async fn until(&mut self, what: &str, found: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
        let mut seen = Vec::new();
        loop {
            let Some(event) = self.next_event().await? else {
                bail!("{what}: the stream ended first: {seen:?}");
            };
            let hit = found(&event);
            seen.push(event);
            if hit {
                return Ok(seen);
            }
        }
    }
}

fn is_output(event: &Value, text: &str) -> bool {
    event["type"] == "output" && event["data"].as_str().is_some_and(|d| d.contains(text))
}

fn is_final(event: &Value) -> bool {
    event["type"] == "job" && event["finished"] == true
}

#[tokio::test(flavor = "multi_thread")]
async fn run_follows_output_while_the_script_still_runs() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let mut child = fleetrun(
        &cluster,
        &[
            "run",
            "--host",
            &ids(&cluster),
            "-c",
            "echo first; sleep 3; echo second",
            "--output",
            "jsonl",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()?;
    let mut reader = LineReader::new(&mut child, Duration::from_secs(30));
    let submitted = reader.next_event().await?.context("a first line")?;
    assert_eq!(submitted["type"], "submitted", "{submitted}");
    let job = submitted["job_instance_id"].as_i64().context("job id")?;

    let before = reader
        .until("first output", |e| is_output(e, "first"))
        .await?;
    assert!(!before.iter().any(is_final), "{before:?}");
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    let status = cluster
        .client()
        .call("get_job_instance_status", query)
        .await?;
    assert_eq!(
        status["finished"], false,
        "`first` must arrive while the job runs"
    );

    let after = reader.until("the end", is_final).await?;
    assert!(after.iter().any(|e| is_output(e, "second")), "{after:?}");
    assert_eq!(after.last().unwrap()["status"], 3);
    assert!(
        reader.next_event().await?.is_none(),
        "nothing after the final event"
    );
    let code = timeout(Duration::from_secs(10), child.wait()).await??;
    assert_eq!(code.code(), Some(0));
    Ok(())
}

/// Calls `stream_job` and returns its events, the error envelope's JSON if it answered with one,
/// or stops after `stop` matches.
async fn stream(
    cluster: &TestCluster,
    query: Value,
    stop: impl Fn(&Value) -> bool,
) -> Result<Vec<Value>> {
    let mut body = cluster.info.scope();
    body["bk_app_code"] = json!(cluster.info.bk_app_code);
    body["bk_app_secret"] = json!(cluster.info.bk_app_secret);
    body["bk_username"] = json!("tester");
    for (k, v) in query.as_object().context("query object")? {
        body[k] = v.clone();
    }
    let mut response = reqwest::Client::new()
        .post(format!("{}/fleetrun/v1/stream_job", cluster.info.api_url))
        .json(&body)
        .send()
        .await?;
    let ndjson = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
    if !ndjson {
        return Ok(vec![response.json().await?]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line)?;
            let done = stop(&event);
            events.push(event);
            if done {
                return Ok(events);
            }
        }
        match tokio::time::timeout_at(deadline, response.chunk()).await?? {
            Some(bytes) => buffer.extend_from_slice(&bytes),
            None => return Ok(events),
        }
    }
}

/// The output of one host, concatenated, and whether any event repeated bytes.
fn output_of(events: &[Value], host: i64) -> (String, i64) {
    let mut text = String::new();
    let mut next = -1;
    for e in events
        .iter()
        .filter(|e| e["type"] == "output" && e["bk_host_id"] == host)
    {
        let offset = e["offset"].as_i64().unwrap();
        assert!(offset >= next, "bytes sent twice: {e} after {next}");
        next = e["next_offset"].as_i64().unwrap();
        text.push_str(e["data"].as_str().unwrap());
    }
    (text, next)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_resumes_from_offsets_without_repeats() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let (job, _, _) = cluster
        .run_job(cluster.script_request("printf 'line1\\nline2\\nline3\\n'", &hosts, json!({})))
        .await?;

    // A finished job: everything, then the final event, and the stream ends.
    let all = stream(&cluster, json!({"job_instance_id": job}), |_| false).await?;
    assert!(is_final(all.last().unwrap()), "{all:?}");
    assert_eq!(
        all.iter().filter(|e| e["type"] == "host").count(),
        2,
        "{all:?}"
    );
    for host in &hosts {
        assert_eq!(output_of(&all, *host).0, "line1\nline2\nline3\n");
    }
    // From byte 8 of one host (inside a chunk) and the end of the other.
    let offsets = format!("{}:8,{}:18", hosts[0], hosts[1]);
    let resumed = stream(
        &cluster,
        json!({"job_instance_id": job, "offsets": offsets}),
        |_| false,
    )
    .await?;
    assert_eq!(output_of(&resumed, hosts[0]).0, "ne2\nline3\n");
    assert_eq!(output_of(&resumed, hosts[1]).0, "");
    assert!(is_final(resumed.last().unwrap()));

    // A running job: drop the connection after the first line, resume from where it stopped.
    let accepted = cluster
        .client()
        .call(
            "fast_execute_script",
            cluster.script_request("echo a; sleep 2; echo b", &hosts[..1], json!({})),
        )
        .await?;
    let running = accepted["job_instance_id"].as_i64().unwrap();
    let first = stream(&cluster, json!({"job_instance_id": running}), |e| {
        is_output(e, "a")
    })
    .await?;
    assert!(!first.iter().any(is_final));
    let (text, next) = output_of(&first, hosts[0]);
    assert_eq!(text, "a\n");
    let rest = stream(
        &cluster,
        json!({"job_instance_id": running, "offsets": format!("{}:{next}", hosts[0])}),
        |_| false,
    )
    .await?;
    assert_eq!(output_of(&rest, hosts[0]).0, "b\n", "{rest:?}");
    assert_eq!(rest.last().unwrap()["status"], 3);

    // Refusals before the stream starts are ordinary envelopes.
    let unknown = stream(&cluster, json!({"job_instance_id": 999_999}), |_| false).await?;
    assert_eq!(unknown[0]["code"], 1_244_006, "{unknown:?}");
    let bad = stream(
        &cluster,
        json!({"job_instance_id": job, "offsets": "x"}),
        |_| false,
    )
    .await?;
    assert_eq!(bad[0]["code"], 1_240_003, "{bad:?}");
    let wrong = stream(
        &cluster,
        json!({"job_instance_id": job, "bk_app_secret": "nope"}),
        |_| false,
    )
    .await?;
    assert_eq!(wrong[0]["code"], 1_640_001, "{wrong:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_terminates_a_running_job() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let mut run = fleetrun(
        &cluster,
        &[
            "run",
            "--host",
            &ids(&cluster),
            "-c",
            "echo started; sleep 60",
            "-o",
            "jsonl",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()?;
    let mut reader = LineReader::new(&mut run, Duration::from_secs(40));
    let submitted = reader.next_event().await?.context("submitted")?;
    let job = submitted["job_instance_id"].as_i64().context("job id")?;
    reader.until("started", |e| is_output(e, "started")).await?;

    let killed = run_to_end(fleetrun(&cluster, &["kill", &job.to_string()])).await?;
    assert_eq!(killed.code, 0, "{}{}", killed.stdout, killed.stderr);
    assert!(
        killed.stdout.contains("terminate success"),
        "{}",
        killed.stdout
    );

    let end = reader.until("the end", is_final).await?;
    assert_eq!(end.last().unwrap()["status"], 11, "{end:?}");
    assert!(
        end.iter()
            .any(|e| e["type"] == "host" && e["status"] == 403),
        "{end:?}"
    );
    let code = timeout(Duration::from_secs(10), run.wait()).await??;
    assert_eq!(code.code(), Some(1), "a terminated host is not a success");
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(10))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 403);
    Ok(())
}

/// Removes terminal escape sequences, to read a captured screen or pty stream as text. A
/// carriage return starts a new line: the progress line is redrawn over itself with them.
fn strip_escapes(raw: &str) -> String {
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c == '\r' {
            text.push('\n');
        } else {
            text.push(c);
        }
    }
    text
}

/// A terminal for `fleetrun`: a tmux session when tmux is installed, else `script`'s pty.
enum Terminal {
    Tmux {
        socket: String,
    },
    Script {
        child: Child,
        seen: std::sync::Arc<std::sync::Mutex<String>>,
    },
}

impl Terminal {
    async fn start(dir: &Path, script: &Path) -> Result<Self> {
        // FLEETRUN_TEST_TERMINAL=script tries the fallback where tmux is installed.
        let have_tmux = std::env::var("FLEETRUN_TEST_TERMINAL").as_deref() != Ok("script")
            && std::process::Command::new("which")
                .arg("tmux")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if have_tmux {
            let socket = format!("fleetrun-test-{}", std::process::id());
            let status = Command::new("tmux")
                .args([
                    "-L",
                    &socket,
                    "new-session",
                    "-d",
                    "-s",
                    "cli",
                    "-x",
                    "160",
                    "-y",
                    "50",
                ])
                .arg(format!("sh {}; sleep 600", script.display()))
                .current_dir(dir)
                .status()
                .await?;
            ensure!(status.success(), "tmux new-session failed");
            return Ok(Self::Tmux { socket });
        }
        let mut child = Command::new("script")
            .args(["-qfec", &format!("sh {}", script.display()), "/dev/null"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("neither tmux nor script (util-linux) is available")?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Self::Script { child, seen })
    }

    /// What the terminal shows (tmux) or has received so far (script), without escapes.
    async fn text(&self) -> String {
        match self {
            Self::Tmux { socket } => {
                let out = Command::new("tmux")
                    .args(["-L", socket, "capture-pane", "-p", "-t", "cli"])
                    .output()
                    .await;
                out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            }
            Self::Script { seen, .. } => strip_escapes(&seen.lock().unwrap()),
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        match self {
            Self::Tmux { socket } => {
                let _ = std::process::Command::new("tmux")
                    .args(["-L", socket, "kill-server"])
                    .status();
            }
            Self::Script { child, .. } => {
                let _ = child.start_kill();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_shows_a_progress_line_and_output_prefixed_by_host() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let script = cluster.dir().join("terminal.sh");
    std::fs::write(
        &script,
        format!(
            "unset NO_COLOR FLEETRUN_URL FLEETRUN_APP_CODE FLEETRUN_APP_SECRET FLEETRUN_USERNAME FLEETRUN_SCOPE\n\
             export FLEETRUN_CLUSTER='{}'\n\
             '{}' run --host {} -c 'echo first; sleep 3; echo second'\n\
             echo \"EXIT=$?\"\n",
            cluster.dir().join("cluster.json").display(),
            fleetrun_bin().display(),
            ids(&cluster),
        ),
    )?;
    let terminal = Terminal::start(cluster.dir(), &script).await?;
    let ips: Vec<String> = cluster.agents.iter().map(|a| a.ip.to_string()).collect();
    let prefixed = |text: &str, word: &str| {
        ips.iter().all(|ip| {
            text.lines()
                .map(str::trim_end)
                .any(|l| l.starts_with(&format!("{ip} | ")) && l.ends_with(word))
        })
    };

    let running = eventually(
        Duration::from_secs(20),
        "progress line and first lines",
        || async {
            let text = terminal.text().await;
            (prefixed(&text, "first") && text.contains("2 running")).then_some(text)
        },
    )
    .await?;
    assert!(running.contains("0 succeeded"), "{running}");
    assert!(running.contains("0/2 done"), "{running}");

    let ended = eventually(Duration::from_secs(20), "the summary", || async {
        let text = terminal.text().await;
        text.contains("EXIT=").then_some(text)
    })
    .await?;
    assert!(ended.contains("EXIT=0"), "{ended}");
    assert!(prefixed(&ended, "second"), "{ended}");
    assert!(ended.contains("succeeded on 2 hosts"), "{ended}");
    Ok(())
}

/// `fleetrun ARGS` run to its end, with its exit status checked.
async fn expect(cluster: &TestCluster, args: &[&str], code: i32) -> Result<Finished> {
    let done = run_to_end(fleetrun(cluster, args)).await?;
    ensure!(
        done.code == code,
        "fleetrun {args:?} exited {} (expected {code}):\n{}{}",
        done.code,
        done.stdout,
        done.stderr
    );
    Ok(done)
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_topology_and_inventory_from_the_command_line() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let host = cluster.host_ids()[0].to_string();
    let dir = cluster.dir();
    let first = dir.join("cli-library.sh");
    std::fs::write(&first, "echo \"from the library: v1\"\n")?;

    // Create (the language from the extension), list, publish, run by script id.
    let created = expect(
        &cluster,
        &[
            "scripts",
            "create",
            "--name",
            "cli-library",
            "--version",
            "v1",
            first.to_str().unwrap(),
            "--description",
            "made by the CLI test",
            "-o",
            "json",
        ],
        0,
    )
    .await?;
    let created: Value = serde_json::from_str(&created.stdout)?;
    let script = created["script_id"]
        .as_str()
        .context("script_id")?
        .to_owned();
    let v1 = created["id"].to_string();
    assert_eq!(created["script_language"], 1, "{created}");
    assert_eq!(created["status"], 0, "a new script is a draft: {created}");

    let listed = expect(&cluster, &["scripts", "list", "--name", "cli-lib"], 0).await?;
    let row = listed
        .stdout
        .lines()
        .find(|l| l.starts_with(&script))
        .with_context(|| format!("the script is listed: {}", listed.stdout))?;
    assert!(
        row.contains("cli-library") && row.contains("shell"),
        "{row}"
    );
    let python = expect(
        &cluster,
        &["scripts", "list", "--lang", "python", "-o", "json"],
        0,
    )
    .await?;
    let python: Value = serde_json::from_str(&python.stdout)?;
    assert_eq!(python["total"], 0, "{python}");

    let published = expect(&cluster, &["scripts", "publish", &script, &v1], 0).await?;
    assert!(published.stdout.contains("online"), "{}", published.stdout);
    let ran = expect(
        &cluster,
        &["run", "--script-id", &script, "--host", &host],
        0,
    )
    .await?;
    assert!(
        ran.stdout.contains("from the library: v1"),
        "{}",
        ran.stdout
    );

    // A second version, published: the first goes offline.
    let second = dir.join("cli-library-2.sh");
    let v2_text = "echo \"from the library: v2\"\n";
    std::fs::write(&second, v2_text)?;
    let added = expect(
        &cluster,
        &[
            "scripts",
            "add-version",
            &script,
            "--version",
            "v2",
            second.to_str().unwrap(),
            "-q",
        ],
        0,
    )
    .await?;
    let v2 = added.stdout.trim().to_owned();
    ensure!(
        v2.parse::<i64>().is_ok(),
        "-q prints the version id: {v2:?}"
    );
    expect(&cluster, &["scripts", "publish", &script, &v2], 0).await?;
    let versions = expect(&cluster, &["scripts", "versions", &script], 0).await?;
    let status_of = |id: &str| {
        versions
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_owned())
    };
    assert_eq!(
        status_of(&v1).as_deref(),
        Some("offline"),
        "{}",
        versions.stdout
    );
    assert_eq!(
        status_of(&v2).as_deref(),
        Some("online"),
        "{}",
        versions.stdout
    );
    let shown = expect(&cluster, &["scripts", "show", &v2], 0).await?;
    assert_eq!(shown.stdout, v2_text, "the content alone on stdout");
    assert!(
        shown.stderr.contains("v2"),
        "details on stderr: {}",
        shown.stderr
    );
    let shown = expect(&cluster, &["scripts", "show", &v2, "-o", "json"], 0).await?;
    let shown: Value = serde_json::from_str(&shown.stdout)?;
    assert_eq!(shown["content_text"], v2_text, "{shown}");

    // A disabled version does not run: the controller refuses (1244018), exit 3.
    let disabled = expect(&cluster, &["scripts", "disable", &script, &v1], 0).await?;
    assert!(disabled.stdout.contains("disabled"), "{}", disabled.stdout);
    let refused = expect(
        &cluster,
        &["run", "--script-version", &v1, "--host", &host],
        3,
    )
    .await?;
    assert!(refused.stderr.contains("1244018"), "{}", refused.stderr);
    let unknown = expect(&cluster, &["scripts", "versions", "no-such-script"], 3).await?;
    assert!(unknown.stderr.contains("1243001"), "{}", unknown.stderr);
    expect(&cluster, &["scripts", "show", "999999"], 3).await?;

    // The topology: business 2 with module 110, as JSON and as a tree.
    let topology = expect(&cluster, &["topology", "--output", "json"], 0).await?;
    let topology: Value = serde_json::from_str(&topology.stdout)?;
    let business = topology["businesses"]
        .as_array()
        .context("businesses")?
        .iter()
        .find(|b| b["bk_biz_id"] == 2)
        .with_context(|| format!("business 2: {topology}"))?;
    assert!(
        business["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .any(|n| n["bk_obj_id"] == "module" && n["bk_inst_id"] == 110),
        "{business}"
    );
    let tree = expect(&cluster, &["topology"], 0).await?;
    assert!(
        tree.stdout.contains("business 2 ") && tree.stdout.contains("    module 110 "),
        "{}",
        tree.stdout
    );

    // Reloading the inventory: fine as it is; an invalid line is refused and named.
    let reloaded = expect(&cluster, &["inventory", "reload"], 0).await?;
    assert!(reloaded.stdout.contains("unchanged"), "{}", reloaded.stdout);
    let path = dir.join("inventory.toml");
    let original = std::fs::read_to_string(&path)?;
    std::fs::write(&path, format!("{original}\nthis is not toml\n"))?;
    let invalid = expect(&cluster, &["inventory", "reload"], 3).await?;
    assert!(invalid.stderr.contains("line"), "{}", invalid.stderr);
    assert!(invalid.stderr.contains("1240003"), "{}", invalid.stderr);
    Ok(())
}
