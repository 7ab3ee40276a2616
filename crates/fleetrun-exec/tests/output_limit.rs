//! 200 MiB of output through a 5 MiB limit: exact head, marker and tail,
//! and the agent's memory stays flat. Alone in its binary so that no other
//! test moves the peak RSS it measures.

mod common;

use std::time::Instant;

use common::{Fixture, collect, shell};
use fleetrun_exec::Ending;

const TOTAL: u64 = 200 * 1024 * 1024;
const LIMIT: usize = 5 * 1024 * 1024;
const HALF: usize = LIMIT / 2;

/// Peak resident set size of this process so far, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_output_is_capped_with_bounded_memory() {
    let fixture = Fixture::new(true);
    let before = peak_rss_kib();
    let cases = [
        // Lines: "y\n" a hundred million times.
        (
            format!("yes | head -c {TOTAL}"),
            b"y\n".as_slice(),
            TOTAL / 2,
        ),
        // No newline at all.
        (
            format!("head -c {TOTAL} /dev/zero | tr '\\0' x"),
            b"x".as_slice(),
            0,
        ),
    ];
    for (script, unit, total_lines) in cases {
        let mut t = shell(&script);
        t.output_limit = LIMIT;
        let start = Instant::now();
        let run = collect(fixture.start(t)).await;
        let took = start.elapsed();
        assert_eq!(run.outcome.ending, Ending::Exited(0), "{script}");
        let dropped = TOTAL - LIMIT as u64;
        let kept_lines = (LIMIT as u64 * total_lines) / TOTAL;
        assert_eq!(
            run.truncated,
            Some((HALF, dropped, total_lines - kept_lines)),
            "{script}"
        );
        assert_eq!(run.output.len(), LIMIT);
        let expected_half = unit.repeat(HALF / unit.len());
        assert!(run.output[..HALF] == expected_half[..], "head of {script}");
        assert!(run.output[HALF..] == expected_half[..], "tail of {script}");
        assert_eq!(run.outcome.output_bytes, TOTAL);
        assert_eq!(run.outcome.dropped_bytes, dropped);
        assert_eq!(run.outcome.dropped_lines, total_lines - kept_lines);
        println!("{script}: {took:?}");
    }
    fixture.assert_no_staging();
    let growth_kib = peak_rss_kib() - before;
    println!(
        "peak RSS growth for 2 x 200 MiB of output: {:.1} MiB",
        growth_kib as f64 / 1024.0
    );
    assert!(growth_kib < 64 * 1024, "peak RSS grew by {growth_kib} KiB");
}
