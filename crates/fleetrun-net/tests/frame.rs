//! A frame read may be abandoned halfway (the agent's task stream waits for the controller's next
//! frame beside its own work and drops the read when the work comes first): the bytes already
//! read are kept, and the next read returns the whole frame.

use std::time::Duration;

use anyhow::Result;
use fleetrun_net::{FramedRecv, Timing, TlsFiles, client_endpoint, server_endpoint};
use fleetrun_proto::{TaskUp, encode_frame};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA, a controller certificate and an agent certificate in `dir`.
fn pki(dir: &std::path::Path) -> Result<(TlsFiles, TlsFiles)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    std::fs::write(dir.join("ca.pem"), params.self_signed(&key)?.pem())?;
    let issuer = Issuer::new(params, key);
    let issue = |name: &str, params: CertificateParams| -> Result<TlsFiles> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key.pem")), key.serialize_pem())?;
        Ok(TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key.pem")),
        })
    };
    let mut server = CertificateParams::new(vec!["fleetrun-controller".to_owned()])?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = issue("controller", server)?;
    let mut agent = CertificateParams::new(Vec::<String>::new())?;
    agent.subject_alt_names.push(SanType::URI(
        fleetrun_proto::agent_uri("agent-1").try_into()?,
    ));
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    agent.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let agent = issue("agent", agent)?;
    Ok((server, agent))
}

#[tokio::test]
async fn a_read_dropped_halfway_through_a_frame_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server_files, agent_files) = pki(dir.path())?;
    let server = server_endpoint(&server_files, "127.0.0.1:0".parse()?, Timing::default())?;
    let addr = server.local_addr()?;
    let accepted = tokio::spawn(async move {
        let connection = server.accept().await.expect("incoming").await?;
        let (_send, recv) = connection.accept_bi().await?;
        anyhow::Ok((server, connection, recv))
    });
    let client = client_endpoint(&agent_files, "127.0.0.1:0".parse()?, Timing::default())?;
    let connection = client.connect(addr, "fleetrun-controller")?.await?;
    let (mut send, _recv) = connection.open_bi().await?;

    let sent = TaskUp::Output {
        offset: 7,
        data: (0..4096u32).map(|i| i as u8).collect(),
    };
    let frame = encode_frame(&sent)?;
    let half = frame.len() / 2;
    // The stream is announced to the peer by its first bytes.
    send.write_all(&frame[..half]).await?;
    let (_server, _connection, recv) =
        tokio::time::timeout(Duration::from_secs(10), accepted).await???;
    let mut recv = FramedRecv::new(recv);
    // The read takes the first half, then waits for the rest and is dropped.
    let dropped = tokio::time::timeout(Duration::from_millis(300), recv.recv::<TaskUp>()).await;
    assert!(dropped.is_err(), "half a frame made a message: {dropped:?}");

    send.write_all(&frame[half..]).await?;
    let got = tokio::time::timeout(Duration::from_secs(10), recv.recv::<TaskUp>()).await??;
    assert_eq!(got, Some(sent));
    send.finish()?;
    let end = tokio::time::timeout(Duration::from_secs(10), recv.recv::<TaskUp>()).await??;
    assert_eq!(end, None, "nothing is left over");
    Ok(())
}
