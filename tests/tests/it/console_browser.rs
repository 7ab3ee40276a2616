//! The web console in a real headless Chromium: an operator signs in, runs a script on the
//! cluster, watches it finish, opens a failed host's log, retries the failed hosts and signs
//! out; a user of another business finds none of it. With `FLEETRUN_SCREENSHOTS=1` the pages are
//! saved into docs/console/.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{
    b64,
    browser::{Browser, ColorScheme},
};
use serde_json::json;

use crate::console::{ALICE, CAROL, with_console};

/// Fails on the host of agent-2 (its staging directory is below the agent's own), succeeds
/// with the same output elsewhere; slow enough to be seen running.
const SCRIPT: &str = "sleep 2\ncase \"$PWD $0\" in\n  *agent-2*) echo 'disk /data is full' >&2; exit 3 ;;\nesac\necho 'all checks passed'\n";

async fn sign_in(browser: &Browser, base: &str, (user, password): (&str, &str)) -> Result<()> {
    browser
        .client
        .goto(&format!("{base}/console/login"))
        .await?;
    browser.fill("#user", user).await?;
    browser.fill("#password", password).await?;
    browser.click("#sign-in").await?;
    let who = browser.text("#who").await?;
    ensure!(who.starts_with(user), "signed in as {who:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_runs_watches_investigates_and_retries_in_the_browser() -> Result<()> {
    let cluster = with_console(3).await?;
    let base = cluster.info.api_url.trim_end_matches('/').to_owned();
    // A script in the library with two versions, for the library pages.
    let mut create = cluster.info.scope();
    create["name"] = json!("disk check");
    create["script_language"] = json!(1);
    create["content"] = json!(b64("df -h /\n"));
    create["version"] = json!("v1");
    let created = cluster.client().call("create_script", create).await?;
    let script_id = created["script_id"]
        .as_str()
        .context("script_id")?
        .to_owned();
    let mut version = cluster.info.scope();
    version["script_id"] = json!(script_id);
    version["content"] = json!(b64("df -h /\ndf -i /\n"));
    version["version"] = json!("v2");
    cluster
        .client()
        .call("create_script_version", version)
        .await?;

    let browser = Browser::start(ColorScheme::Light).await?;
    browser.client.goto(&format!("{base}/console/jobs")).await?;
    // Not signed in: the sign-in page.
    browser.text("#sign-in").await?;
    browser.screenshot("sign-in").await?;
    sign_in(&browser, &base, ALICE).await?;

    // Quick execute on every host, previewed first.
    browser
        .client
        .goto(&format!("{base}/console/execute"))
        .await?;
    browser.fill("#job-name", "check disks").await?;
    browser.fill("#script", SCRIPT).await?;
    let ids: Vec<String> = cluster.host_ids().iter().map(i64::to_string).collect();
    browser.fill("#host-ids", &ids.join(", ")).await?;
    browser.click("#preview-button").await?;
    let preview = browser.text("#preview h2").await?;
    ensure!(preview == "3 hosts", "preview: {preview:?}");
    browser
        .client
        .execute(
            "document.getElementById('preview').scrollIntoView()",
            vec![],
        )
        .await?;
    browser.screenshot("quick-execute").await?;
    browser.click("#run").await?;

    // The job page follows the job live until it ends.
    let status = browser.text("#live-status").await?;
    ensure!(
        ["running", "pending"].contains(&status.as_str()),
        "at first {status:?}"
    );
    browser.screenshot("job-running").await?;
    browser
        .wait_text("#job-status", Duration::from_secs(60), |s| s == "failed")
        .await?;
    let job_url = browser.client.current_url().await?;
    let job_id: i64 = job_url
        .path()
        .trim_start_matches("/console/jobs/")
        .parse()
        .context("job id in the URL")?;
    let counts = browser.text("#counts").await?;
    ensure!(
        counts.contains("success 2") && counts.contains("non-zero exit 1"),
        "{counts}"
    );
    // Two groups: the failure first, then the two identical successes.
    let groups = browser
        .client
        .find_all(fantoccini::Locator::Css("#groups > li"))
        .await?;
    ensure!(groups.len() == 2, "{} groups", groups.len());
    let first = groups[0].text().await?;
    ensure!(
        first.contains("1 host") && first.contains("disk /data is full"),
        "{first}"
    );
    let second = groups[1].text().await?;
    ensure!(
        second.contains("2 hosts") && second.contains("all checks passed"),
        "{second}"
    );
    browser.screenshot("job").await?;

    // Search by output text.
    browser.fill("#q", "disk /data").await?;
    browser.click("main form[role=search] button").await?;
    browser
        .wait_count("#host-table tbody tr", Duration::from_secs(10), 1)
        .await
        .context("hosts matching the search")?;

    // The failed host's log.
    browser.click("#host-table a.host-log").await?;
    let log = browser.text("#log").await?;
    ensure!(log.contains("disk /data is full"), "{log:?}");
    ensure!(browser.text("#exit-code").await? == "3");
    browser.screenshot("host-log").await?;

    // Retry the failed host: a new job on that host alone.
    browser.client.goto(job_url.as_str()).await?;
    browser.click("#retry").await?;
    browser
        .wait_path(Duration::from_secs(10), |path| path != job_url.path())
        .await
        .context("the retry's job page")?;
    browser
        .wait_text("#job-status", Duration::from_secs(60), |s| s == "failed")
        .await?;
    let title = browser.text("h1").await?;
    ensure!(title.contains(&format!("retry of job {job_id}")), "{title}");
    let counts = browser.text("#counts").await?;
    ensure!(
        counts.contains("1 host:") && counts.contains("non-zero exit 1"),
        "{counts}"
    );
    ensure!(browser.text("#operator").await? == ALICE.0);

    // The jobs list shows both, the library its versions and their diff, the hosts their agents.
    browser.client.goto(&format!("{base}/console/jobs")).await?;
    let jobs = browser.text("#jobs").await?;
    ensure!(
        jobs.contains("check disks") && jobs.contains("retry of job"),
        "{jobs}"
    );
    browser.screenshot("jobs").await?;
    browser
        .client
        .goto(&format!("{base}/console/scripts"))
        .await?;
    browser.click("#scripts a").await?;
    browser.click("#diff").await?;
    let diff = browser.text("#diff-text").await?;
    ensure!(diff.contains("+ df -i /"), "{diff}");
    browser.screenshot("script-diff").await?;
    browser
        .client
        .goto(&format!("{base}/console/hosts"))
        .await?;
    let hosts = browser.text("#host-list").await?;
    ensure!(hosts.matches("online").count() >= 3, "{hosts}");
    browser.screenshot("hosts").await?;

    // On a phone.
    browser.client.set_window_size(390, 844).await?;
    browser.client.goto(job_url.as_str()).await?;
    browser.text("#groups").await?;
    browser.screenshot("job-phone").await?;
    browser.client.set_window_size(1280, 800).await?;

    // Signing out ends the session.
    browser.click("#logout").await?;
    browser.text("#signed-out").await?;
    browser.client.goto(job_url.as_str()).await?;
    browser.text("#sign-in").await?;

    // Carol, of business 3 only, finds none of it, not even by URL.
    sign_in(&browser, &base, CAROL).await?;
    let jobs = browser.text("main").await?;
    ensure!(jobs.contains("No jobs match"), "{jobs}");
    browser.client.goto(job_url.as_str()).await?;
    ensure!(browser.text("h1").await? == "Not found");
    let host = cluster.host_ids()[0];
    browser
        .client
        .goto(&format!("{base}/console/jobs/{job_id}/hosts/{host}"))
        .await?;
    ensure!(browser.text("h1").await? == "Not found");
    browser
        .client
        .goto(&format!("{base}/console/hosts"))
        .await?;
    let rows = browser
        .client
        .find_all(fantoccini::Locator::Css("#host-list tbody tr"))
        .await?;
    ensure!(rows.is_empty(), "carol sees {} hosts", rows.len());
    browser.close().await?;

    // Where the system is dark, so are the pages.
    let dark = Browser::start(ColorScheme::Dark).await?;
    sign_in(&dark, &base, ALICE).await?;
    dark.client.goto(job_url.as_str()).await?;
    dark.text("#groups").await?;
    let background = dark
        .client
        .find(fantoccini::Locator::Css("body"))
        .await?
        .css_value("background-color")
        .await?;
    ensure!(
        ["rgb(18, 21, 27)", "rgba(18, 21, 27, 1)"].contains(&background.as_str()),
        "dark page background {background}"
    );
    dark.screenshot("job-dark").await?;
    dark.close().await?;
    Ok(())
}
