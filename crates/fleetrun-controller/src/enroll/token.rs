//! Join tokens: `frt-<id>-<secret>`. The id names the token in lists and revocations; the
//! controller keeps only the SHA-256 of the whole text, so a database that leaks gives no token.

use ring::rand::SecureRandom as _;

/// What every token starts with, so that one pasted in the wrong place is recognised.
pub const PREFIX: &str = "frt-";
/// Hex digits of the id and of the secret.
const ID_DIGITS: usize = 12;
const SECRET_DIGITS: usize = 32;

/// `N` bytes from the system's random source.
pub fn random<const N: usize>() -> Result<[u8; N], ring::error::Unspecified> {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(bytes)
}

/// A token just made: the text (shown once), its id, and the digest kept.
#[derive(Clone)]
pub struct NewToken {
    pub text: String,
    pub token_id: String,
    pub sha256: String,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

pub fn generate() -> Result<NewToken, ring::error::Unspecified> {
    let id = fleetrun_net::hex(&random::<{ ID_DIGITS / 2 }>()?);
    let secret = fleetrun_net::hex(&random::<{ SECRET_DIGITS / 2 }>()?);
    let text = format!("{PREFIX}{id}-{secret}");
    Ok(NewToken {
        sha256: digest(&text),
        token_id: id,
        text,
    })
}

/// Hex SHA-256 of a token's text.
pub fn digest(text: &str) -> String {
    fleetrun_net::hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// A token as an agent presented it: its id and digest, or why it is not a token.
pub fn parse(text: &str) -> Result<(String, String), String> {
    let malformed = || {
        "the join token is malformed: copy it whole, as `fleetrun tokens create` printed it \
         (frt- followed by 12 and 32 hex digits)"
            .to_owned()
    };
    let rest = text.strip_prefix(PREFIX).ok_or_else(malformed)?;
    let (id, secret) = rest.split_once('-').ok_or_else(malformed)?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, ID_DIGITS) || !hex(secret, SECRET_DIGITS) {
        return Err(malformed());
    }
    Ok((id.to_ascii_lowercase(), digest(&text.to_ascii_lowercase())))
}

/// Whether a presented digest is the stored one, in constant time.
pub fn matches(stored: &str, presented: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    stored.as_bytes().ct_eq(presented.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_parses_to_its_id_and_digest_and_nothing_else_does() {
        let token = generate().unwrap();
        assert!(token.text.starts_with("frt-"));
        assert_eq!(
            parse(&token.text).unwrap(),
            (token.token_id.clone(), token.sha256.clone())
        );
        assert!(matches(&token.sha256, &digest(&token.text)));
        assert!(!matches(&token.sha256, &digest("frt-other")));
        assert!(!format!("{token:?}").contains(&token.text));
        let secret = token.text.rsplit('-').next().unwrap();
        for bad in [
            "",
            "frt-",
            secret,
            &token.text[..token.text.len() - 1],
            &format!("{}0", token.text),
            &token.text.replace("frt-", "frx-"),
            &format!("frt-{}-{}", "zz".repeat(6), "00".repeat(16)),
        ] {
            assert!(parse(bad).unwrap_err().contains("malformed"), "{bad}");
        }
        assert_ne!(generate().unwrap().text, token.text);
    }
}
