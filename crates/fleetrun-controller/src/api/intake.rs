//! Reading a request: who is calling is settled before its body is buffered.
//!
//! A client that names its app in the request head (the `X-Bkapi-Authorization` header, or the
//! query string) is checked before any of its body is read, so wrong credentials cost one
//! comparison. A client whose credentials are in the body (ESB style) must show them within the
//! first `http_unauthenticated_body_bytes` of it, read within `http_header_timeout_secs`; what
//! such clients hold meanwhile is counted against `http_unauthenticated_total_bytes`, shared by
//! all of them. Only a caller whose credentials check out waits for its turn (at most
//! `http_max_requests` are served at once), then has the rest read, up to [`MAX_BODY`] within
//! `http_body_timeout_secs` of getting it.

use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, Method, StatusCode, header},
};
use http_body_util::BodyExt as _;
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, timeout_at},
};

use super::{
    ApiError,
    auth::{self, Caller},
    error::code,
    params::{MAX_BODY, Params},
};
use crate::{Shared, config::LimitsConfig};

/// What unauthenticated requests may hold, and how many authenticated ones are served at once,
/// for the whole HTTP server.
#[derive(Debug)]
pub struct Gate {
    /// Bytes of body within which credentials must appear.
    prefix_bytes: usize,
    /// One permit per byte held by a request not yet authenticated.
    budget: Arc<Semaphore>,
    /// The permits `budget` was made with.
    budget_bytes: usize,
    /// One permit per authenticated request being served. Taken only once the caller's
    /// credentials have checked out, so that clients without any cannot use them up.
    turns: Arc<Semaphore>,
    head_timeout: Duration,
    body_timeout: Duration,
}

impl Gate {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            prefix_bytes: limits.http_unauthenticated_body_bytes,
            budget: Arc::new(Semaphore::new(
                limits
                    .http_unauthenticated_total_bytes
                    .min(Semaphore::MAX_PERMITS),
            )),
            budget_bytes: limits
                .http_unauthenticated_total_bytes
                .min(Semaphore::MAX_PERMITS),
            turns: Arc::new(Semaphore::new(
                limits.http_max_requests.min(Semaphore::MAX_PERMITS),
            )),
            head_timeout: Duration::from_secs(limits.http_header_timeout_secs),
            body_timeout: Duration::from_secs(limits.http_body_timeout_secs),
        }
    }

    /// How long a body may go without a byte arriving: the whole body's bound, for a request
    /// read whole; between frames, for an upload streamed into the content store.
    pub(super) fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    pub(super) async fn take_turn(&self) -> OwnedSemaphorePermit {
        self.turns
            .clone()
            .acquire_owned()
            .await
            .expect("the turn semaphore is never closed")
    }
}

/// An authenticated request, read.
#[derive(Debug)]
pub struct Admitted {
    pub params: Params,
    pub caller: Caller,
    /// Its turn among the requests served at once, until it is dropped.
    pub turn: OwnedSemaphorePermit,
}

/// What a request holds once its body has been read.
enum Held {
    /// The app was checked before the body was read, and the request has its turn.
    Turn(OwnedSemaphorePermit),
    /// A small body read without credentials, holding its bytes of the budget.
    Budget(OwnedSemaphorePermit),
    Nothing,
}

/// Reads the request's parameters and authenticates its caller, reading no more of the body
/// than the caller is entitled to; waits for the request's turn once it is authenticated.
pub async fn read(
    shared: &Shared,
    gate: &Gate,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
) -> Result<Admitted, ApiError> {
    let started = Instant::now();
    // A GET's body is not read at all: its parameters are in the query.
    let (bytes, held) = if *method == Method::GET {
        (Bytes::new(), Held::Nothing)
    } else {
        read_body(shared, gate, headers, query, body, started).await?
    };
    let params = Params::from_request(method, query, &bytes)?;
    for (key, value) in params.0.iter() {
        if let Some(at) = nul_in(value, key.clone()) {
            return Err(ApiError::invalid(
                &at,
                "contains a NUL character, which no field may hold",
            ));
        }
    }
    let caller = auth::authenticate(&shared.apps.current(), headers, &params)?;
    // The request's span declares these empty: from here on every line of the request names its
    // caller. The operator is the client's text, hence escaped.
    let span = tracing::Span::current();
    span.record("app", tracing::field::display(&caller.app_code));
    span.record(
        "operator",
        tracing::field::display(caller.username.escape_debug()),
    );
    let turn = match held {
        Held::Turn(turn) => turn,
        Held::Budget(bytes) => {
            drop(bytes);
            gate.take_turn().await
        }
        Held::Nothing => gate.take_turn().await,
    };
    Ok(Admitted {
        params,
        caller,
        turn,
    })
}

