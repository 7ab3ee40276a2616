//! The delivery of a held task to a stream, fed by hand: what goes up, and when the task is
//! forgotten.

use super::*;
use tokio::sync::mpsc;

impl Frames for Vec<TaskUp> {
    async fn send(&mut self, up: TaskUp) -> Result<(), StreamError> {
        self.push(up);
        Ok(())
    }
}

fn meta(produced: u64, marks: Vec<Mark>) -> Meta {
    Meta {
        task_id: Uuid::new_v4(),
        job_instance_id: 1,
        step_instance_id: 2,
        bk_host_id: 3,
        execute_count: 0,
        started_at_ms: Some(1_000),
        produced,
        marks,
        acked_offset: 0,
        result: None,
        controller: None,
        hold_until_ms: None,
    }
}

fn result(finished_at_ms: i64) -> TaskResult {
    TaskResult {
        ending: Ending::Exited { code: 0 },
        started_at_ms: 1_000,
        finished_at_ms,
        output_bytes: 0,
        survivors: 0,
        message: None,
    }
}

fn held(meta: Meta, ownership: Ownership, output: &[u8]) -> Arc<Held> {
    let held = Held::new(
        meta,
        Output::Memory(MemoryOutput::new(Arc::default())),
        ownership,
        CancellationToken::new(),
    );
    held.output.write_at(0, output).unwrap();
    Arc::new(held)
}

/// Lets the stream catch up, its reads on the blocking pool included.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

fn count(frames: &[TaskUp], what: impl Fn(&TaskUp) -> bool) -> usize {
    frames.iter().filter(|f| what(f)).count()
}

#[tokio::test]
async fn a_truncation_is_sent_once_however_often_the_task_wakes_the_stream() {
    let marks = vec![Mark::Truncated {
        offset: 3,
        dropped_bytes: 100,
        dropped_lines: 4,
    }];
    let held = held(meta(3, marks), Ownership::Agent, b"abc");
    let (tx, mut down) = mpsc::unbounded_channel();
    let delivering = held.clone();
    let stream = tokio::spawn(async move {
        let mut frames = Vec::new();
        let delivered = deliver(&delivering, &mut frames, &mut down, 0).await;
        (delivered, frames)
    });
    // Changes that bring no new output nor mark (a save, an acknowledged offset).
    for _ in 0..3 {
        settle().await;
        held.bump();
    }
    settle().await;
    held.state.lock().unwrap().result = Some(result(2_000));
    held.bump();
    settle().await;
    tx.send(Down::ResultStored).unwrap();
    let (delivered, frames) = stream.await.unwrap();
    assert_eq!(delivered.unwrap(), Delivered::Stored);
    assert_eq!(
        count(&frames, |f| matches!(f, TaskUp::Truncated { .. })),
        1,
        "{frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(TaskUp::Finished(_))),
        "{frames:?}"
    );
}

#[tokio::test]
async fn a_resume_past_the_truncation_does_not_send_it_again() {
    let marks = vec![Mark::Truncated {
        offset: 2,
        dropped_bytes: 100,
        dropped_lines: 4,
    }];
    let held = held(meta(5, marks), Ownership::Agent, b"abcde");
    held.state.lock().unwrap().result = Some(result(2_000));
    let (tx, mut down) = mpsc::unbounded_channel();
    tx.send(Down::ResultStored).unwrap();
    let mut frames = Vec::new();
    let delivered = deliver(&held, &mut frames, &mut down, 3).await.unwrap();
    assert_eq!(delivered, Delivered::Stored);
    assert_eq!(count(&frames, |f| matches!(f, TaskUp::Truncated { .. })), 0);
    assert!(frames.contains(&TaskUp::Output {
        offset: 3,
        data: b"de".to_vec()
    }));
}

#[tokio::test]
async fn an_acknowledgement_before_the_result_releases_the_task() {
    // The controller ended the host on its own account (its deadline) and stored that: the
    // task, still running, is not held for a result nobody will read.
    let held = held(meta(2, Vec::new()), Ownership::Agent, b"ab");
    let (tx, mut down) = mpsc::unbounded_channel();
    tx.send(Down::ResultStored).unwrap();
    let mut frames = Vec::new();
    let delivered = tokio::time::timeout(
        Duration::from_secs(10),
        deliver(&held, &mut frames, &mut down, 0),
    )
    .await
    .expect("the acknowledgement was not taken");
    assert_eq!(delivered.unwrap(), Delivered::Stored);
}

