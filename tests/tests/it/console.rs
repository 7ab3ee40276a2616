//! The web console over plain HTTP: signing in and out, sessions, CSRF tokens, and what a user
//! limited to one business can reach by typing URLs.

use std::{io::Write as _, process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, start_cluster};
use reqwest::{StatusCode, header};
use serde_json::json;

/// Passwords of the console users [`with_console`] configures.
pub const ALICE: (&str, &str) = ("alice", "alice-password-1");
pub const CAROL: (&str, &str) = ("carol", "carol-password-2");
pub const VICTOR: (&str, &str) = ("victor", "victor-password-3");
/// What the trusted proxy sends in `X-Fleetrun-Proxy-Secret`.
const PROXY_SECRET: &str = "proxy-secret-0123456789";

/// An argon2 hash made by `fleetrun-controller hash-password`.
fn hash(cluster: &TestCluster, password: &str) -> Result<String> {
    let mut child = std::process::Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    writeln!(child.stdin.take().context("stdin")?, "{password}")?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "hash-password failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// A cluster whose controller serves the console to alice (operator, every scope), carol
/// (operator of business 3 only; every agent's host is in business 2) and victor (viewer).
pub async fn with_console(agents: usize) -> Result<TestCluster> {
    let mut cluster = start_cluster(agents).await?;
    let users = [
        (ALICE, "[\"*\"]", "operator"),
        (CAROL, "[\"biz:3\"]", "operator"),
        (VICTOR, "[\"*\"]", "viewer"),
    ];
    let mut section = format!(
        "\n[console]\napp = \"{}\"\ntrusted_proxy_header = \"X-Forwarded-User\"\ntrusted_proxy_secret = \"{PROXY_SECRET}\"\n",
        cluster.info.bk_app_code
    );
    for ((name, password), scopes, role) in users {
        section.push_str(&format!(
            "\n[[console.users]]\nname = \"{name}\"\npassword_hash = \"{}\"\nscopes = {scopes}\nrole = \"{role}\"\n",
            hash(&cluster, password)?
        ));
    }
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&section);
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    Ok(cluster)
}

/// A console client that keeps its cookies by hand and does not follow redirects.
#[derive(Clone)]
struct ConsoleClient {
    http: reqwest::Client,
    base: String,
    cookies: Vec<(String, String)>,
}

impl ConsoleClient {
    fn new(cluster: &TestCluster) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: cluster.info.api_url.trim_end_matches('/').to_owned(),
            cookies: Vec::new(),
        }
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(header::SET_COOKIE) {
            let text = value.to_str().unwrap_or("");
            let pair = text.split(';').next().unwrap_or("");
            if let Some((k, v)) = pair.split_once('=') {
                self.cookies.retain(|(name, _)| name != k);
                if !v.is_empty() {
                    self.cookies.push((k.to_owned(), v.to_owned()));
                }
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&mut self, path: &str) -> Result<(StatusCode, String)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header(header::COOKIE, self.cookie_header())
            .send()
            .await?;
        self.keep_cookies(&response);
        let status = response.status();
        Ok((status, response.text().await?))
    }

    async fn post(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
    ) -> Result<(StatusCode, String, Option<String>)> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header(header::COOKIE, self.cookie_header())
            .form(form)
            .send()
            .await?;
        self.keep_cookies(&response);
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((status, response.text().await?, location))
    }

    /// Signs in; returns the session's CSRF token (from a page's forms).
    async fn sign_in(&mut self, (user, password): (&str, &str)) -> Result<String> {
        let (status, page) = self.get("/console/login").await?;
        ensure!(status == StatusCode::OK, "login page: {status}");
        let token = hidden(&page, "csrf").context("the sign-in form has no token")?;
        let (status, body, location) = self
            .post(
                "/console/login",
                &[("csrf", &token), ("user", user), ("password", password)],
            )
            .await?;
        ensure!(status == StatusCode::SEE_OTHER, "sign-in: {status} {body}");
        ensure!(location.as_deref() == Some("/console/jobs"), "{location:?}");
        let (status, page) = self.get("/console/jobs").await?;
        ensure!(
            status == StatusCode::OK,
            "jobs page after sign-in: {status}"
        );
        hidden(&page, "csrf").context("no csrf token on the jobs page")
    }
}

