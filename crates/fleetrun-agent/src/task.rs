//! Tasks the agent owns: each runs on its own, independent of any connection, spooling its
//! output and keeping its result until the controller says both are stored; a task stream only
//! *attaches* to a task, sending what the controller does not have yet.
//!
//! With a controller of protocol version 1 the old rules hold: a task is tied to the connection
//! it came on and cancelled when it ends, and forgotten once its result is sent.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fleetrun_exec::{Language, OutputEvent, Task, split_params};
use fleetrun_net::{FramedRecv, StreamError, send_frame};
use fleetrun_proto::{
    Ending, HeldTask, MAX_OUTPUT_CHUNK, TaskDown, TaskRequest, TaskResult, TaskUp,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    AgentContext,
    spool::{Mark, Meta, Spool, TaskSpool},
};

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Which rules a task follows, from the protocol version of the connection it came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Version 2: the agent owns the task; it survives connections and waits for
    /// [`TaskDown::ResultStored`].
    Agent,
    /// Version 1: the task dies with its connection and is forgotten once its result is sent.
    Connection,
}

/// One task the agent holds.
#[derive(Debug)]
pub(crate) struct Held {
    cancel: CancellationToken,
    state: Mutex<Meta>,
    /// Bumped on every change of `state`.
    changed: watch::Sender<u64>,
    spool: Option<TaskSpool>,
    ownership: Ownership,
    /// Nobody wants the task any more: it is forgotten as soon as it has ended.
    discarded: std::sync::atomic::AtomicBool,
}

impl Held {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn report(&self) -> HeldTask {
        let meta = self.state.lock().unwrap();
        HeldTask {
            task_id: meta.task_id,
            job_instance_id: meta.job_instance_id,
            step_instance_id: meta.step_instance_id,
            bk_host_id: meta.bk_host_id,
            execute_count: meta.execute_count,
            acked_offset: meta.acked_offset,
            produced: meta.produced,
            started_at_ms: meta.started_at_ms,
            finished: meta.result.is_some(),
        }
    }

    fn save(&self, meta: &Meta) {
        if let Some(spool) = &self.spool
            && let Err(e) = spool.save(meta)
        {
            tracing::warn!(task_id = %meta.task_id, "cannot save the task's state to the spool: {e}");
        }
    }
}

/// The tasks this agent holds, by id.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    held: Mutex<HashMap<Uuid, Arc<Held>>>,
}

impl Tasks {
    /// What the agent holds, for the controller it (re)connects to.
    pub(crate) fn reports(&self) -> Vec<HeldTask> {
        let held: Vec<Arc<Held>> = self.held.lock().unwrap().values().cloned().collect();
        held.iter()
            .filter(|h| h.ownership == Ownership::Agent)
            .map(|h| h.report())
            .collect()
    }

    fn get(&self, task_id: &Uuid) -> Option<Arc<Held>> {
        self.held.lock().unwrap().get(task_id).cloned()
    }

    /// Forgets a task: its spool is removed. A task still running is cancelled first and
    /// forgotten when it ends.
    fn forget(&self, task_id: &Uuid) {
        let Some(held) = self.get(task_id) else {
            return;
        };
        let finished = {
            let meta = held.state.lock().unwrap();
            meta.result.is_some()
        };
        if !finished {
            held.discarded
                .store(true, std::sync::atomic::Ordering::SeqCst);
            held.cancel.cancel();
            return;
        }
        self.remove(task_id, &held);
    }

    fn remove(&self, task_id: &Uuid, held: &Held) {
        if self.held.lock().unwrap().remove(task_id).is_some()
            && let Some(spool) = &held.spool
        {
            spool.remove();
        }
    }