#[tokio::test]
async fn a_controller_of_version_1_is_never_sent_a_spool_loss() {
    let marks = vec![Mark::Lost {
        offset: 0,
        bytes: 4,
    }];
    let held = held(meta(10, marks), Ownership::Connection, b"\0\0\0\0efghij");
    held.state.lock().unwrap().result = Some(result(2_000));
    let (_tx, mut down) = mpsc::unbounded_channel();
    let mut frames = Vec::new();
    let delivered = deliver(&held, &mut frames, &mut down, 0).await.unwrap();
    assert_eq!(delivered, Delivered::Sent);
    assert_eq!(count(&frames, |f| matches!(f, TaskUp::SpoolLost { .. })), 0);
    // The gap in the offsets is what tells a controller of version 1.
    assert!(frames.contains(&TaskUp::Output {
        offset: 4,
        data: b"efghij".to_vec()
    }));
}

#[tokio::test]
async fn a_controller_of_version_2_is_told_of_the_loss() {
    let marks = vec![Mark::Lost {
        offset: 0,
        bytes: 4,
    }];
    let held = held(meta(6, marks), Ownership::Agent, b"\0\0\0\0ef");
    held.state.lock().unwrap().result = Some(result(2_000));
    let (tx, mut down) = mpsc::unbounded_channel();
    tx.send(Down::ResultStored).unwrap();
    let mut frames = Vec::new();
    deliver(&held, &mut frames, &mut down, 0).await.unwrap();
    assert!(frames.contains(&TaskUp::SpoolLost {
        offset: 0,
        bytes: 4
    }));
}

#[tokio::test]
async fn output_without_a_spool_is_kept_in_memory_and_delivered() {
    let held = held(meta(0, Vec::new()), Ownership::Agent, b"");
    held.output.write_at(0, b"first ").unwrap();
    held.output.write_at(6, b"second").unwrap();
    {
        let mut meta = held.state.lock().unwrap();
        meta.produced = 12;
        meta.result = Some(result(2_000));
    }
    let (tx, mut down) = mpsc::unbounded_channel();
    tx.send(Down::ResultStored).unwrap();
    let mut frames = Vec::new();
    deliver(&held, &mut frames, &mut down, 6).await.unwrap();
    assert!(frames.contains(&TaskUp::Output {
        offset: 6,
        data: b"second".to_vec()
    }));
}

#[tokio::test]
async fn finished_tasks_past_the_bound_are_forgotten_oldest_first() {
    let tasks = Tasks::default();
    let mut ids = Vec::new();
    for finished_at in [3_000, 1_000, 2_000] {
        let held = held(meta(0, Vec::new()), Ownership::Agent, b"");
        held.state.lock().unwrap().result = Some(result(finished_at));
        let id = held.state.lock().unwrap().task_id;
        tasks.held.lock().unwrap().insert(id, held);
        ids.push(id);
    }
    let running = held(meta(0, Vec::new()), Ownership::Agent, b"");
    let running_id = running.state.lock().unwrap().task_id;
    tasks.held.lock().unwrap().insert(running_id, running);

    tasks.bound_finished(2, u64::MAX);
    let left: std::collections::HashSet<Uuid> = tasks.reports().iter().map(|t| t.task_id).collect();
    assert_eq!(
        left,
        [ids[0], ids[2], running_id].into_iter().collect(),
        "the one finished first is forgotten, the running one kept"
    );
    tasks.bound_finished(2, u64::MAX);
    assert_eq!(tasks.reports().len(), 3);
}

#[test]
fn output_kept_in_memory_is_bounded_across_tasks() {
    let budget = Arc::new(MemoryBudget::new(10));
    let first = Output::Memory(MemoryOutput::new(budget.clone()));
    let second = Output::Memory(MemoryOutput::new(budget.clone()));
    first.write_at(0, b"12345678").unwrap();
    let refused = second.write_at(0, b"abcde").unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::OutOfMemory);
    // What was refused took nothing: what still fits is kept.
    second.write_at(0, b"ab").unwrap();
    assert!(first.write_at(8, b"9").is_err());
    // A task that is forgotten gives its bytes back.
    drop(first);
    second.write_at(2, b"cdefgh").unwrap();
    let mut buf = [0u8; 16];
    let n = second.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"abcdefgh");
    second.truncate(2).unwrap();
    drop(second);
    assert!(budget.take(10), "every byte was given back");
}

