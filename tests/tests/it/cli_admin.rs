//! The inventory's administration through the `fleetrun` command line against a real cluster:
//! a business built entry by entry and used at once, refusals and their exit statuses, the
//! document's revisions, dynamic groups written as `--where` conditions, and the other entries.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, fleetrun_bin, start_cluster};
use serde_json::Value;
use tokio::{process::Command, time::timeout};

struct Finished {
    stdout: String,
    stderr: String,
}

/// `fleetrun ARGS` against the cluster (through its cluster.json, nothing from the caller's
/// environment), run to its end; fails unless it exits with `code`.
async fn fleetrun(cluster: &TestCluster, args: &[&str], code: i32) -> Result<Finished> {
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
    let output = timeout(Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("fleetrun {args:?} did not finish within 60 s"))??;
    let done = Finished {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let exited = output.status.code().unwrap_or(-1);
    ensure!(
        exited == code,
        "fleetrun {args:?} exited {exited} (expected {code}):\n{}{}",
        done.stdout,
        done.stderr
    );
    Ok(done)
}

async fn json_of(cluster: &TestCluster, args: &[&str]) -> Result<Value> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let done = fleetrun(cluster, &args, 0).await?;
    serde_json::from_str(&done.stdout)
        .with_context(|| format!("fleetrun {args:?} printed no JSON: {}", done.stdout))
}

/// The current revision, from the history.
async fn current_revision(cluster: &TestCluster) -> Result<i64> {
    let history = json_of(cluster, &["inventory", "history", "--limit", "1"]).await?;
    history[0]["revision"]
        .as_i64()
        .with_context(|| format!("no revision in {history}"))
}

/// "revision N: SUMMARY", as every command that changes one entry prints it.
fn revision_line(done: &Finished) -> Result<(i64, String)> {
    let line = done.stdout.trim_end();
    let (revision, summary) = line
        .strip_prefix("revision ")
        .and_then(|rest| rest.split_once(": "))
        .with_context(|| format!("not \"revision N: SUMMARY\": {line:?}"))?;
    Ok((revision.parse()?, summary.to_owned()))
}