    /// Takes up what a previous run of the agent left in the spool: a task with a result is held
    /// as it was; one without lost its process with that run (the executor killed what was
    /// left), and ends so, with the output it had spooled.
    pub(crate) fn recover(&self, spool: &Spool) {
        for (mut meta, task_spool) in spool.load_all() {
            if meta.result.is_none() {
                meta.produced = meta.produced.max(task_spool.spooled());
                let now = ms(SystemTime::now());
                meta.result = Some(TaskResult {
                    ending: Ending::Failed,
                    started_at_ms: meta.started_at_ms.unwrap_or(now),
                    finished_at_ms: now,
                    output_bytes: meta.produced,
                    survivors: 0,
                    message: Some(
                        "the agent restarted while the task ran: its process is gone; the \
                         output up to the restart is kept"
                            .into(),
                    ),
                });
                if let Err(e) = task_spool.save(&meta) {
                    tracing::warn!(task_id = %meta.task_id, "cannot save the task's state to the spool: {e}");
                }
            }
            tracing::info!(task_id = %meta.task_id, job = meta.job_instance_id, produced = meta.produced, "holding a task from before the restart");
            let (changed, _) = watch::channel(0);
            let held = Arc::new(Held {
                cancel: CancellationToken::new(),
                state: Mutex::new(meta),
                changed,
                spool: Some(task_spool),
                ownership: Ownership::Agent,
                discarded: Default::default(),
            });
            let task_id = held.state.lock().unwrap().task_id;
            self.held.lock().unwrap().insert(task_id, held);
        }
    }
}

/// Serves one stream the controller opened: a new task, a resumed one, or a discard.
pub(crate) async fn serve(
    ctx: Arc<AgentContext>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    ownership: Ownership,
    session: CancellationToken,
) {
    let mut recv = FramedRecv::new(recv);
    let (held, from) = match recv.recv::<TaskDown>().await {
        Ok(Some(TaskDown::Run(request))) => match ctx.tasks.get(&request.task_id) {
            // A repeat of a task already held: the controller gets it from the start.
            Some(held) => (held, 0),
            None => (start(&ctx, request, ownership, &session), 0),
        },
        Ok(Some(TaskDown::Resume {
            task_id,
            from_offset,
        })) => {
            let Some(held) = ctx.tasks.get(&task_id) else {
                tracing::warn!(%task_id, "the controller resumes a task this agent does not hold");
                recv.stop(fleetrun_proto::close_code::PROTOCOL);
                return;
            };
            let produced = {
                let mut meta = held.state.lock().unwrap();
                if from_offset <= meta.produced {
                    meta.acked_offset = from_offset;
                }
                meta.produced
            };
            if from_offset > produced {
                tracing::warn!(%task_id, from_offset, produced, "the controller resumes beyond the output produced; sending from the start");
                (held, 0)
            } else {
                tracing::info!(%task_id, from_offset, "resuming the task for the controller");
                (held, from_offset)
            }
        }
        Ok(Some(TaskDown::Discard { task_id })) => {
            tracing::info!(%task_id, "the controller does not want the task: it is killed and forgotten");
            ctx.tasks.forget(&task_id);
            return;
        }
        Ok(Some(TaskDown::Cancel | TaskDown::ResultStored)) | Ok(None) => return,
        Err(e) => {
            tracing::warn!("unreadable task request: {e}");
            recv.stop(fleetrun_proto::close_code::PROTOCOL);
            return;
        }
    };
    attach(&ctx, held, send, recv, from).await;
}

/// Registers and starts a new task.
fn start(
    ctx: &Arc<AgentContext>,
    request: TaskRequest,
    ownership: Ownership,
    session: &CancellationToken,
) -> Arc<Held> {
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
    let meta = Meta {
        task_id,
        job_instance_id: request.job_instance_id,
        step_instance_id: request.step_instance_id,
        bk_host_id: ctx.bk_host_id(),
        execute_count: 0,
        started_at_ms: None,
        produced: 0,
        marks: Vec::new(),
        acked_offset: 0,
        result: None,
    };
    let spool = match &ctx.spool {
        Some(spool) => match spool.create(&meta) {
            Ok(spool) => Some(spool),
            Err(e) => {
                tracing::error!(%task_id, "cannot spool the task's output, it is lost if it is not delivered at once: {e}");
                None
            }
        },
        None => None,
    };
    let cancel = match ownership {
        Ownership::Agent => CancellationToken::new(),
        Ownership::Connection => session.child_token(),
    };
    let (changed, _) = watch::channel(0);
    let held = Arc::new(Held {
        cancel,
        state: Mutex::new(meta),
        changed,
        spool,
        ownership,
        discarded: Default::default(),
    });
    ctx.tasks.held.lock().unwrap().insert(task_id, held.clone());
    let runner = held.clone();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let result = run(&ctx, &runner, request).await;
        {
            let mut meta = runner.state.lock().unwrap();
            meta.result = Some(result);
            runner.save(&meta);
        }
        // The flag is set before the cancel that ended the task, so it is seen here.
        if runner.discarded.load(std::sync::atomic::Ordering::SeqCst) {
            ctx.tasks.remove(&task_id, &runner);
        }
        runner.bump();
    });
    held
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