#[tokio::test]
async fn a_task_past_the_memory_bound_loses_its_output_marked_as_a_spool_does() {
    // The runner's path: a refused write is a loss, reported as one, never a silent gap.
    let held = Arc::new(Held::new(
        meta(0, Vec::new()),
        Output::Memory(MemoryOutput::new(Arc::new(MemoryBudget::new(4)))),
        Ownership::Agent,
        CancellationToken::new(),
    ));
    for chunk in [&b"abc"[..], b"defg", b"h"] {
        let offset = held.state.lock().unwrap().produced;
        let written = held.output.write_at(offset, chunk);
        let mut meta = held.state.lock().unwrap();
        if written.is_err() {
            meta.lose(offset, chunk.len() as u64);
        }
        meta.produced += chunk.len() as u64;
    }
    held.state.lock().unwrap().result = Some(result(2_000));
    // Stored once it has all: a `ResultStored` queued before would end the delivery at once.
    let (tx, mut down) = mpsc::unbounded_channel();
    let delivering = held.clone();
    let stream = tokio::spawn(async move {
        let mut frames = Vec::new();
        let delivered = deliver(&delivering, &mut frames, &mut down, 0).await;
        (delivered, frames)
    });
    settle().await;
    tx.send(Down::ResultStored).unwrap();
    let (delivered, frames) = stream.await.unwrap();
    assert_eq!(delivered.unwrap(), Delivered::Stored);
    assert_eq!(
        frames[1..frames.len() - 1],
        [
            TaskUp::Output {
                offset: 0,
                data: b"abc".to_vec()
            },
            TaskUp::SpoolLost {
                offset: 3,
                bytes: 4
            },
            TaskUp::Output {
                offset: 7,
                data: b"h".to_vec()
            },
        ],
        "{frames:?}"
    );
}

#[tokio::test]
async fn finished_output_past_the_byte_bound_is_dropped_oldest_first_results_kept() {
    let tasks = Tasks::default();
    let mut ids = Vec::new();
    for (finished_at, output) in [
        (3_000, &b"newest"[..]),
        (1_000, b"oldest"),
        (2_000, b"middle"),
    ] {
        let held = held(meta(6, Vec::new()), Ownership::Agent, output);
        held.state.lock().unwrap().result = Some(result(finished_at));
        let id = held.state.lock().unwrap().task_id;
        tasks.held.lock().unwrap().insert(id, held);
        ids.push(id);
    }
    // Two of the oldest's bytes were acknowledged already.
    tasks
        .get(&ids[1])
        .unwrap()
        .state
        .lock()
        .unwrap()
        .acked_offset = 2;
    tasks.bound_finished(10, 12);
    assert_eq!(tasks.reports().len(), 3, "every result is kept");
    let oldest = tasks.get(&ids[1]).unwrap();
    assert_eq!(
        oldest.state.lock().unwrap().marks,
        vec![Mark::Lost {
            offset: 2,
            bytes: 4
        }]
    );
    for id in [ids[0], ids[2]] {
        assert!(
            tasks
                .get(&id)
                .unwrap()
                .state
                .lock()
                .unwrap()
                .marks
                .is_empty()
        );
    }
    // The controller resumes from what it acknowledged: told of the loss, then the result.
    let (tx, mut down) = mpsc::unbounded_channel();
    tx.send(Down::ResultStored).unwrap();
    let mut frames = Vec::new();
    deliver(&oldest, &mut frames, &mut down, 2).await.unwrap();
    assert_eq!(
        frames[1..],
        [
            TaskUp::SpoolLost {
                offset: 2,
                bytes: 4
            },
            TaskUp::Finished(result(1_000)),
        ],
        "{frames:?}"
    );
    // Within the bound now: nothing more is dropped.
    tasks.bound_finished(10, 12);
    assert_eq!(oldest.state.lock().unwrap().marks.len(), 1);
    assert!(
        tasks
            .get(&ids[2])
            .unwrap()
            .state
            .lock()
            .unwrap()
            .marks
            .is_empty()
    );
}

#[test]
fn the_agent_goes_home_to_the_controller_still_waiting_for_its_tasks() {
    let tasks = Tasks::default();
    assert_eq!(tasks.home(10_000), None, "nothing held: no home");
    let add = |controller: &str, until: i64, ownership: Ownership| {
        let mut meta = meta(0, Vec::new());
        meta.controller = Some(controller.into());
        meta.hold_until_ms = Some(until);
        let held = held(meta, ownership, b"");
        let id = held.state.lock().unwrap().task_id;
        tasks.held.lock().unwrap().insert(id, held.clone());
        held
    };
    let a = add("a:1", 20_000, Ownership::Agent);
    add("b:1", 30_000, Ownership::Agent);
    // A task of a version 1 controller dies with its connection: it ties the agent to nothing.
    add("c:1", 90_000, Ownership::Connection);
    assert_eq!(
        tasks.home(10_000).as_deref(),
        Some("b:1"),
        "the one waiting longest"
    );
    assert_eq!(tasks.home(25_000).as_deref(), Some("b:1"));
    assert_eq!(
        tasks.home(30_000),
        None,
        "past every deadline: free to fail over"
    );
    a.state.lock().unwrap().hold_until_ms = Some(40_000);
    assert_eq!(tasks.home(35_000).as_deref(), Some("a:1"));
    // A task nobody wants any more ties the agent to nothing either.
    a.discarded.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(tasks.home(35_000), None);
}

