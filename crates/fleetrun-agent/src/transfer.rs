//! File transfers between hosts (protocol version 5; resumed after a cut from version 6): a
//! [`TaskDown::Collect`] stream reads files on this host as an account and sends them in
//! content-addressed chunks; a [`TaskDown::Fetch`] stream writes files here as an account,
//! pulling each one's chunks from the controller.
//!
//! Memory is bounded on both sides: the reading thread hands chunks through a channel of
//! [`IN_FLIGHT`] chunks to the stream, and the stream hands received chunks to the writing
//! thread through one of the same size; QUIC's flow control pushes back beyond that. Neither
//! side ever holds a whole file.
//!
//! A fetch cut by a lost connection is not held in memory: the file being written stays on disk
//! under its partial name (`place`'s `resume_tag`, made of the job and step), and when the
//! controller sends the step's remaining files again over the next connection, the file's
//! chunks found there are checked against their hashes and only the rest is wanted
//! ([`TaskUp::WantFrom`]). The partial tag names the job, the step and the agent. Only a
//! connection that negotiated [`RESUME_PROTOCOL_VERSION`] keeps partials; each cut fetch's are
//! removed, as the account, if no fetch of the same step comes within the cut fetch's timeout
//! plus [`PARTIAL_MARGIN`] (the controller gave up: strict mode after a failure, the job
//! terminated, the agent back too late, the controller restarted). A collect cut short is not
//! resumed: the controller ends its paths.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, SystemTime};

use fleetrun_exec::collect::{self, CollectEnding, Collected, Collection};
use fleetrun_exec::place::{Content, FileToPlace, PlaceError, Placement, Pull, remove_partials};
use fleetrun_net::rate::{TokenBucket, pace};
use fleetrun_net::{FramedRecv, send_frame};
use fleetrun_proto::{
    CollectRequest, Ending, FILE_CHUNK, FetchRequest, RESUME_PROTOCOL_VERSION, SourceEnd,
    SourceEnding, SourceFile, TaskDown, TaskResult, TaskUp,
};
use tokio::sync::mpsc;

use crate::AgentContext;
use crate::files::{Pulling, ended, ms, run_placement};

/// Chunks waiting between a stream and the thread reading or writing files.
pub const IN_FLIGHT: usize = 4;

/// Why a request is refused before anything is read or written.
fn refused_account(ctx: &AgentContext, account: &str) -> Option<String> {
    let allowed = ctx.config.limits.accounts.as_ref()?;
    (!allowed.iter().any(|a| a == account)).then(|| {
        format!(
            "refused by this host's local limits: account {account:?} is not allowed here; the \
             agent runs tasks only as {} (limits.accounts)",
            allowed.join(", ")
        )
    })
}

/// Reads the stream on a task of its own (a frame read is not cancellation-safe), routing file
/// chunks to `chunks` and everything else to the returned receiver.
/// `lost` is set, before anything else sees the stream end, when the connection broke.
fn read_downs(
    mut recv: FramedRecv,
    chunks: Option<mpsc::Sender<(u32, Vec<u8>)>>,
    lost: Option<Arc<AtomicBool>>,
) -> mpsc::UnboundedReceiver<TaskDown> {
    let (down_tx, downs) = mpsc::unbounded_channel::<TaskDown>();
    tokio::spawn(async move {
        let mut chunks = chunks;
        loop {
            let down = match recv.recv::<TaskDown>().await {
                Ok(Some(down)) => down,
                Ok(None) => break,
                Err(e) => {
                    if let Some(lost) = &lost
                        && e.connection_error().is_some()
                    {
                        lost.store(true, Ordering::SeqCst);
                    }
                    break;
                }
            };
            match down {
                TaskDown::Chunk { index, data } => {
                    // Waiting here is the back-pressure: the stream is not read meanwhile. Once
                    // the writer is gone, chunks are dropped.
                    if let Some(tx) = &chunks
                        && tx.send((index, data)).await.is_err()
                    {
                        chunks = None;
                    }
                }
                other => {
                    // A cancel also ends a wait for chunks that may never come.
                    if other == TaskDown::Cancel {
                        chunks = None;
                    }
                    if down_tx.send(other).is_err() {
                        return;
                    }
                }
            }
        }
    });
    downs
}

