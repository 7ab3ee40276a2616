//! What a person sees: output lines prefixed by their host, a progress line while the job runs,
//! and the summary at the end. Colour and the progress line only on a terminal.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    time::Duration,
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::{
    error::CliError,
    view::{Change, Counts, HostView, JobView, Outcome, job_status_name},
};

/// Colours for host prefixes; red and green are kept for outcomes.
const HOST_COLOURS: [&str; 8] = ["36", "33", "35", "34", "96", "93", "95", "94"];
/// The start of the name a job gets when none is given.
const DEFAULT_NAME_PREFIX: &str = "API Quick execution script";
/// Hosts named in one folded group of the summary before "and N more".
const LISTED_HOSTS: usize = 5;

/// How to draw, decided once from the terminal and the environment.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub colour: bool,
    pub terminal: bool,
}

impl Style {
    pub fn detect() -> Self {
        let terminal =
            std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let no_colour = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            colour: terminal && !no_colour,
            terminal,
        }
    }

    pub fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn outcome_colour(outcome: &Outcome) -> &'static str {
        match outcome {
            Outcome::Succeeded => "1;32",
            Outcome::TimedOut | Outcome::Terminated | Outcome::Waiting | Outcome::Running => "1;33",
            _ => "1;31",
        }
    }
}

/// Prints a job while it runs.
#[derive(Debug)]
pub struct Live {
    style: Style,
    /// Print output lines (not with `--quiet`).
    lines: bool,
    bar: Option<ProgressBar>,
    /// Each host's unfinished last line.
    partial: HashMap<usize, String>,
}

impl Live {
    pub fn new(style: Style, lines: bool, progress: bool, job_instance_id: i64) -> Self {
        let bar = (progress && style.terminal).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
            let template = if style.colour {
                "{spinner:.cyan} job {prefix} {elapsed_precise} [{bar:20.cyan/blue}] {pos}/{len} done · {msg}"
            } else {
                "{spinner} job {prefix} {elapsed_precise} [{bar:20}] {pos}/{len} done · {msg}"
            };
            if let Ok(s) = ProgressStyle::with_template(template) {
                bar.set_style(s.progress_chars("=>-"));
            }
            bar.set_prefix(job_instance_id.to_string());
            bar.set_message("connecting");
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Self {
            style,
            lines,
            bar,
            partial: HashMap::new(),
        }
    }

    pub fn on_change(&mut self, view: &JobView, change: &Change) -> Result<(), CliError> {
        match change {
            Change::Output(i, text) if self.lines => {
                let host = &view.hosts[*i];
                let partial = self.partial.entry(*i).or_default();
                partial.push_str(text);
                let Some(last) = partial.rfind('\n') else {
                    return Ok(());
                };
                let rest = partial.split_off(last + 1);
                let complete = std::mem::replace(partial, rest);
                let prefix = self.prefix(view, host, *i);
                let mut block = String::new();
                for line in complete.lines() {
                    block.push_str(&prefix);
                    block.push_str(line.trim_end_matches('\r'));
                    block.push('\n');
                }
                self.print(&block)?;
            }
            Change::Host(i) => {
                if view.hosts[*i].outcome().is_final() {
                    self.flush_host(view, *i)?;
                }
                self.update_bar(view);
            }
            Change::Job => self.update_bar(view),
            _ => {}
        }
        Ok(())
    }

    fn prefix(&self, view: &JobView, host: &HostView, index: usize) -> String {
        let label = host.label();
        let pad = view.label_width().saturating_sub(label.width());
        let label = format!("{label}{} | ", " ".repeat(pad));
        self.style
            .paint(HOST_COLOURS[index % HOST_COLOURS.len()], &label)
    }

    fn flush_host(&mut self, view: &JobView, i: usize) -> Result<(), CliError> {
        let Some(line) = self.partial.remove(&i).filter(|l| !l.is_empty()) else {
            return Ok(());
        };
        let text = format!("{}{}\n", self.prefix(view, &view.hosts[i], i), line);
        self.print(&text)
    }

