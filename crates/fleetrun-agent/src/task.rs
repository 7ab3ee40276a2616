//! Tasks the agent owns: each runs on its own, independent of any connection, spooling its
//! output and keeping its result until the controller says both are stored; a task stream only
//! *attaches* to a task, sending what the controller does not have yet.
//!
//! With a controller of protocol version 1 the old rules hold: a task is tied to the connection
//! it came on and cancelled when it ends, and forgotten once its result is sent; nothing of
//! version 2 is ever sent on its streams (output the spool lost shows there as a gap in the
//! offsets, which the controller marks in the log, and in the result's message).
//!
//! Without a usable spool a task keeps its output in memory (bounded, like the spool, by the
//! executor's output limit): it survives a lost connection, not a restart of the agent.
//!
//! File I/O never runs on the async workers, nor under the lock of a task's state: output is
//! written by the task's own runner, one chunk after the other, on the blocking pool, and only
//! then counted as produced; a stream reads it there too.

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
use tokio::sync::watch;
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

/// Now, in milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    ms(SystemTime::now())
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

/// Finished tasks the agent keeps waiting for the controller's acknowledgement, at most; past
/// it the oldest are forgotten (and logged), so an agent whose controller never acknowledges
/// does not fill its disk nor report more than the controller accepts.
pub(crate) const MAX_FINISHED_HELD: usize = 10_000;

/// Bytes of output not acknowledged that finished tasks keep, at most (in the spool or in
/// memory); past it the oldest tasks' output is dropped, as a full disk drops it: their results
/// stay, with the loss marked where the output was ([`Tasks::bound_finished`]).
pub(crate) const MAX_FINISHED_OUTPUT: u64 = 1024 * 1024 * 1024;

/// Bytes of output kept in memory (tasks without a usable spool) across all tasks, at most;
/// past it a task's output is lost and marked, as a full disk's in the spool.
pub(crate) const MAX_MEMORY_OUTPUT: u64 = 256 * 1024 * 1024;

/// How long past a task's timeout its controller still waits for the agent to come back (the
/// controller's default `agent_grace_secs`): until then the agent returns to that controller.
pub(crate) const CONTROLLER_GRACE: Duration = Duration::from_secs(60);

/// When the controller stops waiting for a task that runs (or may run) `timeout` from `from_ms`.
fn hold_until(from_ms: i64, timeout_secs: u32) -> i64 {
    let wait = Duration::from_secs(u64::from(timeout_secs)).saturating_add(CONTROLLER_GRACE);
    from_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
}

/// The bytes of output all tasks kept in memory hold, against their bound.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    used: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::new(MAX_MEMORY_OUTPUT)
    }
}

impl MemoryBudget {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            used: Default::default(),
            limit,
        }
    }

    /// Takes `n` bytes of the budget; false (nothing taken) if they do not fit.
    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.used
            .fetch_update(SeqCst, SeqCst, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A task's output kept in memory, at the offsets the spool would keep it, within the budget
/// all such tasks share. Kept as runs of contiguous bytes: output lost (refused by the budget)
/// takes no room, and is marked in the task's state.
#[derive(Debug)]
pub(crate) struct MemoryOutput {
    /// `(offset, bytes)`, in offset order, not overlapping.
    runs: Mutex<Vec<(u64, Vec<u8>)>>,
    budget: Arc<MemoryBudget>,
}

impl MemoryOutput {
    pub(crate) fn new(budget: Arc<MemoryBudget>) -> Self {
        Self {
            runs: Mutex::default(),
            budget,
        }
    }

    /// Appends output at `offset`, at or past the end of what is kept (the runner writes in
    /// order).
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut runs = self.runs.lock().unwrap();
        let end = runs.last().map_or(0, |(at, bytes)| at + bytes.len() as u64);
        if offset < end || offset.checked_add(data.len() as u64).is_none() {
            return Err(std::io::Error::other(format!(
                "output at {offset} is not past the {end} bytes kept"
            )));
        }
        if !self.budget.take(data.len() as u64) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!(
                    "the output kept in memory reached its bound of {} bytes",
                    self.budget.limit
                ),
            ));
        }
        match runs.last_mut() {
            Some((_, bytes)) if offset == end => bytes.extend_from_slice(data),
            _ => runs.push((offset, data.to_vec())),
        }
        Ok(())
    }

    /// Copies what is kept from `offset` into `buf`, up to the end of its run.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> usize {
        let runs = self.runs.lock().unwrap();
        let after = runs.partition_point(|(at, _)| *at <= offset);
        let Some((at, bytes)) = after.checked_sub(1).map(|i| &runs[i]) else {
            return 0;
        };
        let from = usize::try_from(offset - at)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = buf.len().min(bytes.len() - from);
        buf[..n].copy_from_slice(&bytes[from..from + n]);
        n
    }

    /// Drops the bytes from `offset` on.
    fn truncate(&self, offset: u64) {
        let mut runs = self.runs.lock().unwrap();
        let mut freed = 0u64;
        while let Some((at, bytes)) = runs.last_mut() {
            if *at >= offset {
                freed += bytes.len() as u64;
                runs.pop();
                continue;
            }
            let keep = usize::try_from(offset - *at).unwrap_or(usize::MAX);
            if keep < bytes.len() {
                freed += (bytes.len() - keep) as u64;
                bytes.truncate(keep);
                bytes.shrink_to_fit();
            }
            break;
        }
        self.budget.give(freed);
    }

    fn held(runs: &[(u64, Vec<u8>)]) -> u64 {
        runs.iter().map(|(_, bytes)| bytes.len() as u64).sum()
    }
}

