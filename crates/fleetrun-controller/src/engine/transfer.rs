//! File transfers (`fast_transfer_file`): files read on source hosts, or uploaded to the
//! controller, written on every target host.
//!
//! A step runs in two phases. First each source host gets one [`TaskDown::Collect`]: its agent
//! reads the matching files as the source account and streams them in content-addressed chunks,
//! which the controller checks (each file's name against the path asked for, each chunk's
//! SHA-256, the whole file's) and keeps once in the
//! content store, so a source is read once however many targets there are. Then each target gets
//! one [`TaskDown::Fetch`] naming every file with its chunks' hashes; its agent pulls each file
//! ([`TaskUp::Want`]) and the controller streams that file's chunks from the store
//! ([`TaskDown::Chunk`]), paced by `download_speed_limit`. One chunk per target is in the
//! controller's memory at a time, and QUIC's flow control bounds what is in flight.
//!
//! Upload logs (mode 0) are written per source file under the source host; download logs
//! (mode 1) per (target, file) under the target. A source file that is missing ends its targets
//! 203, one that could not be read 202 (in strict mode nothing is sent then); the rest as file
//! tasks end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fleetrun_net::rate::{TokenBucket, pace};
use fleetrun_net::{FramedRecv, describe_connection_error, send_frame};
use fleetrun_proto::{
    CollectRequest, FILE_CHUNK, FetchFile, FetchRequest, SourceEnding, TaskDown, TaskUp,
    encode_frame,
};
use fleetrun_store::FileLog;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::files::{
    FileDispatch, FileHostRun, FileRun, file_line, file_status, join, no_later_than, plausible,
};
use super::{Engine, FileTarget, Finishing, MODE_DOWNLOAD, MODE_UPLOAD, now_ms, target_path};
use crate::content::{ContentStore, Hash};
use crate::gateway::AgentLink;
use crate::status::host;

mod requested;
use requested::{Fit, Requested};

/// Most files one source stream may announce.
const MAX_FILES_PER_SOURCE: usize = 100_000;
/// Most bytes of names and messages one source stream may make the controller hold.
const MAX_HELD_BYTES_PER_SOURCE: usize = 32 * 1024 * 1024;
/// Longest name or message kept from a source.
const MAX_NAME: usize = 4096;

/// The first protocol version that carries transfers.
pub const TRANSFER_PROTOCOL_VERSION: u32 = 5;

/// bk-job's host statuses a transfer adds.
pub mod transfer_status {
    /// COPYFILE_FAILED: a source file could not be read.
    pub const COPY_FAILED: i32 = 202;
    /// COPYFILE_SOURCE_FILE_NOT_EXIST.
    pub const SOURCE_NOT_FOUND: i32 = 203;
}

/// A source host and what to read there.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub host: FileTarget,
    pub account: String,
    pub paths: Vec<String>,
}

/// A file uploaded to the controller's content store.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub name: String,
    /// The path the request named it by.
    pub path: String,
    pub size: u64,
    pub sha256: Hash,
    pub chunks: Vec<Hash>,
}

impl LocalFile {
    /// The file as the content store records it.
    pub fn stored(&self) -> crate::content::StoredFile {
        crate::content::StoredFile {
            size: self.size,
            sha256: crate::content::hex(&self.sha256),
            chunks: self.chunks.iter().map(crate::content::hex).collect(),
        }
    }
}

/// A transfer step ready to run, as created by the API.
#[derive(Clone)]
pub struct TransferSpec {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub sources: Vec<SourceSpec>,
    pub locals: Vec<LocalFile>,
    pub targets: Vec<FileTarget>,
    /// The target account.
    pub account: String,
    /// `file_target_path` as given, variables unresolved.
    pub target_path: String,
    pub target_name: Option<String>,
    pub strict: bool,
    pub timeout_secs: u32,
    pub upload_bytes_per_sec: u64,
    pub download_bytes_per_sec: u64,
    /// When the job was created (the time `[DATE:…]` names).
    pub create_time: i64,
    pub content: Arc<ContentStore>,
}

impl std::fmt::Debug for TransferSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferSpec")
            .field("job_instance_id", &self.job_instance_id)
            .field("sources", &self.sources.len())
            .field("locals", &self.locals.len())
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

/// A file ready in the content store.
#[derive(Debug, Clone)]
struct Gathered {
    src: Option<FileTarget>,
    src_path: String,
    relative: String,
    size: u64,
    mode: u32,
    sha256: Hash,
    chunks: Vec<Hash>,
}

/// A source path or file that gave nothing to send.
#[derive(Debug, Clone)]
struct SourceFailure {
    src: Option<FileTarget>,
    src_path: String,
    status: i32,
    reason: String,
}

/// What one source host gave.
#[derive(Debug, Default)]
struct Collected {
    files: Vec<Gathered>,
    failures: Vec<SourceFailure>,
    uploads: Vec<FileLog>,
    bytes_read: u64,
}

/// A transfer's sources read, ready for its targets (phase 2), all at once or batch by batch.
pub(super) struct PreparedTransfer {
    pub(super) dispatch: FileDispatch,
    step: Arc<FetchStep>,
    /// The chunks the step pinned in the content store.
    pinned: Arc<std::sync::Mutex<Vec<Hash>>>,
    bytes_read: u64,
}

impl PreparedTransfer {
    /// Once no target will ask for a chunk any more: logs what the step cost the sources and
    /// the controller, and unpins its chunks.
    pub(super) fn end(self, targets: usize) {
        tracing::info!(
            job = self.step.job_instance_id,
            targets,
            source_bytes_read = self.bytes_read,
            controller_bytes_relayed = self.step.relayed.load(Ordering::Relaxed),
            "transfer ended"
        );
        self.step.content.unpin(self.pinned.lock().unwrap().iter());
    }
}

/// What every target's run shares.
pub(super) struct FetchStep {
    job_instance_id: i64,
    step_instance_id: i64,
    account: String,
    timeout_secs: u32,
    download_bytes_per_sec: u64,
    files: Vec<FetchFile>,
    /// Each file's chunk hashes, shared by every target's sender.
    chunks: Arc<Vec<Vec<Hash>>>,
    /// Each file's source, for its log.
    sources: Vec<(Option<FileTarget>, String)>,
    failures: Vec<SourceFailure>,
    frame: Result<Bytes, String>,
    content: Arc<ContentStore>,
    relayed: AtomicU64,
}

