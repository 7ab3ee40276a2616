//! Target resolution on a large inventory: runs `fleetrun-inventory`'s `resolve_bench` example
//! when it exists and reads its `<what>: <duration>` lines.

use std::time::Duration;

use anyhow::Result;
use tokio::process::Command;

use super::{Ctx, report::Figure};

const EXAMPLE: &str = "crates/fleetrun-inventory/examples/resolve_bench.rs";

fn not_available(why: impl Into<String>) -> Figure {
    Figure::new(
        "inventory",
        "inventory.resolve",
        "resolve 50,000 of 100,000 hosts",
    )
    .baseline("target: at most 50 ms")
    .note(why)
}

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    if !ctx.root.join(EXAMPLE).exists() {
        figures.push(not_available(format!("{EXAMPLE} does not exist yet")));
        return Ok(());
    }
    let mut cmd = Command::from(fleetrun_testkit::cluster::cargo_command());
    cmd.current_dir(&ctx.root)
        .args([
            "run",
            "--release",
            "--locked",
            "--quiet",
            "-p",
            "fleetrun-inventory",
            "--example",
            "resolve_bench",
        ])
        .kill_on_drop(true);
    let limit = Duration::from_secs(if ctx.quick { 180 } else { 300 });
    let output = match tokio::time::timeout(limit, cmd.output()).await {
        Err(_) => {
            figures.push(not_available(format!("did not finish within {limit:?}")));
            return Ok(());
        }
        Ok(Err(e)) => {
            figures.push(not_available(format!("cannot run cargo: {e}")));
            return Ok(());
        }
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        figures.push(not_available(format!(
            "the example failed ({}): {last}",
            output.status
        )));
        return Ok(());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut found = 0;
    for line in stdout.lines() {
        // The name may itself hold ": " (`resolve mixed: 2,000 ids, …`): the duration is last.
        let Some((what, rest)) = line.rsplit_once(": ") else {
            continue;
        };
        let Some(ms) = rest.split_whitespace().next().and_then(parse_duration_ms) else {
            continue;
        };
        found += 1;
        let slug: String = what
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let mut figure = Figure::new("inventory", format!("inventory.{slug}"), what)
            .value(ms, "ms")
            .note(rest.split_once(' ').map(|(_, r)| r).unwrap_or(""));
        if what.starts_with("resolve ") {
            figure = figure.at_most(50.0);
        }
        figures.push(figure);
    }
    if found == 0 {
        figures.push(not_available(
            "the example printed no `<what>: <duration>` line",
        ));
    }
    Ok(())
}

/// `Duration`'s debug form (`12.3ms`, `1.2s`, `45µs`) in milliseconds.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-6,
        "µs" | "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        _ => return None,
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("12.5ms"), Some(12.5));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500.0));
        assert_eq!(parse_duration_ms("250µs"), Some(0.25));
        assert_eq!(parse_duration_ms("12 hosts"), None);
        assert_eq!(parse_duration_ms("abc"), None);
    }
}
