//! Endpoint construction: certificates, keys, verifiers and QUIC transport settings.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use x509_parser::prelude::FromDer;

/// The PEM files one side of a connection needs; a configuration's `[tls]` section as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signs every certificate of this deployment.
    pub ca: PathBuf,
    /// This side's certificate chain.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

/// How quickly a dead peer is noticed.
///
/// quinn restarts the idle timer on every packet received and on the first ack-eliciting packet
/// sent after a receipt, and never arms it below three probe timeouts; a silent peer is therefore
/// declared dead up to `keep_alive + idle_timeout` (8 s by default) after its last packet, since
/// the keep-alive PING sent into the silence restarts the timer once. The keep-alive only keeps a
/// live, idle connection from reaching the idle timeout: its timer restarts on every packet sent
/// or received, so a connection carries one PING per 2 s from whichever side fires first, and a
/// lost PING is recovered by probe-timeout probes that back off exponentially. Each keep-alive
/// costs both ends a packet and its acknowledgement, which at 10,000 agents per controller is most
/// of what an idle fleet costs it and, in a burst of results, what fills its socket's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A connection with no packet for this long is dead.
    pub idle_timeout: Duration,
    /// Send a QUIC PING when no packet was sent or received for this long.
    pub keep_alive: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(6),
            keep_alive: Duration::from_secs(2),
        }
    }
}

/// Building an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// rustls refused the certificates or key.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// The socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &std::path::Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

pub(crate) fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in file"));
    }
    Ok(certs)
}

pub(crate) fn load_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn load_roots(path: &std::path::Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    Ok(Arc::new(roots))
}

/// Transport settings. `peer_streams` is how many bidirectional streams the peer may have open at
/// once: quinn keeps per-stream state for every allowed stream of every connection, so the
/// controller allows agents only the few they open (the control stream), while an agent allows
/// the controller one stream per task it may run or queue.
fn transport(timing: Timing, peer_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            timing
                .idle_timeout
                .try_into()
                .expect("idle timeout within QUIC's range"),
        ))
        .keep_alive_interval(Some(timing.keep_alive))
        .max_concurrent_bidi_streams(peer_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    Arc::new(transport)
}

/// Streams an agent may open on its connection: the control stream, and room for a newer
/// control stream while an old one closes.
const AGENT_OPENED_STREAMS: u32 = 4;
/// Task streams the controller may have open to one agent at once; more wait for a stream.
pub const TASK_STREAMS_PER_AGENT: u32 = 1024;
/// Socket buffers for the controller's UDP socket: a fan-out to thousands of agents answers in
/// bursts the kernel's default (about 208 KiB) drops.
const SOCKET_BUFFER: usize = 16 * 1024 * 1024;

/// The controller's endpoint: requires a client certificate signed by the CA.
pub fn server_endpoint(
    files: &TlsFiles,
    listen: SocketAddr,
    timing: Timing,
) -> Result<quinn::Endpoint, TlsError> {
    let config = quinn_server_config(files, timing)?;
    let bind_error = |source| TlsError::Bind {
        addr: listen,
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_error)?;
    if listen.is_ipv6() {
        // Accept IPv4 agents on an IPv6 wildcard too, as quinn's own binding does.
        let _ = socket.set_only_v6(false);
    }
    set_buffers(&socket);
    socket.bind(&listen.into()).map_err(bind_error)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.into(),
        runtime,
    )
    .map_err(bind_error)
}

/// The controller's QUIC configuration from its files: what [`server_endpoint`] starts with, and
/// what `quinn::Endpoint::set_server_config` takes to swap the certificate for new connections
/// while the established ones go on.
pub fn quinn_server_config(
    files: &TlsFiles,
    timing: Timing,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_tls(files)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(timing, AGENT_OPENED_STREAMS));
    Ok(config)
}

/// The controller's TLS configuration from its files: what [`server_endpoint`] serves with, built
/// without binding anything (a configuration check calls it alone).
pub fn server_tls(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = client_verifier(&files.ca)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    tls.alpn_protocols = vec![fleetrun_proto::ALPN.to_vec()];
    Ok(tls)
}

/// How the controller verifies agents' certificates: chained to a CA in `ca`, with the clientAuth
/// extended key usage.
pub(crate) fn client_verifier(ca: &std::path::Path) -> Result<Arc<ClientAuthOnly>, TlsError> {
    let roots = load_roots(ca)?;
    Ok(Arc::new(ClientAuthOnly {
        inner: WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?,
    }))
}

/// Asks for [`SOCKET_BUFFER`]-sized socket buffers: beyond `net.core.rmem_max`/`wmem_max` when
/// the process may (CAP_NET_ADMIN), else as much as those allow. A smaller buffer still works,
/// but a burst of results from thousands of agents then overflows it and waits for QUIC's
/// retransmissions, so the shortfall is logged with the remedy.
fn set_buffers(socket: &socket2::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    // Linux reports twice the size it was asked for (the rest is its bookkeeping).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < SOCKET_BUFFER {
        tracing::warn!(
            granted,
            wanted = SOCKET_BUFFER,
            "small UDP receive buffer: bursts from many agents may be dropped and retransmitted; \
             raise net.core.rmem_max and net.core.wmem_max to {SOCKET_BUFFER} or run with CAP_NET_ADMIN"
        );
    }
}

/// The agent's endpoint, bound to `bind` (port 0 for any), presenting the agent's certificate.
pub fn client_endpoint(
    files: &TlsFiles,
    bind: SocketAddr,
    timing: Timing,
) -> Result<quinn::Endpoint, TlsError> {
    let config = quinn_client_config(files, timing)?;
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|source| TlsError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The agent's QUIC configuration from its files: what [`client_endpoint`] connects with, and
/// what `quinn::Endpoint::set_default_client_config` takes when a renewed certificate is to be
/// presented from the next connection on.
pub fn quinn_client_config(
    files: &TlsFiles,
    timing: Timing,
) -> Result<quinn::ClientConfig, TlsError> {
    let tls = client_tls(files)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(timing, TASK_STREAMS_PER_AGENT));
    Ok(config)
}

/// The agent's TLS configuration from its files: what [`client_endpoint`] connects with, built
/// without binding anything (a configuration check calls it alone).
pub fn client_tls(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(&files.ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    tls.alpn_protocols = vec![fleetrun_proto::ALPN.to_vec()];
    Ok(tls)
}

/// The CA's client verifier, and a certificate must also say it is meant for client
/// authentication. webpki checks the extended key usage only when a certificate has one, so a
/// certificate issued for something else without any (a CA that signs more than agents) would
/// otherwise pass as an agent's.
#[derive(Debug)]
pub(crate) struct ClientAuthOnly {
    inner: Arc<dyn ClientCertVerifier>,
}

/// Whether a DER certificate's extended key usage names TLS client authentication.
fn allows_client_auth(der: &[u8]) -> Result<bool, rustls::Error> {
    let bad = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|_| bad())?;
    Ok(cert
        .extended_key_usage()
        .map_err(|_| bad())?
        .is_some_and(|eku| eku.value.client_auth))
}

impl ClientCertVerifier for ClientAuthOnly {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !allows_client_auth(end_entity)? {
            tracing::warn!(
                "refusing a client certificate without the clientAuth extended key usage"
            );
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