impl Drop for MemoryOutput {
    fn drop(&mut self) {
        let held = self.runs.get_mut().map_or(0, |runs| Self::held(runs));
        self.budget.give(held);
    }
}

/// Where a task's output bytes are kept.
#[derive(Debug)]
pub(crate) enum Output {
    Spooled(TaskSpool),
    /// No usable spool: in memory, at the same offsets.
    Memory(MemoryOutput),
}

impl Output {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Spooled(spool) => spool.write_at(offset, data),
            Output::Memory(memory) => memory.write_at(offset, data),
        }
    }

    /// Drops the output from `offset` on.
    fn truncate(&self, offset: u64) -> std::io::Result<()> {
        match self {
            Output::Spooled(spool) => spool.truncate(offset),
            Output::Memory(memory) => {
                memory.truncate(offset);
                Ok(())
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Output::Spooled(spool) => spool.read_at(offset, buf),
            Output::Memory(memory) => Ok(memory.read_at(offset, buf)),
        }
    }

    fn save(&self, meta: &Meta) -> std::io::Result<()> {
        match self {
            Output::Spooled(spool) => spool.save(meta),
            Output::Memory(_) => Ok(()),
        }
    }

    fn remove(&self) {
        if let Output::Spooled(spool) = self {
            spool.remove();
        }
    }
}

/// Runs blocking file work off the async workers when there is a runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Held {
    /// Does `work` on the task's output: on the blocking pool when the output is in the spool's
    /// files, at once when it is in memory (a copy, no I/O).
    async fn on_output<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> T + Send + 'static,
    ) -> T {
        match self.output {
            Output::Memory(_) => work(self),
            Output::Spooled(_) => {
                let held = self.clone();
                blocking(move || work(&held)).await
            }
        }
    }
}

