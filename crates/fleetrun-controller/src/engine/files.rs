//! File steps: each target host's agent gets one [`TaskDown::Place`] with the files, writes them
//! as the account and reports each file; the engine stores a file log per (host, file) and the
//! host's status as bk-job reports file tasks.
//!
//! The request is encoded once for the whole step and every host's stream is handed the same
//! buffer. A file task is not held by the agent across connections: a lost connection ends the
//! host 310 (files already renamed into place stay, none is half-written under its name). Agents
//! of a protocol version below 4 do not know the request: such a host ends 399 with a message,
//! and nothing is sent to it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetrun_net::{FramedRecv, describe_connection_error, send_frame};
use fleetrun_proto::{
    Ending, FileEnding, FileReport, PlaceFile, PlaceRequest, TaskDown, TaskResult, TaskUp,
    encode_frame,
};
use fleetrun_store::{FileLog, HostOutcome, Write};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Engine, Finishing, now_ms};
use crate::gateway::AgentLink;

use crate::status::host;

/// The first protocol version that carries file tasks.
pub const FILE_PROTOCOL_VERSION: u32 = 4;

/// bk-job's file log statuses.
pub mod file_status {
    pub const WAITING: i32 = 1;
    pub const UPLOADING: i32 = 2;
    pub const DOWNLOADING: i32 = 3;
    pub const SUCCESS: i32 = 4;
    pub const FAILED: i32 = 5;
}

/// bk-job's file log mode of the source side.
pub const MODE_UPLOAD: i32 = 0;
/// bk-job's file log mode of the target side.
pub const MODE_DOWNLOAD: i32 = 1;

/// One file of a file step.
#[derive(Clone)]
pub struct StepFile {
    pub name: String,
    pub mode: u32,
    pub sha256: [u8; 32],
    pub content: Arc<Vec<u8>>,
    /// What the file log names as its source.
    pub src_path: String,
}

impl std::fmt::Debug for StepFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepFile")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("len", &self.content.len())
            .finish_non_exhaustive()
    }
}

/// A host a file step targets.
#[derive(Debug, Clone)]
pub struct FileTarget {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
}

/// A file step ready to run, as created by the API.
#[derive(Clone)]
pub struct FileJobSpec {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub hosts: Vec<FileTarget>,
    pub account: String,
    /// Absolute, checked by the API.
    pub target_dir: String,
    pub strict: bool,
    pub timeout_secs: u32,
    pub files: Vec<StepFile>,
}

impl std::fmt::Debug for FileJobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileJobSpec")
            .field("job_instance_id", &self.job_instance_id)
            .field("hosts", &self.hosts.len())
            .field("target_dir", &self.target_dir)
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

/// What every host's run of the step shares.
pub(super) struct Step {
    job_instance_id: i64,
    step_instance_id: i64,
    target_dir: String,
    timeout_secs: u32,
    files: Vec<(String, String, u64)>,
    /// The encoded request, or why it could not be encoded.
    frame: Result<Bytes, String>,
}

/// What a file step sends its targets, ready for any of them: a batch of a rolling step
/// dispatches some, a step that does not roll all at once.
pub(super) struct FileDispatch {
    targets: std::collections::HashMap<i64, FileTarget>,
    run: FileRun,
}

/// How a file step's target gets its files.
pub(super) enum FileRun {
    /// `push_config_file`: the files inline in one `Place` frame.
    Place(Arc<Step>),
    /// `fast_transfer_file`: a `Fetch` of chunks from the content store.
    Fetch {
        step: Arc<super::transfer::FetchStep>,
        strict: bool,
    },
}

impl FileDispatch {
    pub(super) fn new(targets: &[FileTarget], run: FileRun) -> Self {
        Self {
            targets: targets.iter().map(|t| (t.bk_host_id, t.clone())).collect(),
            run,
        }
    }
}

