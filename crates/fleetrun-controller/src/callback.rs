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
//! `callback_secret`: `X-Fleetrun-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`,
//! where the timestamp is the attempt's `X-Fleetrun-Timestamp`, so that a receiver rejecting old
//! timestamps also rejects a captured request replayed later under a fresh one.
//!
//! A callback reaches only public addresses unless the configuration allows more ([`address`]).
//! What the submitter sees of a failed attempt (`get_callback_status`) is one of two fixed
//! messages ([`NoAnswer`]): which of refused, reset or timed out a connection was would let a
//! callback URL probe which ports are open; the details go to the controller's log.
//!
//! **Architecture invariant:** a callback URL is logged as scheme, host and path only: its query
//! may carry the receiver's token.

mod address;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
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

pub use self::address::{CallbackCompatibility, CallbacksConfig, Forbidden};
use crate::{Config, now_ms, status};

/// Longest callback URL accepted, in characters.
pub const MAX_URL_CHARS: usize = 512;
/// How long one attempt may take, as in bk-job.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deliveries in flight at once.
const MAX_IN_FLIGHT: usize = 32;
/// How long a claimed attempt is kept from other controllers sharing the queue: past both of an
/// attempt's requests (bk-job's second try) and its recording.
const CLAIM_FOR: Duration = Duration::from_secs(60);
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
    /// Its host is an address callbacks may not reach.
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
}

/// Checks a submitted callback URL: absolute http(s), at most [`MAX_URL_CHARS`], not the
/// controller itself (`http_listen` is the address its API is bound to), and, when its host is an
/// address, one `callbacks` allows. A host name is checked when each attempt resolves it.
pub fn check_url(
    text: &str,
    http_listen: SocketAddr,
    callbacks: &CallbacksConfig,
) -> Result<Url, UrlError> {
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
    if let Some(ip) = literal_ip(&url) {
        callbacks.check(ip)?;
    }
    Ok(url)
}

