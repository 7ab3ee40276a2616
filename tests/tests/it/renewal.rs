//! Certificate renewal under attack, with raw agents: hosts enrolled by raw requests, connected
//! over QUIC with the certificates they got, asking for renewals a real agent would not. A CSR
//! over another key than the connection's certificate, one naming another agent, one asking
//! faster than the rate (on the same connection and on a new one), a revoked agent, and an agent
//! speaking protocol version 2 (which has no renewal) are each refused, with the reason.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_net::{FramedRecv, StreamError, TlsFiles};
use fleetrun_proto::{
    ControlDown, ControlUp, EnrollReply, EnrollRequest, Enrolled, Hello, HelloReply, OsType,
    PROTOCOL_VERSION,
};
use fleetrun_tests::{TestCluster, eventually};
use serde_json::json;

use crate::enrollment::{enrolling_cluster, raw_enroll_from, token};

/// An enrolled host: its key, its certificate's files and the address it came from.
struct RawHost {
    key: rcgen::KeyPair,
    enrolled: Enrolled,
    files: TlsFiles,
    ip: IpAddr,
}

fn csr(key: &rcgen::KeyPair, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Result<Vec<u8>> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    edit(&mut params);
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// Enrolls a new key from `ip` with `secret`, and writes its certificate and key.
async fn enroll_raw(cluster: &TestCluster, pin: &str, secret: &str, ip: &str) -> Result<RawHost> {
    let key = rcgen::KeyPair::generate()?;
    let ip: IpAddr = ip.parse()?;
    let request = EnrollRequest {
        token: secret.to_owned(),
        csr: csr(&key, |_| {})?,
        hostname: format!("raw-{ip}"),
        ips: vec![ip],
        os_type: OsType::Linux,
        agent_version: "test".into(),
    };
    let enrolled = match raw_enroll_from(ip, &cluster.info.agent_addr, pin, &request).await? {
        EnrollReply::Enrolled(enrolled) => enrolled,
        EnrollReply::Refused { reason } => bail!("enrollment refused: {reason}"),
    };
    let dir = cluster.dir().join("raw-hosts").join(ip.to_string());
    std::fs::create_dir_all(&dir)?;
    let cert = dir.join("agent.pem");
    let key_file = dir.join("agent.key.pem");
    std::fs::write(&cert, &enrolled.certificate_pem)?;
    std::fs::write(&key_file, key.serialize_pem())?;
    Ok(RawHost {
        key,
        enrolled,
        files: TlsFiles {
            ca: cluster.dir().join("certs").join("ca.pem"),
            cert,
            key: key_file,
        },
        ip,
    })
}

/// A raw agent's connection past its hello and its report of the tasks it holds.
struct Connected {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: FramedRecv,
    _endpoint: quinn::Endpoint,
}

/// Why a connection ended, as the agent's log would say it.
fn why(e: &StreamError) -> String {
    match e.connection_error() {
        Some(conn) => fleetrun_net::describe_connection_error(conn),
        None => e.to_string(),
    }
}

impl Connected {
    async fn open(cluster: &TestCluster, host: &RawHost, version: u32) -> Result<Self> {
        let endpoint = fleetrun_net::client_endpoint(
            &host.files,
            SocketAddr::new(host.ip, 0),
            fleetrun_net::Timing::default(),
        )?;
        let connection = endpoint
            .connect(cluster.info.agent_addr.parse()?, &host.enrolled.server_name)?
            .await?;
        let talk = async {
            let (mut send, recv) = connection.open_bi().await?;
            let mut recv = FramedRecv::new(recv);
            let hello = Hello {
                protocol_version: version,
                agent_id: host.enrolled.agent_id.clone(),
                agent_version: "test".into(),
                hostname: format!("raw-{}", host.ip),
                os_type: OsType::Linux,
                bk_cloud_id: host.enrolled.bk_cloud_id,
                ips: vec![host.ip],
            };
            fleetrun_net::send_frame(&mut send, &hello).await?;
            let reply = tokio::time::timeout(Duration::from_secs(10), recv.recv::<HelloReply>())
                .await
                .context("no answer to the hello")??;
            match reply {
                Some(
                    HelloReply::Negotiated {
                        protocol_version, ..
                    }
                    | HelloReply::Joined {
                        protocol_version, ..
                    },
                ) => ensure!(protocol_version == version, "negotiated {protocol_version}"),
                other => bail!("hello answered with {other:?}"),
            }
            fleetrun_net::send_frame(&mut send, &ControlUp::Holding { tasks: vec![] }).await?;
            anyhow::Ok((send, recv))
        };
        // A refusal shows as the connection's close reason.
        let (send, recv) = talk.await.map_err(|e| match connection.close_reason() {
            Some(closed) => anyhow::anyhow!(fleetrun_net::describe_connection_error(&closed)),
            None => e,
        })?;
        Ok(Self {
            connection,
            send,
            recv,
            _endpoint: endpoint,
        })
    }

    /// Sends a renewal request; the controller's answer, or why the connection ended.
    async fn renew(&mut self, csr: Vec<u8>) -> Result<ControlDown, String> {
        let answer = async {
            fleetrun_net::send_frame(&mut self.send, &ControlUp::Renew { csr })
                .await
                .map_err(|e| why(&e))?;
            match tokio::time::timeout(Duration::from_secs(10), self.recv.recv::<ControlDown>())
                .await
            {
                Ok(Ok(Some(answer))) => Ok(answer),
                Ok(Ok(None)) => Err("the control stream ended".to_owned()),
                Ok(Err(e)) => Err(why(&e)),
                Err(_) => Err("no answer within 10 s".to_owned()),
            }
        }
        .await;
        // A connection closed by the controller says why in its close reason.
        answer.map_err(|e| match self.connection.close_reason() {
            Some(closed) => fleetrun_net::describe_connection_error(&closed),
            None => e,
        })
    }
}

fn refused_with(answer: Result<ControlDown, String>, says: &str) {
    match answer {
        Ok(ControlDown::RenewRefused { reason }) => {
            assert!(reason.contains(says), "expected {says:?} in: {reason}")
        }
        other => panic!("expected a refusal saying {says:?}, got {other:?}"),
    }
}

fn controller_log(cluster: &TestCluster) -> String {
    std::fs::read_to_string(&cluster.controller_log).unwrap_or_default()
}

/// The certificates renewed for `agent_id`, as the controller's log tells.
fn renewals_of(cluster: &TestCluster, agent_id: &str) -> usize {
    controller_log(cluster)
        .lines()
        .filter(|l| l.contains("agent certificate renewed") && l.contains(agent_id))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn renewals_over_other_keys_names_or_too_often_are_refused() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let made = token(&cluster, json!({"max_uses": 10})).await?;
    let secret = made["token"].as_str().context("token")?;
    let victim = enroll_raw(&cluster, &pin, secret, "127.0.0.60").await?;
    let thief = enroll_raw(&cluster, &pin, secret, "127.0.0.61").await?;
    let rekeyer = enroll_raw(&cluster, &pin, secret, "127.0.0.62").await?;
    let namer = enroll_raw(&cluster, &pin, secret, "127.0.0.63").await?;

    // The thief asks, over its own connection, for a certificate over the victim's key (a CSR
    // it could only sign with that key: here the test has it); another host for one over a new
    // key of its own.
    let mut thief_link = Connected::open(&cluster, &thief, PROTOCOL_VERSION).await?;
    refused_with(
        thief_link.renew(csr(&victim.key, |_| {})?).await,
        "another key than the certificate",
    );
    let mut rekeyer_link = Connected::open(&cluster, &rekeyer, PROTOCOL_VERSION).await?;
    let fresh = rcgen::KeyPair::generate()?;
    refused_with(
        rekeyer_link.renew(csr(&fresh, |_| {})?).await,
        "another key than the certificate",
    );

    // Its own key, naming another agent: refused, naming the name.
    let mut namer_link = Connected::open(&cluster, &namer, PROTOCOL_VERSION).await?;
    let other = fleetrun_proto::agent_uri(&victim.enrolled.agent_id);
    refused_with(
        namer_link
            .renew(csr(&namer.key, |p| {
                p.subject_alt_names
                    .push(rcgen::SanType::URI(other.clone().try_into().unwrap()));
            })?)
            .await,
        &format!("URI {other:?}"),
    );
    // A CSR asking to be a CA, over its own key, on a fresh connection of the victim's.
    let mut victim_link = Connected::open(&cluster, &victim, PROTOCOL_VERSION).await?;
    refused_with(
        victim_link
            .renew(csr(&victim.key, |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            })?)
            .await,
        "asks to be a CA",
    );
    for agent in [&victim, &thief, &rekeyer, &namer] {
        assert_eq!(renewals_of(&cluster, &agent.enrolled.agent_id), 0);
    }

    // The rate is per agent, not per connection: a renewal goes through, and the next one at
    // once, on a new connection, is refused by the agent's count. (Where the interval ends, and
    // which agents the count forgets, are `Renewal::too_soon`'s unit tests.)
    let renewer = enroll_raw(&cluster, &pin, secret, "127.0.0.64").await?;
    let mut link = Connected::open(&cluster, &renewer, PROTOCOL_VERSION).await?;
    match link.renew(csr(&renewer.key, |_| {})?).await {
        Ok(ControlDown::Renewed {
            certificate_pem, ..
        }) => {
            let der = fleetrun_net::first_cert_der(&certificate_pem).context("certificate")?;
            assert_eq!(
                fleetrun_net::agent_id_of_cert_der(&der)?,
                renewer.enrolled.agent_id
            );
        }
        other => bail!("the renewal was not answered with a certificate: {other:?}"),
    }
    let mut again = Connected::open(&cluster, &renewer, PROTOCOL_VERSION).await?;
    refused_with(
        again.renew(csr(&renewer.key, |_| {})?).await,
        &format!("agent {} asked for a renewal", renewer.enrolled.agent_id),
    );
    assert_eq!(renewals_of(&cluster, &renewer.enrolled.agent_id), 1);
    drop(again);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_agent_gets_no_renewal_and_a_version_2_agent_is_told_it_has_none() -> Result<()> {
    let (cluster, pin) = enrolling_cluster("").await?;
    let made = token(&cluster, json!({"max_uses": 3})).await?;
    let secret = made["token"].as_str().context("token")?;

    // Revoked while connected: the connection is cut, a renewal on it fails, and a new
    // connection to ask on is refused.
    let revoked = enroll_raw(&cluster, &pin, secret, "127.0.0.65").await?;
    // Enrolled before the revocation: afterwards the token enrolls no new key.
    let old = enroll_raw(&cluster, &pin, secret, "127.0.0.66").await?;
    let mut link = Connected::open(&cluster, &revoked, PROTOCOL_VERSION).await?;
    cluster
        .wait_online(
            std::slice::from_ref(&revoked.enrolled.agent_id),
            Duration::from_secs(10),
        )
        .await?;
    let answer = cluster
        .client()
        .call(
            "revoke_agent",
            json!({"agent_id": revoked.enrolled.agent_id}),
        )
        .await?;
    assert_eq!(answer["connections_closed"], 1, "{answer}");
    let cut = link
        .renew(csr(&revoked.key, |_| {})?)
        .await
        .expect_err("a revoked agent's connection answered a renewal");
    assert!(cut.contains("revoked"), "{cut}");
    let closed = link.connection.closed().await;
    assert!(
        fleetrun_net::describe_connection_error(&closed).contains("revoked"),
        "{closed}"
    );
    let refused = match Connected::open(&cluster, &revoked, PROTOCOL_VERSION).await {
        Ok(mut link) => link.renew(csr(&revoked.key, |_| {})?).await.err(),
        Err(e) => Some(e.to_string()),
    };
    let refused = refused.context("a revoked agent connected and renewed")?;
    assert!(refused.contains("revoked"), "{refused}");
    assert_eq!(renewals_of(&cluster, &revoked.enrolled.agent_id), 0);

    // Protocol version 2 has no renewal: the controller says so in its log when the enrolled
    // agent connects, and a renewal request under version 2 closes the connection.
    let mut link = Connected::open(&cluster, &old, 2).await?;
    let agent_id = old.enrolled.agent_id.clone();
    eventually(Duration::from_secs(10), "the warning about renewal", || {
        let log = controller_log(&cluster);
        let agent_id = agent_id.clone();
        async move {
            log.lines()
                .any(|l| {
                    l.contains(&agent_id)
                        && l.contains("protocol version 2, which cannot renew")
                        && l.contains("enrolls again with a new token")
                })
                .then_some(())
        }
    })
    .await?;
    let closed = link
        .renew(csr(&old.key, |_| {})?)
        .await
        .expect_err("a renewal under version 2 was answered");
    assert!(closed.contains("renewal needs version 3"), "{closed}");
    assert_eq!(renewals_of(&cluster, &agent_id), 0);
    Ok(())
}
