//! Plain HTTP off loopback: the controller refuses to start with credentials and scripts about
//! to cross the network in clear, naming the setting, unless the configuration allows it.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use fleetrun_tests::start_cluster;

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_every_address_is_refused_unless_allowed() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    cluster.kill_controller()?;
    let original = std::fs::read_to_string(&cluster.controller_config)?;
    let port = cluster
        .info
        .api_url
        .rsplit_once(':')
        .map(|(_, p)| p.trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let everywhere: String = original
        .lines()
        .map(|line| {
            if line.starts_with("http_listen") {
                format!("http_listen = \"0.0.0.0:{port}\"\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(&cluster.controller_config, &everywhere)?;
    let log = cluster.dir().join("plain-http.log");
    let mut child = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&cluster.controller_config)
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log)?;
    assert_eq!(status.code(), Some(78), "it started: {output}");
    assert!(
        output.contains("http_listen: 0.0.0.0:") && output.contains("allow_plain_http"),
        "{output}"
    );

    // Allowed on purpose: it starts, and serves.
    std::fs::write(
        &cluster.controller_config,
        format!("{everywhere}\n[api]\nallow_plain_http = true\n"),
    )?;
    cluster.start_controller().await?;
    Ok(())
}
