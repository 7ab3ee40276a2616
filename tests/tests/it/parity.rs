//! Where fleetrun must answer exactly as bk-job does: field names, types and codes checked
//! against bk-job's gateway documentation and resources, each through the HTTP API in both its
//! GET (query string) and POST (JSON body) forms.

use anyhow::Result;
use fleetrun_tests::{ApiClient, TestCluster, b64, reply_message, start_cluster};
use serde_json::{Value, json};

fn with(base: &Value, extra: Value) -> Value {
    let mut out = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        out[k] = v.clone();
    }
    out
}

/// The envelopes of one call in both forms: POST with a JSON body, then GET with a query.
async fn both(client: &ApiClient, api: &str, body: Value) -> Result<[(&'static str, Value); 2]> {
    Ok([
        ("POST", client.call_raw(api, body.clone()).await?),
        ("GET", client.get_raw(api, body).await?),
    ])
}

/// Asserts every form succeeded; returns their `data`.
async fn both_ok(client: &ApiClient, api: &str, body: Value) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (form, envelope) in both(client, api, body).await? {
        assert_eq!(envelope["code"], 0, "{api} {form}: {envelope}");
        out.push(envelope["data"].clone());
    }
    Ok(out)
}

/// Asserts every form was refused with `code`, the message naming `field`.
async fn both_refused(
    client: &ApiClient,
    api: &str,
    body: Value,
    code: i64,
    field: &str,
) -> Result<()> {
    for (form, envelope) in both(client, api, body).await? {
        assert_eq!(envelope["result"], false, "{api} {form}: {envelope}");
        assert_eq!(envelope["code"], code, "{api} {form}: {envelope}");
        assert!(
            reply_message(&envelope).contains(field),
            "{api} {form}: the message should name {field:?}: {envelope}"
        );
        assert_eq!(envelope["data"], Value::Null, "{api} {form}: {envelope}");
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn one_agent() -> Result<(TestCluster, ApiClient, Value, i64)> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let scope = cluster.info.scope();
    let host = cluster.host_ids()[0];
    Ok((cluster, client, scope, host))
}

#[tokio::test(flavor = "multi_thread")]
async fn envelope_and_script_content_are_bk_jobs() -> Result<()> {
    let (_cluster, client, scope, _) = one_agent().await?;
    let text = "#!/bin/bash\necho 'é'\n";
    let created = client
        .call_raw(
            "create_script",
            with(
                &scope,
                json!({"name": "t", "description": "about t", "script_language": 1, "content": b64(text), "version": "1"}),
            ),
        )
        .await?;
    // The gateway's name for the request id, beside the ESB one, both the X-Request-Id.
    assert!(
        created["job_request_id"]
            .as_str()
            .is_some_and(|id| id.len() == 32),
        "{created}"
    );
    assert_eq!(created["job_request_id"], created["request_id"]);
    let version = &created["data"];
    // Plain text, as bk-job's ScriptDTOBuilder returns it.
    assert_eq!(version["content"], text, "{version}");
    assert_eq!(version["description"], "about t", "{version}");
    let id = version["id"].clone();
    let script_id = version["script_id"].as_str().unwrap().to_owned();

    for detail in both_ok(
        &client,
        "get_script_version_detail",
        with(&scope, json!({"id": id})),
    )
    .await?
    {
        assert_eq!(detail["content"], text, "{detail}");
        assert_eq!(detail["description"], "about t");
    }
    for list in both_ok(
        &client,
        "get_script_version_list",
        with(
            &scope,
            json!({"script_id": script_id, "return_script_content": true}),
        ),
    )
    .await?
    {
        assert_eq!(list["data"][0]["content"], text, "{list}");
    }
    // Errors carry it too.
    for (form, envelope) in both(
        &client,
        "get_script_version_detail",
        with(&scope, json!({"id": 1})),
    )
    .await?
    {
        assert_eq!(envelope["code"], 1_243_001, "{form}: {envelope}");
        assert_eq!(envelope["job_request_id"], envelope["request_id"], "{form}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn host_results_and_retries_are_reported_as_bk_job_does() -> Result<()> {
    let (cluster, client, scope, host) = one_agent().await?;
    let (job, _, _) = cluster
        .run_job(cluster.script_request("echo out; exit 3", &[host], json!({})))
        .await?;
    let body = with(
        &scope,
        json!({"job_instance_id": job, "return_ip_result": true}),
    );
    for status in both_ok(&client, "get_job_instance_status", body).await? {
        let step = &status["step_instance_list"][0];
        assert_eq!(step["execute_count"], 0, "run once, retried never: {step}");
        let result = &step["step_ip_result_list"][0];
        assert_eq!(result["status"], 104, "{result}");
        assert_eq!(result["exit_code"], 3, "{result}");
        assert_eq!(
            result["error_code"], 0,
            "the agent layer finished the task: {result}"
        );
        assert!(result["ip"].is_string(), "{result}");
        assert!(
            result.get("ipv6").is_none(),
            "an IPv4 host has no ipv6: {result}"
        );
    }

    // A job created without starting: no exit code yet, null rather than 0.
    let pending = client
        .call(
            "fast_execute_script",
            cluster.script_request("true", &[host], json!({"start_task": false})),
        )
        .await?;
    let body = with(
        &scope,
        json!({"job_instance_id": pending["job_instance_id"], "return_ip_result": true}),
    );
    for status in both_ok(&client, "get_job_instance_status", body).await? {
        let step = &status["step_instance_list"][0];
        assert_eq!(step["execute_count"], 0, "{step}");
        let result = &step["step_ip_result_list"][0];
        assert_eq!(result["status"], 5, "{result}");
        assert_eq!(result["exit_code"], Value::Null, "{result}");
    }

    // A terminated host says so in error_code (bk-job's 126).
    let long = client
        .call(
            "fast_execute_script",
            cluster.script_request("sleep 30", &[host], json!({})),
        )
        .await?;
    let job = long["job_instance_id"].as_i64().unwrap();
    let running =
        fleetrun_tests::eventually(std::time::Duration::from_secs(20), "the host runs", || {
            let client = client.clone();
            let body = with(
                &scope,
                json!({"job_instance_id": job, "return_ip_result": true}),
            );
            async move {
                let status = client.call("get_job_instance_status", body).await.ok()?;
                let result = status["step_instance_list"][0]["step_ip_result_list"][0].clone();
                (result["status"] == 7).then_some(result)
            }
        })
        .await?;
    assert_eq!(running["error_code"], 115, "{running}");
    client
        .call(
            "operate_job_instance",
            with(&scope, json!({"job_instance_id": job, "operation_code": 1})),
        )
        .await?;
    let status = client
        .wait_job(&scope, job, std::time::Duration::from_secs(30))
        .await?;
    let result = &status["step_instance_list"][0]["step_ip_result_list"][0];
    assert_eq!(result["status"], 403, "{result}");
    assert_eq!(result["error_code"], 126, "{result}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_carry_bk_jobs_codes() -> Result<()> {
    let (cluster, client, scope, host) = one_agent().await?;
    let (job, step, _) = cluster
        .run_job(cluster.script_request("echo done", &[host], json!({})))
        .await?;
    let ids = json!({"job_instance_id": job, "step_instance_id": step});
    let window =
        json!({"create_time_start": now_ms() - 60_000, "create_time_end": now_ms() + 60_000});

    let cases: Vec<(&str, Value, i64, &str)> = vec![
        // ILLEGAL_PARAM for an unknown operation.
        (
            "operate_job_instance",
            json!({"job_instance_id": job, "operation_code": 9}),
            1_241_002,
            "operation_code",
        ),
        // UNSUPPORTED_OPERATION: terminating a finished job.
        (
            "operate_job_instance",
            json!({"job_instance_id": job, "operation_code": 1}),
            1_241_003,
            "not running",
        ),
        // UNSUPPORTED_OPERATION_REPEAT_START_JOB.
        (
            "operate_job_instance",
            json!({"job_instance_id": job, "operation_code": 2}),
            1_241_015,
            "already started",
        ),
        // MISSING_OR_ILLEGAL_PARAM_WITH_PARAM_NAME: a log API without its hosts.
        (
            "get_job_instance_ip_log",
            ids.clone(),
            1_241_007,
            "bk_host_id",
        ),
        (
            "batch_get_job_instance_ip_log",
            ids.clone(),
            1_241_007,
            "host_id_list",
        ),
        // TASK_INSTANCE_NOT_EXIST for a step of no job.
        (
            "get_job_instance_ip_log",
            json!({"job_instance_id": job, "step_instance_id": 42, "bk_host_id": host}),
            1_244_006,
            "step_instance_id",
        ),
        (
            "batch_get_job_instance_ip_log",
            json!({"job_instance_id": job, "step_instance_id": 42, "host_id_list": [host]}),
            1_244_006,
            "step_instance_id",
        ),
        (
            "get_job_instance_status",
            json!({"job_instance_id": 999_999}),
            1_244_006,
            "job_instance_id",
        ),
        // The job list's window: missing, reversed or empty, longer than 30 days.
        (
            "get_job_instance_list",
            json!({"create_time_end": now_ms()}),
            1_241_007,
            "create_time_start",
        ),
        (
            "get_job_instance_list",
            json!({"create_time_start": now_ms()}),
            1_241_007,
            "create_time_end",
        ),
        (
            "get_job_instance_list",
            json!({"create_time_start": 0, "create_time_end": now_ms()}),
            1_241_007,
            "create_time_start",
        ),
        (
            "get_job_instance_list",
            json!({"create_time_start": now_ms(), "create_time_end": now_ms() - 1000}),
            1_241_007,
            "create_time_start|create_time_end",
        ),
        (
            "get_job_instance_list",
            json!({"create_time_start": 1000, "create_time_end": 1000}),
            1_241_007,
            "create_time_start|create_time_end",
        ),
        (
            "get_job_instance_list",
            json!({"create_time_start": 1, "create_time_end": 31i64 * 86_400_000}),
            1_241_002,
            "30 days",
        ),
        (
            "get_job_instance_list",
            with(&window, json!({"type": 7})),
            1_241_002,
            "type",
        ),
    ];
    for (api, body, code, field) in cases {
        both_refused(&client, api, with(&scope, body), code, field).await?;
    }

    // A host the step did not target has an empty log, not an error.
    for log in both_ok(
        &client,
        "get_job_instance_ip_log",
        with(&scope, with(&ids, json!({"bk_host_id": 987_654}))),
    )
    .await?
    {
        assert_eq!(log["bk_host_id"], 987_654, "{log}");
        assert_eq!(log["log_content"], "", "{log}");
        assert_eq!(log["log_type"], 1, "{log}");
    }
    for logs in both_ok(
        &client,
        "batch_get_job_instance_ip_log",
        with(&scope, with(&ids, json!({"host_id_list": [987_654, host]}))),
    )
    .await?
    {
        let logs = logs["script_task_logs"].as_array().unwrap();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0]["log_content"], "done\n");
    }

    // Unknown APIs: the gateway's API_NOT_FOUND under every path style, HTTP 404.
    let http = reqwest::Client::new();
    for prefix in [
        "/api/v3",
        "/api/c/compapi/v2/jobv3",
        "/api/c/compapi/jobv3",
        "/fleetrun/v1",
        "/api/v4",
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let reply = http
                .request(
                    method.clone(),
                    format!("{}{prefix}/get_job_plan_list/", cluster.info.api_url),
                )
                .send()
                .await?;
            assert_eq!(reply.status(), 404, "{method} {prefix}");
            let envelope: Value = reply.json().await?;
            assert_eq!(envelope["code"], 1_640_401, "{method} {prefix}: {envelope}");
            assert_eq!(envelope["result"], false);
        }
    }
    // Wrong credentials: the gateway's INVALID_ARGS.
    let wrong = ApiClient::new(
        &cluster.info.api_url,
        &client.app_code,
        "not-the-secret",
        "eve",
    );
    for (form, envelope) in both(
        &wrong,
        "get_job_instance_status",
        with(&scope, json!({"job_instance_id": job})),
    )
    .await?
    {
        assert_eq!(envelope["code"], 1_640_001, "{form}: {envelope}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn job_list_filters_and_fields_are_bk_jobs() -> Result<()> {
    let (cluster, client, scope, host) = one_agent().await?;
    let before = now_ms() - 1000;
    let (job, _, _) = cluster
        .run_job(cluster.script_request("true", &[host], json!({"task_name": "listed"})))
        .await?;
    let window = json!({"create_time_start": before, "create_time_end": now_ms() + 60_000});

    for page in both_ok(
        &client,
        "get_job_instance_list",
        with(&scope, window.clone()),
    )
    .await?
    {
        let item = &page["data"][0];
        assert_eq!(page["total"], 1, "{page}");
        assert_eq!(item["job_instance_id"], job, "{item}");
        assert_eq!(item["job_plan_id"], -1, "a fast job has no plan: {item}");
        assert_eq!(item["job_template_id"], -1, "{item}");
        assert_eq!(
            item["bk_biz_id"],
            scope["bk_scope_id"].as_str().unwrap().parse::<i64>()?
        );
        assert_eq!(item["bk_scope_type"], "biz");
        assert_eq!(item["launch_mode"], 2);
        assert_eq!(item["type"], 1);
    }
    // job_instance_id names the job whatever the other filters say (bk-job ignores them).
    let named = with(
        &scope,
        json!({"create_time_start": 1, "create_time_end": 2, "job_instance_id": job, "name": "no such name"}),
    );
    for page in both_ok(&client, "get_job_instance_list", named).await? {
        assert_eq!(page["total"], 1, "{page}");
        assert_eq!(page["data"][0]["job_instance_id"], job);
    }
    // Jobs of a cron job: fleetrun has none.
    for page in both_ok(
        &client,
        "get_job_instance_list",
        with(&scope, with(&window, json!({"job_cron_id": 5}))),
    )
    .await?
    {
        assert_eq!(page["total"], 0, "{page}");
    }
    // The deprecated bk_biz_id stands for bk_scope_type=biz.
    let biz = json!({"bk_biz_id": scope["bk_scope_id"].as_str().unwrap().parse::<i64>()?});
    for page in both_ok(&client, "get_job_instance_list", with(&biz, window.clone())).await? {
        assert_eq!(page["total"], 1, "{page}");
    }
    for status in both_ok(
        &client,
        "get_job_instance_status",
        with(&biz, json!({"job_instance_id": job})),
    )
    .await?
    {
        assert_eq!(status["job_instance"]["job_instance_id"], job);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fields_fleetrun_cannot_honour_are_refused_not_dropped() -> Result<()> {
    let (cluster, client, _scope, host) = one_agent().await?;
    let cases = [
        (
            "windows_interpreter",
            json!({"windows_interpreter": "C:\\Python3\\python.exe"}),
        ),
        (
            "host_password_list",
            json!({"host_password_list": [{"bk_host_id": host, "password": "x"}]}),
        ),
    ];
    for (field, extra) in cases {
        let request = cluster.script_request("true", &[host], extra);
        let envelope = client.call_raw("fast_execute_script", request).await?;
        assert_eq!(envelope["code"], 1_241_011, "{field}: {envelope}");
        assert!(
            envelope["message"].as_str().unwrap().starts_with(field),
            "{envelope}"
        );
    }
    // The GET form reads the same field from the query (a target list cannot travel in one, but
    // the field is refused before the targets are read).
    let mut request =
        cluster.script_request("true", &[host], json!({"windows_interpreter": "cmd.exe"}));
    request.as_object_mut().unwrap().remove("target_server");
    let envelope = client.get_raw("fast_execute_script", request).await?;
    assert_eq!(envelope["code"], 1_241_011, "{envelope}");
    // Nothing ran.
    let list = client
        .call(
            "get_job_instance_list",
            with(&cluster.info.scope(), json!({"create_time_start": now_ms() - 3_600_000, "create_time_end": now_ms() + 1000})),
        )
        .await?;
    assert_eq!(list["total"], 0, "{list}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_are_updated_and_deleted_as_in_bk_job() -> Result<()> {
    // The refusals below look alike and stay a sequence, not a table: each is checked where the
    // script's versions stand as it needs them (a draft, the online one, the one a job ran), and
    // the steps between them are what bring the script there.
    let (cluster, client, scope, host) = one_agent().await?;
    let v1 = client
        .call("create_script", with(&scope, json!({"name": "s", "script_language": 1, "content": b64("echo 1"), "version": "1"})))
        .await?;
    let script_id = v1["script_id"].as_str().unwrap().to_owned();
    let v1_id = v1["id"].as_i64().unwrap();

    // Content comes back as text: bytes that are not UTF-8 (GBK here) would come back altered.
    {
        use base64::Engine as _;
        let gbk = base64::engine::general_purpose::STANDARD.encode(b"echo \xc4\xe3\xba\xc3");
        both_refused(
            &client,
            "create_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "content": gbk, "version": "gbk"}),
            ),
            1_240_003,
            "UTF-8",
        )
        .await?;
    }

    // Basics: name and description.
    for script in both_ok(
        &client,
        "update_script_basic",
        with(
            &scope,
            json!({"script_id": script_id, "name": "renamed", "description": "now described"}),
        ),
    )
    .await?
    {
        assert_eq!(script["id"], script_id.as_str());
        assert_eq!(script["name"], "renamed");
        assert_eq!(script["description"], "now described");
    }
    both_refused(
        &client,
        "update_script_basic",
        with(&scope, json!({"script_id": script_id})),
        1_241_004,
        "name",
    )
    .await?;
    both_refused(
        &client,
        "update_script_basic",
        with(&scope, json!({"script_id": "nope", "name": "x"})),
        1_243_001,
        "script_id",
    )
    .await?;

    // A draft's content changes; once published it is fixed (UNSUPPORTED_OPERATION).
    for version in both_ok(&client, "update_script_version", with(&scope, json!({"script_id": script_id, "script_version_id": v1_id, "content": b64("echo 2"), "version_desc": "two"}))).await? {
        assert_eq!(version["content"], "echo 2", "{version}");
        assert_eq!(version["version_desc"], "two");
        assert_eq!(version["name"], "renamed");
    }
    client
        .call(
            "publish_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "script_version_id": v1_id}),
            ),
        )
        .await?;
    both_refused(
        &client,
        "update_script_version",
        with(
            &scope,
            json!({"script_id": script_id, "script_version_id": v1_id, "content": b64("echo 3")}),
        ),
        1_241_003,
        "online",
    )
    .await?;
    // Disabling a draft and publishing a disabled version are refused the same way.
    let v2 = client
        .call(
            "create_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "content": b64("echo v2"), "version": "2"}),
            ),
        )
        .await?;
    let v2_id = v2["id"].as_i64().unwrap();
    both_refused(
        &client,
        "disable_script_version",
        with(
            &scope,
            json!({"script_id": script_id, "script_version_id": v2_id}),
        ),
        1_241_003,
        "draft",
    )
    .await?;

    let (job, step, _) = cluster
        .run_job({
            let mut r = cluster.script_request("", &[host], json!({"script_id": script_id}));
            r.as_object_mut().unwrap().remove("script_content");
            r
        })
        .await?;
    assert_eq!(cluster.logs(job, step).await?[0].1, "2\n");

    // The online version, which that job ran by script_id, is not deleted
    // (DELETE_ONLINE_SCRIPT_FAIL).
    both_refused(
        &client,
        "delete_script_version",
        with(
            &scope,
            json!({"script_id": script_id, "script_version_id": v1_id}),
        ),
        1_243_005,
        "online",
    )
    .await?;

    // Deleting a version, then the script with the rest.
    let deleted = client
        .call_raw(
            "delete_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "script_version_id": v2_id}),
            ),
        )
        .await?;
    assert_eq!(deleted["code"], 0, "{deleted}");
    assert_eq!(deleted["data"], Value::Null);
    let versions = client
        .get_raw(
            "get_script_version_list",
            with(&scope, json!({"script_id": script_id})),
        )
        .await?;
    assert_eq!(versions["data"]["total"], 1, "{versions}");
    let deleted = client
        .get_raw(
            "delete_script",
            with(&scope, json!({"script_id": script_id})),
        )
        .await?;
    assert_eq!(deleted["code"], 0, "{deleted}");
    both_refused(
        &client,
        "get_script_version_detail",
        with(&scope, json!({"id": v1_id})),
        1_243_001,
        "script_id",
    )
    .await?;
    both_refused(
        &client,
        "delete_script",
        with(&scope, json!({"script_id": script_id})),
        1_243_001,
        "script_id",
    )
    .await?;

    // SQL scripts are kept in the library, and refused by fast_execute_script.
    let sql = client
        .call("create_script", with(&scope, json!({"name": "q", "script_language": 6, "content": b64("select 1;"), "version": "1"})))
        .await?;
    assert_eq!(sql["script_language"], 6);
    client
        .call(
            "publish_script_version",
            with(
                &scope,
                json!({"script_id": sql["script_id"], "script_version_id": sql["id"]}),
            ),
        )
        .await?;
    let mut run = cluster.script_request("", &[host], json!({"script_version_id": sql["id"]}));
    run.as_object_mut().unwrap().remove("script_content");
    let refused = client.call_raw("fast_execute_script", run).await?;
    assert_eq!(refused["code"], 1_241_005, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("SQL"),
        "{refused}"
    );
    for list in both_ok(
        &client,
        "get_script_list",
        with(&scope, json!({"script_language": 6})),
    )
    .await?
    {
        assert_eq!(list["total"], 1, "{list}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn public_scripts_are_shared_and_changed_only_with_their_grant() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    std::fs::write(
        &cluster.controller_config,
        format!(
            "{config}\n[[apps]]\nbk_app_code = \"curator\"\nbk_app_secret = \"curator-secret\"\nscopes = [\"biz:3\"]\npublic_scripts = true\n"
        ),
    )?;
    cluster.start_controller().await?;
    let agents: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster
        .wait_online(&agents, std::time::Duration::from_secs(30))
        .await?;
    let curator = ApiClient::new(&cluster.info.api_url, "curator", "curator-secret", "carol");
    let client = cluster.client();
    let scope = cluster.info.scope();
    let host = cluster.host_ids()[0];

    // The test app may use every scope and administer, but not change public scripts.
    let body = json!({"name": "shared", "script_language": 1, "content": b64("echo shared \"$1\""), "version": "1.0"});
    for (form, envelope) in both(&client, "create_public_script", body.clone()).await? {
        assert_eq!(envelope["code"], 1_238_001, "{form}: {envelope}");
        assert!(
            envelope["message"]
                .as_str()
                .unwrap()
                .contains("public_scripts"),
            "{envelope}"
        );
    }
    let created = curator.call("create_public_script", body).await?;
    assert!(
        created.get("bk_scope_type").is_none(),
        "a public script has no scope: {created}"
    );
    assert_eq!(created["content"], "echo shared \"$1\"");
    let script_id = created["script_id"].as_str().unwrap().to_owned();
    let id = created["id"].clone();
    curator
        .call(
            "publish_public_script_version",
            json!({"script_id": script_id, "script_version_id": id}),
        )
        .await?;

    // Every app reads them; a business's own list does not show them.
    for list in both_ok(&client, "get_public_script_list", json!({})).await? {
        assert_eq!(list["total"], 1, "{list}");
        assert_eq!(list["data"][0]["online_script_version_id"], id);
    }
    for detail in both_ok(
        &client,
        "get_public_script_version_detail",
        json!({"id": id}),
    )
    .await?
    {
        assert_eq!(detail["content"], "echo shared \"$1\"");
    }
    for list in both_ok(&client, "get_script_list", scope.clone()).await? {
        assert_eq!(list["total"], 0, "{list}");
    }
    // A public script is not one of the business's, for the business APIs.
    both_refused(
        &client,
        "get_script_version_detail",
        with(&scope, json!({"id": id})),
        1_243_001,
        "script_id",
    )
    .await?;

    // Any scope runs it, by version or by script.
    let mut run = cluster.script_request(
        "",
        &[host],
        json!({"script_id": script_id, "script_param": b64("there")}),
    );
    run.as_object_mut().unwrap().remove("script_content");
    let (job, step, _) = cluster.run_job(run).await?;
    assert_eq!(cluster.logs(job, step).await?[0].1, "shared there\n");

    // The public-script grant is not the inventory's: the curator may not create accounts.
    let refused = curator
        .call_raw("create_account", json!({"bk_scope_type": "biz", "bk_scope_id": "3", "account": "root", "alias": "mine", "type": 1, "category": 1}))
        .await?;
    assert_eq!(refused["code"], 1_238_001, "{refused}");

    // The other writes are the curator's too.
    for (api, body) in [
        (
            "update_public_script_basic",
            json!({"script_id": script_id, "name": "n"}),
        ),
        (
            "create_public_script_version",
            json!({"script_id": script_id, "content": b64("x"), "version": "2"}),
        ),
        (
            "update_public_script_version",
            json!({"script_id": script_id, "script_version_id": id, "content": b64("x")}),
        ),
        (
            "disable_public_script_version",
            json!({"script_id": script_id, "script_version_id": id}),
        ),
        (
            "delete_public_script_version",
            json!({"script_id": script_id, "script_version_id": id}),
        ),
        ("delete_public_script", json!({"script_id": script_id})),
    ] {
        let refused = client.call_raw(api, body).await?;
        assert_eq!(refused["code"], 1_238_001, "{api}: {refused}");
    }
    let renamed = curator
        .call(
            "update_public_script_basic",
            json!({"script_id": script_id, "name": "renamed"}),
        )
        .await?;
    assert_eq!(renamed["name"], "renamed");
    let v2 = curator
        .call(
            "create_public_script_version",
            json!({"script_id": script_id, "content": b64("echo 2"), "version": "2"}),
        )
        .await?;
    for versions in both_ok(
        &client,
        "get_public_script_version_list",
        json!({"script_id": script_id}),
    )
    .await?
    {
        assert_eq!(versions["total"], 2, "{versions}");
    }
    curator
        .call(
            "delete_public_script_version",
            json!({"script_id": script_id, "script_version_id": v2["id"]}),
        )
        .await?;
    curator
        .call_raw("delete_public_script", json!({"script_id": script_id}))
        .await?;
    for list in both_ok(&client, "get_public_script_list", json!({})).await? {
        assert_eq!(list["total"], 0, "{list}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_are_listed_created_changed_and_deleted_as_in_bk_job() -> Result<()> {
    let (cluster, client, scope, host) = one_agent().await?;
    for page in both_ok(
        &client,
        "get_account_list",
        with(&scope, json!({"alias": "root"})),
    )
    .await?
    {
        let root = &page["data"][0];
        assert_eq!(root["account"], "root", "{page}");
        for field in ["creator", "last_modify_user"] {
            assert!(root[field].is_string(), "{field}: {root}");
        }
        for field in ["create_time", "last_modify_time", "id", "category", "type"] {
            assert!(root[field].is_i64(), "{field}: {root}");
        }
        assert!(root.get("db_system_account_id").is_some(), "{root}");
        assert_eq!(root["os"], "Linux");
    }

    let created = client
        .call(
            "create_account",
            with(&scope, json!({"account": "root", "alias": "admin-root", "type": 1, "category": 1, "description": "the superuser"})),
        )
        .await?;
    assert_eq!(created["alias"], "admin-root", "{created}");
    assert_eq!(created["creator"], client.username.as_str());
    assert_eq!(created["description"], "the superuser");
    assert_eq!(created["bk_scope_id"], scope["bk_scope_id"]);
    let id = created["id"].as_i64().unwrap();
    // It runs jobs at once, and is a revision of the inventory.
    let (_, _, status) = cluster
        .run_job(cluster.script_request("id -un", &[host], json!({"account_alias": "admin-root"})))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    let history = client
        .call("get_inventory_history", json!({"limit": 1}))
        .await?;
    assert!(
        history[0]["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("create_account {id}")),
        "{history}"
    );

    // Refusals, with bk-job's codes.
    let refusals: Vec<(&str, Value, i64, &str)> = vec![
        (
            "create_account",
            json!({"account": "root", "alias": "admin-root", "type": 1, "category": 1}),
            1_243_007,
            "alias",
        ),
        (
            "create_account",
            json!({"alias": "x", "type": 1, "category": 1}),
            1_241_004,
            "account",
        ),
        (
            "create_account",
            json!({"account": "root", "alias": "w", "type": 2, "category": 1}),
            1_241_011,
            "type",
        ),
        (
            "create_account",
            json!({"account": "root", "alias": "p", "type": 1, "category": 1, "password": "secret"}),
            1_241_011,
            "password",
        ),
        (
            "create_account",
            json!({"account": "-rf", "alias": "bad", "type": 1, "category": 1}),
            1_240_003,
            "account",
        ),
        (
            "create_account",
            json!({"account": "root", "alias": "db", "type": 1, "category": 2}),
            1_240_003,
            "category",
        ),
        (
            "update_account",
            json!({"id": 999_999, "alias": "x"}),
            1_244_003,
            "id",
        ),
        (
            "update_account",
            json!({"id": id, "alias": "root"}),
            1_243_007,
            "alias",
        ),
        ("delete_account", json!({}), 1_241_004, "id"),
    ];
    for (api, body, code, field) in refusals {
        both_refused(&client, api, with(&scope, body), code, field).await?;
    }

    // Changes through the GET form too; the creator stays, the modifier is recorded.
    let other = ApiClient::new(
        &cluster.info.api_url,
        &client.app_code,
        &client.app_secret,
        "dave",
    );
    let updated = other
        .get_raw(
            "update_account",
            with(
                &scope,
                json!({"id": id, "alias": "superuser", "description": "renamed"}),
            ),
        )
        .await?;
    assert_eq!(updated["code"], 0, "{updated}");
    let updated = &updated["data"];
    assert_eq!(updated["alias"], "superuser");
    assert_eq!(updated["description"], "renamed");
    assert_eq!(updated["creator"], client.username.as_str());
    assert_eq!(updated["last_modify_user"], "dave");
    assert!(updated["last_modify_time"].as_i64() >= created["last_modify_time"].as_i64());

    let deleted = client
        .call("delete_account", with(&scope, json!({"id": id})))
        .await?;
    assert_eq!(deleted["alias"], "superuser", "{deleted}");
    let refused = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("true", &[host], json!({"account_alias": "superuser"})),
        )
        .await?;
    assert_eq!(refused["code"], 1_244_003, "{refused}");
    Ok(())
}

/// One v4 call: its HTTP status and body, credentials in the gateway's header.
async fn v4(
    client: &ApiClient,
    method: reqwest::Method,
    api: &str,
    params: Value,
) -> Result<(u16, Value)> {
    let url = format!("{}/api/v4/{api}", client.base);
    let auth = json!({"bk_app_code": client.app_code, "bk_app_secret": client.app_secret, "bk_username": client.username});
    let http = reqwest::Client::new();
    let request = http
        .request(method.clone(), &url)
        .header("X-Bkapi-Authorization", auth.to_string());
    let request = if method == reqwest::Method::GET {
        let pairs: Vec<(String, String)> = params
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Array(items) => items
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        request.query(&pairs)
    } else {
        request.json(&params)
    };
    let reply = request.send().await?;
    let status = reply.status().as_u16();
    Ok((status, reply.json().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn v4_runs_scripts_on_hosts_and_reports_execute_objects() -> Result<()> {
    use reqwest::Method;
    let (_cluster, client, scope, host) = one_agent().await?;
    let (status, accepted) = v4(
        &client,
        Method::POST,
        "fast_execute_script",
        with(
            &scope,
            json!({"script_content": b64("echo v4 \"$1\""), "script_language": 1, "script_param": b64("ok"),
                   "param_sensitive": false, "account_alias": "root",
                   "execute_target": {"host_list": [{"bk_host_id": host}]}}),
        ),
    )
    .await?;
    assert_eq!(status, 200, "{accepted}");
    assert!(
        accepted.get("code").is_none(),
        "v4 has no v3 envelope: {accepted}"
    );
    let job = accepted["data"]["job_instance_id"].as_i64().unwrap();
    let step = accepted["data"]["step_instance_id"].as_i64().unwrap();

    let params = with(
        &scope,
        json!({"job_instance_id": job, "return_ip_result": true}),
    );
    let finished = fleetrun_tests::eventually(
        std::time::Duration::from_secs(30),
        "the v4 job ends",
        || {
            let client = client.clone();
            let params = params.clone();
            async move {
                let (status, body) = v4(&client, Method::GET, "get_job_instance_status", params)
                    .await
                    .ok()?;
                assert_eq!(status, 200, "{body}");
                (body["data"]["finished"] == true).then_some(body["data"].clone())
            }
        },
    )
    .await?;
    assert_eq!(finished["job_instance"]["status"], 3, "{finished}");
    let step_status = &finished["step_instance_list"][0];
    assert_eq!(step_status["execute_count"], 0);
    // bk-job's v4 gateway document names these `step_ip_result_list` with v3's host fields.
    let result = &step_status["step_ip_result_list"][0];
    assert_eq!(result["bk_host_id"], host, "{result}");
    assert_eq!(result["bk_cloud_id"], 0, "{result}");
    assert!(result["ip"].is_string(), "{result}");
    assert_eq!(result["status"], 9);
    assert_eq!(result["exit_code"], 0);

    let window =
        json!({"create_time_start": now_ms() - 60_000, "create_time_end": now_ms() + 60_000});
    let (status, list) = v4(
        &client,
        Method::GET,
        "get_job_instance_list",
        with(&scope, window.clone()),
    )
    .await?;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["data"]["job_instance_list"][0]["job_instance_id"], job,
        "{list}"
    );
    assert_eq!(
        list["data"]["job_instance_list"][0]["job_plan_id"], -1,
        "{list}"
    );

    for method in [Method::POST, Method::GET] {
        let (status, logs) = v4(
            &client,
            method.clone(),
            "batch_get_job_instance_execute_object_log",
            with(
                &scope,
                json!({"job_instance_id": job, "step_instance_id": step, "host_id_list": [host]}),
            ),
        )
        .await?;
        assert_eq!(status, 200, "{method}: {logs}");
        let log = &logs["data"]["script_step_execute_object_logs"][0];
        assert_eq!(log["log_content"], "v4 ok\n", "{logs}");
        assert_eq!(log["execute_object"]["host"]["bk_host_id"], host);
    }

    // Failures: HTTP status and v4's error object.
    let refusals: Vec<(Method, &str, Value, u16, &str, &str)> = vec![
        (
            Method::GET,
            "get_job_instance_status",
            json!({"job_instance_id": 999_999}),
            404,
            "NOT_FOUND",
            "job_instance_id",
        ),
        (
            Method::GET,
            "get_job_instance_status",
            json!({}),
            400,
            "INVALID_ARGUMENT",
            "job_instance_id",
        ),
        (
            Method::POST,
            "fast_execute_script",
            json!({"script_content": b64("true"), "script_language": 1, "account_alias": "root"}),
            400,
            "INVALID_ARGUMENT",
            "execute_target",
        ),
        (
            Method::POST,
            "fast_execute_script",
            json!({"script_content": b64("true"), "script_language": 1, "account_alias": "root", "execute_target": {"kube_container_filters": [{"kube_cluster_filter": {"cluster_uid_list": ["c"]}}]}}),
            400,
            "INVALID_ARGUMENT",
            "kube_container_filters",
        ),
        (
            Method::POST,
            "fast_execute_script",
            json!({"script_content": b64("true"), "script_language": 1, "account_alias": "root", "execute_target": {"host_list": [{"bk_host_id": 424_242}]}}),
            400,
            "INVALID_ARGUMENT",
            "execute_target",
        ),
        (
            Method::POST,
            "batch_get_job_instance_execute_object_log",
            json!({"job_instance_id": job, "step_instance_id": step, "host_id_list": (0..101).collect::<Vec<i64>>()}),
            400,
            "INVALID_ARGUMENT",
            "host_id_list",
        ),
        (
            Method::GET,
            "get_job_instance_list",
            with(&window, json!({"length": 201})),
            400,
            "INVALID_ARGUMENT",
            "length",
        ),
        (
            Method::GET,
            "get_job_instance_list",
            with(&window, json!({"offset": 10_001})),
            400,
            "INVALID_ARGUMENT",
            "offset",
        ),
    ];
    for (method, api, params, http, name, field) in refusals {
        let (status, body) = v4(&client, method.clone(), api, with(&scope, params)).await?;
        assert_eq!(status, http, "{method} {api}: {body}");
        assert_eq!(body["error"]["code"], name, "{method} {api}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{api}: {body}"
        );
        assert!(body.get("data").is_none(), "{body}");
    }
    let stranger = ApiClient::new(&client.base, &client.app_code, "wrong", "eve");
    let (status, body) = v4(
        &stranger,
        Method::GET,
        "get_job_instance_status",
        with(&scope, json!({"job_instance_id": job})),
    )
    .await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "UNAUTHENTICATED");
    let (status, body) = v4(
        &client,
        Method::GET,
        "get_job_instance_status",
        json!({"bk_scope_type": "biz", "bk_scope_id": "99", "job_instance_id": job}),
    )
    .await?;
    assert_eq!(status, 400, "a business that does not exist: {body}");
    Ok(())
}

/// A callback receiver answering 201 to JSON and 200 to anything else; records each request's
/// content type.
async fn picky_receiver() -> Result<(String, std::sync::Arc<std::sync::Mutex<Vec<String>>>)> {
    use axum::{extract::State, http::HeaderMap, http::StatusCode, routing::post};
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;
    async fn receive(State(seen): State<Seen>, headers: HeaderMap) -> StatusCode {
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let json = content_type == "application/json";
        seen.lock().unwrap().push(content_type);
        if json {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        }
    }
    let seen: Seen = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(seen.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, seen))
}

async fn settled(client: &ApiClient, scope: &Value, job: i64) -> Result<Value> {
    fleetrun_tests::eventually(
        std::time::Duration::from_secs(30),
        "the callback settles",
        || {
            let client = client.clone();
            let body = with(scope, json!({"job_instance_id": job}));
            async move {
                let status = client.call("get_callback_status", body).await.ok()?;
                matches!(status["status"].as_str(), Some("delivered" | "failed")).then_some(status)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_can_be_delivered_as_bk_job_delivers_them() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let client = cluster.client();
    let scope = cluster.info.scope();
    let host = cluster.host_ids()[0];

    // fleetrun's default: any 2xx to the JSON post is delivered.
    let (url, seen) = picky_receiver().await?;
    let (job, _, _) = cluster
        .run_job(cluster.script_request("true", &[host], json!({"callback_url": url})))
        .await?;
    let status = settled(&client, &scope, job).await?;
    assert_eq!(status["status"], "delivered", "{status}");
    assert_eq!(status["attempts"][0]["http_status"], 201, "{status}");
    assert_eq!(*seen.lock().unwrap(), vec!["application/json".to_owned()]);

    // bk-job's: only 200 is delivered; a 201 to the JSON post is followed at once by the form post.
    cluster.kill_controller()?;
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    assert!(config.contains("[callbacks]\n"), "{config}");
    std::fs::write(
        &cluster.controller_config,
        config.replace("[callbacks]\n", "[callbacks]\ncompatibility = \"bk-job\"\n"),
    )?;
    cluster.start_controller().await?;
    let agents: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster
        .wait_online(&agents, std::time::Duration::from_secs(30))
        .await?;
    let (url, seen) = picky_receiver().await?;
    let (job, _, _) = cluster
        .run_job(cluster.script_request("true", &[host], json!({"callback_url": url})))
        .await?;
    let status = settled(&client, &scope, job).await?;
    assert_eq!(status["status"], "delivered", "{status}");
    assert_eq!(status["attempts"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["attempts"][0]["http_status"], 200, "{status}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            "application/json".to_owned(),
            "application/x-www-form-urlencoded".to_owned()
        ]
    );
    Ok(())
}
