//! Follows a job through `stream_job` until its final event, reconnecting from the byte offsets
//! already received when the connection breaks, so nothing is printed twice.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use serde_json::{Value, json};

use crate::{
    client::Client,
    error::CliError,
    view::{Change, JobView},
};

/// Consecutive failed connections before giving up (about a minute of backoff).
const MAX_FAILURES: usize = 15;

/// The waits after consecutive failed connections: 0.4 s, 0.8 s, … at most 5 s, then none left.
fn retry_delays() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(400))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_max_times(MAX_FAILURES)
        .build()
}

/// Called for every event with the view already updated.
pub type OnEvent<'a> = dyn FnMut(&JobView, &Value, &Change) -> Result<(), CliError> + 'a;

/// Streams the job into `view` until the job's final event. `hosts` limits the stream to those
/// hosts (all when empty).
pub async fn follow(
    client: &Client,
    view: &mut JobView,
    hosts: &[i64],
    on_event: &mut OnEvent<'_>,
) -> Result<(), CliError> {
    let mut delays = retry_delays();
    let mut connected = false;
    loop {
        let mut body = client.scoped(json!({ "job_instance_id": view.job_instance_id }))?;
        if !hosts.is_empty() {
            body["host_id_list"] = json!(hosts);
        }
        if let Some(step) = view.step_instance_id {
            body["step_instance_id"] = json!(step);
        }
        let offsets = view.offsets();
        if !offsets.is_empty() {
            body["offsets"] = json!(offsets);
        }
        let why = match client.stream(body).await {
            // A controller that was there a moment ago (it accepted the job, or streamed) may be
            // restarting: keep trying for a while. One never reached is an error at once.
            Err(e @ CliError::Unreachable { .. }) if !connected => return Err(e),
            Err(CliError::Unreachable { why, .. }) => why,
            Err(e) => return Err(e),
            Ok(mut stream) => {
                connected = true;
                loop {
                    match stream.next().await {
                        Ok(Some(event)) => {
                            if event["type"] == "error" {
                                break event["message"].as_str().unwrap_or("error").to_owned();
                            }
                            let change = view.apply(&event);
                            if matches!(change, Change::Output(..) | Change::Job) {
                                delays = retry_delays();
                            }
                            on_event(view, &event, &change)?;
                            if view.finished {
                                return Ok(());
                            }
                        }
                        Ok(None) => break "the stream ended early".to_owned(),
                        Err(why) => break why,
                    }
                }
            }
        };
        let Some(backoff) = delays.next() else {
            return Err(CliError::Unreachable {
                url: crate::client::redact_url(&client.settings().url),
                why: format!(
                    "lost the stream of job {} ({why}); it keeps running: fleetrun logs {} --follow",
                    view.job_instance_id, view.job_instance_id
                ),
            });
        };
        if client.verbose() {
            eprintln!("stream interrupted ({why}); reconnecting in {backoff:?}");
        }
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_up_to_five_seconds_then_give_up() {
        let waits: Vec<u64> = retry_delays().map(|d| d.as_millis() as u64).collect();
        assert_eq!(
            waits,
            [
                400, 800, 1600, 3200, 5000, 5000, 5000, 5000, 5000, 5000, 5000, 5000, 5000, 5000,
                5000
            ]
        );
    }
}
