//! An agent's identity, read from the certificate it authenticated with.

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

/// The agent id in the peer's (already verified) certificate.
pub fn peer_agent_id(connection: &quinn::Connection) -> Result<String, IdentityError> {
    let certs = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    agent_id_in_der(leaf)
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
    agent_id_in_der(&cert)
}

fn agent_id_in_der(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let mut ids = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => fleetrun_proto::agent_id_from_uri(uri),
            _ => None,
        });
    let id = ids.next().ok_or(IdentityError::NotAnAgent)?;
    if ids.next().is_some() {
        return Err(IdentityError::Ambiguous);
    }
    Ok(id.to_owned())
}
