//! HTTPS on the API: a client trusting the test CA reaches the bk-job API over TLS, plain HTTP
//! on the same port gets nothing, and on SIGHUP a new certificate comes into force for new
//! connections while a broken one is refused and the one in force stays.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use fleetrun_tests::{eventually, pki, start_cluster};
use serde_json::{Value, json};

/// A server certificate for 127.0.0.1 from the cluster's CA, with a common name of its own.
fn issue(ca: &pki::Ca, dir: &Path, name: &str) -> Result<pki::CertPaths> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    ca.issue(
        params,
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key.pem")),
    )
}

/// The DER of the first certificate of a PEM file.
fn der_of(pem: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(pem)?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}

fn client(ca_pem: &Path) -> Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_pem)?)?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// The certificate the server presented on a new connection, and the reply's JSON.
async fn get(ca_pem: &Path, url: &str) -> Result<(Vec<u8>, Value)> {
    let reply = client(ca_pem)?.get(url).send().await?;
    let cert = reply
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .context("no peer certificate")?
        .to_vec();
    Ok((cert, reply.json().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_over_https_with_certificate_reload_on_sighup() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let certs = cluster.dir().join("certs");
    let ca = pki::Ca::open_or_create(&certs, "fleetrun local cluster CA")?;
    let first = issue(&ca, &certs, "api-first")?;
    let cert_path = certs.join("api.pem");
    let key_path = certs.join("api.key.pem");
    std::fs::copy(&first.cert, &cert_path)?;
    std::fs::copy(&first.key, &key_path)?;

    cluster.stop_controller(Duration::from_secs(10))?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[api]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert_path.display(),
        key_path.display()
    ));
    let config_path = cluster.dir().join("controller-https.toml");
    std::fs::write(&config_path, config)?;
    let check = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&config_path)
        .arg("check-config")
        .output()?;
    ensure!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let log = cluster.dir().join("controller-https.log");
    let mut child = cluster.spawn("fleetrun-controller", &config_path, &log)?;
    let https = cluster.info.api_url.replacen("http://", "https://", 1);
    let ca_pem = ca.cert_path();

    let result = async {
        let (cert, health) = eventually(Duration::from_secs(30), "HTTPS up", || async {
            get(&ca_pem, &format!("{https}/healthz")).await.ok()
        })
        .await?;
        assert_eq!(health, json!({"status": "ok"}));
        assert_eq!(cert, der_of(&first.cert)?);

        // The bk-job API with header credentials, as the SDKs send them.
        let auth = json!({
            "bk_app_code": cluster.info.bk_app_code,
            "bk_app_secret": cluster.info.bk_app_secret,
            "bk_username": cluster.info.bk_username,
        });
        let reply: Value = client(&ca_pem)?
            .get(format!(
                "{https}/api/v3/get_account_list/?bk_scope_type=biz&bk_scope_id=2"
            ))
            .header("X-Bkapi-Authorization", auth.to_string())
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(reply["code"], 0, "{reply}");

        // Plain HTTP on the TLS port gets no API reply.
        let plain = reqwest::Client::new()
            .get(format!("{}/healthz", cluster.info.api_url))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(
            plain.is_err() || !plain.unwrap().status().is_success(),
            "plain HTTP served on the TLS port"
        );
        // A client that does not trust the CA is refused.
        let untrusting = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(5))
            .build()?
            .get(format!("{https}/healthz"))
            .send()
            .await;
        assert!(untrusting.is_err());

        // A broken certificate on SIGHUP: refused, the one in force stays.
        std::fs::write(&cert_path, "not a certificate")?;
        hangup(child.id())?;
        eventually(
            Duration::from_secs(10),
            "reload refused in the log",
            || async {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains("API TLS not reloaded")
                    .then_some(())
            },
        )
        .await?;
        let (cert, _) = get(&ca_pem, &format!("{https}/healthz")).await?;
        assert_eq!(cert, der_of(&first.cert)?);

        // A new certificate on SIGHUP: new connections get it.
        let second = issue(&ca, &certs, "api-second")?;
        std::fs::copy(&second.cert, &cert_path)?;
        std::fs::copy(&second.key, &key_path)?;
        hangup(child.id())?;
        let wanted = der_of(&second.cert)?;
        eventually(
            Duration::from_secs(10),
            "the new certificate served",
            || async {
                let (cert, _) = get(&ca_pem, &format!("{https}/healthz")).await.ok()?;
                (cert == wanted).then_some(())
            },
        )
        .await?;
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

fn hangup(pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -HUP {pid}");
    Ok(())
}