/// How a task is reported in [`fleetrun_proto::ControlUp::Holding`].
fn report_of(meta: &Meta) -> HeldTask {
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

/// One task the agent holds.
#[derive(Debug)]
pub(crate) struct Held {
    cancel: CancellationToken,
    state: Mutex<Meta>,
    /// Bumped on every change of `state`.
    changed: watch::Sender<u64>,
    output: Output,
    ownership: Ownership,
    /// Nobody wants the task any more: it is forgotten as soon as it has ended.
    discarded: std::sync::atomic::AtomicBool,
    /// Streams delivering the task's output now; changed under `state`'s lock. Its marks are
    /// not rewritten while one is (a stream keeps its place among them).
    delivering: std::sync::atomic::AtomicUsize,
}

/// Counts a stream in [`Held::delivering`] while it lives.
struct Delivering<'a>(&'a Held);

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        let _meta = self.0.state.lock().unwrap();
        self.0
            .delivering
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Held {
    fn new(meta: Meta, output: Output, ownership: Ownership, cancel: CancellationToken) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            cancel,
            state: Mutex::new(meta),
            changed,
            output,
            ownership,
            discarded: Default::default(),
            delivering: Default::default(),
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn report(&self) -> HeldTask {
        report_of(&self.state.lock().unwrap())
    }

    fn save(&self, meta: &Meta) {
        if let Err(e) = self.output.save(meta) {
            tracing::warn!(task_id = %meta.task_id, "cannot save the task's state to the spool: {e}");
        }
    }

    /// Drops the output the controller has not acknowledged, marking it lost, and saves the
    /// state; the bytes dropped. For a finished task only: its runner saves no more. Nothing
    /// while a stream delivers it (the controller is taking it). Blocking.
    fn drop_unacknowledged(&self) -> u64 {
        let (meta, from, dropped) = {
            let mut meta = self.state.lock().unwrap();
            let dropped = meta.unacknowledged();
            if dropped == 0 || self.delivering.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                return 0;
            }
            let from = meta.acked_offset;
            let bytes = meta.produced - from;
            // One loss from the acknowledged offset to the end, in place of those within it;
            // truncations stay, in offset order.
            meta.marks
                .retain(|m| !matches!(m, Mark::Lost { offset, .. } if *offset >= from));
            let at = meta
                .marks
                .iter()
                .position(|m| m.offset() > from)
                .unwrap_or(meta.marks.len());
            meta.marks.insert(
                at,
                Mark::Lost {
                    offset: from,
                    bytes,
                },
            );
            (meta.clone(), from, dropped)
        };
        // The mark is saved before the bytes go: a restart in between finds them lost.
        self.save(&meta);
        if let Err(e) = self.output.truncate(from) {
            tracing::warn!(task_id = %meta.task_id, "cannot drop the task's spooled output: {e}");
        }
        self.bump();
        dropped
    }

    /// Saves the task's state as it is now, on the blocking pool; the lock is held only to copy
    /// it. Only the task's runner calls this, one save after the other.
    async fn persist(self: &Arc<Self>) {
        if let Output::Memory(_) = self.output {
            // Nothing is saved for a task kept in memory.
            return;
        }
        let meta = self.state.lock().unwrap().clone();
        let held = self.clone();
        blocking(move || held.save(&meta)).await;
    }
}

/// The tasks this agent holds, by id.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    held: Mutex<HashMap<Uuid, Arc<Held>>>,
    /// Tasks received whose spool is being made, not yet in `held`: reported all the same, so
    /// a reconnect in that window does not tell the controller the task is not held. Locked
    /// only while `held` is, so a task is always in one or the other.
    receiving: Mutex<HashMap<Uuid, HeldTask>>,
    /// What the tasks without a spool hold in memory.
    memory: Arc<MemoryBudget>,
}

impl Tasks {
    /// What the agent holds, for the controller it (re)connects to.
    pub(crate) fn reports(&self) -> Vec<HeldTask> {
        let (held, receiving): (Vec<Arc<Held>>, Vec<HeldTask>) = {
            let held = self.held.lock().unwrap();
            let receiving = self.receiving.lock().unwrap();
            (
                held.values().cloned().collect(),
                receiving.values().cloned().collect(),
            )
        };
        held.iter()
            .filter(|h| h.ownership == Ownership::Agent)
            .map(|h| h.report())
            .chain(receiving)
            .collect()
    }

    /// Holds the task `held`, received as `task_id`, in place of its report while receiving.
    fn hold(&self, task_id: Uuid, held: Arc<Held>) {
        let mut all = self.held.lock().unwrap();
        all.insert(task_id, held);
        self.receiving.lock().unwrap().remove(&task_id);
    }

