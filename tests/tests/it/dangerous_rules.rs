//! Dangerous-command rules through the real controller and agents: an intercepted script is
//! refused with bk-job's code and no agent runs it (by `fast_execute_script`, by starting a job
//! created earlier, or kept in the script library), a scanned one runs and the reply says what
//! matched, rules are managed only by admin apps and recorded in the audit trail, and bad rules
//! are refused naming the field.
//!
//! Every script here is harmless if it ran: the dangerous text sits behind `:` (the shell's
//! no-op) or inside `echo`, so a broken check fails the test, not the machine.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use fleetrun_tests::{ApiClient, TestCluster, b64, start_cluster};
use serde_json::{Value, json};

/// bk-job's DANGEROUS_SCRIPT_FORBIDDEN_EXECUTION.
const DANGEROUS_SCRIPT: i64 = 1_244_019;

fn lines_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn create_rule(client: &ApiClient, expression: &str, action: i64) -> Result<i64> {
    let rule = client
        .call(
            "create_dangerous_rule",
            json!({"expression": expression, "script_language_list": [1], "description": format!("no {expression}"), "action": action}),
        )
        .await?;
    assert_eq!(rule["status"], 0, "a rule is created disabled: {rule}");
    rule["id"].as_i64().context("rule id")
}

async fn jobs_in_scope(cluster: &TestCluster) -> Result<i64> {
    let mut request = cluster.info.scope();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    request["create_time_start"] = json!(now - 86_400_000);
    request["create_time_end"] = json!(now + 60_000);
    request["length"] = json!(1);
    let page = cluster
        .client()
        .call("get_job_instance_list", request)
        .await?;
    page["total"].as_i64().context("total")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_intercepted_script_never_reaches_an_agent_and_a_scanned_one_runs_and_reports()
-> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let host = cluster.host_id("agent-1");
    let marker = cluster.dir().join("ran");
    let write = format!("echo $1 >> {}", marker.display());
    let jobs_before = jobs_in_scope(&cluster).await?;

    // The default rules intercept `rm -rf /` (here an argument of the no-op `:`).
    let refused = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request(
                &format!("{write}\n: rm -rf /\n"),
                &[host],
                json!({"task_name": "cleanup", "script_param": b64("intercepted")}),
            ),
        )
        .await?;
    assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("[step:cleanup][line:2][content:: rm -rf /] - rm -rf /"),
        "{message}"
    );
    assert_eq!(refused["data"], Value::Null);

    // What only looks like a comment: a shell runs the first (the vertical tab is part of a
    // word), Python runs what follows a lone carriage return.
    for (language, script) in [
        (1, format!("{write}\n\x0b#x; : rm -rf /\n")),
        (1, format!("{write}\n\u{a0}# ; : rm -rf /tmp /*\n")),
        (4, "#\rimport os; os.system(\"rm -rf /\")\n".to_owned()),
    ] {
        let mut request = cluster.script_request(
            &script,
            &[host],
            json!({"script_param": b64("comment-bypass")}),
        );
        request["script_language"] = json!(language);
        let refused = client.call_raw("fast_execute_script", request).await?;
        assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{script:?}: {refused}");
    }

    // The audit trail keeps which rule refused which line, never the script's text.
    let entries = client.call("get_audit_log", json!({"limit": 100})).await?;
    let outcomes: Vec<&str> = entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == DANGEROUS_SCRIPT)
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.len(), 4, "{entries}");
    for outcome in outcomes {
        assert!(
            outcome.starts_with("dangerous script refused: rule ") && !outcome.contains("rm -rf"),
            "{outcome}"
        );
    }

    // A rule of the administrator's: created disabled (nothing happens), then enabled.
    let forbidden = create_rule(&client, r"forbidden-\w+", 2).await?;
    let script = format!("{write}\necho forbidden-word\n");
    let (_, _, allowed) = cluster
        .run_job(cluster.script_request(
            &script,
            &[host],
            json!({"script_param": b64("while-disabled")}),
        ))
        .await?;
    assert_eq!(allowed["job_instance"]["status"], 3, "{allowed}");
    let enabled = client
        .call("enable_dangerous_rule", json!({"id": forbidden}))
        .await?;
    assert_eq!(enabled, json!({"id": forbidden, "status": 1}));
    let refused = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request(&script, &[host], json!({"script_param": b64("enabled")})),
        )
        .await?;
    assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("[line:2][content:echo forbidden-word] - no forbidden-"),
        "{refused}"
    );

    // A job created to start later is checked again at its start: the rule made meanwhile
    // stops it.
    let scan_word = create_rule(&client, "scanned-word", 1).await?;
    let pending_rule = create_rule(&client, "later-forbidden", 2).await?;
    let pending = client
        .call(
            "fast_execute_script",
            cluster.script_request(
                &format!("{write}\necho later-forbidden\n"),
                &[host],
                json!({"start_task": false, "script_param": b64("pending")}),
            ),
        )
        .await?;
    let pending_job = pending["job_instance_id"].as_i64().unwrap();
    client
        .call("enable_dangerous_rule", json!({"id": pending_rule}))
        .await?;
    let mut start = cluster.info.scope();
    start["job_instance_id"] = json!(pending_job);
    start["operation_code"] = json!(2);
    let refused = client.call_raw("operate_job_instance", start).await?;
    assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{refused}");

    // Scanning: the script runs, and the reply says what matched.
    client
        .call("enable_dangerous_rule", json!({"id": scan_word}))
        .await?;
    let accepted = client
        .call(
            "fast_execute_script",
            cluster.script_request(
                &format!("{write}\necho scanned-word\n"),
                &[host],
                json!({"script_param": b64("scanned")}),
            ),
        )
        .await?;
    let findings = accepted["dangerous_script_check"]
        .as_array()
        .context("dangerous_script_check")?;
    assert_eq!(findings.len(), 1, "{accepted}");
    assert_eq!(
        (
            &findings[0]["line"],
            &findings[0]["match_content"],
            &findings[0]["rule_id"],
            &findings[0]["action"],
            &findings[0]["level"]
        ),
        (
            &json!(2),
            &json!("scanned-word"),
            &json!(scan_word),
            &json!(1),
            &json!(3)
        )
    );
    let job = accepted["job_instance_id"].as_i64().unwrap();
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    // A clean script's reply has no findings.
    let clean = client
        .call(
            "fast_execute_script",
            cluster.script_request(&write, &[host], json!({"script_param": b64("clean")})),
        )
        .await?;
    assert!(clean.get("dangerous_script_check").is_none(), "{clean}");
    client
        .wait_job(
            &cluster.info.scope(),
            clean["job_instance_id"].as_i64().unwrap(),
            Duration::from_secs(60),
        )
        .await?;

    // The agent ran exactly the allowed scripts; the refused ones made no job at all.
    assert_eq!(
        lines_in(&marker),
        ["while-disabled", "scanned", "clean"],
        "a refused script ran"
    );
    assert_eq!(jobs_in_scope(&cluster).await?, jobs_before + 4);

    // The script library keeps no version the rules would refuse to run.
    let mut script = cluster.info.scope();
    for (k, v) in [
        ("name", json!("wipe")),
        ("script_language", json!(1)),
        ("content", json!(b64("#!/bin/bash\n:(){ :|:& };:\n"))),
        ("version", json!("1.0")),
    ] {
        script[k] = v;
    }
    let refused = client.call_raw("create_script", script.clone()).await?;
    assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{refused}");
    script["content"] = json!(b64("echo fine"));
    let made = client.call("create_script", script).await?;
    let mut version = cluster.info.scope();
    version["script_id"] = made["script_id"].clone();
    version["content"] = json!(b64("dd if=/dev/zero of=/dev/sda"));
    version["version"] = json!("2.0");
    let refused = client.call_raw("create_script_version", version).await?;
    assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{refused}");
    let mut update = cluster.info.scope();
    update["script_id"] = made["script_id"].clone();
    update["script_version_id"] = made["id"].clone();
    update["content"] = json!(b64("mkfs.ext4 /dev/sdb1"));
    let refused = client.call_raw("update_script_version", update).await?;
    assert_eq!(refused["code"], DANGEROUS_SCRIPT, "{refused}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_are_managed_by_admin_apps_under_every_path_style_and_audited() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(
        "\n[[apps]]\nbk_app_code = \"plain\"\nbk_app_secret = \"plain-secret\"\nscopes = [\"*\"]\n",
    );
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let admin = cluster.client();
    let plain = ApiClient::new(&cluster.info.api_url, "plain", "plain-secret", "mallory");

    // The defaults, as bk-job lists rules.
    let rules = admin.call("get_dangerous_rule_list", json!({})).await?;
    let rules = rules.as_array().context("list")?;
    assert_eq!(rules.len(), 4, "{rules:?}");
    for rule in rules {
        assert_eq!((&rule["status"], &rule["action"]), (&json!(1), &json!(2)));
        assert_eq!(rule["script_language_list"], json!([1, 3, 4]));
        assert_eq!(rule["creator"], "fleetrun");
    }

    // Only admin apps manage or read rules; any app may check a script.
    for (api, body) in [
        ("get_dangerous_rule_list", json!({})),
        (
            "create_dangerous_rule",
            json!({"expression": "x", "script_language_list": [1], "action": 1}),
        ),
        ("disable_dangerous_rule", json!({"id": 1})),
        ("delete_dangerous_rule", json!({"id": 1})),
    ] {
        let refused = plain.call_raw(api, body).await?;
        assert_eq!(refused["code"], 1_238_001, "{api}: {refused}");
    }
    let checked = plain
        .call(
            "check_script",
            json!({"script_language": 1, "content": b64("ls\nrm -rf /*\n")}),
        )
        .await?;
    assert_eq!(checked[0]["line"], 2, "{checked}");
    assert_eq!(checked[0]["match_content"], "rm -rf /*", "{checked}");
    assert_eq!(checked[0]["level"], 3);

    // Every path style, with and without the trailing slash, GET and POST.
    let made = admin
        .call(
            "create_dangerous_rule",
            json!({"expression": "shutdown", "script_language_list": [1, 4], "description": "halts", "action": 1}),
        )
        .await?;
    let id = made["id"].as_i64().unwrap();
    assert_eq!(
        (&made["creator"], &made["last_modify_user"], &made["status"]),
        (&json!("admin"), &json!("admin"), &json!(0))
    );
    for prefix in [
        "/api/v3",
        "/api/c/compapi/v2/jobv3",
        "/api/c/compapi/jobv3",
        "/fleetrun/v1",
    ] {
        for slash in ["", "/"] {
            let path = format!("{prefix}/get_dangerous_rule_list{slash}");
            let got = admin
                .get_raw(
                    &path,
                    json!({"script_language_list": [4], "expression": "shut", "action": 1}),
                )
                .await?;
            assert_eq!(got["code"], 0, "GET {path}: {got}");
            assert_eq!(
                got["data"].as_array().unwrap().len(),
                1,
                "GET {path}: {got}"
            );
            assert_eq!(got["data"][0]["id"], id);
            let posted = admin
                .post_path_raw(&path, json!({"script_language_list": [3]}))
                .await?;
            assert_eq!(posted["code"], 0, "POST {path}: {posted}");
            assert_eq!(
                posted["data"].as_array().unwrap().len(),
                4,
                "only the defaults are for Perl: {posted}"
            );
            let checked = admin
                .get_raw(
                    &format!("{prefix}/check_script{slash}"),
                    json!({"script_language": 1, "content": b64("mkfs -t ext4 /dev/vdb")}),
                )
                .await?;
            assert_eq!(checked["data"][0]["line"], 1, "{checked}");
        }
    }
    let disabled = admin
        .get_raw("disable_dangerous_rule", json!({"id": id}))
        .await?;
    assert_eq!(
        disabled["data"],
        json!({"id": id, "status": 0}),
        "{disabled}"
    );
    let updated = admin
        .call(
            "update_dangerous_rule",
            json!({"id": id, "expression": "poweroff", "script_language_list": [1], "description": "also halts", "action": 2}),
        )
        .await?;
    assert_eq!(
        (
            &updated["expression"],
            &updated["action"],
            &updated["status"]
        ),
        (&json!("poweroff"), &json!(2), &json!(0))
    );
    let deleted = admin
        .call_raw("delete_dangerous_rule", json!({"id": id}))
        .await?;
    assert_eq!(
        (&deleted["code"], &deleted["data"]),
        (&json!(0), &Value::Null)
    );

    // Each change is in the audit trail, with the operator.
    let entries = admin.call("get_audit_log", json!({"limit": 100})).await?;
    let apis: Vec<&str> = entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == 0 && e["api"].as_str().unwrap().contains("dangerous"))
        .map(|e| e["api"].as_str().unwrap())
        .collect();
    assert_eq!(
        apis,
        [
            "create_dangerous_rule",
            "disable_dangerous_rule",
            "update_dangerous_rule",
            "delete_dangerous_rule"
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_rules_are_refused_naming_the_field() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let client = cluster.client();
    let nested = format!("{}a{}", "(".repeat(100), ")".repeat(100));
    let long = "a".repeat(1025);
    for (body, code, starts) in [
        (
            json!({"expression": "(unclosed", "script_language_list": [1], "action": 1}),
            1_240_003,
            "expression: not a valid regular expression",
        ),
        (
            json!({"expression": "(a{1000}){1000}", "script_language_list": [1], "action": 1}),
            1_240_003,
            "expression: compiles to more than",
        ),
        (
            json!({"expression": r"\w{500}{500}", "script_language_list": [1], "action": 1}),
            1_240_003,
            "expression: compiles to more than",
        ),
        (
            json!({"expression": nested, "script_language_list": [1], "action": 1}),
            1_240_003,
            "expression: not a valid regular expression",
        ),
        (
            json!({"expression": long, "script_language_list": [1], "action": 1}),
            1_240_003,
            "expression: 1025 characters",
        ),
        (
            json!({"expression": r"(a)\1", "script_language_list": [1], "action": 1}),
            1_240_003,
            "expression: not a valid regular expression",
        ),
        (
            json!({"script_language_list": [1], "action": 1}),
            1_241_004,
            "expression is required",
        ),
        (
            json!({"expression": "x", "script_language_list": [9], "action": 1}),
            1_241_005,
            "script_language_list: 9 is not",
        ),
        (
            json!({"expression": "x", "action": 1}),
            1_241_004,
            "script_language_list is required",
        ),
        (
            json!({"expression": "x", "script_language_list": [1], "action": 3}),
            1_240_003,
            "action: 3 is not 1 (scan) or 2 (intercept)",
        ),
        (
            json!({"expression": "x", "script_language_list": ["shell"], "action": 1}),
            1_240_003,
            "script_language_list",
        ),
    ] {
        let refused = client
            .call_raw("create_dangerous_rule", body.clone())
            .await?;
        assert_eq!(refused["code"], code, "{body}: {refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(message.starts_with(starts), "{body}: {message}");
    }
    let rule = json!({"expression": "halt", "script_language_list": [1, 4], "action": 1});
    client.call("create_dangerous_rule", rule.clone()).await?;
    let twice = client.call_raw("create_dangerous_rule", rule).await?;
    assert_eq!(twice["code"], 1_243_056, "{twice}");
    for api in [
        "update_dangerous_rule",
        "delete_dangerous_rule",
        "enable_dangerous_rule",
    ] {
        let missing = client
            .call_raw(api, json!({"expression": "y", "script_language_list": [1], "description": "", "action": 1}))
            .await?;
        assert_eq!(missing["message"], "id is required", "{api}: {missing}");
        let unknown = client
            .call_raw(api, json!({"id": 987_654, "expression": "y", "script_language_list": [1], "description": "", "action": 1}))
            .await?;
        assert_eq!(
            (&unknown["code"], &unknown["message"]),
            (&json!(1_241_007), &json!("id: no dangerous rule 987654")),
            "{api}"
        );
    }
    let bad_check = client
        .call_raw(
            "check_script",
            json!({"script_language": 1, "content": "not base64!"}),
        )
        .await?;
    assert!(
        bad_check["message"]
            .as_str()
            .unwrap()
            .starts_with("content: not valid base64"),
        "{bad_check}"
    );
    // Nothing refused was stored.
    assert_eq!(
        client
            .call("get_dangerous_rule_list", json!({}))
            .await?
            .as_array()
            .unwrap()
            .len(),
        5
    );
    Ok(())
}

/// `fleetrun ARGS` against the cluster (its cluster.json, nothing from the caller's
/// environment); its exit code and standard output.
async fn fleetrun(cluster: &TestCluster, args: &[&str]) -> Result<(i32, String)> {
    let mut cmd = tokio::process::Command::new(fleetrun_tests::fleetrun_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLEETRUN_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("FLEETRUN_CLUSTER", cluster.dir().join("cluster.json"))
        .env("XDG_CONFIG_HOME", cluster.dir())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_manages_rules_and_checks_scripts() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let (code, out) = fleetrun(
        &cluster,
        &[
            "rules",
            "create",
            "--expression",
            r"reboot\b",
            "--lang",
            "shell,python",
            "--action",
            "intercept",
            "--description",
            "restarts the host",
            "-o",
            "json",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{out}");
    let made: Value = serde_json::from_str(&out)?;
    let id = made["id"].as_i64().context("id")?.to_string();
    assert_eq!(made["script_language_list"], json!([1, 4]));

    let script = cluster.dir().join("maint.sh");
    std::fs::write(&script, "#!/bin/sh\necho maintenance\nreboot now\n")?;
    let script = script.display().to_string();
    // Disabled: nothing found.
    let (code, out) = fleetrun(&cluster, &["check-script", &script]).await?;
    assert_eq!((code, out.trim()), (0, "no dangerous rule matches"));
    let (code, out) = fleetrun(&cluster, &["rules", "enable", &id]).await?;
    assert_eq!(
        (code, out.trim()),
        (0, format!("rule {id} enabled").as_str())
    );
    let (code, out) = fleetrun(&cluster, &["check-script", &script]).await?;
    assert_eq!(code, 1, "an intercepted script exits 1: {out}");
    assert!(
        out.contains(&format!(
            "maint.sh:3: refused (rule {id}, restarts the host): reboot"
        )),
        "{out}"
    );
    let (code, out) = fleetrun(&cluster, &["rules", "list", "--lang", "python"]).await?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(r"reboot\b") && out.contains("enabled"),
        "{out}"
    );
    let (code, out) = fleetrun(
        &cluster,
        &[
            "rules",
            "update",
            &id,
            "--expression",
            "halt",
            "--lang",
            "shell",
            "--action",
            "scan",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(enabled, scan, shell): halt"), "{out}");
    let (code, out) = fleetrun(&cluster, &["rules", "disable", &id]).await?;
    assert_eq!(
        (code, out.trim()),
        (0, format!("rule {id} disabled").as_str())
    );
    let (code, out) = fleetrun(&cluster, &["rules", "delete", &id]).await?;
    assert_eq!(code, 0, "{out}");
    let (code, out) = fleetrun(&cluster, &["rules", "delete", &id]).await?;
    assert_eq!(code, 3, "a refusal exits 3: {out}");
    assert!(out.contains("1241007"), "{out}");
    let (code, out) = fleetrun(
        &cluster,
        &[
            "rules",
            "create",
            "--expression",
            "(a",
            "--lang",
            "shell",
            "--action",
            "scan",
        ],
    )
    .await?;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("expression: not a valid regular expression"),
        "{out}"
    );
    Ok(())
}
