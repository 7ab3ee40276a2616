//! Sign-in sessions: random tokens in `HttpOnly; SameSite=Strict` cookies, each with its own
//! CSRF token, ended by logout, by `session_secs` after sign-in or by `idle_secs` unused.
//!
//! Sessions live in the controller's memory: a restart signs everyone out, which for a console
//! of a handful of operators costs one sign-in and saves a table of bearer secrets.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

/// The cookie holding the session token.
pub const SESSION_COOKIE: &str = "fleetrun_session";
/// The cookie holding the sign-in form's CSRF token (double submit: there is no session yet).
pub const LOGIN_COOKIE: &str = "fleetrun_login";
/// Sessions held at once; past it the oldest is dropped, so a flood of sign-ins cannot grow
/// memory without bound.
const MAX_SESSIONS: usize = 10_000;

/// A signed-in user's session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    /// Sent back in every form; a POST without it is refused.
    pub csrf: String,
    started: Instant,
    last_used: Instant,
}

/// The sessions of the console.
#[derive(Debug)]
pub struct Sessions {
    by_token: Mutex<HashMap<String, Session>>,
    lifetime: Duration,
    idle: Duration,
}

/// Failed sign-ins a user name may have within [`FAILURE_WINDOW`] before it is refused
/// until the window has passed: a password is not guessed at the speed of the network.
pub const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(300);
/// User names whose failures are remembered at once.
const MAX_REMEMBERED: usize = 10_000;

/// Failed sign-ins per user name.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Throttle {
    /// Counts a sign-in attempt for `name` as a failure before its password is checked (a
    /// success then clears it with [`Throttle::succeeded`]), so guesses sent side by side are
    /// counted as they arrive, not once each has been verified; `Err(wait)` when `name` has
    /// failed too often lately, and the attempt is not made.
    pub fn attempt(&self, name: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap();
        if let Some(&(count, first)) = failures.get(name) {
            let age = now.duration_since(first);
            if count >= MAX_FAILURES && age < FAILURE_WINDOW {
                return Err(FAILURE_WINDOW - age);
            }
        }
        if failures.len() >= MAX_REMEMBERED {
            failures.retain(|_, (_, first)| now.duration_since(*first) < FAILURE_WINDOW);
        }
        if failures.len() >= MAX_REMEMBERED && !failures.contains_key(name) {
            // Full of fresh entries: a flood of made-up names. Forget the oldest.
            if let Some(oldest) = failures
                .iter()
                .min_by_key(|(_, (_, first))| *first)
                .map(|(n, _)| n.clone())
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(name.to_owned()).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        Ok(())
    }

    pub fn succeeded(&self, name: &str) {
        self.failures.lock().unwrap().remove(name);
    }
}

/// 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether two tokens are equal, in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    pub fn new(lifetime: Duration, idle: Duration) -> Self {
        Self {
            by_token: Mutex::new(HashMap::new()),
            lifetime,
            idle,
        }
    }

    /// Starts a session for `user`; returns its token.
    pub fn start(&self, user: &str) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut sessions = self.by_token.lock().unwrap();
        self.expire(&mut sessions, now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(t, _)| t.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            token.clone(),
            Session {
                user: user.to_owned(),
                csrf: random_token(),
                started: now,
                last_used: now,
            },
        );
        token
    }

    /// The live session with this token, marked used.
    pub fn touch(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = self.by_token.lock().unwrap();
        let session = sessions.get_mut(token)?;
        if self.expired(session, now) {
            sessions.remove(token);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    pub fn end(&self, token: &str) {
        self.by_token.lock().unwrap().remove(token);
    }

    /// Ends every session of `user` (its account was removed from the configuration).
    pub fn end_user(&self, user: &str) {
        self.by_token.lock().unwrap().retain(|_, s| s.user != user);
    }

    fn expired(&self, session: &Session, now: Instant) -> bool {
        now.duration_since(session.started) >= self.lifetime
            || now.duration_since(session.last_used) >= self.idle
    }

    fn expire(&self, sessions: &mut HashMap<String, Session>, now: Instant) {
        sessions.retain(|_, s| !self.expired(s, now));
    }
}

/// The value of cookie `name` in the request, if it sent one.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for the console's paths.
pub fn set_cookie(name: &str, value: &str, max_age_secs: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{name}={value}; Path=/console; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{secure}"
    )
}

/// Checks a password against an argon2 PHC string.
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::PasswordVerifier as _;
    let Ok(parsed) = argon2::PasswordHash::new(hash) else {
        return false;
    };
    argon2::Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// An argon2id PHC string for `password`, with a random salt.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    let salt = SaltString::encode_b64(&bytes).expect("16 bytes make a valid salt");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// A valid hash of no one's password: checked when the user is unknown, so that how long a
/// refusal takes does not tell which user names exist.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password(&random_token()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_at_logout_and_when_idle_or_old() {
        let sessions = Sessions::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let token = sessions.start("alice");
        let session = sessions.touch(&token).unwrap();
        assert_eq!(session.user, "alice");
        assert_ne!(session.csrf, token);
        assert!(sessions.touch("forged").is_none());
        sessions.end(&token);
        assert!(sessions.touch(&token).is_none());

        let short = Sessions::new(Duration::from_secs(3600), Duration::ZERO);
        let token = short.start("bob");
        assert!(short.touch(&token).is_none(), "idle at once");
        let short = Sessions::new(Duration::ZERO, Duration::from_secs(3600));
        let token = short.start("bob");
        assert!(short.touch(&token).is_none(), "past its lifetime");
    }

    #[test]
    fn a_name_that_failed_too_often_is_refused_until_it_succeeds_or_waits() {
        let throttle = Throttle::default();
        for _ in 0..MAX_FAILURES {
            assert!(throttle.attempt("alice").is_ok());
        }
        let wait = throttle.attempt("alice").unwrap_err();
        assert!(
            wait > Duration::from_secs(290) && wait <= FAILURE_WINDOW,
            "{wait:?}"
        );
        assert!(
            throttle.attempt("bob").is_ok(),
            "other names are not affected"
        );
        throttle.succeeded("alice");
        assert!(throttle.attempt("alice").is_ok());
    }

    #[test]
    fn passwords_check_against_their_hash_only() {
        let hash = hash_password("correct horse");
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsE"));
        assert!(!verify_password("not a hash", "correct horse"));
        assert!(!verify_password(decoy_hash(), ""));
    }

    #[test]
    fn cookies_are_read_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; fleetrun_session_x=2; fleetrun_session=3"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("3"));
        assert_eq!(cookie(&headers, "b"), None);
        assert!(!same_token("", ""));
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
    }
}