/// Runs the task to its result, spooling the output.
async fn run(ctx: &AgentContext, held: &Held, request: TaskRequest) -> TaskResult {
    if let Err(reason) = ctx.config.limits.check(&request) {
        tracing::warn!(task_id = %request.task_id, account = request.account, language = request.script_language, "{reason}");
        return refused(Ending::Failed, reason);
    }
    let cancel = &held.cancel;
    let permit = tokio::select! {
        permit = ctx.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        () = cancel.cancelled() => {
            return refused(Ending::Cancelled, "terminated before it started".into());
        }
    };
    let args = match split_params(&request.script_param) {
        Ok(args) => args,
        Err(e) => return refused(Ending::Failed, format!("script_param: {e}")),
    };
    let Some(language) = Language::from_code(request.script_language) else {
        return refused(
            Ending::Failed,
            format!(
                "script_language {} is unknown to this agent",
                request.script_language
            ),
        );
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
    {
        let mut meta = held.state.lock().unwrap();
        meta.started_at_ms = Some(ms(SystemTime::now()));
        held.save(&meta);
    }
    held.bump();
    while let Some(event) = running.output.next().await {
        let mut meta = held.state.lock().unwrap();
        match event {
            OutputEvent::Data(data) => {
                let offset = meta.produced;
                let written = match &held.spool {
                    Some(spool) => spool.write_at(offset, &data),
                    None => Err(std::io::Error::other("no spool")),
                };
                if let Err(e) = written {
                    if meta.lost_bytes() == 0 {
                        tracing::error!(task_id = %meta.task_id, offset, "cannot spool output, it is lost and counted: {e}");
                    }
                    meta.lose(offset, data.len() as u64);
                    held.save(&meta);
                }
                meta.produced += data.len() as u64;
            }
            OutputEvent::Truncated {
                dropped_bytes,
                dropped_lines,
            } => {
                let offset = meta.produced;
                meta.marks.push(Mark::Truncated {
                    offset,
                    dropped_bytes,
                    dropped_lines,
                });
                held.save(&meta);
            }
        }
        drop(meta);
        held.bump();
    }
    let outcome = match running.outcome.await {
        Ok(outcome) => outcome,
        Err(e) => {
            return refused(
                Ending::Failed,
                format!("the agent lost track of the task: {e}"),
            );
        }
    };
    drop(permit);
    let mut message = outcome.log_line();
    let lost = held.state.lock().unwrap().lost_bytes();
    if lost > 0 {
        let line = format!("{lost} bytes of output were lost: the agent could not spool them");
        message = Some(match message {
            Some(m) => format!("{m}; {line}"),
            None => line,
        });
    }
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
    TaskResult {
        ending,
        started_at_ms: ms(outcome.started_at),
        finished_at_ms: ms(outcome.finished_at),
        output_bytes: outcome.output_bytes,
        survivors: outcome.survivors,
        message,
    }
}

/// What the controller says on an attached stream.
enum Down {
    Cancel,
    ResultStored,
    /// The stream ended or broke.
    Gone,
}

async fn read_down(mut recv: FramedRecv, tx: mpsc::UnboundedSender<Down>) {
    loop {
        let down = match recv.recv::<TaskDown>().await {
            Ok(Some(TaskDown::Cancel)) => Down::Cancel,
            Ok(Some(TaskDown::ResultStored)) => Down::ResultStored,
            // The controller finished its side: nothing more will come.
            Ok(None) => return,
            Ok(Some(_)) | Err(_) => Down::Gone,
        };
        let gone = matches!(down, Down::Gone);
        if tx.send(down).is_err() || gone {
            return;
        }
    }
}

/// Sends the task's output from `from` on, then its result, as they become available; with
/// protocol version 2, waits for the controller to say it stored them and forgets the task.
async fn attach(
    ctx: &AgentContext,
    held: Arc<Held>,
    mut send: quinn::SendStream,
    recv: FramedRecv,
    from: u64,
) {
    let (tx, mut down) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_down(recv, tx));
    let task_id = held.state.lock().unwrap().task_id;
    let result = deliver(&held, &mut send, &mut down, from).await;
    reader.abort();
    match result {
        Ok(Delivered::Stored) => {
            let _ = send.finish();
            ctx.tasks.forget(&task_id);
        }
        Ok(Delivered::Sent) => {
            let _ = send.finish();
            if held.ownership == Ownership::Connection {
                ctx.tasks.forget(&task_id);
            }
        }
        Err(e) => match held.ownership {
            // The task goes on; the controller gets its output when it comes back.
            Ownership::Agent => {
                tracing::info!(%task_id, "task stream ended before the result was stored: {e}")
            }
            // Nobody can receive the output any more: stop the script.
            Ownership::Connection => {
                tracing::warn!(%task_id, "task stream failed: {e}");
                ctx.tasks.forget(&task_id);
            }
        },
    }
}