/// Ends a stream: the result, then a short wait for the controller's acknowledgement.
async fn finish(
    mut send: quinn::SendStream,
    downs: &mut mpsc::UnboundedReceiver<TaskDown>,
    result: TaskResult,
) {
    if send_frame(&mut send, &TaskUp::Finished(result))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), downs.recv()).await;
    let _ = send.finish();
}

fn source_ending(ending: CollectEnding) -> SourceEnding {
    match ending {
        CollectEnding::Read => SourceEnding::Read,
        CollectEnding::NotFound => SourceEnding::NotFound,
        CollectEnding::Denied => SourceEnding::Denied,
        CollectEnding::BadPath => SourceEnding::BadPath,
        CollectEnding::Changed => SourceEnding::Changed,
        CollectEnding::Skipped => SourceEnding::Skipped,
        CollectEnding::Failed => SourceEnding::Failed,
    }
}

fn index32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

/// Serves one [`TaskDown::Collect`] to the end.
pub(crate) async fn collect(
    ctx: Arc<AgentContext>,
    mut send: quinn::SendStream,
    recv: FramedRecv,
    request: CollectRequest,
) {
    let mut downs = read_downs(recv, None, None);
    let started_at_ms = ms(SystemTime::now());
    tracing::info!(
        job = request.job_instance_id,
        step = request.step_instance_id,
        paths = request.paths.len(),
        "file source task"
    );
    if send_frame(&mut send, &TaskUp::Started { started_at_ms })
        .await
        .is_err()
    {
        return;
    }
    let result = match refused_account(&ctx, &request.account) {
        Some(reason) => ended(Ending::Failed, started_at_ms, reason),
        None => read_files(&ctx, &mut send, &mut downs, request, started_at_ms).await,
    };
    finish(send, &mut downs, result).await;
}

