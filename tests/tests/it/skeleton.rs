//! The whole path, with real binaries: API → controller → QUIC with mutual TLS → agent → script.

use std::time::Duration;

use anyhow::Result;
use fleetrun_proto::{Hello, HelloReply, OsType, PROTOCOL_VERSION};
use fleetrun_tests::{b64, eventually, host_results, pki, start_cluster};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn a_job_on_two_agents_succeeds_with_each_hosts_output() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    // The cgroup path names the agent that ran the script, so each log proves its own host.
    let script =
        "echo \"out $1\"; echo err >&2; grep -o 'agent-[0-9]*' /proc/self/cgroup | head -n1";
    let request = cluster.script_request(script, &hosts, json!({"script_param": b64("'a b'")}));
    let (job, step, status) = cluster.run_job(request).await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(status["finished"], true);
    let results = host_results(&status);
    assert_eq!(results.len(), 2);
    for result in &results {
        assert_eq!(result["status"], 9, "{result}");
        assert_eq!(result["exit_code"], 0);
    }
    let logs = cluster.logs(job, step).await?;
    assert_eq!(logs.len(), 2);
    for host in &cluster.info.hosts {
        let (_, log) = logs
            .iter()
            .find(|(id, _)| *id == host.bk_host_id)
            .expect("a log per host");
        assert_eq!(
            log,
            &format!("out a b\nerr\n{}\n", host.agent_id),
            "host {}",
            host.agent_id
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn output_arrives_while_the_script_still_runs() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let client = cluster.client();
    let request = cluster.script_request("echo first; sleep 5; echo second", &hosts, json!({}));
    let accepted = client.call("fast_execute_script", request).await?;
    let (job, step) = (
        accepted["job_instance_id"].as_i64().unwrap(),
        accepted["step_instance_id"].as_i64().unwrap(),
    );
    eventually(Duration::from_secs(4), "first line readable", || async {
        let logs = cluster.logs(job, step).await.ok()?;
        logs[0].1.contains("first").then_some(())
    })
    .await?;
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    let running = client.call("get_job_instance_status", query).await?;
    assert_eq!(
        running["finished"], false,
        "the first line must be readable before the job ends"
    );
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3);
    assert_eq!(cluster.logs(job, step).await?[0].1, "first\nsecond\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_app_secret_gets_an_error_envelope() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let http = reqwest::Client::new();
    let mut request = cluster.script_request("echo hi", &cluster.host_ids(), json!({}));
    request["bk_app_code"] = json!(cluster.info.bk_app_code);
    request["bk_app_secret"] = json!("not-the-secret");
    request["bk_username"] = json!("admin");
    for path in [
        "/api/v3/fast_execute_script/",
        "/api/v3/fast_execute_script",
        "/api/c/compapi/v2/jobv3/fast_execute_script/",
        "/api/c/compapi/jobv3/fast_execute_script/",
    ] {
        let reply = http
            .post(format!("{}{path}", cluster.info.api_url))
            .json(&request)
            .send()
            .await?;
        assert_eq!(reply.status(), 200);
        let envelope: Value = reply.json().await?;
        assert_eq!(envelope["result"], false, "{path}: {envelope}");
        assert_eq!(envelope["code"], 1_640_001, "{path}: {envelope}");
        assert!(
            envelope["request_id"]
                .as_str()
                .is_some_and(|id| id.len() == 32),
            "{envelope}"
        );
    }
    // The same request with the right secret in the API gateway header is accepted.
    let mut request = cluster.script_request("echo hi", &cluster.host_ids(), json!({}));
    request
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("bk_app") && k != "bk_username");
    let header = json!({
        "bk_app_code": cluster.info.bk_app_code,
        "bk_app_secret": cluster.info.bk_app_secret,
        "bk_username": "alice",
    });
    let envelope: Value = http
        .post(format!(
            "{}/api/v3/fast_execute_script/",
            cluster.info.api_url
        ))
        .header("X-Bkapi-Authorization", header.to_string())
        .json(&request)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(envelope["result"], true, "{envelope}");
    // Query APIs also answer GET with query parameters.
    let job = envelope["data"]["job_instance_id"].as_i64().unwrap();
    let url = format!(
        "{}/api/c/compapi/v2/jobv3/get_job_instance_status/?bk_app_code={}&bk_app_secret={}&bk_username=alice&bk_scope_type=biz&bk_scope_id=2&job_instance_id={job}&return_ip_result=True",
        cluster.info.api_url, cluster.info.bk_app_code, cluster.info.bk_app_secret
    );
    let envelope: Value = http.get(url).send().await?.json().await?;
    assert_eq!(envelope["result"], true, "{envelope}");
    assert_eq!(envelope["data"]["job_instance"]["job_instance_id"], job);
    Ok(())
}