impl Engine {
    /// Starts a file step in the background; false if the job is running already.
    pub fn start_files(&self, spec: FileJobSpec) -> bool {
        let job_instance_id = spec.job_instance_id;
        self.start_file_run(job_instance_id, move |engine, cancel| async move {
            engine.run_files(spec, cancel).await;
        })
    }

    /// Runs a file step that does not roll in the background, under its job's lease, until its
    /// end is committed; false if the job is running already.
    pub(super) fn start_file_run<F, Fut>(&self, job_instance_id: i64, run: F) -> bool
    where
        F: FnOnce(Engine, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let cancel = CancellationToken::new();
        {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&job_instance_id) {
                return false;
            }
            running.insert(job_instance_id, cancel.clone());
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let leased = engine.take_lease(job_instance_id).await;
            // A created job's start took the lease already (`lease_for_start`).
            engine.starting.lock().unwrap().remove(&job_instance_id);
            if !leased {
                engine.running.lock().unwrap().remove(&job_instance_id);
                engine.release_lease(job_instance_id).await;
                return;
            }
            run(engine.clone(), cancel).await;
            if let Err(e) = engine.store.flush().await {
                tracing::error!(job = job_instance_id, "cannot commit the job's end: {e}");
            }
            engine.running.lock().unwrap().remove(&job_instance_id);
            engine.run_left(job_instance_id);
            engine.release_lease(job_instance_id).await;
        });
        true
    }

    async fn run_files(&self, spec: FileJobSpec, cancel: CancellationToken) {
        let started = self
            .job_started_now(spec.job_instance_id, spec.step_instance_id)
            .await;
        let dispatch = self.place_dispatch(&spec);
        let mut hosts = JoinSet::new();
        let mut host_of_task = std::collections::HashMap::with_capacity(spec.hosts.len());
        let targets: Vec<i64> = spec.hosts.iter().map(|t| t.bk_host_id).collect();
        self.spawn_file_hosts(
            &dispatch,
            spec.job_instance_id,
            spec.step_instance_id,
            &targets,
            &cancel,
            &mut hosts,
            &mut host_of_task,
        )
        .await;
        drop(dispatch);
        let finishing = Finishing {
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            hosts: spec.hosts.len(),
            started,
            all_succeeded: true,
        };
        self.finish_job(finishing, hosts, host_of_task, &cancel)
            .await;
    }

    /// The step's files encoded once, ready to be placed on any of its targets.
    pub(super) fn place_dispatch(&self, spec: &FileJobSpec) -> FileDispatch {
        let request = TaskDown::Place(PlaceRequest {
            // One frame for every host: the agent names its temporary files itself.
            task_id: Uuid::nil(),
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            account: spec.account.clone(),
            target_dir: spec.target_dir.clone(),
            strict: spec.strict,
            timeout_secs: spec.timeout_secs,
            files: spec
                .files
                .iter()
                .map(|f| PlaceFile {
                    name: f.name.clone(),
                    mode: f.mode,
                    sha256: f.sha256,
                    content: f.content.to_vec(),
                })
                .collect(),
        });
        let frame = encode_frame(&request).map_err(|e| e.to_string());
        drop(request);
        let step = Arc::new(Step {
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            target_dir: spec.target_dir.clone(),
            timeout_secs: spec.timeout_secs,
            files: spec
                .files
                .iter()
                .map(|f| (f.name.clone(), f.src_path.clone(), f.content.len() as u64))
                .collect(),
            frame,
        });
        FileDispatch::new(&spec.hosts, FileRun::Place(step))
    }

    /// Starts the runs of a file step (either kind) on `targets`, into `hosts`, each writing
    /// its host at the epoch the store holds for it now (a host of a job a restarted controller
    /// went on with is past the first); a host the step does not target is not started.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn spawn_file_hosts(
        &self,
        dispatch: &FileDispatch,
        job_instance_id: i64,
        step_instance_id: i64,
        targets: &[i64],
        cancel: &CancellationToken,
        hosts: &mut JoinSet<i32>,
        host_of_task: &mut std::collections::HashMap<tokio::task::Id, super::RunOf>,
    ) {
        let epochs = self
            .dispatch_epochs(job_instance_id, step_instance_id)
            .await;
        for bk_host_id in targets.iter().copied() {
            let Some(target) = dispatch.targets.get(&bk_host_id).cloned() else {
                tracing::error!(
                    bk_host_id,
                    "a file step dispatched to a host it does not target"
                );
                continue;
            };
            let epoch = epochs
                .get(&bk_host_id)
                .copied()
                .unwrap_or(fleetrun_store::FIRST_EPOCH);
            let engine = self.clone();
            let cancel = cancel.clone();
            let handle = match &dispatch.run {
                FileRun::Place(step) => {
                    let step = step.clone();
                    hosts.spawn(async move { engine.file_host(&step, target, epoch, cancel).await })
                }
                FileRun::Fetch { step, strict } => {
                    let (step, strict) = (step.clone(), *strict);
                    hosts.spawn(async move {
                        engine
                            .transfer_host(&step, target, epoch, strict, cancel)
                            .await
                    })
                }
            };
            host_of_task.insert(handle.id(), super::RunOf { bk_host_id, epoch });
        }
    }

    /// One host of a file step, to its final status.
    async fn file_host(
        &self,
        step: &Step,
        target: FileTarget,
        epoch: i64,
        cancel: CancellationToken,
    ) -> i32 {
        let mut run = FileHostRun::new(step, &target, epoch);
        let (status, tag) = self.exchange_files(step, &target, &mut run, &cancel).await;
        run.finish(self, step.job_instance_id, status, tag).await
    }

    async fn exchange_files(
        &self,
        step: &Step,
        target: &FileTarget,
        run: &mut FileHostRun,
        cancel: &CancellationToken,
    ) -> (i32, String) {
        let (frame, link) = match self.file_task_link(
            &step.frame,
            target.bk_host_id,
            "file task",
            ("file tasks", FILE_PROTOCOL_VERSION),
        ) {
            Ok(ready) => ready,
            Err(ended) => return ended,
        };
        let (mut send, recv) = match link.connection.open_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                return (
                    host::AGENT_ABNORMAL,
                    format!("cannot reach the agent: {}", describe_connection_error(&e)),
                );
            }
        };
        if let Err(e) = send.write_chunk(frame).await {
            return (
                host::AGENT_ABNORMAL,
                format!("cannot send the file task to the agent: {e}"),
            );
        }
        let mut recv = FramedRecv::new(recv);
        let grace = self.agent_grace;
        // Until the agent reports its start, the connection's liveness is the bound (a lost
        // connection fails the read); from then on, its timeout plus the grace period.
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut cancel_sent = false;
        loop {
            let sleep_until = deadline.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
            });
            let up = tokio::select! {
                up = recv.recv::<TaskUp>() => up,
                () = tokio::time::sleep_until(sleep_until) => {
                    if !cancel_sent {
                        let _ = send_frame(&mut send, &TaskDown::Cancel).await;
                    }
                    return (
                        host::FILE_TIMEOUT,
                        format!(
                            "the agent sent no result within the task's timeout ({} s) plus the grace period",
                            step.timeout_secs
                        ),
                    );
                }
                () = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    let _ = send_frame(&mut send, &TaskDown::Cancel).await;
                    let bound = tokio::time::Instant::now() + grace;
                    no_later_than(&mut deadline, bound);
                    continue;
                }
            };
            match up {
                Ok(Some(TaskUp::Started { started_at_ms })) => {
                    self.file_task_started(
                        step.job_instance_id,
                        step.timeout_secs,
                        run,
                        started_at_ms,
                        &mut deadline,
                    )
                    .await;
                }
                Ok(Some(TaskUp::FilePlaced(report))) => run.report(report),
                Ok(Some(TaskUp::Finished(result))) => {
                    let ended = run.result(result);
                    // The agent holds nothing; this only lets it end the stream early.
                    let _ = send_frame(&mut send, &TaskDown::ResultStored).await;
                    let _ = send.finish();
                    return ended;
                }
                Ok(Some(other)) => {
                    tracing::debug!(
                        bk_host_id = target.bk_host_id,
                        "ignored in a file task: {other:?}"
                    );
                }
                Ok(None) => {
                    return (
                        host::AGENT_ABNORMAL,
                        "the agent closed the file task's stream without a result".into(),
                    );
                }
                Err(e) => {
                    return (
                        host::AGENT_ABNORMAL,
                        format!("the connection to the agent was lost during the file task: {e}"),
                    );
                }
            }
        }
    }
}

