//! What an agent with a valid certificate can no longer do: take another host's address, come
//! back after an operator revoked it or forgot its host, or pass a certificate meant for
//! something else as an agent's. Each attack is made the way an attacker would: a real agent
//! binary with a tampered configuration, or a raw QUIC client.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use fleetrun_proto::{Hello, HelloReply, OsType, PROTOCOL_VERSION};
use fleetrun_tests::{TestCluster, b64, eventually, host_results, pki, reached, start_cluster};
use serde_json::{Value, json};

const SECRET: &str = "s3cret-for-the-victim-only";

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits up to 20 s (failing as `what`) until agent `index`'s log says `says`; returns the log.
async fn agent_log_saying(
    cluster: &TestCluster,
    index: usize,
    what: &str,
    says: &str,
) -> Result<String> {
    let log = cluster.agents[index].log.clone();
    eventually(Duration::from_secs(20), what, || {
        let text = read(&log);
        async move { text.contains(says).then_some(text) }
    })
    .await
}

/// Rewrites one line (`key = ...`) of an agent's configuration.
fn set_agent_option(config: &Path, key: &str, value: &str) -> Result<()> {
    let text = std::fs::read_to_string(config)?;
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with(&format!("{key} = ")) {
                found = true;
                format!("{key} = {value}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    let mut text = lines.join("\n") + "\n";
    if !found {
        text = text.replacen("[tls]", &format!("{key} = {value}\n\n[tls]"), 1);
    }
    std::fs::write(config, text)?;
    Ok(())
}

/// A job by address with a sensitive parameter: what the forger is after.
/// Stops agent `index`, waits until the controller has seen it go, sets `options` (key, TOML
/// value) in its configuration and starts it again.
async fn restart_agent_with(
    cluster: &mut TestCluster,
    index: usize,
    options: &[(&str, String)],
) -> Result<()> {
    let agent_id = cluster.agents[index].agent_id.clone();
    cluster.kill_agent(index)?;
    cluster
        .wait_offline(&agent_id, Duration::from_secs(30))
        .await?;
    for (key, value) in options {
        set_agent_option(&cluster.agents[index].config, key, value)?;
    }
    cluster.start_agent(index)
}

fn by_ip_with_secret(cluster: &TestCluster, ip: &str) -> Value {
    cluster.script_request(
        "echo \"got $1\"",
        &[],
        json!({
            "target_server": {"ip_list": [{"bk_cloud_id": 0, "ip": ip}]},
            "is_param_sensitive": 1,
            "script_param": b64(SECRET),
        }),
    )
}

fn host_of<'a>(hosts: &'a [Value], agent_id: &str) -> &'a Value {
    hosts
        .iter()
        .find(|h| h["agent_id"] == agent_id)
        .unwrap_or_else(|| panic!("{agent_id} not listed: {hosts:?}"))
}

