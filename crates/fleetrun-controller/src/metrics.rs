//! `/metrics`: the controller's state and activity in Prometheus' text format.
//!
//! Activity (requests, dispatches, finished hosts and jobs, commits, callbacks, output) is counted
//! through the `metrics` facade where it happens, one call each, and rendered by
//! `metrics-exporter-prometheus`; no listener of its own, `/metrics` is served by the API's
//! server. What the database holds (jobs by status, agents by state and version) and the store's
//! backlog are read when scraped, so they are never stale and cost nothing between scrapes.
//!
//! Access: `/metrics` is served only when the configuration has a `[metrics]` section, and asks
//! for `Authorization: Bearer <token>` with its `bearer_token` (or `_env`, `_file`), compared in
//! constant time. docs/metrics.md lists every series.

use std::{fmt::Write as _, sync::Arc, sync::OnceLock, time::Duration};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use subtle::ConstantTimeEq;

use fleetrun_api::{HostStatus, JobStatus};

use crate::Shared;

/// Bucket bounds (seconds) for the latency histograms: from a millisecond to ten minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// The process's recorder: the `metrics` facade has one per process, so controllers started in
/// one process (tests) share it.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed before the controller's");
        }
        describe();
        handle
    })
}

/// Installs the recorder (once per process) so that counts start with the controller.
pub fn install() {
    handle();
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "fleetrun_http_requests_total",
        "API requests answered, by API name and bk-job code (0 for success)"
    );
    describe_histogram!(
        "fleetrun_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an API request, by API name"
    );
    describe_histogram!(
        "fleetrun_dispatch_seconds",
        Unit::Seconds,
        "From a host's task being started by the engine to its request being written to the agent"
    );
    describe_histogram!(
        "fleetrun_job_duration_seconds",
        Unit::Seconds,
        "End to end: from a job's start to its final status, by final status"
    );
    describe_counter!(
        "fleetrun_jobs_finished_total",
        "Jobs that reached a final status since the controller started, by status"
    );
    describe_counter!(
        "fleetrun_host_results_total",
        "Hosts that reached a final status since the controller started, by status"
    );
    describe_counter!(
        "fleetrun_output_bytes_total",
        "Bytes of host output queued for the store"
    );
    describe_histogram!(
        "fleetrun_store_commit_seconds",
        Unit::Seconds,
        "Time of one group commit of the store's writer"
    );
    describe_counter!(
        "fleetrun_callback_attempts_total",
        "Job callback delivery attempts, by outcome (delivered, retry, failed)"
    );
    describe_counter!(
        "fleetrun_audit_entries_total",
        "Entries appended to the audit log, by outcome (ok, refused)"
    );
    describe_histogram!(
        "fleetrun_audit_append_seconds",
        Unit::Seconds,
        "Time of one group commit of the store's writer that appended audit entries (its job \
         writes included)"
    );
    describe_counter!(
        "fleetrun_retention_pruned_jobs_total",
        "Finished jobs removed by retention"
    );
}

/// The name a bk-job job status goes by in labels.
pub fn job_status_name(status: i32) -> &'static str {
    match JobStatus::from_code(status) {
        JobStatus::Pending => "pending",
        JobStatus::Running => "running",
        JobStatus::Success => "success",
        JobStatus::Failed => "failed",
        JobStatus::Terminated => "terminated",
        JobStatus::Abnormal => "abnormal",
        JobStatus::Terminating => "terminating",
        JobStatus::TerminateSuccess => "terminate_success",
        _ => "other",
    }
}

/// The name a bk-job host status goes by in labels.
pub fn host_status_name(status: i32) -> &'static str {
    match HostStatus::from_code(status) {
        HostStatus::Waiting => "waiting",
        HostStatus::Running => "running",
        HostStatus::Success => "success",
        HostStatus::ScriptFailed => "script_failed",
        HostStatus::ScriptTimeout => "script_timeout",
        HostStatus::NonZeroExit => "non_zero_exit",
        HostStatus::AgentTimeout => "agent_timeout",
        HostStatus::AgentAbnormal => "agent_abnormal",
        HostStatus::UserNotExist => "user_not_exist",
        HostStatus::AgentTaskError => "agent_task_error",
        HostStatus::TerminateSuccess => "terminate_success",
        HostStatus::FileTimeout => "file_timeout",
        HostStatus::FileTaskError => "file_task_error",
        _ => "other",
    }
}

