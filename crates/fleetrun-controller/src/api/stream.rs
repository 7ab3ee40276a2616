//! `stream_job`: a job's host states, output and status as newline-delimited JSON, sent as they
//! happen, until the job has ended and every byte of its output has been sent.
//!
//! bk-job's log APIs can only be polled; this one follows the store instead: whenever the writer
//! has committed something of the job (at least every [`FALLBACK`]), it reads the job, the step's
//! host results and the new log chunks, and writes what changed. That
//! is simple, serves running and finished jobs alike, and resumes exactly from byte `offsets`.
//! Errors found before the stream starts are answered with the usual envelope.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Extension, RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, header},
    response::Response,
};
use fleetrun_api::{HostStatus, JobStatus, StreamEvent};
use fleetrun_store::{HostResultRecord, LogChunk};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{
    ApiError,
    error::code,
    intake,
    params::lenient,
    request::{self, ApiRequest},
    scope,
};
use crate::Shared;

/// The store is read again when the writer commits something of the job; large steps, whose
/// every read is costly, are read at most this often.
const POLL: Duration = Duration::from_millis(100);
/// And at least this often, whatever the notifications say.
const FALLBACK: Duration = Duration::from_secs(1);
/// An idle stream sends `{"type":"ping"}` this often, so proxies keep it open.
const PING: Duration = Duration::from_secs(10);
/// Most log chunks read in one poll (a chunk is at most 64 KiB): bounds a poll's work and memory.
const CHUNKS_PER_POLL: i64 = 32;
/// Steps larger than this re-read their host results less often than every poll.
const HOSTS_PER_POLL: usize = 2_000;

#[derive(Debug, Deserialize)]
struct StreamRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    step_instance_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    host_id_list: Option<Vec<i64>>,
    #[serde(default)]
    offsets: Option<Value>,
}

/// `GET|POST /fleetrun/v1/stream_job`.
pub async fn stream_job(
    State(shared): State<Arc<Shared>>,
    Extension(gate): Extension<Arc<intake::Gate>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let api_request = ApiRequest::begin("stream_job");
    let prepared = api_request
        .run(prepare(
            &shared,
            &gate,
            &method,
            &headers,
            query.as_deref(),
            body,
        ))
        .await;
    let follower = match prepared {
        Ok(follower) => follower,
        Err(e) => return api_request.answer(Err(e)),
    };
    api_request.span().in_scope(|| {
        tracing::info!(
            job = follower.job_instance_id,
            step = follower.step_instance_id,
            "streaming"
        )
    });
    let (lines, receiver) = mpsc::channel(4);
    tokio::spawn(follower.run(lines).instrument(api_request.span().clone()));
    let mut response = Response::new(Body::from_stream(Lines(receiver)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    request::tag(&mut response, api_request.id());
    response
}

/// The response body: batches of lines from the follower task. Dropping it (the client went
/// away) closes the channel, which ends the task.
struct Lines(mpsc::Receiver<Bytes>);

impl futures_core::Stream for Lines {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|batch| batch.map(Ok))
    }
}

async fn prepare(
    shared: &Arc<Shared>,
    gate: &intake::Gate,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
) -> Result<Follower, ApiError> {
    // The turn covers the checks; a stream that follows a job for long holds only its connection.
    let intake::Admitted {
        params,
        caller,
        turn: _turn,
    } = intake::read(shared, gate, method, headers, query, body).await?;
    let req: StreamRequest = params.parse()?;
    let scope = scope::resolve(shared, &caller, &params)?;
    let job = shared
        .store
        .job(req.job_instance_id)
        .await?
        .filter(|job| scope.owns(&job.bk_scope_type, &job.bk_scope_id))
        .ok_or_else(|| {
            ApiError::new(
                code::JOB_NOT_FOUND,
                format!(
                    "job_instance_id: no job {} in {} {}",
                    req.job_instance_id, scope.scope_type, scope.scope_id
                ),
            )
        })?;
    let step = match req.step_instance_id {
        None => job.steps.first(),
        Some(id) => job.steps.iter().find(|s| s.step_instance_id == id),
    }
    .ok_or_else(|| {
        ApiError::new(
            code::STEP_NOT_FOUND,
            format!(
                "step_instance_id: job {} has no step {}",
                job.job_instance_id,
                req.step_instance_id.unwrap_or_default()
            ),
        )
    })?;
    let offsets = parse_offsets(req.offsets.as_ref())?;
    Ok(Follower {
        shared: shared.clone(),
        job_instance_id: job.job_instance_id,
        step_instance_id: step.step_instance_id,
        only: req
            .host_id_list
            .filter(|l| !l.is_empty())
            .map(HashSet::from_iter),
        offsets,
        hosts: Vec::new(),
        seen_status: None,
        sent_status: None,
    })
}