fn source_of(src: &Option<FileTarget>) -> (i64, i64, String) {
    src.as_ref().map_or((0, 0, String::new()), |h| {
        (h.bk_host_id, h.bk_cloud_id, h.ip.clone())
    })
}

/// Whether a resolved target directory is one an agent accepts.
fn valid_dir(dir: &str) -> bool {
    dir.starts_with('/')
        && dir.len() <= 4096
        && !dir.chars().any(|c| c < ' ' || c == '\u{7f}')
        && !dir.split('/').any(|p| p == "." || p == "..")
}

/// Whether a relative name from a source is plain components.
fn valid_relative(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 4096
        && name.split('/').count() <= 64
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.len() <= 255
                && !c.chars().any(|ch| ch < ' ' || ch == '\u{7f}')
        })
}

impl Engine {
    /// Starts a transfer step in the background; false if the job is running already.
    pub fn start_transfer(&self, spec: TransferSpec) -> bool {
        let job_instance_id = spec.job_instance_id;
        self.start_file_run(job_instance_id, move |engine, cancel| async move {
            engine.run_transfer(spec, cancel).await;
        })
    }

    async fn run_transfer(&self, spec: TransferSpec, cancel: CancellationToken) {
        let started = self
            .job_started_now(spec.job_instance_id, spec.step_instance_id)
            .await;
        let (job_instance_id, step_instance_id) = (spec.job_instance_id, spec.step_instance_id);
        let targets: Vec<i64> = spec.targets.iter().map(|t| t.bk_host_id).collect();
        let prepared = self.prepare_transfer(spec, &cancel).await;
        // Phase 2: every target pulls the files.
        let mut hosts = JoinSet::new();
        let mut host_of_task = HashMap::with_capacity(targets.len());
        self.spawn_file_hosts(
            &prepared.dispatch,
            job_instance_id,
            step_instance_id,
            &targets,
            &cancel,
            &mut hosts,
            &mut host_of_task,
        )
        .await;
        let finishing = Finishing {
            job_instance_id,
            step_instance_id,
            hosts: targets.len(),
            started,
            all_succeeded: true,
        };
        self.finish_job(finishing, hosts, host_of_task, &cancel)
            .await;
        prepared.end(targets.len());
    }

