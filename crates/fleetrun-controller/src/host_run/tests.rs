//! Tables of event sequences and what the machine must make of them.

use fleetrun_proto::{Ending, TaskResult, TaskUp};

use super::*;

const T0: i64 = 1_700_000_000_000;
const LIMIT: u64 = 1024;
const LIMITS: Limits = Limits {
    output_limit: LIMIT,
    timeout_ms: 10_000,
    grace_ms: 2_000,
};

fn started(at: i64) -> Event {
    Event::Up(TaskUp::Started { started_at_ms: at })
}

fn output(offset: u64, data: &[u8]) -> Event {
    Event::Up(TaskUp::Output {
        offset,
        data: data.to_vec(),
    })
}

fn result(ending: Ending, started_at_ms: i64, finished_at_ms: i64) -> TaskResult {
    TaskResult {
        ending,
        started_at_ms,
        finished_at_ms,
        output_bytes: 0,
        survivors: 0,
        message: None,
    }
}

fn finished(ending: Ending, start: i64, end: i64) -> Event {
    Event::Up(TaskUp::Finished(result(ending, start, end)))
}

/// What a run of events left behind.
#[derive(Debug, Default)]
struct Run {
    log: Vec<u8>,
    actions: Vec<Action>,
    outcome: Option<Outcome>,
    machine: Option<HostTask>,
}

/// Feeds `events` (each at its time) to a task dispatched at `T0`.
fn run(events: Vec<(i64, Event)>) -> Run {
    let mut machine = HostTask::new(LIMITS, T0);
    let mut out = Run::default();
    for (now, event) in events {
        for action in machine.handle(now, event) {
            assert!(out.outcome.is_none(), "{action:?} after the outcome");
            match &action {
                Action::Log { offset, data } => {
                    assert_eq!(
                        *offset as usize,
                        out.log.len(),
                        "logs are appended in order"
                    );
                    out.log.extend_from_slice(data);
                }
                Action::Finish(outcome) => out.outcome = Some(outcome.clone()),
                _ => {}
            }
            out.actions.push(action);
        }
        assert!(out.log.len() as u64 <= LIMIT + LOG_OVERHEAD);
    }
    out.machine = Some(machine);
    out
}

fn log_text(run: &Run) -> String {
    String::from_utf8_lossy(&run.log).into_owned()
}