/// Reads `offsets`: `"host:bytes,host:bytes"`, or a JSON object `{"host": bytes}`.
fn parse_offsets(value: Option<&Value>) -> Result<HashMap<i64, i64>, ApiError> {
    let bad = |why: String| ApiError::invalid("offsets", why);
    let mut offsets = HashMap::new();
    let mut add = |host: &str, bytes: &str| {
        let host: i64 = host
            .trim()
            .parse()
            .map_err(|_| bad(format!("{host:?} is not a host id")))?;
        let bytes: i64 = bytes
            .trim()
            .parse()
            .ok()
            .filter(|b| *b >= 0)
            .ok_or_else(|| bad(format!("{bytes:?} is not a byte offset")))?;
        offsets.insert(host, bytes);
        Ok::<(), ApiError>(())
    };
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => {
            for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
                let (host, bytes) = pair
                    .split_once(':')
                    .ok_or_else(|| bad(format!("{pair:?} is not host:bytes")))?;
                add(host, bytes)?;
            }
        }
        Some(Value::Object(map)) => {
            for (host, bytes) in map {
                add(host, &lenient_text(bytes))?;
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "expected \"host:bytes,...\" or an object, got {other}"
            )));
        }
    }
    Ok(offsets)
}

fn lenient_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What the stream has told the client about one host.
#[derive(Debug)]
struct HostFollow {
    result: HostResultRecord,
    /// Bytes of the stored log read so far.
    read: i64,
    /// Read but not yet sent: the start of a UTF-8 sequence whose end is in the next chunk.
    held: Vec<u8>,
    /// Its task has ended and its whole log has been sent.
    drained: bool,
}

impl HostFollow {
    /// Takes a chunk of the host's log; returns the output event for its new bytes, if any.
    fn take(&mut self, chunk: &LogChunk) -> Option<StreamEvent> {
        let end = chunk.offset + chunk.data.len() as i64;
        if end <= self.read || chunk.offset > self.read {
            return None;
        }
        let skip = (self.read - chunk.offset) as usize;
        let start = self.read - self.held.len() as i64;
        let mut bytes = std::mem::take(&mut self.held);
        bytes.extend_from_slice(&chunk.data[skip..]);
        self.read = end;
        let keep = incomplete_utf8_tail(&bytes);
        self.held = bytes.split_off(bytes.len() - keep);
        self.output_event(start, &bytes)
    }

    /// Sends what is held back once nothing more can complete it.
    fn release(&mut self) -> Option<StreamEvent> {
        let bytes = std::mem::take(&mut self.held);
        self.output_event(self.read - bytes.len() as i64, &bytes)
    }

    fn output_event(&self, offset: i64, bytes: &[u8]) -> Option<StreamEvent> {
        (!bytes.is_empty()).then(|| StreamEvent::Output {
            bk_host_id: self.result.bk_host_id,
            offset,
            next_offset: offset + bytes.len() as i64,
            data: String::from_utf8_lossy(bytes).into_owned(),
        })
    }

    fn host_event(&self) -> StreamEvent {
        let r = &self.result;
        let status = HostStatus::from_code(r.status);
        StreamEvent::Host {
            bk_host_id: r.bk_host_id,
            bk_cloud_id: r.bk_cloud_id,
            ip: r.ip.clone(),
            status,
            exit_code: r.exit_code,
            tag: r.tag.clone(),
            finished: status.is_finished(),
        }
    }
}