/// Where in `value` (named `at`) a string holds a NUL: no field may, and PostgreSQL's text
/// columns refuse one, so it is turned away here with the field's name rather than failing deep
/// in the store.
fn nul_in(value: &serde_json::Value, at: String) -> Option<String> {
    match value {
        serde_json::Value::String(text) => text.contains('\0').then_some(at),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in(item, format!("{at}[{i}]"))),
        serde_json::Value::Object(fields) => fields
            .iter()
            .find_map(|(key, item)| nul_in(item, format!("{at}.{key}"))),
        _ => None,
    }
}

async fn read_body(
    shared: &Shared,
    gate: &Gate,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
    started: Instant,
) -> Result<(Bytes, Held), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let capacity = declared.map_or(0, |n| n as usize);
    let mut reader = Reader {
        body,
        chunks: Vec::new(),
        len: 0,
    };
    if let Some((app_code, secret)) = auth::head_credentials(headers, query)? {
        auth::check_app(&shared.apps.current(), &app_code, &secret)?;
        let turn = gate.take_turn().await;
        // The body's time starts once the request is served: waiting for a turn is the
        // server's doing, not the client's.
        reader
            .read_until(
                MAX_BODY,
                Instant::now() + gate.body_timeout,
                gate.body_timeout,
            )
            .await?;
        return Ok((reader.into_bytes(capacity), Held::Turn(turn)));
    }

    // Only the body can tell who is calling: read its start, within the shared budget.
    let head_deadline = started + gate.head_timeout;
    // Reading stops once more than the prefix has come, but the last read may overshoot it by up
    // to one read buffer: the permits cover that too, so the budget bounds what is held.
    let most = gate.prefix_bytes + super::serve::READ_BUFFER_BYTES;
    let wanted = declared
        .map_or(most, |n| (n as usize).min(most))
        .min(gate.budget_bytes);
    let permit = timeout_at(
        head_deadline,
        gate.budget.clone().acquire_many_owned(wanted as u32),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            code::INTERNAL,
            "too many requests without credentials in their head are being read: retry, or send \
             the credentials in the X-Bkapi-Authorization header",
        )
        .with_http_status(StatusCode::SERVICE_UNAVAILABLE)
    })?
    .expect("the budget semaphore is never closed");
    let ended = reader
        .read_until(gate.prefix_bytes, head_deadline, gate.head_timeout)
        .await?;
    if ended {
        // Small enough to be checked whole; its bytes stay counted until it has been.
        return Ok((reader.into_bytes(capacity), Held::Budget(permit)));
    }
    let prefix = reader.prefix(gate.prefix_bytes);
    let (app_code, secret) = credentials_in(&prefix).ok_or_else(|| {
        ApiError::new(
            code::GATEWAY_INVALID_ARGS,
            format!(
                "app authentication failed: for a body larger than {} bytes, bk_app_code and \
                 bk_app_secret must be in the X-Bkapi-Authorization header, the query string, \
                 or the body's first {} bytes",
                gate.prefix_bytes, gate.prefix_bytes
            ),
        )
    })?;
    auth::check_app(&shared.apps.current(), &app_code, &secret)?;
    drop(permit);
    let turn = gate.take_turn().await;
    reader
        .read_until(
            MAX_BODY,
            Instant::now() + gate.body_timeout,
            gate.body_timeout,
        )
        .await?;
    Ok((reader.into_bytes(capacity), Held::Turn(turn)))
}

