//! A development PKI: one CA, the controller's certificate, one certificate per agent.
//!
//! Layout under the certificate directory:
//! ```text
//! ca.pem  ca.key.pem                     the CA (its key signs further agents)
//! controller.pem  controller.key.pem     SAN: fleetrun-controller, localhost, 127.0.0.1, ::1
//! agents/<id>.pem  agents/<id>.key.pem   SAN URI spiffe://fleetrun/agent/<id> (and, when the
//!                                        agent's address is known, that IP address)
//! ```
//! The controller's certificate is for server authentication only, the agents' for client
//! authentication only (the controller refuses an agent certificate without it). An agent
//! certificate naming addresses binds the agent to them: the controller refuses any other address
//! it reports. Keys are written 0600. An existing CA is reused, so adding agents keeps earlier
//! certificates valid.

use std::{
    fs,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The name agents expect in the controller's certificate.
pub const CONTROLLER_NAME: &str = "fleetrun-controller";

/// Paths of one certificate and its key.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that can issue certificates.
pub struct Ca {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, contents.as_bytes())?;
    Ok(())
}

impl Ca {
    /// Opens the CA in `dir`, creating it if there is none. `name` goes in its subject.
    pub fn open_or_create(dir: &Path, name: &str) -> Result<Self> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key.pem");
        if cert_path.exists() && key_path.exists() {
            let key = KeyPair::from_pem(&fs::read_to_string(&key_path)?)?;
            let issuer = Issuer::from_ca_cert_pem(&fs::read_to_string(&cert_path)?, key)?;
            return Ok(Self {
                dir: dir.to_owned(),
                issuer,
            });
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_file(&cert_path, &cert.pem(), 0o644)?;
        write_file(&key_path, &key.serialize_pem(), 0o600)?;
        Ok(Self {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Signs `params` over a fresh key; writes the certificate to `cert` and the key to `key`.
    pub fn issue(&self, params: CertificateParams, cert: &Path, key: &Path) -> Result<CertPaths> {
        let key_pair = KeyPair::generate()?;
        let issued = params.signed_by(&key_pair, &self.issuer)?;
        write_file(cert, &issued.pem(), 0o644)?;
        write_file(key, &key_pair.serialize_pem(), 0o600)?;
        Ok(CertPaths {
            cert: cert.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The controller's server certificate.
    pub fn issue_controller(&self) -> Result<CertPaths> {
        let mut params =
            CertificateParams::new(vec![CONTROLLER_NAME.to_owned(), "localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params
            .subject_alt_names
            .push(SanType::IpAddress("::1".parse()?));
        params
            .distinguished_name
            .push(DnType::CommonName, CONTROLLER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(
            params,
            &self.dir.join("controller.pem"),
            &self.dir.join("controller.key.pem"),
        )
    }

    /// An agent's client certificate, naming it by URI SAN, and no address.
    pub fn issue_agent(&self, agent_id: &str) -> Result<CertPaths> {
        self.issue_agent_at(agent_id, &[])
    }

    /// An agent's client certificate naming it and the addresses it may report.
    pub fn issue_agent_at(&self, agent_id: &str, ips: &[IpAddr]) -> Result<CertPaths> {
        let agents = self.dir.join("agents");
        self.issue(
            agent_params(agent_id, ips)?,
            &agents.join(format!("{agent_id}.pem")),
            &agents.join(format!("{agent_id}.key.pem")),
        )
    }
}

/// What an agent certificate holds: its URI SAN, its addresses as IP SANs, client authentication.
pub fn agent_params(agent_id: &str, ips: &[IpAddr]) -> Result<CertificateParams> {
    anyhow::ensure!(
        fleetrun_proto::is_valid_agent_id(agent_id),
        "invalid agent id {agent_id:?}"
    );
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names.push(SanType::URI(
        fleetrun_proto::agent_uri(agent_id).try_into()?,
    ));
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.distinguished_name.push(DnType::CommonName, agent_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// `cargo xtask certs`: a CA, the controller's certificate, and `agents` agent certificates
/// named `agent-1` … `agent-N`.
pub fn generate(dir: &Path, agents: usize) -> Result<()> {
    let ca = Ca::open_or_create(dir, "fleetrun development CA")?;
    ca.issue_controller()?;
    for i in 1..=agents {
        ca.issue_agent(&format!("agent-{i}"))?;
    }
    Ok(())
}
