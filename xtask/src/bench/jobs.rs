//! Submitting jobs through the bk-job API and timing them from the client's side.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use fleetrun_testkit::{client::ApiClient, cluster::ClusterInfo};
use serde_json::{Value, json};

use super::sys::unix_ms;

/// The API as the benchmarks use it: one app, one scope, one account.
#[derive(Debug, Clone)]
pub struct Api {
    pub client: ApiClient,
    scope: Value,
    account: String,
}

/// One job, timed from the client's side.
#[derive(Debug, Clone)]
pub struct Timed {
    pub job: i64,
    pub step: i64,
    /// Unix ms just before the request was sent.
    pub submitted_ms: i64,
    /// From sending the request to its reply (the API's accept).
    pub accept: Duration,
    /// From the reply to the first poll that saw the job finished.
    pub to_final: Duration,
}

impl Timed {
    pub fn total(&self) -> Duration {
        self.accept + self.to_final
    }
}

/// Where the time of one job went, in ms from its submission, from the controller's own
/// timestamps (job, step and per-host times; one clock, this machine's).
#[derive(Debug, Clone, Default)]
pub struct Stages {
    /// The handler took its `create_time` (request read, authenticated, targets resolved).
    pub resolved: f64,
    /// The reply arrived (job stored: `create_job`).
    pub accepted: f64,
    /// First and last host reported `Started` (the task reached the agent).
    pub first_started: f64,
    pub last_started: f64,
    /// Last host finished (agent's clock).
    pub last_finished: f64,
    /// The engine stamped the job's end (every host's run over, its writes queued).
    pub job_end: f64,
    /// The client saw the job finished (final writes committed).
    pub seen_final: f64,
    /// Hosts whose status is not 9 (success).
    pub failed_hosts: usize,
}

impl Api {
    pub fn new(info: &ClusterInfo) -> Self {
        Self {
            client: info.client(),
            scope: info.scope(),
            account: info
                .accounts
                .first()
                .map(|a| a.alias.clone())
                .unwrap_or_else(|| "root".into()),
        }
    }

    pub fn body(&self, fields: Value) -> Value {
        let mut body = self.scope.clone();
        if let (Value::Object(b), Value::Object(f)) = (&mut body, fields) {
            b.extend(f);
        }
        body
    }

    /// Submits `script` to `hosts`; returns (job, step).
    pub async fn submit(&self, hosts: &[i64], script: &str, name: &str) -> Result<(i64, i64)> {
        let body = self.body(json!({
            "task_name": name,
            "script_language": 1,
            "script_content": base64::engine::general_purpose::STANDARD.encode(script),
            "account_alias": self.account,
            "timeout": 600,
            "target_server": {"host_id_list": hosts},
        }));
        let data = self.client.call("fast_execute_script", body).await?;
        Ok((
            data["job_instance_id"]
                .as_i64()
                .context("no job_instance_id")?,
            data["step_instance_id"]
                .as_i64()
                .context("no step_instance_id")?,
        ))
    }

    pub async fn status(&self, job: i64, ip_result: bool) -> Result<Value> {
        let body = self.body(json!({"job_instance_id": job, "return_ip_result": ip_result}));
        self.client.call("get_job_instance_status", body).await
    }

