//! Hostile input through real HTTP: text that would forge log lines, numbers at the ends of
//! their range. Each gets a bk-job code naming the field, never a panic or a forged line.

use std::time::Duration;

use anyhow::Result;
use fleetrun_tests::{reply_message, start_cluster};
use serde_json::{Value, json};

/// Waits until the controller has logged `requests` refusals (each request ends with a line
/// carrying its code), then checks that no line starts with the forged text.
async fn assert_no_forged_line(
    cluster: &fleetrun_tests::TestCluster,
    requests: usize,
) -> Result<()> {
    let log = fleetrun_tests::eventually(Duration::from_secs(10), "requests logged", || async {
        let log = std::fs::read_to_string(&cluster.controller_log).ok()?;
        (log.matches("refused").count() >= requests).then_some(log)
    })
    .await?;
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.trim_start().starts_with("fake log line"))
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    assert!(
        log.contains(r"foo\nfake log line"),
        "the API name is logged, escaped"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_text_cannot_forge_a_controller_log_line() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let info = &cluster.info;
    let http = reqwest::Client::new();
    // Before any credentials are checked, and after (an unknown API of a known app).
    let credentials = format!(
        "bk_app_code={}&bk_app_secret={}&bk_username=admin",
        info.bk_app_code, info.bk_app_secret
    );
    for query in ["", credentials.as_str()] {
        let reply: Value = http
            .get(format!(
                "{}/api/v3/foo%0Afake%20log%20line/?{query}",
                info.api_url
            ))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(reply["result"], false, "{reply}");
    }
    assert_no_forged_line(&cluster, 2).await?;

    // An operator name with a line break in it.
    let envelope = cluster
        .client()
        .call_raw(
            "get_account_list",
            json!({"bk_scope_type": "biz", "bk_scope_id": info.bk_scope_id,
                   "bk_username": "me\nfake log line from the username"}),
        )
        .await?;
    assert_eq!(envelope["code"], 1_240_003, "{envelope}");
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .starts_with("bk_username"),
        "{envelope}"
    );

    assert_no_forged_line(&cluster, 3).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn job_list_times_at_the_ends_of_their_range_are_refused_by_name() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let scope = cluster.info.scope();
    let list = |start: i64, end: i64| {
        let mut request = scope.clone();
        request["create_time_start"] = json!(start);
        request["create_time_end"] = json!(end);
        client.call_raw("get_job_instance_list", request)
    };
    let day = 24 * 3600 * 1000_i64;
    // bk-job's rules and codes: each time at least 1 (1241007), the end after the start
    // (1241007), at most 30 days (1241002); the message names the field first.
    let missing_or_illegal = 1_241_007;
    let illegal = 1_241_002;
    let refused = [
        // Would overflow end - start (a panic, or a wrapped window past 30 days).
        (i64::MIN, i64::MAX, missing_or_illegal, "create_time_start"),
        (i64::MIN, 0, missing_or_illegal, "create_time_start"),
        (i64::MIN, 1, missing_or_illegal, "create_time_start"),
        (-1, i64::MAX, missing_or_illegal, "create_time_start"),
        (0, -1, missing_or_illegal, "create_time_start"),
        (
            i64::MIN,
            i64::MIN + 1,
            missing_or_illegal,
            "create_time_start",
        ),
        (1, i64::MAX, illegal, "create_time_start|create_time_end"),
        (i64::MAX, 0, missing_or_illegal, "create_time_end"),
        (
            i64::MAX,
            1,
            missing_or_illegal,
            "create_time_start|create_time_end",
        ),
        (
            1,
            31 * day + 2,
            illegal,
            "create_time_start|create_time_end",
        ),
    ];
    for (start, end, code, field) in refused {
        let envelope = list(start, end).await?;
        assert_eq!(envelope["code"], code, "{start}..{end}: {envelope}");
        assert!(
            envelope["message"].as_str().unwrap().starts_with(field),
            "{start}..{end}: {envelope}"
        );
    }
    // As text in a query string too.
    let reply: Value = reqwest::Client::new()
        .get(format!(
            "{}/api/v3/get_job_instance_list/?bk_app_code={}&bk_app_secret={}&bk_username=admin\
             &bk_scope_type=biz&bk_scope_id={}&create_time_start={}&create_time_end={}",
            cluster.info.api_url,
            cluster.info.bk_app_code,
            cluster.info.bk_app_secret,
            cluster.info.bk_scope_id,
            i64::MIN,
            i64::MAX
        ))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(reply["code"], 1_241_007, "{reply}");

    // Windows at the far end of the range, or exactly 30 days long, are fine.
    for (start, end) in [
        (i64::MAX - 1, i64::MAX),
        (1, 30 * day + 1),
        (i64::MAX - 30 * day, i64::MAX),
    ] {
        let envelope = list(start, end).await?;
        assert_eq!(envelope["code"], 0, "{start}..{end}: {envelope}");
        assert_eq!(envelope["data"]["total"], 0, "{envelope}");
    }
    Ok(())
}

/// A NUL in any text field is refused by name before anything is stored: PostgreSQL's text
/// columns refuse one, and a job half-created around it would fail deep in the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_character_in_a_field_is_refused_by_name() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let hosts = cluster.host_ids();
    for (field, value) in [
        ("task_name", json!("nightly\u{0}backup")),
        ("bk_username", json!("ad\u{0}min")),
    ] {
        let mut request = cluster.script_request("echo hi", &hosts, json!({}));
        request[field] = value;
        let reply: Value = client.call_raw("fast_execute_script", request).await?;
        assert_eq!(reply["code"], 1_240_003, "{field}: {reply}");
        assert!(reply_message(&reply).starts_with(field), "{field}: {reply}");
    }
    let mut request = cluster.script_request("echo hi", &hosts, json!({}));
    request["target_server"]["ip_list"] = json!([{"bk_cloud_id": 0, "ip": "10.0.0.1\u{0}"}]);
    let reply: Value = client.call_raw("fast_execute_script", request).await?;
    assert_eq!(reply["code"], 1_240_003, "{reply}");
    assert!(
        reply_message(&reply).starts_with("target_server.ip_list[0].ip"),
        "{reply}"
    );
    Ok(())
}
