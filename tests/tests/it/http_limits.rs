//! The HTTP API under attack by clients without credentials, over raw TCP: request heads sent a
//! byte a second, huge bodies sent fast or trickled. The attackers are closed or refused, the
//! controller's memory stays flat, and a valid request stays fast meanwhile.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetrun_tests::{TestCluster, start_cluster};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Short, so that the test sees slow clients closed without waiting long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// What a loaded machine may add to a timeout before the controller acts on it.
const SLACK: Duration = Duration::from_secs(3);
const PREFIX_BYTES: usize = 64 * 1024;
const MAX_BODY: usize = 24 * 1024 * 1024;

/// A one-agent cluster whose controller runs with the test's header timeout and `limits`.
async fn cluster(limits: &str) -> Result<TestCluster> {
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[limits]\nhttp_header_timeout_secs = {}\n{limits}\n",
        HEADER_TIMEOUT.as_secs()
    ));
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    Ok(cluster)
}

fn api_addr(cluster: &TestCluster) -> Result<SocketAddr> {
    Ok(cluster.info.api_url.trim_start_matches("http://").parse()?)
}

/// The controller's process: the one started with this cluster's configuration file.
fn controller_pid(cluster: &TestCluster) -> Result<u32> {
    let config = cluster.controller_config.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with(b"fleetrun-controller"))
            && args.contains(&config.as_bytes())
        {
            return Ok(pid);
        }
    }
    bail!("no controller process runs with {config}")
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// Sends a request head one byte a second and never finishes it; returns how long the server
/// kept the connection open (or an error if it still is after `limit`).
async fn slow_head(addr: SocketAddr, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    // A valid head that never ends: one header whose value grows a byte at a time.
    let head = b"POST /api/v3/get_job_instance_list/ HTTP/1.1\r\nHost: fleetrun\r\nX-Slow: ";
    let mut bytes = head.iter().copied().chain(std::iter::repeat(b'a'));
    let mut buf = [0u8; 1024];
    while started.elapsed() < limit {
        let byte = bytes.next().expect("endless");
        if stream.write_all(&[byte]).await.is_err() {
            return Ok(started.elapsed());
        }
        tokio::select! {
            read = stream.read(&mut buf) => {
                // Closed (or answered, which also ends the attack).
                let _ = read;
                return Ok(started.elapsed());
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    bail!("a connection sending its head a byte a second was still open after {limit:?}")
}

/// Sends one request with a `MAX_BODY` body and no credentials, the body's first part fast and
/// the rest at `pace` (bytes a second, or as fast as possible); returns the reply, if any.
async fn huge_body(addr: SocketAddr, pace: Option<usize>) -> Result<String> {
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let reply = tokio::spawn(async move {
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply).into_owned()
    });
    let head = format!(
        "POST /api/v3/fast_execute_script/ HTTP/1.1\r\nHost: fleetrun\r\n\
         Content-Type: application/json\r\nContent-Length: {MAX_BODY}\r\n\r\n"
    );
    let opening = b"{\"script_content\": \"";
    let closing = b"\"}";
    let chunk = vec![b'A'; 1 << 20];
    let mut sent = 0;
    let mut going = send(&mut writer, head.as_bytes()).await && send(&mut writer, opening).await;
    sent += opening.len();
    if let Some(pace) = pace {
        // Just under the unauthenticated budget at once, then a trickle.
        let first = PREFIX_BYTES - 1024;
        going = going && send(&mut writer, &chunk[..first]).await;
        sent += first;
        while going && sent < 2 * PREFIX_BYTES && !reply.is_finished() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            going = send(&mut writer, &chunk[..pace]).await;
            sent += pace;
        }
    }
    while going && sent < MAX_BODY - closing.len() && !reply.is_finished() {
        let n = chunk.len().min(MAX_BODY - closing.len() - sent);
        going = send(&mut writer, &chunk[..n]).await;
        sent += n;
    }
    if going {
        send(&mut writer, closing).await;
    }
    drop(writer);
    Ok(reply.await?)
}

/// Whether `bytes` could be written (the server may have closed the connection).
async fn send(writer: &mut tokio::net::tcp::OwnedWriteHalf, bytes: &[u8]) -> bool {
    writer.write_all(bytes).await.is_ok()
}

/// The bk-job envelope in a raw HTTP reply.
fn envelope(reply: &str) -> Option<Value> {
    let (_, body) = reply.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_heads_and_huge_bodies_neither_starve_a_valid_request_nor_grow_memory() -> Result<()> {
    let cluster = cluster("").await?;
    let addr = api_addr(&cluster)?;
    let pid = controller_pid(&cluster)?;
    let client = cluster.client();
    // Warm up: the first requests allocate what every later one reuses.
    for _ in 0..5 {
        client.hosts().await?;
    }
    let baseline = rss(pid)?;

    let stop = Arc::new(AtomicBool::new(false));
    let limit = HEADER_TIMEOUT + Duration::from_secs(10);
    let slow_heads: Vec<_> = (0..50)
        .map(|_| tokio::spawn(slow_head(addr, limit)))
        .collect();
    let replies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let huge: Vec<_> = (0..8)
        .map(|i| {
            let (stop, replies, attempts) = (stop.clone(), replies.clone(), attempts.clone());
            // Half send as fast as they can, half trickle after the first 63 KiB.
            let pace = (i % 2 == 1).then_some(1024);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if let Ok(reply) = huge_body(addr, pace).await {
                        replies.lock().unwrap().push(reply);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(now) = rss(pid) {
                    peak.fetch_max(now as usize, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Valid requests while the attack is under way: credentials in the body, and in the header.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let header = json!({
        "bk_app_code": cluster.info.bk_app_code,
        "bk_app_secret": cluster.info.bk_app_secret,
        "bk_username": "admin",
    })
    .to_string();
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let hosts = client.hosts().await?;
        latencies.push(started.elapsed());
        assert_eq!(hosts.len(), 1);

        let started = Instant::now();
        let reply: Value = http
            .post(format!("{}/fleetrun/v1/list_hosts", cluster.info.api_url))
            .header("X-Bkapi-Authorization", &header)
            .send()
            .await?
            .json()
            .await?;
        latencies.push(started.elapsed());
        assert_eq!(reply["code"], 0, "{reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Keep the attack going past the header timeout, so slow heads are closed while it runs.
    let mut closed = Vec::new();
    for task in slow_heads {
        closed.push(task.await??);
    }
    stop.store(true, Ordering::Relaxed);
    for task in huge {
        task.await?;
    }
    sampler.await?;

    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let worst = *latencies.last().unwrap();
    let growth = (peak.load(Ordering::Relaxed) as u64).saturating_sub(baseline);
    let slowest_close = closed.iter().max().copied().unwrap_or_default();
    let replies = std::mem::take(&mut *replies.lock().unwrap());
    let refused = replies
        .iter()
        .filter_map(|r| envelope(r))
        .filter(|e| {
            (e["code"] == 1_640_001 && e["message"].as_str().unwrap().contains("65536"))
                || (e["code"] == 1_240_003 && e["message"].as_str().unwrap().starts_with("body"))
        })
        .count();
    println!(
        "valid requests under attack: median {median:?}, worst {worst:?}; \
         slow heads closed after at most {slowest_close:?}; \
         controller RSS {} MiB, grew at most {} MiB; \
         {} huge bodies sent, {refused} refusals read back",
        baseline >> 20,
        growth >> 20,
        attempts.load(Ordering::Relaxed),
    );
    // Starvation shows as seconds (the header timeout); a loaded CI machine can take a
    // valid request past one second without any.
    assert!(
        worst < Duration::from_secs(2),
        "a valid request took {worst:?} under attack"
    );
    assert!(
        slowest_close <= HEADER_TIMEOUT + SLACK,
        "a slow head was kept open {slowest_close:?}, the header timeout is {HEADER_TIMEOUT:?}"
    );
    assert!(
        growth < 100 << 20,
        "the controller's memory grew by {} MiB under huge unauthenticated bodies",
        growth >> 20
    );
    assert!(
        refused > 0,
        "no refusal was read back: {:?}",
        replies.first()
    );

    // And the controller still answers.
    assert_eq!(client.hosts().await?.len(), 1);
    Ok(())
}

/// Sends a raw request (head and whole body) and returns the reply's envelope.
async fn raw_post(addr: SocketAddr, path: &str, extra_head: &str, body: &[u8]) -> Result<Value> {
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let reply = tokio::spawn(async move {
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply).into_owned()
    });
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: fleetrun\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_head}\r\n",
        body.len()
    );
    if writer.write_all(head.as_bytes()).await.is_ok() {
        let _ = writer.write_all(body).await;
    }
    let reply = reply.await?;
    envelope(&reply).with_context(|| format!("no envelope in {:?}", &reply[..reply.len().min(300)]))
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_decide_how_much_body_is_read() -> Result<()> {
    let cluster = cluster("").await?;
    let addr = api_addr(&cluster)?;
    let info = &cluster.info;
    let scope = json!({"bk_scope_type": "biz", "bk_scope_id": info.bk_scope_id});
    let pad = "x".repeat(3 * PREFIX_BYTES);
    let path = "/api/v3/get_account_list/";

    // Credentials at the end of a body larger than the unauthenticated budget: refused, and
    // the message names the budget.
    let late = format!(
        r#"{{"bk_scope_type": "biz", "bk_scope_id": "{}", "pad": "{pad}", "bk_app_code": "{}", "bk_app_secret": "{}", "bk_username": "admin"}}"#,
        info.bk_scope_id, info.bk_app_code, info.bk_app_secret
    );
    let refused = raw_post(addr, path, "", late.as_bytes()).await?;
    assert_eq!(refused["code"], 1_640_001, "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("65536") && message.contains("X-Bkapi-Authorization"),
        "{message}"
    );

    // The same credentials at the body's start, or in the header: served.
    let early = format!(
        r#"{{"bk_app_code": "{}", "bk_app_secret": "{}", "bk_username": "admin", "bk_scope_type": "biz", "bk_scope_id": "{}", "pad": "{pad}"}}"#,
        info.bk_app_code, info.bk_app_secret, info.bk_scope_id
    );
    let served = raw_post(addr, path, "", early.as_bytes()).await?;
    assert_eq!(served["code"], 0, "{served}");
    let header = format!(
        "X-Bkapi-Authorization: {}\r\n",
        json!({"bk_app_code": info.bk_app_code, "bk_app_secret": info.bk_app_secret, "bk_username": "admin"})
    );
    let served = raw_post(addr, path, &header, late.as_bytes()).await?;
    assert_eq!(served["code"], 0, "{served}");
    // So does the ordinary client, which puts them in the body.
    let mut request = scope.clone();
    request["pad"] = json!(pad);
    cluster.client().call("get_account_list", request).await?;

    // Wrong credentials in the header are refused before the body is read.
    let wrong = format!(
        "X-Bkapi-Authorization: {}\r\n",
        json!({"bk_app_code": info.bk_app_code, "bk_app_secret": "wrong", "bk_username": "admin"})
    );
    let refused = raw_post(addr, path, &wrong, early.as_bytes()).await?;
    assert_eq!(refused["code"], 1_640_001, "{refused}");

    // A declared body over the limit is refused by its length alone (413).
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: fleetrun\r\nContent-Length: {}\r\n\r\n{{",
                MAX_BODY + 1
            )
            .as_bytes(),
        )
        .await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut reply)).await??;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert_eq!(envelope(&reply).unwrap()["code"], 1_240_003, "{reply}");

    // A body trickled without credentials is cut off at the header timeout.
    let started = Instant::now();
    let reply = huge_body(addr, Some(16)).await?;
    let refused = envelope(&reply).with_context(|| reply.clone())?;
    assert_eq!(refused["code"], 1_240_003, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().starts_with("body"),
        "{refused}"
    );
    assert!(started.elapsed() < HEADER_TIMEOUT + SLACK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_credentials_cannot_take_the_turns_of_those_with() -> Result<()> {
    // Two requests served at once, and room for two unauthenticated bodies' starts.
    let cluster = cluster(&format!(
        "http_max_requests = 2\nhttp_unauthenticated_total_bytes = {}",
        2 * PREFIX_BYTES
    ))
    .await?;
    let addr = api_addr(&cluster)?;
    let info = &cluster.info;

    // Ten clients trickle bodies that would fit the unauthenticated budget, never finishing.
    let trickles: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await?;
                let (mut reader, mut writer) = stream.into_split();
                let head = format!(
                    "POST /api/v3/get_account_list/ HTTP/1.1\r\nHost: fleetrun\r\n\
                     Content-Type: application/json\r\nContent-Length: {PREFIX_BYTES}\r\n\r\n{{\"pad\": \""
                );
                let mut going = send(&mut writer, head.as_bytes()).await;
                let mut reply = Vec::new();
                let started = Instant::now();
                while going {
                    tokio::select! {
                        _ = reader.read_to_end(&mut reply) => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            going = send(&mut writer, b"x").await;
                        }
                    }
                }
                anyhow::Ok((started.elapsed(), String::from_utf8_lossy(&reply).into_owned()))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A client with credentials in its head is served at once, whatever the others hold.
    let header = json!({"bk_app_code": info.bk_app_code, "bk_app_secret": info.bk_app_secret, "bk_username": "admin"});
    let http = reqwest::Client::new();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let reply: Value = http
            .post(format!("{}/fleetrun/v1/list_hosts", info.api_url))
            .header("X-Bkapi-Authorization", header.to_string())
            .send()
            .await?
            .json()
            .await?;
        worst = worst.max(started.elapsed());
        assert_eq!(reply["code"], 0, "{reply}");
    }
    // One with credentials in its body waits for room in the budget, within the header timeout.
    let started = Instant::now();
    let envelope = cluster
        .client()
        .call_raw("get_account_list", cluster.info.scope())
        .await?;
    let waited = started.elapsed();
    println!(
        "with trickling clients holding the budget: header credentials served in at most \
         {worst:?}; body credentials answered {} after {waited:?}",
        envelope["code"]
    );
    assert!(
        worst < Duration::from_secs(2),
        "a request with credentials in its head took {worst:?}"
    );
    assert!(waited < HEADER_TIMEOUT + SLACK, "{waited:?}");
    assert!(
        envelope["code"] == 0 || envelope["code"] == 1_240_002,
        "{envelope}"
    );

    // The trickling clients are all cut off at the header timeout.
    for task in trickles {
        let (open, reply) = task.await??;
        assert!(open < HEADER_TIMEOUT + SLACK, "{open:?}: {reply}");
        let envelope = envelope_of(&reply);
        assert!(
            [1_240_002, 1_240_003].contains(&envelope["code"].as_i64().unwrap_or_default()),
            "{reply}"
        );
    }
    Ok(())
}

fn envelope_of(reply: &str) -> Value {
    envelope(reply).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_turn_does_not_use_up_the_body_time() -> Result<()> {
    // One request served at once, and 4 s to send a body.
    let cluster = cluster("http_max_requests = 1\nhttp_body_timeout_secs = 4").await?;
    let addr = api_addr(&cluster)?;
    let info = &cluster.info;
    let credentials = format!(
        "X-Bkapi-Authorization: {}\r\n",
        json!({"bk_app_code": info.bk_app_code, "bk_app_secret": info.bk_app_secret, "bk_username": "admin"})
    );
    let path = "/api/v3/get_account_list/";
    let head = |length: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: fleetrun\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n{credentials}\r\n"
        )
    };

    // An authenticated client takes the only turn and stalls its body until its 4 s run out.
    let mut holder = TcpStream::connect(addr).await?;
    holder.write_all(head(100).as_bytes()).await?;
    holder.write_all(b"{").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another waits for the turn (about 4 s) with half its body sent, and sends the rest 5.5 s
    // after it started: soon after it is served, though more than 4 s after it arrived.
    let body = json!({"bk_scope_type": "biz", "bk_scope_id": info.bk_scope_id}).to_string();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head(body.len()).as_bytes()).await?;
    writer.write_all(first).await?;
    tokio::time::sleep_until((started + Duration::from_millis(5_500)).into()).await;
    let _ = writer.write_all(rest).await;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut reply)).await??;
    let reply = String::from_utf8_lossy(&reply);
    let served = envelope(&reply).with_context(|| reply.to_string())?;
    assert_eq!(served["code"], 0, "{served}");
    drop(holder);
    Ok(())
}