    /// Phase 1: reads every source once into the content store (chunks pinned until
    /// [`PreparedTransfer::end`]), then makes the one `Fetch` every target is sent.
    pub(super) async fn prepare_transfer(
        &self,
        spec: TransferSpec,
        cancel: &CancellationToken,
    ) -> PreparedTransfer {
        let spec = Arc::new(spec);
        let clock = tokio::time::Instant::now();
        let pinned: Arc<std::sync::Mutex<Vec<Hash>>> = Arc::default();
        // The local files' chunks are pinned before anything else: reading the source hosts
        // may take up to the step's timeout, and a kept file's record may expire meanwhile.
        // Pinned, a chunk still there stays; one already gone is said so, for that file.
        let mut locals = Vec::with_capacity(spec.locals.len());
        let mut failures: Vec<SourceFailure> = Vec::new();
        for local in &spec.locals {
            spec.content.pin(&local.chunks);
            pinned.lock().unwrap().extend(local.chunks.iter().copied());
        }
        let content = spec.content.clone();
        let chunks: Vec<Vec<Hash>> = spec.locals.iter().map(|l| l.chunks.clone()).collect();
        let missing = tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .map(|c| content.first_missing(c))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(
                job = spec.job_instance_id,
                "cannot look for local chunks: {e}"
            );
            vec![None; spec.locals.len()]
        });
        for (local, missing) in spec.locals.iter().zip(missing) {
            match missing {
                None => locals.push(local),
                Some(hash) => failures.push(SourceFailure {
                    src: None,
                    src_path: local.path.clone(),
                    status: transfer_status::SOURCE_NOT_FOUND,
                    reason: format!(
                        "the local file's chunk {} is no longer in the controller's content \
                         store; upload the file and submit the job again",
                        crate::content::hex(&hash)
                    ),
                }),
            }
        }
        // Phase 1: every source read once, into the content store.
        let mut sources = JoinSet::new();
        for source in spec.sources.iter().cloned() {
            let engine = self.clone();
            let spec = spec.clone();
            let cancel = cancel.clone();
            let pinned = pinned.clone();
            sources
                .spawn(async move { engine.collect_from(&spec, source, &cancel, &pinned).await });
        }
        let mut gathered: Vec<Gathered> = Vec::new();
        let mut uploads: Vec<FileLog> = Vec::new();
        let mut bytes_read = 0u64;
        while let Some(joined) = sources.join_next().await {
            match joined {
                Ok(collected) => {
                    gathered.extend(collected.files);
                    failures.extend(collected.failures);
                    uploads.extend(collected.uploads);
                    bytes_read += collected.bytes_read;
                }
                Err(e) => tracing::error!(job = spec.job_instance_id, "source task failed: {e}"),
            }
        }
        for (seq, log) in uploads.iter_mut().enumerate() {
            log.seq = i32::try_from(seq).unwrap_or(i32::MAX);
        }
        if let Err(e) = self.store.record_file_logs(&uploads).await {
            tracing::error!(
                job = spec.job_instance_id,
                "cannot store the upload logs: {e}"
            );
        }
        for local in locals {
            gathered.push(Gathered {
                src: None,
                src_path: local.path.clone(),
                relative: local.name.clone(),
                size: local.size,
                mode: 0o644,
                sha256: local.sha256,
                chunks: local.chunks.clone(),
            });
        }
        // Where each file lands.
        let mut files = Vec::with_capacity(gathered.len());
        let mut file_sources = Vec::with_capacity(gathered.len());
        let mut landing = HashSet::new();
        for file in gathered {
            let (_, _, ip) = source_of(&file.src);
            let source_ip = if ip.is_empty() { "local" } else { &ip };
            let dir = target_path::resolve(&spec.target_path, source_ip, spec.create_time);
            let name = match &spec.target_name {
                Some(renamed) => match file.relative.split_once('/') {
                    Some((_, inner)) => format!("{renamed}/{inner}"),
                    None => renamed.clone(),
                },
                None => file.relative.clone(),
            };
            let refuse = |reason: String| SourceFailure {
                src: file.src.clone(),
                src_path: file.src_path.clone(),
                status: transfer_status::COPY_FAILED,
                reason,
            };
            if !valid_dir(&dir) {
                failures.push(refuse(format!(
                    "the target path resolves to {dir:?}, not an absolute path without . or .."
                )));
                continue;
            }
            if !valid_relative(&name) {
                failures.push(refuse(format!("{name:?} is not a plain relative name")));
                continue;
            }
            if !landing.insert((dir.clone(), name.clone())) {
                failures.push(refuse(format!(
                    "another source file lands at {} too; sent once",
                    join(&dir, &name)
                )));
                continue;
            }
            file_sources.push((file.src.clone(), file.src_path.clone()));
            files.push(FetchFile {
                dir,
                name,
                mode: file.mode,
                size: file.size,
                sha256: file.sha256,
                chunks: file.chunks,
            });
        }
        let remaining = u64::from(spec.timeout_secs).saturating_sub(clock.elapsed().as_secs());
        let timeout_secs = u32::try_from(remaining.max(1)).unwrap_or(u32::MAX);
        let request = TaskDown::Fetch(FetchRequest {
            task_id: Uuid::nil(),
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            account: spec.account.clone(),
            strict: spec.strict,
            timeout_secs,
            files: files.clone(),
        });
        let frame = encode_frame(&request).map_err(|e| e.to_string());
        drop(request);
        let step = Arc::new(FetchStep {
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            account: spec.account.clone(),
            timeout_secs,
            download_bytes_per_sec: spec.download_bytes_per_sec,
            chunks: Arc::new(files.iter().map(|f| f.chunks.clone()).collect()),
            files,
            sources: file_sources,
            failures,
            frame,
            content: spec.content.clone(),
            relayed: AtomicU64::new(0),
        });
        PreparedTransfer {
            dispatch: FileDispatch::new(
                &spec.targets,
                FileRun::Fetch {
                    step: step.clone(),
                    strict: spec.strict,
                },
            ),
            step,
            pinned,
            bytes_read,
        }
    }

    /// Phase 1 on one source host.
    async fn collect_from(
        &self,
        spec: &TransferSpec,
        source: SourceSpec,
        cancel: &CancellationToken,
        pinned: &std::sync::Mutex<Vec<Hash>>,
    ) -> Collected {
        let mut collected = Collected::default();
        let fail_all = |collected: &mut Collected, status: i32, reason: String| {
            for path in &source.paths {
                collected.failures.push(SourceFailure {
                    src: Some(source.host.clone()),
                    src_path: path.clone(),
                    status,
                    reason: reason.clone(),
                });
                collected.uploads.push(upload_log(
                    spec,
                    &source.host,
                    path,
                    0,
                    None,
                    &reason,
                    false,
                ));
            }
        };
        let Some(link) = self.agents.get(source.host.bk_host_id) else {
            fail_all(
                &mut collected,
                transfer_status::COPY_FAILED,
                format!(
                    "source host {} is offline: its agent is not connected",
                    source.host.ip
                ),
            );
            return collected;
        };
        if link.protocol_version < TRANSFER_PROTOCOL_VERSION {
            fail_all(
                &mut collected,
                transfer_status::COPY_FAILED,
                format!(
                    "the source host's agent speaks protocol version {}; transfers need version \
                     {TRANSFER_PROTOCOL_VERSION}: upgrade the agent",
                    link.protocol_version
                ),
            );
            return collected;
        }
        let request = TaskDown::Collect(CollectRequest {
            task_id: Uuid::new_v4(),
            job_instance_id: spec.job_instance_id,
            step_instance_id: spec.step_instance_id,
            account: source.account.clone(),
            paths: source.paths.clone(),
            upload_bytes_per_sec: spec.upload_bytes_per_sec,
            timeout_secs: spec.timeout_secs,
        });
        let (mut send, recv) = match link.connection.open_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                fail_all(
                    &mut collected,
                    transfer_status::COPY_FAILED,
                    format!(
                        "cannot reach the source host's agent: {}",
                        describe_connection_error(&e)
                    ),
                );
                return collected;
            }
        };
        if let Err(e) = send_frame(&mut send, &request).await {
            fail_all(
                &mut collected,
                transfer_status::COPY_FAILED,
                format!("cannot send the source task: {e}"),
            );
            return collected;
        }
        let mut recv = FramedRecv::new(recv);
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(u64::from(spec.timeout_secs))
            + self.agent_grace;
        let mut reading = SourceReading::new(spec, &source);
        let mut cancel_sent = false;
        let ended: Option<String> = loop {
            let up = tokio::select! {
                up = recv.recv::<TaskUp>() => up,
                () = tokio::time::sleep_until(deadline) => {
                    let _ = send_frame(&mut send, &TaskDown::Cancel).await;
                    break Some(format!("the source sent no result within the timeout ({} s)", spec.timeout_secs));
                }
                () = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    let _ = send_frame(&mut send, &TaskDown::Cancel).await;
                    continue;
                }
            };
            match up {
                Ok(Some(TaskUp::Started { .. })) => {}
                Ok(Some(TaskUp::SourceFile(file))) => reading.file(file),
                Ok(Some(TaskUp::SourceChunk { sha256, data })) => {
                    if let Some(hash) = reading.chunk(sha256, &data) {
                        let store = spec.content.clone();
                        let stored =
                            tokio::task::spawn_blocking(move || store.put_chunk(&hash, &data))
                                .await;
                        match stored {
                            Ok(Ok(())) => {
                                spec.content.pin([&hash]);
                                pinned.lock().unwrap().push(hash);
                                reading.stored(hash);
                            }
                            Ok(Err(e)) => reading.refuse(e.to_string()),
                            Err(e) => reading.refuse(e.to_string()),
                        }
                    }
                }
                Ok(Some(TaskUp::SourceFileEnd(end))) => reading.end(end),
                Ok(Some(TaskUp::Finished(result))) => {
                    let _ = send_frame(&mut send, &TaskDown::ResultStored).await;
                    let _ = send.finish();
                    break match result.ending {
                        fleetrun_proto::Ending::Exited { .. } => None,
                        fleetrun_proto::Ending::UserNotFound => Some(format!(
                            "the account {} does not exist on the source host",
                            source.account
                        )),
                        _ => Some(crate::host_run::cut(
                            result
                                .message
                                .unwrap_or_else(|| "the source task failed".into()),
                            1024,
                        )),
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) => break Some("the source closed its stream without a result".into()),
                Err(e) => {
                    break Some(format!("the connection to the source host was lost: {e}"));
                }
            }
        };
        reading.finish(ended, &mut collected);
        collected
    }

    /// Phase 2 on one target host, to its final status.
    pub(super) async fn transfer_host(
        &self,
        step: &FetchStep,
        target: FileTarget,
        epoch: i64,
        strict: bool,
        cancel: CancellationToken,
    ) -> i32 {
        let mut logs: Vec<FileLog> = step
            .files
            .iter()
            .zip(&step.sources)
            .map(|(file, (src, src_path))| {
                let (src_host_id, src_cloud_id, src_ip) = source_of(src);
                FileLog {
                    step_instance_id: step.step_instance_id,
                    bk_host_id: target.bk_host_id,
                    mode: MODE_DOWNLOAD,
                    seq: 0,
                    src_host_id,
                    src_cloud_id,
                    src_ip,
                    src_path: src_path.clone(),
                    dest_path: join(&file.dir, &file.name),
                    status: file_status::WAITING,
                    size: 0,
                    speed: 0,
                    progress: 0,
                    log_content: String::new(),
                    start_time: None,
                    end_time: None,
                }
            })
            .collect();
        let fetched = logs.len();
        let now = now_ms();
        for failure in &step.failures {
            let (src_host_id, src_cloud_id, src_ip) = source_of(&failure.src);
            let mut log = FileLog {
                step_instance_id: step.step_instance_id,
                bk_host_id: target.bk_host_id,
                mode: MODE_DOWNLOAD,
                seq: 0,
                src_host_id,
                src_cloud_id,
                src_ip,
                src_path: failure.src_path.clone(),
                dest_path: String::new(),
                status: file_status::FAILED,
                size: 0,
                speed: 0,
                progress: 0,
                log_content: String::new(),
                start_time: Some(now),
                end_time: Some(now),
            };
            log.log_content = file_line(&log, "source file unavailable", &failure.reason);
            logs.push(log);
        }
        for (seq, log) in logs.iter_mut().enumerate() {
            log.seq = i32::try_from(seq).unwrap_or(i32::MAX);
        }
        let sizes = step.files.iter().map(|f| f.size).collect();
        let mut run =
            FileHostRun::with_logs(step.step_instance_id, target.bk_host_id, epoch, logs, sizes);
        for seen in run.reported.iter_mut().skip(fetched) {
            *seen = true;
        }
        // The worst source failure decides the status of a host that got everything else.
        let source_status = step
            .failures
            .iter()
            .map(|f| f.status)
            .max_by_key(|s| i32::from(*s == transfer_status::SOURCE_NOT_FOUND));
        let (mut status, mut tag) = if strict && let Some(status) = source_status {
            let first = &step.failures[0];
            (
                status,
                format!(
                    "nothing sent in strict mode: {} on {}: {}",
                    first.src_path,
                    source_of(&first.src).2,
                    first.reason
                ),
            )
        } else if step.files.is_empty() {
            (
                source_status.unwrap_or(transfer_status::SOURCE_NOT_FOUND),
                "no source file to send".into(),
            )
        } else {
            self.fetch(step, &target, &mut run, strict, &cancel).await
        };
        if status == host::SUCCESS
            && let Some(source_status) = source_status
        {
            status = source_status;
            tag = format!(
                "{tag}; {} source file(s) could not be sent, first: {}",
                step.failures.len(),
                step.failures[0].reason
            );
        }
        run.finish(self, step.job_instance_id, status, tag).await
    }

    /// Phase 2 on one target: the fetch, sent again over the agent's next connection each time
    /// a cut ends a try (agents of [`RESUME_PROTOCOL_VERSION`]), with the files not yet
    /// reported; the agent continues a file it was writing from the chunks it holds. A host
    /// whose agent does not come back ends at the step's timeout plus the grace period.
    async fn fetch(
        &self,
        step: &FetchStep,
        target: &FileTarget,
        run: &mut FileHostRun,
        strict: bool,
        cancel: &CancellationToken,
    ) -> (i32, String) {
        let (frame, mut link) = match self.file_task_link(
            &step.frame,
            target.bk_host_id,
            "transfer task",
            ("file transfers", TRANSFER_PROTOCOL_VERSION),
        ) {
            Ok(ready) => ready,
            Err(ended) => return ended,
        };
        let grace = self.agent_grace;
        let bound =
            tokio::time::Instant::now() + Duration::from_secs(u64::from(step.timeout_secs)) + grace;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut frame = frame;
        let mut order: Vec<usize> = (0..step.files.len()).collect();
        // The first file of the step the agent reported failed, in any try.
        let failed = |run: &FileHostRun| {
            run.logs
                .iter()
                .zip(&run.reported)
                .take(step.files.len())
                .find(|(log, seen)| **seen && log.status != file_status::SUCCESS)
                .map(|(log, _)| log.log_content.clone())
        };
        loop {
            let why = match self
                .fetch_try(
                    step,
                    target,
                    run,
                    cancel,
                    &link,
                    frame,
                    &order,
                    &mut deadline,
                )
                .await
            {
                Try::Ended(status, tag) if order.len() == step.files.len() => {
                    return (status, tag);
                }
                Try::Ended(status, tag) => {
                    // A resumed try's agent was sent only the files not yet reported, so its
                    // result speaks of those alone: a file that failed in an earlier try still
                    // fails the host, and the tag counts the step's files.
                    let placed = run
                        .logs
                        .iter()
                        .zip(&run.reported)
                        .take(step.files.len())
                        .filter(|(log, seen)| **seen && log.status == file_status::SUCCESS)
                        .count();
                    let count = step.files.len();
                    return match failed(run) {
                        Some(first) if status == host::SUCCESS => (
                            host::FILE_TASK_ERROR,
                            format!(
                                "{placed} of {count} files placed after a resume; \
                                 first failure: {first}"
                            ),
                        ),
                        _ => (
                            status,
                            format!("{placed} of {count} files placed after a resume; {tag}"),
                        ),
                    };
                }
                Try::Lost(why) => why,
            };
            if link.protocol_version < RESUME_PROTOCOL_VERSION {
                return (host::AGENT_ABNORMAL, why);
            }
            if cancel.is_cancelled() {
                return (
                    host::TERMINATE_SUCCESS,
                    format!("{why}; terminated before the agent came back"),
                );
            }
            if strict && let Some(first) = failed(run) {
                return (
                    host::FILE_TASK_ERROR,
                    format!("{why}; not resumed in strict mode after a failure: {first}"),
                );
            }
            order = (0..step.files.len())
                .filter(|i| !run.reported[*i])
                .collect();
            if order.is_empty() {
                // Every file was reported; only the agent's result was lost with the link.
                return match failed(run) {
                    None => (
                        host::SUCCESS,
                        format!("every file placed; {why} before the agent's result"),
                    ),
                    Some(first) => (
                        host::FILE_TASK_ERROR,
                        format!("{why} before the agent's result; first failure: {first}"),
                    ),
                };
            }
            let until = deadline.map_or(bound, |d| d.min(bound));
            link = match self
                .agent_back(target.bk_host_id, &link, until, cancel)
                .await
            {
                Back::Linked(next) if next.protocol_version < TRANSFER_PROTOCOL_VERSION => {
                    return (
                        host::AGENT_ABNORMAL,
                        format!(
                            "{why}; the agent came back speaking protocol version {}, which \
                             cannot take file transfers (version {TRANSFER_PROTOCOL_VERSION}): \
                             upgrade the agent",
                            next.protocol_version
                        ),
                    );
                }
                Back::Linked(next) => next,
                Back::TimedOut => {
                    return (
                        host::AGENT_ABNORMAL,
                        format!(
                            "{why}; the agent did not come back within the step's timeout ({} s) \
                             plus the grace period",
                            step.timeout_secs
                        ),
                    );
                }
                Back::Cancelled => {
                    return (
                        host::TERMINATE_SUCCESS,
                        format!("{why}; terminated before the agent came back"),
                    );
                }
            };
            // The resumed try ends by the same bound, whether or not the cut try had started.
            deadline = Some(until);
            let left = until
                .saturating_duration_since(tokio::time::Instant::now())
                .saturating_sub(grace);
            let request = TaskDown::Fetch(FetchRequest {
                task_id: Uuid::nil(),
                job_instance_id: step.job_instance_id,
                step_instance_id: step.step_instance_id,
                account: step.account.clone(),
                strict,
                timeout_secs: u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX),
                files: order.iter().map(|i| step.files[*i].clone()).collect(),
            });
            frame = match encode_frame(&request) {
                Ok(frame) => frame,
                Err(e) => {
                    return (
                        host::AGENT_TASK_ERROR,
                        format!("{why}; cannot encode the resumed transfer task: {e}"),
                    );
                }
            };
            tracing::info!(
                job = step.job_instance_id,
                bk_host_id = target.bk_host_id,
                files = order.len(),
                "transfer resumed on the agent's new connection"
            );
        }
    }

    /// Waits until the agent is connected again over a connection other than `gone`'s.
    async fn agent_back(
        &self,
        bk_host_id: i64,
        gone: &AgentLink,
        until: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Back {
        let gone_id = gone.connection.stable_id();
        loop {
            if let Some(link) = self.agents.get(bk_host_id)
                && link.connection.stable_id() != gone_id
                && link.connection.close_reason().is_none()
            {
                return Back::Linked(link);
            }
            tokio::select! {
                () = tokio::time::sleep(AGENT_BACK_POLL) => {}
                () = tokio::time::sleep_until(until) => return Back::TimedOut,
                () = cancel.cancelled() => return Back::Cancelled,
            }
        }
    }

    /// One try of a target's fetch, over `link`: `frame` holds the files `order` names, in
    /// that order (the agent's indices are positions in it).
    #[allow(clippy::too_many_arguments)]
    async fn fetch_try(
        &self,
        step: &FetchStep,
        target: &FileTarget,
        run: &mut FileHostRun,
        cancel: &CancellationToken,
        link: &AgentLink,
        frame: Bytes,
        order: &[usize],
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Try {
        let (mut send, recv) = match link.connection.open_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                return Try::Lost(format!(
                    "cannot reach the agent: {}",
                    describe_connection_error(&e)
                ));
            }
        };
        if let Err(e) = send.write_chunk(frame).await {
            let why = format!("cannot send the transfer task to the agent: {e}");
            // Only a lost connection may be resumed over the next one; a stream the agent
            // stopped while its connection lives would be stopped again.
            return if matches!(e, quinn::WriteError::ConnectionLost(_)) {
                Try::Lost(why)
            } else {
                Try::Ended(host::AGENT_ABNORMAL, why)
            };
        }
        let chunks: Arc<Vec<Vec<Hash>>> = if order.len() == step.files.len() {
            step.chunks.clone()
        } else {
            Arc::new(order.iter().map(|i| step.chunks[*i].clone()).collect())
        };
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (failed, mut chunk_failure) = tokio::sync::oneshot::channel();
        let sender = tokio::spawn(send_chunks(
            send,
            command_rx,
            chunks,
            step.content.clone(),
            step.download_bytes_per_sec,
            failed,
        ));
        // Why the controller could not send a chunk: the host's task error, not a termination.
        let mut send_failure: Option<String> = None;
        let mut recv = FramedRecv::new(recv);
        let grace = self.agent_grace;
        let mut cancel_sent = false;
        let ended = loop {
            let sleep_until = deadline.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
            });
            let up = tokio::select! {
                up = recv.recv::<TaskUp>() => up,
                () = tokio::time::sleep_until(sleep_until) => {
                    let _ = commands.send(Command::Cancel);
                    break Try::Ended(
                        host::FILE_TIMEOUT,
                        format!(
                            "the agent sent no result within the task's timeout ({} s) plus the grace period",
                            step.timeout_secs
                        ),
                    );
                }
                () = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    let _ = commands.send(Command::Cancel);
                    let bound = tokio::time::Instant::now() + grace;
                    no_later_than(deadline, bound);
                    continue;
                }
                why = &mut chunk_failure, if send_failure.is_none() => {
                    // The sender has cancelled the agent's task; its result still comes.
                    send_failure = Some(why.unwrap_or_else(|_| "the chunk sender stopped".into()));
                    let bound = tokio::time::Instant::now() + grace;
                    no_later_than(deadline, bound);
                    continue;
                }
            };
            let want = |index: u32, from: u32| {
                if (index as usize) < order.len() {
                    let _ = commands.send(Command::Want { index, from });
                } else {
                    tracing::warn!(
                        bk_host_id = target.bk_host_id,
                        index,
                        "the agent wants a file the transfer does not have"
                    );
                }
            };
            match up {
                Ok(Some(TaskUp::Started { started_at_ms })) => {
                    self.file_task_started(
                        step.job_instance_id,
                        step.timeout_secs,
                        run,
                        started_at_ms,
                        deadline,
                    )
                    .await;
                }
                Ok(Some(TaskUp::Want { index })) => want(index, 0),
                Ok(Some(TaskUp::WantFrom { index, chunk })) => want(index, chunk),
                Ok(Some(TaskUp::FilePlaced(mut report))) => {
                    // Only the files sent; the rows after them are the sources' failures.
                    if let Some(file) = order.get(report.index as usize) {
                        report.index = u32::try_from(*file).unwrap_or(u32::MAX);
                        run.report(report);
                    }
                }
                Ok(Some(TaskUp::Finished(result))) => {
                    let (status, tag) = run.result(result);
                    let _ = commands.send(Command::ResultStored);
                    break Try::Ended(status, tag);
                }
                Ok(Some(other)) => {
                    tracing::debug!(
                        bk_host_id = target.bk_host_id,
                        "ignored in a transfer: {other:?}"
                    );
                }
                Ok(None) => {
                    break Try::Ended(
                        host::AGENT_ABNORMAL,
                        "the agent closed the transfer's stream without a result".into(),
                    );
                }
                Err(e) => {
                    let why =
                        format!("the connection to the agent was lost during the transfer: {e}");
                    break if e.connection_error().is_some() && !cancel_sent {
                        Try::Lost(why)
                    } else {
                        Try::Ended(host::AGENT_ABNORMAL, why)
                    };
                }
            }
        };
        drop(commands);
        if let Ok(relayed) = sender.await {
            step.relayed.fetch_add(relayed, Ordering::Relaxed);
        }
        match (send_failure, ended) {
            (Some(why), _) if !cancel_sent => Try::Ended(
                host::AGENT_TASK_ERROR,
                format!("the controller could not send the files: {why}"),
            ),
            (_, ended) => ended,
        }
    }
}

