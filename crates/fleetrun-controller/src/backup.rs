//! `fleetrun-controller backup PATH` and `restore PATH`.
//!
//! A backup is a new directory (0700) holding a consistent copy of the SQLite database, taken
//! while the controller runs, and the files the database cannot be used without or that the
//! controller needs to start the same way: the key of the sealed script parameters, the
//! configuration file, the TLS files and the inventory file. `MANIFEST.json` lists each file with
//! where it came from and its SHA-256; a restore checks every digest before touching anything.
//!
//! A restore puts back the database and the parameter key (the controller must be stopped); the
//! configuration, TLS and inventory copies are there for rebuilding a lost host and are put back
//! by hand (docs/operations.md). A PostgreSQL database is backed up with its own tools: the
//! command prints the procedure.

use std::{
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail, ensure};
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::Config;

/// The database's name inside a backup.
const DATABASE: &str = "controller.db";
const MANIFEST: &str = "MANIFEST.json";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// Unix time (ms) the backup was taken.
    created_at: i64,
    fleetrun_version: String,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    /// Name inside the backup.
    name: String,
    /// What it is: database, param_key, audit_key, config, tls_ca, tls_cert, tls_key, inventory.
    role: String,
    /// Where it was taken from.
    original: PathBuf,
    sha256: String,
    bytes: u64,
}

fn sha256_of(path: &Path) -> anyhow::Result<(String, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let hex = hex::encode(digest(&SHA256, &bytes));
    Ok((hex, bytes.len() as u64))
}

/// The SQLite file the configuration names; `None` for a PostgreSQL server, which is backed up
/// with PostgreSQL's own tools.
fn sqlite_file(config: &Config) -> Option<PathBuf> {
    match &config.database {
        fleetrun_store::Database::Sqlite(path) => Some(path.clone()),
        fleetrun_store::Database::Postgres(_) => None,
    }
}

const PG_PROCEDURE: &str = "\
The database is PostgreSQL: back it up with PostgreSQL's tools, online and consistent:
  pg_dump --format=custom --file=fleetrun.dump \"$DATABASE_URL\"
and restore into an empty database with the controller stopped:
  pg_restore --clean --if-exists --no-owner --dbname=\"$DATABASE_URL\" fleetrun.dump
Keep the parameter key file (security.param_key_file) with the dump: sealed script parameters
cannot be read without it; and the audit key file (security.audit_key_file): the audit trail
cannot be verified without it. After pg_restore, run `fleetrun-controller --config FILE audit
reanchor` before starting the controller: the audit head anchor still names the end of the trail
before the restore, and the start would record the rewind as entries removed.";

/// Copies `from` to `to` (a new file, 0600) and syncs it.
fn copy_private(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut source =
        std::fs::File::open(from).with_context(|| format!("reading {}", from.display()))?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut source, &mut target).with_context(|| format!("writing {}", to.display()))?;
    target.sync_all()?;
    Ok(())
}

