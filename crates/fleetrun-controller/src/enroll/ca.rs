//! The controller's CA: made by `fleetrun-controller ca init` (or an operator's intermediate CA
//! imported by it), kept in two files, and used to sign agents' certificates.
//!
//! Files rather than the store: the key is the deployment's most valuable secret, and a file of
//! its own (0600, beside the database or wherever `[enroll] ca_key` says) stays out of database
//! dumps, replicas and anything with SQL read access, and is backed up, rotated and shared
//! between controllers the way the TLS files already are.

use std::{
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

/// Where the CA's certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loading, making or using the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The files do not hold a usable CA.
    #[error("{0}")]
    Invalid(String),
    /// rcgen refused to sign.
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::File {
        path: path.to_owned(),
        source,
    }
}

/// A CA that signs agents' certificates.
pub struct ControllerCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM, appended to issued chains so that an intermediate CA's agents
    /// present the whole path.
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for ControllerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerCa")
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

/// A certificate issued to an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The agent's certificate followed by the CA's, PEM.
    pub chain_pem: String,
    /// Unix milliseconds.
    pub not_after_ms: i64,
}

/// The public key of a certificate signing request that asks for nothing the controller does
/// not give (see [`super::csr`]) and whose signature checks, and its fingerprint (hex SHA-256
/// of its SubjectPublicKeyInfo).
#[derive(Debug)]
pub struct RequestedKey {
    public_key: rcgen::PublicKey,
    pub sha256: String,
}

impl RequestedKey {
    /// The agent this key is: its identity derives from the key's fingerprint, so the same key
    /// is always the same agent.
    pub fn agent_id(&self) -> String {
        agent_id_of_key(&self.sha256)
    }
}

fn agent_id_of_key(sha256_hex: &str) -> String {
    format!("host-{}", &sha256_hex[..24])
}

pub(super) fn spki_sha256(spki: &[u8]) -> String {
    fleetrun_net::hex(ring::digest::digest(&ring::digest::SHA256, spki).as_ref())
}

/// Reads a CSR; a message for the agent when it is not one the controller signs.
pub fn requested_key(csr_der: &[u8]) -> Result<RequestedKey, String> {
    let spki = super::csr::check(csr_der, |spki| {
        fleetrun_proto::agent_uri(&agent_id_of_key(&spki_sha256(spki)))
    })?;
    let params = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
        csr_der,
    ))
    .map_err(|e| {
        format!(
            "the certificate signing request is not usable ({e}): make it with `fleetrun-agent \
             enroll`"
        )
    })?;
    // rcgen rebuilds the key from the request's signature algorithm: the certificate must carry
    // the very key the agent's identity is the fingerprint of, byte for byte.
    if params.public_key.subject_public_key_info() != spki {
        return Err(
            "the certificate signing request's key would not be the certificate's as it is \
             written (its encoding or type does not match its signature algorithm): make it with \
             `fleetrun-agent enroll`"
                .into(),
        );
    }
    Ok(RequestedKey {
        public_key: params.public_key,
        sha256: spki_sha256(&spki),
    })
}

impl ControllerCa {
    /// Loads the CA from its files.
    pub fn load(files: &CaFiles) -> Result<Self, CaError> {
        let cert_pem = std::fs::read_to_string(&files.cert).map_err(file_error(&files.cert))?;
        // The key signs every agent's certificate: refused unless only its owner can read it.
        let key_pem = crate::secret_source::read_secret_file(&files.key)
            .map_err(|e| CaError::Invalid(format!("the CA key {}: {e}", files.key.display())))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid(format!("the CA key: {e}")))?;
        let cert_der = fleetrun_net::first_cert_der(cert_pem).ok_or_else(|| {
            CaError::Invalid("the CA certificate file holds no certificate".into())
        })?;
        check_is_ca(&cert_der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::Invalid(format!("the CA certificate: {e}")))?;
        let cert_pem = pem_of(&cert_der);
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    /// The pin agents give as `--ca-pin`.
    pub fn pin(&self) -> String {
        fleetrun_net::ca_pin(&self.cert_der)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a client certificate for `agent_id` over `key`, valid for `lifetime` from now (and
    /// a little before: clocks differ). The only names are the controller's choice: the agent URI.
    pub fn issue_agent(
        &self,
        key: &RequestedKey,
        agent_id: &str,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, agent_id);
        params.subject_alt_names = vec![SanType::URI(
            fleetrun_proto::agent_uri(agent_id)
                .try_into()
                .map_err(|e| CaError::Invalid(format!("agent uri: {e}")))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        let now = time::OffsetDateTime::now_utc();
        // Valid a little before now for hosts whose clocks lag, but never so much that the
        // renewal point (two thirds from the start) comes early: a tenth of the life, at most a
        // minute.
        params.not_before = now - (lifetime / 10).min(Duration::from_secs(60));
        let not_after = now + lifetime;
        params.not_after = not_after;
        let serial = super::token::random::<16>()
            .map_err(|_| CaError::Invalid("the system's random source failed".into()))?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&key.public_key, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000) as i64,
        })
    }
}