    /// Polls the job's status (without host results) every `poll` until it is finished.
    pub async fn wait_final(&self, job: i64, poll: Duration, limit: Duration) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(job, false).await?;
            if status["finished"] == json!(true) {
                return Ok(Instant::now());
            }
            ensure!(
                Instant::now() < deadline,
                "job {job} not finished after {limit:?}"
            );
            tokio::time::sleep(poll).await;
        }
    }

    /// Submits one job and follows it to its end through `stream_job` (no polling).
    pub async fn run_streamed(&self, hosts: &[i64], script: &str) -> Result<Timed> {
        let submitted_ms = unix_ms();
        let sent = Instant::now();
        let (job, step) = self.submit(hosts, script, "fleetrun bench").await?;
        let accepted = Instant::now();
        self.client
            .follow_job(self.body(json!({"job_instance_id": job})))
            .await?;
        Ok(Timed {
            job,
            step,
            submitted_ms,
            accept: accepted - sent,
            to_final: accepted.elapsed(),
        })
    }

    /// Submits and follows one job to its end.
    pub async fn run_timed(
        &self,
        hosts: &[i64],
        script: &str,
        poll: Duration,
        limit: Duration,
    ) -> Result<Timed> {
        let submitted_ms = unix_ms();
        let sent = Instant::now();
        let (job, step) = self.submit(hosts, script, "fleetrun bench").await?;
        let accepted = Instant::now();
        let finished = self.wait_final(job, poll, limit).await?;
        Ok(Timed {
            job,
            step,
            submitted_ms,
            accept: accepted - sent,
            to_final: finished - accepted,
        })
    }

    /// The job's stages from its stored timestamps; also counts hosts that did not succeed.
    pub async fn stages(&self, timed: &Timed) -> Result<Stages> {
        let status = self.status(timed.job, true).await?;
        let at = |v: &Value| v.as_i64().map(|t| (t - timed.submitted_ms) as f64);
        let job = &status["job_instance"];
        let step = &status["step_instance_list"][0];
        let hosts = step["step_ip_result_list"]
            .as_array()
            .context("no host results")?;
        let starts: Vec<f64> = hosts.iter().filter_map(|h| at(&h["start_time"])).collect();
        let ends: Vec<f64> = hosts.iter().filter_map(|h| at(&h["end_time"])).collect();
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Ok(Stages {
            resolved: at(&job["create_time"]).unwrap_or(f64::NAN),
            accepted: timed.accept.as_secs_f64() * 1e3,
            first_started: min(&starts),
            last_started: max(&starts),
            last_finished: max(&ends),
            job_end: at(&job["end_time"]).unwrap_or(f64::NAN),
            seen_final: timed.total().as_secs_f64() * 1e3,
            failed_hosts: hosts.iter().filter(|h| h["status"] != json!(9)).count(),
        })
    }

    /// Follows the job through `stream_job` until a host's output carries `needle`; returns
    /// that output's text, when it was read and when the stream's first event was.
    pub async fn stream_output(
        &self,
        job: i64,
        needle: &str,
    ) -> Result<fleetrun_testkit::client::StreamedOutput> {
        self.client
            .stream_until_output(self.body(json!({"job_instance_id": job})), needle)
            .await
    }

    /// The log of one host, as `batch_get_job_instance_ip_log` returns it.
    pub async fn log(&self, job: i64, step: i64, host: i64) -> Result<String> {
        let body = self.body(json!({
            "job_instance_id": job,
            "step_instance_id": step,
            "host_id_list": [host],
        }));
        let data = self
            .client
            .call("batch_get_job_instance_ip_log", body)
            .await?;
        Ok(data["script_task_logs"][0]["log_content"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The hosts online now whose agent id starts with `prefix`, by agent id.
    pub async fn online_hosts(&self, prefix: &str) -> Result<Vec<(String, i64)>> {
        let hosts = self.client.hosts().await?;
        let mut found: Vec<(String, i64)> = hosts
            .iter()
            .filter(|h| h["online"] == json!(true))
            .filter_map(|h| {
                let id = h["agent_id"].as_str()?;
                id.starts_with(prefix)
                    .then(|| (id.to_owned(), h["bk_host_id"].as_i64().unwrap_or(0)))
            })
            .collect();
        found.sort_by_key(|(id, _)| {
            (
                id.trim_start_matches(prefix)
                    .parse::<u64>()
                    .unwrap_or(u64::MAX),
                id.clone(),
            )
        });
        if found.is_empty() {
            bail!("no online host named {prefix}*");
        }
        Ok(found)
    }

    /// The first `count` hosts named `prefix*`, by index, once that many are online.
    pub async fn wait_online(
        &self,
        prefix: &str,
        count: usize,
        limit: Duration,
    ) -> Result<Vec<i64>> {
        let deadline = Instant::now() + limit;
        loop {
            let hosts: Vec<i64> = self
                .online_hosts(prefix)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|(_, id)| id)
                .take(count)
                .collect();
            if hosts.len() >= count {
                return Ok(hosts);
            }
            ensure!(
                Instant::now() < deadline,
                "only {} of {count} hosts named {prefix}* online after {limit:?}",
                hosts.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Single-host jobs per second over `window`: `in_flight` clients, each submitting jobs to
    /// one of `hosts` (in turn) and following each to its end through `stream_job`. One job
    /// first, so that connections and caches are warm.
    pub async fn single_host_rate(
        &self,
        hosts: &[i64],
        in_flight: usize,
        window: Duration,
    ) -> Result<f64> {
        let (jobs, took) = self.single_host_jobs(hosts, in_flight, window).await?;
        Ok(jobs as f64 / took.as_secs_f64())
    }

    /// As [`Self::single_host_rate`]: the jobs run to their end within about `window` (after
    /// one to warm up, not counted) and the time they took.
    pub async fn single_host_jobs(
        &self,
        hosts: &[i64],
        in_flight: usize,
        window: Duration,
    ) -> Result<(u64, Duration)> {
        ensure!(!hosts.is_empty(), "no host to run jobs on");
        self.run_streamed(&hosts[..1], "echo ok\n").await?;
        let started = Instant::now();
        let deadline = started + window;
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..in_flight {
            let api = self.clone();
            let host = hosts[w % hosts.len()];
            workers.spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    api.run_streamed(&[host], "echo ok\n").await?;
                    done += 1;
                }
                anyhow::Ok(done)
            });
        }
        let mut jobs = 0;
        while let Some(joined) = workers.join_next().await {
            jobs += joined??;
        }
        Ok((jobs, started.elapsed()))
    }
}

/// The `p`-quantile (0..=1) by nearest rank.
pub fn quantile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0, 7.0, 6.0];
        assert_eq!(median(&v), 4.0);
        assert_eq!(quantile(&v, 0.99), 7.0);
        assert_eq!(quantile(&[1.0], 0.5), 1.0);
    }
}