/// How many bytes at the end of `bytes` begin a UTF-8 sequence that is not complete yet.
fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue;
        }
        let needed = match byte {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Follows one step of one job for one client.
struct Follower {
    shared: Arc<Shared>,
    job_instance_id: i64,
    step_instance_id: i64,
    /// Only these hosts, when the client asked for some.
    only: Option<HashSet<i64>>,
    /// Where each host's output starts, from the client's `offsets`.
    offsets: HashMap<i64, i64>,
    hosts: Vec<HostFollow>,
    /// The job's status at the last poll.
    seen_status: Option<JobStatus>,
    /// The status in the last job event sent.
    sent_status: Option<JobStatus>,
}

/// What one look at the store found.
struct Polled {
    /// The events to send.
    events: Vec<StreamEvent>,
    /// More log is waiting right now: look again without waiting.
    more_now: bool,
    /// The job has ended and everything of it has been sent.
    done: bool,
}

/// Why a stream stopped early.
enum Stop {
    /// The client went away.
    Gone,
    /// The job vanished or the store failed; the client may reconnect.
    Failed(String),
    /// The controller is stopping; the client may reconnect to the next one.
    Shutdown,
}

impl Follower {
    async fn run(mut self, lines: mpsc::Sender<Bytes>) {
        match self.follow(&lines).await {
            Ok(()) => tracing::info!(job = self.job_instance_id, "stream complete"),
            Err(Stop::Gone) => tracing::info!(job = self.job_instance_id, "client left"),
            Err(Stop::Failed(why)) => {
                tracing::error!(job = self.job_instance_id, "stream failed: {why}");
                let event = StreamEvent::Error {
                    message: "internal error; reconnect to resume".into(),
                };
                let _ = lines.send(encode(&[event])).await;
            }
            Err(Stop::Shutdown) => {
                let event = StreamEvent::Error {
                    message: "the controller is stopping; reconnect to resume".into(),
                };
                let _ = lines.send(encode(&[event])).await;
            }
        }
    }

    async fn follow(&mut self, lines: &mpsc::Sender<Bytes>) -> Result<(), Stop> {
        // A stream never completes on its own, and the HTTP server's graceful shutdown waits for
        // responses: streams end when the controller stops, and their clients reconnect.
        let shutdown = self.shared.shutdown.clone();
        let mut idle_since = tokio::time::Instant::now();
        let mut poll: u64 = 0;
        // Subscribed before the first read: nothing committed after it goes unnoticed.
        let watch = self
            .shared
            .store
            .watch_job(self.job_instance_id, self.step_instance_id);
        loop {
            let Polled {
                events,
                more_now,
                done,
            } = self.poll(poll).await?;
            poll += 1;
            if !events.is_empty() {
                lines.send(encode(&events)).await.map_err(|_| Stop::Gone)?;
                idle_since = tokio::time::Instant::now();
            }
            if done {
                return Ok(());
            }
            if more_now {
                continue;
            }
            if idle_since.elapsed() >= PING {
                let ping = encode(&[StreamEvent::Ping]);
                lines.send(ping).await.map_err(|_| Stop::Gone)?;
                idle_since = tokio::time::Instant::now();
            }
            tokio::select! {
                () = watch.changed() => {}
                () = tokio::time::sleep(FALLBACK) => {}
                () = lines.closed() => return Err(Stop::Gone),
                () = shutdown.cancelled() => return Err(Stop::Shutdown),
            }
            if self.hosts.len() > HOSTS_PER_POLL {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// One look at the store: the events to send, whether more log is waiting right now, and
    /// whether the stream is complete.
    async fn poll(&mut self, poll: u64) -> Result<Polled, Stop> {
        let shared = self.shared.clone();
        let store = &shared.store;
        let failed = |e: fleetrun_store::StoreError| Stop::Failed(e.to_string());
        // The job first: once it reads finished, every host result and log chunk written before
        // its end is committed, so the reads below see all of them.
        let job_status = store
            .job_status(self.job_instance_id)
            .await
            .map_err(failed)?
            .map(JobStatus::from_code)
            .ok_or_else(|| Stop::Failed("the job vanished".into()))?;
        let finished = job_status.is_finished();
        let first = self.seen_status.is_none();
        let job_changed = self.seen_status != Some(job_status);
        self.seen_status = Some(job_status);
        let mut events = Vec::new();
        // A running job's status changes are told at once; a finished job's only at the very end.
        let job_news = !finished && self.sent_status != Some(job_status);
        if job_news {
            self.sent_status = Some(job_status);
        }
        if first && job_news {
            events.push(self.job_event(job_status, false));
        }

        // Host results: every poll for ordinary steps, less often for very large ones.
        let every = (self.hosts.len() / HOSTS_PER_POLL).clamp(1, 20) as u64;
        let mut host_events = Vec::new();
        if first || job_changed || poll.is_multiple_of(every) {
            let results = store
                .host_results(self.step_instance_id)
                .await
                .map_err(failed)?;
            self.update_hosts(results, first, &mut host_events);
        }
        if first {
            events.append(&mut host_events);
        }

        // New output of the hosts that may have some.
        let positions: Vec<(i64, i64)> = self
            .hosts
            .iter()
            .filter(|h| {
                !h.drained
                    && (finished || HostStatus::from_code(h.result.status) != HostStatus::Waiting)
            })
            .map(|h| (h.result.bk_host_id, h.read))
            .collect();
        let chunks = store
            .log_chunks_from(self.step_instance_id, &positions, CHUNKS_PER_POLL)
            .await
            .map_err(failed)?;
        let complete = (chunks.len() as i64) < CHUNKS_PER_POLL;
        let index: HashMap<i64, usize> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.result.bk_host_id, i))
            .collect();
        for chunk in &chunks {
            if let Some(&i) = index.get(&chunk.bk_host_id) {
                events.extend(self.hosts[i].take(chunk));
            }
        }
        if complete {
            // Everything these hosts had stored is sent; a host whose task had ended before the
            // reads above writes no more.
            for host in &mut self.hosts {
                let ended = HostStatus::from_code(host.result.status).is_finished();
                if !host.drained && (ended || finished) {
                    host.drained = true;
                    events.extend(host.release());
                }
            }
        }
        events.append(&mut host_events);

        let done = finished && complete && self.hosts.iter().all(|h| h.drained);
        if job_news && !first {
            events.push(self.job_event(job_status, false));
        }
        if done {
            events.push(self.job_event(job_status, true));
        }
        Ok(Polled {
            events,
            more_now: !complete,
            done,
        })
    }

    fn update_hosts(
        &mut self,
        results: Vec<HostResultRecord>,
        first: bool,
        out: &mut Vec<StreamEvent>,
    ) {
        if first {
            self.hosts = results
                .into_iter()
                .filter(|r| self.only.as_ref().is_none_or(|o| o.contains(&r.bk_host_id)))
                .map(|result| {
                    let read = self.offsets.get(&result.bk_host_id).copied().unwrap_or(0);
                    HostFollow {
                        result,
                        read,
                        held: Vec::new(),
                        drained: false,
                    }
                })
                .collect();
            out.extend(self.hosts.iter().map(HostFollow::host_event));
            return;
        }
        let mut by_id: HashMap<i64, HostResultRecord> =
            results.into_iter().map(|r| (r.bk_host_id, r)).collect();
        for host in &mut self.hosts {
            let Some(new) = by_id.remove(&host.result.bk_host_id) else {
                continue;
            };
            let changed = new.status != host.result.status
                || new.exit_code != host.result.exit_code
                || new.tag != host.result.tag;
            host.result = new;
            if changed {
                out.push(host.host_event());
            }
        }
    }

    fn job_event(&self, status: JobStatus, finished: bool) -> StreamEvent {
        StreamEvent::Job {
            job_instance_id: self.job_instance_id,
            step_instance_id: self.step_instance_id,
            status,
            finished,
        }
    }
}

/// One line per event. Each goes through a `Value`, whose keys are sorted: the lines stay what
/// they were when the events were built as JSON objects.
fn encode(events: &[StreamEvent]) -> Bytes {
    let mut out = Vec::new();
    for event in events {
        // Serializing an event or a `Value` cannot fail today: every key is a string. Should a
        // change make it fail, the event is left out of the stream, and said so loudly.
        let line = serde_json::to_value(event).and_then(|value| serde_json::to_vec(&value));
        match line {
            Ok(line) => {
                out.extend_from_slice(&line);
                out.push(b'\n');
            }
            Err(error) => tracing::error!(
                %error,
                "a stream_job event could not be written as JSON and is left out of the stream"
            ),
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// An output event's offset, next offset and text.
    fn output(event: StreamEvent) -> (i64, i64, String) {
        match event {
            StreamEvent::Output {
                offset,
                next_offset,
                data,
                ..
            } => (offset, next_offset, data),
            other => panic!("not an output event: {other:?}"),
        }
    }

    #[test]
    fn offsets_are_read_from_text_or_an_object() {
        let text = parse_offsets(Some(&json!("1:10, 2:0,"))).unwrap();
        assert_eq!(text, HashMap::from([(1, 10), (2, 0)]));
        let object = parse_offsets(Some(&json!({"3": 5, "4": "7"}))).unwrap();
        assert_eq!(object, HashMap::from([(3, 5), (4, 7)]));
        assert!(parse_offsets(None).unwrap().is_empty());
        for bad in [json!("1"), json!("x:1"), json!("1:-1"), json!([1])] {
            let e = parse_offsets(Some(&bad)).unwrap_err();
            assert_eq!(e.code, code::BAD_REQUEST, "{bad}");
            assert!(e.message.starts_with("offsets:"), "{}", e.message);
        }
    }

    #[test]
    fn an_incomplete_utf8_sequence_waits_for_its_end() {
        assert_eq!(incomplete_utf8_tail(b"abc"), 0);
        assert_eq!(incomplete_utf8_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(&"é".as_bytes()[..1]), 1);
        assert_eq!(incomplete_utf8_tail(&"€".as_bytes()[..2]), 2);
        assert_eq!(incomplete_utf8_tail(&"😀".as_bytes()[..3]), 3);
        assert_eq!(incomplete_utf8_tail(b"\xff"), 0);
    }

    fn host() -> HostFollow {
        HostFollow {
            result: HostResultRecord {
                bk_host_id: 1,
                bk_cloud_id: 0,
                ip: "127.0.0.10".into(),
                status: 7,
                tag: String::new(),
                exit_code: None,
                error_code: 0,
                start_time: None,
                end_time: None,
                output_bytes: 0,
                dropped_bytes: 0,
                dropped_lines: 0,
                survivors: 0,
            },
            read: 0,
            held: Vec::new(),
            drained: false,
        }
    }

    fn chunk(offset: i64, data: &[u8]) -> LogChunk {
        LogChunk {
            bk_host_id: 1,
            offset,
            data: data.to_vec(),
        }
    }

    #[test]
    fn chunks_become_output_events_without_repeats_or_split_characters() {
        let mut h = host();
        let euro = "€".as_bytes();
        let first = h.take(&chunk(0, &[b"ab", &euro[..1]].concat())).unwrap();
        assert_eq!(output(first), (0, 2, "ab".into()));
        // The same chunk again (a re-read) gives nothing.
        assert!(h.take(&chunk(0, &[b"ab", &euro[..1]].concat())).is_none());
        let second = h.take(&chunk(3, &[&euro[1..], b"c"].concat())).unwrap();
        assert_eq!(output(second), (2, 6, "€c".into()));
        // A gap is not skipped over.
        assert!(h.take(&chunk(9, b"zz")).is_none());
        assert_eq!(h.read, 6);
    }

    #[test]
    fn a_resumed_host_starts_inside_a_chunk() {
        let mut h = host();
        h.read = 3;
        let event = h.take(&chunk(0, b"line1\n")).unwrap();
        assert_eq!(output(event), (3, 6, "e1\n".into()));
        let mut h = host();
        h.take(&chunk(0, &"é".as_bytes()[..1]));
        let released = h.release().unwrap();
        assert_eq!(output(released).2, "\u{fffd}");
        assert!(h.release().is_none());
    }

    #[test]
    fn lines_are_the_sorted_json_objects_they_always_were() {
        let event = StreamEvent::Host {
            bk_host_id: 1,
            bk_cloud_id: 0,
            ip: "10.0.0.1".into(),
            status: HostStatus::Running,
            exit_code: None,
            tag: String::new(),
            finished: false,
        };
        assert_eq!(
            &encode(&[event, StreamEvent::Ping])[..],
            b"{\"bk_cloud_id\":0,\"bk_host_id\":1,\"exit_code\":null,\"finished\":false,\"ip\":\"10.0.0.1\",\"status\":7,\"tag\":\"\",\"type\":\"host\"}\n{\"type\":\"ping\"}\n"
        );
    }
}
