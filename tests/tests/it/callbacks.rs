//! Job callbacks with the real binaries: a receiver in the test gets the job's final status,
//! signed with the app's callback secret, and retried while it answers with errors; callbacks
//! reach loopback only while the controller's configuration allows it.
//!
//! Every receiver and every callback URL here is on loopback: the test clusters allow
//! `127.0.0.0/8` ([`fleetrun_testkit::cluster::ClusterOptions::callback_allow_networks`]), and the tests
//! that need it refused take that away.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use fleetrun_tests::{TestCluster, eventually, reply_message, start_cluster};
use serde_json::{Value, json};

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub(super) struct Received {
    at_ms: i64,
    headers: HeaderMap,
    pub(super) body: Bytes,
}

#[derive(Debug, Default)]
struct Inbox {
    received: Mutex<Vec<Received>>,
    /// The first this many POSTs are answered 500.
    failures: usize,
    /// When set, POSTs that do not verify with this secret (the documented way, [`verify`]) are
    /// answered 401.
    secret: Option<String>,
}

/// A callback receiver on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub(super) struct Receiver {
    pub(super) url: String,
    inbox: Arc<Inbox>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Listens on `port` (0 for any) and answers 500 to the first `failures` POSTs, 200 after.
    pub(super) async fn start(port: u16, failures: usize) -> Result<Self> {
        Self::with_inbox(
            port,
            Inbox {
                failures,
                ..Inbox::default()
            },
        )
        .await
    }

    /// Answers 200 to the POSTs that verify with `secret`, 401 to the others.
    async fn verifying(secret: &str) -> Result<Self> {
        Self::with_inbox(
            0,
            Inbox {
                secret: Some(secret.to_owned()),
                ..Inbox::default()
            },
        )
        .await
    }

    async fn with_inbox(port: u16, inbox: Inbox) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let inbox = Arc::new(inbox);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(inbox.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, inbox, server })
    }

    pub(super) fn received(&self) -> Vec<Received> {
        self.inbox.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(inbox): State<Arc<Inbox>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut received = inbox.received.lock().unwrap();
    received.push(Received {
        at_ms: now_ms(),
        headers,
        body,
    });
    if let Some(secret) = &inbox.secret
        && let Err(why) = verify(received.last().unwrap(), secret, now_ms())
    {
        eprintln!("receiver: refused a POST: {why}");
        return StatusCode::UNAUTHORIZED;
    }
    if received.len() <= inbox.failures {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

/// How long a receiver accepts a timestamp for, as docs/api.md suggests.
const REPLAY_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Verifies a callback as docs/api.md tells receivers to: the timestamp is recent, and the
/// signature is the HMAC-SHA256 of `<timestamp>.<body>` (compared in constant time).
fn verify(received: &Received, secret: &str, now_ms: i64) -> Result<(), &'static str> {
    let timestamp = header(received, "x-fleetrun-timestamp");
    let sent_at: i64 = timestamp.parse().map_err(|_| "no timestamp")?;
    if (now_ms - sent_at).abs() > REPLAY_WINDOW_MS {
        return Err("timestamp outside the replay window");
    }
    let tag = header(received, "x-fleetrun-signature")
        .strip_prefix("sha256=")
        .and_then(unhex)
        .ok_or("no signature")?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&received.body);
    ring::hmac::verify(&key, &signed, &tag).map_err(|_| "bad signature")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn header<'a>(received: &'a Received, name: &str) -> &'a str {
    received
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether the request verifies with `secret` now.
fn signed_with(received: &Received, secret: &str) -> bool {
    verify(received, secret, now_ms()).is_ok()
}

async fn callback_status(cluster: &TestCluster, job: i64) -> Result<Value> {
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    cluster.client().call("get_callback_status", query).await
}

/// Waits until the job's callback is no longer pending; returns its status.
async fn settled_callback(cluster: &TestCluster, job: i64, limit: Duration) -> Result<Value> {
    eventually(limit, "the callback settles", || async {
        let status = callback_status(cluster, job).await.ok()?;
        matches!(status["status"].as_str(), Some("delivered" | "failed")).then_some(status)
    })
    .await
}