impl Engine {
    /// The agent of a file task (a push's or a transfer's target) reported its start: the host
    /// is running from then (by the agent's clock only where that is plausible), and `deadline`
    /// becomes at the latest the task's timeout plus the grace period. Only the first report
    /// counts.
    pub(super) async fn file_task_started(
        &self,
        job_instance_id: i64,
        timeout_secs: u32,
        run: &mut FileHostRun,
        started_at_ms: i64,
        deadline: &mut Option<tokio::time::Instant>,
    ) {
        if run.started_at.is_some() {
            return;
        }
        let start = plausible(started_at_ms, now_ms());
        run.started_at = Some(start);
        self.write_for(
            job_instance_id,
            Write::HostStatus {
                step_instance_id: run.step_instance_id,
                bk_host_id: run.bk_host_id,
                status: host::RUNNING,
                start_time: Some(start),
                epoch: run.epoch,
            },
        )
        .await;
        let bound = tokio::time::Instant::now()
            + Duration::from_secs(u64::from(timeout_secs))
            + self.agent_grace;
        no_later_than(deadline, bound);
    }
}

/// An agent's time `t` of a file task where it lies within the clock skew allowed of `now`,
/// else `now`.
pub(super) fn plausible(t: i64, now: i64) -> i64 {
    // `abs_diff`: an agent may send any i64, `i64::MIN` included.
    if t.abs_diff(now) <= crate::host_run::MAX_CLOCK_SKEW_MS.unsigned_abs() {
        t
    } else {
        now
    }
}

