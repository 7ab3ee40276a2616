//! The controller's endpoint accepts only certificates from its CA that are meant for client
//! authentication: a certificate the CA signed for another purpose, or for no stated purpose,
//! does not make an agent.

use std::time::Duration;

use anyhow::Result;
use fleetrun_net::{Timing, TlsFiles, client_endpoint, peer_agent, server_endpoint};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        std::fs::write(dir.path().join("ca.pem"), cert.pem())?;
        let issuer = Issuer::new(params, key);
        let pki = Self { dir, issuer };
        let mut server = CertificateParams::new(vec!["fleetrun-controller".to_owned()])?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki.issue("controller", server)?;
        Ok(pki)
    }

    fn issue(&self, name: &str, params: CertificateParams) -> Result<TlsFiles> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let path = |suffix: &str| self.dir.path().join(format!("{name}{suffix}"));
        std::fs::write(path(".pem"), cert.pem())?;
        std::fs::write(path(".key.pem"), key.serialize_pem())?;
        Ok(TlsFiles {
            ca: self.dir.path().join("ca.pem"),
            cert: path(".pem"),
            key: path(".key.pem"),
        })
    }

    /// An agent certificate naming `agent_id` and `ips`, with these extended key usages.
    fn agent(
        &self,
        agent_id: &str,
        ips: &[&str],
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<TlsFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names.push(SanType::URI(
            fleetrun_proto::agent_uri(agent_id).try_into()?,
        ));
        for ip in ips {
            params
                .subject_alt_names
                .push(SanType::IpAddress(ip.parse()?));
        }
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(agent_id, params)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// Connects with `client` to a fresh controller endpoint; returns what the controller made of it.
async fn handshake(
    pki: &Pki,
    client: &TlsFiles,
) -> Result<Result<fleetrun_net::AgentCertificate, String>> {
    let server = server_endpoint(
        &TlsFiles {
            ca: pki.path("ca.pem"),
            cert: pki.path("controller.pem"),
            key: pki.path("controller.key.pem"),
        },
        "127.0.0.1:0".parse()?,
        Timing::default(),
    )?;
    let addr = server.local_addr()?;
    let accepted = tokio::spawn(async move {
        let incoming = server.accept().await.expect("an incoming connection");
        match incoming.await {
            Ok(connection) => peer_agent(&connection).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    let endpoint = client_endpoint(client, "127.0.0.1:0".parse()?, Timing::default())?;
    // With TLS 1.3 the client's side completes first; the server's verdict is what counts.
    if let Ok(Ok(connection)) = tokio::time::timeout(
        Duration::from_secs(5),
        endpoint.connect(addr, "fleetrun-controller")?,
    )
    .await
    {
        let _ = connection.open_bi().await;
    }
    Ok(tokio::time::timeout(Duration::from_secs(10), accepted).await??)
}

#[tokio::test]
async fn a_certificate_for_client_authentication_is_an_agent_with_its_addresses() -> Result<()> {
    let pki = Pki::new()?;
    let files = pki.agent(
        "agent-1",
        &["10.0.0.5", "::ffff:10.0.0.6"],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let agent = handshake(&pki, &files).await?.expect("accepted");
    assert_eq!(agent.agent_id, "agent-1");
    assert_eq!(
        agent.ips,
        ["10.0.0.5".parse::<std::net::IpAddr>()?, "10.0.0.6".parse()?]
    );
    Ok(())
}

#[tokio::test]
async fn a_certificate_without_the_client_auth_usage_is_refused() -> Result<()> {
    let pki = Pki::new()?;
    for (name, usages) in [
        ("no-usage", vec![]),
        ("server-only", vec![ExtendedKeyUsagePurpose::ServerAuth]),
        ("code-signing", vec![ExtendedKeyUsagePurpose::CodeSigning]),
    ] {
        let files = pki.agent(name, &[], usages)?;
        let verdict = handshake(&pki, &files).await?;
        let Err(why) = verdict else {
            panic!("{name}: accepted {verdict:?}");
        };
        assert!(
            why.to_lowercase().contains("certificate") || why.contains("alert"),
            "{name}: {why}"
        );
    }
    Ok(())
}
