//! One task stream, answered by the emulated executor: the same frames, in the same order, as
//! `fleetrun-agent`'s `task::serve`, but no process is forked. The "script" exits 0 after
//! `--task-ms`, having printed the configured output.

use std::{
    future::pending,
    sync::{Arc, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use fleetrun_exec::{Language, split_params};
use fleetrun_net::{FramedRecv, StreamError, send_frame};
use fleetrun_proto::{Ending, MAX_OUTPUT_CHUNK, TaskDown, TaskRequest, TaskResult, TaskUp};
use tokio::sync::Semaphore;

use crate::Shared;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn refused(ending: Ending, message: String) -> TaskResult {
    let now = now_ms();
    TaskResult {
        ending,
        started_at_ms: now,
        finished_at_ms: now,
        output_bytes: 0,
        survivors: 0,
        message: Some(message),
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut recv = FramedRecv::new(recv);
    let reading = shared.reading_slots.acquire().await;
    let request = match recv.recv::<TaskDown>().await {
        Ok(Some(TaskDown::Run(mut request))) => {
            // The emulated executor never runs the script: it need not outlive the read.
            request.script = Vec::new();
            request
        }
        // The emulated agent holds no task across connections: nothing to resume or discard;
        // it has no files to write or read either.
        Ok(Some(
            TaskDown::Cancel
            | TaskDown::Resume { .. }
            | TaskDown::Discard { .. }
            | TaskDown::ResultStored
            | TaskDown::Place(_)
            | TaskDown::Collect(_)
            | TaskDown::Fetch(_)
            | TaskDown::Chunk { .. },
        ))
        | Ok(None) => return,
        Err(e) => {
            tracing::warn!("unreadable task request: {e}");
            recv.stop(fleetrun_proto::close_code::PROTOCOL);
            return;
        }
    };
    drop(reading);
    tracing::debug!(task_id = %request.task_id, job = request.job_instance_id, "task received");
    match run(&shared, &slots, &mut send, &mut recv, request).await {
        Ok(()) => {
            shared.stats.tasks.fetch_add(1, Ordering::Relaxed);
            let _ = send.finish();
        }
        Err(e) => tracing::debug!("task stream failed: {e}"),
    }
}

/// Resolves when the task must stop, as the real agent's cancel watcher decides: on a
/// `Cancel`, a second `Run` or a broken stream; never once the controller finished its side.
async fn cancelled(recv: &mut FramedRecv) {
    if let Ok(None) = recv.recv::<TaskDown>().await {
        pending::<()>().await;
    }
}

async fn run(
    shared: &Shared,
    slots: &Arc<Semaphore>,
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
    request: TaskRequest,
) -> Result<(), StreamError> {
    let cancel = cancelled(recv);
    tokio::pin!(cancel);
    // Held for the task's life: the heartbeat's `running_tasks` counts the taken slots.
    let _permit = tokio::select! {
        permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        () = &mut cancel => {
            let result = refused(Ending::Cancelled, "terminated before it started".into());
            return send_frame(send, &TaskUp::Finished(result)).await;
        }
    };
    if let Err(e) = split_params(&request.script_param) {
        let result = refused(Ending::Failed, format!("script_param: {e}"));
        return send_frame(send, &TaskUp::Finished(result)).await;
    }
    if Language::from_code(request.script_language).is_none() {
        let result = refused(
            Ending::Failed,
            format!(
                "script_language {} is unknown to this agent",
                request.script_language
            ),
        );
        return send_frame(send, &TaskUp::Finished(result)).await;
    }
    let started_at_ms = now_ms();
    send_frame(send, &TaskUp::Started { started_at_ms }).await?;

    if !shared.task_time.is_zero() {
        let stopped = tokio::select! {
            () = tokio::time::sleep(shared.task_time) => false,
            () = &mut cancel => true,
        };
        if stopped {
            let result = TaskResult {
                ending: Ending::Cancelled,
                started_at_ms,
                finished_at_ms: now_ms(),
                output_bytes: 0,
                survivors: 0,
                message: None,
            };
            return send_frame(send, &TaskUp::Finished(result)).await;
        }
    }

    // Output as the real executor delivers it: whole when within the limit, else the first half
    // of the limit, one `Truncated`, and the last half. `offset` counts bytes sent.
    let output = shared.output.as_slice();
    let limit = usize::try_from(request.output_limit).unwrap_or(usize::MAX);
    let mut offset = 0u64;
    if output.len() <= limit {
        send_output(send, &mut offset, output).await?;
    } else {
        let head = limit / 2;
        let tail = limit - head;
        let dropped = &output[head..output.len() - tail];
        send_output(send, &mut offset, &output[..head]).await?;
        send_frame(
            send,
            &TaskUp::Truncated {
                dropped_bytes: dropped.len() as u64,
                dropped_lines: dropped.iter().filter(|b| **b == b'\n').count() as u64,
            },
        )
        .await?;
        send_output(send, &mut offset, &output[output.len() - tail..]).await?;
    }
    let result = TaskResult {
        ending: Ending::Exited { code: 0 },
        started_at_ms,
        finished_at_ms: now_ms(),
        output_bytes: output.len() as u64,
        survivors: 0,
        message: None,
    };
    send_frame(send, &TaskUp::Finished(result)).await
}

async fn send_output(
    send: &mut quinn::SendStream,
    offset: &mut u64,
    data: &[u8],
) -> Result<(), StreamError> {
    for chunk in data.chunks(MAX_OUTPUT_CHUNK) {
        let msg = TaskUp::Output {
            offset: *offset,
            data: chunk.to_vec(),
        };
        *offset += chunk.len() as u64;
        send_frame(send, &msg).await?;
    }
    Ok(())
}
