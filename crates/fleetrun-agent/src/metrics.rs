//! The agent's own metrics in Prometheus' text format, served on a local address when the
//! configuration has `[metrics] listen` (loopback only unless `allow_remote`), optionally behind
//! `Authorization: Bearer <token>`. docs/metrics.md lists every series.
//!
//! Counts are kept in atomics where things happen (a task's end, a session's start and end);
//! what the agent holds (running tasks, held tasks, spool bytes) is read when scraped, so it
//! costs nothing between scrapes. The listener serves `GET /metrics` only, one small reply per
//! connection, with a deadline for the request's headers and a bound on connections.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use fleetrun_proto::{Ending, TaskResult};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::AgentContext;

/// `[metrics]` in the agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served: a loopback address unless `allow_remote`.
    pub listen: SocketAddr,
    /// Serve on an address other hosts can reach (put a bearer token on it).
    #[serde(default)]
    pub allow_remote: bool,
    /// Scrapers must send `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// The token read from this file (owner-only) instead.
    pub bearer_token_file: Option<PathBuf>,
}

impl MetricsConfig {
    /// What is wrong with it, and the key it is under.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.listen.ip().is_loopback() && !self.allow_remote {
            return Err((
                "listen",
                format!(
                    "{} is not a loopback address: the agent's metrics are served on loopback \
                     only unless allow_remote = true",
                    self.listen
                ),
            ));
        }
        if self.bearer_token.is_some() && self.bearer_token_file.is_some() {
            return Err((
                "bearer_token_file",
                "give bearer_token or bearer_token_file, not both".to_owned(),
            ));
        }
        if self.bearer_token.as_deref().is_some_and(str::is_empty) {
            return Err(("bearer_token", "the token is empty".to_owned()));
        }
        // The file is read now, so an unusable one fails the start (and check-config) instead
        // of leaving the agent without its metrics.
        if self.bearer_token_file.is_some()
            && let Err(e) = self.token()
        {
            return Err(("bearer_token_file", format!("{e:#}")));
        }
        if self.allow_remote && self.bearer_token.is_none() && self.bearer_token_file.is_none() {
            return Err((
                "allow_remote",
                "metrics served to other hosts need a bearer_token or bearer_token_file".to_owned(),
            ));
        }
        Ok(())
    }

    /// The token scrapers must send, if any.
    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.bearer_token_file {
            use std::os::unix::fs::MetadataExt as _;
            let meta =
                std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            anyhow::ensure!(
                meta.mode() & 0o077 == 0,
                "{}: readable by others (mode {:o}): make it 0600",
                path.display(),
                meta.mode() & 0o777
            );
            let token = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                .trim()
                .to_owned();
            anyhow::ensure!(!token.is_empty(), "{}: empty", path.display());
            return Ok(Some(token));
        }
        Ok(self.bearer_token.clone())
    }
}

/// Bucket bounds (seconds) of the task duration histogram: from 10 ms to an hour.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// How tasks end, as labelled.
const ENDINGS: [&str; 7] = [
    "exited_zero",
    "exited_nonzero",
    "signaled",
    "timed_out",
    "cancelled",
    "refused",
    "failed",
];

fn ending_index(ending: &Ending) -> usize {
    match ending {
        Ending::Exited { code: 0 } => 0,
        Ending::Exited { .. } => 1,
        Ending::Signaled { .. } => 2,
        Ending::TimedOut => 3,
        Ending::Cancelled => 4,
        Ending::UserNotFound | Ending::InterpreterMissing => 5,
        Ending::Failed => 6,
    }
}

/// The connection to the controller, as the gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Connection {
    Connecting = 0,
    Connected = 1,
    Waiting = 2,
}

const CONNECTION_STATES: [&str; 3] = ["connecting", "connected", "waiting"];