async fn read_files(
    ctx: &AgentContext,
    send: &mut quinn::SendStream,
    downs: &mut mpsc::UnboundedReceiver<TaskDown>,
    request: CollectRequest,
    started_at_ms: i64,
) -> TaskResult {
    let timeout_secs = request.timeout_secs;
    let deadline = tokio::time::sleep(Duration::from_secs(u64::from(timeout_secs.max(1))));
    tokio::pin!(deadline);
    let permit = tokio::select! {
        permit = ctx.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        () = &mut deadline => {
            return ended(Ending::TimedOut, started_at_ms, format!("timed out after {timeout_secs} s before a task slot was free"));
        }
        down = downs.recv() => match down {
            Some(TaskDown::Cancel) | None => {
                return ended(Ending::Cancelled, started_at_ms, "cancelled before a task slot was free".into());
            }
            Some(_) => return ended(Ending::Failed, started_at_ms, "unexpected message before the files were read".into()),
        },
    };
    let collection = Collection {
        account: request.account,
        paths: request.paths,
        refuse_root: ctx.config.limits.root_refusal(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<Collected>(IN_FLIGHT);
    let worker = {
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            collect::collect(collection, cancel, move |event| {
                tx.blocking_send(event).is_ok()
            })
        })
    };
    let mut bucket = TokenBucket::new(
        request.upload_bytes_per_sec,
        FILE_CHUNK as u64,
        tokio::time::Instant::now(),
    );
    let (mut timed_out, mut cancelled, mut listening) = (false, false, true);
    let (mut read, mut failed, mut bytes) = (0usize, 0usize, 0u64);
    // A file's log times are those of its sending (paced), not of its reading: the reading
    // thread runs ahead by what the channel holds.
    let mut sending_since: Option<i64> = None;
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                let up = match event {
                    Collected::File(found) => {
                        sending_since = Some(ms(SystemTime::now()));
                        TaskUp::SourceFile(SourceFile {
                        index: index32(found.index),
                        path_index: index32(found.path_index),
                        path: found.path.to_string_lossy().into_owned(),
                        relative: found.relative,
                        size: found.size,
                        mode: found.mode,
                    })
                    }
                    Collected::Chunk { sha256, data } => {
                        pace(&mut bucket, data.len() as u64).await;
                        TaskUp::SourceChunk { sha256, data }
                    }
                    Collected::End(end) => {
                        if end.ending == CollectEnding::Read {
                            read += 1;
                            bytes = bytes.saturating_add(end.bytes);
                        } else {
                            failed += 1;
                        }
                        let started_at_ms = match (end.index, sending_since.take()) {
                            (Some(_), Some(since)) => since,
                            _ => ms(end.started),
                        };
                        TaskUp::SourceFileEnd(SourceEnd {
                            index: end.index.map(index32),
                            path_index: index32(end.path_index),
                            ending: source_ending(end.ending),
                            sha256: end.sha256,
                            bytes: end.bytes,
                            started_at_ms,
                            finished_at_ms: ms(SystemTime::now()).max(ms(end.finished)),
                            message: end.message,
                        })
                    }
                };
                if send_frame(send, &up).await.is_err() {
                    cancel.store(true, Ordering::Relaxed);
                    rx.close();
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
    let (ending, message) = match outcome {
        Err(PlaceError::UserNotFound(name)) => (
            Ending::UserNotFound,
            format!("the account {name} does not exist on this host"),
        ),
        Err(e) => (Ending::Failed, e.to_string()),
        Ok(()) if timed_out => (
            Ending::TimedOut,
            format!("timed out after {timeout_secs} s: {read} files read"),
        ),
        Ok(()) if cancelled => (Ending::Cancelled, format!("cancelled: {read} files read")),
        Ok(()) => (
            Ending::Exited {
                code: i32::from(failed > 0),
            },
            format!("{read} files read, {bytes} bytes; {failed} failed"),
        ),
    };
    TaskResult {
        ending,
        started_at_ms,
        finished_at_ms: ms(SystemTime::now()),
        output_bytes: 0,
        survivors: 0,
        message: Some(message),
    }
}

/// Pulls a fetch's files chunk by chunk off the stream, each checked against its hash.
struct StreamPull {
    wants: mpsc::UnboundedSender<TaskUp>,
    chunks: mpsc::Receiver<(u32, Vec<u8>)>,
    /// Each file's chunk hashes.
    expected: Vec<Vec<[u8; 32]>>,
    /// The file wanted and how many of its chunks arrived.
    current: Option<(usize, usize)>,
    /// Set when the connection was lost under the stream.
    lost: Arc<AtomicBool>,
}

impl Pull for StreamPull {
    fn want(&mut self, index: usize, from: usize) -> Result<(), String> {
        let Some(hashes) = self.expected.get(index) else {
            return Err(format!("no file {index} in the task"));
        };
        let from = from.min(hashes.len());
        self.current = Some((index, from));
        if from == hashes.len() && from > 0 {
            // Every chunk is on disk already.
            return Ok(());
        }
        if from > 0 {
            tracing::info!(
                file = index,
                from_chunk = from,
                chunks = hashes.len(),
                "resuming a file from the chunks on disk that hash right"
            );
        }
        let want = if from == 0 {
            TaskUp::Want {
                index: index32(index),
            }
        } else {
            TaskUp::WantFrom {
                index: index32(index),
                chunk: index32(from),
            }
        };
        self.wants
            .send(want)
            .map_err(|_| "the task's stream is gone".to_owned())
    }

    fn chunk_hash(&self, index: usize, chunk: usize) -> Option<[u8; 32]> {
        self.expected.get(index)?.get(chunk).copied()
    }

    fn interrupted(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some((file, seen)) = self.current else {
            return Err("no file wanted".into());
        };
        let hashes = &self.expected[file];
        if seen == hashes.len() {
            return Ok(None);
        }
        loop {
            let Some((index, data)) = self.chunks.blocking_recv() else {
                return Err("the connection to the controller was lost".into());
            };
            // Chunks of a file wanted before, still in flight when it ended.
            if index as usize != file {
                continue;
            }
            if collect::sha256(&data) != hashes[seen] {
                return Err(format!(
                    "chunk {seen} of the file does not hash to its SHA-256"
                ));
            }
            self.current = Some((file, seen + 1));
            return Ok(Some(data));
        }
    }
}

/// The partial files' tag of one step's fetch on this agent: the job, the step, and the agent
/// (hashed), so that agents writing one step's files to a directory they share (a network file
/// system, or several agents on one machine) never continue each other's.
fn resume_tag(agent_id: &str, job_instance_id: i64, step_instance_id: i64) -> String {
    let agent = hex::encode(&collect::sha256(agent_id.as_bytes())[..4]);
    format!("{job_instance_id}-{step_instance_id}-{agent}")
}

/// Fetches of one step on this host run one after another: a try sent over a new connection
/// waits until the cut one has let go of the partial files it shares with it.
fn step_turn(job_instance_id: i64, step_instance_id: i64) -> Arc<tokio::sync::Mutex<()>> {
    type Turns = HashMap<(i64, i64), Weak<tokio::sync::Mutex<()>>>;
    static TURNS: LazyLock<std::sync::Mutex<Turns>> = LazyLock::new(Default::default);
    let mut turns = TURNS.lock().unwrap();
    turns.retain(|_, turn| turn.strong_count() > 0);
    let key = (job_instance_id, step_instance_id);
    if let Some(turn) = turns.get(&key).and_then(Weak::upgrade) {
        return turn;
    }
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    turns.insert(key, Arc::downgrade(&turn));
    turn
}

/// How long past a cut fetch's own timeout its kept partials wait for the next fetch of the step:
/// the controller's wait for the agent is bounded by the step's timeout plus its grace period.
pub const PARTIAL_MARGIN: Duration = Duration::from_secs(120);

/// How many fetches of each step this agent was sent, for the steps whose last fetch is running
/// or was cut and not yet given up: a cut fetch's partials are removed only if none came after.
static FETCHES: LazyLock<std::sync::Mutex<HashMap<(i64, i64), u64>>> =
    LazyLock::new(Default::default);

/// The number of the step's last fetch; with `bump`, a new one is numbered (numbers are never
/// reused, even for a step forgotten and fetched again).
fn fetch_generation(key: (i64, i64), bump: bool) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut seen = FETCHES.lock().unwrap();
    let generation = seen.entry(key).or_default();
    if bump {
        *generation = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    *generation
}

/// Forgets the step's count if `generation` is still its last fetch: nothing of the step is
/// left to wait for. Whether it was the last.
fn fetch_done(key: (i64, i64), generation: u64) -> bool {
    let mut seen = FETCHES.lock().unwrap();
    if seen.get(&key) == Some(&generation) {
        seen.remove(&key);
        true
    } else {
        false
    }
}

/// Removes what `placement` (of the step `key`, the fetch numbered `generation`) kept after a
/// cut, after `delay`, unless another fetch of the step came meanwhile. Returns how many
/// partials were removed.
fn forget_partials_after(
    placement: Placement,
    key: (i64, i64),
    generation: u64,
    delay: Duration,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if !fetch_done(key, generation) {
            return 0;
        }
        match tokio::task::spawn_blocking(move || remove_partials(placement)).await {
            Ok(Ok(removed)) => {
                if removed > 0 {
                    tracing::info!(
                        job = key.0,
                        step = key.1,
                        removed,
                        "removed the partial files of a cut transfer that was not resumed"
                    );
                }
                removed
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    job = key.0,
                    step = key.1,
                    "cannot remove the partial files of a cut transfer: {e}"
                );
                0
            }
            Err(_) => 0,
        }
    })
}