#[test]
fn a_task_being_received_is_reported_as_held_exactly_once() {
    let tasks = Tasks::default();
    let meta = meta(0, Vec::new());
    let task_id = meta.task_id;
    tasks
        .receiving
        .lock()
        .unwrap()
        .insert(task_id, report_of(&meta));
    let reported: Vec<Uuid> = tasks.reports().iter().map(|t| t.task_id).collect();
    assert_eq!(reported, [task_id], "reported while its spool is made");
    tasks.hold(task_id, held(meta, Ownership::Agent, b""));
    let reported: Vec<Uuid> = tasks.reports().iter().map(|t| t.task_id).collect();
    assert_eq!(reported, [task_id], "once held, reported once");
}

/// A stream delivering a finished task keeps its place among the task's marks: the bound on
/// finished output leaves the task alone while the stream lives, and applies once it is gone.
#[tokio::test]
async fn finished_output_being_delivered_is_not_dropped_under_the_stream() {
    let tasks = Tasks::default();
    let held = held(meta(6, Vec::new()), Ownership::Agent, b"output");
    held.state.lock().unwrap().result = Some(result(1_000));
    let id = held.state.lock().unwrap().task_id;
    tasks.held.lock().unwrap().insert(id, held.clone());
    let (tx, mut down) = mpsc::unbounded_channel();
    let stream = tokio::spawn({
        let held = held.clone();
        async move {
            let mut frames = Vec::new();
            let _ = deliver(&held, &mut frames, &mut down, 0).await;
            frames
        }
    });
    settle().await;
    tasks.bound_finished(10, 0);
    assert!(held.state.lock().unwrap().marks.is_empty());
    tx.send(Down::ResultStored).unwrap();
    let frames = stream.await.unwrap();
    assert!(
        frames.contains(&TaskUp::Output {
            offset: 0,
            data: b"output".to_vec()
        }),
        "{frames:?}"
    );
    tasks.bound_finished(10, 0);
    assert_eq!(
        held.state.lock().unwrap().marks,
        vec![Mark::Lost {
            offset: 0,
            bytes: 6
        }]
    );
}

/// A stream whose peer reads one frame per permit: a send blocks until the gate lets it through.
struct Gated {
    gate: Arc<tokio::sync::Semaphore>,
    frames: Arc<std::sync::Mutex<Vec<TaskUp>>>,
}

impl Frames for Gated {
    async fn send(&mut self, up: TaskUp) -> Result<(), StreamError> {
        self.gate.acquire().await.expect("gate open").forget();
        self.frames.lock().unwrap().push(up);
        Ok(())
    }
}

#[tokio::test]
async fn a_cancel_is_acted_on_while_a_backlog_is_still_being_sent() {
    let backlog = vec![b'x'; 8 * MAX_OUTPUT_CHUNK];
    let held = held(
        meta(backlog.len() as u64, Vec::new()),
        Ownership::Agent,
        &backlog,
    );
    let (tx, mut down) = mpsc::unbounded_channel();
    tx.send(Down::Cancel).unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let frames = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut send = Gated {
        gate: gate.clone(),
        frames: frames.clone(),
    };
    let delivering = held.clone();
    let stream = tokio::spawn(async move { deliver(&delivering, &mut send, &mut down, 0).await });
    settle().await;
    assert!(!held.cancel.is_cancelled(), "nothing was sent yet");
    // `Started`, then the first chunk of output: the peer reads nothing more.
    gate.add_permits(2);
    tokio::time::timeout(std::time::Duration::from_secs(10), held.cancel.cancelled())
        .await
        .expect("the cancel waited for the backlog");
    {
        let frames = frames.lock().unwrap();
        assert_eq!(
            count(&frames, |f| matches!(f, TaskUp::Output { .. })),
            1,
            "{frames:?}"
        );
    }
    assert!(!stream.is_finished(), "the backlog is still to be sent");
    // The controller, done with the task, stores its status: the rest of the backlog is not
    // waited for either.
    tx.send(Down::ResultStored).unwrap();
    gate.add_permits(1);
    assert_eq!(stream.await.unwrap().unwrap(), Delivered::Stored);
    assert!(
        count(&frames.lock().unwrap(), |f| matches!(
            f,
            TaskUp::Output { .. }
        )) < 8,
        "the whole backlog was sent"
    );
}
