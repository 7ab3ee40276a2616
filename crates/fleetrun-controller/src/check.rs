//! `fleetrun-controller check-config`: what the controller would refuse at start, found without
//! starting it (no database opened, no port bound).

use std::path::Path;

use fleetrun_net::TlsError;

use crate::config::{Config, ConfigError, Key, Location};

/// Checks the configuration file at `path`: a one-line summary when the controller would start
/// with it, else every problem found, each naming the file and, where it comes from a key, its
/// line and column.
pub fn check_config(path: &Path) -> Result<String, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        vec![
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
            .to_string(),
        ]
    })?;
    // Nothing further can be checked in a file that does not parse.
    let config = Config::parse(path, &text).map_err(|e| vec![e.to_string()])?;
    let mut problems = Vec::new();
    let at = |keys: &[Key]| Location::of_keys(&text, keys);

    if let Err(e) = fleetrun_net::server_tls(&config.tls) {
        let key = match &e {
            TlsError::File { path, .. } if *path == config.tls.ca => Some("ca"),
            TlsError::File { path, .. } if *path == config.tls.cert => Some("cert"),
            TlsError::File { path, .. } if *path == config.tls.key => Some("key"),
            _ => None,
        };
        let location = match key {
            Some(key) => at(&[Key::Name("tls"), Key::Name(key)]),
            None => at(&[Key::Name("tls")]),
        };
        problems.push(format!("{}{location}: tls: {e}", path.display()));
    }

    if let Err(e) = crate::audit::AuditKey::check(&config.audit_key_file()) {
        let location = if config.security.audit_key_file.is_some() {
            at(&[Key::Name("security"), Key::Name("audit_key_file")])
        } else {
            Location::default()
        };
        problems.push(format!("{}{location}: {e}", path.display()));
    }

    if config.audit_anchor_file() == config.audit_key_file() {
        problems.push(format!(
            "{}{}: security.audit_anchor_file: is the audit key file: writing it would destroy \
             the key",
            path.display(),
            at(&[Key::Name("security"), Key::Name("audit_anchor_file")])
        ));
    }

    if let Err(e) = crate::secrets::ParamCipher::check(&config.param_key_file()) {
        let location = if config.security.param_key_file.is_some() {
            at(&[Key::Name("security"), Key::Name("param_key_file")])
        } else {
            Location::default()
        };
        problems.push(format!("{}{location}: {e}", path.display()));
    }

    if let Some(files) = &config.api.tls
        && let Err(e) = crate::tls_api::server_config(files)
    {
        let key = if e.starts_with("api.tls.key") {
            "key"
        } else {
            "cert"
        };
        let location = at(&[Key::Name("api"), Key::Name("tls"), Key::Name(key)]);
        problems.push(format!("{}{location}: {e}", path.display()));
    }

    // A controller that enrolls hosts does not start without its CA, nor with a CA whose
    // certificates the gateway would refuse.
    if let Some(enroll) = &config.enroll {
        let location = at(&[Key::Name("enroll")]);
        let loaded = enroll.ca_files(&config.database).and_then(|files| {
            crate::enroll::ControllerCa::load(&files)
                .map(|ca| (ca, files))
                .map_err(|e| e.to_string())
        });
        match loaded {
            Err(e) => problems.push(format!(
                "{}{location}: enroll: the CA: {e} (make it with `fleetrun-controller ca init`)",
                path.display()
            )),
            Ok((ca, files)) => {
                if let Err(e) = ca.check_gateway_trusts(&files.cert, &config.tls.ca) {
                    problems.push(format!("{}{location}: enroll: {e}", path.display()));
                }
            }
        }
    }

    let inventory = match crate::inventory::check(&config) {
        Ok(inventory) => Some(inventory),
        Err(e) => {
            let location = if config.inventory.is_some() {
                at(&[Key::Name("inventory")])
            } else {
                Location::default()
            };
            problems.push(format!("{}{location}: inventory: {e}", path.display()));
            None
        }
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(format!(
        "{}: ok: HTTP API on {}, agents on {}, database {}, {} app(s), inventory {} ({} business(es))",
        path.display(),
        config.http_listen,
        config.agent_listen,
        config.database,
        config.apps.len(),
        config
            .inventory
            .as_deref()
            .map_or_else(|| "from this file".to_owned(), |p| p.display().to_string()),
        inventory.map_or(0, |i| i.businesses().len()),
    ))
}
