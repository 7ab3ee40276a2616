//! File tasks (protocol version 4): a [`TaskDown::Place`] stream writes files as an account.
//!
//! Unlike a script, a file task is not held across connections: the placement runs while its
//! stream lives, each file is reported as it ends ([`TaskUp::FilePlaced`]), then the result.
//! Every file lands by an atomic rename of a verified temporary file (`fleetrun_exec::place`),
//! so a cut connection leaves each file either whole under its final name or not there at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetrun_exec::place::{
    self, Content, FileToPlace, PlaceEnding, PlaceError, PlacedFile, Placement, Pull,
};
use fleetrun_net::{FramedRecv, send_frame};
use fleetrun_proto::{Ending, FileEnding, FileReport, PlaceRequest, TaskDown, TaskResult, TaskUp};
use tokio::sync::mpsc;

use crate::AgentContext;

pub(crate) fn ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn ending(ending: PlaceEnding) -> FileEnding {
    match ending {
        PlaceEnding::Placed => FileEnding::Placed,
        PlaceEnding::Denied => FileEnding::Denied,
        PlaceEnding::NoSpace => FileEnding::NoSpace,
        PlaceEnding::BadPath => FileEnding::BadPath,
        PlaceEnding::HashMismatch => FileEnding::HashMismatch,
        PlaceEnding::Skipped => FileEnding::Skipped,
        PlaceEnding::Failed => FileEnding::Failed,
    }
}

/// Why a request is refused before anything is written.
fn refusal(ctx: &AgentContext, request: &PlaceRequest) -> Option<String> {
    if let Some(allowed) = &ctx.config.limits.accounts
        && !allowed.contains(&request.account)
    {
        return Some(format!(
            "refused by this host's local limits: account {:?} is not allowed here; the agent \
             runs tasks only as {} (limits.accounts)",
            request.account,
            allowed.join(", ")
        ));
    }
    if !place::valid_target_dir(&request.target_dir) {
        return Some(format!(
            "the target directory {:?} is not an absolute path without . or ..",
            request.target_dir
        ));
    }
    None
}

/// Serves one file task on its stream, to the end.
pub(crate) async fn serve(
    ctx: Arc<AgentContext>,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    request: PlaceRequest,
) {
    // The stream is read by a task of its own: a frame read is not cancellation-safe, so it is
    // never raced against the placement's reports. It ends with the stream.
    let (down_tx, mut downs) = mpsc::unbounded_channel::<TaskDown>();
    tokio::spawn(async move {
        while let Ok(Some(down)) = recv.recv::<TaskDown>().await {
            if down_tx.send(down).is_err() {
                return;
            }
        }
    });
    let started = SystemTime::now();
    tracing::info!(
        job = request.job_instance_id,
        step = request.step_instance_id,
        files = request.files.len(),
        dir = request.target_dir,
        "file task"
    );
    let started_at_ms = ms(started);
    if send_frame(&mut send, &TaskUp::Started { started_at_ms })
        .await
        .is_err()
    {
        return;
    }
    let result = match refusal(&ctx, &request) {
        Some(reason) => TaskResult {
            ending: Ending::Failed,
            started_at_ms,
            finished_at_ms: ms(SystemTime::now()),
            output_bytes: 0,
            survivors: 0,
            message: Some(reason),
        },
        None => run(&ctx, &mut send, &mut downs, request, started_at_ms).await,
    };
    let task_result = TaskUp::Finished(result);
    if send_frame(&mut send, &task_result).await.is_err() {
        return;
    }
    // The controller acknowledges once it stored the result; nothing is held meanwhile.
    let _ = tokio::time::timeout(Duration::from_secs(30), downs.recv()).await;
    let _ = send.finish();
}

async fn run(
    ctx: &AgentContext,
    send: &mut quinn::SendStream,
    downs: &mut mpsc::UnboundedReceiver<TaskDown>,
    request: PlaceRequest,
    started_at_ms: i64,
) -> TaskResult {
    let PlaceRequest {
        account,
        target_dir,
        strict,
        timeout_secs,
        files,
        ..
    } = request;
    let placement = Placement {
        // Its own name for the temporary files: the request is shared by every host and step.
        task_tag: uuid::Uuid::new_v4().simple().to_string(),
        resume_tag: None,
        account,
        target_dir: target_dir.into(),
        strict,
        files: files
            .into_iter()
            .map(|f| FileToPlace {
                name: f.name,
                dir: None,
                mode: f.mode,
                sha256: f.sha256,
                content: Content::Inline(Arc::new(f.content)),
            })
            .collect(),
        refuse_root: ctx.config.limits.root_refusal(),
    };
    run_placement(
        ctx,
        send,
        downs,
        placement,
        None,
        timeout_secs,
        started_at_ms,
    )
    .await
}