/// Serves one [`TaskDown::Fetch`] to the end. `protocol_version` is the one negotiated on its
/// connection: below [`RESUME_PROTOCOL_VERSION`] no partial file is kept after a cut.
pub(crate) async fn fetch(
    ctx: Arc<AgentContext>,
    mut send: quinn::SendStream,
    recv: FramedRecv,
    request: FetchRequest,
    protocol_version: u32,
) {
    let key = (request.job_instance_id, request.step_instance_id);
    let generation = fetch_generation(key, true);
    let turn = step_turn(request.job_instance_id, request.step_instance_id);
    let _turn = turn.lock().await;
    let (chunk_tx, chunk_rx) = mpsc::channel(IN_FLIGHT);
    let lost = Arc::new(AtomicBool::new(false));
    let mut downs = read_downs(recv, Some(chunk_tx), Some(lost.clone()));
    let started_at_ms = ms(SystemTime::now());
    tracing::info!(
        job = request.job_instance_id,
        step = request.step_instance_id,
        files = request.files.len(),
        "file transfer task"
    );
    if send_frame(&mut send, &TaskUp::Started { started_at_ms })
        .await
        .is_err()
    {
        return;
    }
    if let Some(reason) = refused_account(&ctx, &request.account) {
        let result = ended(Ending::Failed, started_at_ms, reason);
        finish(send, &mut downs, result).await;
        return;
    }
    let (want_tx, want_rx) = mpsc::unbounded_channel();
    let pull = StreamPull {
        wants: want_tx,
        chunks: chunk_rx,
        expected: request.files.iter().map(|f| f.chunks.clone()).collect(),
        current: None,
        lost: lost.clone(),
    };
    let placement = Placement {
        task_tag: uuid::Uuid::new_v4().simple().to_string(),
        resume_tag: (protocol_version >= RESUME_PROTOCOL_VERSION).then(|| {
            resume_tag(
                &ctx.agent_id,
                request.job_instance_id,
                request.step_instance_id,
            )
        }),
        account: request.account,
        // Each file names its directory.
        target_dir: "/".into(),
        strict: request.strict,
        files: request
            .files
            .into_iter()
            .map(|f| FileToPlace {
                name: f.name,
                dir: Some(f.dir.into()),
                mode: f.mode,
                sha256: f.sha256,
                content: Content::Pulled { size: f.size },
            })
            .collect(),
        refuse_root: ctx.config.limits.root_refusal(),
    };
    let pulling = Pulling {
        pull: Box::new(pull),
        wants: want_rx,
    };
    let kept = placement.resume_tag.is_some().then(|| placement.clone());
    let result = run_placement(
        &ctx,
        &mut send,
        &mut downs,
        placement,
        Some(pulling),
        request.timeout_secs,
        started_at_ms,
    )
    .await;
    finish(send, &mut downs, result).await;
    match kept {
        Some(kept) if lost.load(Ordering::Relaxed) => {
            let delay = Duration::from_secs(u64::from(request.timeout_secs)) + PARTIAL_MARGIN;
            drop(forget_partials_after(kept, key, generation, delay));
        }
        _ => {
            fetch_done(key, generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use fleetrun_exec::place::partial_name;

    use super::*;

    /// A placement of one pulled file into `dir` as root, resumable under `tag`, and the path
    /// of its partial file, written there as a cut try would have left it.
    fn kept(dir: &std::path::Path, tag: &str) -> (Placement, std::path::PathBuf) {
        let file = FileToPlace {
            name: "big.bin".into(),
            dir: Some(dir.to_path_buf()),
            mode: 0o644,
            sha256: [7; 32],
            content: Content::Pulled {
                size: 4 * FILE_CHUNK as u64,
            },
        };
        let partial = dir.join(partial_name(tag, &file));
        std::fs::write(&partial, vec![1u8; FILE_CHUNK]).unwrap();
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600)).unwrap();
        let placement = Placement {
            task_tag: "t".into(),
            resume_tag: Some(tag.into()),
            account: "root".into(),
            target_dir: "/".into(),
            strict: false,
            files: vec![file],
            refuse_root: None,
        };
        (placement, partial)
    }

    #[tokio::test]
    async fn a_kept_partial_is_removed_after_its_deadline_unless_the_step_came_back() {
        assert!(nix::unistd::geteuid().is_root(), "the tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let deadline = Duration::from_millis(300);

        // No fetch of the step after the cut one: the partial goes at its deadline, not before.
        let key = (-101, -1);
        let generation = fetch_generation(key, true);
        let (placement, partial) = kept(dir.path(), "gone");
        let removal = forget_partials_after(placement, key, generation, deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(partial.exists(), "kept until the deadline");
        assert_eq!(removal.await.unwrap(), 1);
        assert!(!partial.exists(), "removed after the deadline");
        assert!(
            !FETCHES.lock().unwrap().contains_key(&key),
            "the step is forgotten"
        );

        // The step's fetch came again: its partial is the new fetch's to continue.
        let key = (-102, -1);
        let generation = fetch_generation(key, true);
        let (placement, partial) = kept(dir.path(), "back");
        let removal = forget_partials_after(placement, key, generation, deadline);
        fetch_generation(key, true);
        assert_eq!(removal.await.unwrap(), 0);
        assert!(partial.exists(), "left for the resumed fetch");
    }
}
