//! Job callbacks: when a job that named a `callback_url` ends, its final status is POSTed there.
//!
//! ```text
//! engine --job ended (id)--> intake --queue (store)--> delivery loop --POST, at most 32 at once--> client
//!                                                          ^   |
//!                                                          +---+ each attempt recorded; retried with backoff
//! ```
//!
//! The engine only reports a job's end ([`Callbacks::job_ended`], never waiting); the intake reads
//! the committed job from the store and queues its delivery there, so a restarted controller
//! resumes pending deliveries, and at start it queues those of jobs that ended while the previous
//! run crashed before queueing them. Delivery is at least once: `X-Fleetrun-Delivery` lets a
//! receiver drop a repeat.
//!
//! Each request carries the body bk-job sends (with both `step_instances`, as bk-job's code has
//! it, and `step_instance_list`, as its docs have it), signed with the submitting app's
//! `callback_secret`: `X-Fleetrun-Signature: sha256=<hex HMAC-SHA256 of the body>`.
//!
//! **Architecture invariant:** a callback URL is logged as scheme, host and path only: its query
//! may carry the receiver's token.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use fleetrun_store::{CallbackAttempt, CallbackDelivery, CallbackNext, NewCallbackDelivery, Store};
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use url::{Host, Url};

use crate::{Config, now_ms, status};

/// Longest callback URL accepted, in characters.
pub const MAX_URL_CHARS: usize = 512;
/// How long one attempt may take, as in bk-job.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deliveries in flight at once.
const MAX_IN_FLIGHT: usize = 32;
/// The wait after the first failed attempt; it doubles after each one, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a callback URL is refused.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Longer than [`MAX_URL_CHARS`].
    #[error("longer than {MAX_URL_CHARS} characters")]
    TooLong,
    /// Not an absolute URL.
    #[error("not an absolute URL: {0}")]
    Malformed(#[from] url::ParseError),
    /// A scheme other than http or https.
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    /// It would call the controller's own API.
    #[error("points at this controller's own API")]
    Controller,
}

/// Checks a submitted callback URL: absolute http(s), at most [`MAX_URL_CHARS`], and not the
/// controller itself (`http_listen` is the address its API is bound to).
pub fn check_url(text: &str, http_listen: SocketAddr) -> Result<Url, UrlError> {
    if text.chars().count() > MAX_URL_CHARS {
        return Err(UrlError::TooLong);
    }
    let url = Url::parse(text)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(url.scheme().to_owned()));
    }
    if points_at(&url, http_listen) {
        return Err(UrlError::Controller);
    }
    Ok(url)
}

/// Whether `url` reaches the API listening on `http_listen`: same port, and a loopback,
/// unspecified or `localhost` host, or the listening address itself (or, when listening on every
/// address, one of this machine's).
fn points_at(url: &Url, http_listen: SocketAddr) -> bool {
    if url.port_or_known_default() != Some(http_listen.port()) {
        return false;
    }
    let ip = match url.host() {
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            return name == "localhost" || name.ends_with(".localhost");
        }
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        None => return false,
    };
    let ip = ip.to_canonical();
    let listen = http_listen.ip().to_canonical();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip == listen
        // Binding succeeds only for an address this machine holds.
        || (listen.is_unspecified() && std::net::UdpSocket::bind((ip, 0)).is_ok())
}

