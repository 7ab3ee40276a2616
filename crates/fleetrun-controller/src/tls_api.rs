//! HTTPS for the API: rustls with the ring provider, the certificate and key read from
//! `[api] tls`, and read again on SIGHUP without dropping a connection: each new connection
//! takes the configuration in force when it arrives.
//!
//! TLS 1.2 is accepted besides 1.3 here (unlike between controller and agents): bk-job clients
//! and SDKs are not ours to upgrade.

use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::ApiTlsConfig;

/// The API's TLS configuration in force, and where it comes from.
pub struct ApiTls {
    files: ApiTlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The certificate chain in force, to tell whether a reload changed it.
    chain: RwLock<Vec<CertificateDer<'static>>>,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("cert", &self.files.cert)
            .field("key", &self.files.key)
            .finish_non_exhaustive()
    }
}

/// Reads and checks the files: a chain, a key that goes with it.
pub fn server_config(
    files: &ApiTlsConfig,
) -> Result<(ServerConfig, Vec<CertificateDer<'static>>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("api.tls.cert: {}: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "api.tls.cert: {}: no certificate in it",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("api.tls.key: {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("api.tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key)
        .map_err(|e| format!("api.tls: the key does not go with the certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, chain))
}

impl ApiTls {
    pub fn load(files: &ApiTlsConfig) -> Result<Self, String> {
        let (config, chain) = server_config(files)?;
        Ok(Self {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            chain: RwLock::new(chain),
        })
    }

    /// The configuration for a connection arriving now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap().clone())
    }

    /// Reads the files again; whether the certificate changed. Bad files leave the
    /// configuration in force as it is.
    pub fn reload(&self) -> Result<bool, String> {
        let (config, chain) = server_config(&self.files)?;
        let changed = *self.chain.read().unwrap() != chain;
        *self.current.write().unwrap() = Arc::new(config);
        *self.chain.write().unwrap() = chain;
        Ok(changed)
    }
}
