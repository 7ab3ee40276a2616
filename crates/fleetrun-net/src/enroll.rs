//! TLS for enrollment: the controller's listener, and an agent's client that trusts the
//! controller only through the CA fingerprint it was given (`--ca-pin sha256:...`).
//!
//! The enrollment listener is TCP on the QUIC gateway's port number. It cannot share the QUIC
//! endpoint: a host enrolling has no certificate yet, and the gateway's TLS demands one in the
//! handshake of every connection (client authentication is a setting of the endpoint, not of an
//! ALPN), which keeps anything unauthenticated away from the agent protocol. It serves the same
//! certificate as the gateway, followed by the CA certificates, so the agent can find the CA it
//! pins in the chain and check the controller's certificate against it.

use std::{path::Path, sync::Arc};

use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};

use crate::tls::{TlsError, TlsFiles, load_certs, load_key, provider};

/// The pin of a CA certificate: `sha256:` and the hex SHA-256 of its DER encoding.
pub fn ca_pin(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex(digest.as_ref()))
}

/// The pins of every certificate in a PEM file (a CA bundle has several).
pub fn ca_pins_of_file(path: &Path) -> Result<Vec<String>, TlsError> {
    Ok(load_certs(path)?.iter().map(|c| ca_pin(c)).collect())
}

/// Whether the gateway, trusting the CAs in the file `ca`, accepts `chain` (the leaf first) as
/// an agent's certificate now: how a controller checks that the certificates its enrollment CA
/// issues will get agents in.
pub fn gateway_accepts(ca: &Path, chain: &[CertificateDer<'static>]) -> Result<(), String> {
    use rustls::server::danger::ClientCertVerifier as _;
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    let verifier = crate::tls::client_verifier(ca).map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// A pin as the operator wrote it, checked: `sha256:` and 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPin([u8; 32]);

impl std::str::FromStr for CaPin {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{text:?} is not a CA pin: write sha256: and the 64 hex digits `fleetrun tokens \
                 create` printed"
            )
        };
        let digits = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut pin = [0u8; 32];
        for (i, byte) in pin.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(pin))
    }
}

impl std::fmt::Display for CaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

/// The enrollment listener's TLS: TLS 1.3, no client certificate, the gateway's certificate
/// chain followed by the CA certificates of `files.ca`, ALPN [`fleetrun_proto::ENROLL_ALPN`].
pub fn enroll_server_tls(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let mut chain = load_certs(&files.cert)?;
    for ca in load_certs(&files.ca)? {
        if !chain.contains(&ca) {
            chain.push(ca);
        }
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, load_key(&files.key)?)?;
    tls.alpn_protocols = vec![fleetrun_proto::ENROLL_ALPN.to_vec()];
    Ok(tls)
}

/// An enrolling agent's TLS: the controller's certificate must chain to the certificate it sends
/// whose fingerprint is `pin`, and name `server_name` (checked by the caller's connect).
pub fn enroll_client_tls(pin: CaPin) -> Result<rustls::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![fleetrun_proto::ENROLL_ALPN.to_vec()];
    Ok(tls)
}

/// Trusts the one CA certificate in the server's chain whose fingerprint is the pin, then
/// verifies the server's certificate against it as webpki does against any root.
#[derive(Debug)]
struct PinnedCa {
    pin: CaPin,
}

impl PinnedCa {
    fn verifier(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let anchor = intermediates
            .iter()
            .find(|c| ring::digest::digest(&ring::digest::SHA256, c).as_ref() == self.pin.0)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the controller's CA is not the one pinned ({}): check --ca-pin and \
                     --controller, or ask for the pin `fleetrun tokens create` printed",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(anchor.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier(intermediates)?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The first certificate of a PEM text, DER.
pub fn first_cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_print() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let pin: CaPin = text.parse().unwrap();
        assert_eq!(pin.to_string(), text);
        let multibyte = format!("sha256:{}é", "a".repeat(62));
        for bad in [
            "",
            "sha256:",
            "ab".repeat(32).as_str(),
            "sha256:zz",
            "md5:00",
            &multibyte,
        ] {
            let refused = bad.parse::<CaPin>().unwrap_err();
            assert!(refused.contains("not a CA pin"), "{refused}");
        }
        assert_eq!(ca_pin(b"x").len(), "sha256:".len() + 64);
    }
}