/// The hosts a `run -o json` reached, by id.
fn reached(run: &Value) -> Vec<i64> {
    let mut ids: Vec<i64> = run["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["bk_host_id"].as_i64())
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_builds_a_business_and_runs_jobs_in_it() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let agent_2 = cluster
        .info
        .hosts
        .iter()
        .find(|h| h.agent_id == "agent-2")
        .context("agent-2's host")?
        .bk_host_id;
    let agent_2 = agent_2.to_string();
    let start = current_revision(&cluster).await?;

    // A business, a set and a module under it, agent-2's host moved into the module and the
    // root account allowed there: one revision each, printed as "revision N: summary".
    let mut revisions = Vec::new();
    for args in [
        &["biz", "add", "5", "--name", "lab"][..],
        &[
            "node", "add", "set:50", "--name", "cache", "--parent", "biz:5", "--attr", "env=lab",
        ],
        &[
            "node",
            "add",
            "module:500",
            "--name",
            "redis",
            "--parent",
            "set:50",
        ],
        &["hosts", "move", &agent_2, "--biz", "5", "--module", "500"],
        // An account belongs to the businesses it lists: the new one must be given one.
        &[
            "accounts",
            "update",
            "1",
            "--usable-in",
            "biz:2,biz:3,biz_set:9,biz:5",
        ],
    ] {
        let done = fleetrun(&cluster, args, 0).await?;
        revisions.push(revision_line(&done)?);
    }
    let numbers: Vec<i64> = revisions.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (start + 1..=start + 5).collect::<Vec<_>>(),
        "{revisions:?}"
    );
    assert!(revisions[1].1.contains("set:50"), "{revisions:?}");

    // The module is a target at once: the job reaches agent-2's host and nothing else.
    let ran = json_of(
        &cluster,
        &[
            "run",
            "--scope",
            "biz:5",
            "--topo",
            "module:500",
            "-c",
            "echo in the lab",
        ],
    )
    .await?;
    assert_eq!(ran["succeeded"], true, "{ran}");
    assert_eq!(reached(&ran), [agent_2.parse::<i64>()?], "{ran}");
    assert_eq!(ran["hosts"][0]["output"], "in the lab\n", "{ran}");

    // A module that holds a host cannot go: exit 3 with the controller's code and message.
    let refused = fleetrun(&cluster, &["node", "rm", "module:500"], 3).await?;
    assert!(refused.stderr.contains("1240003"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("module") && refused.stderr.contains("500"),
        "the message names the node: {}",
        refused.stderr
    );

    // The history shows each revision with who made it; the document holds the new set.
    let history = fleetrun(&cluster, &["inventory", "history"], 0).await?;
    let header = history.stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("REVISION") && header.contains("SUMMARY"),
        "{}",
        history.stdout
    );
    for (revision, summary) in &revisions {
        let row = history
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&revision.to_string()))
            .with_context(|| format!("revision {revision} listed: {}", history.stdout))?;
        assert!(
            row.contains(summary) && row.contains("api") && row.contains("admin"),
            "{row}"
        );
    }
    let shown = fleetrun(&cluster, &["inventory", "show"], 0).await?;
    assert!(
        shown.stdout.contains("\"cache\"") && shown.stdout.contains("\"redis\""),
        "{}",
        shown.stdout
    );
    assert!(
        shown
            .stderr
            .contains(&format!("revision {} (api", start + 5)),
        "{}",
        shown.stderr
    );

    // A dynamic group written as --where conditions reaches the host it matches.
    let grouped = fleetrun(
        &cluster,
        &[
            "groups",
            "add",
            "lab-redis",
            "--biz",
            "5",
            "--name",
            "redis in the lab",
            "--where",
            "module.bk_module_name in redis,memcached",
            "--where",
            "set.env = lab",
        ],
        0,
    )
    .await?;
    let (group_revision, _) = revision_line(&grouped)?;
    let ran = json_of(
        &cluster,
        &[
            "run",
            "--scope",
            "biz:5",
            "--group",
            "lab-redis",
            "-c",
            "true",
        ],
    )
    .await?;
    assert_eq!(ran["succeeded"], true, "{ran}");
    assert_eq!(reached(&ran), [agent_2.parse::<i64>()?], "{ran}");
    let groups = fleetrun(&cluster, &["groups", "--biz", "5"], 0).await?;
    assert!(
        groups
            .stdout
            .contains("'module.bk_module_name in redis,memcached' and 'set.env = lab'"),
        "conditions are listed the way --where takes them: {}",
        groups.stdout
    );

    // A condition that does not parse is a usage error that teaches the syntax.
    let bad = fleetrun(
        &cluster,
        &["groups", "update", "lab-redis", "--where", "host.cpu > 8"],
        2,
    )
    .await?;
    assert!(
        bad.stderr.contains("OBJECT.FIELD OP VALUE"),
        "{}",
        bad.stderr
    );

    // A write that expects a revision that is no longer current changes nothing.
    let stale = fleetrun(
        &cluster,
        &[
            "biz",
            "rename",
            "5",
            "stale",
            "--expect-revision",
            &start.to_string(),
        ],
        3,
    )
    .await?;
    assert!(
        stale.stderr.contains(&group_revision.to_string()),
        "the error names the current revision: {}",
        stale.stderr
    );
    assert_eq!(current_revision(&cluster).await?, group_revision);
    let renamed = fleetrun(
        &cluster,
        &[
            "biz",
            "rename",
            "5",
            "laboratory",
            "--expect-revision",
            &group_revision.to_string(),
        ],
        0,
    )
    .await?;
    assert_eq!(revision_line(&renamed)?.0, group_revision + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_and_every_kind_of_entry_from_the_command_line() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let dir = cluster.dir();
    let start = current_revision(&cluster).await?;

    // show -O, edit, apply: a new revision, which says what it replaced.
    let path = dir.join("exported.toml");
    let written = fleetrun(
        &cluster,
        &["inventory", "show", "-O", path.to_str().unwrap()],
        0,
    )
    .await?;
    assert!(
        written
            .stdout
            .contains(&format!("revision {start} written to")),
        "{}",
        written.stdout
    );
    let document = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        format!("{document}\n[[business]]\nbk_biz_id = 7\nname = \"seven\"\n"),
    )?;
    let applied = fleetrun(
        &cluster,
        &[
            "inventory",
            "apply",
            path.to_str().unwrap(),
            "--expect-revision",
            &start.to_string(),
        ],
        0,
    )
    .await?;
    assert_eq!(
        applied.stdout.trim(),
        format!("revision {} (was {start})", start + 1)
    );

    // A change file, then a business set updated from the command line.
    let changes = dir.join("changes.json");
    std::fs::write(
        &changes,
        r#"{"changes": [{"op": "create_business_set", "bk_biz_set_id": 19, "name": "both", "members": [2, 7]}]}"#,
    )?;
    let changed = json_of(
        &cluster,
        &["inventory", "change", changes.to_str().unwrap()],
    )
    .await?;
    assert_eq!(changed["revision"], start + 2, "{changed}");
    assert_eq!(changed["previous_revision"], start + 1, "{changed}");
    fleetrun(&cluster, &["bizset", "update", "19", "--members", "7"], 0).await?;
    let topology = json_of(&cluster, &["topology"]).await?;
    let set = topology["business_sets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["bk_biz_set_id"] == 19)
        .with_context(|| format!("business set 19: {topology}"))?;
    assert_eq!(set["members"], serde_json::json!([7]), "{set}");
    std::fs::write(&changes, "[{\"bk_biz_id\": 7}]")?;
    let malformed = fleetrun(
        &cluster,
        &["inventory", "change", changes.to_str().unwrap()],
        2,
    )
    .await?;
    assert!(
        malformed.stderr.contains("changes[0]"),
        "{}",
        malformed.stderr
    );

    // An account usable in business 7 only.
    fleetrun(
        &cluster,
        &[
            "accounts",
            "add",
            "50",
            "--alias",
            "lab",
            "--account",
            "nobody",
            "--usable-in",
            "biz:7",
        ],
        0,
    )
    .await?;
    let in_7 = json_of(&cluster, &["accounts", "--scope", "biz:7"]).await?;
    assert!(
        in_7["data"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["alias"] == "lab"),
        "{in_7}"
    );
    let in_2 = fleetrun(&cluster, &["accounts"], 0).await?;
    assert!(
        in_2.stdout.contains("root") && !in_2.stdout.contains("lab"),
        "{}",
        in_2.stdout
    );

    // A host without an agent: added, listed, updated, removed.
    fleetrun(
        &cluster,
        &[
            "hosts",
            "add",
            "9001",
            "--ip",
            "10.9.9.9",
            "--hostname",
            "spare",
            "--biz",
            "7",
            "--attr",
            "rack=z9",
        ],
        0,
    )
    .await?;
    let hosts = json_of(&cluster, &["hosts", "--biz", "7"]).await?;
    let spare = hosts
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["bk_host_id"] == 9001)
        .with_context(|| format!("host 9001 listed: {hosts}"))?;
    assert_eq!(spare["ip"], "10.9.9.9", "{spare}");
    fleetrun(
        &cluster,
        &[
            "hosts",
            "update",
            "9001",
            "--hostname",
            "spare-2",
            "--unset-attr",
            "rack",
        ],
        0,
    )
    .await?;
    let removed = fleetrun(&cluster, &["hosts", "rm", "9001"], 0).await?;
    revision_line(&removed)?;
    fleetrun(&cluster, &["inventory", "unlisted-agents", "--unassign"], 0).await?;

    // Older revisions stay readable; a reload keeps the API's changes while the file is as it
    // was imported, and --force makes the file the truth again.
    let old = fleetrun(
        &cluster,
        &["inventory", "show", "--revision", &start.to_string()],
        0,
    )
    .await?;
    assert_eq!(old.stdout, document);
    let before = current_revision(&cluster).await?;
    let kept = fleetrun(&cluster, &["inventory", "reload"], 0).await?;
    assert!(
        kept.stdout.contains(&format!("revision {before} stays")),
        "{}",
        kept.stdout
    );
    let reloaded = fleetrun(&cluster, &["inventory", "reload", "--force"], 0).await?;
    let now = current_revision(&cluster).await?;
    assert_eq!(now, before + 1);
    assert_eq!(
        reloaded.stdout.trim(),
        format!("inventory reloaded: revision {now}")
    );
    let topology = json_of(&cluster, &["topology"]).await?;
    assert!(
        !topology["businesses"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["bk_biz_id"] == 7),
        "the file has no business 7: {topology}"
    );
    Ok(())
}