/// How one try of a target's fetch ended.
enum Try {
    /// The host's status and tag.
    Ended(i32, String),
    /// The connection was cut: the fetch may go on over the next one.
    Lost(String),
}

/// Whether an agent whose connection was cut came back.
enum Back {
    Linked(AgentLink),
    TimedOut,
    Cancelled,
}

/// How often a fetch waiting for its agent to reconnect looks for the new connection.
const AGENT_BACK_POLL: Duration = Duration::from_millis(200);

pub use fleetrun_proto::RESUME_PROTOCOL_VERSION;

/// What a target's stream is told besides chunks.
#[derive(Debug)]
enum Command {
    /// File `index`'s chunks from chunk `from` on.
    Want {
        index: u32,
        from: u32,
    },
    Cancel,
    ResultStored,
}

/// Sends the chunks of each file the agent wants, from the store, paced; a newer want stops the
/// file being sent. Returns the bytes sent.
async fn send_chunks(
    mut send: quinn::SendStream,
    mut commands: mpsc::UnboundedReceiver<Command>,
    files: Arc<Vec<Vec<Hash>>>,
    content: Arc<ContentStore>,
    rate: u64,
    failed: tokio::sync::oneshot::Sender<String>,
) -> u64 {
    let mut failed = Some(failed);
    let mut bucket = TokenBucket::new(rate, FILE_CHUNK as u64, tokio::time::Instant::now());
    let mut pending: Option<Command> = None;
    let mut sent = 0u64;
    loop {
        let command = match pending.take() {
            Some(command) => command,
            None => match commands.recv().await {
                Some(command) => command,
                None => break,
            },
        };
        match command {
            Command::Want { index, from } => {
                let Some(hashes) = files.get(index as usize) else {
                    continue;
                };
                for hash in hashes.iter().skip(from as usize) {
                    if let Ok(next) = commands.try_recv() {
                        pending = Some(next);
                        break;
                    }
                    let store = content.clone();
                    let hash = *hash;
                    let read = tokio::task::spawn_blocking(move || store.read_chunk(&hash)).await;
                    let why = match read {
                        Ok(Ok(data)) => Ok(data),
                        Ok(Err(e)) => {
                            Err(format!("cannot read a chunk from the content store: {e}"))
                        }
                        Err(e) => Err(format!(
                            "reading a chunk from the content store failed: {e}"
                        )),
                    };
                    let data = match why {
                        Ok(data) => data,
                        Err(why) => {
                            tracing::error!("{why}");
                            // The agent would wait for it: its task is cancelled, and the host
                            // ends with this reason rather than as terminated.
                            if let Some(failed) = failed.take() {
                                let _ = failed.send(why);
                            }
                            let _ = send_frame(&mut send, &TaskDown::Cancel).await;
                            break;
                        }
                    };
                    pace(&mut bucket, data.len() as u64).await;
                    let len = data.len() as u64;
                    if send_frame(&mut send, &TaskDown::Chunk { index, data })
                        .await
                        .is_err()
                    {
                        return sent;
                    }
                    sent += len;
                }
            }
            Command::Cancel => {
                let _ = send_frame(&mut send, &TaskDown::Cancel).await;
            }
            Command::ResultStored => {
                let _ = send_frame(&mut send, &TaskDown::ResultStored).await;
                let _ = send.finish();
                break;
            }
        }
    }
    sent
}