impl Engine {
    /// What a file task (`task`: "file task", "transfer task") needs before anything is sent:
    /// its encoded request and the link of its host's agent, which must speak at least the
    /// protocol version `needs` names (`needs.0` saying what needs it). Else the host's status
    /// and tag, nothing sent.
    pub(super) fn file_task_link(
        &self,
        frame: &Result<Bytes, String>,
        bk_host_id: i64,
        task: &str,
        needs: (&str, u32),
    ) -> Result<(Bytes, AgentLink), (i32, String)> {
        let frame = match frame {
            Ok(frame) => frame.clone(),
            Err(e) => {
                return Err((
                    host::AGENT_TASK_ERROR,
                    format!("cannot encode the {task}: {e}"),
                ));
            }
        };
        let Some(link) = self.agents.get(bk_host_id) else {
            return Err((
                host::AGENT_ABNORMAL,
                "agent offline when the task was dispatched".into(),
            ));
        };
        let (what, version) = needs;
        if link.protocol_version < version {
            return Err((
                host::AGENT_TASK_ERROR,
                format!(
                    "the agent speaks protocol version {}; {what} need version {version}: \
                     upgrade the agent (nothing was sent to it)",
                    link.protocol_version
                ),
            ));
        }
        Ok((frame, link))
    }
}

/// Brings a file task's `deadline` forward to `bound`, never back.
pub(super) fn no_later_than(
    deadline: &mut Option<tokio::time::Instant>,
    bound: tokio::time::Instant,
) {
    *deadline = Some(deadline.map_or(bound, |d| d.min(bound)));
}