#[test]
fn output_is_deduplicated_and_gaps_are_marked() {
    type Chunks = Vec<(u64, &'static [u8])>;
    let cases: &[(&str, Chunks, &str)] = &[
        ("in order", vec![(0, b"ab"), (2, b"cd")], "abcd"),
        (
            "repeat dropped",
            vec![(0, b"ab"), (0, b"ab"), (2, b"c")],
            "abc",
        ),
        ("overlap trimmed", vec![(0, b"abc"), (1, b"bcd")], "abcd"),
        (
            "gap marked",
            vec![(0, b"a"), (4, b"e")],
            "a\n[fleetrun] 3 bytes of output lost in transit\ne",
        ),
        ("empty chunk ignored", vec![(0, b""), (0, b"a")], "a"),
    ];
    for (name, chunks, want) in cases {
        let events = chunks
            .iter()
            .map(|(offset, data)| (T0, output(*offset, data)))
            .collect();
        assert_eq!(log_text(&run(events)), *want, "{name}");
    }
}

#[test]
fn stored_output_never_exceeds_the_limit_plus_the_markers() {
    let big = vec![b'x'; 40 * LIMIT as usize];
    let cases: Vec<(&str, Vec<(i64, Event)>)> = vec![
        ("one huge chunk", vec![(T0, output(0, &big))]),
        (
            "many chunks",
            (0..100u64)
                .map(|i| (T0, output(i * 512, &big[..512])))
                .collect(),
        ),
        (
            "a gap marker per chunk",
            (0..1000u64)
                .map(|i| (T0, output(i * 10 + 5, b"12345")))
                .collect(),
        ),
        (
            "a truncation marker per frame",
            (0..1000)
                .map(|_| {
                    (
                        T0,
                        Event::Up(TaskUp::Truncated {
                            dropped_bytes: u64::MAX,
                            dropped_lines: u64::MAX,
                        }),
                    )
                })
                .collect(),
        ),
    ];
    for (name, mut events) in cases {
        let mut lie = result(Ending::Exited { code: 0 }, T0, T0 + 1);
        lie.message = Some("m".repeat(1 << 20));
        events.push((T0 + 1, Event::Up(TaskUp::Finished(lie))));
        let run = run(events);
        let outcome = run.outcome.as_ref().expect(name);
        assert!(run.log.len() as u64 <= LIMIT + LOG_OVERHEAD, "{name}");
        assert!(
            log_text(&run).contains("beyond the output limit"),
            "{name}: the log says output was dropped"
        );
        assert!(outcome.tag.len() <= MAX_MESSAGE_LEN, "{name}");
        assert!(
            outcome.dropped_bytes >= 0 && outcome.dropped_lines >= 0,
            "{name}"
        );
    }
}

#[test]
fn offsets_near_the_end_of_u64_do_not_overflow() {
    let run = run(vec![
        (T0, output(u64::MAX - 1, b"abc")),
        (T0, output(u64::MAX, b"z")),
        (T0, output(u64::MAX - 3, b"abc")),
        (T0, output(0, b"late")),
        (T0, finished(Ending::Exited { code: 0 }, T0, T0)),
    ]);
    let text = log_text(&run);
    assert!(
        text.contains("2 output chunks at impossible offsets"),
        "{text}"
    );
    // The one chunk that fits ends exactly at u64::MAX; nothing after it is stored.
    assert!(!text.contains("late"));
    assert_eq!(run.outcome.unwrap().output_bytes, i64::MAX);
}

#[test]
fn absurd_agent_times_are_replaced_by_the_controllers() {
    let now = T0 + 5_000;
    // (started frame, result start, result end) -> (start_time, end_time)
    let cases: &[(&str, i64, i64, i64, i64, i64)] = &[
        ("plausible", T0 + 10, T0 + 10, T0 + 20, T0 + 10, T0 + 20),
        (
            "skewed a little",
            T0 - 1_000,
            T0 - 1_000,
            now + 1_000,
            T0 - 1_000,
            now + 1_000,
        ),
        ("minimum", i64::MIN, i64::MIN, i64::MIN, T0, now),
        ("maximum", i64::MAX, i64::MAX, i64::MAX, T0, now),
        (
            "end before start",
            T0 + 10,
            T0 + 10,
            T0 - 100_000_000,
            T0 + 10,
            now,
        ),
        (
            "far future start",
            T0 + 10,
            now + 10 * MAX_CLOCK_SKEW_MS,
            now,
            T0 + 10,
            now,
        ),
    ];
    for &(name, started_frame, start, end, want_start, want_end) in cases {
        let run = run(vec![
            (T0, started(started_frame)),
            (now, finished(Ending::Exited { code: 0 }, start, end)),
        ]);
        let outcome = run.outcome.unwrap();
        assert_eq!(outcome.start_time, Some(want_start), "{name}: start");
        assert_eq!(outcome.end_time, want_end, "{name}: end");
        assert!(outcome.end_time >= want_start, "{name}");
    }
}

#[test]
fn endings_map_to_statuses_without_overflow() {
    let cases: &[(Ending, i32, Option<i32>)] = &[
        (Ending::Exited { code: 0 }, host::SUCCESS, Some(0)),
        (
            Ending::Exited { code: i32::MIN },
            host::NON_ZERO_EXIT,
            Some(i32::MIN),
        ),
        (
            Ending::Signaled { signal: 9 },
            host::SCRIPT_FAILED,
            Some(137),
        ),
        (
            Ending::Signaled { signal: i32::MAX },
            host::SCRIPT_FAILED,
            None,
        ),
        (
            Ending::Signaled { signal: i32::MIN },
            host::SCRIPT_FAILED,
            None,
        ),
        (Ending::Signaled { signal: 0 }, host::SCRIPT_FAILED, None),
        (Ending::TimedOut, host::SCRIPT_TIMEOUT, None),
        (Ending::Cancelled, host::TERMINATE_SUCCESS, None),
        (Ending::UserNotFound, host::USER_NOT_EXIST, None),
        (Ending::Failed, host::AGENT_TASK_ERROR, None),
    ];
    for (ending, status, exit_code) in cases {
        let run = run(vec![(T0, finished(ending.clone(), T0, T0))]);
        let outcome = run.outcome.unwrap();
        assert_eq!(
            (outcome.status, outcome.exit_code),
            (*status, *exit_code),
            "{ending:?}"
        );
    }
}

#[test]
fn reported_counts_are_saturated_and_not_below_what_arrived() {
    let cases: &[(u64, u64, i64)] = &[
        // (reported output_bytes, dropped bytes reported) -> stored output_bytes
        (u64::MAX, 0, i64::MAX),
        (0, 0, 4),
        (0, 100, 104),
        (10, 0, 10),
    ];
    for &(reported, dropped, want) in cases {
        let mut lie = result(Ending::Exited { code: 0 }, T0, T0);
        lie.output_bytes = reported;
        lie.survivors = u32::MAX;
        let run = run(vec![
            (T0, output(0, b"ab")),
            (
                T0,
                Event::Up(TaskUp::Truncated {
                    dropped_bytes: dropped,
                    dropped_lines: 1,
                }),
            ),
            (T0, output(2, b"cd")),
            (T0, Event::Up(TaskUp::Finished(lie))),
        ]);
        let outcome = run.outcome.unwrap();
        assert_eq!(outcome.output_bytes, want, "reported {reported}");
        assert_eq!(outcome.survivors, i64::from(u32::MAX));
    }
}

#[test]
fn the_timeout_runs_from_the_start_not_from_dispatch() {
    let grace = LIMITS.grace_ms;
    let timeout = LIMITS.timeout_ms;
    // A task queued on a busy agent for ten times its timeout, then run within its timeout.
    let queued = run(vec![
        (T0 + 10 * timeout, Event::Timer),
        (T0 + 10 * timeout, started(T0 + 10 * timeout)),
        (T0 + 11 * timeout, Event::Timer),
        (
            T0 + 11 * timeout,
            finished(
                Ending::Exited { code: 0 },
                T0 + 10 * timeout,
                T0 + 11 * timeout,
            ),
        ),
    ]);
    assert_eq!(queued.outcome.unwrap().status, host::SUCCESS);

    let mut machine = HostTask::new(LIMITS, T0);
    assert_eq!(machine.deadline(), None, "no deadline while queued");
    machine.handle(T0 + 500, started(i64::MAX));
    assert_eq!(machine.deadline(), Some(T0 + 500 + timeout + grace));
    // A second Started does not push the deadline back.
    machine.handle(T0 + 900, started(T0 + 900));
    assert_eq!(machine.deadline(), Some(T0 + 500 + timeout + grace));
    assert!(
        machine.handle(T0 + 500 + timeout, Event::Timer).is_empty(),
        "early timer"
    );
    let actions = machine.handle(T0 + 500 + timeout + grace, Event::Timer);
    assert_eq!(actions.first(), Some(&Action::SendCancel));
    match actions.last() {
        Some(Action::Finish(outcome)) => {
            assert_eq!(outcome.status, host::AGENT_TIMEOUT);
            assert_eq!(outcome.start_time, Some(T0 + 500));
        }
        other => panic!("expected the outcome, got {other:?}"),
    }
    assert!(machine.is_done());
    assert!(
        machine
            .handle(T0 + 1_000_000, finished(Ending::Cancelled, T0, T0))
            .is_empty()
    );
}

#[test]
fn a_termination_is_sent_once_and_waits_the_grace_period() {
    let grace = LIMITS.grace_ms;
    let cases: &[(&str, bool, i64, i32)] = &[
        // (name, started first, when the agent answers after the cancel, final status)
        (
            "queued, confirmed",
            false,
            grace - 1,
            host::TERMINATE_SUCCESS,
        ),
        (
            "running, confirmed",
            true,
            grace - 1,
            host::TERMINATE_SUCCESS,
        ),
        ("running, silent", true, grace, host::AGENT_TIMEOUT),
        ("queued, silent", false, grace, host::AGENT_TIMEOUT),
    ];
    for &(name, start, answer_after, status) in cases {
        let mut events = Vec::new();
        if start {
            events.push((T0, started(T0)));
        }
        events.push((T0 + 100, Event::Cancel));
        events.push((T0 + 100, Event::Cancel));
        events.push((T0 + 100 + answer_after, Event::Timer));
        events.push((
            T0 + 100 + answer_after,
            finished(Ending::Cancelled, T0, T0 + 100),
        ));
        let run = run(events);
        let cancels = run
            .actions
            .iter()
            .filter(|a| **a == Action::SendCancel)
            .count();
        assert_eq!(cancels, 1, "{name}");
        assert_eq!(run.outcome.unwrap().status, status, "{name}");
    }
}

#[test]
fn a_lost_agent_ends_310_with_the_reason_in_the_log() {
    let run = run(vec![
        (T0, started(T0)),
        (T0, output(0, b"partial")),
        (
            T0 + 5,
            Event::Lost("agent connection lost: reset by peer".into()),
        ),
        (T0 + 6, finished(Ending::Exited { code: 0 }, T0, T0)),
    ]);
    let outcome = run.outcome.clone().unwrap();
    assert_eq!(outcome.status, host::AGENT_ABNORMAL);
    assert_eq!(outcome.end_time, T0 + 5);
    assert_eq!(
        log_text(&run),
        "partial[fleetrun] agent connection lost: reset by peer\n"
    );
}
