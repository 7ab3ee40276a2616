//! The bk-job API surface through real HTTP: validation codes, companion APIs, scopes,
//! sensitive parameters, delayed starts.

use std::time::Duration;

use anyhow::Result;
use fleetrun_tests::{b64, host_results, start_cluster};
use serde_json::{Value, json};

/// Merges `patch` into `base`; a `null` in the patch removes the field.
fn patched(base: &Value, patch: Value) -> Value {
    let mut out = base.clone();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            out.as_object_mut().unwrap().remove(k);
        } else {
            out[k] = v.clone();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_bk_job_codes_naming_the_field() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let host = cluster.host_ids()[0];
    let good = cluster.script_request("echo ok", &[host], json!({}));
    let big_script = b64(&"x".repeat(16 * 1024 * 1024 + 1));
    let long_param = b64(&"p".repeat(65_536));
    let long_sensitive = b64(&"p".repeat(48_129));
    let cases: Vec<(&str, Value, i64, &str)> = vec![
        (
            "no scope type",
            json!({"bk_scope_type": null}),
            1_241_004,
            "bk_scope_type",
        ),
        (
            "no scope id",
            json!({"bk_scope_id": null}),
            1_241_004,
            "bk_scope_id",
        ),
        (
            "unknown scope type",
            json!({"bk_scope_type": "planet"}),
            1_240_003,
            "bk_scope_type",
        ),
        (
            "scope id not a number",
            json!({"bk_scope_id": "two"}),
            1_240_003,
            "bk_scope_id",
        ),
        (
            "unknown business",
            json!({"bk_scope_id": "999"}),
            1_240_003,
            "bk_scope_id",
        ),
        (
            "unknown business set",
            json!({"bk_scope_type": "biz_set", "bk_scope_id": "99"}),
            1_240_003,
            "bk_scope_id",
        ),
        (
            "no script at all",
            json!({"script_content": null}),
            1_241_004,
            "script_content",
        ),
        (
            "script not base64",
            json!({"script_content": "***"}),
            1_240_003,
            "script_content",
        ),
        (
            "script empty",
            json!({"script_content": ""}),
            1_240_003,
            "script_content",
        ),
        (
            "script too large",
            json!({"script_content": big_script}),
            1_240_003,
            "script_content",
        ),
        (
            "no language",
            json!({"script_language": null}),
            1_241_004,
            "script_language",
        ),
        (
            "language 6",
            json!({"script_language": 6}),
            1_241_005,
            "script_language",
        ),
        (
            "language 0",
            json!({"script_language": 0}),
            1_241_005,
            "script_language",
        ),
        (
            "language a string",
            json!({"script_language": "shell"}),
            1_240_003,
            "script_language",
        ),
        (
            "unknown script version",
            json!({"script_version_id": 12345}),
            1_243_001,
            "script_version_id",
        ),
        (
            "unknown script id",
            json!({"script_id": "nope"}),
            1_243_001,
            "script_id",
        ),
        ("timeout 0", json!({"timeout": 0}), 1_240_003, "timeout"),
        (
            "timeout over a day",
            json!({"timeout": 86_401}),
            1_240_003,
            "timeout",
        ),
        (
            "timeout negative",
            json!({"timeout": -5}),
            1_240_003,
            "timeout",
        ),
        (
            "timeout not a number",
            json!({"timeout": "soon"}),
            1_240_003,
            "timeout",
        ),
        (
            "param not base64",
            json!({"script_param": "%%%"}),
            1_240_003,
            "script_param",
        ),
        (
            "param too long",
            json!({"script_param": long_param}),
            1_240_003,
            "script_param",
        ),
        (
            "sensitive param too long",
            json!({"script_param": long_sensitive, "is_param_sensitive": 1}),
            1_240_003,
            "script_param",
        ),
        (
            "sensitive flag 2",
            json!({"is_param_sensitive": 2}),
            1_240_003,
            "is_param_sensitive",
        ),
        (
            "task name too long",
            json!({"task_name": "n".repeat(513)}),
            1_240_003,
            "task_name",
        ),
        (
            "no account",
            json!({"account_alias": null}),
            1_241_004,
            "account",
        ),
        (
            "unknown account id",
            json!({"account_id": 777}),
            1_244_003,
            "account_id",
        ),
        (
            "unknown account alias",
            json!({"account_alias": "nobody-here"}),
            1_244_003,
            "account_alias",
        ),
        (
            "no target_server",
            json!({"target_server": null}),
            1_241_004,
            "target_server",
        ),
        (
            "empty targets",
            json!({"target_server": {"host_id_list": []}}),
            1_244_001,
            "target_server",
        ),
        (
            "unknown host",
            json!({"target_server": {"host_id_list": [host, 424_242]}}),
            1_244_030,
            "424242",
        ),
        (
            "host id not a number",
            json!({"target_server": {"host_id_list": ["abc"]}}),
            1_240_003,
            "target_server.host_id_list",
        ),
        (
            "unknown ip",
            json!({"target_server": {"ip_list": [{"bk_cloud_id": 0, "ip": "10.1.2.3"}]}}),
            1_244_030,
            "10.1.2.3",
        ),
        (
            "ip not an ip",
            json!({"target_server": {"ip_list": [{"bk_cloud_id": 0, "ip": "300.1.1.1"}]}}),
            1_240_003,
            "ip_list",
        ),
        (
            "ip without cloud",
            json!({"target_server": {"ip_list": [{"ip": "127.0.0.10"}]}}),
            1_241_004,
            "bk_cloud_id",
        ),
        (
            "target_server a string",
            json!({"target_server": "everything"}),
            1_240_003,
            "target_server",
        ),
        (
            "windows interpreter",
            json!({"windows_interpreter": "cmd.exe"}),
            1_241_011,
            "windows_interpreter",
        ),
        (
            "rolling staggered without waits",
            json!({"rolling_config": {"expression": "10%", "execution_mode": 2}}),
            1_240_003,
            "rolling_config.batch_start_wait_fixed_ms",
        ),
        (
            "rolling mode 4",
            json!({"rolling_config": {"expression": "10%", "mode": 4}}),
            1_240_003,
            "rolling_config.mode",
        ),
        (
            "rolling expression",
            json!({"rolling_config": {"expression": "ten", "mode": 1}}),
            1_244_026,
            "rolling_config.expression",
        ),
        (
            "start_task not a bool",
            json!({"start_task": "maybe"}),
            1_240_003,
            "start_task",
        ),
    ];
    assert!(cases.len() >= 30);
    for (what, patch, code, field) in &cases {
        let request = patched(&good, patch.clone());
        let envelope = client.call_raw("fast_execute_script", request).await?;
        assert_eq!(envelope["result"], false, "{what}: {envelope}");
        assert_eq!(envelope["code"], *code, "{what}: {envelope}");
        let message = envelope["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{what}: message {message:?} should name {field:?}"
        );
        assert!(
            envelope["request_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
    }

    // Malformed bodies and unknown APIs never reach a handler; only an unknown API is an HTTP
    // error (404).
    let http = reqwest::Client::new();
    for (body, code) in [
        ("{not json", 1_240_003),
        ("[1,2]", 1_240_003),
        ("", 1_640_001),
    ] {
        let reply = http
            .post(format!(
                "{}/api/v3/fast_execute_script/",
                cluster.info.api_url
            ))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(reply.status(), 200);
        let envelope: Value = reply.json().await?;
        assert_eq!(envelope["code"], code, "{body:?}: {envelope}");
    }
    // An API that does not exist is not a reply: HTTP 404, still in the envelope.
    let reply = http
        .post(format!("{}/api/v3/no_such_api/", cluster.info.api_url))
        .json(&json!({"bk_app_code": "fleetrun-test"}))
        .send()
        .await?;
    assert_eq!(reply.status(), 404);
    let envelope: Value = reply.json().await?;
    assert_eq!(envelope["code"], 1_640_401, "{envelope}");

    // Not one of the refused requests created a job.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let list = client
        .call(
            "get_job_instance_list",
            json!({
                "bk_scope_type": "biz", "bk_scope_id": "2",
                "create_time_start": now - 3_600_000, "create_time_end": now + 60_000,
            }),
        )
        .await?;
    assert_eq!(list["total"], 0, "{list}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn query_apis_validate_and_page() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let hosts = cluster.host_ids();
    let scope = cluster.info.scope();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let mut jobs = Vec::new();
    for i in 0..3 {
        let request = cluster.script_request(
            &format!("echo {i}"),
            &hosts,
            json!({"task_name": format!("paged-{i}")}),
        );
        let (job, step, status) = cluster.run_job(request).await?;
        assert_eq!(status["job_instance"]["status"], 3);
        jobs.push((job, step));
    }
    let window = json!({"create_time_start": started - 1000, "create_time_end": started + 600_000});
    let page = client
        .call(
            "get_job_instance_list",
            patched(&scope, patched(&window, json!({"start": 1, "length": 1}))),
        )
        .await?;
    assert_eq!(page["total"], 3, "{page}");
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["name"], "paged-1", "newest first: {page}");
    assert_eq!(page["data"][0]["operator"], "admin");
    assert_eq!(page["data"][0]["launch_mode"], 2);
    let named = client
        .call(
            "get_job_instance_list",
            patched(&scope, patched(&window, json!({"name": "ged-2"}))),
        )
        .await?;
    assert_eq!(named["total"], 1);
    let by_ip = client
        .call(
            "get_job_instance_list",
            patched(
                &scope,
                patched(&window, json!({"ip": cluster.info.hosts[0].ip})),
            ),
        )
        .await?;
    assert_eq!(by_ip["total"], 3);

    let bad: Vec<(Value, i64, &str)> = vec![
        (
            patched(&scope, json!({"create_time_end": started})),
            1_241_007,
            "create_time_start",
        ),
        (
            patched(
                &scope,
                json!({"create_time_start": 1, "create_time_end": 31i64 * 86_400_000}),
            ),
            1_241_002,
            "30 days",
        ),
        (
            patched(&scope, patched(&window, json!({"length": 1001}))),
            1_240_003,
            "length",
        ),
        (
            patched(&scope, patched(&window, json!({"status": 12}))),
            1_240_003,
            "status",
        ),
    ];
    for (body, code, field) in bad {
        let envelope = client.call_raw("get_job_instance_list", body).await?;
        assert_eq!(envelope["code"], code, "{envelope}");
        assert!(
            envelope["message"].as_str().unwrap().contains(field),
            "{envelope}"
        );
    }

    let (job, step) = jobs[0];
    let missing: Vec<(&str, Value, i64)> = vec![
        (
            "get_job_instance_status",
            json!({"job_instance_id": 999_999}),
            1_244_006,
        ),
        ("get_job_instance_status", json!({}), 1_241_004),
        (
            "get_job_instance_status",
            json!({"job_instance_id": "x"}),
            1_240_003,
        ),
        (
            "batch_get_job_instance_ip_log",
            json!({"job_instance_id": job, "step_instance_id": 999_999, "host_id_list": hosts}),
            1_244_006,
        ),
        (
            "batch_get_job_instance_ip_log",
            json!({"job_instance_id": job, "step_instance_id": step, "host_id_list": (0..501).collect::<Vec<i64>>()}),
            1_241_007,
        ),
        (
            "batch_get_job_instance_ip_log",
            json!({"job_instance_id": job, "step_instance_id": step}),
            1_241_007,
        ),
        (
            "get_job_instance_ip_log",
            json!({"job_instance_id": job, "step_instance_id": step}),
            1_241_007,
        ),
        (
            "operate_job_instance",
            json!({"job_instance_id": job, "operation_code": 7}),
            1_241_002,
        ),
        (
            "operate_job_instance",
            json!({"job_instance_id": job, "operation_code": 1}),
            1_241_003,
        ),
        ("get_account_list", json!({"category": 3}), 1_240_003),
    ];
    for (api, body, code) in missing {
        let envelope = client.call_raw(api, patched(&scope, body)).await?;
        assert_eq!(envelope["code"], code, "{api}: {envelope}");
    }

    // A job is found only in its own scope.
    let other_scope = json!({"bk_scope_type": "biz", "bk_scope_id": "2", "job_instance_id": job});
    assert_eq!(
        client.call("get_job_instance_status", other_scope).await?["job_instance"]["job_instance_id"],
        job
    );

    let one = client
        .call("get_job_instance_ip_log", patched(&scope, json!({"job_instance_id": job, "step_instance_id": step, "bk_cloud_id": 0, "ip": cluster.info.hosts[0].ip})))
        .await?;
    assert_eq!(one["log_content"], "0\n");
    assert_eq!(one["bk_host_id"], hosts[0]);

    let accounts = client
        .call("get_account_list", patched(&scope, json!({"alias": "roo"})))
        .await?;
    assert_eq!(accounts["total"], 1, "{accounts}");
    assert_eq!(accounts["data"][0]["account"], "root");
    assert_eq!(accounts["data"][0]["category"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn apps_act_only_in_their_scopes() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(
        "\n[[apps]]\nbk_app_code = \"narrow\"\nbk_app_secret = \"narrow-secret\"\nscopes = [\"biz:3\"]\n",
    );
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;

    let narrow =
        fleetrun_tests::ApiClient::new(&cluster.info.api_url, "narrow", "narrow-secret", "bob");
    let request = cluster.script_request("echo hi", &cluster.host_ids(), json!({}));
    let envelope = narrow
        .call_raw("fast_execute_script", request.clone())
        .await?;
    assert_eq!(envelope["code"], 1_238_001, "{envelope}");
    assert_eq!(
        envelope["permission"]["actions"][0]["related_resource_types"][0]["instances"][0][0]["id"],
        "2"
    );

    // In its own business the app is allowed, but the host belongs to business 2, which it may
    // not see: to it, the host is not there.
    let envelope = narrow
        .call_raw(
            "fast_execute_script",
            patched(&request, json!({"bk_scope_id": "3"})),
        )
        .await?;
    assert_eq!(envelope["code"], 1_244_030, "{envelope}");
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .contains(&cluster.host_ids()[0].to_string())
    );

    // A job of business 2 is not visible through business 3.
    let (job, _, _) = cluster.run_job(request).await?;
    let envelope = narrow
        .call_raw(
            "get_job_instance_status",
            json!({"bk_scope_type": "biz", "bk_scope_id": "3", "job_instance_id": job}),
        )
        .await?;
    assert_eq!(envelope["code"], 1_244_006, "{envelope}");

    // Nor does it see business 2's hosts, or get to reload the inventory.
    assert_eq!(narrow.hosts().await?, Vec::<Value>::new());
    assert_eq!(cluster.client().hosts().await?.len(), 1);
    let refused = narrow
        .fleetrun("reload_inventory")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("1238001"), "{refused}");
    // Nor read or change the inventory document.
    for (api, body) in [
        ("get_inventory", json!({})),
        ("get_inventory_history", json!({})),
        (
            "change_inventory",
            json!({"changes": [{"op": "create_business", "bk_biz_id": 77, "name": "x"}]}),
        ),
        ("replace_inventory", json!({"text": ""})),
    ] {
        let envelope = narrow.call_raw(api, body).await?;
        assert_eq!(envelope["code"], 1_238_001, "{api}: {envelope}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_created_without_start_runs_when_started_and_sensitive_params_stay_hidden()
-> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let client = cluster.client();
    let secret = format!("s3cr3t-{}", std::process::id());
    let request = cluster.script_request(
        "echo \"got ${#1} chars\"",
        &cluster.host_ids(),
        json!({"start_task": false, "is_param_sensitive": 1, "script_param": b64(&secret)}),
    );
    let accepted = client.call("fast_execute_script", request).await?;
    let job = accepted["job_instance_id"].as_i64().unwrap();
    let step = accepted["step_instance_id"].as_i64().unwrap();
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    let pending = client
        .call("get_job_instance_status", query.clone())
        .await?;
    assert_eq!(pending["job_instance"]["status"], 1, "{pending}");
    assert_eq!(host_results(&pending)[0]["status"], 5);

    // A pending job survives a controller restart as pending.
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    assert_eq!(
        client
            .call("get_job_instance_status", query.clone())
            .await?["job_instance"]["status"],
        1
    );

    let mut operate = cluster.info.scope();
    operate["job_instance_id"] = json!(job);
    operate["operation_code"] = json!(2);
    assert_eq!(
        client.call("operate_job_instance", operate.clone()).await?["job_instance_id"],
        job
    );
    let done = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(done["job_instance"]["status"], 3, "{done}");
    let logs = cluster.logs(job, step).await?;
    assert_eq!(logs[0].1, format!("got {} chars\n", secret.len()));
    // Starting it again is refused.
    let again = client.call_raw("operate_job_instance", operate).await?;
    assert_eq!(again["code"], 1_241_015, "{again}");

    // The secret is nowhere in clear: replies above, logs, the database files.
    let replies = format!("{pending}{done}{logs:?}");
    assert!(!replies.contains(&secret));
    cluster.stop();
    let mut places = vec![cluster.controller_log.clone()];
    places.extend(cluster.agents.iter().map(|a| a.log.clone()));
    for entry in std::fs::read_dir(cluster.dir())? {
        let path = entry?.path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("controller.db")
        {
            places.push(path);
        }
    }
    for place in places {
        let bytes = std::fs::read(&place)?;
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the secret in clear",
            place.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_running_when_the_controller_dies_is_taken_up_after_the_restart() -> Result<()> {
    let mut cluster = fleetrun_tests::start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let client = cluster.client();
    let (done, _, _) = cluster
        .run_job(cluster.script_request("echo before", &hosts, json!({})))
        .await?;
    let accepted = client
        .call(
            "fast_execute_script",
            cluster.script_request("echo started; sleep 4; echo finished", &hosts, json!({})),
        )
        .await?;
    let job = accepted["job_instance_id"].as_i64().unwrap();
    let step = accepted["step_instance_id"].as_i64().unwrap();
    fleetrun_tests::eventually(Duration::from_secs(10), "both hosts running", || async {
        let logs = cluster.logs(job, step).await.ok()?;
        logs.iter()
            .all(|(_, l)| l.starts_with("started"))
            .then_some(())
    })
    .await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    // The agents kept the tasks running: the restarted controller takes the job up, and every
    // host ends with its whole output, once.
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    for result in host_results(&status) {
        assert_eq!(result["status"], 9, "{result}");
    }
    assert!(
        cluster
            .logs(job, step)
            .await?
            .iter()
            .all(|(_, l)| l == "started\nfinished\n"),
        "{:?}",
        cluster.logs(job, step).await?
    );
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(done);
    assert_eq!(
        client.call("get_job_instance_status", query).await?["job_instance"]["status"],
        3
    );
    // The agents come back by themselves and take new work.
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let (_, _, after) = cluster
        .run_job(cluster.script_request("echo after", &hosts, json!({})))
        .await?;
    assert_eq!(after["job_instance"]["status"], 3);
    Ok(())
}
