//! What operators and their tools see: paths that name no API answer HTTP 404 in bk-job's
//! envelope, and `FLEETRUN_LOG_FORMAT=json` makes every line of the controller's log a JSON
//! object whose request lines name the request, the app and the operator.

use std::time::Duration;

use anyhow::Result;
use fleetrun_tests::start_cluster;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn paths_that_name_no_api_answer_404_in_the_envelope() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let http = reqwest::Client::new();
    let base = &cluster.info.api_url;
    let credentials = json!({
        "bk_app_code": cluster.info.bk_app_code,
        "bk_app_secret": cluster.info.bk_app_secret,
        "bk_username": "admin",
    });
    let mut paths = Vec::new();
    for prefix in [
        "/api/v3",
        "/api/c/compapi/v2/jobv3",
        "/api/c/compapi/jobv3",
        "/fleetrun/v1",
    ] {
        paths.push(format!("{prefix}/no_such_api"));
        paths.push(format!("{prefix}/no_such_api/"));
        paths.push(format!("{prefix}/fast_execute_script/extra"));
    }
    paths.extend(["/".into(), "/api".into(), "/nothing/here".into()]);
    for path in &paths {
        for authenticated in [true, false] {
            let body = if authenticated {
                credentials.clone()
            } else {
                json!({})
            };
            let reply = http
                .post(format!("{base}{path}"))
                .json(&body)
                .send()
                .await?;
            assert_eq!(reply.status(), 404, "POST {path}");
            let envelope: Value = reply.json().await?;
            assert_eq!(envelope["result"], false, "{path}: {envelope}");
            assert_eq!(envelope["code"], 1_640_401, "{path}: {envelope}");
            assert!(
                envelope["request_id"]
                    .as_str()
                    .is_some_and(|id| !id.is_empty())
            );
        }
        let reply = http.get(format!("{base}{path}")).send().await?;
        assert_eq!(reply.status(), 404, "GET {path}");
    }
    // A known API is still served under every style.
    for prefix in [
        "/api/v3",
        "/api/c/compapi/v2/jobv3",
        "/api/c/compapi/jobv3",
        "/fleetrun/v1",
    ] {
        let reply = http
            .post(format!("{base}{prefix}/get_account_list/"))
            .json(&{
                let mut body = credentials.clone();
                body["bk_scope_type"] = json!("biz");
                body["bk_scope_id"] = json!(cluster.info.bk_scope_id);
                body
            })
            .send()
            .await?;
        assert_eq!(reply.status(), 200, "{prefix}");
        let envelope: Value = reply.json().await?;
        assert_eq!(envelope["code"], 0, "{prefix}: {envelope}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_a_line_and_name_the_caller() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    std::fs::remove_file(&cluster.controller_log)?;
    cluster.log_format = Some("json".into());
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let host = cluster.host_id("agent-1");
    let (job, _, status) = cluster
        .run_job(cluster.script_request("echo logged", &[host], json!({})))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");

    let log = std::fs::read_to_string(&cluster.controller_log)?;
    let lines: Vec<Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object())
    );
    let accepted = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job accepted")
        .unwrap_or_else(|| panic!("no line for the accepted job:\n{log}"));
    let span = &accepted["span"];
    assert_eq!(span["name"], "api", "{accepted}");
    assert!(
        span["request_id"].as_str().is_some_and(|id| id.len() == 32),
        "{accepted}"
    );
    assert_eq!(span["app"], cluster.info.bk_app_code.as_str(), "{accepted}");
    assert_eq!(span["operator"], "admin", "{accepted}");
    assert_eq!(accepted["fields"]["job"], job, "{accepted}");
    // The engine's lines about the job carry its id.
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "job finished" && l["fields"]["job"] == job),
        "{log}"
    );
    Ok(())
}
