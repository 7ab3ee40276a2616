//! Renewing the agent's certificate over its connection (protocol version 3): at two thirds of
//! the certificate's life the agent sends a CSR over its enrolled key on the control stream; the
//! controller answers with a new certificate, which replaces the file and is presented from the
//! next connection on. The connection in use, and every task on it, goes on untouched.

use std::time::Duration;

use anyhow::Context as _;
use fleetrun_net::{FramedRecv, Timing, TlsFiles};
use fleetrun_proto::ControlDown;
use tokio::{sync::watch, time::Instant};

use crate::{AgentContext, enroll};

/// How long after an unanswered request the agent asks again.
pub(crate) const RETRY: Duration = Duration::from_secs(30);
/// How long after a refusal the agent asks again.
const AFTER_REFUSAL: Duration = Duration::from_secs(600);

/// When the certificate in `ctx`'s files is due for renewal: two thirds into its life.
pub(crate) fn due(ctx: &AgentContext) -> Option<Instant> {
    let (start, end) = match enroll::validity(&ctx.config.tls.cert) {
        Ok(validity) => validity,
        Err(e) => {
            tracing::warn!("cannot tell when the certificate ends: {e:#}");
            return None;
        }
    };
    let at = start + (end - start).max(0) * 2 / 3;
    let now = now_secs();
    Some(Instant::now() + Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A CSR over the agent's key.
pub(crate) fn request(ctx: &AgentContext) -> anyhow::Result<Vec<u8>> {
    let key = read_key(ctx)?;
    enroll::csr(&key, &ctx.hostname)
}

fn read_key(ctx: &AgentContext) -> anyhow::Result<rcgen::KeyPair> {
    let path = &ctx.config.tls.key;
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    rcgen::KeyPair::from_pem(&pem).with_context(|| format!("{}: not a private key", path.display()))
}

/// Checks and installs a renewed certificate: the file, and the client configuration the next
/// connections are made with.
fn install(ctx: &AgentContext, pem: &str) -> anyhow::Result<()> {
    let key = read_key(ctx)?;
    enroll::check_certificate(&key, pem, &ctx.agent_id)?;
    enroll::replace_file(&ctx.config.tls.cert, pem, 0o644)?;
    let files = TlsFiles {
        ca: ctx.config.tls.ca.clone(),
        cert: ctx.config.tls.cert.clone(),
        key: ctx.config.tls.key.clone(),
    };
    *ctx.client_config.lock().unwrap() =
        fleetrun_net::quinn_client_config(&files, Timing::default())?;
    Ok(())
}

/// Reads the controller's answers on the control stream until it ends; returns why.
pub(crate) async fn answers(
    ctx: &AgentContext,
    recv: &mut FramedRecv,
    due_at: &watch::Sender<Option<Instant>>,
) -> String {
    loop {
        match recv.recv::<ControlDown>().await {
            Ok(Some(ControlDown::Renewed {
                certificate_pem,
                not_after_ms,
            })) => match install(ctx, &certificate_pem) {
                Ok(()) => {
                    tracing::info!(
                        valid_for_secs = (not_after_ms / 1000).saturating_sub(now_secs()),
                        "certificate renewed"
                    );
                    due_at.send_replace(due(ctx));
                }
                Err(e) => {
                    tracing::error!("the renewed certificate is not installed: {e:#}");
                    due_at.send_replace(Some(Instant::now() + RETRY));
                }
            },
            Ok(Some(ControlDown::RenewRefused { reason })) => {
                tracing::warn!("certificate renewal refused: {reason}");
                due_at.send_replace(Some(Instant::now() + AFTER_REFUSAL));
            }
            Ok(None) => return "the controller finished the control stream".into(),
            Err(e) => {
                return match e.connection_error() {
                    Some(conn) => fleetrun_net::describe_connection_error(conn),
                    None => format!("bad message on the control stream: {e}"),
                };
            }
        }
    }
}