impl ControllerCa {
    /// Checks that the gateway, trusting the CA bundle `tls_ca` (`[tls] ca`), accepts the
    /// certificates this CA issues: a sample agent certificate is issued and verified as the
    /// gateway verifies agents. `ca_cert` is the CA's file, for the message.
    pub fn check_gateway_trusts(&self, ca_cert: &Path, tls_ca: &Path) -> Result<(), String> {
        // A CA out of its validity issues certificates no verifier accepts, whatever the bundle
        // holds: said as such, since the cure is a new CA rather than the bundle.
        self.check_valid_now(ca_cert)?;
        let sample = (|| -> Result<Issued, String> {
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let csr = CertificateParams::new(Vec::<String>::new())
                .and_then(|params| params.serialize_request(&key))
                .map_err(|e| e.to_string())?;
            let requested = requested_key(csr.der())?;
            self.issue_agent(&requested, &requested.agent_id(), Duration::from_secs(3600))
                .map_err(|e| e.to_string())
        })()
        .map_err(|e| format!("the enrollment CA could not issue a sample certificate: {e}"))?;
        use rustls_pki_types::pem::PemObject as _;
        let chain = CertificateDer::pem_slice_iter(sample.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        fleetrun_net::gateway_accepts(tls_ca, &chain).map_err(|e| {
            format!(
                "the enrollment CA {} is not trusted by the agent gateway: [tls] ca {} holds \
                 neither it nor a CA it chains to, so every agent it enrolls would be refused \
                 ({e}); add the CA to the bundle (cat {} >> {}) or import the gateway's CA with \
                 `fleetrun-controller ca init --import-cert`",
                ca_cert.display(),
                tls_ca.display(),
                ca_cert.display(),
                tls_ca.display()
            )
        })
    }
}

impl ControllerCa {
    fn check_valid_now(&self, ca_cert: &Path) -> Result<(), String> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&self.cert_der)
            .map_err(|e| format!("the enrollment CA {}: {e}", ca_cert.display()))?;
        let validity = cert.validity();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let when = |at: &x509_parser::time::ASN1Time| super::rfc3339(at.timestamp() * 1000);
        let problem = if now > validity.not_after.timestamp() {
            format!("expired at {}", when(&validity.not_after))
        } else if now < validity.not_before.timestamp() {
            format!(
                "is not valid until {} (or this host's clock is behind)",
                when(&validity.not_before)
            )
        } else {
            return Ok(());
        };
        Err(format!(
            "the enrollment CA {} {problem}: every certificate it issues would be refused; make \
             a new CA (move {} and its key away, run `fleetrun-controller ca init`, and give \
             [tls] ca the new CA; every agent then enrolls again with a new token)",
            ca_cert.display(),
            ca_cert.display()
        ))
    }
}

/// The CA certificate must be a CA and match its key.
fn check_is_ca(cert_der: &CertificateDer<'_>, key: &KeyPair) -> Result<(), CaError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| CaError::Invalid(format!("the CA certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(CaError::Invalid(
            "the CA certificate is not a CA (basicConstraints CA:TRUE is missing)".into(),
        ));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(CaError::Invalid(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }
    Ok(())
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Writes `contents` to a new file with `mode`; refuses to replace one.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(file_error(parent))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(file_error(path))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(file_error(path))
}

/// Where `ca init` takes the CA from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A new self-signed CA.
    New,
    /// An operator's (intermediate) CA: its certificate and key, PEM.
    Import { cert: PathBuf, key: PathBuf },
}

/// What `ca init` did.
#[derive(Debug)]
pub struct Initialized {
    pub pin: String,
    /// Files written besides the CA's: the gateway's certificate, key and CA bundle, when they
    /// did not exist.
    pub also_written: Vec<PathBuf>,
}