/// The URL's host when it is an address, which the HTTP client connects to without resolving.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        Host::Domain(_) => None,
    }
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

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, the `X-Fleetrun-Signature` value of a
/// request whose `X-Fleetrun-Timestamp` is `timestamp`.
pub fn signature(key: &ring::hmac::Key, timestamp: &str, body: &[u8]) -> String {
    let mut context = ring::hmac::Context::with_key(key);
    context.update(timestamp.as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!("sha256={}", hex::encode(tag))
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

/// Most jobs [`Callbacks::without_url`] remembers: past it, the oldest is forgotten (and looked
/// up in the store at its end as any other job). A job whose end is recorded elsewhere (taken
/// over by another controller) is never removed at its end here, so the set must not grow
/// without a bound, nor stop taking new jobs once full.
const MAX_WITHOUT_URL: usize = 65_536;

/// Jobs created here without a callback URL: `jobs` those not ended yet, `order` the latest
/// [`MAX_WITHOUT_URL`] noted, oldest first (an ended one leaves it when it reaches the front).
#[derive(Debug, Default)]
struct WithoutUrl {
    order: VecDeque<i64>,
    jobs: HashSet<i64>,
}

/// The engine's handle: reports ended jobs to the dispatcher.
#[derive(Debug, Clone)]
pub struct Callbacks {
    ended: mpsc::UnboundedSender<i64>,
    /// Jobs created here without a callback URL (which a job keeps for life): their end needs
    /// no commit to wait for and no look-up in the store, the most common end of all.
    without_url: Arc<Mutex<WithoutUrl>>,
}

impl Callbacks {
    fn new(ended: mpsc::UnboundedSender<i64>) -> Self {
        Self {
            ended,
            without_url: Arc::default(),
        }
    }

    /// Notes that the job, about to start here, was created without a callback URL, so that
    /// its end is not looked up.
    pub fn job_without_url(&self, job_instance_id: i64) {
        let mut without_url = self.without_url.lock().unwrap_or_else(|e| e.into_inner());
        if without_url.order.len() >= MAX_WITHOUT_URL
            && let Some(oldest) = without_url.order.pop_front()
        {
            without_url.jobs.remove(&oldest);
        }
        without_url.order.push_back(job_instance_id);
        without_url.jobs.insert(job_instance_id);
    }

    /// Forgets a job [`Self::job_without_url`] noted that did not start here after all.
    pub fn forget_job_without_url(&self, job_instance_id: i64) {
        let mut without_url = self.without_url.lock().unwrap_or_else(|e| e.into_inner());
        if without_url.jobs.remove(&job_instance_id) {
            without_url.order.retain(|id| *id != job_instance_id);
        }
    }

    /// Reports that the job's end has been handed to the store; never waits.
    pub fn job_ended(&self, job_instance_id: i64) {
        if self
            .without_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .remove(&job_instance_id)
        {
            return;
        }
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
    /// The networks callbacks may reach beyond public addresses.
    callbacks: Arc<CallbacksConfig>,
    max_attempts: i64,
    /// Poked when a delivery was queued.
    queued: Notify,
    /// Whether other controllers may deliver from the same queue (a `[cluster]` member on
    /// PostgreSQL): each attempt is then claimed in the store first.
    shared_queue: bool,
}

/// Starts the dispatcher's tasks in `tasks`; they stop when `shutdown` is cancelled.
pub fn start(
    store: Store,
    config: &Config,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Callbacks> {
    let callbacks = Arc::new(config.callbacks.clone());
    let http = http_client(callbacks.clone())?;
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
        callbacks,
        max_attempts: i64::from(config.limits.callback_max_attempts),
        queued: Notify::new(),
        shared_queue: config.cluster.is_some()
            && matches!(config.database, fleetrun_store::Database::Postgres(_)),
    });
    let (ended, ended_rx) = mpsc::unbounded_channel();
    tasks.spawn(dispatcher.clone().intake(ended_rx, shutdown.clone()));
    tasks.spawn(dispatcher.deliver(shutdown));
    Ok(Callbacks::new(ended))
}

/// The client callbacks are sent with: it connects only to addresses `callbacks` allows.
fn http_client(callbacks: Arc<CallbacksConfig>) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        // A redirect is a failed attempt: following one would send the job's result somewhere
        // the submitter did not name, and to an address nobody checked.
        .redirect(reqwest::redirect::Policy::none())
        // Through a proxy, the address checked would be the proxy's, not the receiver's.
        .no_proxy()
        .dns_resolver(Arc::new(address::CheckedResolver { config: callbacks }))
        .user_agent(concat!("fleetrun-controller/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why an attempt got no HTTP answer, as the submitter sees it: nothing about the connection's
/// fate (refused, reset, timed out, TLS), which would tell open ports from closed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoAnswer {
    /// The URL's host is, or resolves to, only addresses callbacks may not reach.
    #[error(
        "refused: the callback URL's host is or resolves to an address in a network the controller's configuration does not allow callbacks to"
    )]
    Refused,
    /// Anything else: no address, no connection, no HTTP answer in time.
    #[error("could not connect, or no HTTP answer within 15 s")]
    Unreachable,
}

const HTTP_OK: u16 = 200;
const JSON: &str = "application/json";
/// What bk-job's second try sends: its JSON body under a form post's content type.
const FORM: &str = "application/x-www-form-urlencoded";

/// An attempt without an HTTP answer: what the submitter sees, and what the log says.
#[derive(Debug)]
struct Failure {
    shown: NoAnswer,
    detail: String,
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
                    end_time: job.end_time?,
                    status: job.status,
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
        let mut claimed_until = None;
        if self.shared_queue {
            // Of the controllers that see it due, one makes the attempt; should it die during
            // the attempt, another makes it once the claim runs out.
            let until = now_ms() + CLAIM_FOR.as_millis() as i64;
            claimed_until = Some(until);
            match self
                .store
                .claim_callback_attempt(delivery.id, delivery.next_attempt_at, until)
                .await
            {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::error!(
                        delivery = delivery.id,
                        "cannot claim a callback attempt: {e}"
                    );
                    return;
                }
            }
        }
        let number = delivery.attempts + 1;
        let at = now_ms();
        let started = Instant::now();
        let result = self.post(&delivery, at).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let mut detail = None;
        let (http_status, error, last_error) = match result {
            Ok(code) if self.delivered(code) => (Some(i32::from(code)), None, None),
            Ok(code) => (Some(i32::from(code)), None, Some(format!("HTTP {code}"))),
            Err(failure) => {
                let shown = failure.shown.to_string();
                detail = Some(failure.detail);
                (None, Some(shown.clone()), Some(shown))
            }
        };
        // The log, read by the operator only, says what happened to the connection.
        let why = detail.as_deref().or(last_error.as_deref()).unwrap_or("?");
        let next = if last_error.is_none() {
            CallbackNext::Delivered
        } else if number >= self.max_attempts {
            CallbackNext::Failed
        } else {
            CallbackNext::RetryAt(now_ms() + backoff(number).as_millis() as i64)
        };
        let url = redact(&delivery.url);
        let job = delivery.job_instance_id;
        match next {
            CallbackNext::Delivered => {
                metrics::counter!("fleetrun_callback_attempts_total", "outcome" => "delivered")
                    .increment(1);
                tracing::info!(job, delivery = delivery.id, attempt = number, %url, duration_ms, "callback delivered");
            }
            CallbackNext::RetryAt(when) => {
                metrics::counter!("fleetrun_callback_attempts_total", "outcome" => "retry")
                    .increment(1);
                tracing::warn!(job, delivery = delivery.id, attempt = number, %url, retry_in_ms = when - now_ms(), "callback attempt failed: {why}");
            }
            CallbackNext::Failed => {
                metrics::counter!("fleetrun_callback_attempts_total", "outcome" => "failed")
                    .increment(1);
                tracing::error!(job, delivery = delivery.id, attempts = number, %url, "callback given up: {why}");
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
                .record_claimed_callback_attempt(
                    &record,
                    next,
                    last_error.as_deref(),
                    now_ms(),
                    claimed_until,
                )
                .await
            {
                Ok(true) => return,
                Ok(false) => {
                    // The claim ran out and another controller made the attempt again: its
                    // record stands.
                    tracing::warn!(
                        delivery = delivery.id,
                        "a callback attempt outlived its claim: not recorded"
                    );
                    return;
                }
                Err(e) => tracing::error!(
                    delivery = delivery.id,
                    "cannot record a callback attempt: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200 * (retry + 1))).await;
        }
    }

    /// Whether an HTTP answer counts as delivered.
    fn delivered(&self, status: u16) -> bool {
        match self.callbacks.compatibility {
            CallbackCompatibility::Fleetrun => (200..300).contains(&status),
            CallbackCompatibility::BkJob => status == HTTP_OK,
        }
    }

    /// POSTs the body as JSON and, in bk-job compatibility when that is not answered 200, once
    /// more as bk-job's form post; the last HTTP status, or why there is none.
    async fn post(&self, delivery: &CallbackDelivery, at: i64) -> Result<u16, Failure> {
        let status = self.post_as(delivery, at, JSON).await?;
        if self.callbacks.compatibility == CallbackCompatibility::BkJob && status != HTTP_OK {
            tracing::info!(
                job = delivery.job_instance_id,
                delivery = delivery.id,
                status,
                "callback answered {status} to JSON; sending it as a form post, as bk-job does"
            );
            return self.post_as(delivery, at, FORM).await;
        }
        Ok(status)
    }

    /// POSTs the body with `content_type`; the HTTP status, or why there is none.
    async fn post_as(
        &self,
        delivery: &CallbackDelivery,
        at: i64,
        content_type: &'static str,
    ) -> Result<u16, Failure> {
        let url = Url::parse(&delivery.url).map_err(|e| Failure {
            shown: NoAnswer::Unreachable,
            detail: format!("bad URL: {e}"),
        })?;
        // The client resolves host names through the checking resolver, but connects to a
        // literal address directly.
        if let Some(ip) = literal_ip(&url) {
            self.callbacks.check(ip).map_err(|e| Failure {
                shown: NoAnswer::Refused,
                detail: e.to_string(),
            })?;
        }
        let timestamp = at.to_string();
        let mut request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, content_type)
            .header("X-Fleetrun-Delivery", delivery.id.to_string())
            .header("X-Fleetrun-Timestamp", &timestamp)
            .body(delivery.body.clone());
        if let Some(key) = self.keys.get(&delivery.app_code) {
            request = request.header(
                "X-Fleetrun-Signature",
                signature(key, &timestamp, delivery.body.as_bytes()),
            );
        }
        let response = request.send().await.map_err(failure)?;
        Ok(response.status().as_u16())
    }
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// What the submitter and the log are told of a request that got no HTTP answer.
fn failure(error: reqwest::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut shown = NoAnswer::Unreachable;
    while let Some(cause) = source {
        if cause.downcast_ref::<Forbidden>().is_some() {
            shown = NoAnswer::Refused;
        }
        source = cause.source();
    }
    Failure {
        shown,
        detail: describe(error),
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

    /// The end of a job created without a callback URL is not looked up, once: a later end (a
    /// retry) is, as is every other job's.
    #[test]
    fn a_job_without_a_url_is_not_looked_up_at_its_end() {
        let (ended, mut reported) = mpsc::unbounded_channel();
        let callbacks = Callbacks::new(ended);
        callbacks.job_without_url(1);
        callbacks.job_ended(1);
        callbacks.job_ended(2);
        callbacks.job_ended(1);
        assert_eq!(reported.try_recv().ok(), Some(2));
        assert_eq!(reported.try_recv().ok(), Some(1));
        assert!(reported.try_recv().is_err());
        // Past the bound, the oldest are forgotten (and looked up as any other job), the
        // newest still remembered: jobs never ended here cannot fill the set for good.
        for id in 0..MAX_WITHOUT_URL as i64 + 10 {
            callbacks.job_without_url(100 + id);
        }
        callbacks.job_ended(100);
        callbacks.job_ended(109);
        callbacks.job_ended(110);
        callbacks.job_ended(100 + MAX_WITHOUT_URL as i64 + 5);
        assert_eq!(reported.try_recv().ok(), Some(100));
        assert_eq!(reported.try_recv().ok(), Some(109));
        assert!(reported.try_recv().is_err());
        // One that did not start here after all is forgotten at once.
        callbacks.forget_job_without_url(111);
        callbacks.job_ended(111);
        assert_eq!(reported.try_recv().ok(), Some(111));
        let remembered = callbacks.without_url.lock().unwrap();
        assert!(remembered.order.len() <= MAX_WITHOUT_URL);
        assert_eq!(remembered.jobs.len(), MAX_WITHOUT_URL - 3);
    }

    fn listen() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    fn check_url(text: &str, listen: SocketAddr) -> Result<Url, UrlError> {
        super::check_url(text, listen, &CallbacksConfig::default())
    }

    /// Callbacks may reach these networks as well.
    fn allowing(networks: &[&str]) -> CallbacksConfig {
        CallbacksConfig {
            allow_networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
            ..CallbacksConfig::default()
        }
    }

    #[test]
    fn http_and_https_urls_elsewhere_are_accepted() {
        for url in [
            "http://example.com/hook",
            "https://example.com:8443/hook?token=x",
            "http://8.8.8.8:9000/hook",
            "http://[2606:4700:4700::1111]/hook",
            // A name is checked when it is resolved, at each attempt.
            "http://localhost:9000/hook",
        ] {
            assert!(check_url(url, listen()).is_ok(), "{url}");
        }
    }

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9000/hook",
            "http://127.1:9000/hook",
            "http://0x7f000001:9000/hook",
            "http://10.0.0.1:8080/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:9000/",
            "http://[::ffff:10.0.0.1]/",
            "http://[fe80::1]/",
            "http://100.64.0.1/",
        ] {
            assert!(
                matches!(check_url(url, listen()), Err(UrlError::Forbidden(_))),
                "{url}"
            );
        }
        let loopback = allowing(&["127.0.0.0/8"]);
        assert!(super::check_url("http://127.0.0.1:9000/hook", listen(), &loopback).is_ok());
        assert!(super::check_url("http://[::ffff:127.0.0.2]/", listen(), &loopback).is_ok());
        assert!(matches!(
            super::check_url("http://10.0.0.1/", listen(), &loopback),
            Err(UrlError::Forbidden(_))
        ));
        // Allowing loopback does not open the controller's own API.
        assert!(matches!(
            super::check_url("http://127.0.0.1:8080/", listen(), &loopback),
            Err(UrlError::Controller)
        ));
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
        assert!(matches!(
            check_url("https://127.0.0.1/", everywhere),
            Err(UrlError::Forbidden(_))
        ));
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
    fn the_signature_is_hex_hmac_sha256_of_timestamp_dot_body() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        // printf '%s' '1700000000000.{"job_instance_id":7}' | openssl dgst -sha256 -hmac Jefe
        assert_eq!(
            signature(&key, "1700000000000", br#"{"job_instance_id":7}"#),
            "sha256=425b6c01a6f8cb8e1bd63c15cf75003595c514b719180e1af2761108ab772de5"
        );
        // The same body at another time has another signature.
        assert_ne!(
            signature(&key, "1700000000001", br#"{"job_instance_id":7}"#),
            signature(&key, "1700000000000", br#"{"job_instance_id":7}"#),
        );
    }

    /// A loopback HTTP server answering 200 to everything; counts the connections it accepts.
    async fn counting_server() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        (port, accepted)
    }

    /// What a request through the callback client gets: the HTTP status or the submitter's view
    /// of the failure.
    async fn send(callbacks: CallbacksConfig, url: &str) -> Result<u16, NoAnswer> {
        let http = http_client(Arc::new(callbacks)).unwrap();
        match http.post(url).body("{}").send().await {
            Ok(response) => Ok(response.status().as_u16()),
            Err(e) => Err(failure(e).shown),
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_before_connecting_unless_allowed() {
        let (port, accepted) = counting_server().await;
        let url = format!("http://localhost:{port}/hook");
        assert_eq!(
            send(CallbacksConfig::default(), &url).await,
            Err(NoAnswer::Refused)
        );
        assert_eq!(
            send(allowing(&["10.0.0.0/8", "fc00::/7"]), &url).await,
            Err(NoAnswer::Refused)
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(
            send(allowing(&["127.0.0.0/8", "::1/128"]), &url).await,
            Ok(200)
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_closed_port_and_a_silent_one_look_the_same() {
        // A listener that accepts and closes at once, and a port nobody listens on.
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_port = open.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = open.accept().await {
                drop(stream);
            }
        });
        let closed_port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let loopback = allowing(&["127.0.0.0/8"]);
        let open_url = format!("http://127.0.0.1:{open_port}/");
        let closed_url = format!("http://127.0.0.1:{closed_port}/");
        assert_eq!(
            send(loopback.clone(), &open_url).await,
            Err(NoAnswer::Unreachable)
        );
        assert_eq!(
            send(loopback, &closed_url).await,
            Err(NoAnswer::Unreachable)
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
