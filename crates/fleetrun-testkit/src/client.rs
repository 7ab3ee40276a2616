//! A small client of fleetrun's bk-job API, for the demo, tests and benchmarks.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fleetrun_api::{
    StreamEvent,
    job::{BatchLogs, FastExecuteScriptReply, JobInstanceStatus},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// `get_job_instance_status`'s parameters for a job in `scope` (its `bk_scope_type` and
/// `bk_scope_id`, or `bk_biz_id`).
fn status_request(scope: &Value, job_instance_id: i64, with_hosts: bool) -> Value {
    let mut body = scope.clone();
    body["job_instance_id"] = json!(job_instance_id);
    body["return_ip_result"] = json!(with_hosts);
    body
}

/// Calls the API with one app's credentials (ESB style, in the body).
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub base: String,
    pub app_code: String,
    pub app_secret: String,
    pub username: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, app_code: &str, app_secret: &str, username: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            app_code: app_code.to_owned(),
            app_secret: app_secret.to_owned(),
            username: username.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("building an HTTP client"),
        }
    }

    /// The same client over `http`: an HTTPS API whose CA is not the system's, for one.
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// POSTs `body` (plus credentials) to `/api/v3/<api>/` and returns the whole envelope.
    pub async fn call_raw(&self, api: &str, mut body: Value) -> Result<Value> {
        if let Value::Object(map) = &mut body {
            map.entry("bk_app_code")
                .or_insert_with(|| json!(self.app_code));
            map.entry("bk_app_secret")
                .or_insert_with(|| json!(self.app_secret));
            map.entry("bk_username")
                .or_insert_with(|| json!(self.username));
        }
        let url = format!("{}/api/v3/{api}/", self.base);
        let sent = self.http.post(&url).json(&body).send().await;
        envelope(sent, &format!("POST {url}")).await
    }

    /// GETs `/api/v3/<api>/` (or `path` under the base, when `api` starts with `/`) with
    /// `params` (plus credentials) as a query string, as bk-job's GET form carries them: every
    /// value as text, a list as a comma-separated value. Nested objects cannot be sent so.
    pub async fn get_raw(&self, api: &str, params: Value) -> Result<Value> {
        let mut pairs: Vec<(String, String)> = vec![
            ("bk_app_code".into(), self.app_code.clone()),
            ("bk_app_secret".into(), self.app_secret.clone()),
            ("bk_username".into(), self.username.clone()),
        ];
        for (key, value) in params.as_object().into_iter().flatten() {
            let text = match value {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                Value::Object(_) => bail!("{key}: a GET query cannot carry an object"),
                other => other.to_string(),
            };
            pairs.retain(|(k, _)| k != key);
            pairs.push((key.clone(), text));
        }
        let url = if api.starts_with('/') {
            format!("{}{api}", self.base)
        } else {
            format!("{}/api/v3/{api}/", self.base)
        };
        let sent = self.http.get(&url).query(&pairs).send().await;
        envelope(sent, &format!("GET {url}")).await
    }

    /// POSTs a JSON body to `path` under the base (`/api/v4/...`) with the credentials in the
    /// `X-Bkapi-Authorization` header, as the API gateway's clients send them.
    pub async fn post_path_raw(&self, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let auth = json!({"bk_app_code": self.app_code, "bk_app_secret": self.app_secret, "bk_username": self.username});
        let sent = self
            .http
            .post(&url)
            .header("X-Bkapi-Authorization", auth.to_string())
            .json(&body)
            .send()
            .await;
        envelope(sent, &format!("POST {url}")).await
    }

    /// Like [`Self::call_raw`], but an error envelope is an error; returns `data`.
    pub async fn call(&self, api: &str, body: Value) -> Result<Value> {
        let envelope = self.call_raw(api, body).await?;
        if envelope["result"] != json!(true) {
            bail!(
                "{api} failed: code {} {}",
                envelope["code"],
                envelope["message"]
            );
        }
        Ok(envelope["data"].clone())
    }

    /// Like [`Self::call`], with `data` read as `T`.
    pub async fn call_as<T: DeserializeOwned>(&self, api: &str, body: Value) -> Result<T> {
        let data = self.call(api, body).await?;
        serde_json::from_value(data).with_context(|| format!("{api}'s reply"))
    }

    /// Submits a `fast_execute_script` request (plus credentials); returns the accepted job.
    pub async fn submit(&self, request: Value) -> Result<FastExecuteScriptReply> {
        self.call_as("fast_execute_script", request).await
    }

    /// `get_job_instance_status` of a job in `scope`, with each host's result when `with_hosts`.
    pub async fn job_status(
        &self,
        scope: &Value,
        job_instance_id: i64,
        with_hosts: bool,
    ) -> Result<JobInstanceStatus> {
        let body = status_request(scope, job_instance_id, with_hosts);
        self.call_as("get_job_instance_status", body).await
    }

    /// Polls `get_job_instance_status` until the job is finished; returns its data (read as
    /// [`JobInstanceStatus`] on every poll, so a reply that drifts from the shape fails here).
    pub async fn wait_job(
        &self,
        scope: &Value,
        job_instance_id: i64,
        limit: Duration,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        let body = status_request(scope, job_instance_id, true);
        loop {
            let status = self.call("get_job_instance_status", body.clone()).await?;
            let typed: JobInstanceStatus = serde_json::from_value(status.clone())
                .with_context(|| format!("get_job_instance_status's reply: {status}"))?;
            if typed.finished {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("job {job_instance_id} not finished after {limit:?}: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every host's log for a step, by host id.
    pub async fn logs(
        &self,
        scope: &Value,
        job_instance_id: i64,
        step_instance_id: i64,
        hosts: &[i64],
    ) -> Result<Vec<(i64, String)>> {
        let mut body = scope.clone();
        body["job_instance_id"] = json!(job_instance_id);
        body["step_instance_id"] = json!(step_instance_id);
        body["host_id_list"] = json!(hosts);
        let logs: BatchLogs = self.call_as("batch_get_job_instance_ip_log", body).await?;
        Ok(logs
            .script_task_logs
            .into_iter()
            .map(|l| (l.bk_host_id, l.log_content))
            .collect())
    }

    /// The controller's host list (fleetrun extension).
    pub async fn hosts(&self) -> Result<Vec<Value>> {
        Ok(self
            .fleetrun("list_hosts")
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Opens `stream_job` with this client's credentials added to `body`. A refusal (an HTTP
    /// error, or the bk-job envelope sent instead of the stream) is an error with the reply's
    /// code and message.
    async fn open_stream(&self, mut body: Value) -> Result<reqwest::Response> {
        if let Value::Object(map) = &mut body {
            map.insert("bk_app_code".into(), json!(self.app_code));
            map.insert("bk_app_secret".into(), json!(self.app_secret));
            map.insert("bk_username".into(), json!(self.username));
        }
        let url = format!("{}/fleetrun/v1/stream_job", self.base);
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let ndjson = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
        if status.is_success() && ndjson {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let why = match serde_json::from_str::<Value>(&text) {
            Ok(reply) if reply.get("message").is_some() => {
                format!("code {}: {}", reply["code"], reply["message"])
            }
            _ => text,
        };
        bail!("POST {url}: HTTP {status}, no stream: {why}")
    }

    /// Follows a job through `stream_job` until the stream ends (the job finished and all its
    /// output was sent); returns the last event, the job's final one.
    pub async fn follow_job(&self, body: Value) -> Result<Value> {
        let text = self
            .open_stream(body)
            .await?
            .text()
            .await
            .context("stream_job: reading the stream")?;
        let last = text.lines().last().context("empty stream")?;
        let event: Value =
            serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))?;
        let typed: StreamEvent = serde_json::from_value(event.clone())
            .with_context(|| format!("not a stream_job event: {last}"))?;
        if !matches!(typed, StreamEvent::Job { finished: true, .. }) {
            bail!("stream_job ended without the job's end: {last}");
        }
        Ok(event)
    }

    /// Follows a job through `stream_job` until an output event carries `needle`. Returns that
    /// event's text, the wall-clock time it was read (as each chunk of the stream arrives), and
    /// the time the stream's first event was read: output printed before that may have been
    /// replayed from the store rather than followed live.
    pub async fn stream_until_output(&self, body: Value, needle: &str) -> Result<StreamedOutput> {
        let mut response = self.open_stream(body).await?;
        let mut pending = Vec::new();
        let mut first_event_at = None;
        while let Some(chunk) = response
            .chunk()
            .await
            .context("stream_job: reading the stream")?
        {
            let read_at = std::time::SystemTime::now();
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let event: StreamEvent = serde_json::from_slice(&line)
                    .with_context(|| format!("not a stream_job event: {line:?}"))?;
                let first_event_at = *first_event_at.get_or_insert(read_at);
                match event {
                    StreamEvent::Output { data, .. } if data.contains(needle) => {
                        return Ok(StreamedOutput {
                            data,
                            read_at,
                            first_event_at,
                        });
                    }
                    StreamEvent::Job { finished: true, .. } => {
                        bail!("the job finished without output carrying {needle:?}")
                    }
                    _ => {}
                }
            }
        }
        bail!("stream_job ended without output carrying {needle:?}")
    }

    /// Calls one of fleetrun's own APIs (`/fleetrun/v1/<api>`) that take no parameters.
    pub async fn fleetrun(&self, api: &str) -> Result<Value> {
        let url = format!("{}/fleetrun/v1/{api}", self.base);
        let body = json!({"bk_app_code": self.app_code, "bk_app_secret": self.app_secret, "bk_username": self.username});
        let envelope: Value = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        if envelope["result"] != json!(true) {
            bail!("{api} failed: {envelope}");
        }
        Ok(envelope["data"].clone())
    }
}

/// An output event a `stream_job` follower waited for.
#[derive(Debug)]
pub struct StreamedOutput {
    /// The event's text.
    pub data: String,
    /// When it was read.
    pub read_at: std::time::SystemTime,
    /// When the stream's first event was read, the follower attached.
    pub first_event_at: std::time::SystemTime,
}

/// The JSON envelope of the reply to `request` (`POST <url>`, say, which errors name): an error
/// when it was not sent, is not JSON, or came with an HTTP status other than success.
async fn envelope(sent: reqwest::Result<reqwest::Response>, request: &str) -> Result<Value> {
    let response = sent.with_context(|| request.to_owned())?;
    let status = response.status();
    let envelope: Value = response
        .json()
        .await
        .with_context(|| format!("{request}: reply is not JSON"))?;
    if !status.is_success() {
        bail!("{request}: HTTP {status}: {envelope}");
    }
    Ok(envelope)
}