    fn update_bar(&self, view: &JobView) {
        let Some(bar) = &self.bar else { return };
        let Counts {
            waiting,
            running,
            succeeded,
            failed,
        } = view.counts();
        bar.set_length(view.hosts.len() as u64);
        bar.set_position((succeeded + failed) as u64);
        let failed = format!("{failed} failed");
        let failed = if self.style.colour && !failed.starts_with('0') {
            self.style.paint("31", &failed)
        } else {
            failed
        };
        bar.set_message(format!(
            "{waiting} waiting · {running} running · {succeeded} succeeded · {failed}"
        ));
    }

    fn print(&self, text: &str) -> Result<(), CliError> {
        let write = || {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()
        };
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
        .map_err(CliError::output)
    }

    /// Prints what is left of every host's output and removes the progress line.
    pub fn finish(&mut self, view: &JobView) -> Result<(), CliError> {
        let mut left: Vec<usize> = self.partial.keys().copied().collect();
        left.sort_unstable();
        for i in left {
            self.flush_host(view, i)?;
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        Ok(())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The end-of-job summary: hosts grouped by outcome, identical outputs folded.
pub fn summary(view: &JobView, style: &Style, elapsed: Duration) -> String {
    let mut out = String::new();
    let total = view.hosts.len();
    let counts = view.counts();
    let time = view
        .total_time_ms
        .map(|ms| Duration::from_millis(ms.max(0) as u64))
        .unwrap_or(elapsed);
    // bk-job's default name is a prefix and a timestamp: it tells nothing the id does not.
    let name = view
        .name
        .as_deref()
        .filter(|n| !n.starts_with(DEFAULT_NAME_PREFIX))
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let headline = if view.succeeded() {
        format!(
            "job {}{name} succeeded on {total} host{} in {}",
            view.job_instance_id,
            plural(total),
            seconds(time)
        )
    } else {
        let status = view.status.map_or("unknown", job_status_name);
        format!(
            "job {}{name} {status} in {}: {} of {total} host{} succeeded",
            view.job_instance_id,
            seconds(time),
            counts.succeeded,
            plural(total)
        )
    };
    let headline_colour = if view.succeeded() { "1;32" } else { "1;31" };
    out.push_str(&style.paint(headline_colour, &headline));
    out.push('\n');

    let mut groups: Vec<(Outcome, Vec<&HostView>)> = Vec::new();
    for host in &view.hosts {
        let outcome = host.outcome();
        match groups.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, hosts)) => hosts.push(host),
            None => groups.push((outcome, vec![host])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    for (outcome, hosts) in groups {
        let header = format!(
            "{}: {} host{}",
            outcome.label(),
            hosts.len(),
            plural(hosts.len())
        );
        out.push_str(&style.paint(Style::outcome_colour(&outcome), &header));
        out.push('\n');
        // Identical outputs fold together, in the order hosts were listed.
        let mut folds: Vec<Vec<&HostView>> = Vec::new();
        for host in hosts {
            match folds
                .iter_mut()
                .find(|f| f[0].output.identity() == host.output.identity())
            {
                Some(fold) => fold.push(host),
                None => folds.push(vec![host]),
            }
        }
        for fold in folds {
            fold_lines(&mut out, &fold);
        }
    }
    out
}

fn fold_lines(out: &mut String, fold: &[&HostView]) {
    let names: Vec<String> = fold.iter().take(LISTED_HOSTS).map(|h| h.label()).collect();
    let mut who = names.join(", ");
    if fold.len() > LISTED_HOSTS {
        who.push_str(&format!(" and {} more", fold.len() - LISTED_HOSTS));
    }
    if fold.len() > 1 {
        who = format!("{} hosts ({who})", fold.len());
    }
    let output = &fold[0].output;
    let lines = output.last_lines();
    match lines.as_slice() {
        [] => out.push_str(&format!("  {who}: (no output)\n")),
        [line] if output.total_lines() == 1 => out.push_str(&format!("  {who}: {line}\n")),
        _ => {
            out.push_str(&format!("  {who}:\n"));
            let total = output.total_lines();
            if total > lines.len() as u64 {
                out.push_str(&format!("    (last {} of {total} lines)\n", lines.len()));
            }
            for line in lines {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// "5s ago", "3m ago", "2h ago", "4d ago".
pub fn age(ms: i64, now_ms: i64) -> String {
    let s = ((now_ms - ms).max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Left-aligned columns; the last column is not padded. Colour codes take no width.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| visible_width(cell))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < row.len() {
                line.push_str(&" ".repeat(widths[c] - visible_width(cell) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Terminal columns taken (two for a CJK character), not counting `ESC [ ... m` colour codes.
fn visible_width(text: &str) -> usize {
    let mut width = 0;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            width += c.width().unwrap_or(0);
        }
    }
    width
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn view_of(hosts: &[(&str, i32, i32, &str)]) -> JobView {
        let mut view = JobView::new(9, false);
        for (i, (ip, status, code, output)) in hosts.iter().enumerate() {
            let id = i as i64 + 1;
            view.apply(&json!({"type": "host", "bk_host_id": id, "ip": ip, "status": status, "exit_code": code, "tag": ""}));
            view.apply(&json!({"type": "output", "bk_host_id": id, "offset": 0, "data": output}));
        }
        view
    }

    #[test]
    fn the_summary_groups_by_outcome_and_folds_identical_outputs() {
        let mut view = view_of(&[
            ("10.0.0.1", 9, 0, "ok\n"),
            ("10.0.0.2", 104, 3, "oops\nbad\n"),
            ("10.0.0.3", 9, 0, "ok\n"),
            ("10.0.0.4", 9, 0, "different\n"),
            ("10.0.0.5", 310, 0, ""),
        ]);
        view.status = Some(4);
        let text = summary(
            &view,
            &Style {
                colour: false,
                terminal: false,
            },
            Duration::from_millis(1500),
        );
        assert_eq!(
            text,
            "job 9 failed in 1.50s: 3 of 5 hosts succeeded
succeeded: 3 hosts
  2 hosts (10.0.0.1, 10.0.0.3): ok
  10.0.0.4: different
failed with exit code 3: 1 host
  10.0.0.2:
    oops
    bad
offline / agent abnormal: 1 host
  10.0.0.5: (no output)
"
        );
    }

    #[test]
    fn many_identical_hosts_fold_into_one_line() {
        let hosts: Vec<(String, i32, i32, &str)> = (0..37)
            .map(|i| (format!("10.0.1.{i}"), 9, 0, "ok\n"))
            .collect();
        let hosts: Vec<(&str, i32, i32, &str)> = hosts
            .iter()
            .map(|(ip, s, c, o)| (ip.as_str(), *s, *c, *o))
            .collect();
        let mut view = view_of(&hosts);
        view.status = Some(3);
        let text = summary(
            &view,
            &Style {
                colour: false,
                terminal: false,
            },
            Duration::ZERO,
        );
        assert!(
            text.starts_with("job 9 succeeded on 37 hosts in 0.00s\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  37 hosts (10.0.1.0, 10.0.1.1, 10.0.1.2, 10.0.1.3, 10.0.1.4 and 32 more): ok\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn tables_and_ages_read_well() {
        let rows = vec![
            vec!["ID".into(), "NAME".into()],
            vec!["100".into(), "x".into()],
        ];
        assert_eq!(table(&rows), "ID   NAME\n100  x\n");
        let painted = vec![
            vec!["A".into(), "B".into()],
            vec!["\x1b[32mon\x1b[0m".into(), "x".into()],
        ];
        assert_eq!(table(&painted), "A   B\n\x1b[32mon\x1b[0m  x\n");
        // A CJK character takes two columns: the next column starts at the same place on
        // every line.
        let cjk = vec![
            vec!["HOST".into(), "JOB".into(), "STATUS".into()],
            vec!["web-1".into(), "部署".into(), "success".into()],
            vec!["数据库主机".into(), "backup".into(), "failed".into()],
        ];
        assert_eq!(
            table(&cjk),
            "HOST        JOB     STATUS\n\
             web-1       部署    success\n\
             数据库主机  backup  failed\n"
        );
        assert_eq!(age(0, 59_000), "59s ago");
        assert_eq!(age(0, 7_200_000), "2h ago");
        assert_eq!(seconds(Duration::from_secs(125)), "2m05s");
    }
}
