//! Sensitive script parameters, encrypted at rest with AES-256-GCM.
//!
//! A sealed value is `enc:v2:` followed by base64 of nonce and ciphertext (with its tag). The key
//! lives in a file outside the database, so a copy of the database alone reveals nothing. The
//! associated data names the job and step the parameter belongs to, so a sealed value copied into
//! another step's row (by someone who can write the database but not read the key) does not open
//! there: it cannot make another job run with this job's secret.
//!
//! Values sealed before steps were bound (`enc:v1:`, with a constant associated data) still open,
//! for any step: they were accepted and must still run.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

/// Values bound to their step.
const PREFIX: &str = "enc:v2:";
/// Values sealed before steps were bound, with [`V1_AAD`].
const V1_PREFIX: &str = "enc:v1:";
/// The associated data of `enc:v1:` values: the purpose only, the same for every step.
const V1_AAD: &[u8] = b"fleetrun script_param";

/// The associated data of an `enc:v2:` value: its purpose and the step it belongs to.
fn step_aad(job_instance_id: i64, step_instance_id: i64) -> Vec<u8> {
    format!("fleetrun/param/v2|job:{job_instance_id}|step:{step_instance_id}").into_bytes()
}

/// Encrypting or decrypting a parameter failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key file could not be read or created.
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// A sealed value is damaged or was sealed with another key.
    #[error("sealed parameter cannot be opened: {0}")]
    Open(&'static str),
}

pub struct ParamCipher {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for ParamCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParamCipher")
    }
}

fn decode_key(path: &Path, encoded: &str) -> Result<UnboundKey, SecretError> {
    let fail = |reason: &str| SecretError::KeyFile {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let key = STANDARD
        .decode(encoded.trim())
        .map_err(|_| fail("not base64"))?;
    UnboundKey::new(&AES_256_GCM, &key).map_err(|_| fail("not a 32-byte key"))
}

impl ParamCipher {
    /// Loads the key from `path`, creating the file (0600) with a random key if it is missing.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        let fail = |reason: String| SecretError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let rng = SystemRandom::new();
        let encoded = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rng.fill(&mut key)
                    .map_err(|_| fail("no randomness".into()))?;
                let encoded = STANDARD.encode(key);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| fail(e.to_string()))?;
                file.write_all(encoded.as_bytes())
                    .map_err(|e| fail(e.to_string()))?;
                tracing::info!(path = %path.display(), "created a new key for sensitive parameters");
                encoded
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        Ok(Self {
            key: LessSafeKey::new(decode_key(path, &encoded)?),
            rng,
        })
    }

    /// What [`Self::load_or_create`] would refuse in the file at `path`, without creating it
    /// (a missing file is created at start, so it is no problem).
    pub fn check(path: &Path) -> Result<(), SecretError> {
        match std::fs::read_to_string(path) {
            Ok(encoded) => decode_key(path, &encoded).map(drop),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SecretError::KeyFile {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Seals the parameter of step `step_instance_id` of job `job_instance_id`; it opens only
    /// for that step.
    pub fn seal(&self, plain: &str, job_instance_id: i64, step_instance_id: i64) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system's randomness is available");
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(step_aad(job_instance_id, step_instance_id)),
                &mut data,
            )
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    /// Seals a parameter once its job and step are stored: what
    /// [`fleetrun_store::Store::create_job_sealing`] needs.
    pub fn sealer(&self) -> impl FnOnce(&str, fleetrun_store::CreatedJob) -> String + Send + '_ {
        |plain, step| self.seal(plain, step.job_instance_id, step.step_instance_id)
    }

    /// Opens the sealed parameter stored for step `step_instance_id` of job `job_instance_id`.
    pub fn open(
        &self,
        sealed: &str,
        job_instance_id: i64,
        step_instance_id: i64,
    ) -> Result<String, SecretError> {
        let (encoded, aad) = if let Some(encoded) = sealed.strip_prefix(PREFIX) {
            (encoded, step_aad(job_instance_id, step_instance_id))
        } else if let Some(encoded) = sealed.strip_prefix(V1_PREFIX) {
            (encoded, V1_AAD.to_vec())
        } else {
            return Err(SecretError::Open("not sealed"));
        };
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::Open("not base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Open("too short"));
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Open("bad nonce"))?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut data)
            .map_err(|_| SecretError::Open("wrong key, another step's value, or damaged"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Open("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test's key file, removed when dropped.
    struct KeyDir(PathBuf);

    impl KeyDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("fleetrun-secrets-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn key(&self) -> PathBuf {
            self.0.join("param.key")
        }
    }

    impl Drop for KeyDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn seals_opens_and_refuses_tampering() {
        let dir = KeyDir::new("tamper");
        let cipher = ParamCipher::load_or_create(&dir.key()).unwrap();
        let sealed = cipher.seal("s3cr3t 'x'", 7, 8);
        assert!(sealed.starts_with("enc:v2:"), "{sealed}");
        assert!(!sealed.contains("s3cr3t"));
        assert_ne!(
            sealed,
            cipher.seal("s3cr3t 'x'", 7, 8),
            "a fresh nonce every time"
        );
        // The same file gives the same key after a restart.
        let again = ParamCipher::load_or_create(&dir.key()).unwrap();
        assert_eq!(again.open(&sealed, 7, 8).unwrap(), "s3cr3t 'x'");
        let mut bytes = STANDARD.decode(&sealed[PREFIX.len()..]).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        let tampered = format!("{PREFIX}{}", STANDARD.encode(bytes));
        assert!(cipher.open(&tampered, 7, 8).is_err());
    }

    #[test]
    fn a_value_sealed_for_one_step_does_not_open_for_another() {
        let dir = KeyDir::new("bound");
        let cipher = ParamCipher::load_or_create(&dir.key()).unwrap();
        let sealed = cipher.seal("the secret of step 8", 7, 8);
        for (job, step) in [(7, 9), (6, 8), (8, 7), (78, 8), (7, 88)] {
            assert!(
                cipher.open(&sealed, job, step).is_err(),
                "opened as job {job} step {step}"
            );
        }
        // Nor by relabelling it as a value of the old, unbound format.
        let relabelled = sealed.replacen(PREFIX, V1_PREFIX, 1);
        assert!(cipher.open(&relabelled, 7, 8).is_err());
        assert_eq!(cipher.open(&sealed, 7, 8).unwrap(), "the secret of step 8");
    }

    #[test]
    fn a_value_sealed_before_steps_were_bound_still_opens() {
        let dir = KeyDir::new("v1");
        let path = dir.key();
        std::fs::write(&path, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
        let cipher = ParamCipher::load_or_create(&path).unwrap();
        // Sealed in the previous format with the key above by another AES-GCM implementation
        // (Python's `cryptography`): nonce 0..12, associated data "fleetrun script_param".
        let old = "enc:v1:AAECAwQFBgcICQoLKG6yO7bWoWm+NUcbx+nZuKf41K3bARDiEvg=";
        for (job, step) in [(1, 1), (7, 8)] {
            assert_eq!(
                cipher.open(old, job, step).unwrap(),
                "old s3cr3t",
                "{job}/{step}"
            );
        }
        assert!(
            cipher
                .open(&old.replacen(V1_PREFIX, PREFIX, 1), 1, 1)
                .is_err()
        );
        assert!(
            cipher.open("s3cr3t", 1, 1).is_err(),
            "a clear value is not sealed"
        );
    }
}