fn too_large() -> ApiError {
    ApiError::invalid("body", format!("larger than {MAX_BODY} bytes"))
        .with_http_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// The body as read so far.
struct Reader {
    body: Body,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Reader {
    /// Reads until the body ends (true) or more than `limit` bytes have been read (false). More
    /// than [`MAX_BODY`] is refused.
    async fn read_until(
        &mut self,
        limit: usize,
        deadline: Instant,
        allowed: Duration,
    ) -> Result<bool, ApiError> {
        while self.len <= limit {
            let frame = match timeout_at(deadline, self.body.frame()).await {
                Err(_) => {
                    return Err(ApiError::invalid(
                        "body",
                        format!("not received within {} s", allowed.as_secs()),
                    ));
                }
                Ok(None) => return Ok(true),
                Ok(Some(Err(e))) => {
                    return Err(ApiError::invalid("body", format!("not read: {e}")));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                self.len += data.len();
                if self.len > MAX_BODY {
                    return Err(too_large());
                }
                self.chunks.push(data);
            }
        }
        Ok(false)
    }

    /// The first `n` bytes read (fewer if fewer were).
    fn prefix(&self, n: usize) -> Vec<u8> {
        let mut prefix = Vec::with_capacity(n.min(self.len));
        for chunk in &self.chunks {
            let room = n - prefix.len();
            prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if prefix.len() == n {
                break;
            }
        }
        prefix
    }

    fn into_bytes(self, capacity: usize) -> Bytes {
        match <[Bytes; 1]>::try_from(self.chunks) {
            Ok([only]) => only,
            Err(chunks) => {
                let mut all = Vec::with_capacity(capacity.max(self.len));
                for chunk in chunks {
                    all.extend_from_slice(&chunk);
                }
                Bytes::from(all)
            }
        }
    }
}

/// `bk_app_code` and `bk_app_secret` from the start of a JSON object, if both are there before
/// the text ends. Other members are skipped without being kept.
fn credentials_in(prefix: &[u8]) -> Option<(String, String)> {
    let mut found = Found::default();
    // The scan stops with an error once both are found, or where the prefix is cut: either way
    // what was found is what counts.
    let _ = serde_json::Deserializer::from_slice(prefix).deserialize_map(Scan(&mut found));
    found.app_code.zip(found.secret)
}

#[derive(Default)]
struct Found {
    app_code: Option<String>,
    secret: Option<String>,
}

struct Scan<'a>(&'a mut Found);

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "bk_app_code" => &mut self.0.app_code,
                "bk_app_secret" => &mut self.0.secret,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            // The first occurrence counts; a later one is checked again with the whole body.
            let value = map.next_value::<Option<String>>()?;
            if slot.is_none() {
                *slot = value;
            }
            if self.0.app_code.is_some() && self.0.secret.is_some() {
                return Err(serde::de::Error::custom("credentials found"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::credentials_in;

    fn found(text: &str) -> Option<(String, String)> {
        credentials_in(text.as_bytes())
    }

    #[test]
    fn credentials_are_found_at_the_start_of_a_cut_body() {
        let full = r#"{"bk_app_code": "a", "x": [1, {"y": "z"}], "bk_app_secret": "s", "script_content": "AAAA"#;
        assert_eq!(found(full), Some(("a".into(), "s".into())));
        assert_eq!(
            found(r#"{"bk_app_secret":"s","bk_app_code":"a"}"#),
            Some(("a".into(), "s".into()))
        );
    }

    #[test]
    fn credentials_after_the_cut_or_outside_an_object_are_not_found() {
        assert_eq!(found(r#"{"script_content": "AAAA"#), None);
        assert_eq!(found(r#"{"bk_app_code": "a", "bk_app_sec"#), None);
        assert_eq!(found(r#"{"bk_app_code": "a", "bk_app_secret": "s"#), None);
        assert_eq!(
            found(r#"[{"bk_app_code": "a", "bk_app_secret": "s"}]"#),
            None
        );
        assert_eq!(found(r#"{"bk_app_code": 1, "bk_app_secret": "s"}"#), None);
        assert_eq!(found(""), None);
        assert_eq!(
            found(r#"{"nested": {"bk_app_code": "a", "bk_app_secret": "s"}}"#),
            None
        );
    }
}
