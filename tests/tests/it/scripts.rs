//! The script library through the bk-job APIs, and jobs that run its versions.

use anyhow::Result;
use fleetrun_tests::{b64, start_cluster};
use serde_json::{Value, json};

fn with(base: &Value, extra: Value) -> Value {
    let mut out = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        out[k] = v.clone();
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_follow_bk_jobs_status_rules_and_jobs_run_them() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let scope = cluster.info.scope();
    let hosts = cluster.host_ids();

    let v1 = client
        .call("create_script", with(&scope, json!({
            "name": "greet", "script_language": 1, "content": b64("echo v1 \"$1\""), "version": "1.0",
        })))
        .await?;
    assert_eq!(
        v1["status"], 0,
        "a new script's first version is a draft: {v1}"
    );
    let script_id = v1["script_id"].as_str().unwrap().to_owned();
    let v1_id = v1["id"].as_i64().unwrap();
    assert_eq!(
        v1["content"], "echo v1 \"$1\"",
        "bk-job returns the text: {v1}"
    );

    let job = |extra: Value| {
        let mut request = cluster.script_request("unused", &hosts, extra);
        request.as_object_mut().unwrap().remove("script_content");
        request.as_object_mut().unwrap().remove("script_language");
        request
    };
    // No online version yet: the script cannot run by its id, nor the draft by version id.
    let refused = client
        .call_raw("fast_execute_script", job(json!({"script_id": script_id})))
        .await?;
    assert_eq!(refused["code"], 1_244_018, "{refused}");
    let refused = client
        .call_raw(
            "fast_execute_script",
            job(json!({"script_version_id": v1_id})),
        )
        .await?;
    assert_eq!(refused["code"], 1_244_018, "{refused}");

    let published = client
        .call(
            "publish_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "script_version_id": v1_id}),
            ),
        )
        .await?;
    assert_eq!(published["status"], 1);
    let (job_id, step, status) = cluster
        .run_job(job(
            json!({"script_id": script_id, "script_param": b64("there")}),
        ))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(cluster.logs(job_id, step).await?[0].1, "v1 there\n");

    // A second version, published, sends the first offline; offline versions still run.
    let v2 = client
        .call("create_script_version", with(&scope, json!({
            "script_id": script_id, "content": b64("echo v2"), "version": "2.0", "version_desc": "newer",
        })))
        .await?;
    let v2_id = v2["id"].as_i64().unwrap();
    let duplicate = client
        .call_raw(
            "create_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "content": b64("x"), "version": "2.0"}),
            ),
        )
        .await?;
    assert_eq!(duplicate["code"], 1_243_036, "{duplicate}");
    client
        .call(
            "publish_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "script_version_id": v2_id}),
            ),
        )
        .await?;
    let detail = client
        .call(
            "get_script_version_detail",
            with(&scope, json!({"id": v1_id})),
        )
        .await?;
    assert_eq!(detail["status"], 2, "{detail}");
    let (job_id, step, _) = cluster
        .run_job(job(json!({"script_id": script_id})))
        .await?;
    assert_eq!(cluster.logs(job_id, step).await?[0].1, "v2\n");
    // script_version_id wins over script_id and over script_content.
    let mut both = job(
        json!({"script_id": script_id, "script_version_id": v1_id, "script_param": b64("old")}),
    );
    both["script_content"] = json!(b64("echo content"));
    both["script_language"] = json!(1);
    let (job_id, step, _) = cluster.run_job(both).await?;
    assert_eq!(cluster.logs(job_id, step).await?[0].1, "v1 old\n");

    // Disabled versions never run.
    client
        .call(
            "disable_script_version",
            with(
                &scope,
                json!({"script_id": script_id, "script_version_id": v1_id}),
            ),
        )
        .await?;
    let refused = client
        .call_raw(
            "fast_execute_script",
            job(json!({"script_version_id": v1_id})),
        )
        .await?;
    assert_eq!(refused["code"], 1_244_018, "{refused}");

    // Lists and details.
    let list = client
        .call(
            "get_script_list",
            with(&scope, json!({"name": "gre", "script_language": 0})),
        )
        .await?;
    assert_eq!(list["total"], 1);
    assert_eq!(list["data"][0]["id"], script_id);
    assert_eq!(list["data"][0]["online_script_version_id"], v2_id);
    let versions = client
        .call(
            "get_script_version_list",
            with(&scope, json!({"script_id": script_id})),
        )
        .await?;
    assert_eq!(versions["total"], 2);
    assert!(versions["data"][0].get("content").is_none());
    let by_label = client
        .call(
            "get_script_version_detail",
            with(&scope, json!({"script_id": script_id, "version": "2.0"})),
        )
        .await?;
    assert_eq!(by_label["id"], v2_id);
    assert_eq!(by_label["content"], "echo v2");

    // Bad requests.
    for (api, body, code) in [
        (
            "create_script",
            json!({"script_language": 1, "content": b64("x"), "version": "1"}),
            1_241_004,
        ),
        (
            "create_script",
            json!({"name": "n", "script_language": 9, "content": b64("x"), "version": "1"}),
            1_241_005,
        ),
        (
            "create_script",
            json!({"name": "n", "script_language": 1, "content": "%%", "version": "1"}),
            1_240_003,
        ),
        (
            "create_script",
            json!({"name": "n".repeat(61), "script_language": 1, "content": b64("x"), "version": "1"}),
            1_240_003,
        ),
        ("get_script_version_detail", json!({"id": 1}), 1_243_001),
        (
            "get_script_version_list",
            json!({"script_id": "nope"}),
            1_243_001,
        ),
        (
            "publish_script_version",
            json!({"script_id": script_id, "script_version_id": 42}),
            1_243_001,
        ),
        (
            "fast_execute_script",
            job(json!({"script_id": "nope"})),
            1_243_001,
        ),
    ] {
        let envelope = client.call_raw(api, with(&scope, body)).await?;
        assert_eq!(envelope["code"], code, "{api}: {envelope}");
    }
    Ok(())
}
