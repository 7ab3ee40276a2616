//! The agent's Debian package and the script that installs it, served to hosts that are not
//! agents yet: `GET /install.sh` and `GET /dist/<package file>`.
//!
//! Neither asks for credentials: a host has none before it enrolls, and neither says anything
//! secret (the join token is what admits an agent, and the script only passes it on). The script
//! carries the SHA-256 of each package it may download, so the package is checked against what
//! came over the same connection as the script, whatever serves the download.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    Router,
    body::Body,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

/// `[dist]` in the controller's configuration. Without it, `/install.sh` and `/dist/` answer
/// 404 saying so.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// The directory holding the agent's packages, named as `cargo xtask dist` names them
    /// (`fleetrun-agent_<version>_<architecture>.deb`). The controller's package installs the
    /// agent's packages it was built with in `/usr/share/fleetrun/dist`.
    pub dir: PathBuf,
    /// Where hosts reach this controller's HTTP API (`https://controller.example:8443`, a path
    /// allowed; https only), written into the script as where to download the package from.
    /// By default the `Host` of the request for the script, when the API itself serves TLS;
    /// without either, `/install.sh` refuses: the script and the package run as root before
    /// enrollment's CA pin is checked, so they travel only over https.
    pub url: Option<String>,
    /// The agent gateway's addresses (`host:port`) the script enrolls with when it is not given
    /// `--controller`.
    #[serde(default)]
    pub agent_controllers: Vec<String>,
}

impl DistConfig {
    /// What cannot be served: `(key, message)`.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !self.dir.is_absolute() {
            return Some(("dir", "dist.dir must be an absolute path".into()));
        }
        if let Some(url) = &self.url
            && let Err(why) = check_url(url)
        {
            return Some(("url", format!("dist.url {url:?}: {why}")));
        }
        for entry in &self.agent_controllers {
            if !is_host_port(entry) {
                return Some((
                    "agent_controllers",
                    format!("dist.agent_controllers: {entry:?} is not host:port"),
                ));
            }
        }
        None
    }
}

/// Characters a URL, host or address may have to be written into the script between single
/// quotes: nothing the shell or the quoting could read otherwise.
fn script_safe(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 512
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:/[]%".contains(&b))
}

fn check_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    if parsed.scheme() != "https" {
        return Err(
            "must be https://: hosts run the script and the package it downloads as root".into(),
        );
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        return Err("must have no user, query or fragment".into());
    }
    if !script_safe(url) {
        return Err("has characters other than letters, digits and -._~:/[]%".into());
    }
    Ok(())
}

/// `host:port`: a name or address and a port other than 0.
fn is_host_port(entry: &str) -> bool {
    let Some((host, port)) = entry.rsplit_once(':') else {
        return false;
    };
    script_safe(entry)
        && !host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && !entry.contains('/')
        && !entry.contains('%')
}

/// A package file name the controller serves: `fleetrun-agent_<version>_<arch>.deb`, in
/// Debian's file-name characters only.
fn package_arch(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("fleetrun-agent_")?.strip_suffix(".deb")?;
    let (version, arch) = rest.rsplit_once('_')?;
    let fine = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+~-".contains(&b))
    };
    (fine(version) && fine(arch) && name.len() <= 200).then_some(arch)
}

/// One package as the script names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Package {
    file: String,
    arch: String,
    sha256: String,
}

/// The served directory, with the digests already computed (by file, size and modification
/// time).
#[derive(Debug)]
struct Dist {
    /// The controller's configuration, whose `[dist]` is set.
    config: Arc<crate::Config>,
    /// Whether the API is served over TLS (the scheme of a URL made from `Host`).
    https: bool,
    digests: Mutex<HashMap<String, (u64, SystemTime, String)>>,
}

impl Dist {
    /// `[dist]`.
    fn settings(&self) -> &DistConfig {
        self.config
            .dist
            .as_ref()
            .expect("a Dist is made only for a configuration with [dist]")
    }

    /// The newest package of each architecture, by modification time.
    fn packages(&self) -> std::io::Result<Vec<Package>> {
        let mut newest: HashMap<String, (SystemTime, String, u64)> = HashMap::new();
        for entry in std::fs::read_dir(&self.settings().dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(arch) = package_arch(&name) else {
                continue;
            };
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified()?;
            let newer = newest
                .get(arch)
                .is_none_or(|(t, n, _)| (modified, &name) > (*t, n));
            if newer {
                newest.insert(arch.to_owned(), (modified, name.clone(), meta.len()));
            }
        }
        let mut packages = Vec::new();
        for (arch, (modified, file, len)) in newest {
            let sha256 = self.digest(&file, len, modified)?;
            packages.push(Package { file, arch, sha256 });
        }
        packages.sort_by(|a, b| a.arch.cmp(&b.arch));
        Ok(packages)
    }

