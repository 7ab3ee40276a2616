//! An agent's identity, read from the certificate it authenticated with.

use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The peer's certificate does not name exactly one agent.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The connection carries no client certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("unparsable certificate: {0}")]
    Unparsable(String),
    /// The certificate has no `spiffe://fleetrun/agent/<id>` name.
    #[error("certificate names no fleetrun agent")]
    NotAnAgent,
    /// The certificate names more than one agent.
    #[error("certificate names several agents")]
    Ambiguous,
}

/// What an agent's (already verified) certificate vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertificate {
    /// The agent id of its one `spiffe://fleetrun/agent/<id>` name.
    pub agent_id: String,
    /// Its IP address names, canonical (IPv4-mapped IPv6 written as IPv4); empty when the
    /// certificate names no address.
    pub ips: Vec<IpAddr>,
}

/// The agent id in the peer's (already verified) certificate.
pub fn peer_agent_id(connection: &quinn::Connection) -> Result<String, IdentityError> {
    Ok(peer_agent(connection)?.agent_id)
}

/// The agent id and addresses in the peer's (already verified) certificate.
pub fn peer_agent(connection: &quinn::Connection) -> Result<AgentCertificate, IdentityError> {
    let certs = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    agent_certificate_in_der(leaf)
}

/// The agent id in a PEM certificate file (the first certificate of the chain): how an agent
/// learns its own identity.
pub fn agent_id_of_cert_file(path: &std::path::Path) -> Result<String, IdentityError> {
    use rustls_pki_types::pem::PemObject;
    let cert = CertificateDer::pem_file_iter(path)
        .map_err(|e| IdentityError::Unparsable(format!("{}: {e}", path.display())))?
        .next()
        .ok_or(IdentityError::NoCertificate)?
        .map_err(|e| IdentityError::Unparsable(format!("{}: {e}", path.display())))?;
    Ok(agent_certificate_in_der(&cert)?.agent_id)
}

/// The agent id in a DER certificate.
pub fn agent_id_of_cert_der(der: &[u8]) -> Result<String, IdentityError> {
    Ok(agent_certificate_in_der(der)?.agent_id)
}

fn agent_certificate_in_der(der: &[u8]) -> Result<AgentCertificate, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let names = || san.iter().flat_map(|ext| ext.value.general_names.iter());
    let mut ids = names().filter_map(|name| match name {
        GeneralName::URI(uri) => fleetrun_proto::agent_id_from_uri(uri),
        _ => None,
    });
    let id = ids.next().ok_or(IdentityError::NotAnAgent)?;
    if ids.next().is_some() {
        return Err(IdentityError::Ambiguous);
    }
    let ips = names()
        .filter_map(|name| match name {
            GeneralName::IPAddress(bytes) => ip_from_san(bytes),
            _ => None,
        })
        .collect();
    Ok(AgentCertificate {
        agent_id: id.to_owned(),
        ips,
    })
}

/// An IP address name: 4 or 16 bytes (a name constraint's 8 or 32 would be an address range,
/// which has no place in an end-entity certificate and names nothing here).
fn ip_from_san(bytes: &[u8]) -> Option<IpAddr> {
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(ip.to_canonical())
}