/// Takes a backup of the controller configured by `config_path` into the new directory `dest`;
/// returns a summary for the operator.
pub async fn backup(config_path: &Path, dest: &Path) -> anyhow::Result<String> {
    let config = Config::load(config_path)?;
    let Some(database) = sqlite_file(&config) else {
        return Ok(PG_PROCEDURE.to_owned());
    };
    match std::fs::read_dir(dest) {
        Ok(mut entries) => ensure!(
            entries.next().is_none(),
            "{} exists and is not empty: a backup goes into a new directory",
            dest.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dest)
                .with_context(|| format!("creating {}", dest.display()))?;
        }
        Err(e) => bail!("{}: {e}", dest.display()),
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700))?;

    let mut files = Vec::new();
    let db_copy = dest.join(DATABASE);
    fleetrun_store::backup_database(&database, &db_copy)
        .await
        .with_context(|| format!("copying the database {}", database.display()))?;
    let (sha256, bytes) = sha256_of(&db_copy)?;
    files.push(ManifestFile {
        name: DATABASE.to_owned(),
        role: "database".to_owned(),
        original: database.clone(),
        sha256,
        bytes,
    });
    let mut others = vec![
        ("param.key", "param_key", config.param_key_file()),
        ("audit.key", "audit_key", config.audit_key_file()),
        ("controller.toml", "config", config_path.to_owned()),
        ("tls-ca.pem", "tls_ca", config.tls.ca.clone()),
        ("tls-cert.pem", "tls_cert", config.tls.cert.clone()),
        ("tls-key.pem", "tls_key", config.tls.key.clone()),
    ];
    if let Some(inventory) = &config.inventory {
        others.push(("inventory.toml", "inventory", inventory.clone()));
    }
    if let Some(api_tls) = &config.api.tls {
        others.push(("api-tls-cert.pem", "api_tls_cert", api_tls.cert.clone()));
        others.push(("api-tls-key.pem", "api_tls_key", api_tls.key.clone()));
    }
    // The enrollment CA: without its key, no agent renews and none enrolls.
    if let Some(ca) = config
        .enroll
        .as_ref()
        .and_then(|e| e.ca_files(&config.database).ok())
    {
        others.push(("enroll-ca.pem", "enroll_ca_cert", ca.cert));
        others.push(("enroll-ca.key.pem", "enroll_ca_key", ca.key));
    }
    for (name, role, original) in others {
        if matches!(role, "param_key" | "audit_key") && !original.exists() {
            // No sealed parameter was ever stored: the controller creates the key at start.
            continue;
        }
        let copy = dest.join(name);
        copy_private(&original, &copy)?;
        let (sha256, bytes) = sha256_of(&copy)?;
        files.push(ManifestFile {
            name: name.to_owned(),
            role: role.to_owned(),
            original,
            sha256,
            bytes,
        });
    }
    let manifest = Manifest {
        created_at: crate::now_ms(),
        fleetrun_version: env!("CARGO_PKG_VERSION").to_owned(),
        files,
    };
    let manifest_path = dest.join(MANIFEST);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&manifest_path)
        .and_then(|mut f| {
            use std::io::Write as _;
            f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
            f.sync_all()
        })
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    let total: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    Ok(format!(
        "backup written to {}: {} files, {total} bytes (database {} bytes)",
        dest.display(),
        manifest.files.len() + 1,
        manifest.files[0].bytes
    ))
}

/// Puts the database and the parameter key of the backup in `src` in place for the controller
/// configured by `config_path`, which must be stopped; returns a summary.
pub async fn restore(config_path: &Path, src: &Path) -> anyhow::Result<String> {
    let config = Config::load(config_path)?;
    let Some(database) = sqlite_file(&config) else {
        return Ok(PG_PROCEDURE.to_owned());
    };
    let manifest_path = src.join(MANIFEST);
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{}: not a backup manifest", manifest_path.display()))?;
    for file in &manifest.files {
        ensure!(
            !file.name.contains('/') && !file.name.starts_with('.'),
            "{}: the file name {:?} is not a backup's",
            manifest_path.display(),
            file.name
        );
        let (sha256, _) = sha256_of(&src.join(&file.name))?;
        ensure!(
            sha256 == file.sha256,
            "{}: its SHA-256 is not the one the manifest recorded: the backup is damaged",
            src.join(&file.name).display()
        );
    }
    ensure!(
        manifest.files.iter().any(|f| f.role == "database"),
        "{}: the backup has no database",
        src.display()
    );
    // The controller holds its HTTP address while it runs: replacing its database under it
    // would lose what it writes next and corrupt what it has open.
    if let Err(e) = std::net::TcpListener::bind(config.http_listen)
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        bail!(
            "{} is in use: stop the controller before restoring",
            config.http_listen
        );
    }
    fleetrun_store::restore_database(&src.join(DATABASE), &database)
        .await
        .with_context(|| format!("restoring the database {}", database.display()))?;
    let mut restored = vec![database.display().to_string()];
    for (role, name, key) in [
        ("param_key", "param.key", config.param_key_file()),
        ("audit_key", "audit.key", config.audit_key_file()),
    ] {
        if !manifest.files.iter().any(|f| f.role == role) {
            continue;
        }
        let mut staging = key.as_os_str().to_owned();
        staging.push(".restoring");
        let staging = PathBuf::from(staging);
        let _ = std::fs::remove_file(&staging);
        copy_private(&src.join(name), &staging)?;
        std::fs::rename(&staging, &key)
            .with_context(|| format!("putting {} in place", key.display()))?;
        restored.push(key.display().to_string());
    }
    // The restored trail ends where the backup was taken: the head anchor names that end now,
    // so that the rewind is not mistaken for a cut at the next start.
    crate::audit::reanchor(&config)
        .await
        .context("anchoring the restored audit trail")?;
    Ok(format!(
        "restored {} from the backup of {} (ms since epoch); the configuration, TLS and inventory \
         copies in {} are left for you to compare or put back",
        restored.join(" and "),
        manifest.created_at,
        src.display()
    ))
}