/// A source stream's files as they arrive, each checked: its name against the path asked for,
/// sizes, the chunks' hashes (checked again by the store), and the whole file's hash against
/// what the agent claims. What the stream makes the controller hold is bounded: names and
/// messages are cut or refused past [`MAX_NAME`], and all of them together past
/// [`MAX_HELD_BYTES_PER_SOURCE`] end the stream's files.
struct SourceReading<'a> {
    spec: &'a TransferSpec,
    source: &'a SourceSpec,
    /// Each path as asked for.
    requested: Vec<Requested>,
    /// Files announced, by index.
    files: Vec<Arrived>,
    /// The one whose chunks are arriving.
    current: Option<usize>,
    /// Paths that gave nothing, with why.
    path_failures: Vec<(usize, SourceEnding, String, i64, i64)>,
    /// Paths whose files the controller stopped taking, with why (one each).
    cut_short: Vec<(usize, String)>,
    /// Bytes of names and messages held.
    held: usize,
}

struct Arrived {
    path_index: usize,
    relative: String,
    size: u64,
    mode: u32,
    received: u64,
    hasher: ring::digest::Context,
    chunks: Vec<Hash>,
    /// Why the controller refuses the file, if it does.
    refused: Option<String>,
    /// The name is the directory asked for: only a failure may come under it.
    dir_itself: bool,
    end: Option<fleetrun_proto::SourceEnd>,
}