enum Delivered {
    /// The controller stored the result.
    Stored,
    /// The result was sent; no acknowledgement comes (version 1) or the controller closed.
    Sent,
}

async fn deliver(
    held: &Held,
    send: &mut quinn::SendStream,
    down: &mut mpsc::UnboundedReceiver<Down>,
    from: u64,
) -> Result<Delivered, StreamError> {
    let mut down_open = true;
    let mut changed = held.changed.subscribe();
    let mut sent = from;
    let mut started_sent = false;
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
    loop {
        let (produced, marks, started_at, result) = {
            let meta = held.state.lock().unwrap();
            changed.mark_unchanged();
            let marks: Vec<Mark> = meta
                .marks
                .iter()
                .filter(|m| m.offset() >= sent)
                .cloned()
                .collect();
            (
                meta.produced,
                marks,
                meta.started_at_ms,
                meta.result.clone(),
            )
        };
        if !started_sent && let Some(started_at_ms) = started_at {
            send_frame(send, &TaskUp::Started { started_at_ms }).await?;
            started_sent = true;
        }
        let mut marks = marks.into_iter().peekable();
        loop {
            // Marks at this offset go before the output that follows them.
            while let Some(mark) = marks.next_if(|m| m.offset() <= sent) {
                match mark {
                    Mark::Truncated {
                        dropped_bytes,
                        dropped_lines,
                        ..
                    } => {
                        send_frame(
                            send,
                            &TaskUp::Truncated {
                                dropped_bytes,
                                dropped_lines,
                            },
                        )
                        .await?
                    }
                    Mark::Lost { offset, bytes } => {
                        send_frame(send, &TaskUp::SpoolLost { offset, bytes }).await?;
                        sent = sent.max(offset + bytes);
                    }
                }
            }
            if sent >= produced {
                break;
            }
            let until = marks.peek().map_or(produced, |m| m.offset().min(produced));
            let want = usize::try_from(until - sent)
                .unwrap_or(usize::MAX)
                .min(MAX_OUTPUT_CHUNK);
            let read = match &held.spool {
                Some(spool) => spool.read_at(sent, &mut buf[..want]),
                None => Ok(0),
            };
            match read {
                Ok(n) if n > 0 => {
                    send_frame(
                        send,
                        &TaskUp::Output {
                            offset: sent,
                            data: buf[..n].to_vec(),
                        },
                    )
                    .await?;
                    sent += n as u64;
                }
                // Written but unreadable: say so rather than stall.
                other => {
                    if let Err(e) = other {
                        tracing::warn!("cannot read the spooled output: {e}");
                    }
                    let bytes = until - sent;
                    send_frame(
                        send,
                        &TaskUp::SpoolLost {
                            offset: sent,
                            bytes,
                        },
                    )
                    .await?;
                    sent = until;
                }
            }
            if marks.peek().is_none() && sent >= produced {
                break;
            }
        }
        if let Some(result) = result
            && sent >= produced
        {
            send_frame(send, &TaskUp::Finished(result)).await?;
            if held.ownership == Ownership::Connection {
                return Ok(Delivered::Sent);
            }
            // The result stays held until the controller has it stored.
            loop {
                match down.recv().await {
                    Some(Down::ResultStored) => return Ok(Delivered::Stored),
                    Some(Down::Cancel) => {}
                    Some(Down::Gone) | None => return Ok(Delivered::Sent),
                }
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            msg = down.recv(), if down_open => match msg {
                Some(Down::Cancel) => {
                    tracing::info!("the controller cancelled the task");
                    held.cancel.cancel();
                }
                Some(Down::ResultStored) => {}
                Some(Down::Gone) => {
                    // A broken stream stops a task of version 1, as it always did.
                    if held.ownership == Ownership::Connection {
                        held.cancel.cancel();
                    }
                }
                // Nothing more will come down; keep delivering.
                None => down_open = false,
            },
        }
    }
}