/// (victim, forger) agent indexes: the forger is the one with the lower host id, which held a
/// contested address under the old rule, so that winning by id would show here.
fn victim_and_forger(cluster: &TestCluster) -> (usize, usize) {
    if cluster.host_id("agent-1") > cluster.host_id("agent-2") {
        (0, 1)
    } else {
        (1, 0)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_reporting_another_hosts_address_is_refused() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let client = cluster.client();
    let (victim, forger) = victim_and_forger(&cluster);
    let victim_id = cluster.agents[victim].agent_id.clone();
    let forger_id = cluster.agents[forger].agent_id.clone();
    let victim_ip = cluster.agents[victim].ip.to_string();
    let forger_ip = cluster.agents[forger].ip.to_string();

    // The forger keeps its own valid certificate (which names its own address) and reports the
    // victim's address.
    restart_agent_with(&mut cluster, forger, &[("ip", format!("\"{victim_ip}\""))]).await?;
    let refusal =
        agent_log_saying(&cluster, forger, "the forger is refused", "does not name").await?;
    assert!(
        refusal.contains(&format!("reports address {victim_ip}, which its certificate does not name (it names {forger_ip})")),
        "{refusal}"
    );

    // Jobs sent to the victim's address reach the victim only, secret and all.
    let (job, step, status) = cluster
        .run_job(by_ip_with_secret(&cluster, &victim_ip))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(reached(&status), vec![cluster.host_id(&victim_id)]);
    let logs = cluster.logs(job, step).await?;
    assert!(
        logs.iter()
            .all(|(id, text)| *id == cluster.host_id(&victim_id) || !text.contains(SECRET)),
        "{logs:?}"
    );
    let hosts = client.hosts().await?;
    let forger_host = host_of(&hosts, &forger_id);
    assert_eq!(forger_host["online"], false, "{hosts:?}");
    assert_eq!(forger_host["ip"], forger_ip, "{hosts:?}");

    // A raw client with the forger's certificate and a hand-made hello gets the same answer.
    let reply = raw_hello(
        &cluster,
        &forger_id,
        &cluster.agents[forger].ip.into(),
        &victim_ip,
    )
    .await?;
    match reply {
        Some(HelloReply::Refused { reason }) => {
            assert!(reason.contains("does not name"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newcomer_on_a_held_address_is_quarantined_not_the_holder() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let client = cluster.client();
    let (victim, forger) = victim_and_forger(&cluster);
    let victim_id = cluster.agents[victim].agent_id.clone();
    let forger_id = cluster.agents[forger].agent_id.clone();
    let victim_ip = cluster.agents[victim].ip.to_string();

    // The forger gets a certificate naming no address (a CA that does not put them in) and
    // connects from the victim's address itself, as a machine moved onto it would.
    let ca = pki::Ca::open_or_create(&cluster.dir().join("certs"), "unused")?;
    let bare = ca.issue_agent(&forger_id)?;
    restart_agent_with(
        &mut cluster,
        forger,
        &[
            ("bind", format!("\"{victim_ip}:0\"")),
            ("cert", format!("\"{}\"", bare.cert.display())),
            ("key", format!("\"{}\"", bare.key.display())),
        ],
    )
    .await?;
    let hosts = eventually(
        Duration::from_secs(30),
        "the forger online with the victim's address",
        || {
            let client = client.clone();
            let (forger_id, victim_ip) = (forger_id.clone(), victim_ip.clone());
            async move {
                let hosts = client.hosts().await.ok()?;
                let h = hosts.iter().find(|h| h["agent_id"] == forger_id)?;
                (h["online"] == true && h["ip"] == victim_ip).then_some(hosts)
            }
        },
    )
    .await?;
    // The newcomer is flagged, the holder keeps its address although its id is higher.
    assert_eq!(
        host_of(&hosts, &forger_id)["address_conflict"],
        true,
        "{hosts:?}"
    );
    assert_eq!(
        host_of(&hosts, &victim_id)["address_conflict"],
        false,
        "{hosts:?}"
    );
    let controller_log = read(&cluster.controller_log);
    assert!(
        controller_log.contains("address conflict") && controller_log.contains("quarantined"),
        "{controller_log}"
    );

    let (job, step, status) = cluster
        .run_job(by_ip_with_secret(&cluster, &victim_ip))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(reached(&status), vec![cluster.host_id(&victim_id)]);
    let logs = cluster.logs(job, step).await?;
    let (_, text) = logs
        .iter()
        .find(|(id, _)| *id == cluster.host_id(&victim_id))
        .context("the victim's log")?;
    assert!(text.contains(&format!("got {SECRET}")), "{text}");
    // Still reachable by its own host id, as an operator resolving the conflict needs.
    let (_, _, status) = cluster
        .run_job(cluster.script_request("true", &[cluster.host_id(&forger_id)], json!({})))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_pinned_by_the_inventory_wins_over_the_certificate() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let client = cluster.client();
    let a2 = cluster.host_id("agent-2");
    let current = client.call("get_inventory", json!({})).await?;
    let text = format!(
        "{}\n[[host]]\nagent_id = \"agent-2\"\nbk_cloud_id = 0\nips = [\"127.0.0.50\"]\nbk_biz_id = 2\nmodules = [101]\n",
        current["text"].as_str().unwrap()
    );
    client
        .call("replace_inventory", json!({"text": text}))
        .await?;
    // Jobs by address follow the pin at once.
    let (_, _, status) = cluster
        .run_job(cluster.script_request(
            "true",
            &[],
            json!({"target_server": {"ip_list": [{"bk_cloud_id": 0, "ip": "127.0.0.50"}]}}),
        ))
        .await?;
    assert_eq!(reached(&status), vec![a2], "{status}");

    // The agent reports the address its certificate names, not the pinned one: refused.
    restart_agent_with(&mut cluster, 1, &[]).await?;
    let text = agent_log_saying(&cluster, 1, "agent-2 refused", "pins it to").await?;
    assert!(
        text.contains("reports address 127.0.0.11 in cloud area 0, but the inventory pins it to 127.0.0.50 in cloud area 0"),
        "{text}"
    );
    let hosts = client.hosts().await?;
    assert_eq!(host_of(&hosts, "agent-2")["online"], false, "{hosts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpinned_agent_cannot_choose_its_cloud_area() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let client = cluster.client();
    let ip = cluster.agents[1].ip.to_string();

    // agent-2 keeps its valid certificate (which names its address) and reports cloud area 3,
    // where it would hold that address and receive the jobs sent there by ip_list.
    restart_agent_with(&mut cluster, 1, &[("bk_cloud_id", "3".to_owned())]).await?;
    let refusal = agent_log_saying(&cluster, 1, "agent-2 refused", "reports cloud area 3").await?;
    assert!(
        refusal.contains("pin it in the inventory") && refusal.contains("trust_reported_ip_in"),
        "{refusal}"
    );
    let hosts = client.hosts().await?;
    assert_eq!(host_of(&hosts, "agent-2")["online"], false, "{hosts:?}");

    // The operator pins it there: the same report is now believed.
    let current = client.call("get_inventory", json!({})).await?;
    let text = format!(
        "{}\n[[host]]\nagent_id = \"agent-2\"\nbk_cloud_id = 3\nips = [\"{ip}\"]\nbk_biz_id = 2\nmodules = [101]\n",
        current["text"].as_str().unwrap()
    );
    client
        .call("replace_inventory", json!({"text": text}))
        .await?;
    cluster
        .wait_online(&["agent-2".to_owned()], Duration::from_secs(60))
        .await?;
    let hosts = client.hosts().await?;
    assert_eq!(host_of(&hosts, "agent-2")["bk_cloud_id"], 3, "{hosts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_conflict_log_names_the_pinned_holder_not_the_oldest_claim() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let client = cluster.client();
    let a2 = cluster.host_id("agent-2");
    let ip1 = cluster.agents[0].ip.to_string();
    // The operator pins agent-2 to the address agent-1 has claimed since it started.
    let current = client.call("get_inventory", json!({})).await?;
    let text = format!(
        "{}\n[[host]]\nagent_id = \"agent-2\"\nbk_cloud_id = 0\nips = [\"{ip1}\"]\nbk_biz_id = 2\nmodules = [101]\n",
        current["text"].as_str().unwrap()
    );
    client
        .call("replace_inventory", json!({"text": text}))
        .await?;
    restart_agent_with(&mut cluster, 1, &[("ip", format!("\"{ip1}\""))]).await?;
    eventually(Duration::from_secs(30), "agent-2 online on its pin", || {
        let client = client.clone();
        let ip1 = ip1.clone();
        async move {
            let hosts = client.hosts().await.ok()?;
            let h = hosts.iter().find(|h| h["agent_id"] == "agent-2")?;
            (h["online"] == true && h["ip"] == ip1).then_some(())
        }
    })
    .await?;
    let conflicts = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("address conflict"))
            .map(str::to_owned)
            .collect()
    };
    // agent-2 holds the address: it is not told it is quarantined.
    let logged = conflicts(&read(&cluster.controller_log));
    assert!(logged.iter().all(|l| !l.contains("agent-2")), "{logged:?}");

    // agent-1, whose claim is older, comes back: the log names agent-2 as the holder.
    restart_agent_with(&mut cluster, 0, &[]).await?;
    let controller_log = cluster.controller_log.clone();
    let line = eventually(Duration::from_secs(30), "agent-1's conflict logged", || {
        let logged = conflicts(&read(&controller_log));
        async move { logged.into_iter().find(|l| l.contains("agent-1")) }
    })
    .await?;
    assert!(
        line.contains(&format!("held by host {a2} (agent \"agent-2\")")),
        "{line}"
    );
    let (_, _, status) = cluster
        .run_job(cluster.script_request(
            "true",
            &[],
            json!({"target_server": {"ip_list": [{"bk_cloud_id": 0, "ip": ip1}]}}),
        ))
        .await?;
    assert_eq!(reached(&status), vec![a2], "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_agent_is_cut_off_within_a_second_and_stays_out() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let client = cluster.client();
    let a2 = cluster.host_id("agent-2");

    let at = tokio::time::Instant::now();
    let revoked = client
        .call(
            "revoke_agent",
            json!({"agent_id": "agent-2", "reason": "machine stolen"}),
        )
        .await?;
    assert_eq!(revoked["newly_revoked"], true, "{revoked}");
    assert_eq!(revoked["connections_closed"], 1, "{revoked}");
    // The connection is closed before revoke_agent answers (connections_closed above): that is
    // the cut. The store's offline mark follows; a loaded machine may take a few seconds.
    assert!(at.elapsed() <= Duration::from_secs(1), "{:?}", at.elapsed());
    eventually(Duration::from_secs(5), "agent-2 offline", || {
        let client = client.clone();
        async move {
            let hosts = client.hosts().await.ok()?;
            (hosts.iter().find(|h| h["bk_host_id"] == a2)?["online"] == false).then_some(())
        }
    })
    .await?;
    let log = cluster.agents[1].log.clone();
    eventually(Duration::from_secs(5), "the agent told why", || {
        let text = read(&log);
        async move { text.contains("revoked by an operator").then_some(()) }
    })
    .await?;

    // It keeps trying (backoff from 200 ms) and is refused every time.
    let controller_log = cluster.controller_log.clone();
    eventually(Duration::from_secs(20), "two refused reconnections", || {
        let text = read(&controller_log);
        async move { (text.matches("refusing a revoked agent").count() >= 2).then_some(()) }
    })
    .await?;
    let hosts = client.hosts().await?;
    assert_eq!(host_of(&hosts, "agent-2")["online"], false, "{hosts:?}");
    let (_, _, status) = cluster
        .run_job(cluster.script_request("true", &[a2], json!({})))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 310, "{status}");

    let listed = client.call("list_revoked_agents", json!({})).await?;
    assert_eq!(listed[0]["agent_id"], "agent-2", "{listed}");
    assert_eq!(listed[0]["reason"], "machine stolen", "{listed}");
    let history = client
        .call("get_inventory_history", json!({"limit": 1}))
        .await?;
    assert_eq!(
        history[0]["summary"], "revoke_agent agent-2: machine stolen",
        "{history}"
    );
    let again = client
        .call("revoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    assert_eq!(again["newly_revoked"], false, "{again}");
    // The same through the command line.
    let listed = fleetrun(&cluster, &["agents", "list-revoked"]).await?;
    assert!(
        listed.contains("agent-2")
            && listed.contains("by admin")
            && listed.contains("machine stolen"),
        "{listed}"
    );
    let again = fleetrun(&cluster, &["agents", "revoke", "agent-2"]).await?;
    assert!(
        again.contains("agent agent-2 was already revoked"),
        "{again}"
    );
    let bad = client
        .call_raw("revoke_agent", json!({"agent_id": "no such/agent"}))
        .await?;
    assert_eq!(bad["code"], 1_240_003, "{bad}");
    assert!(
        bad["message"].as_str().unwrap().starts_with("agent_id"),
        "{bad}"
    );

    // Lifting the revocation lets it back.
    client
        .call("unrevoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    cluster
        .wait_online(&["agent-2".to_owned()], Duration::from_secs(60))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forgotten_agent_is_not_placed_again_unless_unlisted_agents_may_register() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let client = cluster.client();
    let a2 = cluster.host_id("agent-2");

    // The default: unlisted agents are refused. agent-2 (which the inventory does not list)
    // keeps the host it registered before.
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    std::fs::write(
        &cluster.controller_config,
        config.replace("unlisted = \"register\"\n", ""),
    )?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    cluster
        .wait_online(&["agent-2".to_owned()], Duration::from_secs(30))
        .await?;

    cluster.kill_agent(1)?;
    cluster
        .wait_offline("agent-2", Duration::from_secs(30))
        .await?;
    client
        .call(
            "change_inventory",
            json!({"changes": [{"op": "delete_host", "bk_host_id": a2}]}),
        )
        .await?;
    cluster.start_agent(1)?;
    let text = agent_log_saying(&cluster, 1, "agent-2 refused", "is not in the inventory").await?;
    assert!(
        text.contains("fleetrun hosts move --agent agent-2"),
        "{text}"
    );
    let hosts = client.hosts().await?;
    assert!(
        hosts.iter().all(|h| h["agent_id"] != "agent-2"),
        "{hosts:?}"
    );

    // Listed by an operator, it registers again, as a new host where the listing says.
    client
        .call(
            "change_inventory",
            json!({"changes": [{"op": "move_hosts", "agent_ids": ["agent-2"], "bk_biz_id": 2, "modules": [101]}]}),
        )
        .await?;
    let hosts = cluster
        .wait_online(&["agent-2".to_owned()], Duration::from_secs(60))
        .await?;
    let host = host_of(&hosts, "agent-2");
    assert_ne!(host["bk_host_id"], a2, "{host}");
    assert_eq!(host["modules"], json!([101]), "{host}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_without_client_authentication_is_refused_at_the_handshake() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let ca = pki::Ca::open_or_create(&cluster.dir().join("certs"), "unused")?;
    // Signed by the cluster's CA, naming an agent, but not meant for client authentication.
    let mut params = pki::agent_params("agent-9", &["127.0.0.97".parse()?])?;
    params.extended_key_usages = Vec::new();
    let dir = cluster.dir().join("certs/agents");
    let cert = ca.issue(
        params,
        &dir.join("agent-9.pem"),
        &dir.join("agent-9.key.pem"),
    )?;
    let endpoint = fleetrun_net::client_endpoint(
        &fleetrun_net::TlsFiles {
            ca: ca.cert_path(),
            cert: cert.cert,
            key: cert.key,
        },
        "127.0.0.97:0".parse()?,
        fleetrun_net::Timing::default(),
    )?;
    let outcome = hello_on(&endpoint, &cluster, "agent-9", "127.0.0.97").await;
    let Err(e) = outcome else {
        panic!("the handshake went through: {outcome:?}");
    };
    assert!(format!("{e:#}").contains("authentication failed"), "{e:#}");
    let controller_log = cluster.controller_log.clone();
    eventually(Duration::from_secs(5), "the controller says why", || {
        let text = read(&controller_log);
        async move {
            text.contains("without the clientAuth extended key usage")
                .then_some(())
        }
    })
    .await?;
    let hosts = cluster.client().hosts().await?;
    assert!(
        hosts.iter().all(|h| h["agent_id"] != "agent-9"),
        "{hosts:?}"
    );
    Ok(())
}

/// `fleetrun ARGS` against the cluster (its cluster.json only); its standard output, once it
/// exited 0.
async fn fleetrun(cluster: &TestCluster, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(fleetrun_tests::fleetrun_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLEETRUN_") {
            cmd.env_remove(&key);
        }
    }
    let output = cmd
        .env("FLEETRUN_CLUSTER", cluster.dir().join("cluster.json"))
        .env("XDG_CONFIG_HOME", cluster.dir())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "fleetrun {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// Connects with an agent's own certificate from `bind` and sends a hello reporting `ip`.
async fn raw_hello(
    cluster: &TestCluster,
    agent_id: &str,
    bind: &IpAddr,
    ip: &str,
) -> Result<Option<HelloReply>> {
    let certs = cluster.dir().join("certs");
    let endpoint = fleetrun_net::client_endpoint(
        &fleetrun_net::TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("agents/{agent_id}.pem")),
            key: certs.join(format!("agents/{agent_id}.key.pem")),
        },
        std::net::SocketAddr::new(*bind, 0),
        fleetrun_net::Timing::default(),
    )?;
    hello_on(&endpoint, cluster, agent_id, ip).await
}

async fn hello_on(
    endpoint: &quinn::Endpoint,
    cluster: &TestCluster,
    agent_id: &str,
    ip: &str,
) -> Result<Option<HelloReply>> {
    let connection = endpoint
        .connect(cluster.info.agent_addr.parse()?, "fleetrun-controller")?
        .await?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id.to_owned(),
        agent_version: "0".into(),
        hostname: "forger".into(),
        os_type: OsType::Linux,
        bk_cloud_id: 0,
        ips: vec![ip.parse()?],
    };
    let talk = async {
        let (mut send, recv) = connection.open_bi().await?;
        fleetrun_net::send_frame(&mut send, &hello).await?;
        let reply: Option<HelloReply> = fleetrun_net::FramedRecv::new(recv).recv().await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .context("no answer to the hello")?;
    // A refused handshake shows on the first stream (TLS 1.3: the client finishes first).
    reply.map_err(|e| {
        let closed = e
            .downcast_ref::<fleetrun_net::StreamError>()
            .and_then(fleetrun_net::StreamError::connection_error)
            .or_else(|| e.downcast_ref::<quinn::ConnectionError>());
        match closed {
            Some(conn) => anyhow::anyhow!(fleetrun_net::describe_connection_error(conn)),
            None => e,
        }
    })
}