/// Writes an agent config for an agent that is not part of the cluster.
fn extra_agent_config(
    cluster: &fleetrun_tests::TestCluster,
    name: &str,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = cluster.dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "controller = \"{}\"\nbind = \"127.0.0.99:0\"\nwork_dir = \"{}\"\ncgroup_name = \"fleetrun-test-{name}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            cluster.info.agent_addr,
            dir.join("work").display(),
            ca.display(),
            cert.display(),
            key.display()
        ),
    )?;
    Ok((config, dir.join("agent.log")))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_certificate_from_another_ca_is_refused() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let foreign = pki::Ca::open_or_create(&cluster.dir().join("foreign-ca"), "someone else's CA")?;
    let cert = foreign.issue_agent("intruder")?;
    // It trusts the real CA, so it would accept the controller; the controller must not accept it.
    let (config, log) = extra_agent_config(
        &cluster,
        "intruder",
        &cluster.dir().join("certs/ca.pem"),
        &cert.cert,
        &cert.key,
    )?;
    let mut child = cluster.spawn("fleetrun-agent", &config, &log)?;
    let seen = eventually(
        Duration::from_secs(20),
        "the agent reports an authentication failure",
        || async {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("authentication failed").then_some(text)
        },
    )
    .await;
    child.kill()?;
    child.wait()?;
    let text = seen?;
    assert!(
        text.contains("UnknownCA") || text.contains("BadCertificate") || text.contains("unknown"),
        "{text}"
    );
    let hosts = cluster.client().hosts().await?;
    assert!(
        hosts.iter().all(|h| h["agent_id"] != "intruder"),
        "{hosts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_register_as_a_host_whose_certificate_it_does_not_hold() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let ca = pki::Ca::open_or_create(&cluster.dir().join("certs"), "unused")?;
    let intruder = ca.issue_agent("intruder")?;
    let victim = &cluster.info.hosts[0];
    let victim_id = victim.agent_id.clone();

    // A valid certificate of its own, but a hello that claims the victim's identity.
    let endpoint = fleetrun_net::client_endpoint(
        &fleetrun_net::TlsFiles {
            ca: ca.cert_path(),
            cert: intruder.cert.clone(),
            key: intruder.key.clone(),
        },
        "127.0.0.98:0".parse()?,
        fleetrun_net::Timing::default(),
    )?;
    let connection = endpoint
        .connect(cluster.info.agent_addr.parse()?, "fleetrun-controller")?
        .await?;
    let (mut send, recv) = connection.open_bi().await?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: victim_id.clone(),
        agent_version: "0".into(),
        hostname: "evil".into(),
        os_type: OsType::Linux,
        bk_cloud_id: 0,
        ips: vec!["10.9.9.9".parse()?],
    };
    fleetrun_net::send_frame(&mut send, &hello).await?;
    let reply: Option<HelloReply> = fleetrun_net::FramedRecv::new(recv).recv().await?;
    match reply {
        Some(HelloReply::Refused { reason }) => {
            assert!(
                reason.contains("certificate is for \"intruder\""),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // The same key with the victim's certificate does not even make a usable endpoint.
    let victim_cert = cluster.dir().join(format!("certs/agents/{victim_id}.pem"));
    let (config, log) = extra_agent_config(
        &cluster,
        "thief",
        &ca.cert_path(),
        &victim_cert,
        &intruder.key,
    )?;
    let mut thief = cluster.spawn("fleetrun-agent", &config, &log)?;
    let exited = eventually(
        Duration::from_secs(20),
        "the mismatched agent exits",
        || {
            let status = thief.try_wait().ok().flatten();
            async move { status }
        },
    )
    .await?;
    assert!(!exited.success());

    // The victim's host record is untouched and its real agent still online and working.
    let hosts = cluster.client().hosts().await?;
    let record = hosts
        .iter()
        .find(|h| h["agent_id"] == json!(victim_id))
        .unwrap();
    assert_eq!(record["online"], true);
    assert_ne!(record["ip"], "10.9.9.9");
    assert!(hosts.iter().all(|h| h["agent_id"] != "intruder"));
    let request = cluster.script_request("echo still mine", &cluster.host_ids(), json!({}));
    let (_, _, status) = cluster.run_job(request).await?;
    assert_eq!(status["job_instance"]["status"], 3);
    cluster.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_reconnects_by_itself_and_offline_hosts_end_310() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let killed = cluster.agents[1].agent_id.clone();
    cluster.kill_agent(1)?;
    cluster
        .wait_offline(&killed, Duration::from_secs(15))
        .await?;

    // A job on both: the live host succeeds, the offline one ends 310 and the job fails.
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo up", &hosts, json!({})))
        .await?;
    assert_eq!(status["job_instance"]["status"], 4, "{status}");
    let results = host_results(&status);
    let offline_host = cluster.info.hosts[1].bk_host_id;
    for result in &results {
        let expected = if result["bk_host_id"] == offline_host {
            310
        } else {
            9
        };
        assert_eq!(result["status"], expected, "{result}");
    }

    cluster.start_agent(1)?;
    cluster
        .wait_online(&[killed], Duration::from_secs(15))
        .await?;
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo back", &hosts, json!({})))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_reconnect_to_a_restarted_controller_and_history_survives() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let (job, step, _) = cluster
        .run_job(cluster.script_request("echo before", &hosts, json!({})))
        .await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    let old = cluster
        .client()
        .call("get_job_instance_status", query)
        .await?;
    assert_eq!(old["job_instance"]["status"], 3);
    assert!(
        cluster
            .logs(job, step)
            .await?
            .iter()
            .all(|(_, log)| log == "before\n")
    );
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo after", &hosts, json!({})))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    Ok(())
}
