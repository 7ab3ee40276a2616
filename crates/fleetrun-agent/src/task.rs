//! One task stream: receive the request, run it, stream the output, report the result.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fleetrun_exec::{Language, OutputEvent, Task, split_params};
use fleetrun_net::{FramedRecv, StreamError, send_frame};
use fleetrun_proto::{Ending, MAX_OUTPUT_CHUNK, TaskDown, TaskRequest, TaskResult, TaskUp};
use tokio_util::sync::CancellationToken;

use crate::AgentContext;

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) async fn serve(
    ctx: Arc<AgentContext>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    cancel: CancellationToken,
) {
    let mut recv = FramedRecv::new(recv);
    let request = match recv.recv::<TaskDown>().await {
        Ok(Some(TaskDown::Run(request))) => request,
        Ok(Some(TaskDown::Cancel)) | Ok(None) => return,
        Err(e) => {
            tracing::warn!("unreadable task request: {e}");
            recv.stop(fleetrun_proto::close_code::PROTOCOL);
            return;
        }
    };
    let task_id = request.task_id;
    let span = tracing::info_span!("task", %task_id, job = request.job_instance_id, step = request.step_instance_id);
    let _entered = span.enter();
    // The parameter is logged only when the job did not mark it sensitive.
    if request.is_param_sensitive {
        tracing::info!(
            account = request.account,
            language = request.script_language,
            "task received (parameter sensitive)"
        );
    } else {
        tracing::info!(
            account = request.account,
            language = request.script_language,
            param = request.script_param,
            "task received"
        );
    }
    drop(_entered);

    // The controller may cancel the task at any time, also while it waits for a slot.
    let watcher = tokio::spawn(watch_for_cancel(recv, cancel.clone()));
    let result = run(&ctx, &mut send, request, &cancel).await;
    watcher.abort();
    match result {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => tracing::warn!(%task_id, "task stream failed: {e}"),
    }
}

async fn watch_for_cancel(mut recv: FramedRecv, cancel: CancellationToken) {
    match recv.recv::<TaskDown>().await {
        Ok(Some(TaskDown::Cancel)) => {
            tracing::info!("the controller cancelled the task");
            cancel.cancel();
        }
        // The controller finished its side: nothing more will come.
        Ok(None) => {}
        Ok(Some(TaskDown::Run(_))) | Err(_) => cancel.cancel(),
    }
}

fn refused(ending: Ending, message: String) -> TaskResult {
    let now = ms(SystemTime::now());
    TaskResult {
        ending,
        started_at_ms: now,
        finished_at_ms: now,
        output_bytes: 0,
        survivors: 0,
        message: Some(message),
    }
}

async fn run(
    ctx: &AgentContext,
    send: &mut quinn::SendStream,
    request: TaskRequest,
    cancel: &CancellationToken,
) -> Result<(), StreamError> {
    let permit = tokio::select! {
        permit = ctx.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        () = cancel.cancelled() => {
            let result = refused(Ending::Cancelled, "terminated before it started".into());
            return send_frame(send, &TaskUp::Finished(result)).await;
        }
    };
    let args = match split_params(&request.script_param) {
        Ok(args) => args,
        Err(e) => {
            let result = refused(Ending::Failed, format!("script_param: {e}"));
            return send_frame(send, &TaskUp::Finished(result)).await;
        }
    };
    let Some(language) = Language::from_code(request.script_language) else {
        let result = refused(
            Ending::Failed,
            format!(
                "script_language {} is unknown to this agent",
                request.script_language
            ),
        );
        return send_frame(send, &TaskUp::Finished(result)).await;
    };
    let task = Task {
        id: request.task_id.to_string(),
        language,
        script: request.script,
        args,
        sensitive_args: request.is_param_sensitive,
        account: request.account,
        timeout: Duration::from_secs(u64::from(request.timeout_secs)),
        output_limit: usize::try_from(request.output_limit).unwrap_or(usize::MAX),
        windows_interpreter: request.windows_interpreter,
    };
    let mut running = ctx.executor.start(task, cancel.clone());
    send_frame(
        send,
        &TaskUp::Started {
            started_at_ms: ms(SystemTime::now()),
        },
    )
    .await?;

    let mut offset = 0u64;
    let mut stream_error = None;
    while let Some(event) = running.output.next().await {
        if stream_error.is_some() {
            // Keep draining so the task finishes; nobody can receive the output any more.
            continue;
        }
        let sent = match event {
            OutputEvent::Data(data) => {
                let mut sent = Ok(());
                for chunk in data.chunks(MAX_OUTPUT_CHUNK) {
                    let msg = TaskUp::Output {
                        offset,
                        data: chunk.to_vec(),
                    };
                    offset += chunk.len() as u64;
                    sent = send_frame(send, &msg).await;
                    if sent.is_err() {
                        break;
                    }
                }
                sent
            }
            OutputEvent::Truncated {
                dropped_bytes,
                dropped_lines,
            } => {
                send_frame(
                    send,
                    &TaskUp::Truncated {
                        dropped_bytes,
                        dropped_lines,
                    },
                )
                .await
            }
        };
        if let Err(e) = sent {
            // The controller is gone: stop the script rather than let it run unobserved.
            cancel.cancel();
            stream_error = Some(e);
        }
    }
    let outcome = match running.outcome.await {
        Ok(outcome) => outcome,
        Err(e) => {
            let result = refused(
                Ending::Failed,
                format!("the agent lost track of the task: {e}"),
            );
            return send_frame(send, &TaskUp::Finished(result)).await;
        }
    };
    drop(permit);
    if let Some(e) = stream_error {
        return Err(e);
    }
    let message = outcome.log_line();
    let ending = match outcome.ending {
        fleetrun_exec::Ending::Exited(code) => Ending::Exited { code },
        fleetrun_exec::Ending::Signaled { signal, .. } => Ending::Signaled { signal },
        fleetrun_exec::Ending::TimedOut => Ending::TimedOut,
        fleetrun_exec::Ending::Cancelled => Ending::Cancelled,
        fleetrun_exec::Ending::UserNotFound(_) => Ending::UserNotFound,
        fleetrun_exec::Ending::InterpreterMissing(_) => Ending::InterpreterMissing,
        fleetrun_exec::Ending::Failed(_) => Ending::Failed,
    };
    tracing::info!(task_id = %request.task_id, ?ending, survivors = outcome.survivors, "task finished");
    let result = TaskResult {
        ending,
        started_at_ms: ms(outcome.started_at),
        finished_at_ms: ms(outcome.finished_at),
        output_bytes: outcome.output_bytes,
        survivors: outcome.survivors,
        message,
    };
    send_frame(send, &TaskUp::Finished(result)).await
}