/// Submits a job that fails `fast_execute_script`'s checks; returns the error envelope.
async fn refused(cluster: &TestCluster, request: Value) -> Result<Value> {
    let envelope = cluster
        .client()
        .call_raw("fast_execute_script", request)
        .await?;
    anyhow::ensure!(envelope["result"] == json!(false), "accepted: {envelope}");
    Ok(envelope)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_job_is_posted_once_to_its_callback_url_signed() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let receiver = Receiver::start(0, 0).await?;
    // The receiver's token rides in the query, which is never logged or shown.
    let token = "s3cret-token";
    let request = cluster.script_request(
        "echo hi",
        &cluster.host_ids(),
        json!({"callback_url": format!("{}?token={token}", receiver.url)}),
    );
    let (job, step, status) = cluster.run_job(request).await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    let end_time = status["job_instance"]["end_time"]
        .as_i64()
        .context("end_time")?;

    let callback = settled_callback(&cluster, job, Duration::from_secs(20)).await?;
    assert_eq!(callback["status"], "delivered", "{callback}");
    assert_eq!(callback["url"], receiver.url);
    let attempts = callback["attempts"].as_array().context("attempts")?;
    assert_eq!(attempts.len(), 1, "{callback}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["http_status"], 200);
    assert_eq!(attempts[0]["error"], Value::Null);

    let received = receiver.received();
    assert_eq!(received.len(), 1, "exactly one POST: {received:?}");
    let post = &received[0];
    let body: Value = serde_json::from_slice(&post.body)?;
    let steps = json!([{"step_instance_id": step, "status": 3}]);
    assert_eq!(
        body,
        json!({"job_instance_id": job, "status": 3, "step_instances": steps, "step_instance_list": steps})
    );
    assert_eq!(header(post, "content-type"), "application/json");
    assert_eq!(
        header(post, "x-fleetrun-delivery"),
        callback["delivery_id"].to_string()
    );
    let sent_at: i64 = header(post, "x-fleetrun-timestamp").parse()?;
    assert!((end_time..=post.at_ms).contains(&sent_at), "{sent_at}");
    assert!(
        signed_with(post, &cluster.info.callback_secret),
        "signature {:?} does not verify",
        header(post, "x-fleetrun-signature")
    );
    assert!(!signed_with(post, "another secret"));
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(log.contains("callback delivered"), "{log}");
    assert!(!log.contains(token), "the callback URL's query was logged");
    eprintln!(
        "callback latency: job end {end_time} -> received {} = {} ms",
        post.at_ms,
        post.at_ms - end_time
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_receiver_gets_retries_with_backoff_until_it_answers() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let receiver = Receiver::start(0, 2).await?;
    let request = cluster.script_request(
        "exit 3",
        &cluster.host_ids(),
        json!({"callback_url": receiver.url}),
    );
    let (job, _, status) = cluster.run_job(request).await?;
    assert_eq!(status["job_instance"]["status"], 4, "{status}");

    let callback = settled_callback(&cluster, job, Duration::from_secs(30)).await?;
    assert_eq!(callback["status"], "delivered", "{callback}");
    let attempts = callback["attempts"].as_array().context("attempts")?;
    let codes: Vec<&Value> = attempts.iter().map(|a| &a["http_status"]).collect();
    assert_eq!(codes, [&json!(500), &json!(500), &json!(200)], "{callback}");
    let numbers: Vec<&Value> = attempts.iter().map(|a| &a["attempt"]).collect();
    assert_eq!(numbers, [&json!(1), &json!(2), &json!(3)]);
    assert_eq!(callback["last_error"], "HTTP 500");

    let received = receiver.received();
    assert_eq!(received.len(), 3, "{received:?}");
    // The same delivery, byte for byte, each time; the waits double from one second.
    for post in &received {
        assert_eq!(post.body, received[0].body);
        assert_eq!(
            header(post, "x-fleetrun-delivery"),
            header(&received[0], "x-fleetrun-delivery")
        );
        assert!(signed_with(post, &cluster.info.callback_secret));
    }
    let body: Value = serde_json::from_slice(&received[0].body)?;
    assert_eq!(body["status"], 4);
    let first_wait = received[1].at_ms - received[0].at_ms;
    let second_wait = received[2].at_ms - received[1].at_ms;
    assert!((900..5_000).contains(&first_wait), "{first_wait} ms");
    assert!((1_900..8_000).contains(&second_wait), "{second_wait} ms");
    eprintln!("retry waits: {first_wait} ms, {second_wait} ms");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_callback_is_delivered_after_a_controller_restart() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    // A port nobody listens on yet: the first attempts are refused.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let request = cluster.script_request("true", &cluster.host_ids(), json!({"callback_url": url}));
    let (job, _, _) = cluster.run_job(request).await?;
    let failed = eventually(Duration::from_secs(20), "a refused attempt", || async {
        let status = callback_status(&cluster, job).await.ok()?;
        let attempts = status["attempts"].as_array()?;
        (!attempts.is_empty()).then_some(status)
    })
    .await?;
    assert_eq!(failed["status"], "pending", "{failed}");
    assert_eq!(failed["attempts"][0]["http_status"], Value::Null);
    assert!(
        failed["attempts"][0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{failed}"
    );

    cluster.kill_controller()?;
    let receiver = Receiver::start(port, 0).await?;
    cluster.start_controller().await?;
    let callback = settled_callback(&cluster, job, Duration::from_secs(30)).await?;
    assert_eq!(callback["status"], "delivered", "{callback}");
    let received = receiver.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let body: Value = serde_json::from_slice(&received[0].body)?;
    assert_eq!(body["job_instance_id"], job);
    assert_eq!(body["status"], 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_callback_urls_are_refused_and_create_no_job() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let (before, _, _) = cluster
        .run_job(cluster.script_request("true", &hosts, json!({})))
        .await?;
    let port = cluster
        .info
        .api_url
        .rsplit(':')
        .next()
        .context("api port")?;
    for url in [
        "ftp://x".to_owned(),
        "not a url".to_owned(),
        "/relative/hook".to_owned(),
        format!("{}/api/v3/fast_execute_script/", cluster.info.api_url),
        format!("http://localhost:{port}/hook"),
        format!("http://example.com/{}", "a".repeat(512)),
    ] {
        let envelope = refused(
            &cluster,
            cluster.script_request("true", &hosts, json!({"callback_url": url})),
        )
        .await?;
        assert_eq!(envelope["code"], 1_240_003, "{url}: {envelope}");
        assert!(
            reply_message(&envelope).contains("callback_url"),
            "{url}: {envelope}"
        );
    }
    // Job ids are allocated in order: the next job follows the last accepted one directly.
    let (after, _, _) = cluster
        .run_job(cluster.script_request("true", &hosts, json!({"callback_url": ""})))
        .await?;
    assert_eq!(after, before + 1, "a refused request created a job");

    let none = callback_status(&cluster, after).await?;
    assert_eq!(none["status"], "none", "{none}");
    assert_eq!(none["url"], Value::Null);
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(after + 1000);
    let missing = cluster
        .client()
        .call_raw("get_callback_status", query)
        .await?;
    assert_eq!(missing["code"], 1_244_006, "{missing}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_captured_callback_replayed_with_a_fresh_timestamp_fails_verification() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let secret = &cluster.info.callback_secret;
    let receiver = Receiver::verifying(secret).await?;
    let request = cluster.script_request(
        "true",
        &cluster.host_ids(),
        json!({"callback_url": receiver.url}),
    );
    let (job, _, _) = cluster.run_job(request).await?;
    // The receiver verifies the documented way and answers 401 to what does not verify.
    let callback = settled_callback(&cluster, job, Duration::from_secs(20)).await?;
    assert_eq!(callback["status"], "delivered", "{callback}");
    assert_eq!(callback["attempts"][0]["http_status"], 200, "{callback}");
    let captured = receiver.received()[0].clone();
    let sent_at: i64 = header(&captured, "x-fleetrun-timestamp").parse()?;
    assert_eq!(verify(&captured, secret, sent_at), Ok(()));
    // Replayed unchanged once the window has passed, it is too old.
    assert!(verify(&captured, secret, sent_at + REPLAY_WINDOW_MS + 1).is_err());

    // Replayed over HTTP with a fresh timestamp (and the captured signature), it does not verify.
    for fresh in [now_ms(), sent_at + 1] {
        let response = reqwest::Client::new()
            .post(&receiver.url)
            .header("content-type", "application/json")
            .header(
                "x-fleetrun-delivery",
                header(&captured, "x-fleetrun-delivery"),
            )
            .header("x-fleetrun-timestamp", fresh.to_string())
            .header(
                "x-fleetrun-signature",
                header(&captured, "x-fleetrun-signature"),
            )
            .body(captured.body.clone())
            .send()
            .await?;
        assert_eq!(response.status(), 401, "a replay at {fresh} was accepted");
    }
    assert_eq!(receiver.received().len(), 3);
    Ok(())
}

/// Restarts the controller with `[callbacks] allow_networks = <networks>` (TOML) instead of
/// loopback, and waits for the agents to be back.
async fn restart_allowing(cluster: &mut TestCluster, networks: &str) -> Result<()> {
    cluster.kill_controller()?;
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    let changed = config.replace(
        r#"allow_networks = ["127.0.0.0/8"]"#,
        &format!("allow_networks = {networks}"),
    );
    anyhow::ensure!(changed != config, "no loopback allowlist in {config}");
    std::fs::write(&cluster.controller_config, changed)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    Ok(())
}

/// Runs a job whose callback goes to `url`; returns the error its first attempt recorded (after
/// checking that it got no HTTP status and that `last_error` says the same).
async fn first_attempt_error(cluster: &TestCluster, url: &str) -> Result<String> {
    let request = cluster.script_request("true", &cluster.host_ids(), json!({"callback_url": url}));
    let (job, _, _) = cluster.run_job(request).await?;
    let status = eventually(Duration::from_secs(20), "a first attempt", || async {
        let status = callback_status(cluster, job).await.ok()?;
        (!status["attempts"].as_array()?.is_empty()).then_some(status)
    })
    .await?;
    let attempt = &status["attempts"][0];
    assert_eq!(attempt["http_status"], Value::Null, "{status}");
    assert_eq!(status["last_error"], attempt["error"], "{status}");
    Ok(attempt["error"].as_str().context("error")?.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_allowlist_a_callback_to_loopback_is_refused_and_never_sent() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    restart_allowing(&mut cluster, "[]").await?;
    let receiver = Receiver::start(0, 0).await?;
    let port = receiver.url.split(':').nth(2).context("port")?;
    let port = port.trim_end_matches("/hook");

    // A literal loopback address is refused when the job is submitted.
    let envelope = refused(
        &cluster,
        cluster.script_request(
            "true",
            &cluster.host_ids(),
            json!({"callback_url": receiver.url}),
        ),
    )
    .await?;
    assert_eq!(envelope["code"], 1_240_003, "{envelope}");
    let message = envelope["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("callback_url") && message.contains("allow_networks"),
        "{envelope}"
    );

    // A name is checked where it matters, when it is resolved for the connection.
    for url in [
        format!("http://localhost:{port}/hook"),
        format!("http://LocalHost:{port}/hook?token=t"),
    ] {
        let error = first_attempt_error(&cluster, &url).await?;
        assert!(error.starts_with("refused:"), "{url}: {error}");
    }
    assert!(
        receiver.received().is_empty(),
        "the receiver got {:?}",
        receiver.received()
    );
    // The operator's log says what the name resolved to.
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        log.contains("is a loopback address"),
        "no reason in the log"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn callback_status_tells_an_open_port_from_a_closed_one_by_nothing() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    // Open: accepts connections and closes them without a word. Closed: nobody listens.
    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let open_port = open.local_addr()?.port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = open.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let connections = || accepted.load(std::sync::atomic::Ordering::SeqCst);

    // Loopback allowed: the controller connects to the open port, and both read the same.
    let to_open = first_attempt_error(&cluster, &format!("http://127.0.0.1:{open_port}/")).await?;
    let to_closed =
        first_attempt_error(&cluster, &format!("http://127.0.0.1:{closed_port}/")).await?;
    assert!(connections() >= 1, "the open port was not reached");
    assert_eq!(to_open, to_closed);
    assert!(!to_open.starts_with("refused"), "{to_open}");

    // Loopback not allowed: both refused alike, and the open port sees no connection.
    restart_allowing(&mut cluster, "[]").await?;
    let before = connections();
    let to_open = first_attempt_error(&cluster, &format!("http://localhost:{open_port}/")).await?;
    let to_closed =
        first_attempt_error(&cluster, &format!("http://localhost:{closed_port}/")).await?;
    assert_eq!(to_open, to_closed);
    assert!(to_open.starts_with("refused:"), "{to_open}");
    assert_eq!(connections(), before, "a refused callback connected");
    server.abort();
    Ok(())
}