    fn digest(&self, file: &str, len: u64, modified: SystemTime) -> std::io::Result<String> {
        if let Some((l, m, digest)) = self.digests.lock().unwrap().get(file)
            && (*l, *m) == (len, modified)
        {
            return Ok(digest.clone());
        }
        let digest = sha256_file(&self.settings().dir.join(file))?;
        self.digests
            .lock()
            .unwrap()
            .insert(file.to_owned(), (len, modified, digest.clone()));
        Ok(digest)
    }

    /// Where the script downloads from: the configured URL, else the request's own origin.
    fn base_url(&self, headers: &HeaderMap) -> Result<String, String> {
        if let Some(url) = &self.settings().url {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or("the request has no Host header; set [dist] url")?;
        // The host is written into the script: only what a host and port are made of.
        if !script_safe(host) || host.contains('/') || host.contains('%') {
            return Err(format!(
                "the Host header {host:?} is not a host name and port; set [dist] url"
            ));
        }
        if !self.https {
            return Err(format!(
                "{PLAIN_HTTP}: serve the API over TLS ([api] tls) or set [dist] url to the \
                 https:// address hosts reach it at"
            ));
        }
        Ok(format!("https://{host}"))
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(hex::encode(context.finish()))
}

/// The start of the refusal when neither the API nor `[dist] url` is https.
const PLAIN_HTTP: &str = "this controller serves its API over plain http, and hosts must not \
                          run as root what came over it";

/// The routes, for the API's router; each answers 404 naming `[dist]` when it is not configured.
pub fn router<S>(config: &Arc<crate::Config>) -> Router<S> {
    let dist = config.dist.is_some().then(|| {
        Arc::new(Dist {
            config: config.clone(),
            https: config.api.tls.is_some(),
            digests: Mutex::default(),
        })
    });
    Router::new()
        .route("/install.sh", get(install_script))
        .route("/dist/{file}", get(package))
        .with_state(dist)
}

fn plain(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text + "\n",
    )
        .into_response()
}

/// A refusal that is also a script: `curl -f` reports the status, and a `curl | sh` without
/// `-f` prints the reason and fails instead of running nothing successfully.
fn refusal_script(why: String) -> Response {
    let quoted = why.replace('\'', "'\\''");
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")],
        format!("#!/bin/sh\necho 'fleetrun install: {quoted}' >&2\nexit 1\n"),
    )
        .into_response()
}

fn not_configured() -> Response {
    plain(
        StatusCode::NOT_FOUND,
        "this controller serves no agent package: set [dist] dir in its configuration".into(),
    )
}

