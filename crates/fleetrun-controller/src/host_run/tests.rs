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
            "a spool-loss marker per frame",
            (0..1000u64)
                .map(|i| {
                    (
                        T0,
                        Event::Up(TaskUp::SpoolLost {
                            offset: i * 10 + 5,
                            bytes: 1,
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

#[test]
fn a_task_the_controller_did_not_send_ends_399_with_the_reason() {
    let run = run(vec![
        (
            T0 + 5,
            Event::Unsent("the task was not sent: no record".into()),
        ),
        (T0 + 6, started(T0 + 6)),
        (T0 + 7, finished(Ending::Exited { code: 0 }, T0, T0)),
    ]);
    let outcome = run.outcome.clone().unwrap();
    assert_eq!(
        (outcome.status, outcome.start_time, outcome.end_time),
        (host::AGENT_TASK_ERROR, None, T0 + 5)
    );
    assert_eq!(
        log_text(&run),
        "[fleetrun] the task was not sent: no record\n"
    );
}

const IDENTITY: TaskIdentity = TaskIdentity {
    job_instance_id: 11,
    step_instance_id: 12,
    execute_count: 0,
};

fn claim(acked_offset: u64, produced: u64, started_at_ms: Option<i64>) -> Claim {
    Claim {
        job_instance_id: 11,
        step_instance_id: 12,
        execute_count: 0,
        acked_offset,
        produced,
        started_at_ms,
    }
}

/// Feeds `events` to a task of [`IDENTITY`]; the actions of each event, in order.
fn feed(events: Vec<(i64, Event)>) -> (HostTask, Vec<Vec<Action>>) {
    let mut machine = HostTask::for_task(LIMITS, IDENTITY, T0);
    let actions = events
        .into_iter()
        .map(|(now, event)| machine.handle(now, event))
        .collect();
    (machine, actions)
}

fn logged(actions: &[Vec<Action>]) -> String {
    let mut log = Vec::new();
    for action in actions.iter().flatten() {
        if let Action::Log { offset, data } = action {
            assert_eq!(*offset as usize, log.len());
            log.extend_from_slice(data);
        }
    }
    String::from_utf8_lossy(&log).into_owned()
}

#[test]
fn a_detached_task_resumes_where_the_controller_is_and_stores_every_byte_once() {
    let (machine, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 10, output(0, b"1\n2\n")),
        (T0 + 20, Event::Detached("connection lost".into())),
        // The timer firing before the deadline changes nothing.
        (T0 + 5_000, Event::Timer),
        (T0 + 6_000, Event::Reattach(claim(0, 10, Some(T0)))),
        // The agent resends from the offset asked; a repeat of what arrived is dropped.
        (T0 + 6_010, output(2, b"2\n3\n4\n")),
        (T0 + 6_020, output(4, b"3\n4\n5\n")),
        (
            T0 + 7_000,
            finished(Ending::Exited { code: 0 }, T0, T0 + 7_000),
        ),
    ]);
    assert_eq!(actions[2], vec![], "a detach ends nothing");
    assert_eq!(actions[3], vec![]);
    assert_eq!(actions[4], vec![Action::Resume { from_offset: 4 }]);
    assert_eq!(logged(&actions), "1\n2\n3\n4\n5\n");
    let Some(Action::Finish(outcome)) = actions[7].last() else {
        panic!("{:?}", actions[7]);
    };
    assert_eq!(outcome.status, host::SUCCESS);
    assert!(machine.is_done());
}

#[test]
fn an_agent_that_does_not_come_back_ends_310_at_the_tasks_deadline() {
    // Started: the deadline runs from the start, not from the loss.
    let (_, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 1_000, Event::Detached("idle timeout".into())),
        (T0 + 11_999, Event::Timer),
        (T0 + 12_000, Event::Timer),
    ]);
    assert_eq!(actions[2], vec![]);
    let Some(Action::Finish(outcome)) = actions[3].last() else {
        panic!("{:?}", actions[3]);
    };
    assert_eq!(outcome.status, host::AGENT_ABNORMAL);
    assert!(outcome.tag.contains("did not come back") && outcome.tag.contains("idle timeout"));
    // Not started: the whole time counts from the loss.
    let (_, actions) = feed(vec![
        (T0 + 1_000, Event::Detached("idle timeout".into())),
        (T0 + 12_999, Event::Timer),
        (T0 + 13_000, Event::Timer),
    ]);
    assert_eq!(actions[1], vec![]);
    assert!(
        matches!(actions[2].last(), Some(Action::Finish(o)) if o.status == host::AGENT_ABNORMAL)
    );
}

#[test]
fn claims_that_disagree_with_the_controllers_record_are_refused_and_store_nothing() {
    let other_job = Claim {
        job_instance_id: 99,
        ..claim(0, 10, Some(T0))
    };
    let cases: Vec<(&str, Claim, &str)> = vec![
        ("another job's task", other_job, "names job 99"),
        (
            "acknowledged beyond produced",
            claim(20, 10, Some(T0)),
            "acknowledged of 10 produced",
        ),
        (
            "produced less than received",
            claim(0, 3, Some(T0)),
            "received 4 already",
        ),
    ];
    for (name, bad, reason) in cases {
        let (machine, actions) = feed(vec![
            (T0, started(T0)),
            (T0 + 10, output(0, b"1\n2\n")),
            (T0 + 20, Event::Detached("connection lost".into())),
            (T0 + 30, Event::Reattach(bad)),
            (T0 + 12_000, Event::Timer),
        ]);
        match &actions[3][..] {
            [Action::Discard { reason: got }] => assert!(got.contains(reason), "{name}: {got}"),
            other => panic!("{name}: {other:?}"),
        }
        // Still detached, and the end says claims were refused.
        let Some(Action::Finish(outcome)) = actions[4].last() else {
            panic!("{name}: {:?}", actions[4]);
        };
        assert_eq!(outcome.status, host::AGENT_ABNORMAL, "{name}");
        assert!(
            outcome
                .tag
                .contains("1 claims of the task by the agent were refused"),
            "{name}"
        );
        assert_eq!(machine.received(), 4, "{name}");
    }
}

#[test]
fn a_restarted_controller_takes_the_task_up_from_its_checkpoint() {
    let (machine, _) = feed(vec![(T0, started(T0)), (T0 + 10, output(0, b"1\n2\n"))]);
    let checkpoint = machine.checkpoint();
    assert_eq!(checkpoint.received, 4);
    assert_eq!(checkpoint.deadline, Some(T0 + 12_000));
    let mut taken_up = HostTask::restore(LIMITS, IDENTITY, &checkpoint, T0, T0 + 5_000);
    assert!(taken_up.is_detached());
    assert_eq!(
        taken_up.deadline(),
        Some(T0 + 12_000),
        "the deadline it had"
    );
    // The agent heard more acknowledged before the restart than was saved: no contradiction.
    let actions = taken_up.handle(T0 + 6_000, Event::Reattach(claim(6, 8, Some(T0))));
    assert_eq!(actions, vec![Action::Resume { from_offset: 4 }]);
    let actions = taken_up.handle(T0 + 6_010, output(4, b"3\n4\n"));
    assert_eq!(
        actions,
        vec![Action::Log {
            offset: 4,
            data: b"3\n4\n".to_vec()
        }]
    );
}

#[test]
fn a_termination_while_detached_reaches_the_agent_when_it_comes_back() {
    let (_, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 10, Event::Detached("connection lost".into())),
        (T0 + 20, Event::Cancel),
        (T0 + 500, Event::Reattach(claim(0, 0, Some(T0)))),
        (T0 + 600, finished(Ending::Cancelled, T0, T0 + 600)),
    ]);
    assert_eq!(actions[2], vec![], "no stream to send the cancel on");
    assert_eq!(
        actions[3],
        vec![Action::Resume { from_offset: 0 }, Action::SendCancel]
    );
    assert!(
        matches!(actions[4].last(), Some(Action::Finish(o)) if o.status == host::TERMINATE_SUCCESS)
    );
    // Not back within the grace period: ended at the grace period's end.
    let (_, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 10, Event::Detached("connection lost".into())),
        (T0 + 20, Event::Cancel),
        (T0 + 2_020, Event::Timer),
    ]);
    assert!(matches!(actions[3].last(), Some(Action::Finish(_))));
}