/// Makes (or imports) the CA into `files`, which must not exist yet. When the gateway's TLS
/// files (`tls`) do not exist either, also writes the CA as `tls.ca` and issues the gateway's
/// server certificate for `server_names` (DNS names or IP addresses), so that a new controller
/// needs nothing else.
pub fn init(
    files: &CaFiles,
    source: &CaSource,
    tls: &fleetrun_net::TlsFiles,
    server_names: &[String],
) -> Result<Initialized, CaError> {
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(CaError::Invalid(format!(
                "{} exists already: the CA is made once (move the old files away first to \
                 replace it; every agent then enrolls again)",
                path.display()
            )));
        }
    }
    let (cert_pem, key_pem) = match source {
        CaSource::New => {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "fleetrun controller CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(1);
            params.not_after = now + time::Duration::days(3650);
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            (cert.pem(), key.serialize_pem())
        }
        CaSource::Import { cert, key } => (
            std::fs::read_to_string(cert).map_err(file_error(cert))?,
            std::fs::read_to_string(key).map_err(file_error(key))?,
        ),
    };
    let ca = ControllerCa::from_pem(&cert_pem, &key_pem)?;
    write_new(&files.key, &key_pem, 0o600)?;
    write_new(&files.cert, &cert_pem, 0o600)?;
    let mut also_written = Vec::new();
    if !tls.cert.exists() && !tls.key.exists() {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetrun-controller");
        let mut names = vec!["fleetrun-controller".to_owned()];
        names.extend(server_names.iter().cloned());
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|e| CaError::Invalid(format!("server name {name:?}: {e}")))?,
                ),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(397);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca.issuer)?;
        write_new(&tls.key, &key.serialize_pem(), 0o600)?;
        write_new(&tls.cert, &format!("{}{}", cert.pem(), ca.cert_pem), 0o644)?;
        also_written.extend([tls.cert.clone(), tls.key.clone()]);
    }
    if !tls.ca.exists() {
        write_new(&tls.ca, &ca.cert_pem, 0o644)?;
        also_written.push(tls.ca.clone());
    }
    Ok(Initialized {
        pin: ca.pin(),
        also_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, names: Vec<String>) -> Vec<u8> {
        let mut params = CertificateParams::new(names).unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://fleetrun/agent/chosen".try_into().unwrap(),
        ));
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn the_ca_is_made_once_and_issues_only_names_it_chooses() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca.key.pem"),
        };
        let tls = fleetrun_net::TlsFiles {
            ca: dir.path().join("tls-ca.pem"),
            cert: dir.path().join("controller.pem"),
            key: dir.path().join("controller.key.pem"),
        };
        let made = init(&files, &CaSource::New, &tls, &["10.0.0.1".into()]).unwrap();
        assert_eq!(made.also_written.len(), 3);
        use std::os::unix::fs::PermissionsExt;
        for path in [&files.cert, &files.key, &tls.key] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let again = init(&files, &CaSource::New, &tls, &[]).unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        let ca = ControllerCa::load(&files).unwrap();
        assert_eq!(ca.pin(), made.pin);
        // A key others can read is refused.
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loose = ControllerCa::load(&files).unwrap_err().to_string();
        assert!(loose.contains("mode 644"), "{loose}");
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The gateway's files are usable as they are.
        fleetrun_net::server_tls(&tls).unwrap();

        let agent_key = KeyPair::generate().unwrap();
        // A request that names itself is refused, saying which name.
        let named = requested_key(&csr(&agent_key, vec!["evil.example".into()])).unwrap_err();
        assert!(named.contains("DNS \"evil.example\""), "{named}");
        let request = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&agent_key)
            .unwrap()
            .der()
            .to_vec();
        let key = requested_key(&request).unwrap();
        let issued = ca
            .issue_agent(&key, "host-abc", Duration::from_secs(3600))
            .unwrap();
        let leaf = fleetrun_net::first_cert_der(&issued.chain_pem).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
        let sans = format!(
            "{:?}",
            cert.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(sans.contains("spiffe://fleetrun/agent/host-abc"), "{sans}");
        assert_eq!(cert.public_key().raw, agent_key.subject_public_key_info());
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60);

        let mut tampered = request.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(requested_key(&tampered).is_err());
        assert!(
            requested_key(b"garbage")
                .unwrap_err()
                .contains("not usable")
        );
    }

    #[test]
    fn an_imported_ca_must_be_a_ca_with_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("leaf.key"), key.serialize_pem()).unwrap();
        let files = CaFiles {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca.key.pem"),
        };
        let tls = fleetrun_net::TlsFiles {
            ca: dir.path().join("tls-ca.pem"),
            cert: dir.path().join("c.pem"),
            key: dir.path().join("c.key"),
        };
        let source = CaSource::Import {
            cert: dir.path().join("leaf.pem"),
            key: dir.path().join("leaf.key"),
        };
        let refused = init(&files, &source, &tls, &[]).unwrap_err();
        assert!(refused.to_string().contains("not a CA"), "{refused}");
        assert!(!files.key.exists());
    }

    #[test]
    fn an_expired_or_future_ca_is_said_to_be_so_rather_than_missing_from_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        for (not_before, not_after, says) in [
            (
                now - time::Duration::days(30),
                now - time::Duration::days(1),
                "expired at",
            ),
            (
                now + time::Duration::days(1),
                now + time::Duration::days(30),
                "is not valid until",
            ),
        ] {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.not_before = not_before;
            params.not_after = not_after;
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let ca = ControllerCa::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
            // The bundle holds the CA: only its dates are wrong.
            let bundle = dir.path().join("tls-ca.pem");
            std::fs::write(&bundle, cert.pem()).unwrap();
            let refused = ca
                .check_gateway_trusts(Path::new("ca.pem"), &bundle)
                .unwrap_err();
            assert!(refused.contains(says), "{refused}");
            assert!(refused.contains("ca init"), "{refused}");
            assert!(!refused.contains("add the CA"), "{refused}");
        }
    }
}
