//! The controller's HTTP API: bk-job's envelope, API gateway credentials, and the stream.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::{
    bytes::BytesMut,
    codec::{Decoder, LinesCodec, LinesCodecError},
};

use crate::{error::CliError, settings::Settings};

/// Calls the controller with the app's credentials in the `X-Bkapi-Authorization` header, so
/// they never appear in a URL.
#[derive(Debug, Clone)]
pub struct Client {
    settings: Settings,
    verbose: bool,
    http: reqwest::Client,
}

/// A stream of events from `stream_job`, read line by line.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    buffer: BytesMut,
    lines: LinesCodec,
}

/// A line longer than this is not one of ours.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// The stream pings every 10 s; this much silence means the connection is gone.
const STREAM_SILENCE: Duration = Duration::from_secs(35);

impl Client {
    pub fn new(settings: Settings, verbose: bool) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError::usage(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            settings,
            verbose,
            http,
        })
    }

    pub fn verbose(&self) -> bool {
        self.verbose
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The request fields naming the scope; a usage error when none is configured.
    pub fn scoped(&self, mut body: Value) -> Result<Value, CliError> {
        let (kind, id) = self.settings.scope()?;
        body["bk_scope_type"] = json!(kind);
        body["bk_scope_id"] = json!(id);
        Ok(body)
    }

    fn url(&self, api: &str) -> String {
        if matches!(
            api,
            "list_hosts"
                | "stream_job"
                | "get_topology"
                | "reload_inventory"
                | "get_inventory"
                | "get_inventory_history"
                | "replace_inventory"
                | "change_inventory"
        ) {
            format!("{}/fleetrun/v1/{api}", self.settings.url)
        } else {
            format!("{}/api/v3/{api}/", self.settings.url)
        }
    }

    fn post(&self, api: &str, body: &Value) -> reqwest::RequestBuilder {
        let url = self.url(api);
        if self.verbose {
            eprintln!(
                "> POST {} (app {}, user {})",
                redact_url(&url),
                self.settings.app_code,
                self.settings.username
            );
        }
        let credentials = json!({
            "bk_app_code": self.settings.app_code,
            "bk_app_secret": self.settings.app_secret,
            "bk_username": self.settings.username,
        });
        self.http
            .post(url)
            .header("X-Bkapi-Authorization", credentials.to_string())
            .json(body)
    }

    /// PUTs `body` to one of the controller's own paths (`/fleetrun/v1/...`) with the app's
    /// credentials; returns the envelope's `data`.
    pub async fn put(&self, path: &str, body: reqwest::Body) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.settings.url);
        if self.verbose {
            eprintln!("> PUT {}", redact_url(&url));
        }
        let credentials = json!({
            "bk_app_code": self.settings.app_code,
            "bk_app_secret": self.settings.app_secret,
            "bk_username": self.settings.username,
        });
        let response = self
            .http
            .put(url)
            .header("X-Bkapi-Authorization", credentials.to_string())
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
        self.open_envelope("local_file_upload", status, &bytes)
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> CliError {
        CliError::Unreachable {
            url: redact_url(&self.settings.url),
            why: why.to_string(),
        }
    }

    /// Calls one API and returns its `data`; an error envelope is [`CliError::Refused`].
    pub async fn call(&self, api: &str, body: Value) -> Result<Value, CliError> {
        let response = self
            .post(api, &body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
        self.open_envelope(api, status, &bytes)
    }

    fn open_envelope(
        &self,
        api: &str,
        status: reqwest::StatusCode,
        bytes: &[u8],
    ) -> Result<Value, CliError> {
        let envelope: Value = serde_json::from_slice(bytes)
            .ok()
            .filter(|v: &Value| {
                v.get("result").is_some_and(Value::is_boolean) && v.get("code").is_some()
            })
            .ok_or_else(|| {
                self.unreachable(format!(
                    "HTTP {status} without a bk-job envelope (is this a fleetrun controller?)"
                ))
            })?;
        if self.verbose {
            eprintln!(
                "< {api}: code {} request_id {}",
                envelope["code"],
                envelope["request_id"].as_str().unwrap_or("-")
            );
        }
        if envelope["result"] == json!(true) {
            return Ok(envelope["data"].clone());
        }
        Err(CliError::Refused {
            api: api.to_owned(),
            code: envelope["code"].as_i64().unwrap_or(-1),
            message: envelope["message"].as_str().unwrap_or("").to_owned(),
        })
    }

    /// Opens `stream_job`. Refusals before the stream starts arrive as an envelope.
    pub async fn stream(&self, body: Value) -> Result<EventStream, CliError> {
        let response = self
            .post("stream_job", &body)
            .send()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-ndjson"));
        if response.status().is_success() && is_stream {
            return Ok(EventStream {
                response,
                buffer: BytesMut::new(),
                lines: LinesCodec::new_with_max_length(MAX_LINE),
            });
        }
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
        self.open_envelope("stream_job", status, &bytes)?;
        Err(self.unreachable("stream_job answered without a stream"))
    }
}

impl EventStream {
    /// The next event; `Ok(None)` when the server ended the stream, `Err` when the connection
    /// broke or went silent (the caller reconnects).
    pub async fn next(&mut self) -> Result<Option<Value>, String> {
        loop {
            match self.lines.decode(&mut self.buffer) {
                Ok(Some(line)) if line.trim().is_empty() => continue,
                Ok(Some(line)) => {
                    return serde_json::from_str(&line)
                        .map(Some)
                        .map_err(|e| format!("a stream line is not JSON: {e}"));
                }
                Ok(None) => {}
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    return Err(format!("a stream line is longer than {MAX_LINE} bytes"));
                }
                Err(LinesCodecError::Io(e)) => {
                    return Err(format!("a stream line is not JSON: {e}"));
                }
            }
            match tokio::time::timeout(STREAM_SILENCE, self.response.chunk()).await {
                Err(_) => return Err(format!("no data for {}s", STREAM_SILENCE.as_secs())),
                Ok(Err(e)) => return Err(describe(&e)),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(bytes))) => self.buffer.extend_from_slice(&bytes),
            }
        }
    }
}

/// A reqwest error without its URL (which `redact_url` prints instead): what failed, and the
/// innermost cause, which is the one that says why ("Connection refused").
fn describe(error: &reqwest::Error) -> String {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_decode() || error.is_body() {
        "broken reply"
    } else {
        "request failed"
    };
    let mut innermost = None;
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        innermost = Some(cause.to_string());
        source = cause.source();
    }
    match innermost {
        Some(cause) => format!("{what}: {cause}"),
        None => what.to_owned(),
    }
}

/// The URL without user information or query, which may carry secrets.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.split(['?', '#']).next().unwrap_or("").to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("https://u:pw@ctl:8080/x?token=1"),
            "https://ctl:8080/x"
        );
        assert_eq!(redact_url("http://ctl"), "http://ctl");
    }
}