async fn install_script(State(dist): State<Option<Arc<Dist>>>, headers: HeaderMap) -> Response {
    let Some(dist) = dist else {
        return not_configured();
    };
    let base = match dist.base_url(&headers) {
        Ok(base) => base,
        Err(why) if why.starts_with(PLAIN_HTTP) => return refusal_script(why),
        Err(why) => return plain(StatusCode::BAD_REQUEST, why),
    };
    let listing = {
        let dist = dist.clone();
        tokio::task::spawn_blocking(move || dist.packages()).await
    };
    let packages = match listing {
        Ok(Ok(packages)) => packages,
        Ok(Err(e)) => {
            tracing::error!(dir = %dist.settings().dir.display(), "cannot list the agent packages: {e}");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the controller cannot read its agent packages (its log says why)".into(),
            );
        }
        Err(e) => {
            tracing::error!("listing the agent packages: {e}");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into());
        }
    };
    let script = render_script(
        &base,
        &dist.settings().agent_controllers.join(","),
        &packages,
    );
    (
        [
            (header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        script,
    )
        .into_response()
}

async fn package(
    State(dist): State<Option<Arc<Dist>>>,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let Some(dist) = dist else {
        return not_configured();
    };
    // Only names of the served form: no path, no other file of the directory.
    if package_arch(&file).is_none() {
        return plain(
            StatusCode::NOT_FOUND,
            format!("{file:?} is not an agent package name (fleetrun-agent_<version>_<arch>.deb)"),
        );
    }
    let path = dist.settings().dir.join(&file);
    // As the listing does: a regular file of the directory itself, never what a symlink there
    // points to (the inode opened is the one looked at without following links).
    let opened = async {
        let link = tokio::fs::symlink_metadata(&path).await?;
        let file = tokio::fs::File::open(&path).await?;
        let meta = file.metadata().await?;
        Ok::<_, std::io::Error>((file, meta, link))
    }
    .await;
    let (handle, meta) = match opened {
        Ok((handle, meta, link))
            if link.is_file()
                && meta.is_file()
                && (meta.dev(), meta.ino()) == (link.dev(), link.ino()) =>
        {
            (handle, meta)
        }
        Ok(_) => return plain(StatusCode::NOT_FOUND, format!("no package {file}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return plain(StatusCode::NOT_FOUND, format!("no package {file}"));
        }
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot read an agent package: {e}");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the controller cannot read the package (its log says why)".into(),
            );
        }
    };
    (
        [
            (
                header::CONTENT_TYPE,
                "application/vnd.debian.binary-package",
            ),
            (header::CONTENT_LENGTH, &meta.len().to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(handle)),
    )
        .into_response()
}

/// The install script: `base` and `controllers` are checked to hold only characters that stay
/// literal between single quotes, as are the package names and digests.
fn render_script(base: &str, controllers: &str, packages: &[Package]) -> String {
    let mut cases = String::new();
    for p in packages {
        cases.push_str(&format!(
            "    '{}') pkg='{}'; sum='{}' ;;\n",
            p.arch, p.file, p.sha256
        ));
    }
    SCRIPT
        .replace("@URL@", base)
        .replace("@CONTROLLERS@", controllers)
        .replace("@CASES@\n", &cases)
}

/// The script's text; `@URL@`, `@CONTROLLERS@` and `@CASES@` are filled in per request.
const SCRIPT: &str = include_str!("dist/install.sh");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_package_names_are_accepted() {
        assert_eq!(
            package_arch("fleetrun-agent_0.1.0-1_amd64.deb"),
            Some("amd64")
        );
        assert_eq!(
            package_arch("fleetrun-agent_1.2.3+b1~rc1_arm64.deb"),
            Some("arm64")
        );
        for bad in [
            "fleetrun-controller_0.1.0-1_amd64.deb",
            "fleetrun-agent_0.1.0-1_amd64.deb.sha256",
            "fleetrun-agent__amd64.deb",
            "fleetrun-agent_0.1.0_.deb",
            "fleetrun-agent_../../etc_passwd.deb",
            "fleetrun-agent_0.1.0_amd64'$(reboot)'.deb",
            "fleetrun-agent_0.1.0 1_amd64.deb",
            "fleetrun-agent.deb",
        ] {
            assert_eq!(package_arch(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_and_addresses_that_could_break_out_of_the_script_are_refused() {
        let config = |url: Option<&str>, controllers: &[&str]| DistConfig {
            dir: "/usr/share/fleetrun/dist".into(),
            url: url.map(str::to_owned),
            agent_controllers: controllers.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            config(
                Some("https://ctl.example:8443/fleetrun"),
                &["ctl.example:7000", "[2001:db8::1]:7000"]
            )
            .problem(),
            None
        );
        for (url, controllers, key) in [
            (Some("https://ctl.example/'; reboot; '"), &[][..], "url"),
            (Some("ftp://ctl.example"), &[], "url"),
            (Some("http://ctl.example:8080"), &[], "url"),
            (Some("https://u:p@ctl.example"), &[], "url"),
            (Some("https://ctl.example/?a=b"), &[], "url"),
            (None, &["ctl.example"], "agent_controllers"),
            (None, &["ctl.example:0"], "agent_controllers"),
            (None, &["$(reboot):7000"], "agent_controllers"),
            (None, &["ctl.example:7000 --token x"], "agent_controllers"),
        ] {
            let (at, message) = config(url, controllers).problem().expect("refused");
            assert_eq!(at, key, "{message}");
        }
        let relative = DistConfig {
            dir: "dist".into(),
            ..config(None, &[])
        };
        assert_eq!(relative.problem().unwrap().0, "dir");
    }

    #[test]
    fn a_host_header_that_is_not_a_host_is_not_written_into_the_script() {
        let config = crate::Config::parse(
            std::path::Path::new("controller.toml"),
            "http_listen = \"127.0.0.1:0\"\nagent_listen = \"127.0.0.1:0\"\n\
             database = \"/tmp/x/db\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [dist]\ndir = \"/nowhere\"\n",
        )
        .unwrap();
        let dist = Dist {
            config: Arc::new(config),
            https: true,
            digests: Mutex::default(),
        };
        let with_host = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().unwrap());
            dist.base_url(&headers)
        };
        assert_eq!(
            with_host("ctl.example:8443").unwrap(),
            "https://ctl.example:8443"
        );
        for bad in [
            "ctl'$(reboot)'",
            "a b",
            "evil.example/x",
            "u@ctl",
            "ctl`id`",
        ] {
            assert!(with_host(bad).is_err(), "{bad}");
        }
        assert!(dist.base_url(&HeaderMap::new()).is_err());
        let plain_http = Dist {
            https: false,
            ..dist
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "ctl.example:8080".parse().unwrap());
        let refused = plain_http.base_url(&headers).unwrap_err();
        assert!(refused.starts_with(PLAIN_HTTP), "{refused}");
    }

    #[test]
    fn the_script_lists_each_package_with_its_digest() {
        let script = render_script(
            "https://ctl.example",
            "ctl.example:7000",
            &[Package {
                file: "fleetrun-agent_0.1.0-1_amd64.deb".into(),
                arch: "amd64".into(),
                sha256: "ab".repeat(32),
            }],
        );
        assert!(script.contains("url='https://ctl.example'"), "{script}");
        assert!(
            script.contains("controllers='ctl.example:7000'"),
            "{script}"
        );
        assert!(script.contains(&format!(
            "    'amd64') pkg='fleetrun-agent_0.1.0-1_amd64.deb'; sum='{}' ;;\n",
            "ab".repeat(32)
        )));
        for placeholder in ["@URL@", "@CONTROLLERS@", "@CASES@"] {
            assert!(!script.contains(placeholder), "{script}");
        }
    }
}