    /// The controller the agent must go back to: the one that sent a task the agent still
    /// holds (running, or finished and not acknowledged) and still waits for it at `now_ms`.
    /// Another controller may not know the task and would have it killed. With several, the
    /// one waiting longest.
    pub(crate) fn home(&self, now_ms: i64) -> Option<String> {
        let held: Vec<Arc<Held>> = self.held.lock().unwrap().values().cloned().collect();
        held.iter()
            .filter(|h| {
                h.ownership == Ownership::Agent
                    && !h.discarded.load(std::sync::atomic::Ordering::SeqCst)
            })
            .filter_map(|h| {
                let meta = h.state.lock().unwrap();
                let until = meta.hold_until_ms.filter(|until| *until > now_ms)?;
                Some((until, meta.controller.clone()?))
            })
            .max()
            .map(|(_, controller)| controller)
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

    fn remove(&self, task_id: &Uuid, held: &Arc<Held>) {
        if self.held.lock().unwrap().remove(task_id).is_none() {
            return;
        }
        if let Output::Memory(_) = held.output {
            return;
        }
        let held = held.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || held.output.remove())),
            Err(_) => held.output.remove(),
        }
    }

    /// Bounds what finished tasks waiting for an acknowledgement hold: a controller that never
    /// acknowledges their results (it lost them, or the agent's acknowledgement went missing for
    /// good) does not make the agent hold them without end. Past `keep_bytes` of output not
    /// acknowledged, the oldest tasks' output is dropped (their results stay, a loss is marked
    /// where the output was, as for a full disk); past `keep` tasks, the oldest are forgotten.
    pub(crate) fn bound_finished(&self, keep: usize, keep_bytes: u64) {
        let mut finished: Vec<(i64, Uuid, Arc<Held>)> = {
            let held = self.held.lock().unwrap();
            held.iter()
                .filter_map(|(id, h)| {
                    let meta = h.state.lock().unwrap();
                    meta.result
                        .as_ref()
                        .map(|r| (r.finished_at_ms, *id, h.clone()))
                })
                .collect()
        };
        finished.sort_by_key(|(at, id, _)| (*at, *id));
        let mut kept: u64 = finished
            .iter()
            .map(|(.., h)| h.state.lock().unwrap().unacknowledged())
            .fold(0, u64::saturating_add);
        for (_, task_id, held) in &finished {
            if kept <= keep_bytes {
                break;
            }
            let dropped = held.drop_unacknowledged();
            if dropped > 0 {
                tracing::warn!(%task_id, bytes = dropped, "dropping the output of a finished task the controller never acknowledged: finished tasks keep {keep_bytes} bytes at most; its result is kept");
            }
            kept = kept.saturating_sub(dropped);
        }
        if finished.len() <= keep {
            return;
        }
        let excess = finished.len() - keep;
        for (_, task_id, held) in finished.into_iter().take(excess) {
            tracing::warn!(%task_id, "forgetting the result of a finished task the controller never acknowledged: the agent holds {keep} at most");
            self.remove(&task_id, &held);
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
            let task_id = meta.task_id;
            let held = Arc::new(Held::new(
                meta,
                Output::Spooled(task_spool),
                Ownership::Agent,
                CancellationToken::new(),
            ));
            self.held.lock().unwrap().insert(task_id, held);
        }
        self.bound_finished(MAX_FINISHED_HELD, MAX_FINISHED_OUTPUT);
    }
}

