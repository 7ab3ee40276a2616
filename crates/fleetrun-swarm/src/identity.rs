//! The virtual agents' identities: one client certificate each, naming the agent by its
//! `spiffe://fleetrun/agent/<id>` URI SAN, as the controller requires.
//!
//! Certificates are either issued here from the deployment's CA (all of them over one key pair:
//! signing 10,000 certificates takes well under a second, generating 10,000 keys would not, and
//! the controller identifies an agent by its certificate's name, never by its key), or read from a
//! directory of pre-issued `<id>.pem` / `<id>.key.pem` pairs.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    sign::{CertifiedKey, SigningKey},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// One virtual agent's certificate and key, ready for a TLS client configuration.
#[derive(Debug)]
pub struct Identity {
    pub agent_id: String,
    pub key: Arc<CertifiedKey>,
}

/// Issues a certificate for each of `agent_ids` from the CA in `ca_cert` / `ca_key`, all over one
/// freshly generated key pair. Work is spread over `threads` threads.
pub fn issue(
    provider: &CryptoProvider,
    ca_cert: &Path,
    ca_key: &Path,
    agent_ids: &[String],
    threads: usize,
) -> Result<Vec<Identity>> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let ca_key = KeyPair::from_pem(&read(ca_key)?).context("parsing the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&read(ca_cert)?, ca_key).context("parsing the CA certificate")?;
    let key = KeyPair::generate().context("generating the agents' key pair")?;
    let signing = signing_key(
        provider,
        PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("the generated key: {e}"))?,
    )?;

    let chunk = agent_ids.len().div_ceil(threads.max(1)).max(1);
    let issued: Vec<Result<Vec<Identity>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = agent_ids
            .chunks(chunk)
            .map(|ids| {
                let (issuer, key, signing) = (&issuer, &key, &signing);
                scope.spawn(move || {
                    ids.iter()
                        .map(|id| {
                            let cert = agent_params(id)?.signed_by(key, issuer)?;
                            Ok(Identity {
                                agent_id: id.clone(),
                                key: Arc::new(CertifiedKey::new(
                                    vec![cert.der().clone()],
                                    signing.clone(),
                                )),
                            })
                        })
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| bail!("a certificate worker panicked"))
            })
            .collect()
    });
    let mut identities = Vec::with_capacity(agent_ids.len());
    for part in issued {
        identities.extend(part?);
    }
    Ok(identities)
}

/// What `fleetrun_testkit::pki::Ca::issue_agent` puts in an agent certificate.
fn agent_params(agent_id: &str) -> Result<CertificateParams> {
    ensure!(
        fleetrun_proto::is_valid_agent_id(agent_id),
        "invalid agent id {agent_id:?}"
    );
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names.push(SanType::URI(
        fleetrun_proto::agent_uri(agent_id).try_into()?,
    ));
    params.distinguished_name.push(DnType::CommonName, agent_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn signing_key(
    provider: &CryptoProvider,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<dyn SigningKey>> {
    provider
        .key_provider
        .load_private_key(key)
        .context("loading the agents' private key")
}

/// Reads every `<name>.pem` with a `<name>.key.pem` beside it in `dir`, in name order, at most
/// `limit` of them. The agent id comes from the certificate, as the real agent reads it.
pub fn load_dir(provider: &CryptoProvider, dir: &Path, limit: usize) -> Result<Vec<Identity>> {
    let mut certs: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension().is_some_and(|e| e == "pem")
                && !path.to_string_lossy().ends_with(".key.pem")
        })
        .collect();
    certs.sort();
    let mut identities = Vec::new();
    for cert_path in certs {
        if identities.len() == limit {
            break;
        }
        let key_path = cert_path.with_extension("key.pem");
        if !key_path.exists() {
            continue;
        }
        let agent_id = fleetrun_net::agent_id_of_cert_file(&cert_path)
            .with_context(|| format!("reading the agent id of {}", cert_path.display()))?;
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
        identities.push(Identity {
            agent_id,
            key: Arc::new(CertifiedKey::new(chain, signing_key(provider, key)?)),
        });
    }
    ensure!(
        !identities.is_empty(),
        "no certificate with a key in {}",
        dir.display()
    );
    Ok(identities)
}

/// Presents one fixed certificate, whatever the server asks: each virtual agent has its own.
#[derive(Debug)]
pub(crate) struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Offer the certificate only if its key can sign in a scheme the server accepts.
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
