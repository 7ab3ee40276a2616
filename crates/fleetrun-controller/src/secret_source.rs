//! Secrets named in the configuration but kept out of its text: in an environment variable
//! (`<key>_env = "NAME"`) or a file (`<key>_file = "/path"`) that only the controller's user may
//! read.
//!
//! A secret file readable by its group or by others is refused rather than used: a key that other
//! accounts on the host can read is no longer secret, and saying so at start beats finding out
//! after a leak.

use std::{os::unix::fs::PermissionsExt, path::Path};

/// Where one secret comes from, as the configuration says it.
#[derive(Debug, Clone, Copy)]
pub struct SecretSource<'a> {
    /// The key the text would be under (`bk_app_secret`), named in errors.
    pub key: &'a str,
    pub text: Option<&'a str>,
    pub env: Option<&'a str>,
    pub file: Option<&'a Path>,
}

impl SecretSource<'_> {
    /// The secret, `None` when no source is given; an error naming the key when more than one
    /// is, or when the one given cannot be used.
    pub fn resolve(&self) -> Result<Option<String>, String> {
        let key = self.key;
        let given = [self.text.is_some(), self.env.is_some(), self.file.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(format!(
                "{key}: give one of {key}, {key}_env and {key}_file, not several"
            ));
        }
        if let Some(text) = self.text {
            return Ok(Some(text.to_owned()));
        }
        if let Some(name) = self.env {
            return match std::env::var(name) {
                Ok(value) if !value.is_empty() => Ok(Some(value)),
                Ok(_) => Err(format!("{key}_env: the variable {name} is empty")),
                Err(std::env::VarError::NotPresent) => {
                    Err(format!("{key}_env: the variable {name} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("{key}_env: the variable {name} is not UTF-8"))
                }
            };
        }
        if let Some(path) = self.file {
            return read_secret_file(path)
                .map(Some)
                .map_err(|e| format!("{key}_file: {}: {e}", path.display()));
        }
        Ok(None)
    }
}

/// Reads a secret file: owner-only permissions, UTF-8, not empty once the final newline is
/// dropped.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "readable by its group or others (mode {mode:03o}); make it 0600 or 0400"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err("empty".to_owned());
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(mode: u32, text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    fn source<'a>(file: &'a Path) -> SecretSource<'a> {
        SecretSource {
            key: "bk_app_secret",
            text: None,
            env: None,
            file: Some(file),
        }
    }

    #[test]
    fn an_owner_only_file_gives_its_text_without_the_newline() {
        let file = file_with(0o600, "s3cret\n");
        assert_eq!(source(file.path()).resolve().unwrap().unwrap(), "s3cret");
        let file = file_with(0o400, "s3cret");
        assert_eq!(source(file.path()).resolve().unwrap().unwrap(), "s3cret");
    }

    #[test]
    fn a_file_others_can_read_is_refused_naming_key_and_mode() {
        for mode in [0o640, 0o604, 0o644, 0o660] {
            let file = file_with(mode, "s3cret\n");
            let error = source(file.path()).resolve().unwrap_err();
            assert!(error.starts_with("bk_app_secret_file: "), "{error}");
            assert!(error.contains(&format!("mode {mode:03o}")), "{error}");
        }
    }

    #[test]
    fn empty_missing_and_doubled_sources_are_refused() {
        let file = file_with(0o600, "\n");
        assert!(
            source(file.path())
                .resolve()
                .unwrap_err()
                .ends_with("empty")
        );
        let missing = Path::new("/nonexistent/fleetrun-secret");
        assert!(source(missing).resolve().is_err());
        let both = SecretSource {
            text: Some("x"),
            ..source(file.path())
        };
        assert!(both.resolve().unwrap_err().contains("not several"));
        let unset = SecretSource {
            key: "callback_secret",
            text: None,
            env: Some("FLEETRUN_TEST_SURELY_UNSET_VARIABLE"),
            file: None,
        };
        assert_eq!(
            unset.resolve().unwrap_err(),
            "callback_secret_env: the variable FLEETRUN_TEST_SURELY_UNSET_VARIABLE is not set"
        );
    }
}