/// From a day ago to a day ahead, in ms: what `get_job_instance_list` accepts.
fn today() -> (i64, i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    (now - 86_400_000, now + 86_400_000)
}

async fn job_count(cluster: &TestCluster) -> Result<i64> {
    let mut body = cluster.info.scope();
    let (start, end) = today();
    body["create_time_start"] = json!(start);
    body["create_time_end"] = json!(end);
    let listed = cluster.client().call("get_job_instance_list", body).await?;
    listed["total"].as_i64().context("total")
}

/// The value of the first hidden input named `name`.
fn hidden(page: &str, name: &str) -> Option<String> {
    let at = page.find(&format!(r#"name="{name}" value=""#))?;
    let rest = &page[at + name.len() + 15..];
    Some(rest[..rest.find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn forms_without_the_csrf_token_are_refused_and_do_nothing() -> Result<()> {
    let cluster = with_console(1).await?;
    let (job, _, _) = cluster
        .run_job(cluster.script_request("echo hi", &cluster.host_ids(), json!({})))
        .await?;

    // Signing in needs the token of the form's cookie.
    let mut anonymous = ConsoleClient::new(&cluster);
    let (status, _, _) = anonymous
        .post(
            "/console/login",
            &[("user", ALICE.0), ("password", ALICE.1)],
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = anonymous.get("/console/jobs").await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "still signed out");

    let mut alice = ConsoleClient::new(&cluster);
    let csrf = alice.sign_in(ALICE).await?;
    let hosts = cluster.host_ids()[0].to_string();
    let scope = format!(
        "{}:{}",
        cluster.info.bk_scope_type, cluster.info.bk_scope_id
    );
    let run = [
        ("scope", scope.as_str()),
        ("script", "echo should not run"),
        ("language", "1"),
        ("account", "1"),
        ("host_ids", hosts.as_str()),
        ("action", "run"),
    ];
    let before = job_count(&cluster).await?;
    for token in [None, Some("forged-token"), Some("")] {
        let mut form: Vec<(&str, &str)> = run.to_vec();
        if let Some(token) = token {
            form.push(("csrf", token));
        }
        let (status, body, _) = alice.post("/console/execute", &form).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{token:?}: {body}");
        assert!(body.contains("csrf"), "{body}");
        let (status, _, _) = alice
            .post(
                &format!("/console/jobs/{job}/retry"),
                &[("csrf", token.unwrap_or("x"))],
            )
            .await?;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _, _) = alice.post("/console/logout", &[]).await?;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    assert_eq!(job_count(&cluster).await?, before, "no job was created");
    // The session survived the refused logouts; with the token the same form runs.
    let mut form: Vec<(&str, &str)> = run.to_vec();
    form.push(("csrf", &csrf));
    let (status, body, location) = alice.post("/console/execute", &form).await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let location = location.context("redirect to the new job")?;
    let new_job: i64 = location.trim_start_matches("/console/jobs/").parse()?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), new_job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    // Recorded as run by the console user.
    let mut body = cluster.info.scope();
    let (start, end) = today();
    body["create_time_start"] = json!(start);
    body["create_time_end"] = json!(end);
    body["job_instance_id"] = json!(new_job);
    let listed = cluster.client().call("get_job_instance_list", body).await?;
    assert_eq!(listed["data"][0]["operator"], "alice", "{listed}");

    // Logout with the token ends the session: its cookie no longer opens pages.
    let session = alice.cookies.clone();
    let (status, _, _) = alice.post("/console/logout", &[("csrf", &csrf)]).await?;
    assert_eq!(status, StatusCode::OK);
    alice.cookies = session;
    let (status, _) = alice.get("/console/jobs").await?;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the old session cookie is dead"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_refuses_wrong_passwords_and_viewers_cannot_act() -> Result<()> {
    let cluster = with_console(1).await?;
    let mut client = ConsoleClient::new(&cluster);
    let (_, page) = client.get("/console/login").await?;
    let mut token = hidden(&page, "csrf").context("token")?;
    for (user, password) in [(ALICE.0, "wrong"), ("mallory", "anything"), (ALICE.0, "")] {
        let (status, body, _) = client
            .post(
                "/console/login",
                &[("csrf", &token), ("user", user), ("password", password)],
            )
            .await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{user}");
        assert!(body.contains("Wrong user name or password"), "{body}");
        // Each form comes with a fresh token.
        token = hidden(&body, "csrf").context("token")?;
    }
    // A forged session cookie opens nothing.
    client.cookies = vec![("fleetrun_session".to_owned(), "forged".to_owned())];
    let (status, _) = client.get("/console/jobs").await?;
    assert_eq!(status, StatusCode::SEE_OTHER);

    let mut victor = ConsoleClient::new(&cluster);
    let csrf = victor.sign_in(VICTOR).await?;
    let hosts = cluster.host_ids()[0].to_string();
    let scope = format!(
        "{}:{}",
        cluster.info.bk_scope_type, cluster.info.bk_scope_id
    );
    let (status, body, _) = victor
        .post(
            "/console/execute",
            &[
                ("csrf", &csrf),
                ("scope", &scope),
                ("script", "echo hi"),
                ("language", "1"),
                ("account", "1"),
                ("host_ids", &hosts),
                ("action", "run"),
            ],
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("viewer"), "{body}");
    // A preview is allowed.
    let (status, body, _) = victor
        .post(
            "/console/execute",
            &[
                ("csrf", &csrf),
                ("scope", &scope),
                ("script", "echo hi"),
                ("host_ids", &hosts),
                ("action", "preview"),
            ],
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("1 host<"), "{body}");

    // Guessing: after five failures the name is refused, even with the right password, while
    // other users sign in as usual.
    let mut guesser = ConsoleClient::new(&cluster);
    let (_, page) = guesser.get("/console/login").await?;
    let mut token = hidden(&page, "csrf").context("token")?;
    for guess in 0..6 {
        let password = if guess == 5 {
            VICTOR.1.to_owned()
        } else {
            format!("guess-{guess}")
        };
        let (status, body, _) = guesser
            .post(
                "/console/login",
                &[
                    ("csrf", &token),
                    ("user", VICTOR.0),
                    ("password", &password),
                ],
            )
            .await?;
        let expected = if guess == 5 {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(status, expected, "attempt {guess}: {body}");
        token = hidden(&body, "csrf").context("token")?;
    }
    let (status, _) = guesser.get("/console/jobs").await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "not signed in");
    ConsoleClient::new(&cluster).sign_in(ALICE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_of_one_business_reaches_nothing_of_another_by_url() -> Result<()> {
    let cluster = with_console(1).await?;
    let (job, _, _) = cluster
        .run_job(cluster.script_request("echo secret-output", &cluster.host_ids(), json!({})))
        .await?;
    let host = cluster.host_ids()[0];
    let mut carol = ConsoleClient::new(&cluster);
    let csrf = carol.sign_in(CAROL).await?;
    for path in [
        format!("/console/jobs/{job}"),
        format!("/console/jobs/{job}?fragment=1"),
        format!("/console/jobs/{job}/events"),
        format!("/console/jobs/{job}/hosts/{host}"),
        format!("/console/jobs/{job}/hosts/{host}/log?download=1"),
        "/console/jobs?scope=biz:2".to_owned(),
        "/console/scripts?scope=biz:2".to_owned(),
        "/console/topology?scope=biz:2".to_owned(),
        "/console/execute?scope=biz:2".to_owned(),
    ] {
        let (status, body) = carol.get(&path).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(!body.contains("secret-output"), "{path}");
    }
    // An unknown job reads the same as one of another business.
    let alert = |page: &str| {
        let at = page.find(r#"role="alert">"#).map(|i| i + 13).unwrap_or(0);
        page[at..].split('<').next().unwrap_or("").to_owned()
    };
    let (_, unknown) = carol.get("/console/jobs/999999").await?;
    let (_, other) = carol.get(&format!("/console/jobs/{job}")).await?;
    assert_eq!(alert(&unknown), "job 999999: no such job");
    assert_eq!(alert(&other), format!("job {job}: no such job"));

    // Her own business lists none of business 2's jobs or hosts.
    let (status, jobs) = carol.get("/console/jobs").await?;
    assert_eq!(status, StatusCode::OK);
    assert!(jobs.contains("No jobs match"), "{jobs}");
    let (_, hosts) = carol.get("/console/hosts").await?;
    for h in &cluster.info.hosts {
        assert!(
            !hosts.contains(&format!(">{}:{}<", h.bk_cloud_id, h.ip)),
            "{hosts}"
        );
    }
    // Nor can she act on them.
    for path in [
        format!("/console/jobs/{job}/retry"),
        format!("/console/jobs/{job}/terminate"),
    ] {
        let (status, _, _) = carol.post(&path, &[("csrf", &csrf)]).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // Targeting a host of business 2 from her business: the host is not there for her.
    let (status, body, _) = carol
        .post(
            "/console/execute",
            &[
                ("csrf", &csrf),
                ("scope", "biz:3"),
                ("script", "echo hi"),
                ("language", "1"),
                ("host_ids", &host.to_string()),
                ("action", "preview"),
            ],
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("hosts not in the inventory"), "{body}");
    assert!(!body.contains("outside the scope"), "{body}");
    Ok(())
}

/// Hosts of the large job below.
const LARGE_JOB_HOSTS: i64 = 10_000;

/// Stores a finished job of [`LARGE_JOB_HOSTS`] hosts (one in ten failed, three different
/// outputs) as the engine would have left it; returns its id.
async fn store_large_job(cluster: &mut TestCluster) -> Result<i64> {
    use sqlx::{Connection as _, Row as _};
    cluster.kill_controller()?;
    let options =
        sqlx::sqlite::SqliteConnectOptions::new().filename(cluster.dir().join("controller.db"));
    let mut db = sqlx::SqliteConnection::connect_with(&options).await?;
    let mut tx = db.begin().await?;
    let (now, _) = today();
    let now = now + 86_400_000;
    let job: i64 = sqlx::query(
        "INSERT INTO job_instance (name, operator, app_code, bk_scope_type, bk_scope_id, status, type, launch_mode, create_time, start_time, end_time)
         VALUES ('ten thousand hosts', 'alice', 'fleetrun-demo', 'biz', '2', 4, 1, 2, $1, $1, $2) RETURNING job_instance_id",
    )
    .bind(now)
    .bind(now + 42_000)
    .fetch_one(&mut *tx)
    .await?
    .get(0);
    let step: i64 = sqlx::query(
        "INSERT INTO step_instance (job_instance_id, name, type, status, script_language, script_content, script_param, is_param_sensitive, timeout, account_id, account, create_time, start_time, end_time)
         VALUES ($1, 'step', 1, 4, 1, X'6563686f2068690a', '', 0, 60, 1, 'root', $2, $2, $3) RETURNING step_instance_id",
    )
    .bind(job)
    .bind(now)
    .bind(now + 42_000)
    .fetch_one(&mut *tx)
    .await?
    .get(0);
    for chunk in (0..LARGE_JOB_HOSTS).collect::<Vec<_>>().chunks(500) {
        let mut results = sqlx::QueryBuilder::new(
            "INSERT INTO host_result (step_instance_id, bk_host_id, bk_cloud_id, ip, status, exit_code, start_time, end_time, output_bytes) ",
        );
        results.push_values(chunk, |mut row, &i| {
            let failed = i % 10 == 0;
            row.push_bind(step)
                .push_bind(100_000 + i)
                .push_bind(0)
                .push_bind(format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256))
                .push_bind(if failed { 104 } else { 9 })
                .push_bind(i64::from(failed))
                .push_bind(now)
                .push_bind(now + 1000 + i)
                .push_bind(output(i).len() as i64);
        });
        results.build().execute(&mut *tx).await?;
        let mut logs = sqlx::QueryBuilder::new(
            "INSERT INTO host_log (step_instance_id, bk_host_id, offset, data) ",
        );
        logs.push_values(chunk, |mut row, &i| {
            row.push_bind(step)
                .push_bind(100_000 + i)
                .push_bind(0)
                .push_bind(output(i).into_bytes());
        });
        logs.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    db.close().await?;
    cluster.start_controller().await?;
    Ok(job)
}

fn output(i: i64) -> String {
    match (i % 10, i % 3) {
        (0, _) => "error: disk /data is full\n".to_owned(),
        (_, 0) => "kernel 6.1.0-18\nuptime 12 days\n".to_owned(),
        _ => "kernel 6.1.0-21\nuptime 3 days\n".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_thousand_host_job_page_loads_within_a_second() -> Result<()> {
    // The 10,000 hosts are written into the controller's SQLite file directly.
    if !fleetrun_tests::sqlite_only("a_ten_thousand_host_job_page_loads_within_a_second") {
        return Ok(());
    }
    let mut cluster = with_console(1).await?;
    let job = store_large_job(&mut cluster).await?;
    let mut alice = ConsoleClient::new(&cluster);
    alice.sign_in(ALICE).await?;
    let mut timings = Vec::new();
    for path in [
        format!("/console/jobs/{job}"),
        format!("/console/jobs/{job}?fragment=1"),
        format!("/console/jobs/{job}?q=disk%20%2Fdata&page=3"),
        format!("/console/jobs/{job}?q=10.0.3."),
    ] {
        let started = std::time::Instant::now();
        let (status, page) = alice.get(&path).await?;
        let took = started.elapsed();
        assert_eq!(status, StatusCode::OK, "{path}");
        timings.push((path.clone(), took, page.len()));
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
        // One page of hosts, whatever the job's size.
        assert!(page.matches(r#"class="host-log""#).count() <= 100, "{path}");
        if !path.contains('?') {
            assert!(page.contains("10000 hosts:"), "{page}");
            assert!(page.contains("non-zero exit 1000"));
            // Three groups: the failure first, then the two outputs, larger first.
            let groups: Vec<&str> = page
                .match_indices("<strong>")
                .map(|(i, _)| &page[i + 8..i + 20])
                .collect();
            assert_eq!(
                groups,
                ["1000 hosts</", "6000 hosts</", "3000 hosts</"],
                "{groups:?}"
            );
        }
        if path.contains("q=10.0.3.") {
            assert_eq!(
                page.matches(r#"class="host-log""#).count(),
                100,
                "every 10.0.3.x host"
            );
        }
    }
    for (path, took, bytes) in &timings {
        eprintln!("console page {path}: {took:?}, {bytes} bytes");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_names_the_user_only_with_its_secret() -> Result<()> {
    let cluster = with_console(1).await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let url = format!(
        "{}/console/jobs",
        cluster.info.api_url.trim_end_matches('/')
    );
    let get = |user: &'static str, secret: Option<&'static str>| {
        let mut request = http.get(&url).header("X-Forwarded-User", user);
        if let Some(secret) = secret {
            request = request.header("X-Fleetrun-Proxy-Secret", secret);
        }
        async move {
            let response = request.send().await?;
            let status = response.status();
            anyhow::Ok((status, response.text().await?))
        }
    };
    // A client that names itself is not believed without the proxy's secret.
    for (user, secret) in [
        (ALICE.0, None),
        (ALICE.0, Some("proxy-secret-012345678")),
        (ALICE.0, Some("")),
        ("mallory", Some(PROXY_SECRET)),
    ] {
        let (status, _) = get(user, secret).await?;
        assert_eq!(status, StatusCode::SEE_OTHER, "{user} {secret:?}");
    }
    let (status, page) = get(ALICE.0, Some(PROXY_SECRET)).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains(r#"<span id="who">alice (operator)</span>"#),
        "{page}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_escape_what_hosts_print_and_mask_sensitive_parameters() -> Result<()> {
    let cluster = with_console(1).await?;
    let host = cluster.host_ids()[0];
    // The script prints markup, and fails so that it can be retried with its sealed parameter.
    let request = cluster.script_request(
        "echo '<img src=x onerror=alert(1)>'; echo \"got ${#1} chars\"; exit 1",
        &[host],
        json!({"script_param": fleetrun_tests::b64("hunter2-secret"), "is_param_sensitive": 1}),
    );
    let (job, _, status) = cluster.run_job(request).await?;
    assert_eq!(status["job_instance"]["status"], 4, "{status}");
    let mut alice = ConsoleClient::new(&cluster);
    let csrf = alice.sign_in(ALICE).await?;
    for path in [
        format!("/console/jobs/{job}"),
        format!("/console/jobs/{job}/hosts/{host}"),
    ] {
        let (status, page) = alice.get(&path).await?;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            !page.contains("<img"),
            "{path}: markup from a host reached the page"
        );
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{path}: {page}"
        );
        assert!(
            !page.contains("hunter2"),
            "{path}: the sensitive parameter is shown"
        );
    }
    let (_, page) = alice.get(&format!("/console/jobs/{job}")).await?;
    assert!(page.contains("sensitive: not shown"), "{page}");
    let (status, log) = alice
        .get(&format!("/console/jobs/{job}/hosts/{host}/log?download=1"))
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        log.starts_with("<img src=x onerror=alert(1)>\ngot 14 chars"),
        "{log}"
    );

    // The retry runs with the same sealed parameter, as the console user.
    let (status, body, location) = alice
        .post(&format!("/console/jobs/{job}/retry"), &[("csrf", &csrf)])
        .await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let retry: i64 = location
        .context("the new job")?
        .trim_start_matches("/console/jobs/")
        .parse()?;
    assert_ne!(retry, job);
    cluster
        .client()
        .wait_job(&cluster.info.scope(), retry, Duration::from_secs(60))
        .await?;
    let (_, log) = alice
        .get(&format!(
            "/console/jobs/{retry}/hosts/{host}/log?download=1"
        ))
        .await?;
    assert!(log.contains("got 14 chars"), "{log}");
    let (_, page) = alice.get(&format!("/console/jobs/{retry}")).await?;
    assert!(page.contains(r#"<dd id="operator">alice</dd>"#), "{page}");
    assert!(page.contains("sensitive: not shown"), "{page}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_terminates_a_running_job_and_a_viewer_cannot() -> Result<()> {
    let cluster = with_console(1).await?;
    let client = cluster.client();
    let accepted = client
        .call(
            "fast_execute_script",
            cluster.script_request("echo started; sleep 60", &cluster.host_ids(), json!({})),
        )
        .await?;
    let job = accepted["job_instance_id"].as_i64().context("job id")?;
    let mut victor = ConsoleClient::new(&cluster);
    let csrf = victor.sign_in(VICTOR).await?;
    let (_, page) = victor.get(&format!("/console/jobs/{job}")).await?;
    assert!(
        !page.contains(r#"id="terminate""#),
        "no button for a viewer"
    );
    let (status, _, _) = victor
        .post(
            &format!("/console/jobs/{job}/terminate"),
            &[("csrf", &csrf)],
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let mut alice = ConsoleClient::new(&cluster);
    let csrf = alice.sign_in(ALICE).await?;
    let (_, page) = alice.get(&format!("/console/jobs/{job}")).await?;
    assert!(page.contains(r#"id="terminate""#), "{page}");
    let (status, body, location) = alice
        .post(
            &format!("/console/jobs/{job}/terminate"),
            &[("csrf", &csrf)],
        )
        .await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(
        location.as_deref(),
        Some(format!("/console/jobs/{job}").as_str())
    );
    let done = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(done["job_instance"]["status"], 11, "{done}");
    let (_, page) = alice.get(&format!("/console/jobs/{job}")).await?;
    assert!(page.contains("terminated 1"), "{page}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_publishes_and_disables_script_versions() -> Result<()> {
    let cluster = with_console(1).await?;
    let client = cluster.client();
    let mut create = cluster.info.scope();
    create["name"] = json!("rotate logs");
    create["script_language"] = json!(1);
    create["content"] = json!(fleetrun_tests::b64("logrotate -f /etc/logrotate.conf\n"));
    create["version"] = json!("v1");
    let created = client.call("create_script", create).await?;
    let script = created["script_id"]
        .as_str()
        .context("script_id")?
        .to_owned();
    let version = created["id"].as_i64().context("id")?;
    let scope = format!(
        "{}:{}",
        cluster.info.bk_scope_type, cluster.info.bk_scope_id
    );
    let status_of = || async {
        let mut list = cluster.info.scope();
        list["script_id"] = json!(script);
        let listed = client.call("get_script_version_list", list).await?;
        anyhow::Ok(listed["data"][0]["status"].clone())
    };

    let mut alice = ConsoleClient::new(&cluster);
    let csrf = alice.sign_in(ALICE).await?;
    let (status, page) = alice
        .get(&format!("/console/scripts/{script}?scope={scope}"))
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("logrotate -f /etc/logrotate.conf"), "{page}");
    let publish = format!("/console/scripts/{script}/versions/{version}/publish");
    let (status, _, _) = alice.post(&publish, &[("scope", &scope)]).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "without the token");
    assert_eq!(status_of().await?, 0, "still a draft");
    let (status, body, _) = alice
        .post(&publish, &[("csrf", &csrf), ("scope", &scope)])
        .await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(status_of().await?, 1, "online");
    let disable = format!("/console/scripts/{script}/versions/{version}/disable");
    let (status, body, _) = alice
        .post(&disable, &[("csrf", &csrf), ("scope", &scope)])
        .await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(status_of().await?, 3, "disabled");
    // A disabled version cannot be published again: the API's refusal, shown with its code.
    let (status, body, _) = alice
        .post(&publish, &[("csrf", &csrf), ("scope", &scope)])
        .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("code 1241003"), "{body}");
    // Carol, of business 3, cannot reach it.
    let mut carol = ConsoleClient::new(&cluster);
    let csrf = carol.sign_in(CAROL).await?;
    let (status, _) = carol
        .get(&format!("/console/scripts/{script}?scope={scope}"))
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = carol
        .post(&publish, &[("csrf", &csrf), ("scope", &scope)])
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

/// Guesses sent side by side are counted as they arrive: no more of them reach the password
/// check than the limit allows in sequence, and the name stays refused afterwards, even with
/// its password.
#[tokio::test(flavor = "multi_thread")]
async fn guesses_sent_at_once_are_counted_before_they_are_checked() -> Result<()> {
    let cluster = with_console(1).await?;
    let mut guesser = ConsoleClient::new(&cluster);
    let (_, page) = guesser.get("/console/login").await?;
    let token = hidden(&page, "csrf").context("token")?;
    let guesses = (0..20).map(|guess| {
        let mut client = guesser.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let password = format!("guess-{guess}");
            let form = [
                ("csrf", token.as_str()),
                ("user", CAROL.0),
                ("password", password.as_str()),
            ];
            client.post("/console/login", &form).await.map(|r| r.0)
        })
    });
    let mut checked = 0;
    for guess in guesses.collect::<Vec<_>>() {
        match guess.await?? {
            StatusCode::UNAUTHORIZED => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => anyhow::bail!("a guess answered {other}"),
        }
    }
    assert!(checked <= 5, "{checked} guesses reached the password check");
    let (status, _, _) = guesser
        .post(
            "/console/login",
            &[("csrf", &token), ("user", CAROL.0), ("password", CAROL.1)],
        )
        .await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    Ok(())
}

/// The sign-in form is read before anyone is known: a body larger than a sign-in needs is
/// refused without being held.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_sign_in_form_is_refused() -> Result<()> {
    let cluster = with_console(1).await?;
    let mut client = ConsoleClient::new(&cluster);
    let (_, page) = client.get("/console/login").await?;
    let token = hidden(&page, "csrf").context("token")?;
    let padding = "x".repeat(64 * 1024);
    let (status, body, _) = client
        .post(
            "/console/login",
            &[("csrf", &token), ("user", ALICE.0), ("password", &padding)],
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("larger than"), "{body}");
    Ok(())
}