/// What one host's file task has reported so far.
pub(super) struct FileHostRun {
    pub(super) step_instance_id: i64,
    pub(super) bk_host_id: i64,
    pub(super) started_at: Option<i64>,
    /// One per file of the step, in order; `reported` says which the agent reported.
    pub(super) logs: Vec<FileLog>,
    pub(super) reported: Vec<bool>,
    /// Each file's size in bytes, which bounds what the agent may report.
    pub(super) sizes: Vec<u64>,
    /// The host's epoch, which every write of the run carries.
    pub(super) epoch: i64,
}

impl FileHostRun {
    /// A run whose files' logs are made already (waiting), each with its size.
    pub(super) fn with_logs(
        step_instance_id: i64,
        bk_host_id: i64,
        epoch: i64,
        logs: Vec<FileLog>,
        sizes: Vec<u64>,
    ) -> Self {
        let reported = vec![false; logs.len()];
        Self {
            step_instance_id,
            bk_host_id,
            started_at: None,
            logs,
            reported,
            sizes,
            epoch,
        }
    }

    fn new(step: &Step, target: &FileTarget, epoch: i64) -> Self {
        let logs = step
            .files
            .iter()
            .enumerate()
            .map(|(i, (name, src_path, _))| FileLog {
                step_instance_id: step.step_instance_id,
                bk_host_id: target.bk_host_id,
                mode: MODE_DOWNLOAD,
                seq: i32::try_from(i).unwrap_or(i32::MAX),
                src_host_id: 0,
                src_cloud_id: 0,
                src_ip: String::new(),
                src_path: src_path.clone(),
                dest_path: join(&step.target_dir, name),
                status: file_status::WAITING,
                size: 0,
                speed: 0,
                progress: 0,
                log_content: String::new(),
                start_time: None,
                end_time: None,
            })
            .collect::<Vec<_>>();
        let reported = vec![false; logs.len()];
        Self {
            step_instance_id: step.step_instance_id,
            bk_host_id: target.bk_host_id,
            started_at: None,
            logs,
            reported,
            sizes: step.files.iter().map(|(_, _, size)| *size).collect(),
            epoch,
        }
    }

    /// Takes one file's report; numbers from the agent are checked, a report for a file the
    /// step does not have, or one repeated, is dropped.
    pub(super) fn report(&mut self, report: FileReport) {
        let Ok(index) = usize::try_from(report.index) else {
            return;
        };
        let (Some(log), Some(seen)) = (self.logs.get_mut(index), self.reported.get_mut(index))
        else {
            tracing::warn!(
                step = self.step_instance_id,
                bk_host_id = self.bk_host_id,
                index,
                "the agent reported a file the task does not have"
            );
            return;
        };
        if *seen {
            return;
        }
        *seen = true;
        let now = now_ms();
        let start = plausible(report.started_at_ms, now);
        let end = plausible(report.finished_at_ms, now).max(start);
        // No more than the file holds, whatever the agent says.
        let known = self.sizes.get(index).copied().unwrap_or(0);
        let size = i64::try_from(report.bytes.min(known)).unwrap_or(i64::MAX);
        let elapsed_ms = (end - start).max(1);
        let speed = size.saturating_mul(1000) / elapsed_ms;
        let placed = report.ending == FileEnding::Placed;
        log.status = if placed {
            file_status::SUCCESS
        } else {
            file_status::FAILED
        };
        log.size = size;
        log.speed = speed;
        log.progress = if placed { 100 } else { 0 };
        log.start_time = Some(start);
        log.end_time = Some(end);
        let message = crate::host_run::cut(report.message, 4096);
        log.log_content = file_line(log, &describe(report.ending), &message);
    }

