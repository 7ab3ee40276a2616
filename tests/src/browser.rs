//! A headless Chromium for the console's tests, driven through chromedriver (WebDriver) with
//! fantoccini: Debian's `chromium` and `chromium-driver` packages, started per test on a free
//! port and stopped when the browser is dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
pub use fantoccini::{Client, Locator};
use fleetrun_testkit::cluster::{free_port, workspace_root};
use serde_json::json;

/// Where Debian installs them.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The colour scheme the browser asks pages for (`prefers-color-scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorScheme {
    Light,
    Dark,
}

/// A browser session and the chromedriver serving it.
#[derive(Debug)]
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a 1280×800 window.
    pub async fn start(scheme: ColorScheme) -> Result<Self> {
        for path in [CHROMEDRIVER, CHROMIUM] {
            if !Path::new(path).exists() {
                bail!("{path} is missing: apt-get install chromium chromium-driver");
            }
        }
        let port = free_port()?;
        let mut driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        // Tests run as root in CI, where Chromium's sandbox cannot start.
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
            "--force-prefers-reduced-motion",
            "--lang=en-US",
        ];
        if scheme == ColorScheme::Dark {
            args.push("--force-dark-mode");
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    if let Some(status) = driver.try_wait()? {
                        bail!("chromedriver exited with {status}");
                    }
                    if tokio::time::Instant::now() >= deadline {
                        let _ = driver.kill();
                        bail!("no browser session within 30 s: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Ok(Self { client, driver })
    }

    /// The text of the first element matching `css`, waiting up to 10 s for it to appear.
    pub async fn text(&self, css: &str) -> Result<String> {
        let element = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("no element {css}"))?;
        Ok(element.text().await?)
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("no element {css}"))?
            .click()
            .await
            .with_context(|| format!("clicking {css}"))?;
        Ok(())
    }

    /// Types into the element matching `css`, replacing what it held.
    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("no element {css}"))?;
        element.clear().await?;
        element.send_keys(text).await?;
        Ok(())
    }

    /// Polls until the text of `css` satisfies `done`, for up to `limit`; returns that text.
    pub async fn wait_text(
        &self,
        css: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = String::new();
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = element.text().await
            {
                if done(&text) {
                    return Ok(text);
                }
                last = text;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{css} still reads {last:?} after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until `css` matches exactly `count` elements, for up to `limit`: a page a form
    /// submitted replaces the current one some time after the click returns.
    pub async fn wait_count(&self, css: &str, limit: Duration, count: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let found = self.client.find_all(Locator::Css(css)).await?.len();
            if found == count {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{css} matches {found} elements, not {count}, after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until the path of the page's URL satisfies `done`, for up to `limit`.
    pub async fn wait_path(&self, limit: Duration, done: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let url = self.client.current_url().await?;
            if done(url.path()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the page is still {url} after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// With `FLEETRUN_SCREENSHOTS=1`, saves the page as `docs/console/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> Result<Option<PathBuf>> {
        if std::env::var("FLEETRUN_SCREENSHOTS").as_deref() != Ok("1") {
            return Ok(None);
        }
        let png = self.client.screenshot().await?;
        let dir = workspace_root().join("docs/console");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(Some(path))
    }

    /// Ends the browser session and chromedriver.
    pub async fn close(mut self) -> Result<()> {
        let result = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        result?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver takes its browsers down with it.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
