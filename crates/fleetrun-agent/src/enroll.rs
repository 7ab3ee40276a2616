//! `fleetrun-agent enroll`: makes this host's key (it never leaves the host), asks the controller
//! for a certificate with a join token over TLS checked against the pinned CA, and writes the
//! certificate, the CA and the agent's configuration.
//!
//! Enrolling again keeps the key, so the controller gives the same identity back.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use fleetrun_net::CaPin;
use fleetrun_proto::{
    EnrollReply, EnrollRequest, Enrolled, FrameDecoder, MAX_ENROLL_FRAME, OsType, encode_frame,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::Controllers;

/// What `enroll` is told.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub controllers: Controllers,
    pub token: String,
    pub pin: CaPin,
    /// Where the key, the certificate and the CA go.
    pub dir: PathBuf,
    /// The configuration file to write (left alone when it exists).
    pub config: PathBuf,
    pub work_dir: PathBuf,
    pub server_name: String,
    /// The local address to connect from (and the agent's `bind` afterwards).
    pub bind: Option<IpAddr>,
    /// Addresses to report besides the one the host reaches the controller from.
    pub ips: Vec<IpAddr>,
    pub hostname: Option<String>,
}

/// What an enrollment did.
#[derive(Debug)]
pub struct Outcome {
    pub enrolled: Enrolled,
    pub config_written: bool,
    pub key_made: bool,
}

/// How long one controller has to answer.
const DEADLINE: Duration = Duration::from_secs(15);

pub fn key_path(dir: &Path) -> PathBuf {
    dir.join("agent.key.pem")
}

pub fn cert_path(dir: &Path) -> PathBuf {
    dir.join("agent.pem")
}

pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The host's key: the one made before, else a new one written 0600.
fn host_key(dir: &Path) -> anyhow::Result<(rcgen::KeyPair, bool)> {
    let path = key_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(pem) => Ok((
            rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{}: not a private key", path.display()))?,
            false,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate()?;
            write_new(&path, &key.serialize_pem(), 0o600)?;
            Ok((key, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Replaces `path` with `contents` atomically (a reader sees the old file or the new one).
pub(crate) fn replace_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// A certificate signing request over `key`. Its names are placeholders: the controller
/// chooses the certificate's.
pub(crate) fn csr(key: &rcgen::KeyPair, hostname: &str) -> anyhow::Result<Vec<u8>> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// Enrolls with the first controller that answers; a refusal is final.
pub async fn enroll(options: &EnrollOptions) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let (key, key_made) = host_key(&options.dir)?;
    let hostname = options
        .hostname
        .clone()
        .unwrap_or_else(crate::system_hostname);
    let csr = csr(&key, &hostname)?;
    let tls = Arc::new(fleetrun_net::enroll_client_tls(options.pin.clone())?);
    let mut failures = Vec::new();
    for target in options.controllers.entries() {
        let request = |local: IpAddr| {
            let mut ips = vec![local];
            ips.extend(options.ips.iter().copied().filter(|ip| *ip != local));
            EnrollRequest {
                token: options.token.clone(),
                csr: csr.clone(),
                hostname: hostname.clone(),
                ips,
                os_type: OsType::Linux,
                agent_version: crate::VERSION.to_owned(),
            }
        };
        match tokio::time::timeout(DEADLINE, ask(target, options, tls.clone(), request)).await {
            Ok(Ok(EnrollReply::Enrolled(enrolled))) => {
                let config_written = write_files(options, &key, &enrolled)?;
                return Ok(Outcome {
                    enrolled,
                    config_written,
                    key_made,
                });
            }
            Ok(Ok(EnrollReply::Refused { reason })) => {
                bail!("the controller at {target} refused the enrollment: {reason}")
            }
            Ok(Err(e)) => failures.push(format!("{target}: {e:#}")),
            Err(_) => failures.push(format!("{target}: no answer within {DEADLINE:?}")),
        }
    }
    bail!(
        "no controller could be reached to enroll:\n  {}",
        failures.join("\n  ")
    )
}

async fn ask(
    target: &str,
    options: &EnrollOptions,
    tls: Arc<rustls::ClientConfig>,
    request: impl Fn(IpAddr) -> EnrollRequest,
) -> anyhow::Result<EnrollReply> {
    let address: SocketAddr = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("looking up {target}"))?
        .next()
        .with_context(|| format!("{target} has no address"))?;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(bind) = options.bind {
        socket
            .bind(SocketAddr::new(bind, 0))
            .with_context(|| format!("binding {bind}"))?;
    }
    let stream = socket
        .connect(address)
        .await
        .with_context(|| format!("connecting to {address} (TCP)"))?;
    let local = stream.local_addr()?.ip().to_canonical();
    let server_name = rustls_pki_types::ServerName::try_from(options.server_name.clone())
        .with_context(|| format!("{:?} is not a server name", options.server_name))?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, stream)
        .await
        .context("TLS with the controller")?;
    let frame = encode_frame(&request(local))?;
    stream.write_all(&frame).await?;
    stream.flush().await?;
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .context("reading the controller's answer")?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_ENROLL_FRAME {
        bail!("the controller's answer is {len} bytes, more than {MAX_ENROLL_FRAME}");
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let mut decoder = FrameDecoder::new();
    decoder.extend(&header);
    decoder.extend(&body);
    decoder
        .decode::<EnrollReply>()?
        .context("the controller's answer is incomplete")
}

/// Writes the certificate and the CA (replacing earlier ones) and, when there is none, the
/// configuration; whether the configuration was written.
fn write_files(
    options: &EnrollOptions,
    key: &rcgen::KeyPair,
    enrolled: &Enrolled,
) -> anyhow::Result<bool> {
    check_issued(key, enrolled)?;
    replace_file(&cert_path(&options.dir), &enrolled.certificate_pem, 0o644)?;
    replace_file(&ca_path(&options.dir), &enrolled.ca_pem, 0o644)?;
    if options.config.exists() {
        return Ok(false);
    }
    let controllers: Vec<String> = options
        .controllers
        .entries()
        .iter()
        .map(|c| format!("{c:?}"))
        .collect();
    let mut text = format!(
        "# Written by `fleetrun-agent enroll`: agent {agent_id}.\n\
         controller = [{controllers}]\n\
         server_name = {server_name:?}\n\
         bk_cloud_id = {cloud}\n\
         work_dir = {work_dir:?}\n",
        agent_id = enrolled.agent_id,
        controllers = controllers.join(", "),
        server_name = enrolled.server_name,
        cloud = enrolled.bk_cloud_id,
        work_dir = options.work_dir.display().to_string(),
    );
    if let Some(bind) = options.bind {
        text.push_str(&format!("bind = \"{}\"\n", SocketAddr::new(bind, 0)));
    }
    if let Some(hostname) = &options.hostname {
        text.push_str(&format!("hostname = {hostname:?}\n"));
    }
    text.push_str(&format!(
        "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        ca_path(&options.dir).display().to_string(),
        cert_path(&options.dir).display().to_string(),
        key_path(&options.dir).display().to_string(),
    ));
    if let Some(parent) = options
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)?;
    }
    write_new(&options.config, &text, 0o644)?;
    Ok(true)
}

/// The certificate must be over this host's key and name the identity the reply says.
fn check_issued(key: &rcgen::KeyPair, enrolled: &Enrolled) -> anyhow::Result<()> {
    check_certificate(key, &enrolled.certificate_pem, &enrolled.agent_id)
}

/// The start and end of the first certificate in a PEM file, Unix seconds.
pub fn validity(path: &Path) -> anyhow::Result<(i64, i64)> {
    use x509_parser::prelude::FromDer as _;
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let der = fleetrun_net::first_cert_der(&pem)
        .with_context(|| format!("{}: no certificate", path.display()))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// A certificate (PEM chain) must be over `key` and name `agent_id`.
pub(crate) fn check_certificate(
    key: &rcgen::KeyPair,
    certificate_pem: &str,
    agent_id: &str,
) -> anyhow::Result<()> {
    use rcgen::PublicKeyData as _;
    use x509_parser::prelude::FromDer as _;
    let enrolled_id = agent_id;
    let der = fleetrun_net::first_cert_der(certificate_pem)
        .context("the controller sent no certificate")?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| anyhow::anyhow!("the controller's certificate does not parse: {e}"))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("the controller's certificate is not for this host's key");
    }
    let named = fleetrun_net::agent_id_of_cert_der(&der)?;
    if named != enrolled_id {
        bail!("the controller's certificate names agent {named:?}, not {enrolled_id:?}");
    }
    Ok(())
}