/// Serves one stream the controller opened: a new task, a resumed one, or a discard.
/// `protocol_version` is the one negotiated on its connection.
pub(crate) async fn serve(
    ctx: Arc<AgentContext>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    ownership: Ownership,
    protocol_version: u32,
    session: CancellationToken,
) {
    let mut recv = FramedRecv::new(recv);
    let reading = match &ctx.presence {
        crate::Presence::Emulated { reading_gate, .. } => Some(reading_gate.acquire().await),
        crate::Presence::Host => None,
    };
    let first = recv.recv::<TaskDown>().await;
    drop(reading);
    let (held, from) = match first {
        Ok(Some(TaskDown::Run(request))) => match ctx.tasks.get(&request.task_id) {
            // A repeat of a task already held: the controller gets it from the start.
            Some(held) => (held, 0),
            None => (start(&ctx, request, ownership, &session).await, 0),
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
                // The controller resuming the task follows it now (it took the task over when
                // its first one could not be reached): its home from here on. Saved with the
                // task's next state.
                meta.controller = Some(ctx.controller());
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
        Ok(Some(TaskDown::Place(_) | TaskDown::Collect(_) | TaskDown::Fetch(_)))
            if ctx.runner.refuses_files().is_some() =>
        {
            // A runner that writes no files reads none either: an emulated agent in a
            // benchmark is never a transfer's source or target.
            let why = ctx.runner.refuses_files().unwrap_or_default();
            tracing::debug!("file task not served: {why}");
            recv.stop(fleetrun_proto::close_code::PROTOCOL);
            return;
        }
        Ok(Some(TaskDown::Place(request))) => {
            crate::files::serve(ctx, send, recv, request).await;
            return;
        }
        Ok(Some(TaskDown::Collect(request))) => {
            crate::transfer::collect(ctx, send, recv, request).await;
            return;
        }
        Ok(Some(TaskDown::Fetch(request))) => {
            crate::transfer::fetch(ctx, send, recv, request, protocol_version).await;
            return;
        }
        Ok(Some(TaskDown::Cancel | TaskDown::ResultStored | TaskDown::Chunk { .. })) | Ok(None) => {
            return;
        }
        Err(e) => {
            tracing::warn!("unreadable task request: {e}");
            recv.stop(fleetrun_proto::close_code::PROTOCOL);
            return;
        }
    };
    attach(&ctx, held, send, recv, from).await;
}

/// Registers and starts a new task.
async fn start(
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
        controller: Some(ctx.controller()),
        hold_until_ms: Some(hold_until(ms(SystemTime::now()), request.timeout_secs)),
    };
    let cancel = match ownership {
        Ownership::Agent => CancellationToken::new(),
        Ownership::Connection => session.child_token(),
    };
    if ownership == Ownership::Agent {
        let _held = ctx.tasks.held.lock().unwrap();
        ctx.tasks
            .receiving
            .lock()
            .unwrap()
            .insert(task_id, report_of(&meta));
    }
    let output = if ctx.spool.is_some() {
        let spool_ctx = ctx.clone();
        let first = meta.clone();
        blocking(move || match spool_ctx.spool.as_ref().map(|spool| spool.create(&first)) {
            Some(Ok(spool)) => Output::Spooled(spool),
            Some(Err(e)) => {
                tracing::error!(%task_id, "cannot spool the task's output, it is kept in memory and lost if the agent restarts: {e}");
                Output::Memory(MemoryOutput::new(spool_ctx.tasks.memory.clone()))
            }
            None => Output::Memory(MemoryOutput::new(spool_ctx.tasks.memory.clone())),
        })
        .await
    } else {
        Output::Memory(MemoryOutput::new(ctx.tasks.memory.clone()))
    };
    let held = Arc::new(Held::new(meta, output, ownership, cancel));
    ctx.tasks.hold(task_id, held.clone());
    let runner = held.clone();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let result = run(&ctx, &runner, request).await;
        ctx.metrics.task_finished(&result);
        runner.state.lock().unwrap().result = Some(result);
        runner.persist().await;
        // The flag is set before the cancel that ended the task, so it is seen here.
        if runner.discarded.load(std::sync::atomic::Ordering::SeqCst) {
            ctx.tasks.remove(&task_id, &runner);
        } else if ownership == Ownership::Agent {
            let bound = |ctx: &AgentContext| {
                ctx.tasks
                    .bound_finished(MAX_FINISHED_HELD, MAX_FINISHED_OUTPUT);
            };
            if ctx.spool.is_some() {
                // It may rewrite spooled files.
                let tasks = ctx.clone();
                blocking(move || bound(&tasks)).await;
            } else {
                bound(&ctx);
            }
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
async fn run(ctx: &AgentContext, held: &Arc<Held>, request: TaskRequest) -> TaskResult {
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
    let mut running = ctx.runner.start(task, cancel.clone());
    {
        let started = ms(SystemTime::now());
        let mut meta = held.state.lock().unwrap();
        meta.started_at_ms = Some(started);
        // The controller's wait runs from the start it hears of, not from the dispatch.
        meta.hold_until_ms = Some(hold_until(started, request.timeout_secs));
    }
    held.persist().await;
    held.bump();
    while let Some(event) = running.output.next().await {
        match event {
            OutputEvent::Data(data) => {
                // Only this loop moves `produced`: the bytes are written first, then counted, so
                // a stream never reads past what is written.
                let offset = held.state.lock().unwrap().produced;
                let len = data.len() as u64;
                let written = held
                    .on_output(move |held| held.output.write_at(offset, &data))
                    .await;
                let lost = {
                    let mut meta = held.state.lock().unwrap();
                    if let Err(e) = &written {
                        if meta.lost_bytes() == 0 {
                            tracing::error!(task_id = %meta.task_id, offset, "cannot spool output, it is lost and counted: {e}");
                        }
                        meta.lose(offset, len);
                    }
                    meta.produced += len;
                    written.is_err()
                };
                if lost {
                    held.persist().await;
                }
            }
            OutputEvent::Truncated {
                dropped_bytes,
                dropped_lines,
            } => {
                {
                    let mut meta = held.state.lock().unwrap();
                    let offset = meta.produced;
                    meta.marks.push(Mark::Truncated {
                        offset,
                        dropped_bytes,
                        dropped_lines,
                    });
                }
                held.persist().await;
            }
        }
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

/// Where what the controller says on an attached stream comes from: the task stream itself, or
/// a channel in tests. `None` once nothing more will come.
trait Downs {
    fn next(&mut self) -> impl std::future::Future<Output = Option<Down>> + Send;
}

#[cfg(test)]
impl Downs for tokio::sync::mpsc::UnboundedReceiver<Down> {
    async fn next(&mut self) -> Option<Down> {
        self.recv().await
    }
}

/// The task stream's frames from the controller, read by the task delivering to it: no task of
/// its own per stream. A frame read is cancel-safe ([`FramedRecv::recv`] keeps what it has read
/// of a frame), so it can wait beside the task's own changes.
struct StreamDowns {
    recv: FramedRecv,
    ended: bool,
}

impl Downs for StreamDowns {
    async fn next(&mut self) -> Option<Down> {
        if self.ended {
            return None;
        }
        let down = match self.recv.recv::<TaskDown>().await {
            Ok(Some(TaskDown::Cancel)) => Down::Cancel,
            Ok(Some(TaskDown::ResultStored)) => Down::ResultStored,
            // The controller finished its side: nothing more will come.
            Ok(None) => {
                self.ended = true;
                return None;
            }
            Ok(Some(_)) | Err(_) => Down::Gone,
        };
        if matches!(down, Down::Gone) {
            self.ended = true;
        }
        Some(down)
    }
}

/// Where the task's reports go: the task stream, or a list in tests.
pub(crate) trait Frames {
    fn send(
        &mut self,
        up: TaskUp,
    ) -> impl std::future::Future<Output = Result<(), StreamError>> + Send;
}

impl Frames for quinn::SendStream {
    async fn send(&mut self, up: TaskUp) -> Result<(), StreamError> {
        send_frame(self, &up).await
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
    let mut down = StreamDowns { recv, ended: false };
    let task_id = held.state.lock().unwrap().task_id;
    let result = deliver(&held, &mut send, &mut down, from).await;
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

#[derive(Debug, PartialEq, Eq)]
enum Delivered {
    /// The controller stored the host's final status: the agent forgets the task (killing it
    /// first if it still runs, when the controller ended the host on its own account).
    Stored,
    /// The result was sent; no acknowledgement comes (version 1) or the controller closed.
    Sent,
}

/// Reads up to `want` bytes of output at `offset`, on the blocking pool.
async fn read_output(held: &Arc<Held>, offset: u64, want: usize) -> std::io::Result<Vec<u8>> {
    held.on_output(move |held| {
        let mut buf = vec![0u8; want];
        let n = held.output.read_at(offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    })
    .await
}

/// What `fut` yields if it is ready at its first poll; otherwise it is dropped unfinished, which
/// [`Downs::next`] allows (a frame read is cancel-safe).
fn now_or_never<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Acts on what the controller said on the stream; `Some` when delivering is over.
fn on_down(held: &Held, msg: Option<Down>, down_open: &mut bool) -> Option<Delivered> {
    match msg {
        Some(Down::Cancel) => {
            tracing::info!("the controller cancelled the task");
            held.cancel.cancel();
        }
        // The controller stored the host's final status before the result came (it ended the
        // host on its own account): it wants nothing more of the task.
        Some(Down::ResultStored) if held.ownership == Ownership::Agent => {
            return Some(Delivered::Stored);
        }
        Some(Down::ResultStored) => {}
        Some(Down::Gone) => {
            // A broken stream stops a task of version 1, as it always did.
            if held.ownership == Ownership::Connection {
                held.cancel.cancel();
            }
        }
        // Nothing more will come down; keep delivering.
        None => *down_open = false,
    }
    None
}

async fn deliver(
    held: &Arc<Held>,
    send: &mut impl Frames,
    down: &mut impl Downs,
    from: u64,
) -> Result<Delivered, StreamError> {
    // A controller of version 1 cannot read a `SpoolLost`: it sees the lost bytes as a gap in
    // the offsets instead, and the count in the result's message.
    let says_lost = held.ownership == Ownership::Agent;
    let mut down_open = true;
    let mut changed = held.changed.subscribe();
    let mut sent = from;
    let mut started_sent = false;
    // Marks are appended in offset order and never change while a stream delivers (see
    // `Held::drop_unacknowledged`): each is sent once, from the first at or past where the
    // controller resumes.
    let _delivering;
    let mut next_mark = {
        let meta = held.state.lock().unwrap();
        held.delivering
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        _delivering = Delivering(held);
        meta.marks
            .iter()
            .position(|m| m.offset() >= from)
            .unwrap_or(meta.marks.len())
    };
    loop {
        let (produced, marks, started_at, result) = {
            let meta = held.state.lock().unwrap();
            changed.mark_unchanged();
            (
                meta.produced,
                meta.marks.get(next_mark..).unwrap_or_default().to_vec(),
                meta.started_at_ms,
                meta.result.clone(),
            )
        };
        if !started_sent && let Some(started_at_ms) = started_at {
            send.send(TaskUp::Started { started_at_ms }).await?;
            started_sent = true;
        }
        let mut marks = marks.into_iter().peekable();
        loop {
            // Marks at this offset go before the output that follows them.
            while let Some(mark) = marks.next_if(|m| m.offset() <= sent) {
                next_mark += 1;
                match mark {
                    Mark::Truncated {
                        dropped_bytes,
                        dropped_lines,
                        ..
                    } => {
                        send.send(TaskUp::Truncated {
                            dropped_bytes,
                            dropped_lines,
                        })
                        .await?
                    }
                    Mark::Lost { offset, bytes } => {
                        if says_lost {
                            send.send(TaskUp::SpoolLost { offset, bytes }).await?;
                        }
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
            match read_output(held, sent, want).await {
                Ok(data) if !data.is_empty() => {
                    let n = data.len() as u64;
                    send.send(TaskUp::Output { offset: sent, data }).await?;
                    sent += n;
                }
                // Written but unreadable: say so rather than stall.
                other => {
                    if let Err(e) = other {
                        tracing::warn!("cannot read the spooled output: {e}");
                    }
                    let bytes = until - sent;
                    if says_lost {
                        send.send(TaskUp::SpoolLost {
                            offset: sent,
                            bytes,
                        })
                        .await?;
                    }
                    sent = until;
                }
            }
            // A backlog (MiB after a reattach) takes a while to send: a cancel must not wait
            // for it.
            if down_open
                && let Some(msg) = now_or_never(down.next())
                && let Some(delivered) = on_down(held, msg, &mut down_open)
            {
                return Ok(delivered);
            }
            if marks.peek().is_none() && sent >= produced {
                break;
            }
        }
        if let Some(result) = result
            && sent >= produced
        {
            send.send(TaskUp::Finished(result)).await?;
            if held.ownership == Ownership::Connection {
                return Ok(Delivered::Sent);
            }
            // The result stays held until the controller has it stored.
            loop {
                match down.next().await {
                    Some(Down::ResultStored) => return Ok(Delivered::Stored),
                    Some(Down::Cancel) => {}
                    Some(Down::Gone) | None => return Ok(Delivered::Sent),
                }
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            msg = down.next(), if down_open => {
                if let Some(delivered) = on_down(held, msg, &mut down_open) {
                    return Ok(delivered);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