#[test]
fn a_task_that_started_during_the_outage_runs_from_the_agents_start() {
    let (machine, actions) = feed(vec![
        (T0 + 10, Event::Detached("connection lost".into())),
        (T0 + 3_000, Event::Reattach(claim(0, 0, Some(T0 + 1_000)))),
    ]);
    assert_eq!(
        actions[1],
        vec![
            Action::Running {
                start_time: T0 + 1_000
            },
            Action::Resume { from_offset: 0 }
        ]
    );
    assert_eq!(machine.deadline(), Some(T0 + 1_000 + 12_000));
    // One that has not started yet waits unbounded again on a live connection.
    let (machine, _) = feed(vec![
        (T0 + 10, Event::Detached("connection lost".into())),
        (T0 + 3_000, Event::Reattach(claim(0, 0, None))),
    ]);
    assert_eq!(machine.deadline(), None);
}

#[test]
fn spool_losses_are_counted_and_marked_once() {
    let (_, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 1, output(0, b"ab")),
        (
            T0 + 2,
            Event::Up(TaskUp::SpoolLost {
                offset: 2,
                bytes: 100,
            }),
        ),
        // Resent after a reattach: nothing new.
        (
            T0 + 3,
            Event::Up(TaskUp::SpoolLost {
                offset: 2,
                bytes: 100,
            }),
        ),
        (T0 + 4, output(102, b"cd")),
        (
            T0 + 5,
            Event::Up(TaskUp::Truncated {
                dropped_bytes: 7,
                dropped_lines: 1,
            }),
        ),
        (
            T0 + 6,
            Event::Up(TaskUp::Truncated {
                dropped_bytes: 7,
                dropped_lines: 1,
            }),
        ),
        (T0 + 7, finished(Ending::Exited { code: 0 }, T0, T0 + 7)),
    ]);
    let log = logged(&actions);
    assert_eq!(log.matches("could not spool").count(), 1, "{log}");
    assert_eq!(log.matches("output truncated here").count(), 1, "{log}");
    assert!(
        log.starts_with("ab\n[fleetrun] output lost here: 100 bytes"),
        "{log}"
    );
    assert!(log.contains("cd"), "{log}");
    let Some(Action::Finish(outcome)) = actions[7].last() else {
        panic!()
    };
    assert_eq!(outcome.dropped_bytes, 107);
}

