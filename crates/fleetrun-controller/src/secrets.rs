//! Sensitive script parameters, encrypted at rest with AES-256-GCM.
//!
//! A sealed value is `enc:v1:` followed by base64 of nonce and ciphertext (with its tag). The key
//! lives in a file outside the database, so a copy of the database alone reveals nothing.

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

const PREFIX: &str = "enc:v1:";
/// Binds ciphertexts to their purpose, so a sealed value cannot be replayed elsewhere.
const AAD: &[u8] = b"fleetrun script_param";

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
        let key = STANDARD
            .decode(encoded.trim())
            .map_err(|_| fail("not base64".into()))?;
        let key =
            UnboundKey::new(&AES_256_GCM, &key).map_err(|_| fail("not a 32-byte key".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    pub fn seal(&self, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system's randomness is available");
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut data,
            )
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    pub fn open(&self, sealed: &str) -> Result<String, SecretError> {
        let encoded = sealed
            .strip_prefix(PREFIX)
            .ok_or(SecretError::Open("not sealed"))?;
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
            .open_in_place(nonce, Aad::from(AAD), &mut data)
            .map_err(|_| SecretError::Open("wrong key or damaged"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Open("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_tampering() {
        let dir = std::env::temp_dir().join(format!("fleetrun-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("param.key");
        let _ = std::fs::remove_file(&path);
        let cipher = ParamCipher::load_or_create(&path).unwrap();
        let sealed = cipher.seal("s3cr3t 'x'");
        assert!(!sealed.contains("s3cr3t"));
        assert_ne!(
            sealed,
            cipher.seal("s3cr3t 'x'"),
            "a fresh nonce every time"
        );
        // The same file gives the same key after a restart.
        let again = ParamCipher::load_or_create(&path).unwrap();
        assert_eq!(again.open(&sealed).unwrap(), "s3cr3t 'x'");
        let mut bytes = STANDARD.decode(&sealed[PREFIX.len()..]).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        let tampered = format!("{PREFIX}{}", STANDARD.encode(bytes));
        assert!(cipher.open(&tampered).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