/// What the agent counts as it goes.
#[derive(Debug, Default)]
pub(crate) struct AgentMetrics {
    connection: AtomicU8,
    /// Sessions that were welcomed.
    sessions: AtomicU64,
    /// Connection attempts after the first.
    reconnects: AtomicU64,
    finished: [AtomicU64; ENDINGS.len()],
    /// Per bucket of [`DURATION_BUCKETS`], then the `+Inf` one (not cumulative here).
    duration_buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_sum_micros: AtomicU64,
}

impl AgentMetrics {
    pub(crate) fn set_connection(&self, state: Connection) {
        self.connection.store(state as u8, Ordering::Relaxed);
    }

    pub(crate) fn welcomed(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.set_connection(Connection::Connected);
    }

    /// Sessions that were welcomed so far.
    pub(crate) fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether the agent is connected and welcomed now.
    pub(crate) fn connected(&self) -> bool {
        self.connection.load(Ordering::Relaxed) == Connection::Connected as u8
    }

    /// Tasks that ended, whatever their ending.
    pub(crate) fn tasks_finished(&self) -> u64 {
        self.finished
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A task ended with `result` (its times are the agent's own clock's).
    pub(crate) fn task_finished(&self, result: &TaskResult) {
        self.finished[ending_index(&result.ending)].fetch_add(1, Ordering::Relaxed);
        let millis = result
            .finished_at_ms
            .saturating_sub(result.started_at_ms)
            .max(0);
        let seconds = millis as f64 / 1000.0;
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_micros
            .fetch_add((millis as u64).saturating_mul(1000), Ordering::Relaxed);
    }
}

/// What is read from the agent's state at a scrape.
#[derive(Debug, Default)]
struct Snapshot {
    running: usize,
    slots: usize,
    held: usize,
    held_finished: usize,
    spool_bytes: Option<u64>,
}

async fn snapshot(ctx: &Arc<AgentContext>) -> Snapshot {
    let slots = ctx.config.max_concurrent_tasks;
    let held = ctx.tasks.reports();
    let spool_ctx = ctx.clone();
    let spool_bytes = tokio::task::spawn_blocking(move || {
        spool_ctx.spool.as_ref().map(crate::spool::Spool::bytes)
    })
    .await
    .ok()
    .flatten();
    Snapshot {
        running: slots.saturating_sub(ctx.slots.available_permits()),
        slots,
        held: held.len(),
        held_finished: held.iter().filter(|t| t.finished).count(),
        spool_bytes,
    }
}

fn render(metrics: &AgentMetrics, now: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
    };
    gauge(
        "fleetrun_agent_tasks_running",
        "Tasks whose script runs now",
        now.running.to_string(),
    );
    gauge(
        "fleetrun_agent_task_slots",
        "Tasks that may run at once (max_concurrent_tasks)",
        now.slots.to_string(),
    );
    gauge(
        "fleetrun_agent_tasks_held",
        "Tasks the agent holds for a controller: running, waiting, or finished and not yet acknowledged",
        now.held.to_string(),
    );
    gauge(
        "fleetrun_agent_tasks_held_finished",
        "Held tasks that finished and whose result the controller has not acknowledged yet",
        now.held_finished.to_string(),
    );
    if let Some(bytes) = now.spool_bytes {
        gauge(
            "fleetrun_agent_spool_bytes",
            "Bytes of the task files in the spool (output and state)",
            bytes.to_string(),
        );
    }
    let state = metrics.connection.load(Ordering::Relaxed) as usize;
    let _ = write!(
        out,
        "# HELP fleetrun_agent_connection_state The connection to the controller: 1 for the \
         state it is in\n# TYPE fleetrun_agent_connection_state gauge\n"
    );
    for (i, name) in CONNECTION_STATES.iter().enumerate() {
        let _ = writeln!(
            out,
            "fleetrun_agent_connection_state{{state=\"{name}\"}} {}",
            u8::from(i == state)
        );
    }
    let _ = write!(
        out,
        "# HELP fleetrun_agent_sessions_total Connections the controller welcomed\n\
         # TYPE fleetrun_agent_sessions_total counter\n\
         fleetrun_agent_sessions_total {}\n\
         # HELP fleetrun_agent_reconnects_total Connection attempts after a session ended or an \
         attempt failed\n\
         # TYPE fleetrun_agent_reconnects_total counter\n\
         fleetrun_agent_reconnects_total {}\n",
        metrics.sessions.load(Ordering::Relaxed),
        metrics.reconnects.load(Ordering::Relaxed)
    );
    let _ = write!(
        out,
        "# HELP fleetrun_agent_tasks_finished_total Tasks that ended, by how\n\
         # TYPE fleetrun_agent_tasks_finished_total counter\n"
    );
    for (i, name) in ENDINGS.iter().enumerate() {
        let _ = writeln!(
            out,
            "fleetrun_agent_tasks_finished_total{{ending=\"{name}\"}} {}",
            metrics.finished[i].load(Ordering::Relaxed)
        );
    }
    let _ = write!(
        out,
        "# HELP fleetrun_agent_task_duration_seconds From a task's start to its end\n\
         # TYPE fleetrun_agent_task_duration_seconds histogram\n"
    );
    let mut cumulative = 0;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += metrics.duration_buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "fleetrun_agent_task_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += metrics.duration_buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
    let sum = metrics.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = write!(
        out,
        "fleetrun_agent_task_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n\
         fleetrun_agent_task_duration_seconds_sum {sum}\n\
         fleetrun_agent_task_duration_seconds_count {cumulative}\n"
    );
    let _ = write!(
        out,
        "# HELP fleetrun_agent_info The agent's version\n# TYPE fleetrun_agent_info gauge\n\
         fleetrun_agent_info{{version=\"{}\"}} 1\n",
        crate::VERSION
    );
    out
}

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 16;
/// A scraper's request headers must arrive within this.
const HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// Binds `[metrics] listen` (at start, so a taken address fails the start with its name).
pub(crate) async fn bind(config: &MetricsConfig) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {}: {e}", config.listen))
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(
    ctx: Arc<AgentContext>,
    config: MetricsConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token: Option<Arc<str>> = config.token()?.map(Arc::from);
    tracing::info!(listen = %config.listen, token = token.is_some(), "serving metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            () = shutdown.cancelled() => return Ok(()),
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return Ok(()),
        };
        let ctx = ctx.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let ctx = ctx.clone();
                let token = token.clone();
                async move { Ok::<_, Infallible>(answer(&ctx, token.as_deref(), &request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scraper that stalls after its headers is cut off too.
            let _ = tokio::time::timeout(Duration::from_secs(30), served).await;
        });
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Equal in time whatever the bytes (the lengths may differ in time).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn answer(
    ctx: &Arc<AgentContext>,
    token: Option<&str>,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "only /metrics is served\n".to_owned(),
        );
    }
    if request.method() != hyper::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
    }
    if let Some(token) = token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|given| same(given, token.as_bytes())) {
            let mut response = reply(
                StatusCode::UNAUTHORIZED,
                "Authorization: Bearer <metrics.bearer_token> required\n".to_owned(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    let now = snapshot(ctx).await;
    let mut response = reply(StatusCode::OK, render(&ctx.metrics, &now));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ending: Ending, millis: i64) -> TaskResult {
        TaskResult {
            ending,
            started_at_ms: 1_000,
            finished_at_ms: 1_000 + millis,
            output_bytes: 0,
            survivors: 0,
            message: None,
        }
    }

    #[test]
    fn an_unusable_token_file_or_a_remote_listener_without_token_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let config = |allow_remote: bool, file: Option<&std::path::Path>| MetricsConfig {
            listen: "0.0.0.0:9464".parse().unwrap(),
            allow_remote,
            bearer_token: None,
            bearer_token_file: file.map(ToOwned::to_owned),
        };
        let refused = config(true, None).validate().unwrap_err();
        assert_eq!(refused.0, "allow_remote", "{refused:?}");
        let refused = config(true, Some(&file)).validate().unwrap_err();
        assert_eq!(refused.0, "bearer_token_file", "{refused:?}");
        std::fs::write(&file, "\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let refused = config(true, Some(&file)).validate().unwrap_err();
        assert!(refused.1.contains("empty"), "{refused:?}");
        std::fs::write(&file, "a-long-enough-token\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = config(true, Some(&file)).validate().unwrap_err();
        assert!(refused.1.contains("readable by others"), "{refused:?}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(config(true, Some(&file)).validate(), Ok(()));
    }

    #[test]
    fn durations_fall_in_cumulative_buckets_and_endings_are_counted() {
        let metrics = AgentMetrics::default();
        metrics.task_finished(&result(Ending::Exited { code: 0 }, 5));
        metrics.task_finished(&result(Ending::Exited { code: 2 }, 700));
        metrics.task_finished(&result(Ending::TimedOut, 7_200_000));
        // A clock that went back counts as no time, not as a negative one.
        metrics.task_finished(&result(Ending::Cancelled, -50));
        metrics.welcomed();
        let text = render(&metrics, &Snapshot::default());
        for line in [
            "fleetrun_agent_task_duration_seconds_bucket{le=\"0.01\"} 2",
            "fleetrun_agent_task_duration_seconds_bucket{le=\"0.5\"} 2",
            "fleetrun_agent_task_duration_seconds_bucket{le=\"1\"} 3",
            "fleetrun_agent_task_duration_seconds_bucket{le=\"3600\"} 3",
            "fleetrun_agent_task_duration_seconds_bucket{le=\"+Inf\"} 4",
            "fleetrun_agent_task_duration_seconds_count 4",
            "fleetrun_agent_task_duration_seconds_sum 7200.705",
            "fleetrun_agent_tasks_finished_total{ending=\"exited_zero\"} 1",
            "fleetrun_agent_tasks_finished_total{ending=\"exited_nonzero\"} 1",
            "fleetrun_agent_tasks_finished_total{ending=\"timed_out\"} 1",
            "fleetrun_agent_connection_state{state=\"connected\"} 1",
            "fleetrun_agent_connection_state{state=\"connecting\"} 0",
            "fleetrun_agent_sessions_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn a_remote_address_needs_allow_remote() {
        let config = |listen: &str, allow_remote| MetricsConfig {
            listen: listen.parse().unwrap(),
            allow_remote,
            bearer_token: None,
            bearer_token_file: None,
        };
        assert!(config("127.0.0.1:9100", false).validate().is_ok());
        assert!(config("[::1]:9100", false).validate().is_ok());
        let (key, message) = config("0.0.0.0:9100", false).validate().unwrap_err();
        assert_eq!(key, "listen");
        assert!(message.contains("allow_remote"), "{message}");
        // Other hosts reach it: a token is required too.
        assert_eq!(
            config("0.0.0.0:9100", true).validate().unwrap_err().0,
            "allow_remote"
        );
        let mut with_token = config("0.0.0.0:9100", true);
        with_token.bearer_token = Some("a-long-enough-token".to_owned());
        assert!(with_token.validate().is_ok());
    }

    #[test]
    fn the_configuration_names_an_off_loopback_listener_and_its_line() {
        let base = "controller = \"127.0.0.1:7000\"\nwork_dir = \"/var/lib/fleetrun\"\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[metrics]\n";
        let path = std::path::Path::new("agent.toml");
        let e = crate::Config::parse(path, &format!("{base}listen = \"0.0.0.0:9100\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("agent.toml:8:")
                && e.contains("metrics.listen")
                && e.contains("allow_remote"),
            "{e}"
        );
        let config = crate::Config::parse(
            path,
            &format!(
                "{base}listen = \"0.0.0.0:9100\"\nallow_remote = true\nbearer_token = \"t0123456789\"\n"
            ),
        )
        .unwrap();
        assert!(config.metrics.unwrap().allow_remote);
    }
}