impl<'a> SourceReading<'a> {
    fn new(spec: &'a TransferSpec, source: &'a SourceSpec) -> Self {
        Self {
            spec,
            source,
            requested: source.paths.iter().map(|p| Requested::parse(p)).collect(),
            files: Vec::new(),
            current: None,
            path_failures: Vec::new(),
            cut_short: Vec::new(),
            held: 0,
        }
    }

    /// Stops taking files for a path, once.
    fn cut_short(&mut self, path_index: usize, why: String) {
        if !self.cut_short.iter().any(|(i, _)| *i == path_index) {
            self.cut_short.push((path_index, why));
        }
    }

    fn file(&mut self, file: fleetrun_proto::SourceFile) {
        self.current = None;
        let path_index = file.path_index as usize;
        // Files come numbered in order; anything else is not a file of this task.
        if file.index as usize != self.files.len() || path_index >= self.source.paths.len() {
            return;
        }
        if self.files.len() >= MAX_FILES_PER_SOURCE {
            return self.cut_short(
                path_index,
                format!(
                    "the source announced more than {MAX_FILES_PER_SOURCE} files; the rest were \
                     not taken"
                ),
            );
        }
        let fleetrun_proto::SourceFile {
            relative,
            size,
            mode,
            ..
        } = file;
        let (relative, refused, dir_itself) = if relative.len() > MAX_NAME {
            (
                String::new(),
                Some(format!(
                    "the source announced a name of {} bytes; at most {MAX_NAME} are taken",
                    relative.len()
                )),
                false,
            )
        } else if !valid_relative(&relative) {
            let why = format!("{relative:?} is not a plain relative name");
            (String::new(), Some(why), false)
        } else {
            match self.requested[path_index].fit(&relative) {
                Fit::File => (relative, None, false),
                Fit::DirItself => (relative, None, true),
                Fit::No => {
                    let why = format!(
                        "the source announced {relative:?}, which {} does not name",
                        self.source.paths[path_index]
                    );
                    (String::new(), Some(why), false)
                }
            }
        };
        let weight = relative.len() + refused.as_ref().map_or(0, String::len) + 256;
        if self.held + weight > MAX_HELD_BYTES_PER_SOURCE {
            return self.cut_short(
                path_index,
                format!(
                    "the source's names and messages passed {MAX_HELD_BYTES_PER_SOURCE} bytes; \
                     the rest were not taken"
                ),
            );
        }
        self.held += weight;
        self.files.push(Arrived {
            path_index,
            relative,
            size,
            mode: mode & 0o777,
            received: 0,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            chunks: Vec::new(),
            refused,
            dir_itself,
            end: None,
        });
        self.current = Some(self.files.len() - 1);
    }

