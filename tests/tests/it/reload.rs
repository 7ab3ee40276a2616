//! SIGHUP reloads the apps: an app added to the file (its secret in an owner-only file) may call
//! the API after the signal, a removed one no longer may, and a change a reload cannot apply
//! (limits) is named in the log as waiting for a restart; a broken file changes nothing.

use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use anyhow::{Result, ensure};
use fleetrun_tests::{ApiClient, eventually, start_cluster};
use serde_json::json;

fn hangup(pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -HUP {pid}");
    Ok(())
}

async fn answers(client: &ApiClient) -> Result<i64> {
    let reply = client
        .call_raw(
            "get_account_list",
            json!({"bk_scope_type": "biz", "bk_scope_id": "2"}),
        )
        .await?;
    Ok(reply["code"].as_i64().unwrap_or(-1))
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_apps_and_names_what_needs_a_restart() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    cluster.stop_controller(Duration::from_secs(10))?;
    let config_path = cluster.controller_config.clone();
    let original = std::fs::read_to_string(&config_path)?;
    let log = cluster.dir().join("controller-reload.log");
    let mut child = cluster.spawn("fleetrun-controller", &config_path, &log)?;
    let url = cluster.info.api_url.clone();
    let newcomer = ApiClient::new(&url, "newcomer", "newcomer-secret-123", "bob");
    let admin = cluster.client();

    let result = async {
        eventually(Duration::from_secs(30), "controller up", || async {
            (answers(&admin).await.ok()? == 0).then_some(())
        })
        .await?;
        assert_eq!(answers(&newcomer).await?, 1_640_001);

        let secret = cluster.dir().join("newcomer.secret");
        std::fs::write(&secret, "newcomer-secret-123\n")?;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(
            &config_path,
            format!(
                "{original}\n[[apps]]\nbk_app_code = \"newcomer\"\nbk_app_secret_file = \"{}\"\nscopes = [\"biz:2\"]\n\n[limits]\nheartbeat_secs = 7\n",
                secret.display()
            ),
        )?;
        hangup(child.id())?;
        eventually(Duration::from_secs(10), "the new app admitted", || async {
            (answers(&newcomer).await.ok()? == 0).then_some(())
        })
        .await?;
        eventually(Duration::from_secs(10), "the log names the change", || async {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.contains("app \"newcomer\" added") && text.contains("limits"))
                .then_some(())
        })
        .await?;

        // A file that does not load changes nothing.
        std::fs::write(&config_path, "this is = = not toml")?;
        hangup(child.id())?;
        eventually(Duration::from_secs(10), "refusal logged", || async {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("configuration not reloaded")
                .then_some(())
        })
        .await?;
        assert_eq!(answers(&newcomer).await?, 0);

        // Removed from the file: refused after the next signal.
        std::fs::write(&config_path, &original)?;
        hangup(child.id())?;
        eventually(Duration::from_secs(10), "the removed app refused", || async {
            (answers(&newcomer).await.ok()? == 1_640_001).then_some(())
        })
        .await?;
        assert_eq!(answers(&admin).await?, 0);
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    if result.is_err() {
        eprintln!(
            "--- {}\n{}",
            log.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    result
}
