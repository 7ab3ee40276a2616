//! Whatever sequence of reports an agent sends, and whenever the timer and a termination come, the
//! controller's per-host state machine does not panic, stores at most the output limit plus its
//! own lines, writes the log in order, and finishes exactly once with times inside the window the
//! task ran in.

#![no_main]

use fleetrun_controller::host_run::{Action, Claim, Event, HostTask, Limits, MAX_CLOCK_SKEW_MS};
use fleetrun_proto::{Ending, FrameDecoder, TaskResult, TaskUp};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};

const T0: i64 = 1_700_000_000_000;

fn ending(u: &mut Unstructured) -> Result<Ending> {
    Ok(match u.int_in_range(0..=7)? {
        0 => Ending::Exited {
            code: u.arbitrary()?,
        },
        1 => Ending::Signaled {
            signal: u.arbitrary()?,
        },
        2 => Ending::TimedOut,
        3 => Ending::Cancelled,
        4 => Ending::UserNotFound,
        5 => Ending::InterpreterMissing,
        6 => Ending::Failed,
        _ => Ending::Exited { code: 0 },
    })
}

/// An offset that is often near the interesting values: the end so far, zero, `u64::MAX`.
fn offset(u: &mut Unstructured, received: u64) -> Result<u64> {
    let delta: u16 = u.arbitrary()?;
    Ok(match u.int_in_range(0..=3)? {
        0 => received.saturating_add(u64::from(delta)),
        1 => received.saturating_sub(u64::from(delta)),
        2 => u64::MAX - u64::from(delta),
        _ => u.arbitrary()?,
    })
}

fn event(u: &mut Unstructured, received: &mut u64) -> Result<Event> {
    Ok(match u.int_in_range(0..=12)? {
        0 => Event::Up(TaskUp::Started {
            started_at_ms: u.arbitrary()?,
        }),
        1..=4 => {
            let len = u.int_in_range(0..=70_000usize)?;
            let offset = offset(u, *received)?;
            *received = offset.saturating_add(len as u64);
            Event::Up(TaskUp::Output {
                offset,
                data: vec![b'x'; len],
            })
        }
        5 => Event::Up(TaskUp::Truncated {
            dropped_bytes: u.arbitrary()?,
            dropped_lines: u.arbitrary()?,
        }),
        6 => Event::Up(TaskUp::Finished(TaskResult {
            ending: ending(u)?,
            started_at_ms: u.arbitrary()?,
            finished_at_ms: u.arbitrary()?,
            output_bytes: u.arbitrary()?,
            survivors: u.arbitrary()?,
            message: u.arbitrary()?,
        })),
        7 => Event::Timer,
        8 => Event::Cancel,
        9 => {
            let bytes = u.arbitrary()?;
            let offset = offset(u, *received)?;
            *received = offset.saturating_add(bytes);
            Event::Up(TaskUp::SpoolLost { offset, bytes })
        }
        10 => Event::Detached("the connection was lost".into()),
        11 => Event::Reattach(Claim {
            job_instance_id: u.arbitrary()?,
            step_instance_id: u.arbitrary()?,
            execute_count: u.arbitrary()?,
            acked_offset: u.arbitrary()?,
            produced: u.arbitrary()?,
            started_at_ms: u.arbitrary()?,
        }),
        _ => {
            // Some reports come as the agent's bytes, through the codec.
            let bytes: &[u8] = u.arbitrary()?;
            let mut dec = FrameDecoder::new();
            dec.extend(bytes);
            match dec.decode::<TaskUp>() {
                Ok(Some(up)) => Event::Up(up),
                _ => Event::Lost("the agent sent an undecodable frame".into()),
            }
        }
    })
}

fn run(u: &mut Unstructured) -> Result<()> {
    let limits = Limits {
        output_limit: u.int_in_range(1024..=256 * 1024)?,
        timeout_ms: u.int_in_range(0..=86_400_000)?,
        grace_ms: u.int_in_range(0..=600_000)?,
    };
    let mut machine = HostTask::new(limits, T0);
    let mut now = T0;
    let mut logged = 0u64;
    let mut finished = false;
    let mut received = 0u64;
    while !u.is_empty() {
        // The controller's clock only moves forward.
        now = now.saturating_add(u.int_in_range(0..=limits.timeout_ms + limits.grace_ms + 1)?);
        let event = event(u, &mut received)?;
        for action in machine.handle(now, event) {
            assert!(!finished, "an action after the outcome: {action:?}");
            match action {
                Action::Log { offset, data } => {
                    assert_eq!(offset as u64, logged, "the log is written in order");
                    logged += data.len() as u64;
                    assert!(logged <= machine.log_capacity(), "{logged} bytes logged");
                }
                Action::Running { start_time } => {
                    assert!(start_time >= T0 - MAX_CLOCK_SKEW_MS);
                    assert!(start_time <= now + MAX_CLOCK_SKEW_MS);
                }
                Action::SendCancel | Action::Resume { .. } | Action::Discard { .. } => {}
                Action::Finish(outcome) => {
                    finished = true;
                    let start = outcome.start_time.unwrap_or(T0);
                    assert!(start >= T0 - MAX_CLOCK_SKEW_MS, "{outcome:?}");
                    assert!(outcome.end_time >= start, "{outcome:?}");
                    assert!(outcome.end_time <= now + MAX_CLOCK_SKEW_MS, "{outcome:?}");
                    assert!(outcome.output_bytes >= 0 && outcome.dropped_bytes >= 0);
                    assert!(outcome.dropped_lines >= 0 && outcome.survivors >= 0);
                    assert!(outcome.tag.len() <= 4096);
                }
            }
        }
        assert_eq!(finished, machine.is_done());
        if let Some(deadline) = machine.deadline() {
            assert!(deadline >= T0, "a deadline before dispatch");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