    /// A chunk of the current file: the hash to store it under, unless the file is refused.
    fn chunk(&mut self, sha256: Hash, data: &[u8]) -> Option<Hash> {
        let file = self.files.get_mut(self.current?)?;
        if file.refused.is_some() || file.end.is_some() {
            return None;
        }
        file.received = file.received.saturating_add(data.len() as u64);
        if data.len() > FILE_CHUNK || file.received > file.size {
            file.refused = Some("the source sent more than the file's size".into());
            return None;
        }
        file.hasher.update(data);
        Some(sha256)
    }

    fn stored(&mut self, hash: Hash) {
        if let Some(file) = self.current.and_then(|i| self.files.get_mut(i)) {
            file.chunks.push(hash);
        }
    }

    fn refuse(&mut self, why: String) {
        if let Some(file) = self.current.and_then(|i| self.files.get_mut(i))
            && file.refused.is_none()
        {
            file.refused = Some(format!("not kept on the controller: {why}"));
        }
    }

    fn end(&mut self, mut end: fleetrun_proto::SourceEnd) {
        end.message = crate::host_run::cut(end.message, MAX_NAME);
        let weight = end.message.len() + 64;
        match end.index {
            None => {
                let path_index = end.path_index as usize;
                if path_index < self.source.paths.len()
                    && self.held + weight <= MAX_HELD_BYTES_PER_SOURCE
                    && !self.path_failures.iter().any(|f| f.0 == path_index)
                {
                    self.held += weight;
                    self.path_failures.push((
                        path_index,
                        end.ending,
                        end.message,
                        end.started_at_ms,
                        end.finished_at_ms,
                    ));
                }
            }
            Some(index) => {
                if self.held + weight <= MAX_HELD_BYTES_PER_SOURCE
                    && let Some(file) = self.files.get_mut(index as usize)
                    && file.end.is_none()
                {
                    self.held += weight;
                    file.end = Some(end);
                }
                self.current = None;
            }
        }
    }