#[test]
fn a_nul_in_the_agents_message_never_reaches_the_store() {
    let mut ending = result(Ending::Exited { code: 1 }, T0, T0 + 1);
    ending.message = Some("bad\0news\0".to_owned());
    let run = run(vec![(T0 + 1, Event::Up(TaskUp::Finished(ending)))]);
    let outcome = run.outcome.as_ref().expect("finished");
    assert_eq!(outcome.tag, "bad\u{FFFD}news\u{FFFD}");
}

#[test]
fn a_task_the_agent_comes_back_without_ends_310_at_once() {
    // Detached, then the agent's report leaves the task out: no wait for the deadline.
    let (machine, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 10, output(0, b"1\n")),
        (T0 + 20, Event::Detached("idle timeout".into())),
        (T0 + 1_000, Event::NotHeld),
    ]);
    let Some(Action::Finish(outcome)) = actions[3].last() else {
        panic!("{:?}", actions[3]);
    };
    assert_eq!(outcome.status, host::AGENT_ABNORMAL);
    assert!(
        outcome.tag.contains("came back without the task") && outcome.tag.contains("idle timeout"),
        "{}",
        outcome.tag
    );
    assert_eq!(outcome.end_time, T0 + 1_000);
    assert!(machine.is_done());
    assert!(logged(&actions).starts_with("1\n[fleetrun] the agent came back without the task"));
    // Sent, never started, the connection not yet seen lost: the same.
    let (_, actions) = feed(vec![(T0 + 5, Event::NotHeld)]);
    assert!(
        matches!(actions[0].last(), Some(Action::Finish(o)) if o.status == host::AGENT_ABNORMAL)
    );
    // A task already final stays as it ended.
    let (_, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 10, finished(Ending::Exited { code: 0 }, T0, T0 + 10)),
        (T0 + 20, Event::NotHeld),
    ]);
    assert_eq!(actions[2], vec![]);
}

