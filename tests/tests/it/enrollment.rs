//! Enrollment with the real binaries: a host with nothing but `fleetrun-agent` enrolls with a
//! join token, lands in the token's business and module and runs a job; bad tokens (malformed,
//! unknown, used up, expired, revoked), a wrong CA pin and a flood are refused with what to do; a
//! CSR asking for names or a CA is refused saying which; the 257th connection at once is closed
//! and an oversized request refused before its body, and hosts enroll after both; a revoked
//! agent's key cannot enroll back; a certificate renews over the connection while a task runs,
//! leaving it untouched; an enrollment CA the gateway does not trust stops `check-config` and
//! start. Renewal under attack is in `renewal`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_proto::{EnrollReply, EnrollRequest, FrameDecoder, OsType, encode_frame};
use fleetrun_tests::{TestCluster, eventually, fleetrun_bin, host_results, start_cluster};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The business and module the tests' tokens place hosts in (the cluster's inventory has them).
pub(crate) const BIZ: i64 = 2;
const MODULE: i64 = 100;

/// Agent processes started here, killed with the test.
#[derive(Default)]
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A cluster without agents whose controller enrolls hosts, with the cluster's CA imported by
/// `ca init`; returns it and the CA's pin.
pub(crate) async fn enrolling_cluster(extra: &str) -> Result<(TestCluster, String)> {
    let mut cluster = start_cluster(0).await?;
    let ca_cert = cluster.dir().join("enroll-ca.pem");
    let ca_key = cluster.dir().join("enroll-ca.key.pem");
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[enroll]\nca_cert = {:?}\nca_key = {:?}\n{extra}\n",
        ca_cert.display().to_string(),
        ca_key.display().to_string()
    ));
    std::fs::write(&cluster.controller_config, config)?;
    let certs = cluster.dir().join("certs");
    let init = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&cluster.controller_config)
        .args(["ca", "init", "--import-cert"])
        .arg(certs.join("ca.pem"))
        .arg("--import-key")
        .arg(certs.join("ca.key.pem"))
        .output()?;
    let stdout = String::from_utf8_lossy(&init.stdout).into_owned();
    ensure!(
        init.status.success(),
        "ca init: {stdout}{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let pin = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pin:"))
        .context("ca init printed no pin")?
        .trim()
        .to_owned();
    assert_eq!(
        std::fs::metadata(&ca_key)?.permissions().mode() & 0o777,
        0o600
    );
    // Made once: a second init refuses to replace it.
    let again = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&cluster.controller_config)
        .args(["ca", "init"])
        .output()?;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists already"),
        "{again:?}"
    );
    cluster.stop_controller(Duration::from_secs(10))?;
    cluster.start_controller().await?;
    Ok((cluster, pin))
}

/// A token from the API.
pub(crate) async fn token(cluster: &TestCluster, extra: Value) -> Result<Value> {
    let mut body = json!({"bk_biz_id": BIZ, "bk_module_id": MODULE});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            body[k] = v;
        }
    }
    cluster.client().call("create_join_token", body).await
}