/// An API request answered; `api` is one of the router's names or `unknown`, never the
/// client's text.
pub fn api_request(api: &'static str, code: i64, elapsed: Duration) {
    metrics::counter!("fleetrun_http_requests_total", "api" => api, "code" => code.to_string())
        .increment(1);
    metrics::histogram!("fleetrun_http_request_duration_seconds", "api" => api).record(elapsed);
}

/// A host's task reached its final status.
pub fn host_finished(status: i32) {
    metrics::counter!("fleetrun_host_results_total", "status" => host_status_name(status))
        .increment(1);
}

/// A job reached its final status after `elapsed_ms` since it started.
pub fn job_finished(status: i32, elapsed_ms: i64) {
    let status = job_status_name(status);
    metrics::counter!("fleetrun_jobs_finished_total", "status" => status).increment(1);
    metrics::histogram!("fleetrun_job_duration_seconds", "status" => status)
        .record(elapsed_ms.max(0) as f64 / 1000.0);
}

/// `/metrics`: 404 unless configured, 401 without the bearer token.
pub async fn serve_metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let Some(token) = shared.config.metrics.as_ref().map(|m| &m.bearer_token) else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required\n",
        )
            .into_response();
    }
    match render(&shared).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("cannot read the store for /metrics: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be read now\n",
            )
                .into_response()
        }
    }
}

/// The exporter's series followed by those read now.
pub async fn render(shared: &Shared) -> Result<String, fleetrun_store::StoreError> {
    let mut text = handle().render();
    let jobs = shared.store.job_counts_by_status().await?;
    let agents = shared.store.agent_counts().await?;
    let health = shared.store.health();

    gauge_header(&mut text, "fleetrun_jobs", "Jobs in the database by status");
    let mut by_status = std::collections::BTreeMap::<&str, i64>::new();
    for (status, count) in jobs {
        *by_status.entry(job_status_name(status)).or_default() += count;
    }
    for (status, count) in by_status {
        let _ = writeln!(text, "fleetrun_jobs{{status=\"{status}\"}} {count}");
    }

    gauge_header(
        &mut text,
        "fleetrun_agents",
        "Registered hosts by agent connection state and version",
    );
    for agent in agents {
        let state = if agent.online {
            "connected"
        } else {
            "disconnected"
        };
        let _ = writeln!(
            text,
            "fleetrun_agents{{state=\"{state}\",version=\"{}\"}} {}",
            escape_label(&agent.agent_version),
            agent.count
        );
    }
    gauge_header(
        &mut text,
        "fleetrun_agent_links",
        "Agent connections open now",
    );
    let _ = writeln!(text, "fleetrun_agent_links {}", shared.agents.count());

    gauge_header(
        &mut text,
        "fleetrun_store_queue_depth",
        "Engine writes accepted and not committed yet",
    );
    let _ = writeln!(text, "fleetrun_store_queue_depth {}", health.pending);
    gauge_header(
        &mut text,
        "fleetrun_store_queue_output_bytes",
        "Bytes of host output among the writes not committed yet",
    );
    let _ = writeln!(
        text,
        "fleetrun_store_queue_output_bytes {}",
        health.pending_output_bytes
    );
    gauge_header(
        &mut text,
        "fleetrun_store_writable",
        "1 while the database takes writes, 0 while it refuses them",
    );
    let _ = writeln!(
        text,
        "fleetrun_store_writable {}",
        u8::from(health.is_writable())
    );
    let _ = writeln!(
        text,
        "# HELP fleetrun_store_lost_writes_total Engine writes and audit entries given up: the \
         database refused writes past the backlog's bound, or refused the write itself\n\
         # TYPE fleetrun_store_lost_writes_total counter\n\
         fleetrun_store_lost_writes_total {}",
        health.lost
    );
    Ok(text)
}

fn gauge_header(text: &mut String, name: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_from_agents_cannot_break_the_format() {
        assert_eq!(escape_label("1.0\"} 9\nx"), "1.0\\\"} 9\\nx");
        assert_eq!(escape_label("a\\b"), "a\\\\b");
    }

    #[test]
    fn every_named_status_has_a_label() {
        for s in [1, 2, 3, 4, 8, 9, 10, 11] {
            assert_ne!(job_status_name(s), "other", "{s}");
        }
        assert_eq!(job_status_name(12345), "other");
        assert_eq!(host_status_name(9), "success");
    }
}