#[test]
fn a_truncation_sent_again_after_a_restart_is_stored_once() {
    let truncated = || {
        Event::Up(TaskUp::Truncated {
            dropped_bytes: 50,
            dropped_lines: 5,
        })
    };
    let (machine, actions) = feed(vec![
        (T0, started(T0)),
        (T0 + 10, output(0, b"head\n")),
        (T0 + 20, truncated()),
        (T0 + 30, output(5, b"tail\n")),
    ]);
    let checkpoint = machine.checkpoint();
    assert!(checkpoint.truncated);
    let before = logged(&actions);
    // Taken up after a restart, resumed from the offset of the truncation: the agent sends it
    // again with the output after it.
    let mut taken_up = HostTask::restore(LIMITS, IDENTITY, &checkpoint, T0, T0 + 5_000);
    let mut again = vec![taken_up.handle(T0 + 6_000, Event::Reattach(claim(5, 10, Some(T0))))];
    again.push(taken_up.handle(T0 + 6_010, truncated()));
    again.push(taken_up.handle(T0 + 6_020, output(5, b"tail\nmore\n")));
    let stored: Vec<u8> = again
        .iter()
        .flatten()
        .filter_map(|a| match a {
            Action::Log { data, .. } => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(String::from_utf8_lossy(&stored), "more\n");
    assert_eq!(before.matches("output truncated here").count(), 1);
    assert_eq!(taken_up.checkpoint().dropped_bytes, 50, "counted once");
}

#[test]
fn a_task_taken_up_whose_agent_never_returns_ends_by_its_deadline() {
    // Sent, not started, when the controller stopped: the whole time from the take-up.
    let (machine, _) = feed(vec![]);
    let checkpoint = machine.checkpoint();
    assert_eq!(checkpoint.deadline, None);
    let mut taken_up = HostTask::restore(LIMITS, IDENTITY, &checkpoint, T0, T0 + 5_000);
    assert_eq!(taken_up.deadline(), Some(T0 + 5_000 + 12_000));
    assert_eq!(taken_up.handle(T0 + 16_999, Event::Timer), vec![]);
    let actions = taken_up.handle(T0 + 17_000, Event::Timer);
    assert!(
        matches!(actions.last(), Some(Action::Finish(o)) if o.status == host::AGENT_ABNORMAL && o.tag.contains("did not come back")),
        "{actions:?}"
    );
    // Terminated while it waits: the grace period, not the whole deadline.
    let mut taken_up = HostTask::restore(LIMITS, IDENTITY, &checkpoint, T0, T0 + 5_000);
    assert_eq!(taken_up.handle(T0 + 6_000, Event::Cancel), vec![]);
    assert_eq!(taken_up.deadline(), Some(T0 + 8_000));
    let actions = taken_up.handle(T0 + 8_000, Event::Timer);
    assert!(
        matches!(actions.last(), Some(Action::Finish(_))),
        "{actions:?}"
    );
}