/// The URL as logs show it: scheme, host, port and path, without credentials or query.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(url) => {
            let host = url.host_str().unwrap_or_default();
            match url.port() {
                Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
                None => format!("{}://{host}{}", url.scheme(), url.path()),
            }
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`, the `X-Fleetrun-Signature` value.
pub fn signature(key: &ring::hmac::Key, body: &[u8]) -> String {
    let tag = ring::hmac::sign(key, body);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256=");
    for byte in tag.as_ref() {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// The wait after failed attempt number `attempt` (1-based): 1 s, 2 s, 4 s, … at most 60 s.
pub fn backoff(attempt: i64) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    FIRST_BACKOFF
        .checked_mul(2u32.saturating_pow(doublings.min(16)))
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// The body bk-job sends for an ended job: its status and each step's, as
/// `(step_instance_id, status)`.
pub fn body(job_instance_id: i64, status: i32, steps: &[(i64, i32)]) -> String {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(id, status)| json!({"step_instance_id": id, "status": status}))
        .collect();
    json!({
        "job_instance_id": job_instance_id,
        "status": status,
        "step_instances": steps,
        "step_instance_list": steps,
    })
    .to_string()
}

/// The engine's handle: reports ended jobs to the dispatcher.
#[derive(Debug, Clone)]
pub struct Callbacks {
    ended: mpsc::UnboundedSender<i64>,
}

impl Callbacks {
    /// Reports that the job's end has been handed to the store; never waits.
    pub fn job_ended(&self, job_instance_id: i64) {
        // Gone only at shutdown; the next start finds the job again.
        let _ = self.ended.send(job_instance_id);
    }
}

/// The dispatcher's state, shared by its tasks.
struct Dispatcher {
    store: Store,
    http: reqwest::Client,
    /// Signing key per app code; apps without a `callback_secret` are absent.
    keys: HashMap<String, ring::hmac::Key>,
    max_attempts: i64,
    /// Poked when a delivery was queued.
    queued: Notify,
}

/// Starts the dispatcher's tasks in `tasks`; they stop when `shutdown` is cancelled.
pub fn start(
    store: Store,
    config: &Config,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Callbacks> {
    let http = reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        // A redirect is a failed attempt: following one would send the job's result somewhere
        // the submitter did not name.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fleetrun-controller/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut keys = HashMap::new();
    for app in &config.apps {
        match &app.callback_secret {
            Some(secret) => {
                keys.insert(
                    app.bk_app_code.clone(),
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
                );
            }
            None => tracing::warn!(
                app = %app.bk_app_code,
                "app has no callback_secret: its job callbacks are sent without a signature"
            ),
        }
    }
    let dispatcher = Arc::new(Dispatcher {
        store,
        http,
        keys,
        max_attempts: i64::from(config.limits.callback_max_attempts),
        queued: Notify::new(),
    });
    let (ended, ended_rx) = mpsc::unbounded_channel();
    tasks.spawn(dispatcher.clone().intake(ended_rx, shutdown.clone()));
    tasks.spawn(dispatcher.deliver(shutdown));
    Ok(Callbacks { ended })
}

impl Dispatcher {
    /// Queues the deliveries of ended jobs: at start those never queued, then those the engine
    /// reports.
    async fn intake(
        self: Arc<Self>,
        mut ended: mpsc::UnboundedReceiver<i64>,
        shutdown: CancellationToken,
    ) {
        self.queue(None, &shutdown).await;
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = ended.recv_many(&mut batch, 1024) => if received == 0 { return },
            }
            self.queue(Some(&batch), &shutdown).await;
            batch.clear();
        }
    }

    /// Queues a delivery for each of these jobs (all jobs when `None`) that ended with a callback
    /// URL and has none yet; retries while the store fails.
    async fn queue(&self, job_ids: Option<&[i64]>, shutdown: &CancellationToken) {
        loop {
            match self.try_queue(job_ids).await {
                Ok(()) => return,
                Err(e) => tracing::error!("cannot queue job callbacks; retrying: {e}"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(FIRST_BACKOFF) => {}
            }
        }
    }

    async fn try_queue(&self, job_ids: Option<&[i64]>) -> Result<(), fleetrun_store::StoreError> {
        // The engine reports a job after handing its end to the store's writer; wait for the commit.
        self.store.flush().await?;
        let now = now_ms();
        let deliveries: Vec<NewCallbackDelivery> = self
            .store
            .unqueued_callbacks(job_ids)
            .await?
            .into_iter()
            .filter(|job| status::job::is_finished(job.status))
            .filter_map(|job| {
                let url = job.callback_url.clone()?;
                tracing::info!(job = job.job_instance_id, url = %redact(&url), "callback queued");
                let steps: Vec<(i64, i32)> = job
                    .steps
                    .iter()
                    .map(|s| (s.step_instance_id, s.status))
                    .collect();
                Some(NewCallbackDelivery {
                    job_instance_id: job.job_instance_id,
                    body: body(job.job_instance_id, job.status, &steps),
                    url,
                    now,
                })
            })
            .collect();
        if !deliveries.is_empty() && self.store.queue_callbacks(&deliveries).await? > 0 {
            self.queued.notify_one();
        }
        Ok(())
    }

    /// Runs due attempts, at most [`MAX_IN_FLIGHT`] at once, until shutdown (which abandons the
    /// attempts under way; they are made again after a restart).
    async fn deliver(self: Arc<Self>, shutdown: CancellationToken) {
        let mut attempts = JoinSet::new();
        let mut delivery_of_task = HashMap::new();
        let mut busy = HashSet::new();
        loop {
            let now = now_ms();
            let mut wake_at = None;
            match self
                .store
                .pending_callbacks(MAX_IN_FLIGHT + busy.len())
                .await
            {
                Ok(pending) => {
                    for delivery in pending {
                        if busy.contains(&delivery.id) {
                            continue;
                        }
                        if delivery.next_attempt_at > now {
                            wake_at = Some(delivery.next_attempt_at);
                            break;
                        }
                        if busy.len() >= MAX_IN_FLIGHT {
                            break;
                        }
                        busy.insert(delivery.id);
                        let id = delivery.id;
                        let task = attempts.spawn(self.clone().attempt(delivery));
                        delivery_of_task.insert(task.id(), id);
                    }
                }
                Err(e) => {
                    tracing::error!("cannot read the callback queue: {e}");
                    wake_at = Some(now + FIRST_BACKOFF.as_millis() as i64);
                }
            }
            let until_due = wake_at.map(|at| Duration::from_millis((at - now_ms()).max(0) as u64));
            tokio::select! {
                () = shutdown.cancelled() => {
                    attempts.shutdown().await;
                    return;
                }
                () = self.queued.notified() => {}
                Some(done) = attempts.join_next_with_id() => {
                    let task = match done {
                        Ok((task, ())) => task,
                        Err(e) => {
                            tracing::error!("callback attempt failed: {e}");
                            e.id()
                        }
                    };
                    if let Some(id) = delivery_of_task.remove(&task) {
                        busy.remove(&id);
                    }
                }
                () = sleep_for(until_due) => {}
            }
        }
    }

    /// Makes the delivery's next attempt and records it.
    async fn attempt(self: Arc<Self>, delivery: CallbackDelivery) {
        let number = delivery.attempts + 1;
        let at = now_ms();
        let started = Instant::now();
        let result = self.post(&delivery, at).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let (http_status, error, last_error) = match result {
            Ok(code) if (200..300).contains(&code) => (Some(i32::from(code)), None, None),
            Ok(code) => (Some(i32::from(code)), None, Some(format!("HTTP {code}"))),
            Err(e) => (None, Some(e.clone()), Some(e)),
        };
        let next = if last_error.is_none() {
            CallbackNext::Delivered
        } else if number >= self.max_attempts {
            CallbackNext::Failed
        } else {
            CallbackNext::RetryAt(now_ms() + backoff(number).as_millis() as i64)
        };
        let url = redact(&delivery.url);
        let job = delivery.job_instance_id;
        match (next, &last_error) {
            (CallbackNext::Delivered, _) => {
                tracing::info!(job, delivery = delivery.id, attempt = number, %url, duration_ms, "callback delivered");
            }
            (CallbackNext::RetryAt(when), Some(why)) => {
                tracing::warn!(job, delivery = delivery.id, attempt = number, %url, retry_in_ms = when - now_ms(), "callback attempt failed: {why}");
            }
            (_, why) => {
                tracing::error!(job, delivery = delivery.id, attempts = number, %url, "callback given up: {}", why.as_deref().unwrap_or("?"));
            }
        }
        let record = CallbackAttempt {
            delivery_id: delivery.id,
            attempt: number,
            at,
            http_status,
            error,
            duration_ms,
        };
        // Unrecorded, the attempt would be made again: retry the store a little first.
        for retry in 0..5u64 {
            match self
                .store
                .record_callback_attempt(&record, next, last_error.as_deref(), now_ms())
                .await
            {
                Ok(()) => return,
                Err(e) => tracing::error!(
                    delivery = delivery.id,
                    "cannot record a callback attempt: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200 * (retry + 1))).await;
        }
    }

    /// POSTs the body; the HTTP status, or why there is none.
    async fn post(&self, delivery: &CallbackDelivery, at: i64) -> Result<u16, String> {
        let url = Url::parse(&delivery.url).map_err(|e| format!("bad URL: {e}"))?;
        let mut request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("X-Fleetrun-Delivery", delivery.id.to_string())
            .header("X-Fleetrun-Timestamp", at.to_string())
            .body(delivery.body.clone());
        if let Some(key) = self.keys.get(&delivery.app_code) {
            request = request.header(
                "X-Fleetrun-Signature",
                signature(key, delivery.body.as_bytes()),
            );
        }
        let response = request.send().await.map_err(describe)?;
        Ok(response.status().as_u16())
    }
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// The error and its causes, without the URL (whose query may hold a token).
fn describe(error: reqwest::Error) -> String {
    if error.is_timeout() {
        return format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs());
    }
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    #[test]
    fn http_and_https_urls_elsewhere_are_accepted() {
        for url in [
            "http://example.com/hook",
            "https://example.com:8443/hook?token=x",
            "http://127.0.0.1:9000/hook",
            "http://10.0.0.1:8080/hook",
        ] {
            assert!(check_url(url, listen()).is_ok(), "{url}");
        }
    }

    #[test]
    fn other_schemes_relative_and_long_urls_are_refused() {
        assert!(matches!(
            check_url("ftp://x", listen()),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            check_url("not a url", listen()),
            Err(UrlError::Malformed(_))
        ));
        assert!(matches!(
            check_url("/hook", listen()),
            Err(UrlError::Malformed(_))
        ));
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert!(matches!(check_url(&long, listen()), Err(UrlError::TooLong)));
    }

    #[test]
    fn the_controller_itself_is_refused_under_any_local_name() {
        for url in [
            "http://127.0.0.1:8080/api/v3/fast_execute_script/",
            "http://localhost:8080/",
            "http://LOCALHOST.:8080/",
            "http://[::1]:8080/",
            "http://0.0.0.0:8080/",
            "http://127.1:8080/",
            "http://[::ffff:127.0.0.1]:8080/",
        ] {
            assert!(
                matches!(check_url(url, listen()), Err(UrlError::Controller)),
                "{url}"
            );
        }
        let everywhere: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert!(matches!(
            check_url("http://127.0.0.5/", everywhere),
            Err(UrlError::Controller)
        ));
        assert!(check_url("https://127.0.0.1/", everywhere).is_ok());
    }

    #[test]
    fn redaction_keeps_scheme_host_and_path_only() {
        assert_eq!(
            redact("https://user:pw@example.com:8443/a/b?token=secret#frag"),
            "https://example.com:8443/a/b"
        );
        assert_eq!(redact("http://example.com/x"), "http://example.com/x");
    }

    #[test]
    fn the_signature_is_hex_hmac_sha256() {
        // RFC 4231, test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(i64::MAX), MAX_BACKOFF);
    }

    #[test]
    fn the_body_has_both_step_keys() {
        let body: Value = serde_json::from_str(&body(7, 3, &[(8, 3)])).unwrap();
        let steps = json!([{"step_instance_id": 8, "status": 3}]);
        assert_eq!(
            body,
            json!({"job_instance_id": 7, "status": 3, "step_instances": steps, "step_instance_list": steps})
        );
    }
}