/// Runs `fleetrun-agent enroll` for a host whose files live in `host_dir`, connecting from `ip`.
fn enroll(cluster: &TestCluster, host_dir: &Path, ip: &str, token: &str, pin: &str) -> Output {
    Command::new(cluster.bin_dir.join("fleetrun-agent"))
        .args(["enroll", "--controller", &cluster.info.agent_addr])
        .args(["--token", token, "--ca-pin", pin, "--bind", ip])
        .arg("--dir")
        .arg(host_dir.join("etc"))
        .arg("--work-dir")
        .arg(host_dir.join("work"))
        .args(["--hostname", "enrolled"])
        .output()
        .expect("running fleetrun-agent enroll")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The agent id `enroll` printed.
fn enrolled_id(output: &Output) -> Result<String> {
    let out = text(output);
    ensure!(output.status.success(), "enroll failed: {out}");
    out.split_whitespace()
        .skip_while(|w| *w != "agent")
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no agent id in {out}"))
}

fn refused(output: &Output, what: &str) {
    let out = text(output);
    assert!(!output.status.success(), "enrollment not refused: {out}");
    assert!(out.contains(what), "expected {what:?} in: {out}");
}

fn host_dir(cluster: &TestCluster, name: &str) -> Result<PathBuf> {
    let dir = cluster.dir().join("hosts").join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Starts the enrolled agent of `host_dir` and waits until it is online; returns its host.
async fn start_agent(
    cluster: &TestCluster,
    agents: &mut Agents,
    host_dir: &Path,
    agent_id: &str,
) -> Result<Value> {
    let child = cluster.spawn(
        "fleetrun-agent",
        &host_dir.join("etc/agent.toml"),
        &host_dir.join("agent.log"),
    )?;
    agents.0.push(child);
    let hosts = cluster
        .wait_online(&[agent_id.to_owned()], Duration::from_secs(30))
        .await?;
    hosts
        .into_iter()
        .find(|h| h["agent_id"] == json!(agent_id))
        .context("enrolled host listed")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_enrolls_with_a_token_lands_in_its_module_and_runs_a_job() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let made = token(&cluster, json!({"max_uses": 2, "description": "web tier"})).await?;
    assert_eq!(made["ca_pin"], json!(pin), "{made}");
    let secret = made["token"].as_str().context("token")?.to_owned();
    // The API is plain HTTP here: no script piped to sudo over it.
    assert_eq!(made["install_command"], Value::Null, "{made}");
    let command = made["enroll_command"].as_str().context("enroll_command")?;
    let (export, run) = command.split_once('\n').context("two lines")?;
    assert_eq!(export, format!("export FLEETRUN_JOIN_TOKEN='{secret}'"));
    assert!(
        !run.contains(&secret) && run.contains(&pin) && run.contains(&cluster.info.agent_addr),
        "{command}"
    );
    // The token is shown once: the list has its id and state, never the token.
    let listed = cluster.client().call("list_join_tokens", json!({})).await?;
    assert_eq!(listed[0]["token_id"], made["token_id"], "{listed}");
    assert_eq!(listed[0]["state"], "active", "{listed}");
    assert!(!listed.to_string().contains(&secret), "{listed}");

    let host = host_dir(&cluster, "web-1")?;
    let first = enroll(&cluster, &host, "127.0.0.30", &secret, &pin);
    let agent_id = enrolled_id(&first)?;
    let key = host.join("etc/agent.key.pem");
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    let key_before = std::fs::read(&key)?;

    let mut agents = Agents::default();
    let placed = start_agent(&cluster, &mut agents, &host, &agent_id).await?;
    assert_eq!(placed["bk_biz_id"], BIZ, "{placed}");
    assert_eq!(placed["modules"], json!([MODULE]), "{placed}");
    assert_eq!(placed["ip"], "127.0.0.30", "{placed}");
    assert_eq!(placed["hostname"], "enrolled", "{placed}");
    let bk_host_id = placed["bk_host_id"].as_i64().context("bk_host_id")?;

    let (job, step, status) = cluster
        .run_job(cluster.script_request("echo enrolled-and-running", &[bk_host_id], json!({})))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = cluster
        .client()
        .logs(&cluster.info.scope(), job, step, &[bk_host_id])
        .await?;
    assert_eq!(logs[0].1, "enrolled-and-running\n", "{logs:?}");

    // Enrolling again with the same key is the same agent, and spends no use.
    let again = enroll(&cluster, &host, "127.0.0.30", &secret, &pin);
    assert_eq!(enrolled_id(&again)?, agent_id);
    assert!(text(&again).contains("kept"), "{}", text(&again));
    assert_eq!(std::fs::read(&key)?, key_before);
    let listed = cluster.client().call("list_join_tokens", json!({})).await?;
    assert_eq!(listed[0]["uses"], 1, "{listed}");

    // Recorded: the placement in the inventory history, the enrollment in the audit trail.
    let history = cluster
        .client()
        .call("get_inventory_history", json!({"limit": 5}))
        .await?;
    assert!(
        history.to_string().contains(&format!(
            "place_agent {agent_id} in business {BIZ} modules {MODULE}"
        )),
        "{history}"
    );
    let audit = cluster
        .client()
        .call("get_audit_log", json!({"api": "enroll_agent"}))
        .await?;
    let text = audit.to_string();
    assert!(
        text.contains(&agent_id) && text.contains("127.0.0.30"),
        "{text}"
    );
    assert!(
        !text.contains(&secret),
        "the token reached the audit trail: {text}"
    );
    let created = cluster
        .client()
        .call("get_audit_log", json!({"api": "create_join_token"}))
        .await?;
    assert!(!created.to_string().contains(&secret), "{created}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_and_a_wrong_pin_are_refused_with_what_to_do() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let host = host_dir(&cluster, "h")?;

    refused(
        &enroll(&cluster, &host, "127.0.0.31", "frt-nothex", &pin),
        "malformed",
    );
    let unknown = format!("frt-{}-{}", "ab".repeat(6), "cd".repeat(16));
    refused(
        &enroll(&cluster, &host, "127.0.0.31", &unknown, &pin),
        "not known to this controller",
    );
    let wrong_pin = format!("sha256:{}", "00".repeat(32));
    let once = token(&cluster, json!({})).await?;
    let once_text = once["token"].as_str().context("token")?;
    refused(
        &enroll(&cluster, &host, "127.0.0.31", once_text, &wrong_pin),
        "not the one pinned",
    );
    // The wrong pin spent nothing: the token still enrolls once, and no more.
    let first = enrolled_id(&enroll(&cluster, &host, "127.0.0.31", once_text, &pin))?;
    // The same host again is the same enrollment, even with its token used up.
    assert_eq!(
        enrolled_id(&enroll(&cluster, &host, "127.0.0.31", once_text, &pin))?,
        first
    );
    let other = host_dir(&cluster, "h2")?;
    refused(
        &enroll(&cluster, &other, "127.0.0.32", once_text, &pin),
        "used up (1 of 1 uses)",
    );

    let short = token(&cluster, json!({"ttl_secs": 1})).await?;
    let client = cluster.client();
    let short_id = short["token_id"].clone();
    eventually(Duration::from_secs(10), "the token expired", || {
        let client = client.clone();
        let short_id = short_id.clone();
        async move {
            let listed = client.call("list_join_tokens", json!({})).await.ok()?;
            listed
                .as_array()?
                .iter()
                .any(|t| t["token_id"] == short_id && t["state"] == "expired")
                .then_some(())
        }
    })
    .await?;
    refused(
        &enroll(
            &cluster,
            &other,
            "127.0.0.32",
            short["token"].as_str().unwrap(),
            &pin,
        ),
        "expired at",
    );

    // Revoked through the command line, which lists the states too.
    let revoked = token(&cluster, json!({})).await?;
    let cli = |args: &[&str]| {
        Command::new(fleetrun_bin())
            .args(["--cluster"])
            .arg(cluster.dir().join("cluster.json"))
            .args(args)
            .output()
            .expect("running fleetrun")
    };
    let done = cli(&["tokens", "revoke", revoked["token_id"].as_str().unwrap()]);
    assert!(done.status.success(), "{}", text(&done));
    refused(
        &enroll(
            &cluster,
            &other,
            "127.0.0.32",
            revoked["token"].as_str().unwrap(),
            &pin,
        ),
        "was revoked by",
    );
    let list = text(&cli(&["tokens", "list"]));
    for state in ["revoked", "expired", "used_up"] {
        assert!(list.contains(state), "{state} missing from: {list}");
    }
    let created = cli(&[
        "tokens", "create", "--biz", "2", "--module", "100", "--ttl", "30m", "--uses", "3",
    ]);
    let out = text(&created);
    assert!(created.status.success(), "{out}");
    // The token is in the environment of the printed command, not on its command line; over
    // plain HTTP no install script is offered.
    assert!(
        out.contains("export FLEETRUN_JOIN_TOKEN='frt-")
            && out.contains("fleetrun-agent enroll --controller")
            && out.contains("--ca-pin sha256:")
            && out.contains("No install command"),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.contains("enroll") && l.contains("frt-")),
        "{out}"
    );
    // A module of another business, or none at all, is refused naming the field.
    let wrong = client
        .call_raw(
            "create_join_token",
            json!({"bk_biz_id": 3, "bk_module_id": MODULE}),
        )
        .await?;
    assert_eq!(wrong["code"], 1_240_003, "{wrong}");
    assert!(
        wrong["message"]
            .as_str()
            .unwrap()
            .starts_with("bk_module_id:"),
        "{wrong}"
    );
    let missing = client.call_raw("create_join_token", json!({})).await?;
    assert!(
        missing["message"].as_str().unwrap().contains("bk_biz_id"),
        "{missing}"
    );
    // And the API answers in GET form under another path style too.
    let listed = client.get_raw("list_join_tokens", json!({})).await?;
    assert_eq!(listed["result"], true, "{listed}");
    Ok(())
}

/// Sends one enrollment request the way a hostile client would: its own CSR, over TLS checked
/// against the pin.
pub(crate) async fn raw_enroll(
    addr: &str,
    pin: &str,
    request: &EnrollRequest,
) -> Result<EnrollReply> {
    raw_enroll_from("127.0.0.1".parse()?, addr, pin, request).await
}

/// [`raw_enroll`] from the local address `bind`.
pub(crate) async fn raw_enroll_from(
    bind: std::net::IpAddr,
    addr: &str,
    pin: &str,
    request: &EnrollRequest,
) -> Result<EnrollReply> {
    let tls = fleetrun_net::enroll_client_tls(pin.parse().map_err(anyhow::Error::msg)?)?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(bind, 0))?;
    let stream = socket.connect(addr.parse()?).await?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("fleetrun-controller".try_into()?, stream)
        .await?;
    stream.write_all(&encode_frame(request)?).await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    let mut decoder = FrameDecoder::new();
    decoder.extend(&bytes);
    decoder.decode()?.context("no reply")
}

/// The names and extended key usages of a certificate, read with x509-parser.
fn names_and_usages(der: &[u8]) -> Result<(Vec<String>, Vec<&'static str>)> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| name.to_string())
                .collect()
        })
        .unwrap_or_default();
    let mut usages = Vec::new();
    if let Some(eku) = cert
        .extended_key_usage()
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        let eku = eku.value;
        for (on, name) in [
            (eku.client_auth, "clientAuth"),
            (eku.server_auth, "serverAuth"),
            (eku.any, "any"),
            (eku.code_signing, "codeSigning"),
            (eku.email_protection, "emailProtection"),
            (eku.time_stamping, "timeStamping"),
            (eku.ocsp_signing, "ocspSigning"),
            (!eku.other.is_empty(), "other"),
        ] {
            if on {
                usages.push(name);
            }
        }
    }
    ensure!(!cert.is_ca(), "an agent's certificate is a CA");
    Ok((names, usages))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csr_that_asks_for_names_or_a_ca_is_refused_saying_which() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let made = token(&cluster, json!({"max_uses": 2})).await?;
    let key = rcgen::KeyPair::generate()?;
    let request_with = |edit: &dyn Fn(&mut rcgen::CertificateParams)| -> Result<EnrollRequest> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agent-1");
        edit(&mut params);
        Ok(EnrollRequest {
            token: made["token"].as_str().context("token")?.to_owned(),
            csr: params.serialize_request(&key)?.der().to_vec(),
            hostname: "h".into(),
            // Another host's address: pinned, it would outrank that host's own claim.
            ips: vec!["198.51.100.77".parse()?],
            os_type: OsType::Linux,
            agent_version: "test".into(),
        })
    };
    type Edit<'a> = &'a dyn Fn(&mut rcgen::CertificateParams);
    let refusals: [(Edit<'_>, &str); 5] = [
        (
            &|p| {
                p.subject_alt_names.push(rcgen::SanType::URI(
                    "spiffe://fleetrun/agent/agent-1".try_into().unwrap(),
                ))
            },
            "the name URI \"spiffe://fleetrun/agent/agent-1\"",
        ),
        (
            &|p| {
                p.subject_alt_names
                    .push(rcgen::SanType::IpAddress("10.9.9.9".parse().unwrap()))
            },
            "the name IP 10.9.9.9",
        ),
        (
            &|p| {
                p.subject_alt_names.push(rcgen::SanType::DnsName(
                    "controller.example".try_into().unwrap(),
                ))
            },
            "the name DNS \"controller.example\"",
        ),
        (
            &|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
            "asks to be a CA",
        ),
        (
            &|p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
            "beyond client authentication",
        ),
    ];
    for (edit, says) in refusals {
        let EnrollReply::Refused { reason } =
            raw_enroll(&cluster.info.agent_addr, &pin, &request_with(edit)?).await?
        else {
            bail!("a request asking for {says} was signed");
        };
        assert!(reason.contains(says), "expected {says:?} in: {reason}");
    }
    // Refused before anything was spent.
    let listed = cluster.client().call("list_join_tokens", json!({})).await?;
    assert_eq!(listed[0]["uses"], 0, "{listed}");

    // The same key asking for nothing: its subject is its own business, the names are the
    // controller's.
    let EnrollReply::Enrolled(enrolled) =
        raw_enroll(&cluster.info.agent_addr, &pin, &request_with(&|_| {})?).await?
    else {
        bail!("refused");
    };
    assert!(enrolled.agent_id.starts_with("host-"), "{enrolled:?}");
    let der = fleetrun_net::first_cert_der(&enrolled.certificate_pem).context("certificate")?;
    assert_eq!(fleetrun_net::agent_id_of_cert_der(&der)?, enrolled.agent_id);
    let (names, usages) = names_and_usages(&der)?;
    assert_eq!(
        names,
        [format!(
            "URI({})",
            fleetrun_proto::agent_uri(&enrolled.agent_id)
        )],
        "the certificate's names"
    );
    assert_eq!(usages, ["clientAuth"]);
    // Its addresses are the one it came from, whatever it claims.
    let inventory = cluster.client().call("get_inventory", json!({})).await?;
    let doc = inventory["text"].as_str().unwrap_or_default();
    assert!(
        doc.contains(&enrolled.agent_id) && doc.contains("127.0.0.1"),
        "{doc}"
    );
    assert!(
        !doc.contains("198.51.100.77"),
        "a reported address was pinned: {doc}"
    );

    // A request that is not one is refused.
    let mut garbage = request_with(&|_| {})?;
    garbage.csr = b"not a csr".to_vec();
    let EnrollReply::Refused { reason } =
        raw_enroll(&cluster.info.agent_addr, &pin, &garbage).await?
    else {
        bail!("garbage accepted");
    };
    assert!(reason.contains("signing request"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_floods_are_refused_per_source_address() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("attempts_per_minute = 3").await?;
    let host = host_dir(&cluster, "h")?;
    for _ in 0..3 {
        refused(
            &enroll(&cluster, &host, "127.0.0.33", "frt-x", &pin),
            "malformed",
        );
    }
    refused(
        &enroll(&cluster, &host, "127.0.0.33", "frt-x", &pin),
        "too many enrollment attempts from 127.0.0.33",
    );
    // Another address is not held up.
    refused(
        &enroll(&cluster, &host, "127.0.0.34", "frt-x", &pin),
        "malformed",
    );
    // Slow connections that never send anything hold nothing up for others either.
    let mut slow = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.37:0".parse()?)?;
        slow.push(socket.connect(cluster.info.agent_addr.parse()?).await?);
    }
    let made = token(&cluster, json!({})).await?;
    let legit = host_dir(&cluster, "legit")?;
    enrolled_id(&enroll(
        &cluster,
        &legit,
        "127.0.0.38",
        made["token"].as_str().context("token")?,
        &pin,
    ))?;
    drop(slow);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_agents_key_cannot_enroll_back() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let made = token(&cluster, json!({"max_uses": 5})).await?;
    let secret = made["token"].as_str().unwrap();
    let host = host_dir(&cluster, "h")?;
    let agent_id = enrolled_id(&enroll(&cluster, &host, "127.0.0.35", secret, &pin))?;
    let mut agents = Agents::default();
    start_agent(&cluster, &mut agents, &host, &agent_id).await?;
    let revoked = cluster
        .client()
        .call("revoke_agent", json!({"agent_id": agent_id}))
        .await?;
    assert_eq!(revoked["connections_closed"], 1, "{revoked}");
    refused(
        &enroll(&cluster, &host, "127.0.0.35", secret, &pin),
        "which an operator revoked",
    );
    // A new key with the same token: the revoked host coming back re-keyed.
    let rekeyed = host_dir(&cluster, "h-rekeyed")?;
    refused(
        &enroll(&cluster, &rekeyed, "127.0.0.35", secret, &pin),
        "enrolls no host while that revocation stands",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_renews_over_the_connection_while_a_task_runs() -> Result<()> {
    // Renewed at two thirds of its life (15 s, and 1.5 s before it is issued): 9.5 s after.
    let (cluster, pin) = enrolling_cluster("cert_lifetime_secs = 15").await?;
    let made = token(&cluster, json!({})).await?;
    let host = host_dir(&cluster, "h")?;
    let agent_id = enrolled_id(&enroll(
        &cluster,
        &host,
        "127.0.0.36",
        made["token"].as_str().unwrap(),
        &pin,
    ))?;
    let cert = host.join("etc/agent.pem");
    let first = std::fs::read(&cert)?;
    let mut agents = Agents::default();
    let placed = start_agent(&cluster, &mut agents, &host, &agent_id).await?;
    let bk_host_id = placed["bk_host_id"].as_i64().unwrap();

    // A task that runs across the renewal (and past the first certificate's end).
    let script = "echo start; sleep 18; echo end";
    let client = cluster.client();
    let accepted = client
        .call(
            "fast_execute_script",
            cluster.script_request(script, &[bk_host_id], json!({})),
        )
        .await?;
    let job = accepted["job_instance_id"].as_i64().unwrap();
    let step = accepted["step_instance_id"].as_i64().unwrap();
    let log = host.join("agent.log");
    eventually(Duration::from_secs(20), "the certificate renewed", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("certificate renewed").then_some(()) }
    })
    .await?;
    assert_ne!(
        std::fs::read(&cert)?,
        first,
        "the certificate file was not replaced"
    );
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = client
        .logs(&cluster.info.scope(), job, step, &[bk_host_id])
        .await?;
    assert_eq!(logs[0].1, "start\nend\n", "{logs:?}");
    // One connection all along: the renewal swapped nothing under the task.
    let controller_log = std::fs::read_to_string(&cluster.controller_log)?;
    let online = controller_log
        .lines()
        .filter(|l| l.contains("agent online") && l.contains(&agent_id))
        .count();
    assert_eq!(online, 1, "{controller_log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_enrolling_at_once_and_again_spends_one_use() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let made = token(&cluster, json!({"max_uses": 1})).await?;
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let request = EnrollRequest {
        token: made["token"].as_str().context("token")?.to_owned(),
        csr: params.serialize_request(&key)?.der().to_vec(),
        hostname: "h".into(),
        ips: vec![],
        os_type: OsType::Linux,
        agent_version: "test".into(),
    };
    let addr = cluster.info.agent_addr.clone();
    let attempts: Vec<_> = (0..4)
        .map(|_| {
            let (addr, pin, request) = (addr.clone(), pin.clone(), request.clone());
            tokio::spawn(async move { raw_enroll(&addr, &pin, &request).await })
        })
        .collect();
    let mut enrolled = 0;
    for attempt in attempts {
        match attempt.await?? {
            EnrollReply::Enrolled(_) => enrolled += 1,
            EnrollReply::Refused { reason } => {
                assert!(reason.contains("under way"), "{reason}")
            }
        }
    }
    assert!(enrolled >= 1);
    // Once more, after: the same enrollment, although the token's one use is spent.
    let EnrollReply::Enrolled(_) = raw_enroll(&addr, &pin, &request).await? else {
        bail!("the same key was refused enrolling again");
    };
    let listed = cluster.client().call("list_join_tokens", json!({})).await?;
    assert_eq!(listed[0]["uses"], 1, "{listed}");
    Ok(())
}

/// Connects and completes the enrollment TLS handshake from `bind`; whether the listener served it
/// (a connection closed before any TLS work fails the handshake).
async fn tls_handshake(
    bind: &str,
    addr: &str,
    pin: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = fleetrun_net::enroll_client_tls(pin.parse().map_err(anyhow::Error::msg)?)?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(bind.parse()?, 0))?;
    let stream = socket.connect(addr.parse()?).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect("fleetrun-controller".try_into()?, stream),
    )
    .await
    .context("no TLS handshake within 10 s")??;
    Ok(tls)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_257th_unauthenticated_connection_is_closed_and_a_host_enrolls_after() -> Result<()> {
    // The per-address limit high enough that only the cap on connections at once applies.
    let (cluster, pin) = enrolling_cluster("attempts_per_minute = 1000").await?;
    let addr = cluster.info.agent_addr.clone();
    // 256 connections that say nothing hold every place; the listener takes them in order.
    let mut silent = Vec::new();
    for _ in 0..256 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.39:0".parse()?)?;
        silent.push(socket.connect(addr.parse()?).await?);
    }
    // One that completes its handshake shows the listener has taken them all (it comes after
    // them) — or is itself the one refused, which is what the next check looks for.
    let refused = tls_handshake("127.0.0.40", &addr, &pin).await;
    let error = refused.err().context("a 257th connection was served")?;
    let log = cluster.controller_log.clone();
    eventually(Duration::from_secs(10), "the refusal in the log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.contains("enrollment connection closed: 256 are served already")
                .then_some(())
        }
    })
    .await
    .with_context(|| format!("the 257th connection failed with: {error:#}"))?;

    // Once they go, the places come back: a host enrolls.
    drop(silent);
    let made = token(&cluster, json!({})).await?;
    let secret = made["token"].as_str().context("token")?.to_owned();
    let host = host_dir(&cluster, "after-the-cap")?;
    let agent_id = eventually(
        Duration::from_secs(30),
        "an enrollment after the cap",
        || {
            let output = enroll(&cluster, &host, "127.0.0.41", &secret, &pin);
            async move { enrolled_id(&output).ok() }
        },
    )
    .await?;
    assert!(agent_id.starts_with("host-"), "{agent_id}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_enrollment_frame_is_refused_before_its_body_is_read() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let addr = cluster.info.agent_addr.clone();
    for len in [fleetrun_proto::MAX_ENROLL_FRAME + 1, u32::MAX as usize] {
        let mut tls = tls_handshake("127.0.0.42", &addr, &pin).await?;
        // The header alone: the body never comes, the answer must not wait for it.
        tls.write_all(&(len as u32).to_be_bytes()).await?;
        tls.flush().await?;
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut bytes))
            .await
            .context("the controller waited for the body")??;
        let mut decoder = FrameDecoder::new();
        decoder.extend(&bytes);
        let Some(EnrollReply::Refused { reason }) = decoder.decode()? else {
            bail!("an oversized request was not refused");
        };
        assert!(
            reason.contains(&format!(
                "is {len} bytes, more than {}",
                fleetrun_proto::MAX_ENROLL_FRAME
            )),
            "{reason}"
        );
    }
    // The listener goes on serving: a host enrolls.
    let made = token(&cluster, json!({})).await?;
    let host = host_dir(&cluster, "after-the-big-one")?;
    enrolled_id(&enroll(
        &cluster,
        &host,
        "127.0.0.43",
        made["token"].as_str().context("token")?,
        &pin,
    ))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_enrollment_ca_the_gateway_does_not_trust_stops_check_config_and_start() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    let ca_cert = cluster.dir().join("other-ca.pem");
    let ca_key = cluster.dir().join("other-ca.key.pem");
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[enroll]\nca_cert = {:?}\nca_key = {:?}\n",
        ca_cert.display().to_string(),
        ca_key.display().to_string()
    ));
    let config_path = cluster.dir().join("controller-other-ca.toml");
    std::fs::write(&config_path, config)?;
    let controller = cluster.bin_dir.join("fleetrun-controller");
    // A new CA, while [tls] ca (which exists) holds only the cluster's: init leaves it alone.
    let init = Command::new(&controller)
        .arg("--config")
        .arg(&config_path)
        .args(["ca", "init"])
        .output()?;
    ensure!(init.status.success(), "ca init: {}", text(&init));
    let tls_ca = cluster.dir().join("certs").join("ca.pem");
    let names_both = |out: &str| {
        out.contains(&ca_cert.display().to_string())
            && out.contains(&tls_ca.display().to_string())
            && out.contains("not trusted by the agent gateway")
    };
    let check = Command::new(&controller)
        .arg("check-config")
        .arg("--config")
        .arg(&config_path)
        .output()?;
    assert!(
        !check.status.success(),
        "check-config passed: {}",
        text(&check)
    );
    assert!(names_both(&text(&check)), "{}", text(&check));

    // Start refuses it too (the cluster's controller is stopped: its ports are free).
    cluster.stop_controller(Duration::from_secs(10))?;
    let mut start = Command::new(&controller)
        .arg("--config")
        .arg(&config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = start.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = start.kill();
            bail!("the controller started with a CA its gateway does not trust");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = text(&start.wait_with_output()?);
    assert!(!status.success(), "{out}");
    assert!(names_both(&out), "{out}");

    // With the CA in the bundle, both pass: check-config, and start (its API answers).
    let mut bundle = std::fs::read_to_string(&tls_ca)?;
    bundle.push_str(&std::fs::read_to_string(&ca_cert)?);
    std::fs::write(&tls_ca, bundle)?;
    let check = Command::new(&controller)
        .arg("check-config")
        .arg("--config")
        .arg(&config_path)
        .output()?;
    assert!(check.status.success(), "{}", text(&check));
    cluster.controller_config = config_path;
    cluster.start_controller().await?;
    Ok(())
}