    /// The files, failures and upload logs, once the stream ended (`ended` says why, when it
    /// ended early). A path that gave no file and no failure (the source ended before it, or
    /// said nothing of it) fails too, so no target ends well with files missing.
    fn finish(self, ended: Option<String>, collected: &mut Collected) {
        let host = &self.source.host;
        let mut answered = vec![false; self.source.paths.len()];
        let fail = |collected: &mut Collected,
                    path: String,
                    status: i32,
                    reason: String,
                    timing: Option<(i64, i64)>| {
            collected.uploads.push(upload_log(
                self.spec, host, &path, 0, timing, &reason, false,
            ));
            collected.failures.push(SourceFailure {
                src: Some(host.clone()),
                src_path: path,
                status,
                reason,
            });
        };
        for (path_index, ending, message, _, _) in self.path_failures {
            let status = match ending {
                SourceEnding::NotFound => transfer_status::SOURCE_NOT_FOUND,
                _ => transfer_status::COPY_FAILED,
            };
            answered[path_index] = true;
            let path = self.source.paths[path_index].clone();
            fail(collected, path, status, message, None);
        }
        for (path_index, why) in self.cut_short {
            answered[path_index] = true;
            let path = self.source.paths[path_index].clone();
            fail(collected, path, transfer_status::COPY_FAILED, why, None);
        }
        for file in self.files {
            answered[file.path_index] = true;
            let digest = file.hasher.finish();
            let failure = match (&file.refused, &file.end) {
                (Some(why), _) => Some((transfer_status::COPY_FAILED, why.clone())),
                (None, None) => Some((
                    transfer_status::COPY_FAILED,
                    ended
                        .clone()
                        .unwrap_or_else(|| "the source did not finish the file".into()),
                )),
                (None, Some(end)) if end.ending != SourceEnding::Read => {
                    let status = match end.ending {
                        SourceEnding::NotFound => transfer_status::SOURCE_NOT_FOUND,
                        _ => transfer_status::COPY_FAILED,
                    };
                    Some((status, end.message.clone()))
                }
                (None, Some(_)) if file.dir_itself => Some((
                    transfer_status::COPY_FAILED,
                    "the source sent a file where a directory was asked for".into(),
                )),
                (None, Some(end)) => {
                    if file.received != file.size || end.bytes != file.size {
                        Some((
                            transfer_status::COPY_FAILED,
                            format!(
                                "{} bytes arrived of the {} announced",
                                file.received, file.size
                            ),
                        ))
                    } else if digest.as_ref() != end.sha256 {
                        Some((
                            transfer_status::COPY_FAILED,
                            "what arrived does not hash to the SHA-256 the source reported".into(),
                        ))
                    } else {
                        None
                    }
                }
            };
            let timing = file
                .end
                .as_ref()
                .map(|e| (e.started_at_ms, e.finished_at_ms));
            // The path a log shows comes from the request, never from the agent.
            let path = self.requested[file.path_index]
                .shown(&file.relative)
                .filter(|_| !file.relative.is_empty())
                .unwrap_or_else(|| self.source.paths[file.path_index].clone());
            match failure {
                Some((status, reason)) => fail(collected, path, status, reason, timing),
                None => {
                    let mut sha256 = [0u8; 32];
                    sha256.copy_from_slice(digest.as_ref());
                    collected.bytes_read += file.size;
                    collected.uploads.push(upload_log(
                        self.spec,
                        host,
                        &path,
                        file.size,
                        timing,
                        "source agent success upload file",
                        true,
                    ));
                    collected.files.push(Gathered {
                        src: Some(host.clone()),
                        src_path: path,
                        relative: file.relative,
                        size: file.size,
                        mode: file.mode,
                        sha256,
                        chunks: file.chunks,
                    });
                }
            }
        }
        for (path_index, answered) in answered.into_iter().enumerate() {
            if !answered {
                let reason = ended
                    .clone()
                    .unwrap_or_else(|| "the source reported nothing for this path".into());
                let path = self.source.paths[path_index].clone();
                fail(collected, path, transfer_status::COPY_FAILED, reason, None);
            }
        }
    }
}

/// One upload log row (its `seq` is set when the step's rows are together).
fn upload_log(
    spec: &TransferSpec,
    host: &FileTarget,
    path: &str,
    size: u64,
    timing: Option<(i64, i64)>,
    detail: &str,
    success: bool,
) -> FileLog {
    let now = now_ms();
    let (start, end) = timing.map_or((now, now), |(s, e)| (plausible(s, now), plausible(e, now)));
    let end = end.max(start);
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let mut log = FileLog {
        step_instance_id: spec.step_instance_id,
        bk_host_id: host.bk_host_id,
        mode: MODE_UPLOAD,
        seq: 0,
        src_host_id: host.bk_host_id,
        src_cloud_id: host.bk_cloud_id,
        src_ip: host.ip.clone(),
        src_path: path.to_owned(),
        dest_path: String::new(),
        status: if success {
            file_status::SUCCESS
        } else {
            file_status::FAILED
        },
        size,
        speed: size.saturating_mul(1000) / (end - start).max(1),
        progress: if success { 100 } else { 0 },
        log_content: String::new(),
        start_time: Some(start),
        end_time: Some(end),
    };
    let state = if success {
        "upload success"
    } else {
        "upload failed"
    };
    log.log_content = crate::host_run::cut(file_line_upload(&log, state, detail), 8192);
    log
}

fn file_line_upload(log: &FileLog, state: &str, detail: &str) -> String {
    // The same layout as a download's line, naming the source path.
    let mut named = log.clone();
    named.dest_path = log.src_path.clone();
    file_line(&named, state, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_are_plain() {
        for good in ["a", "dir/a", "dir/sub/a.txt"] {
            assert!(valid_relative(good), "{good}");
        }
        for bad in ["", "/a", "a/", "a//b", "../a", "a/../b", "a/./b", "a\nb"] {
            assert!(!valid_relative(bad), "{bad:?}");
        }
        assert!(valid_dir("/data/10.0.0.1/"));
        assert!(!valid_dir("/data/../etc"));
        assert!(!valid_dir("data"));
    }
}