    /// The host's status and tag from the agent's result.
    pub(super) fn result(&mut self, result: TaskResult) -> (i32, String) {
        let message = result
            .message
            .map(|m| crate::host_run::cut(m, 4096))
            .unwrap_or_default();
        let status = match result.ending {
            Ending::Exited { code: 0 } if self.reported.iter().all(|r| *r) => host::SUCCESS,
            Ending::Exited { .. } => host::FILE_TASK_ERROR,
            Ending::UserNotFound => host::USER_NOT_EXIST,
            Ending::TimedOut => host::FILE_TIMEOUT,
            Ending::Cancelled => host::TERMINATE_SUCCESS,
            Ending::Signaled { .. } | Ending::InterpreterMissing | Ending::Failed => {
                host::AGENT_TASK_ERROR
            }
        };
        let failed = self
            .logs
            .iter()
            .filter(|l| l.status == file_status::FAILED)
            .map(|l| l.log_content.clone())
            .next();
        let tag = match (status, failed) {
            (s, Some(first)) if s != host::SUCCESS => {
                format!("{message}; first failure: {first}")
            }
            _ => message,
        };
        (status, tag)
    }

    /// Ends the host: the files not reported fail with `tag`, every file's log is stored, and
    /// the host's status is counted and written. Returns `status`.
    pub(super) async fn finish(
        mut self,
        engine: &Engine,
        job_instance_id: i64,
        status: i32,
        tag: String,
    ) -> i32 {
        self.close_unreported(&tag);
        if let Err(e) = engine.store.record_file_logs(&self.logs).await {
            tracing::error!(
                step = self.step_instance_id,
                bk_host_id = self.bk_host_id,
                "cannot store the file logs: {e}"
            );
        }
        crate::metrics::host_finished(status);
        engine
            .write_for(
                job_instance_id,
                Write::HostFinished {
                    stored: None,
                    step_instance_id: self.step_instance_id,
                    bk_host_id: self.bk_host_id,
                    outcome: HostOutcome {
                        status,
                        tag,
                        start_time: self.started_at,
                        end_time: now_ms(),
                        ..HostOutcome::default()
                    },
                    epoch: self.epoch,
                },
            )
            .await;
        status
    }

    /// Every file the agent did not report ends failed, with the host's reason.
    pub(super) fn close_unreported(&mut self, why: &str) {
        let now = now_ms();
        for (log, seen) in self.logs.iter_mut().zip(&self.reported) {
            if !*seen {
                log.status = file_status::FAILED;
                log.end_time = Some(now);
                log.log_content = file_line(log, "not written", why);
            }
        }
    }
}

pub(super) fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn describe(ending: FileEnding) -> String {
    match ending {
        FileEnding::Placed => "dest agent success download file",
        FileEnding::Denied => "permission denied",
        FileEnding::NoSpace => "no space left on the target",
        FileEnding::BadPath => "target path refused",
        FileEnding::HashMismatch => "SHA-256 mismatch",
        FileEnding::Skipped => "not written",
        FileEnding::Failed => "download failed",
    }
    .to_owned()
}

/// A file log's text, in bk-job's layout.
pub(super) fn file_line(log: &FileLog, state: &str, detail: &str) -> String {
    let at = log.end_time.unwrap_or_else(now_ms);
    let when = time::OffsetDateTime::from_unix_timestamp(at.div_euclid(1000))
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_default();
    format!(
        "[{when}] FileName: {} FileSize: {} State: {state} Speed: {} Progress: {}% StatusDesc: {state} Detail: {detail}",
        log.dest_path,
        human_size(log.size),
        human_speed(log.speed),
        log.progress,
    )
}

/// A size as bk-job writes it: `9.0 Bytes`, `1.5 KB`, `3.2 MB`.
pub fn human_size(bytes: i64) -> String {
    let units = ["Bytes", "KB", "MB", "GB", "TB"];
    let mut value = bytes.max(0) as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// A speed as bk-job writes it, in KB/s.
pub fn human_speed(bytes_per_second: i64) -> String {
    format!("{} KB/s", bytes_per_second.max(0) / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_bk_job_writes_them() {
        assert_eq!(human_size(9), "9.0 Bytes");
        assert_eq!(human_size(1536), "1.5 KB");
        assert_eq!(human_size(-1), "0.0 Bytes");
        assert_eq!(human_speed(4096), "4 KB/s");
        assert_eq!(join("/tmp/", "a"), "/tmp/a");
        assert_eq!(join("/tmp", "a"), "/tmp/a");
    }
}