/// Where a placement's pulled files come from: the chunks the stream brings, and the wants
/// the loop sends up.
pub(crate) struct Pulling {
    pub pull: Box<dyn Pull>,
    /// [`TaskUp::Want`] or [`TaskUp::WantFrom`], sent as they come.
    pub wants: mpsc::UnboundedReceiver<TaskUp>,
}

/// Runs a placement on a blocking thread, reporting each file on the stream as it ends.
pub(crate) async fn run_placement(
    ctx: &AgentContext,
    send: &mut quinn::SendStream,
    downs: &mut mpsc::UnboundedReceiver<TaskDown>,
    placement: Placement,
    pulling: Option<Pulling>,
    timeout_secs: u32,
    started_at_ms: i64,
) -> TaskResult {
    let count = placement.files.len();
    let deadline = tokio::time::sleep(Duration::from_secs(u64::from(timeout_secs.max(1))));
    tokio::pin!(deadline);
    // A file task is a task: it waits for one of the host's `max_concurrent_tasks` slots, its
    // timeout and a cancel counting meanwhile.
    let permit = loop {
        let not_placed =
            |why: &str| format!("{why} before a task slot was free: 0 of {count} files placed");
        tokio::select! {
            permit = ctx.slots.clone().acquire_owned() => {
                break permit.expect("the semaphore is never closed");
            }
            () = &mut deadline => {
                return ended(Ending::TimedOut, started_at_ms, not_placed(&format!("timed out after {timeout_secs} s")));
            }
            down = downs.recv() => match down {
                Some(TaskDown::Cancel) | None => {
                    return ended(Ending::Cancelled, started_at_ms, not_placed("cancelled"));
                }
                Some(_) => {}
            },
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel::<PlacedFile>();
    let (pull, mut wants) = match pulling {
        Some(Pulling { pull, wants }) => (Some(pull), Some(wants)),
        None => (None, None),
    };
    let worker = {
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            place::place_pulling(placement, pull, cancel, move |file| {
                let _ = tx.send(file);
            })
        })
    };
    let mut timed_out = false;
    let mut cancelled = false;
    let mut placed = 0usize;
    let mut failed = 0usize;
    let mut bytes = 0u64;
    let mut listening = true;
    loop {
        tokio::select! {
            file = rx.recv() => {
                let Some(file) = file else { break };
                if file.ending == PlaceEnding::Placed {
                    placed += 1;
                } else {
                    failed += 1;
                }
                bytes = bytes.saturating_add(file.bytes);
                let report = FileReport {
                    index: u32::try_from(file.index).unwrap_or(u32::MAX),
                    ending: ending(file.ending),
                    bytes: file.bytes,
                    started_at_ms: ms(file.started),
                    finished_at_ms: ms(file.finished),
                    message: file.message,
                };
                if send_frame(send, &TaskUp::FilePlaced(report)).await.is_err() {
                    // Nobody listens any more: stop writing what nobody will hear of.
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            want = async { wants.as_mut().expect("guarded").recv().await }, if wants.is_some() => {
                match want {
                    Some(want) => {
                        if send_frame(send, &want).await.is_err() {
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    None => wants = None,
                }
            }
            () = &mut deadline, if !timed_out => {
                timed_out = true;
                cancel.store(true, Ordering::Relaxed);
            }
            down = downs.recv(), if listening => match down {
                Some(TaskDown::Cancel) => {
                    cancelled = true;
                    cancel.store(true, Ordering::Relaxed);
                }
                Some(_) => {}
                None => {
                    listening = false;
                    cancel.store(true, Ordering::Relaxed);
                }
            },
        }
    }
    let outcome = worker
        .await
        .unwrap_or_else(|e| Err(PlaceError::Thread(e.to_string())));
    let finished_at_ms = ms(SystemTime::now());
    let (ending, message) = match outcome {
        Err(PlaceError::UserNotFound(name)) => (
            Ending::UserNotFound,
            format!("the account {name} does not exist on this host"),
        ),
        Err(e) => (Ending::Failed, e.to_string()),
        Ok(()) if timed_out => (
            Ending::TimedOut,
            format!("timed out after {timeout_secs} s: {placed} of {count} files placed"),
        ),
        Ok(()) if cancelled => (
            Ending::Cancelled,
            format!("cancelled: {placed} of {count} files placed"),
        ),
        Ok(()) => (
            Ending::Exited {
                code: i32::from(failed > 0),
            },
            format!("{placed} of {count} files placed, {bytes} bytes"),
        ),
    };
    TaskResult {
        ending,
        started_at_ms,
        finished_at_ms,
        output_bytes: 0,
        survivors: 0,
        message: Some(message),
    }
}

/// A result with nothing placed.
pub(crate) fn ended(ending: Ending, started_at_ms: i64, message: String) -> TaskResult {
    TaskResult {
        ending,
        started_at_ms,
        finished_at_ms: ms(SystemTime::now()),
        output_bytes: 0,
        survivors: 0,
        message: Some(message),
    }
}
